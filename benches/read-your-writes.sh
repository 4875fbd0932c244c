#!/usr/bin/env bash
# Read-your-writes under load: for each scope of routing.read_your_writes (off, session,
# user, global), a pgway with that scope in front of compare.sh's primary and replica, and
# pgbench at 16 clients:
#   write-read  every transaction inserts a row and then reads it back (autocommit, two
#               statements); a read that does not find its row is stale and is logged in a
#               table on the primary
#   mixed       8 clients run write-read, 8 only read (the same user)
#   select-only pgbench -S, to compare the cost of the feature with "off"
# and reports throughput, the share of reads a replica served (pgway's /topology counters)
# and the stale reads, in benches/READ_YOUR_WRITES.md.
#
#   benches/read-your-writes.sh [PGWAY_BINARY]
#
# Run it after benches/compare.sh (which calls it at the end unless RYW_BENCH=0): it uses
# compare.sh's PostgreSQL pair and pgway config (.bench/run). Knobs: DURATION (default 10
# seconds per run), CLIENTS (default 16).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run
BIN=${1:-$REPO/target/release/pgway}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
PORT=6470
ADMIN_PORT=9970
PRIMARY_PORT=5461
REPLICA_PORT=5462
OUT_MD=$REPO/benches/READ_YOUR_WRITES.md

say() { echo "read-your-writes: $*"; }
[[ -f $RUN/pgway.toml ]] || die "no config in $RUN: run benches/compare.sh first"
[[ -x $BIN ]] || die "no pgway binary at $BIN: cargo build --release"
((CLIENTS >= 2 && CLIENTS % 2 == 0)) || die "CLIENTS must be even and at least 2"

start_bench_pair "$BENCH_DIR"
WORK=$(mktemp -d)
PGWAY_PID=
cleanup() {
    [[ -n $PGWAY_PID ]] && kill "$PGWAY_PID" 2>/dev/null && wait "$PGWAY_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

psql_app() { # port, then psql arguments
    PGPASSWORD=app-secret "$PG_BIN/psql" -X -Atq -h 127.0.0.1 -p "$1" -U app -d bench "${@:2}"
}

psql_app "$PRIMARY_PORT" -c "create table if not exists ryw_rows (id bigint, client int);
    create index if not exists ryw_rows_id on ryw_rows (id);
    create table if not exists ryw_stale (id bigint, port int, scope text);
    truncate ryw_rows, ryw_stale;"

cat >"$WORK/write-read.sql" <<'EOF'
\set id random(1, 4000000000)
insert into ryw_rows (id, client) values (:id, :client_id);
select count(*) as n, inet_server_port() as port from ryw_rows where id = :id \gset
\if :n = 0
insert into ryw_stale (id, port, scope) values (:id, :port, current_setting('application_name'));
\endif
EOF
cat >"$WORK/read.sql" <<'EOF'
\set id random(1, 4000000000)
select count(*) from ryw_rows where id = :id;
EOF

start_pgway() { # scope
    sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$PORT\"/" \
        -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$ADMIN_PORT\"/" \
        -e '/^\[routing\]/,$d' "$RUN/pgway.toml" >"$WORK/pgway.toml"
    printf '\n[routing]\nread_your_writes = "%s"\n' "$1" >>"$WORK/pgway.toml"
    NO_COLOR=1 setsid "$BIN" --config "$WORK/pgway.toml" >"$WORK/pgway-$1.log" 2>&1 9>&- &
    PGWAY_PID=$!
    for _ in $(seq 1 60); do
        [[ $(psql_app "$PORT" -c 'select pg_is_in_recovery()' 2>/dev/null) == t ]] && return 0
        sleep 0.5
    done
    die "pgway ($1) did not route a read to the replica: $(tail -5 "$WORK/pgway-$1.log")"
}

stop_pgway() {
    kill "$PGWAY_PID" && wait "$PGWAY_PID" 2>/dev/null || true
    PGWAY_PID=
}

# The counters of reads under a floor: "replica replica_after_wait primary".
outcomes() {
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/topology" |
        "${PYTHON:-python3}" -c 'import json, sys
o = json.load(sys.stdin)["read_your_writes"]
print(o["replica"], o["replica_after_wait"], o["primary"])'
}

pgbench_run() { # name, scope, clients, script options...
    local name=$1 scope=$2 clients=$3
    PGPASSWORD=app-secret PGAPPNAME=$scope "$PG_BIN/pgbench" -n -T "$DURATION" -c "$clients" \
        -j 2 -h 127.0.0.1 -p "$PORT" -U app "${@:4}" bench >"$WORK/$name-$scope.log" 2>&1 ||
        die "pgbench $name ($scope) failed: $(tail -3 "$WORK/$name-$scope.log")"
}

tps() { sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' "$1"; }
txns() { sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$1"; }
stale() { psql_app "$PRIMARY_PORT" -c "select count(*) from ryw_stale where scope = '$1'"; }

# share of reads a replica served: reads minus those pgway sent to the primary for lack of
# a caught-up replica (reads under no floor go to the replica).
share() { # reads, primary reads
    awk -v r="$1" -v p="$2" 'BEGIN { if (r == 0) print "-"; else printf "%.1f%%", 100 * (r - p) / r }'
}

percent() { # part, whole
    awk -v p="$1" -v w="$2" 'BEGIN { if (w == 0) print "-"; else printf "%.1f%%", 100 * p / w }'
}

half=$((CLIENTS / 2))
ROWS=()
WARM=yes
for scope in off session user global; do
    say "scope $scope"
    start_pgway "$scope"
    if [[ $WARM == yes ]]; then
        # The first run warms the servers' caches; it is not reported.
        pgbench_run warm-up "$scope" "$CLIENTS" -S
        WARM=no
    fi
    pgbench_run select-only "$scope" "$CLIENTS" -S
    s_tps=$(tps "$WORK/select-only-$scope.log")

    read -r _ w0 p0 <<<"$(outcomes)"
    pgbench_run write-read "$scope" "$CLIENTS" -f "$WORK/write-read.sql"
    read -r _ w1 p1 <<<"$(outcomes)"
    wr_tps=$(tps "$WORK/write-read-$scope.log")
    wr_reads=$(txns "$WORK/write-read-$scope.log")
    wr_stale=$(stale "$scope")

    pgbench_run mixed-writers "$scope" "$half" -f "$WORK/write-read.sql" &
    writers=$!
    pgbench_run mixed-readers "$scope" "$half" -f "$WORK/read.sql"
    wait "$writers"
    read -r _ w2 p2 <<<"$(outcomes)"
    m_tps=$(awk -v a="$(tps "$WORK/mixed-writers-$scope.log")" -v b="$(tps "$WORK/mixed-readers-$scope.log")" \
        'BEGIN {printf "%.0f", a + b}')
    m_reads=$(($(txns "$WORK/mixed-writers-$scope.log") + $(txns "$WORK/mixed-readers-$scope.log")))
    m_stale=$(($(stale "$scope") - wr_stale))
    stop_pgway

    ROWS+=("| \`$scope\` | $(printf '%.0f' "$wr_tps") | $(share "$wr_reads" $((p1 - p0))) | $(percent $((w1 - w0)) "$wr_reads") | $wr_stale | $m_tps | $(share "$m_reads" $((p2 - p1))) | $(percent $((w2 - w1)) "$m_reads") | $m_stale | $(printf '%.0f' "$s_tps") |")
done

{
    echo "# Read-your-writes under load"
    echo
    echo "Made by \`benches/read-your-writes.sh\` ($(date -u +%Y-%m-%d), $(nproc) cores, ${DURATION} s per run, $CLIENTS clients, pgway $(git -C "$REPO" rev-parse --short HEAD))."
    echo "One pgway per scope in front of compare.sh's primary and streaming replica (asynchronous"
    echo "replication, default \`read_your_writes_wait\` of 20 ms)."
    echo
    echo "- **write-read**: each transaction inserts a row and reads it back (autocommit, two statements)."
    echo "- **mixed**: half the clients run write-read, half only read (same user)."
    echo "- **replica share**: reads a replica served; the rest went to the primary because no replica had replayed the floor in time."
    echo "- **waited**: reads that waited for a replica to replay their floor (then served by it)."
    echo "- **stale**: reads that did not find the row their client had just written (the target is 0 for every scope but \`off\`)."
    echo "- **-S**: \`pgbench -S\` throughput with the scope on (no client writes, so no read waits)."
    echo
    echo "| scope | write-read tps | replica share | waited | stale | mixed tps | replica share | waited | stale | -S tps |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    printf '%s\n' "${ROWS[@]}"
} >"$OUT_MD"
say "wrote $OUT_MD"
cat "$OUT_MD"
