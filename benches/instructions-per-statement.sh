#!/usr/bin/env bash
# User-space instructions pgway executes per statement, counted by callgrind (valgrind):
# pgway runs under callgrind while pgbench -S with 8 clients runs 500 and then 2,500
# transactions per client; the difference of the two counts, divided by the 16,000 extra
# statements, leaves out start-up and login. A profile for comparing builds, not a
# benchmark: it is exact and repeatable, but says nothing about time. benches/PROFILE.md
# quotes its output.
#
#   benches/instructions-per-statement.sh [PGWAY_BINARY]
#
# Run it after benches/compare.sh, which leaves its configs in .bench/run; the PostgreSQL
# pair is started if it is stopped. PGWAY_BINARY defaults to target/release/pgway.
# PROTOCOL=prepared (or extended) runs pgbench with -M PROTOCOL instead of the simple
# protocol. SCRIPT=tpcb runs pgbench's TPC-B-like script instead of -S (seven statements a
# transaction: BEGIN, three UPDATEs, a SELECT, an INSERT, END; the figure is per statement
# all the same). SCRIPT=autocommit runs benches/scripts/autocommit-update.sql (one UPDATE a
# transaction, no BEGIN: each is followed by read-your-writes' position query on its own).
# With PROFILE_OUT=FILE, the callgrind dump of the measured 20,000 statements is kept
# there: `callgrind_annotate --inclusive=yes --threshold=100 FILE` shows where they went, by
# function (with the default threshold it stops at the worker threads' start).
# GATEWAY=pgbouncer counts pgbouncer instead (compare.sh's pgbouncer.ini on port 6473, run as
# the postgres user: pgbouncer does not run as root), for the same figure side by side.
# GATEWAY=relay-tokio, GATEWAY=relay-mio, GATEWAY=relay-own and GATEWAY=relay-exec count
# examples/relay_floor.rs (a plain TCP relay to the replica, port 6473: on tokio, hand-written
# on mio, async code on an executor of its own over a mio reactor of its own, or the same
# executor over tokio's reactor, as pgway's workers run): the floor an event loop alone costs.
# CONFIG=pgway-rywoff.toml runs pgway with compare.sh's config for read-your-writes off
# instead of its default one (any config file in .bench/run).
# TIMEOUTS=1 sets client.idle_timeout, idle_in_transaction_timeout and query_timeout (10
# minutes each, never reached), so that every wait for a client and every request sets a
# timer (on the pgway-timer runtime, src/timer.rs): the cost of those timers.
# POOL_SIZE=4 sets pool.size to 4 (compare.sh's config has 20): with 8 clients most
# statements then wait for a free server connection, so the count includes that wait (the
# pool's semaphore, its timer, a connection moved between workers, the wake-ups). With
# GATEWAY=pgbouncer it sets default_pool_size.
# CACHE_SIM=1 also simulates a small data cache (4 KiB, 64-byte lines, 4-way; level 2 of
# 64 KiB): its misses per statement approximate the cache lines a statement touches that
# the statements of the other clients in between have pushed out, which is what a gateway
# sharing its cores with PostgreSQL and pgbench finds cold. The same for code: a 4 KiB
# instruction cache, whose misses approximate the code lines a statement runs through.
# ATOMICS=1 also counts the atomic read-modify-write instructions executed per statement
# (x86 `lock`-prefixed ones and `xchg` with memory: each a full barrier, a few times the
# cost of a plain instruction, which the instruction count does not show), in the
# gateway's binary and in libc, over the last 20,000 statements (their clients' logins
# included: 8), with the functions they were inlined into (objdump and the per-instruction
# counts of callgrind's --dump-instr).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run
BIN=${1:-$REPO/target/release/pgway}
PROTOCOL=${PROTOCOL:-simple}
SCRIPT=${SCRIPT:-select-only}
case $SCRIPT in
select-only) PGBENCH_SCRIPT=(-S) STATEMENTS=1 ;;
tpcb) PGBENCH_SCRIPT=() STATEMENTS=7 ;;
autocommit) PGBENCH_SCRIPT=(-f "$REPO/benches/scripts/autocommit-update.sql") STATEMENTS=1 ;;
*) echo "instructions-per-statement: ERROR: SCRIPT must be select-only, tpcb or autocommit" >&2 && exit 1 ;;
esac
GATEWAY=${GATEWAY:-pgway}
CONFIG=${CONFIG:-pgway.toml}
VG_ARGS=(--tool=callgrind)
if [[ -n ${CACHE_SIM:-} ]]; then
    VG_ARGS+=(--cache-sim=yes --D1=4096,4,64 --I1=4096,4,64 --LL=65536,8,64)
fi
if [[ -n ${ATOMICS:-} ]]; then
    VG_ARGS+=(--dump-instr=yes --compress-pos=no --compress-strings=no)
    command -v objdump >/dev/null || { apt-get update -qq && apt-get install -y -qq binutils >/dev/null; }
fi

case $GATEWAY in
pgway)
    [[ -f $RUN/$CONFIG ]] || die "no $CONFIG in $RUN: run benches/compare.sh first"
    [[ -x $BIN ]] || die "no pgway binary at $BIN: cargo build --release"
    ;;
pgbouncer)
    [[ -f $RUN/pgbouncer/pgbouncer.ini ]] || die "no pgbouncer.ini in $RUN: run benches/compare.sh first"
    BIN=/usr/sbin/pgbouncer
    ;;
relay-tokio | relay-mio | relay-own | relay-exec)
    (cd "$REPO" && cargo build --release --example relay_floor) || die "cannot build examples/relay_floor.rs"
    BIN=$REPO/target/release/examples/relay_floor
    ;;
*) die "GATEWAY must be pgway, pgbouncer, relay-tokio, relay-mio, relay-own or relay-exec" ;;
esac
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
command -v callgrind_control >/dev/null || die "callgrind_control is missing (Debian package valgrind)"

start_bench_pair "$BENCH_DIR"

OUT=$(mktemp -d)
VPID=
cleanup() {
    [[ -n $VPID ]] && kill "$VPID" 2>/dev/null
    rm -rf "$OUT"
}
trap cleanup EXIT

# Runs a command as the gateway's user (callgrind_control must be that user too).
as_gateway_user() {
    if [[ $GATEWAY == pgbouncer ]]; then as_pg "$@"; else "$@"; fi
}

if [[ $GATEWAY == pgway ]]; then
    PORT=$(sed -nE 's/^listen = "[^:]+:([0-9]+)"/\1/p' "$RUN/$CONFIG")
    # Without busy polling: the count is of the statements' own path, not of the polling
    # between events (valgrind runs one thread at a time, so a polling worker would also
    # take turns from the one serving). Builds from before `busy_poll` do not know the key.
    sed '1a busy_poll = "0s"' "$RUN/$CONFIG" >"$OUT/pgway.toml"
    if [[ -n ${TIMEOUTS:-} ]]; then
        # Every wait for a client and every request then sets a timer.
        sed -i '/^\[client\]/a idle_timeout = "10m"\nidle_in_transaction_timeout = "10m"\nquery_timeout = "10m"' "$OUT/pgway.toml"
    fi
    if [[ -n ${POOL_SIZE:-} ]]; then
        sed -i "/^\[pool\]/,/^\[/ s/^size = .*/size = $POOL_SIZE/" "$OUT/pgway.toml"
    fi
    "$BIN" --config "$OUT/pgway.toml" check >/dev/null 2>&1 || cp "$RUN/$CONFIG" "$OUT/pgway.toml"
    NO_COLOR=1 valgrind "${VG_ARGS[@]}" --callgrind-out-file="$OUT/cg.%p" \
        "$BIN" --config "$OUT/pgway.toml" >"$OUT/pgway.log" 2>&1 &
    VPID=$!
elif [[ $GATEWAY == relay-* ]]; then
    PORT=6473
    ! ss -ltn | grep -q "127.0.0.1:$PORT " || die "port $PORT is taken"
    valgrind "${VG_ARGS[@]}" --callgrind-out-file="$OUT/cg.%p" \
        "$BIN" "${GATEWAY#relay-}" "127.0.0.1:$PORT" "127.0.0.1:$(sed -nE 's/^nodes = \["[^"]+", "[^:]+:([0-9]+)"\]/\1/p' "$RUN/pgway.toml")" \
        >"$OUT/relay.log" 2>&1 &
    VPID=$!
else
    PORT=6473
    ! ss -ltn | grep -q "127.0.0.1:$PORT " || die "port $PORT is taken (a pgbouncer left running?)"
    chmod 755 "$OUT"
    sed -E -e "s/^listen_port = .*/listen_port = $PORT/" -e "s#^logfile = .*#logfile = $OUT/pgbouncer.log#" \
        -e "s#^pidfile = .*#pidfile = $OUT/pgbouncer.pid#" "$RUN/pgbouncer/pgbouncer.ini" >"$OUT/pgbouncer.ini"
    if [[ -n ${POOL_SIZE:-} ]]; then
        sed -i "s/^default_pool_size = .*/default_pool_size = $POOL_SIZE/" "$OUT/pgbouncer.ini"
    fi
    chown -R postgres "$OUT"
    as_pg valgrind "${VG_ARGS[@]}" --callgrind-out-file="$OUT/cg.%p" \
        "$BIN" "$OUT/pgbouncer.ini" >"$OUT/vg.log" 2>&1 &
    # The process callgrind runs, not the runuser in front of it.
    for _ in $(seq 1 50); do
        VPID=$(pgrep -n -f "^[^ ]*valgrind[^ ]* .*$OUT/cg" || true)
        [[ -n $VPID ]] && break
        sleep 0.1
    done
    [[ -n $VPID ]] || die "pgbouncer did not start under callgrind (see $OUT/vg.log)"
fi
for _ in $(seq 1 120); do
    PGPASSWORD=app-secret psql -h 127.0.0.1 -p "$PORT" -U app -d bench -Atqc 'select 1' \
        >/dev/null 2>&1 && break
    sleep 1
done
# Instructions since the previous dump (callgrind numbers its dumps 1, 2, ...), after
# pgbench -S (or SCRIPT's) -c 8 -t TRANSACTIONS.
DUMPS=0
count_after() {
    PGPASSWORD=app-secret pgbench -n "${PGBENCH_SCRIPT[@]}" -M "$PROTOCOL" -c 8 -j 2 -t "$1" -h 127.0.0.1 -p "$PORT" -U app bench \
        >"$OUT/pgbench.log" 2>&1 || die "pgbench failed: $(tail -3 "$OUT/pgbench.log")"
    as_gateway_user callgrind_control -d "$VPID" >/dev/null
    DUMPS=$((DUMPS + 1))
    COUNT=$(sed -nE 's/^summary: ([0-9]+)/\1/p' "$OUT/cg.$VPID.$DUMPS")
    # With CACHE_SIM: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
    MISSES=$(awk '/^summary:/ {print $6 + $7, $9 + $10, $5, $8}' "$OUT/cg.$VPID.$DUMPS")
    [[ -n $COUNT ]] || die "no callgrind dump $OUT/cg.$VPID.$DUMPS"
}

count_after 200 # warm-up: pools filled, caches primed
count_after 500
short=$COUNT
short_misses=$MISSES
count_after 2500
long=$COUNT
long_misses=$MISSES
if [[ -n ${PROFILE_OUT:-} ]]; then
    cp "$OUT/cg.$VPID.$DUMPS" "$PROFILE_OUT"
fi
NAME=$(basename "$BIN")
[[ $GATEWAY == relay-* ]] && NAME=$GATEWAY
awk -v s="$short" -v l="$long" -v b="$NAME" -v m="$PROTOCOL" -v n="$STATEMENTS" -v o="${PGBENCH_SCRIPT[*]:-(tpcb)}" \
    'BEGIN {printf "%s: %.0f instructions per statement (pgbench %s -M %s -c 8, callgrind)\n", b, (l - s) / 16000 / n, o, m}'
if [[ -n ${ATOMICS:-} ]]; then
    # The objects that ran: the gateway's binary and the shared libraries.
    sed -n 's/^ob=//p' "$OUT/cg.$VPID.$DUMPS" | sort -u | grep -v -e '^???' -e valgrind |
        while read -r object; do
            [[ -f $object ]] || continue
            objdump -d --no-show-raw-insn "$object" |
                awk -v ob="$object" '$2 == "lock" || ($2 ~ /^xchg/ && $3 ~ /\(/) { a = $1; sub(":", "", a); print ob, a }'
        done >"$OUT/atomics"
    awk -v b="$NAME" -v n=$((20000 * STATEMENTS)) '
        NR == FNR { atomic[$1 " " $2] = 1; next }
        skip { skip = 0; next }
        /^ob=/ { ob = substr($0, 4); next }
        /^fn=/ { fn = substr($0, 4); next }
        /^calls=/ { skip = 1; next }
        /^0x/ {
            a = substr($1, 3); sub(/^0+/, "", a)
            if ((ob " " a) in atomic) { total += $NF; by[fn] += $NF }
        }
        END {
            printf "%s: %.1f atomic read-modify-write instructions per statement\n", b, total / n
            for (f in by) if (by[f] / n >= 0.5) printf "  %5.2f  %s\n", by[f] / n, substr(f, 1, 120) | "sort -rn"
        }' "$OUT/atomics" "$OUT/cg.$VPID.$DUMPS"
fi
if [[ -n ${CACHE_SIM:-} ]]; then
    awk -v s="$short_misses" -v l="$long_misses" -v b="$NAME" -v m="$PROTOCOL" -v n="$STATEMENTS" -v o="${PGBENCH_SCRIPT[*]:-(tpcb)}" 'BEGIN {
        split(s, a, " "); split(l, c, " ")
        printf "%s: %.0f data lines missed in a 4 KiB cache, %.0f in 64 KiB, per statement (pgbench %s -M %s -c 8, callgrind)\n", b, (c[1] - a[1]) / 16000 / n, (c[2] - a[2]) / 16000 / n, o, m
        printf "%s: %.0f code lines missed in a 4 KiB cache, %.0f in 64 KiB, per statement\n", b, (c[3] - a[3]) / 16000 / n, (c[4] - a[4]) / 16000 / n
    }'
fi
