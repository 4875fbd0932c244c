#!/usr/bin/env bash
# The primary's CPU time per WAL position query, the statement read-your-writes sends after
# every committing write: sent as a simple Query (parsed and planned each time, as pgway did
# before it prepared it) and as a prepared statement (Bind/Execute/Sync, as pgway sends it
# now). pgbench runs the query alone with one client straight against compare.sh's primary,
# in interleaved rounds; the figure is the CPU time of the primary's postmaster and all its
# children (the backend, exited ones included, the walsender, the background processes),
# user and system, divided by the queries run. A server-side figure that
# benches/instructions-per-statement.sh (pgway's own instructions) does not see.
#
#   benches/position-query-cpu.sh
#
# Knobs: ROUNDS=3, DURATION=8 (seconds per run). Run benches/compare.sh once first: it
# leaves the PostgreSQL pair in .bench (or $PGWAY_BENCH_DIR).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
BENCH_DIR=$(bench_pair_dir)
PRIMARY_PORT=5461

[[ -f $BENCH_DIR/run/pgway.toml ]] || die "no bench pair in $BENCH_DIR: run benches/compare.sh first"
start_bench_pair "$BENCH_DIR"
POSTMASTER=$(head -1 "$BENCH_DIR/primary/postmaster.pid")

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo 'SELECT pg_catalog.pg_current_wal_insert_lsn();' >"$OUT/position.sql"

# run MODE: the primary's CPU µs per query with pgbench -M MODE.
run() {
    local before after queries
    before=$(server_cpu_ticks "$POSTMASTER")
    PGPASSWORD=app-secret pgbench -n -c 1 -T "$DURATION" -M "$1" -f "$OUT/position.sql" \
        -h 127.0.0.1 -p "$PRIMARY_PORT" -U app bench >"$OUT/pgbench.log" 2>&1 ||
        die "pgbench failed: $(tail -3 "$OUT/pgbench.log")"
    # The backend's time reaches the postmaster's once it has exited.
    sleep 0.3
    after=$(server_cpu_ticks "$POSTMASTER")
    queries=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$OUT/pgbench.log")
    awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$queries" \
        'BEGIN {printf "%.1f", t / hz * 1e6 / n}'
}

for ((round = 1; round <= ROUNDS; round++)); do
    simple=$(run simple)
    prepared=$(run prepared)
    printf 'round %d: server CPU per position query: simple Query %s µs, prepared %s µs (%s)\n' \
        "$round" "$simple" "$prepared" \
        "$(awk -v s="$simple" -v p="$prepared" 'BEGIN {printf "%.3f", p / s}')"
done
