#!/usr/bin/env bash
# Installs the Debian packages pgway's build, tests and dev cluster need, if any is missing:
# PostgreSQL 15 (server + client: initdb, pg_ctl, pg_basebackup, psql, pgbench) and protoc.
# Idempotent and fast when everything is present (no apt-get at all then).
set -euo pipefail

PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}

missing=()
have_pkg() { dpkg -s "$1" >/dev/null 2>&1; }

if ! have_pkg postgresql-15 || [[ ! -x "$PG_BIN/initdb" || ! -x "$PG_BIN/pg_ctl" || ! -x "$PG_BIN/pg_basebackup" ]]; then
    missing+=(postgresql-15)
fi
if ! have_pkg postgresql-client-15 || [[ ! -x "$PG_BIN/psql" || ! -x "$PG_BIN/pgbench" ]]; then
    missing+=(postgresql-client-15)
fi
if ! command -v protoc >/dev/null 2>&1; then
    missing+=(protobuf-compiler)
fi
if ! command -v runuser >/dev/null 2>&1; then
    missing+=(util-linux)
fi

if ((${#missing[@]} == 0)); then
    echo "install-deps: all present (postgresql-15, postgresql-client-15, protobuf-compiler)"
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"

# The Debian package creates and starts a default cluster (port 5432); the tests and the dev
# cluster run their own servers and do not need it. Leave it alone if it was already there.
for tool in initdb pg_ctl pg_basebackup postgres psql pgbench; do
    [[ -x "$PG_BIN/$tool" ]] || { echo "install-deps: $PG_BIN/$tool is still missing" >&2; exit 1; }
done
command -v protoc >/dev/null || { echo "install-deps: protoc is still missing" >&2; exit 1; }
echo "install-deps: done"
