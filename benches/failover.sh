#!/usr/bin/env bash
# Failover benchmark: pgway vs HAProxy (configured as Patroni's documentation recommends) in
# front of the same two-node Patroni cluster, during the same `kill -9` of the leader.
#
#   benches/failover.sh [--rounds N] [--writers N] [--readers N] [--sync]
#
# One command: installs what is missing (scripts/install-deps.sh), builds pgway (release),
# starts etcd and two Patroni nodes (scripts/patroni-cluster.sh with ports of its own: etcd
# 127.0.0.1:7379, PostgreSQL 7451/7452, Patroni REST 7008/7009, scope "bench"), HAProxy
# (writes 127.0.0.1:7000 -> the member whose GET /primary is 200, reads 127.0.0.1:7001 -> /replica;
# `inter 3s fall 3 rise 2 on-marked-down shutdown-sessions`) and pgway (127.0.0.1:7432,
# topology.kind = "patroni"). Then, each round (default 3): writers (autocommit insert ...
# returning id) and readers run through pgway and through HAProxy at once; the leader's Patroni
# and PostgreSQL are killed with SIGKILL; an `etcdctl watch` timestamps the new leader key;
# afterwards the killed member is restarted and rejoins as a replica. Reported per target:
# write outage, delay after the new leader key, failed statements, acknowledged rows lost
# (and failed reads). Patroni: ttl 10, loop_wait 2, asynchronous replication (--sync: Patroni's
# synchronous_mode, under which no acknowledged commit may be lost).
#
# Writes benches/FAILOVER.md (tables, core count, date, the exact command) and
# benches/failover/results.json; everything it started is stopped and removed at the end.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMAND="benches/failover.sh${*:+ $*}"
ROUNDS=3
WRITERS=4
READERS=2
SYNC=0
while (($#)); do
    case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --writers) WRITERS=$2; shift 2 ;;
    --readers) READERS=$2; shift 2 ;;
    --sync) SYNC=1; shift ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--rounds N] [--writers N] [--readers N] [--sync]" >&2; exit 2 ;;
    esac
done

export PGWAY_ETCD_PORT=7379 PGWAY_ETCD_PEER_PORT=7380
export PGWAY_PATRONI_PG_PORTS="7451 7452" PGWAY_PATRONI_API_PORTS="7008 7009"
export PGWAY_PATRONI_SCOPE=bench PGWAY_PATRONI_SYNC=$SYNC
REPLICATION="asynchronous replication"
((SYNC)) && REPLICATION="synchronous replication (Patroni's synchronous_mode)"
export PGWAY_LISTEN=127.0.0.1:7432 PGWAY_ADMIN_LISTEN=127.0.0.1:7930
HAPROXY_WRITE=7000
HAPROXY_READ=7001
say() { echo "failover-bench: $*"; }

bash "$REPO/scripts/install-deps.sh"
for port in 7379 7380 7451 7452 7008 7009 7432 7930 $HAPROXY_WRITE $HAPROXY_READ; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        say "port $port is in use; stop what listens there first" >&2
        exit 1
    fi
done

say "building pgway (cargo build --release)"
(cd "$REPO" && cargo build --release --quiet)

WORK=$(mktemp -d /tmp/pgway-failover-bench.XXXXXX)
chmod 755 "$WORK"
export PGWAY_PATRONI_DIR=$WORK/cluster
CLUSTER="$REPO/scripts/patroni-cluster.sh"
LOGS=$WORK.logs
PIDS=()
cleanup() {
    local status=$?
    local pid
    mkdir -p "$LOGS"
    cp "$WORK"/*.log "$PGWAY_PATRONI_DIR"/*.log "$LOGS/" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    bash "$CLUSTER" destroy >/dev/null 2>&1 || true
    # destroy removed the cluster dir; the logs were copied out before.
    if ((status != 0)); then
        say "failed; logs in $LOGS"
    else
        say "logs (pgway, HAProxy, Patroni, etcd) in $LOGS"
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

say "starting etcd and two Patroni nodes"
bash "$CLUSTER" servers

cat >"$WORK/haproxy.cfg" <<EOF
# Patroni's recommended HAProxy setup: writes to the member whose REST API answers /primary
# with 200, reads to the members answering /replica with 200.
global
    maxconn 1000

defaults
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen primary
    bind 127.0.0.1:$HAPROXY_WRITE
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
    server node1 127.0.0.1:7451 maxconn 100 check port 7008
    server node2 127.0.0.1:7452 maxconn 100 check port 7009

listen replicas
    bind 127.0.0.1:$HAPROXY_READ
    balance roundrobin
    option httpchk OPTIONS /replica
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
    server node1 127.0.0.1:7451 maxconn 100 check port 7008
    server node2 127.0.0.1:7452 maxconn 100 check port 7009
EOF
haproxy -c -q -f "$WORK/haproxy.cfg"
say "starting HAProxy (writes 127.0.0.1:$HAPROXY_WRITE, reads 127.0.0.1:$HAPROXY_READ)"
setsid haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 </dev/null &
PIDS+=($!)
say "starting pgway on $PGWAY_LISTEN"
RUST_LOG=${RUST_LOG:-info} setsid "$REPO/target/release/pgway" --config "$PGWAY_PATRONI_DIR/pgway.toml" \
    >"$WORK/pgway.log" 2>&1 </dev/null &
PIDS+=($!)

DSN_PGWAY="postgres://app:app-secret@$PGWAY_LISTEN/app?sslmode=disable"
DSN_WRITE="postgres://app:app-secret@127.0.0.1:$HAPROXY_WRITE/app?sslmode=disable"
DSN_READ="postgres://app:app-secret@127.0.0.1:$HAPROXY_READ/app?sslmode=disable"
PSQL=(psql -X -q -A -t -v ON_ERROR_STOP=1)
ready() { "${PSQL[@]}" "$1" -c 'select 1' >/dev/null 2>&1; }
for dsn in "$DSN_PGWAY" "$DSN_WRITE" "$DSN_READ"; do
    for ((i = 0; i < 120; i++)); do
        ready "$dsn" && break
        sleep 0.5
    done
    ready "$dsn" || { say "nothing answers at $dsn" >&2; exit 1; }
done

say "running $ROUNDS round(s): $WRITERS writers and $READERS readers per target"
python3=/usr/bin/python3
"$python3" "$REPO/benches/failover/driver.py" \
    --pgway "$DSN_PGWAY" --haproxy-write "$DSN_WRITE" --haproxy-read "$DSN_READ" \
    --etcd "127.0.0.1:$PGWAY_ETCD_PORT" --scope "$PGWAY_PATRONI_SCOPE" \
    --dir "$PGWAY_PATRONI_DIR" --cluster-script "$CLUSTER" \
    --member node1=7451=7008 --member node2=7452=7009 \
    --rounds "$ROUNDS" --writers "$WRITERS" --readers "$READERS" $( ((SYNC)) && echo --sync) \
    --json "$REPO/benches/failover/results.json" --markdown "$WORK/tables.md"

{
    echo "# Failover: pgway vs HAProxy after \`kill -9\` of the Patroni leader"
    echo
    echo "Generated by \`$COMMAND\` on $(date -u '+%Y-%m-%d %H:%M UTC'), on a machine with $(nproc) cores"
    echo "(everything on loopback: etcd, two Patroni nodes, HAProxy, pgway and the load)."
    echo
    echo "- Patroni $(patroni --version 2>/dev/null | awk '{print $2}') with etcd $(etcd --version | awk '/etcd Version/ {print $3}') (v3 API), \`ttl: 10\`, \`loop_wait: 2\`, \`retry_timeout: 5\`,"
    echo "  $REPLICATION, PostgreSQL $("${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}/postgres" --version | awk '{print $3}')."
    echo "- HAProxy $(haproxy -v | awk 'NR==1 {print $3}') as Patroni's documentation recommends: \`option httpchk OPTIONS /primary\` (reads:"
    echo "  \`/replica\`), \`http-check expect status 200\`, \`default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\`."
    echo "- pgway (release build) with \`topology.kind = \"patroni\"\`, \`health_interval = \"1s\"\`, \`failover_timeout = \"30s\"\`."
    echo "- Per target, $WRITERS autocommit writers (\`insert ... returning id\`, one every 20 ms each) and"
    echo "  $READERS readers (\`select inet_server_port()\`), psycopg2; a failed statement or connect is retried after 50 ms."
    echo "  Each round kills the leader's Patroni and PostgreSQL with SIGKILL while both loads run,"
    echo "  keeps both loads running for 12 s after both have written to the new primary again,"
    echo "  then restarts the killed member, which rejoins as a replica. Times are taken on one clock"
    echo "  in the load's process when a reply has been read (a few ms of scheduling noise); the new"
    echo "  leader key's moment comes from an \`etcdctl watch\` on it. Writes count as resumed at the"
    echo "  first one acknowledged by the new leader (\`returning inet_server_port()\`). The new leader's"
    echo "  promotion is timestamped by polling \`pg_is_in_recovery()\` on it directly every 5 ms."
    echo
    cat "$WORK/tables.md"
    echo
    echo "Raw numbers: \`benches/failover/results.json\`."
} >"$REPO/benches/FAILOVER.md"
say "wrote benches/FAILOVER.md"
cat "$WORK/tables.md"
