#!/usr/bin/env bash
# Installs the client drivers that the driver-compatibility tests (tests/drivers.rs) run,
# when they are missing:
#   python  a virtualenv in tests/drivers/.venv with asyncpg and psycopg 3 (binary wheels),
#           from PyPI, as pinned in tests/drivers/python/requirements.txt
#   java    pgjdbc: Debian's libpostgresql-jdbc-java (/usr/share/java/postgresql.jar)
#   node    node-postgres (`pg`) in tests/drivers/node/node_modules, from the npm registry,
#           as locked in tests/drivers/node/package-lock.json
#
# Usage: tests/drivers/setup.sh [python|java|node|all]...   (no argument: all)
#
# Idempotent and fast when everything is present (no network at all then). Runs under a lock
# (tests/drivers/.setup.lock), so tests that call it in parallel do not race. When a registry
# cannot be reached it fails with a message that says so; it never skips silently.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JDBC_JAR=${PGWAY_JDBC_JAR:-/usr/share/java/postgresql.jar}
PYTHON=${PGWAY_PYTHON:-python3}

log() { echo "drivers/setup.sh: $*"; }
die() {
    echo "drivers/setup.sh: $*" >&2
    exit 1
}

# A short hash of files, to notice when a requirements or lock file changed.
digest() { cat "$@" | sha256sum | cut -c1-16; }

apt_install() {
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get install $*"
    "${sudo[@]}" apt-get update -q ||
        die "apt-get update failed: are Debian's package mirrors reachable?"
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@" ||
        die "apt-get install $* failed"
}

setup_python() {
    local venv="$here/.venv" req="$here/python/requirements.txt" stamp want
    stamp="$venv/.pgway-stamp"
    want=$(digest "$req")
    if [[ -x "$venv/bin/python" && -f "$stamp" && $(cat "$stamp") == "$want" ]] &&
        "$venv/bin/python" -c 'import asyncpg, psycopg' 2>/dev/null; then
        return 0
    fi
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (the Python driver tests need CPython 3.8+)"
    log "creating $venv and installing $(grep -v '^#' "$req" | xargs) from PyPI"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" || die "'$PYTHON -m venv' failed (is the venv module installed?)"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q \
        --timeout 30 --retries 2 -r "$req" ||
        die "could not install the Python drivers from PyPI (is PyPI reachable?)"
    "$venv/bin/python" -c 'import asyncpg, psycopg; print("asyncpg", asyncpg.__version__, "psycopg", psycopg.__version__, psycopg.pq.__impl__)' ||
        die "the Python drivers do not import after installing them"
    echo "$want" >"$stamp"
}

setup_java() {
    local pkgs=()
    command -v java >/dev/null || pkgs+=(openjdk-17-jdk-headless)
    [[ -f "$JDBC_JAR" ]] || pkgs+=(libpostgresql-jdbc-java)
    if ((${#pkgs[@]} > 0)); then
        apt_install "${pkgs[@]}"
    fi
    [[ -f "$JDBC_JAR" ]] || die "$JDBC_JAR is still missing after installing libpostgresql-jdbc-java"
    command -v java >/dev/null || die "java is still missing"
}

setup_node() {
    local dir="$here/node" stamp want
    stamp="$dir/node_modules/.pgway-stamp"
    command -v node >/dev/null || die "node not found (the node-postgres test needs Node.js 16+ and npm)"
    command -v npm >/dev/null || die "npm not found (the node-postgres test needs Node.js 16+ and npm)"
    want=$(digest "$dir/package.json" "$dir/package-lock.json")
    if [[ -f "$dir/node_modules/pg/package.json" && -f "$stamp" && $(cat "$stamp") == "$want" ]]; then
        return 0
    fi
    log "installing node-postgres from the npm registry into $dir/node_modules"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error --fetch-retries=2 --fetch-timeout=30000) ||
        die "could not install node-postgres from the npm registry (is it reachable?)"
    [[ -f "$dir/node_modules/pg/package.json" ]] || die "node_modules/pg is still missing after npm ci"
    echo "$want" >"$stamp"
}

targets=("$@")
((${#targets[@]} > 0)) || targets=(all)

exec 9>"$here/.setup.lock"
flock 9

for t in "${targets[@]}"; do
    case "$t" in
    python) setup_python ;;
    java) setup_java ;;
    node) setup_node ;;
    all)
        setup_python
        setup_java
        setup_node
        ;;
    *) die "unknown target '$t' (python, java, node or all)" ;;
    esac
done
