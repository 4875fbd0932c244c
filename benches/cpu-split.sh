#!/usr/bin/env bash
# Where the machine's CPU goes per statement behind pgway and behind pgbouncer: pgbench -S
# with 32 clients against each, interleaved in rounds; prints, per run, tps and, per
# statement, the CPU time (user + system) of the replica's PostgreSQL backends, of pgbench
# and of the gateway, the voluntary context switches of the backends, of pgbench and of the
# gateway's threads (how often they slept), the gateway's involuntary ones (how often it
# was preempted), and the TCP segments sent on the machine. benches/PROFILE.md quotes its
# output (nineteenth and twentieth rounds). Over whole runs: the gateway's column has its
# 32 logins in it (about 4 ms of CPU each for pgbouncer, 0.35 ms for pgway), which
# benches/cpu-per-statement.sh leaves out.
#
#   benches/cpu-split.sh          after a run of benches/compare.sh, which leaves the
#                                 configs in .bench/run (or $PGWAY_BENCH_DIR/run)
# Knobs: ROUNDS=2, DURATION=5 (seconds per run); PGWAY_SETTINGS='workers = 1' (top-level
# lines put in front of compare.sh's pgway.toml, e.g. `busy_poll = "0s"`); PGWAY_BIN (another
# build, default target/pgo/release/pgway, the profile-guided build compare.sh measures);
# PGWAY_OWN_SESSION=0 (pgway in this script's session,
# as before the twentieth round; see start_bench_gateways in scripts/lib.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-5}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run
PGWAY_BIN=${PGWAY_BIN:-$REPO/target/pgo/release/pgway}

[[ -f $RUN/pgway.toml && -f $RUN/pgbouncer/pgbouncer.ini ]] ||
    die "no configs in $RUN: run benches/compare.sh first"
[[ -x $PGWAY_BIN ]] || die "no build at $PGWAY_BIN: scripts/build-pgo.sh (or PGWAY_BIN=target/release/pgway)"
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
command -v nstat >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; }

start_bench_pair "$BENCH_DIR"
REPLICA_POSTMASTER=$(head -n 1 "$BENCH_DIR/replica/postmaster.pid")

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

CONFIG=$RUN/pgway.toml
if [[ -n ${PGWAY_SETTINGS:-} ]]; then
    CONFIG=$RUN/cpu-split-pgway.toml
    { echo "$PGWAY_SETTINGS"; cat "$RUN/pgway.toml"; } >"$CONFIG"
fi
start_bench_gateways "$RUN" "$PGWAY_BIN" "$CONFIG" "$RUN/cpu-split-pgway.log" ||
    die "the gateways did not start"
PIDS+=("${GATEWAY_PID[@]}")
declare -n PID=GATEWAY_PID PORT=GATEWAY_PORT

tick_us=$((1000000 / $(getconf CLK_TCK)))
# CPU ticks (user + system) and voluntary switches, summed over the replica's backends.
backends() {
    local ticks=0 sleeps=0 pid t v
    for pid in $(pgrep -P "$REPLICA_POSTMASTER"); do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null) || continue
        v=$(awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
        ticks=$((ticks + t))
        sleeps=$((sleeps + v))
    done
    echo "$ticks $sleeps"
}
# CPU ticks of the gateway, and voluntary and involuntary switches summed over its threads.
gateway() {
    local ticks sleeps=0 preempted=0 task v n
    ticks=$(awk '{print $14 + $15}' "/proc/$1/stat")
    for task in /proc/"$1"/task/*; do
        read -r v n < <(awk '/^voluntary_ctxt_switches/ {v = $2} /^nonvoluntary_ctxt_switches/ {n = $2}
            END {print v + 0, n + 0}' "$task/status" 2>/dev/null || echo 0 0)
        sleeps=$((sleeps + v))
        preempted=$((preempted + n))
    done
    echo "$ticks $sleeps $preempted"
}

for gw in pgway pgbouncer; do
    PGPASSWORD=app-secret pgbench -n -S -c 32 -j 2 -T 2 -h 127.0.0.1 -p "${PORT[$gw]}" -U app bench \
        >/dev/null 2>&1 || die "warm-up against $gw failed"
done

printf '%-10s %8s %8s %11s %11s %10s %15s %11s %10s %9s\n' gateway tps 'pg µs' 'pgbench µs' \
    'gateway µs' 'pg sleeps' 'pgbench sleeps' 'gw sleeps' 'gw preempt' segments
for ((round = 1; round <= ROUNDS; round++)); do
    for gw in pgway pgbouncer; do
        read -r p0 v0 < <(backends)
        read -r g0 gs0 gp0 < <(gateway "${PID[$gw]}")
        nstat -n >/dev/null
        out=$({ /usr/bin/time -f 'TIME %U %S %w' env PGPASSWORD=app-secret pgbench -n -S -c 32 -j 2 \
            -T "$DURATION" -h 127.0.0.1 -p "${PORT[$gw]}" -U app bench; } 2>&1) ||
            die "pgbench against $gw failed: $out"
        segments=$(nstat TcpOutSegs | awk '/TcpOutSegs/ {print $2}')
        read -r p1 v1 < <(backends)
        read -r g1 gs1 gp1 < <(gateway "${PID[$gw]}")
        n=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' <<<"$out")
        tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' <<<"$out")
        read -r bu bs bw < <(sed -nE 's/^TIME ([0-9.]+) ([0-9.]+) ([0-9]+)$/\1 \2 \3/p' <<<"$out")
        awk -v g="$gw" -v t="$tps" -v n="$n" -v dp=$((p1 - p0)) -v dv=$((v1 - v0)) -v dg=$((g1 - g0)) \
            -v bu="$bu" -v bs="$bs" -v bw="$bw" -v seg="$segments" -v tick="$tick_us" \
            -v gs=$((gs1 - gs0)) -v gp=$((gp1 - gp0)) \
            'BEGIN {printf "%-10s %8.0f %8.1f %11.1f %11.1f %10.2f %15.2f %11.2f %10.2f %9.2f\n",
                g, t, dp*tick/n, (bu+bs)*1e6/n, dg*tick/n, dv/n, bw/n, gs/n, gp/n, seg/n}'
    done
done
