#!/usr/bin/env bash
# THE quick start: a local PostgreSQL 15 primary on 127.0.0.1:5441 and a streaming replica on
# 127.0.0.1:5442, with pgway on 127.0.0.1:6432 (admin HTTP on 127.0.0.1:9930) in front.
#
#   scripts/dev-cluster.sh            set up or reuse the servers, build pgway (release) and run
#                                     it in the foreground (Ctrl-C stops pgway; servers stay up)
#   scripts/dev-cluster.sh servers    only set up or reuse the servers and write the config
#   scripts/dev-cluster.sh status     show the servers' state
#   scripts/dev-cluster.sh stop       stop the servers
#   scripts/dev-cluster.sh destroy    stop the servers and delete their data
#
# Then:  psql "postgres://app:app-secret@127.0.0.1:6432/app"
#
# Data, logs and the generated pgway.toml live in ./.dev/ (ignored by git through its own
# .gitignore). PostgreSQL refuses to run as root, so as root the servers run as the `postgres`
# OS user, and when that user cannot write to ./.dev (e.g. a repo under a private home
# directory) /tmp/pgway-dev is used instead; the script says which. PGWAY_DEV_DIR overrides.
# Re-running is safe: existing servers are reused.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
PRIMARY_PORT=5441
REPLICA_PORT=5442
LISTEN=127.0.0.1:6432
ADMIN=127.0.0.1:9930
DSN="postgres://app:app-secret@127.0.0.1:6432/app"

is_root() { [[ $(id -u) -eq 0 ]]; }

# Runs a command as the OS user that owns the servers, from a directory it can enter.
as_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

say() { echo "dev-cluster: $*"; }

choose_dir() {
    if [[ -n ${PGWAY_DEV_DIR:-} ]]; then
        DEV_DIR=$PGWAY_DEV_DIR
    else
        DEV_DIR=$REPO/.dev
        mkdir -p "$DEV_DIR"
        if is_root; then
            chown postgres:postgres "$DEV_DIR"
        fi
        if ! as_pg test -w "$DEV_DIR" -a -x "$DEV_DIR"; then
            say "the postgres user cannot use $DEV_DIR; using /tmp/pgway-dev"
            rmdir "$DEV_DIR" 2>/dev/null || true
            DEV_DIR=/tmp/pgway-dev
        fi
    fi
    mkdir -p "$DEV_DIR"
    if is_root; then
        chown postgres:postgres "$DEV_DIR"
    fi
    [[ -f $DEV_DIR/.gitignore ]] || echo '*' >"$DEV_DIR/.gitignore"
    PRIMARY=$DEV_DIR/primary
    REPLICA=$DEV_DIR/replica
    SOCK=$DEV_DIR/sock
    CONFIG=$DEV_DIR/pgway.toml
}

running() { [[ -f $1/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

start_server() { # data dir, log file
    if running "$1"; then
        say "$(basename "$1") already running"
        return
    fi
    say "starting $(basename "$1") (log: $2)"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$1" -l "$2" -w -t 60 start >/dev/null; then
        say "could not start $(basename "$1"); last lines of $2:" >&2
        tail -n 20 "$2" >&2 || true
        exit 1
    fi
}

stop_server() {
    if running "$1"; then
        say "stopping $(basename "$1")"
        as_pg "$PG_BIN/pg_ctl" -D "$1" -m fast -w -t 60 stop >/dev/null
    fi
}

admin_psql() { # port, then psql arguments
    local port=$1
    shift
    "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

setup_primary() {
    if [[ ! -f $PRIMARY/PG_VERSION ]]; then
        rm -rf "$PRIMARY"
        say "initialising the primary in $PRIMARY"
        as_pg mkdir -p "$SOCK"
        as_pg "$PG_BIN/initdb" -D "$PRIMARY" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
            --encoding=UTF8 --locale=C >/dev/null
        as_pg tee "$PRIMARY/pg_hba.conf" >/dev/null <<EOF
# written by scripts/dev-cluster.sh
local all         all                     trust
local replication all                     trust
host  replication postgres 127.0.0.1/32   trust
host  all         postgres 127.0.0.1/32   trust
host  all         all      127.0.0.1/32   scram-sha-256
EOF
        as_pg tee -a "$PRIMARY/postgresql.conf" >/dev/null <<EOF

# scripts/dev-cluster.sh
listen_addresses = '127.0.0.1'
port = $PRIMARY_PORT
unix_socket_directories = '$SOCK'
max_connections = 200
wal_level = replica
max_wal_senders = 10
wal_keep_size = 512MB
hot_standby = on
EOF
    fi
    start_server "$PRIMARY" "$DEV_DIR/primary.log"
    # Idempotent: create what is missing, (re)set the password.
    admin_psql "$PRIMARY_PORT" -d postgres >/dev/null <<'EOF'
SELECT 'CREATE ROLE app LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') \gexec
SET password_encryption = 'scram-sha-256';
ALTER ROLE app LOGIN PASSWORD 'app-secret';
SELECT 'CREATE DATABASE app OWNER app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'app') \gexec
EOF
}

setup_replica() {
    if [[ ! -f $REPLICA/PG_VERSION ]]; then
        rm -rf "$REPLICA"
        say "cloning the replica into $REPLICA (pg_basebackup -R)"
        as_pg "$PG_BIN/pg_basebackup" -D "$REPLICA" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
            -R -X stream -c fast
        echo "port = $REPLICA_PORT" | as_pg tee -a "$REPLICA/postgresql.conf" >/dev/null
    fi
    start_server "$REPLICA" "$DEV_DIR/replica.log"
    local i
    for i in $(seq 1 60); do
        if [[ $(admin_psql "$REPLICA_PORT" -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null) == t ]]; then
            return
        fi
        sleep 0.5
    done
    say "the replica on port $REPLICA_PORT is not in recovery; see $DEV_DIR/replica.log" >&2
    exit 1
}

write_config() {
    cat >"$CONFIG" <<EOF
# Generated by scripts/dev-cluster.sh (see config/static.toml for every option).
listen = "$LISTEN"
admin_listen = "$ADMIN"

[[users]]
name = "app"
password = "app-secret"

[pool]
size = 20
wait_timeout = "5s"

[topology]
kind = "static"
nodes = ["127.0.0.1:$PRIMARY_PORT", "127.0.0.1:$REPLICA_PORT"]
health_interval = "1s"
EOF
    say "wrote $CONFIG"
}

servers() {
    bash "$REPO/scripts/install-deps.sh"
    choose_dir
    setup_primary
    setup_replica
    write_config
    say "primary 127.0.0.1:$PRIMARY_PORT, replica 127.0.0.1:$REPLICA_PORT, data in $DEV_DIR"
}

case ${1:-run} in
run)
    servers
    say "building pgway (cargo build --release)"
    (cd "$REPO" && cargo build --release)
    echo
    echo "  pgway listens on $LISTEN (admin http://$ADMIN/health). Connect with:"
    echo
    echo "    psql \"$DSN\""
    echo
    echo "  Ctrl-C stops pgway; the servers keep running ('scripts/dev-cluster.sh stop' stops them)."
    echo
    exec "$REPO/target/release/pgway" --config "$CONFIG"
    ;;
servers)
    servers
    echo "  start pgway with: cargo run --release -- --config $CONFIG"
    ;;
status)
    choose_dir
    for d in "$PRIMARY" "$REPLICA"; do
        if running "$d"; then say "$(basename "$d"): running ($d)"; else say "$(basename "$d"): stopped ($d)"; fi
    done
    ;;
stop)
    choose_dir
    stop_server "$REPLICA"
    stop_server "$PRIMARY"
    ;;
destroy)
    choose_dir
    stop_server "$REPLICA"
    stop_server "$PRIMARY"
    say "deleting $DEV_DIR"
    rm -rf "$DEV_DIR"
    ;;
*)
    echo "usage: $0 [run|servers|status|stop|destroy]" >&2
    exit 2
    ;;
esac
