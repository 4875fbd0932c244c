#!/usr/bin/env bash
# A/B of two pgway builds on the same machine, interleaved: pgbench -S with 1 client
# (latency) and with 32 clients (tps) against build A, then build B, round after round, each
# build started fresh on compare.sh's config and port. Prints every run and, per round, B's
# ratio to A; the medians at the end. With 32 clients it also prints each build's user CPU
# time per statement (from /proc/PID/stat), which moves less from run to run than tps does.
# For "did this change move the hot path?", where compare.sh answers "how does pgway stand
# against the others?".
#
#   benches/ab.sh OLD_BINARY NEW_BINARY
#
# Knobs: ROUNDS=4, DURATION=10 (seconds per run). SCRIPT=tpcb runs pgbench's TPC-B-like
# script with 16 clients instead (tps and user CPU per transaction, each build against the
# primary through compare.sh's config, as compare.sh's TPC-B scenario). Run benches/compare.sh once first: it
# leaves the PostgreSQL pair and the configs in .bench/run (or $PGWAY_BENCH_DIR/run).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
ROUNDS=${ROUNDS:-4}
SCRIPT=${SCRIPT:-select-only}
case $SCRIPT in
select-only) PGBENCH_SCRIPT=(-S) CLIENTS=(1 32) ;;
tpcb) PGBENCH_SCRIPT=() CLIENTS=(16) ;;
*) echo "ab: ERROR: SCRIPT must be select-only or tpcb" >&2 && exit 1 ;;
esac
DURATION=${DURATION:-10}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run

die() {
    echo "ab: ERROR: $*" >&2
    exit 1
}
(($# == 2)) || die "usage: benches/ab.sh OLD_BINARY NEW_BINARY"
A=$1
B=$2
[[ -x $A && -x $B ]] || die "both binaries must exist and be executable"
[[ -f $RUN/pgway.toml ]] || die "no config in $RUN: run benches/compare.sh first"

start_bench_pair "$BENCH_DIR"
PORT=$(sed -nE 's/^listen = "[^:]+:([0-9]+)"/\1/p' "$RUN/pgway.toml")
PID=
OUT=$(mktemp -d)
cleanup() {
    [[ -n $PID ]] && kill "$PID" 2>/dev/null
    rm -rf "$OUT"
}
trap cleanup EXIT

start() {
    NO_COLOR=1 "$1" --config "$RUN/pgway.toml" >"$OUT/pgway.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 100); do
        PGPASSWORD=app-secret psql -h 127.0.0.1 -p "$PORT" -U app -d bench -Atqc 'select 1' \
            >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "$1 did not come up; $(tail -3 "$OUT/pgway.log")"
}

stop() {
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
}

# User CPU time of the running pgway so far, in clock ticks (field 14 of /proc/PID/stat).
user_ticks() { awk '{print $14}' "/proc/$PID/stat"; }

# run BINARY CLIENTS: prints the latency (1 client, ms) or the tps and the user CPU time per
# transaction in µs (more clients; a transaction of `-S` is one statement).
run() {
    local before after
    start "$1"
    # A short warm-up fills the pool.
    PGPASSWORD=app-secret pgbench -n "${PGBENCH_SCRIPT[@]}" -c "$2" -j 2 -T 2 -h 127.0.0.1 \
        -p "$PORT" -U app bench >/dev/null 2>&1
    before=$(user_ticks)
    PGPASSWORD=app-secret pgbench -n "${PGBENCH_SCRIPT[@]}" -c "$2" -j $(($2 > 1 ? 2 : 1)) -T "$DURATION" \
        -h 127.0.0.1 -p "$PORT" -U app bench >"$OUT/pgbench.log" 2>&1 ||
        die "pgbench failed: $(tail -3 "$OUT/pgbench.log")"
    after=$(user_ticks)
    stop
    if (($2 == 1)); then
        sed -nE 's/^latency average = ([0-9.]+) ms/\1/p' "$OUT/pgbench.log"
    else
        local tps statements
        tps=$(sed -nE 's/^tps = ([0-9.]+) .*/\1/p' "$OUT/pgbench.log")
        statements=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$OUT/pgbench.log")
        awk -v t="$tps" -v u=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$statements" \
            'BEGIN {printf "%s %.2f\n", t, u / hz * 1e6 / n}'
    fi
}

median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

echo "A = $A"
echo "B = $B"
: >"$OUT/s1" && : >"$OUT/s32" && : >"$OUT/cpu"
for ((round = 1; round <= ROUNDS; round++)); do
    # Alternate which build goes first.
    if ((round % 2)); then first=$A second=$B; else first=$B second=$A; fi
    declare -A got=()
    for sc in "${CLIENTS[@]}"; do
        got[$first.$sc]=$(run "$first" "$sc")
        got[$second.$sc]=$(run "$second" "$sc")
    done
    if [[ $SCRIPT == tpcb ]]; then
        read -r tps_a cpu_a <<<"${got[$A.16]}"
        read -r tps_b cpu_b <<<"${got[$B.16]}"
        r16=$(awk -v a="$tps_a" -v b="$tps_b" 'BEGIN {printf "%.3f", b / a}')
        rcpu=$(awk -v a="$cpu_a" -v b="$cpu_b" 'BEGIN {printf "%.3f", b / a}')
        echo "$r16" >>"$OUT/s32"
        echo "$rcpu" >>"$OUT/cpu"
        printf 'round %d: TPC-B 16 clients A %.0f tps, B %.0f tps (B/A %s), user CPU per transaction A %s µs, B %s µs (B/A %s)\n' \
            "$round" "$tps_a" "$tps_b" "$r16" "$cpu_a" "$cpu_b" "$rcpu"
        unset got
        continue
    fi
    read -r tps_a cpu_a <<<"${got[$A.32]}"
    read -r tps_b cpu_b <<<"${got[$B.32]}"
    r1=$(awk -v a="${got[$A.1]}" -v b="${got[$B.1]}" 'BEGIN {printf "%.3f", b / a}')
    r32=$(awk -v a="$tps_a" -v b="$tps_b" 'BEGIN {printf "%.3f", b / a}')
    rcpu=$(awk -v a="$cpu_a" -v b="$cpu_b" 'BEGIN {printf "%.3f", b / a}')
    echo "$r1" >>"$OUT/s1"
    echo "$r32" >>"$OUT/s32"
    echo "$rcpu" >>"$OUT/cpu"
    printf 'round %d: -S 1 client latency A %s ms, B %s ms (B/A %s); -S 32 clients A %.0f tps, B %.0f tps (B/A %s), user CPU per statement A %s µs, B %s µs (B/A %s)\n' \
        "$round" "${got[$A.1]}" "${got[$B.1]}" "$r1" "$tps_a" "$tps_b" "$r32" "$cpu_a" "$cpu_b" "$rcpu"
    unset got
done
if [[ $SCRIPT == tpcb ]]; then
    echo "median B/A: TPC-B 16 clients tps $(median <"$OUT/s32") (higher is better for B); user CPU per transaction $(median <"$OUT/cpu") (lower is better for B)"
    exit 0
fi
echo "median B/A: -S 1 client latency $(median <"$OUT/s1") (lower is better for B); -S 32 clients tps $(median <"$OUT/s32") (higher is better for B); user CPU per statement $(median <"$OUT/cpu") (lower is better for B)"
