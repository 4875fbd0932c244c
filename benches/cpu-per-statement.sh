#!/usr/bin/env bash
# CPU per statement of each gateway: pgbench -S with 32 clients (CLIENTS) against HAProxy's
# read port, pgbouncer and pgway, interleaved in rounds; prints, per run, tps, latency, the
# gateway's user and system CPU time per statement (/proc/PID/stat), its involuntary context
# switches per statement (summed over /proc/PID/task/*/status), and the whole machine's busy
# CPU time per statement (/proc/stat: user, nice, system, irq and softirq; gateway,
# PostgreSQL, pgbench and the kernel's network work together), after one short warm-up run
# each. Each run lasts DURATION + 3 seconds; the CPU figures cover DURATION seconds of it,
# from pgbench's second progress report on, when the clients have logged in: a login's cost
# differs between the gateways by an order of magnitude and is not a statement's
# (steady_pgbench in scripts/lib.sh). benches/PROFILE.md quotes its output.
#
#   benches/cpu-per-statement.sh          after a run of benches/compare.sh, which leaves the
#                                         configs in .bench/run (or $PGWAY_BENCH_DIR/run)
# Knobs: ROUNDS=3, DURATION=5 (seconds per run), PGWAY_BIN (default: the profile-guided
# build compare.sh measures, target/pgo/release/pgway; target/release/pgway after PGO=0),
# CLIENTS=32 (CLIENTS=1: one client, one thread; the latency column then says more than
# tps), CONFIG=pgway.toml (another of the configs in the run directory for pgway, e.g.
# pgway-nopoll.toml: compare.sh's with busy_poll = "0s"), LOGINS=200 (then the CPU time
# each gateway spends per login, user and system: pgbench -C, a SCRAM login per
# transaction, 4 clients; LOGINS=0 skips it), PROTOCOL=simple (extended or prepared: pgbench
# -M PROTOCOL; with prepared, pgbouncer is left out: it runs only the first two in
# transaction mode).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
CLIENTS=${CLIENTS:-32}
CONFIG=${CONFIG:-pgway.toml}
PROTOCOL=${PROTOCOL:-simple}
case $PROTOCOL in
simple | extended) GATEWAYS=(pgway pgbouncer haproxy) ;;
# pgbouncer 1.18 keeps no prepared statements in transaction mode (as compare.sh's prep32).
prepared) GATEWAYS=(pgway haproxy) ;;
*) die "PROTOCOL must be simple, extended or prepared" ;;
esac
LOGINS=${LOGINS:-200}
THREADS=$((CLIENTS > 1 ? 2 : 1))
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run
# compare.sh measures the profile-guided build (target/pgo/release/pgway) unless PGO=0.
PGWAY_BIN=${PGWAY_BIN:-$REPO/target/pgo/release/pgway}

[[ -f $RUN/$CONFIG && -f $RUN/haproxy.cfg && -f $RUN/pgbouncer/pgbouncer.ini ]] ||
    die "no configs in $RUN: run benches/compare.sh first"
[[ -x $PGWAY_BIN ]] || die "no build at $PGWAY_BIN: scripts/build-pgo.sh (or PGWAY_BIN=target/release/pgway)"

start_bench_pair "$BENCH_DIR"

clean_up_on_exit # PIDS: the gateways or relays; OUT: one run's pgbench output

start_bench_gateways "$RUN" "$PGWAY_BIN" "$RUN/$CONFIG" "$RUN/cpu-pgway.log" ||
    die "the gateways did not start"
PIDS+=("${GATEWAY_PID[@]}")
declare -n PID=GATEWAY_PID PORT=GATEWAY_PORT

tick_us=$((1000000 / $(getconf CLK_TCK)))

# One short unreported run each first: the pools fill and the caches warm up.
for gw in "${GATEWAYS[@]}"; do
    PGPASSWORD=app-secret pgbench -n -S -M "$PROTOCOL" -c "$CLIENTS" -j "$THREADS" -T 2 -h 127.0.0.1 -p "${PORT[$gw]}" -U app bench \
        >/dev/null 2>&1 || die "warm-up against $gw failed"
done

printf '%-10s %10s %12s %14s %16s %18s %17s\n' gateway tps 'latency ms' 'user µs/stmt' 'system µs/stmt' \
    'invol. sw./stmt' 'machine µs/stmt'
for ((round = 1; round <= ROUNDS; round++)); do
    for gw in "${GATEWAYS[@]}"; do
        # CPU over DURATION seconds once the clients have logged in (steady_pgbench:
        # scripts/lib.sh); tps and latency over the whole run, as pgbench reports them.
        figures=$(PGPASSWORD=app-secret steady_pgbench "${PID[$gw]}" 2 $((DURATION + 2)) "$OUT" -n -S -M "$PROTOCOL" \
            -c "$CLIENTS" -j "$THREADS" -T $((DURATION + 3)) -h 127.0.0.1 -p "${PORT[$gw]}" -U app bench) ||
            die "pgbench against $gw failed: $(tail -n 5 "$OUT")"
        [[ -n $figures ]] || die "pgbench against $gw printed too few progress reports: $(tail -n 5 "$OUT")"
        read -r n du ds dm dc <<<"$figures"
        tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' "$OUT")
        lat=$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' "$OUT")
        awk -v g="$gw" -v t="$tps" -v l="$lat" -v n="$n" -v du="$du" -v ds="$ds" -v dc="$dc" -v dm="$dm" \
            -v tick="$tick_us" \
            'BEGIN {printf "%-10s %10.0f %12.3f %14.1f %16.1f %18.2f %17.1f\n", g, t, l, du*tick/n, ds*tick/n, dc/n, dm*tick/n}'
    done
done

((LOGINS > 0)) || exit 0
echo
printf '%-10s %8s %15s %17s\n' gateway logins 'user ms/login' 'system ms/login'
for gw in "${GATEWAYS[@]}"; do
    pid=${PID[$gw]}
    read -r u0 s0 < <(cpu_ticks "$pid")
    PGPASSWORD=app-secret PGCONNECT_TIMEOUT=10 timeout --kill-after=10 600 pgbench -n -S -C -c 4 -j 1 \
        -t $(((LOGINS + 3) / 4)) -h 127.0.0.1 -p "${PORT[$gw]}" -U app bench >"$OUT" 2>&1 ||
        die "pgbench -C against $gw failed: $(tail -n 5 "$OUT")"
    read -r u1 s1 < <(cpu_ticks "$pid")
    awk -v g="$gw" -v n=$((4 * ((LOGINS + 3) / 4))) -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v tick="$tick_us" \
        'BEGIN {printf "%-10s %8d %15.2f %17.2f\n", g, n, du*tick/n/1000, ds*tick/n/1000}'
done
