#!/usr/bin/env bash
# What a gateway that does nothing reaches on this machine: one pgbench scenario through
# `relay_floor mio` (examples/relay_floor.rs: one thread, a hand-written mio loop, each
# client paired with a server connection of its own, nothing parsed, routed or pooled),
# next to HAProxy, pgbouncer (for the `-S` scenarios), pgway (for TPC-B also with
# read-your-writes off) and direct PostgreSQL, interleaved in rounds. Prints, per round,
# each target's tps, its ratio to the relay's, and the TCP segments the machine sent per
# transaction (nstat). A target of issue 16 that the relay itself misses is out of reach of any
# gateway's own code here (benches/PROFILE.md, twentieth round).
#
#   benches/floor.sh              after a run of benches/compare.sh, which leaves the
#                                 configs in .bench/run (or $PGWAY_BENCH_DIR/run)
# Knobs: SCENARIO=s32 (s32: -S 32 clients; prep32: -S -M prepared 32 clients; tpcb: TPC-B
# 16 clients, against the primary; tpcb-ext: the same with -M extended), ROUNDS=3,
# DURATION=5 (seconds per run), RELAY_PORT=6475, PGWAY_BIN (default
# target/pgo/release/pgway, the profile-guided build compare.sh measures).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
SCENARIO=${SCENARIO:-s32}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
RELAY_PORT=${RELAY_PORT:-6475}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run
PGWAY_BIN=${PGWAY_BIN:-$REPO/target/pgo/release/pgway}
RELAY_BIN=$REPO/target/release/examples/relay_floor

[[ -f $RUN/pgway.toml && -f $RUN/haproxy.cfg && -f $RUN/pgbouncer/pgbouncer.ini ]] ||
    die "no configs in $RUN: run benches/compare.sh first"
[[ -x $PGWAY_BIN ]] || die "no build at $PGWAY_BIN: scripts/build-pgo.sh (or PGWAY_BIN=target/release/pgway)"
command -v nstat >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; }
(cd "$REPO" && cargo build --release --quiet --example relay_floor) || die "cannot build relay_floor"

case $SCENARIO in
s32) opts="-S -c 32 -j 2" listener=postgres_read targets="relay haproxy pgbouncer pgway direct" ;;
prep32) opts="-S -M prepared -c 32 -j 2" listener=postgres_read targets="relay haproxy pgway direct" ;;
tpcb) opts="-c 16 -j 2" listener=postgres_write targets="relay haproxy pgway pgway-rywoff direct" ;;
tpcb-ext) opts="-M extended -c 16 -j 2" listener=postgres_write targets="relay haproxy pgway pgway-rywoff direct" ;;
*) die "SCENARIO must be s32, prep32, tpcb or tpcb-ext" ;;
esac
# The node behind the scenario's HAProxy port, and that port.
node=$(awk -v l="$listener" '$1 == "listen" {in_l = ($2 == l)} in_l && $1 == "server" {print $3; exit}' \
    "$RUN/haproxy.cfg")
haproxy_port=$(awk -v l="$listener" '$1 == "listen" {in_l = ($2 == l)} in_l && $1 == "bind" {split($2, a, ":"); print a[2]; exit}' \
    "$RUN/haproxy.cfg")
[[ -n $node && -n $haproxy_port ]] || die "cannot read $listener from $RUN/haproxy.cfg"

start_bench_pair "$BENCH_DIR"

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# Each gateway in a session of its own, the relay too.
setsid "$RELAY_BIN" mio "127.0.0.1:$RELAY_PORT" "$node" >"$RUN/floor-relay.log" 2>&1 &
PIDS+=("$!")
start_bench_gateways "$RUN" "$PGWAY_BIN" "$RUN/pgway.toml" "$RUN/floor-pgway.log" ||
    die "the gateways did not start"
PIDS+=("${GATEWAY_PID[@]}")
if [[ $targets == *pgway-rywoff* ]]; then
    NO_COLOR=1 setsid "$PGWAY_BIN" --config "$RUN/pgway-rywoff.toml" >"$RUN/floor-pgway-rywoff.log" 2>&1 &
    PIDS+=("$!")
    sleep 2
fi
declare -A PORT=(
    [relay]=$RELAY_PORT
    [haproxy]=$haproxy_port
    [pgbouncer]=${GATEWAY_PORT[pgbouncer]}
    [pgway]=${GATEWAY_PORT[pgway]}
    [pgway-rywoff]=$(sed -nE 's/^listen = "[^:]+:([0-9]+)"/\1/p' "$RUN/pgway-rywoff.toml")
    [direct]=${node##*:}
)

run() { # target, seconds -> tps and TCP segments per transaction
    local out n segments
    nstat -n >/dev/null
    # shellcheck disable=SC2086 # $opts is a list of options
    out=$(PGPASSWORD=app-secret pgbench -n $opts -T "$2" -h 127.0.0.1 -p "${PORT[$1]}" -U app bench 2>&1) ||
        die "pgbench against $1 failed: $out"
    segments=$(nstat TcpOutSegs | awk '/TcpOutSegs/ {print $2}')
    n=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' <<<"$out")
    awk -v tps="$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' <<<"$out")" -v s="$segments" -v n="$n" \
        'BEGIN {printf "%s %.2f\n", tps, s / n}'
}

for target in $targets; do run "$target" 2 >/dev/null; done
echo "floor: pgbench -n $opts -T $DURATION, $ROUNDS round(s); the relay forwards to $node"
read -r -a order <<<"$targets"
for ((round = 1; round <= ROUNDS; round++)); do
    declare -A TPS=() SEGS=()
    # The order rotates from round to round, as in compare.sh.
    for ((i = 0; i < ${#order[@]}; i++)); do
        target=${order[(i + round - 1) % ${#order[@]}]}
        read -r "TPS[$target]" "SEGS[$target]" < <(run "$target" "$DURATION")
    done
    line="round $round:"
    for target in $targets; do
        line+=$(awk -v t="$target" -v v="${TPS[$target]}" -v r="${TPS[relay]}" -v s="${SEGS[$target]}" \
            'BEGIN {printf "  %s %.0f (%.2fx relay, %.2f seg)", t, v, v / r, s}')
    done
    echo "$line"
done
