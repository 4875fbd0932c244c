#!/usr/bin/env bash
# Installs the Debian packages pgway's build, tests and dev cluster need, if any is missing:
# PostgreSQL 15 (server + client: initdb, pg_ctl, pg_basebackup, psql, pgbench) and protoc;
# for the Patroni tests, the Patroni quick start and the failover benchmark: etcd 3.4 (server
# and etcdctl), Patroni 3.0, HAProxy, curl and psycopg2 (the benchmark's writer); for the
# load comparison (benches/compare.sh), also pgbouncer and gnuplot-nox; for the
# driver tests (tests/drivers.rs), pgjdbc and a JDK (their Python and Node.js drivers come from
# PyPI and npm through tests/drivers/setup.sh, which those tests run themselves).
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
# /bin/kill: the Patroni test harness (tests/common/patroni.rs) kills process groups with it.
if [[ ! -x /bin/kill && ! -x /usr/bin/kill ]]; then
    missing+=(procps)
fi

if ! have_pkg etcd-server || ! command -v etcd >/dev/null 2>&1; then
    missing+=(etcd-server)
fi
if ! have_pkg etcd-client || ! command -v etcdctl >/dev/null 2>&1; then
    missing+=(etcd-client)
fi
if ! have_pkg patroni || ! command -v patroni >/dev/null 2>&1 || ! command -v patronictl >/dev/null 2>&1; then
    missing+=(patroni)
fi
if ! have_pkg haproxy || [[ ! -x /usr/sbin/haproxy ]]; then
    missing+=(haproxy)
fi
if ! command -v curl >/dev/null 2>&1; then
    missing+=(curl)
fi
# benches/compare.sh: pgbouncer (the pooling comparison point) and gnuplot (its chart).
if ! have_pkg pgbouncer || [[ ! -x /usr/sbin/pgbouncer ]]; then
    missing+=(pgbouncer)
fi
if ! have_pkg gnuplot-nox || ! command -v gnuplot >/dev/null 2>&1; then
    missing+=(gnuplot-nox)
fi
if ! have_pkg python3-psycopg2; then
    missing+=(python3-psycopg2)
fi

if ! have_pkg libpostgresql-jdbc-java || [[ ! -f /usr/share/java/postgresql.jar ]]; then
    missing+=(libpostgresql-jdbc-java)
fi
if ! command -v java >/dev/null 2>&1; then
    missing+=(openjdk-17-jdk-headless)
fi

if ((${#missing[@]} == 0)); then
    echo "install-deps: all present (postgresql-15, postgresql-client-15, protobuf-compiler," \
        "etcd-server, etcd-client, patroni, haproxy, pgbouncer, gnuplot-nox, curl, python3-psycopg2," \
        "libpostgresql-jdbc-java, java)"
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
# Likewise etcd-server may start a default etcd on 127.0.0.1:2379 where init scripts run; the
# Patroni quick start uses that port for its own etcd, so stop the service we just installed.
if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v service >/dev/null 2>&1; then
    if service etcd status >/dev/null 2>&1; then
        echo "install-deps: stopping the etcd service the package started"
        "${SUDO[@]}" service etcd stop >/dev/null 2>&1 || true
    fi
fi
# The pgbouncer package may start a default pgbouncer on 127.0.0.1:6432, pgway's default port
# (the dev cluster's); benches/compare.sh runs its own, so stop the service we just installed.
if [[ " ${missing[*]} " == *" pgbouncer "* ]] && command -v service >/dev/null 2>&1; then
    if service pgbouncer status >/dev/null 2>&1; then
        echo "install-deps: stopping the pgbouncer service the package started"
        "${SUDO[@]}" service pgbouncer stop >/dev/null 2>&1 || true
    fi
fi
for tool in initdb pg_ctl pg_basebackup postgres psql pgbench; do
    [[ -x "$PG_BIN/$tool" ]] || { echo "install-deps: $PG_BIN/$tool is still missing" >&2; exit 1; }
done
command -v protoc >/dev/null || { echo "install-deps: protoc is still missing" >&2; exit 1; }
for tool in etcd etcdctl patroni patronictl curl; do
    command -v "$tool" >/dev/null || { echo "install-deps: $tool is still missing" >&2; exit 1; }
done
[[ -x /usr/sbin/haproxy ]] || { echo "install-deps: haproxy is still missing" >&2; exit 1; }
[[ -x /usr/sbin/pgbouncer ]] || { echo "install-deps: pgbouncer is still missing" >&2; exit 1; }
command -v gnuplot >/dev/null || { echo "install-deps: gnuplot is still missing" >&2; exit 1; }
echo "install-deps: done"
