#!/usr/bin/env bash
# A/B of two pgway builds on the same machine, interleaved: pgbench -S with 1 client
# (latency) and with 32 clients (tps) against build A, then build B, round after round, each
# build started fresh on compare.sh's config and port. Prints every run and, per round, B's
# ratio to A; the medians at the end. With 32 clients it also prints each build's user CPU
# time per statement (from /proc/PID/stat), which moves less from run to run than tps does,
# and the whole machine's CPU time per statement (from /proc/stat: every process, user and
# system, PostgreSQL's and pgbench's too), which shows what a change saves the servers.
# For "did this change move the hot path?", where compare.sh answers "how does pgway stand
# against the others?".
#
#   benches/ab.sh OLD_BINARY NEW_BINARY
#
# Knobs: ROUNDS=4, DURATION=10 (seconds per run). SCRIPT=tpcb runs pgbench's TPC-B-like
# script with 16 clients instead (tps and user CPU per transaction, each build against the
# primary through compare.sh's config, as compare.sh's TPC-B scenario). SCRIPT=autocommit
# does the same with benches/scripts/autocommit-update.sql: one UPDATE a transaction, with no
# BEGIN (each commits at its own Sync, so read-your-writes asks the WAL position after it in
# an answer of its own). CONFIG=FILE runs both
# builds with another of compare.sh's configs (CONFIG=pgway-rywoff.toml: read-your-writes
# off); CONFIG_B=FILE runs build B with another config than A (the same binary twice, with
# CONFIG_B=pgway-rywoff.toml, measures what read-your-writes costs). PROTOCOL=extended (or
# prepared) runs pgbench with -M PROTOCOL instead of the simple protocol. Run benches/compare.sh
# once first: it leaves the PostgreSQL pair and the configs in .bench/run (or
# $PGWAY_BENCH_DIR/run).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
ROUNDS=${ROUNDS:-4}
SCRIPT=${SCRIPT:-select-only}
case $SCRIPT in
select-only) PGBENCH_SCRIPT=(-S) CLIENTS=(1 32) ;;
tpcb) PGBENCH_SCRIPT=() CLIENTS=(16) LABEL=TPC-B ;;
autocommit) PGBENCH_SCRIPT=(-f "$REPO/benches/scripts/autocommit-update.sql") CLIENTS=(16) LABEL="autocommit UPDATE" ;;
*) echo "ab: ERROR: SCRIPT must be select-only, tpcb or autocommit" >&2 && exit 1 ;;
esac
PROTOCOL=${PROTOCOL:-simple}
case $PROTOCOL in
simple | extended | prepared) PGBENCH_SCRIPT+=(-M "$PROTOCOL") ;;
*) echo "ab: ERROR: PROTOCOL must be simple, extended or prepared" >&2 && exit 1 ;;
esac
DURATION=${DURATION:-10}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run

(($# == 2)) || die "usage: benches/ab.sh OLD_BINARY NEW_BINARY"
A=$1
B=$2
[[ -x $A && -x $B ]] || die "both binaries must exist and be executable"
CONFIG=${CONFIG:-pgway.toml}
CONFIG_B=${CONFIG_B:-$CONFIG}
[[ -f $RUN/$CONFIG && -f $RUN/$CONFIG_B ]] ||
    die "no config $CONFIG or $CONFIG_B in $RUN: run benches/compare.sh first"

start_bench_pair "$BENCH_DIR"
port_of() { sed -nE 's/^listen = "[^:]+:([0-9]+)"/\1/p' "$RUN/$1"; }
PORT=
PID=
OUT=$(mktemp -d)
cleanup() {
    [[ -n $PID ]] && kill "$PID" 2>/dev/null
    rm -rf "$OUT"
}
trap cleanup EXIT

start() {
    local config=$CONFIG
    [[ $2 == B ]] && config=$CONFIG_B
    PORT=$(port_of "$config")
    NO_COLOR=1 setsid "$1" --config "$RUN/$config" >"$OUT/pgway.log" 2>&1 &
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

# CPU time of the whole machine so far, in clock ticks: user, nice, system, irq and softirq
# of every core (not idle, iowait or steal).
machine_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# run SIDE CLIENTS (SIDE: A or B): prints the latency (1 client, ms) or the tps, pgway's user CPU time per
# transaction and the machine's CPU time per transaction, in µs (more clients; a transaction
# of `-S` is one statement).
run() {
    local before after machine_before machine_after binary=$A
    [[ $1 == B ]] && binary=$B
    start "$binary" "$1"
    # A short warm-up fills the pool.
    PGPASSWORD=app-secret pgbench -n "${PGBENCH_SCRIPT[@]}" -c "$2" -j 2 -T 2 -h 127.0.0.1 \
        -p "$PORT" -U app bench >/dev/null 2>&1
    # pgway's user CPU time so far, in clock ticks (cpu_ticks: scripts/lib.sh).
    read -r before _ < <(cpu_ticks "$PID")
    machine_before=$(machine_ticks)
    PGPASSWORD=app-secret pgbench -n "${PGBENCH_SCRIPT[@]}" -c "$2" -j $(($2 > 1 ? 2 : 1)) -T "$DURATION" \
        -h 127.0.0.1 -p "$PORT" -U app bench >"$OUT/pgbench.log" 2>&1 ||
        die "pgbench failed: $(tail -3 "$OUT/pgbench.log")"
    read -r after _ < <(cpu_ticks "$PID")
    machine_after=$(machine_ticks)
    stop
    if (($2 == 1)); then
        sed -nE 's/^latency average = ([0-9.]+) ms/\1/p' "$OUT/pgbench.log"
    else
        local tps statements
        tps=$(sed -nE 's/^tps = ([0-9.]+) .*/\1/p' "$OUT/pgbench.log")
        statements=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$OUT/pgbench.log")
        awk -v t="$tps" -v u=$((after - before)) -v m=$((machine_after - machine_before)) \
            -v hz="$(getconf CLK_TCK)" -v n="$statements" \
            'BEGIN {printf "%s %.2f %.2f\n", t, u / hz * 1e6 / n, m / hz * 1e6 / n}'
    fi
}

median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

echo "A = $A ($CONFIG)"
echo "B = $B ($CONFIG_B)"
[[ $PROTOCOL == simple ]] || echo "pgbench -M $PROTOCOL"
: >"$OUT/s1" && : >"$OUT/s32" && : >"$OUT/cpu" && : >"$OUT/machine"
for ((round = 1; round <= ROUNDS; round++)); do
    # Alternate which build goes first.
    if ((round % 2)); then first=A second=B; else first=B second=A; fi
    declare -A got=()
    for sc in "${CLIENTS[@]}"; do
        got[$first.$sc]=$(run "$first" "$sc")
        got[$second.$sc]=$(run "$second" "$sc")
    done
    if [[ $SCRIPT != select-only ]]; then
        read -r tps_a cpu_a machine_a <<<"${got[A.16]}"
        read -r tps_b cpu_b machine_b <<<"${got[B.16]}"
        r16=$(awk -v a="$tps_a" -v b="$tps_b" 'BEGIN {printf "%.3f", b / a}')
        rcpu=$(awk -v a="$cpu_a" -v b="$cpu_b" 'BEGIN {printf "%.3f", b / a}')
        rmachine=$(awk -v a="$machine_a" -v b="$machine_b" 'BEGIN {printf "%.3f", b / a}')
        echo "$r16" >>"$OUT/s32"
        echo "$rcpu" >>"$OUT/cpu"
        echo "$rmachine" >>"$OUT/machine"
        printf 'round %d: %s 16 clients A %.0f tps, B %.0f tps (B/A %s), user CPU per transaction A %s µs, B %s µs (B/A %s), machine CPU per transaction A %s µs, B %s µs (B/A %s)\n' \
            "$round" "$LABEL" "$tps_a" "$tps_b" "$r16" "$cpu_a" "$cpu_b" "$rcpu" "$machine_a" "$machine_b" "$rmachine"
        unset got
        continue
    fi
    read -r tps_a cpu_a machine_a <<<"${got[A.32]}"
    read -r tps_b cpu_b machine_b <<<"${got[B.32]}"
    r1=$(awk -v a="${got[A.1]}" -v b="${got[B.1]}" 'BEGIN {printf "%.3f", b / a}')
    r32=$(awk -v a="$tps_a" -v b="$tps_b" 'BEGIN {printf "%.3f", b / a}')
    rcpu=$(awk -v a="$cpu_a" -v b="$cpu_b" 'BEGIN {printf "%.3f", b / a}')
    rmachine=$(awk -v a="$machine_a" -v b="$machine_b" 'BEGIN {printf "%.3f", b / a}')
    echo "$r1" >>"$OUT/s1"
    echo "$r32" >>"$OUT/s32"
    echo "$rcpu" >>"$OUT/cpu"
    echo "$rmachine" >>"$OUT/machine"
    printf 'round %d: -S 1 client latency A %s ms, B %s ms (B/A %s); -S 32 clients A %.0f tps, B %.0f tps (B/A %s), user CPU per statement A %s µs, B %s µs (B/A %s), machine CPU per statement A %s µs, B %s µs (B/A %s)\n' \
        "$round" "${got[A.1]}" "${got[B.1]}" "$r1" "$tps_a" "$tps_b" "$r32" "$cpu_a" "$cpu_b" "$rcpu" "$machine_a" "$machine_b" "$rmachine"
    unset got
done
if [[ $SCRIPT != select-only ]]; then
    echo "median B/A: $LABEL 16 clients tps $(median <"$OUT/s32") (higher is better for B); user CPU per transaction $(median <"$OUT/cpu"), machine CPU per transaction $(median <"$OUT/machine") (lower is better for B)"
    exit 0
fi
echo "median B/A: -S 1 client latency $(median <"$OUT/s1") (lower is better for B); -S 32 clients tps $(median <"$OUT/s32") (higher is better for B); user CPU per statement $(median <"$OUT/cpu"), machine CPU per statement $(median <"$OUT/machine") (lower is better for B)"
