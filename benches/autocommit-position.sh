#!/usr/bin/env bash
# What read-your-writes' WAL position query costs an autocommit write on the primary, by
# the shape it is sent in. pgbench with 16 clients and -M prepared runs, straight against
# compare.sh's primary, the scripts in benches/scripts/position-shape-*.sql in interleaved
# rounds: the UPDATE alone (plain), between BEGIN and COMMIT with one Sync (wrapped), with
# the position query in the same implicit transaction (same-sync: unsafe, the position comes
# before the commit record; it prices the query's own execution), BEGIN, UPDATE, COMMIT and
# the position with one Sync (joined: what pgway could send to answer both in one write),
# and the position in a round trip of its own (two-trips). Prints each run's tps and the
# primary's CPU time per transaction (the postmaster and all its children, user and
# system), and per shape the median ratio of its tps to plain's in the same round.
# benches/PROFILE.md (twenty-second round) quotes it.
#
#   benches/autocommit-position.sh
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
SHAPES=(plain wrapped same-sync joined two-trips)

[[ -f $BENCH_DIR/run/pgway.toml ]] || die "no bench pair in $BENCH_DIR: run benches/compare.sh first"
start_bench_pair "$BENCH_DIR"
POSTMASTER=$(head -1 "$BENCH_DIR/primary/postmaster.pid")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# run SHAPE: prints the tps and the primary's CPU µs per transaction.
run() {
    local before after tps transactions
    before=$(server_cpu_ticks "$POSTMASTER")
    PGPASSWORD=app-secret pgbench -n -c 16 -j 2 -T "$DURATION" -M prepared \
        -f "$REPO/benches/scripts/position-shape-$1.sql" \
        -h 127.0.0.1 -p "$PRIMARY_PORT" -U app bench >"$OUT/pgbench.log" 2>&1 ||
        die "pgbench failed: $(tail -3 "$OUT/pgbench.log")"
    # The backends' time reaches the postmaster's once they have exited.
    sleep 0.3
    after=$(server_cpu_ticks "$POSTMASTER")
    tps=$(sed -nE 's/^tps = ([0-9.]+) .*/\1/p' "$OUT/pgbench.log")
    transactions=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$OUT/pgbench.log")
    awk -v t="$tps" -v c=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$transactions" \
        'BEGIN {printf "%.0f %.1f\n", t, c / hz * 1e6 / n}'
}

median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

for ((round = 1; round <= ROUNDS; round++)); do
    plain=
    for shape in "${SHAPES[@]}"; do
        read -r tps cpu <<<"$(run "$shape")"
        [[ $shape == plain ]] && plain=$tps
        ratio=$(awk -v a="$plain" -v b="$tps" 'BEGIN {printf "%.3f", b / a}')
        echo "$ratio" >>"$OUT/$shape"
        printf 'round %d: %-9s %6s tps (%s of plain), primary CPU %s µs per transaction\n' \
            "$round" "$shape" "$tps" "$ratio" "$cpu"
    done
done
for shape in "${SHAPES[@]:1}"; do
    echo "median tps against plain: $shape $(median <"$OUT/$shape")"
done
