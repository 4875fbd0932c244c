#!/usr/bin/env bash
# System calls per statement of pgway and of pgbouncer under `pgbench -S` with 32 clients,
# one gateway after the other: `strace -c -f` attached to the running gateway for
# STRACE_SECONDS in the middle of a DURATION-second run. Statements are counted as half
# the gateway's `sendto` calls (each statement is one send to the server and one to the
# client). Prints per statement: `epoll_wait` (how often a loop went to wait for events),
# `write` (for pgway: eventfd writes, one worker waking another), `epoll_ctl` (for
# pgway: server connections moved between workers), `sendto`, `recvfrom`. For pgway it
# also prints the share of connection acquisitions that waited (`pgway_pool_wait_seconds`).
# strace slows every gateway down, so tps here is not comparable with other benchmarks;
# the per-statement counts are what to read, and they vary by up to 2x from run to run
# (use ROUNDS).
#
#   PGWAY_BENCH_DIR=/tmp/pgway-bench benches/syscalls-per-statement.sh
#
# Knobs: PGWAY_BIN (default: the profile-guided build), CONFIG=FILE (one of compare.sh's
# configs in its run directory, default pgway.toml; e.g. a copy with `workers = 1`),
# ROUNDS=1, DURATION=8, STRACE_SECONDS=4 (0: no strace, only pgway's share of waits, as
# it is without strace slowing pgway). Run benches/compare.sh once first.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
ROUNDS=${ROUNDS:-1}
DURATION=${DURATION:-8}
STRACE_SECONDS=${STRACE_SECONDS:-4}
CONFIG=${CONFIG:-pgway.toml}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run
PGWAY_BIN=${PGWAY_BIN:-$REPO/target/pgo/release/pgway}

[[ -f $RUN/$CONFIG && -f $RUN/pgbouncer/pgbouncer.ini ]] ||
    die "no configs in $RUN: run benches/compare.sh first"
[[ -x $PGWAY_BIN ]] || die "no build at $PGWAY_BIN: scripts/build-pgo.sh (or PGWAY_BIN=target/release/pgway)"
command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }

start_bench_pair "$BENCH_DIR"
OUT=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$OUT"
}
trap cleanup EXIT

NO_COLOR=1 "$PGWAY_BIN" --config "$RUN/$CONFIG" >"$OUT/pgway.log" 2>&1 &
PIDS+=($!)
pgway_pid=$!
rm -f "$RUN/pgbouncer/pgbouncer.pid"
as_pg /usr/sbin/pgbouncer -d -q "$RUN/pgbouncer/pgbouncer.ini" || die "pgbouncer did not start"
sleep 2
[[ -s $RUN/pgbouncer/pgbouncer.pid ]] || die "no pidfile from pgbouncer"
PIDS+=("$(cat "$RUN/pgbouncer/pgbouncer.pid")")
declare -A PID=([pgway]=$pgway_pid [pgbouncer]=$(cat "$RUN/pgbouncer/pgbouncer.pid"))
declare -A PORT=(
    [pgway]=$(sed -nE 's/^listen = "[^:]+:([0-9]+)"/\1/p' "$RUN/$CONFIG")
    [pgbouncer]=$(sed -nE 's/^listen_port = ([0-9]+)/\1/p' "$RUN/pgbouncer/pgbouncer.ini")
)
ADMIN=$(sed -nE 's/^admin_listen = "([^"]+)"/\1/p' "$RUN/$CONFIG")

# The pool-wait histogram's total and its first bucket (no wait).
waits() {
    curl -s "http://$ADMIN/metrics" | awk '
        /^pgway_pool_wait_seconds_count/ {n = $2}
        /^pgway_pool_wait_seconds_bucket\{le="0.0"\}/ {z = $2}
        END {print n + 0, z + 0}'
}

printf '%-10s %6s %11s %9s %10s %8s %9s %10s\n' gateway round epoll_wait write epoll_ctl sendto recvfrom 'waited'
for round in $(seq 1 "$ROUNDS"); do
    for gw in pgway pgbouncer; do
        [[ $gw == pgway && -n $ADMIN ]] && read -r n0 z0 < <(waits)
        PGPASSWORD=app-secret pgbench -n -S -c 32 -j 2 -T "$DURATION" -h 127.0.0.1 -p "${PORT[$gw]}" \
            -U app bench >"$OUT/pgbench.log" 2>&1 &
        bench=$!
        sleep 2
        : >"$OUT/strace.txt"
        if ((STRACE_SECONDS > 0)); then
            timeout "$STRACE_SECONDS" strace -c -f -p "${PID[$gw]}" -o "$OUT/strace.txt" 2>/dev/null || true
        fi
        wait "$bench" || die "pgbench against $gw failed: $(tail -3 "$OUT/pgbench.log")"
        waited=-
        if [[ $gw == pgway && -n $ADMIN ]]; then
            read -r n1 z1 < <(waits)
            waited=$(awk -v n=$((n1 - n0)) -v z=$((z1 - z0)) 'BEGIN {if (n > 0) printf "%.0f%%", 100 * (n - z) / n}')
        fi
        awk -v gw="$gw" -v round="$round" -v waited="$waited" '
            $NF ~ /^(epoll_wait|write|epoll_ctl|sendto|recvfrom)$/ {c[$NF] = $4}
            END {
                s = c["sendto"] / 2
                if (s == 0) {printf "%-10s %6d %11s %9s %10s %8s %9s %10s\n", gw, round, "-", "-", "-", "-", "-", waited; exit}
                printf "%-10s %6d %11.3f %9.3f %10.3f %8.2f %9.2f %10s\n", gw, round,
                    c["epoll_wait"] / s, c["write"] / s, c["epoll_ctl"] / s, c["sendto"] / s, c["recvfrom"] / s, waited
            }' "$OUT/strace.txt"
    done
done
