#!/usr/bin/env bash
# User and system CPU time per statement of the relays of examples/relay_floor.rs (no
# parsing, routing or pooling: each client paired with a server connection of its own to
# the replica), under pgbench -S with 32 clients, interleaved in rounds; measured once the
# clients have logged in (steady_pgbench in scripts/lib.sh), as benches/cpu-per-statement.sh
# measures the gateways. Next to benches/instructions-per-statement.sh's GATEWAY=relay-*
# counts it shows what a number of instructions is worth in time here (benches/PROFILE.md,
# thirty-first round).
#
#   benches/relay-cpu.sh          after a run of benches/compare.sh (its PostgreSQL pair is
#                                 started if it is stopped)
# Knobs: RELAYS="exec own" (any of tokio, mio, own, exec), ROUNDS=3, DURATION=5 (seconds
# measured per run), RELAY_PORT=6481 (the first relay's port; the others follow).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
RELAYS=${RELAYS:-exec own}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
RELAY_PORT=${RELAY_PORT:-6481}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run

[[ -f $RUN/pgway.toml ]] || die "no configs in $RUN: run benches/compare.sh first"
REPLICA_PORT=$(sed -nE 's/^nodes = \["[^"]+", "[^:]+:([0-9]+)"\]/\1/p' "$RUN/pgway.toml")
[[ -n $REPLICA_PORT ]] || die "no replica in $RUN/pgway.toml"
(cd "$REPO" && cargo build --release --example relay_floor) || die "cannot build examples/relay_floor.rs"

start_bench_pair "$BENCH_DIR"

clean_up_on_exit # PIDS: the gateways or relays; OUT: one run's pgbench output

declare -A PID=() PORT=()
port=$RELAY_PORT
for relay in $RELAYS; do
    "$REPO/target/release/examples/relay_floor" "$relay" "127.0.0.1:$port" "127.0.0.1:$REPLICA_PORT" \
        >"$RUN/relay-$relay.log" 2>&1 &
    PIDS+=($!)
    PID[$relay]=$!
    PORT[$relay]=$port
    port=$((port + 1))
done
sleep 1
tick_us=$((1000000 / $(getconf CLK_TCK)))

printf '%-6s %10s %14s %16s\n' relay tps 'user µs/stmt' 'system µs/stmt'
for ((round = 1; round <= ROUNDS; round++)); do
    for relay in $RELAYS; do
        figures=$(PGPASSWORD=app-secret steady_pgbench "${PID[$relay]}" 2 $((DURATION + 2)) "$OUT" -n -S \
            -c 32 -j 2 -T $((DURATION + 3)) -h 127.0.0.1 -p "${PORT[$relay]}" -U app bench) ||
            die "pgbench through relay $relay failed: $(tail -n 5 "$OUT")"
        [[ -n $figures ]] || die "pgbench through relay $relay printed too few progress reports"
        read -r n du ds _ <<<"$figures"
        awk -v r="$relay" -v n="$n" -v du="$du" -v ds="$ds" -v tick="$tick_us" -v d="$DURATION" \
            'BEGIN {printf "%-6s %10.0f %14.2f %16.2f\n", r, n/d, du*tick/n, ds*tick/n}'
    done
done
