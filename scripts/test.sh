#!/usr/bin/env bash
# THE test command: installs missing system packages, then runs
#   cargo fmt --check
#   cargo clippy --all-targets -- -D warnings
#   cargo test --all-targets [ARGS...]     (unit tests and the integration tests in tests/)
# and finally stops any PostgreSQL server the integration tests left behind.
# Exits non-zero on any failure. Extra arguments go to `cargo test`, e.g.
#   scripts/test.sh --test routing
#   scripts/test.sh -- --test-threads 1
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}

bash scripts/install-deps.sh

# A full build runs out of disk with a confusing LLVM error; say so plainly instead.
FREE_GIB=$(df -P --block-size=1G "$(pwd)" | awk 'NR == 2 {print $4}')
if [[ $FREE_GIB =~ ^[0-9]+$ ]] && ((FREE_GIB < 6)); then
    echo "test.sh: ERROR: only ${FREE_GIB} GiB free on the disk holding $(pwd); a build and" \
        "test run needs about 6 GiB (old target/ directories and clones can go)" >&2
    exit 1
fi

# Every test cluster of this run lives under one directory (the harness in tests/common reads
# PGWAY_TEST_TMPDIR), so the clean-up below touches this run's servers and nothing else.
PGWAY_TEST_TMPDIR=$(mktemp -d /tmp/pgway-test-run.XXXXXX)
chmod 755 "$PGWAY_TEST_TMPDIR"
export PGWAY_TEST_TMPDIR

cleanup() {
    local status=$?
    local pidfile datadir pid
    shopt -s nullglob
    for pidfile in "$PGWAY_TEST_TMPDIR"/*/*/postmaster.pid; do
        datadir=$(dirname "$pidfile")
        echo "test.sh: stopping leftover test server in $datadir"
        if [[ $(id -u) -eq 0 ]]; then
            (cd / && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$datadir" -m immediate -w -t 30 stop) || true
        else
            (cd / && "$PG_BIN/pg_ctl" -D "$datadir" -m immediate -w -t 30 stop) || true
        fi
        # If pg_ctl could not stop it, kill that postmaster (by its own pid, checked to be one).
        pid=$(head -n 1 "$pidfile" 2>/dev/null || true)
        if [[ $pid =~ ^[0-9]+$ ]] && grep -q postgres "/proc/$pid/cmdline" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    # Patroni, etcd and etcdctl processes of the failover tests, if the test binary died
    # before it could stop them: they name this run's directory on their command lines.
    pkill -9 -f -- "$PGWAY_TEST_TMPDIR" 2>/dev/null || true
    rm -rf "$PGWAY_TEST_TMPDIR"
    exit "$status"
}
trap cleanup EXIT

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test --all-targets $*"
cargo test --all-targets "$@"
