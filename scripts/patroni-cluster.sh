#!/usr/bin/env bash
# THE Patroni quick start: etcd, two Patroni-managed PostgreSQL 15 nodes and pgway, all on
# loopback.
#
#   scripts/patroni-cluster.sh             set up or reuse etcd and the two Patroni nodes, build
#                                          pgway (release) and run it in the foreground (Ctrl-C
#                                          stops pgway; etcd and Patroni stay up)
#   scripts/patroni-cluster.sh servers     only set up or reuse etcd + Patroni and write the config
#   scripts/patroni-cluster.sh status      `patronictl list` and the leader key in etcd
#   scripts/patroni-cluster.sh start-node NAME   start Patroni for node1 or node2 again
#                                          (e.g. after killing it: it rejoins as a replica)
#   scripts/patroni-cluster.sh switchover  planned switchover to the replica (patronictl)
#   scripts/patroni-cluster.sh stop        stop both Patroni nodes (and their PostgreSQL) and etcd
#   scripts/patroni-cluster.sh destroy     stop everything and delete the data
#
# Then:  psql "postgres://app:app-secret@127.0.0.1:6432/app"
#
#   etcd (v3 API)       127.0.0.1:2379   (peer 127.0.0.1:2380)
#   node1 / node2       PostgreSQL 127.0.0.1:5451 / 5452, Patroni REST 127.0.0.1:8008 / 8009
#   pgway               127.0.0.1:6432, admin HTTP 127.0.0.1:9930
#   Patroni keys        /service/demo/leader, /service/demo/members/node1, ...
#
# Patroni talks to etcd through its `etcd3:` section (the v3 API). Its `etcd:` section speaks
# the v2 API, which etcd 3.4+ disables by default: Patroni would then not find etcd at all.
#
# Data, logs, the Patroni YAML files and the generated pgway.toml live in ./.patroni/ (ignored
# by git through its own .gitignore), or /tmp/pgway-patroni when the postgres user cannot use
# that directory; PGWAY_PATRONI_DIR overrides. PostgreSQL refuses to run as root, so as root
# Patroni (and with it PostgreSQL) runs as the `postgres` OS user; etcd runs as the invoking
# user. Every process runs in a session of its own, so Ctrl-C on pgway leaves them up.
#
# Other ports and names, e.g. for a second cluster next to this one (benches/failover.sh uses
# these): PGWAY_ETCD_PORT, PGWAY_ETCD_PEER_PORT, PGWAY_PATRONI_PG_PORTS ("5451 5452"),
# PGWAY_PATRONI_API_PORTS ("8008 8009"), PGWAY_PATRONI_SCOPE (demo), PGWAY_LISTEN,
# PGWAY_ADMIN_LISTEN, PGWAY_PATRONI_SYNC=1 (Patroni's synchronous_mode).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
ETCD_PORT=${PGWAY_ETCD_PORT:-2379}
ETCD_PEER_PORT=${PGWAY_ETCD_PEER_PORT:-2380}
read -r -a PG_PORTS <<<"${PGWAY_PATRONI_PG_PORTS:-5451 5452}"
read -r -a API_PORTS <<<"${PGWAY_PATRONI_API_PORTS:-8008 8009}"
SCOPE=${PGWAY_PATRONI_SCOPE:-demo}
NAMESPACE=/service
LISTEN=${PGWAY_LISTEN:-127.0.0.1:6432}
ADMIN=${PGWAY_ADMIN_LISTEN:-127.0.0.1:9930}
SYNC=${PGWAY_PATRONI_SYNC:-0}
NODES=(node1 node2)
DSN="postgres://app:app-secret@$LISTEN/app"
ETCD_URL="http://127.0.0.1:$ETCD_PORT"

say() { echo "patroni-cluster: $*"; }
die() {
    echo "patroni-cluster: $*" >&2
    exit 1
}


choose_dir() {
    DIR=$(pg_work_dir "${PGWAY_PATRONI_DIR:-$REPO/.patroni}" "${PGWAY_PATRONI_DIR:-/tmp/pgway-patroni}")
    CONFIG=$DIR/pgway.toml
}

node_index() {
    local i
    for i in "${!NODES[@]}"; do
        [[ ${NODES[$i]} == "$1" ]] && {
            echo "$i"
            return
        }
    done
    die "no node named '$1' (nodes: ${NODES[*]})"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

etcdctl_() { ETCDCTL_API=3 etcdctl --endpoints="$ETCD_URL" --dial-timeout=2s --command-timeout=3s "$@"; }

leader() { etcdctl_ get --print-value-only "$NAMESPACE/$SCOPE/leader" 2>/dev/null || true; }

http_code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true; }

wait_for() { # seconds, description, command...
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 4; i++)); do
        if "$@"; then
            return 0
        fi
        sleep 0.25
    done
    return 1
}

start_etcd() {
    if pid_alive "$DIR/etcd.pid"; then
        say "etcd already running (pid $(cat "$DIR/etcd.pid"))"
        return
    fi
    say "starting etcd on 127.0.0.1:$ETCD_PORT (log: $DIR/etcd.log)"
    nohup setsid etcd --name default --data-dir "$DIR/etcd" \
        --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" \
        >>"$DIR/etcd.log" 2>&1 </dev/null &
    echo $! >"$DIR/etcd.pid"
    wait_for 30 "etcd" etcdctl_ endpoint health >/dev/null 2>&1 ||
        die "etcd did not become healthy; see $DIR/etcd.log"
}

write_patroni_yaml() { # node name
    local name=$1 i
    i=$(node_index "$name")
    local pg_port=${PG_PORTS[$i]} api_port=${API_PORTS[$i]}
    local sync=false
    [[ $SYNC == 1 ]] && sync=true
    as_pg mkdir -p "$DIR/sock"
    as_pg tee "$DIR/$name.yml" >/dev/null <<EOF
# Patroni $name, written by scripts/patroni-cluster.sh
scope: $SCOPE
namespace: $NAMESPACE
name: $name

restapi:
  listen: 127.0.0.1:$api_port
  connect_address: 127.0.0.1:$api_port

# The v3 API. (The 'etcd:' section would speak v2, which etcd 3.4+ disables by default.)
etcd3:
  hosts: 127.0.0.1:$ETCD_PORT

bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    # Keep the primary running while etcd is unreachable, as long as it reaches every member.
    failsafe_mode: true
    synchronous_mode: $sync
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: logical
        hot_standby: "on"
        max_connections: 200
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 256MB
        wal_log_hints: "on"
  initdb:
    - encoding: UTF8
    - locale: C

postgresql:
  listen: 127.0.0.1:$pg_port
  connect_address: 127.0.0.1:$pg_port
  data_dir: $DIR/$name
  bin_dir: $PG_BIN
  pgpass: $DIR/$name.pgpass
  basebackup:
    - checkpoint: fast
  authentication:
    superuser:
      username: postgres
      password: postgres-secret
    replication:
      username: replicator
      password: replicator-secret
  parameters:
    unix_socket_directories: $DIR/sock
  pg_hba:
    - local all all trust
    - local replication all trust
    - host replication replicator 127.0.0.1/32 scram-sha-256
    - host all postgres 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 scram-sha-256

tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
EOF
}

start_node() { # node name
    local name=$1
    if pid_alive "$DIR/$name.pid"; then
        say "$name: Patroni already running (pid $(cat "$DIR/$name.pid"))"
        return
    fi
    write_patroni_yaml "$name"
    say "$name: starting Patroni (log: $DIR/$name.log)"
    local -a user=()
    if is_root; then
        user=(setpriv --reuid=postgres --regid=postgres --init-groups)
    fi
    # setsid execs in place here (a background job is no process group leader), so $! is
    # Patroni's own pid.
    (
        cd "$DIR" || exit 1
        HOME=$(getent passwd postgres | cut -d: -f6) nohup setsid "${user[@]}" \
            patroni "$DIR/$name.yml" >>"$DIR/$name.log" 2>&1 </dev/null &
        echo $! >"$DIR/$name.pid"
    )
}

admin_psql() { # port, then psql arguments
    local port=$1
    shift
    "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

is_primary() { [[ $(http_code "http://127.0.0.1:${API_PORTS[$1]}/primary") == 200 ]]; }
is_replica() { [[ $(http_code "http://127.0.0.1:${API_PORTS[$1]}/replica") == 200 ]]; }
streaming() { [[ $(admin_psql "${PG_PORTS[$1]}" -d postgres -c 'select status from pg_stat_wal_receiver' 2>/dev/null) == streaming ]]; }
some_primary() {
    local i
    for i in "${!NODES[@]}"; do
        if is_primary "$i"; then
            PRIMARY_INDEX=$i
            return 0
        fi
    done
    return 1
}

servers() {
    bash "$REPO/scripts/install-deps.sh"
    choose_dir
    start_etcd
    start_node node1
    say "waiting for a leader (a first bootstrap takes about 10 s)"
    wait_for 90 "a primary" some_primary || die "no node became primary; see $DIR/node1.log"
    local p=$PRIMARY_INDEX
    start_node node2
    # Idempotent: create what is missing, (re)set the password.
    admin_psql "${PG_PORTS[$p]}" -d postgres >/dev/null <<'EOF'
SELECT 'CREATE ROLE app LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') \gexec
SET password_encryption = 'scram-sha-256';
ALTER ROLE app LOGIN PASSWORD 'app-secret';
SELECT 'CREATE DATABASE app OWNER app' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'app') \gexec
EOF
    local i
    for i in "${!NODES[@]}"; do
        [[ $i == "$p" ]] && continue
        say "waiting for ${NODES[$i]} to stream from ${NODES[$p]}"
        wait_for 90 "replica" is_replica "$i" || die "${NODES[$i]} did not become a replica; see $DIR/${NODES[$i]}.log"
        wait_for 60 "streaming" streaming "$i" || die "${NODES[$i]} is not streaming; see $DIR/${NODES[$i]}.log"
    done
    write_config
    say "leader: $(leader); etcd $ETCD_URL; data in $DIR"
}

write_config() {
    cat >"$CONFIG" <<EOF
# Generated by scripts/patroni-cluster.sh (see config/patroni.toml for every option).
listen = "$LISTEN"
admin_listen = "$ADMIN"

[[users]]
name = "app"
password = "app-secret"

[pool]
size = 20
wait_timeout = "5s"

[topology]
kind = "patroni"
etcd = ["127.0.0.1:$ETCD_PORT"]
namespace = "$NAMESPACE"
scope = "$SCOPE"
failover_timeout = "30s"
health_interval = "1s"

[routing]
max_replica_lag = "1MB"
EOF
    say "wrote $CONFIG"
}

stop_pid() { # pid file, description, seconds
    local pidfile=$1 what=$2 secs=$3 pid i
    pid_alive "$pidfile" || {
        rm -f "$pidfile"
        return 0
    }
    pid=$(cat "$pidfile")
    say "stopping $what (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 4; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$what did not stop within ${secs}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop_all() {
    local name
    # Replicas first, so that the leader does not fail over to a node about to stop.
    local l
    l=$(leader)
    for name in "${NODES[@]}"; do
        [[ $name == "$l" ]] || stop_pid "$DIR/$name.pid" "Patroni $name" 60
    done
    for name in "${NODES[@]}"; do
        stop_pid "$DIR/$name.pid" "Patroni $name" 60
    done
    # A postmaster left behind by a killed Patroni.
    for name in "${NODES[@]}"; do
        if [[ -f $DIR/$name/postmaster.pid ]] && as_pg "$PG_BIN/pg_ctl" -D "$DIR/$name" status >/dev/null 2>&1; then
            say "stopping the PostgreSQL of $name that Patroni left behind"
            as_pg "$PG_BIN/pg_ctl" -D "$DIR/$name" -m fast -w -t 60 stop >/dev/null || true
        fi
    done
    stop_pid "$DIR/etcd.pid" etcd 30
}

case ${1:-run} in
run)
    servers
    say "building pgway (cargo build --release)"
    (cd "$REPO" && cargo build --release)
    echo
    echo "  pgway listens on $LISTEN (admin http://$ADMIN/health) and follows Patroni's keys in"
    echo "  etcd ($ETCD_URL, $NAMESPACE/$SCOPE/). Connect with:"
    echo
    echo "    psql \"$DSN\""
    echo
    echo "  Try a failover: 'scripts/patroni-cluster.sh switchover', or kill -9 the leader's Patroni"
    echo "  and postmaster, then 'scripts/patroni-cluster.sh start-node NAME' to let it rejoin."
    echo "  Ctrl-C stops pgway; etcd and Patroni keep running ('scripts/patroni-cluster.sh stop')."
    echo
    exec "$REPO/target/release/pgway" --config "$CONFIG"
    ;;
servers)
    servers
    echo "  start pgway with: cargo run --release -- --config $CONFIG"
    ;;
start-node)
    [[ -n ${2:-} ]] || die "usage: $0 start-node NAME"
    choose_dir
    node_index "$2" >/dev/null
    start_node "$2"
    ;;
switchover)
    choose_dir
    l=$(leader)
    [[ -n $l ]] || die "no leader in etcd"
    for c in "${NODES[@]}"; do
        [[ $c == "$l" ]] && continue
        say "switchover from $l to $c"
        patronictl -c "$DIR/$l.yml" switchover --leader "$l" --candidate "$c" --force
        break
    done
    ;;
status)
    choose_dir
    if ! pid_alive "$DIR/etcd.pid"; then
        say "etcd: stopped"
        exit 0
    fi
    say "etcd: running (pid $(cat "$DIR/etcd.pid"))"
    say "leader key $NAMESPACE/$SCOPE/leader = '$(leader)'"
    if [[ -f $DIR/node1.yml ]]; then
        patronictl -c "$DIR/node1.yml" list || true
    fi
    ;;
stop)
    choose_dir
    stop_all
    ;;
destroy)
    choose_dir
    stop_all
    say "deleting $DIR"
    rm -rf "$DIR"
    ;;
*)
    echo "usage: $0 [run|servers|status|start-node NAME|switchover|stop|destroy]" >&2
    exit 2
    ;;
esac
