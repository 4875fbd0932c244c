#!/usr/bin/env bash
# A profile-guided (PGO) release build of pgway: builds pgway with LLVM's instrumentation,
# runs it in front of the local primary and replica of scripts/dev-cluster.sh under a short
# pgbench workload (the statement shapes benches/compare.sh measures: -S with the simple,
# extended and prepared protocols, TPC-B, writes outside a transaction; then, in a second
# run with the result cache on, reads the cache answers), then builds it again
# with the profile that run recorded, so that the compiler lays out and inlines the hot path
# as it runs. benches/PROFILE.md (twenty-third round) has what it saves per statement.
#
#   scripts/build-pgo.sh        the binary lands in target/pgo/release/pgway
#
# The plain `cargo build --release` (target/release/pgway) is unchanged; the test suite
# uses that one. Paths the workload does not run (COPY, TLS, errors, Patroni) get no
# profile and are compiled as in a plain build, or for size where the profile says cold.
# Needs rustup's llvm-tools component (installed here if missing) for llvm-profdata.
# The dev cluster's servers are started if they are not running and stopped again after;
# the workload's tables live in a database of their own (pgway_pgo), dropped at the end.
# Knobs: PGO_SECONDS=4 (seconds per workload step); PGWAY_PGO_PORT=6439 and
# PGWAY_PGO_ADMIN_PORT=9939 (the instrumented pgway's ports, beside a dev pgway on 6432).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
OUT=$REPO/target/pgo
RAW=$OUT/raw
PROFILE=$OUT/pgway.profdata
SECONDS_PER_STEP=${PGO_SECONDS:-4}
PORT=${PGWAY_PGO_PORT:-6439}
ADMIN_PORT=${PGWAY_PGO_ADMIN_PORT:-9939}
DB=pgway_pgo
PRIMARY_PORT=5441 # scripts/dev-cluster.sh's

say() { echo "build-pgo: $*"; }

llvm_profdata() {
    local sysroot tool
    sysroot=$(rustc --print sysroot)
    tool=$(find "$sysroot/lib/rustlib" -path '*/bin/llvm-profdata' -print -quit 2>/dev/null || true)
    if [[ -z $tool ]]; then
        say "installing rustup's llvm-tools component (for llvm-profdata)" >&2
        rustup component add llvm-tools >&2
        tool=$(find "$sysroot/lib/rustlib" -path '*/bin/llvm-profdata' -print -quit)
    fi
    [[ -x $tool ]] || die "no llvm-profdata in $sysroot after installing llvm-tools"
    printf '%s\n' "$tool"
}

psql_admin() {
    PGOPTIONS='-c client_min_messages=warning' "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 \
        -p "$PRIMARY_PORT" -U postgres "$@"
}

PGWAY_PID=
STARTED_SERVERS=0
cleanup() {
    local rc=$?
    trap - EXIT
    [[ -n $PGWAY_PID ]] && kill "$PGWAY_PID" 2>/dev/null
    if [[ -n ${DEV_CONFIG:-} ]]; then
        psql_admin -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    if ((STARTED_SERVERS)); then bash "$REPO/scripts/dev-cluster.sh" stop >/dev/null || true; fi
    exit "$rc"
}
trap cleanup EXIT

PROFDATA=$(llvm_profdata)

# The servers, as the quick start makes them; stopped again at the end if they were not up.
# Its status names their directory, where `servers` writes the config.
DEV_STATUS=$(bash "$REPO/scripts/dev-cluster.sh" status)
grep -q 'primary: running' <<<"$DEV_STATUS" || STARTED_SERVERS=1
DEV_DIR=$(sed -nE 's/^dev-cluster: primary: [a-z]+ \((.*)\/primary\)$/\1/p' <<<"$DEV_STATUS")
bash "$REPO/scripts/dev-cluster.sh" servers >/dev/null
DEV_CONFIG=$DEV_DIR/pgway.toml
[[ -f $DEV_CONFIG ]] || die "scripts/dev-cluster.sh left no config at $DEV_CONFIG"

say "building the instrumented pgway (target/pgo/gen)"
(cd "$REPO" && RUSTFLAGS="-Cprofile-generate=$RAW" cargo build --release --locked --bin pgway \
    --target-dir "$OUT/gen")
# The build scripts the instrumented build ran wrote profiles of their own: only pgway's count.
rm -rf "$RAW"
mkdir -p "$RAW"

say "loading the workload's tables (database $DB, pgbench -i)"
psql_admin -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB OWNER app" >/dev/null
PGPASSWORD=app-secret "$PG_BIN/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$PRIMARY_PORT" -U app "$DB" \
    >"$OUT/pgbench-init.log" 2>&1 || die "pgbench -i failed; see $OUT/pgbench-init.log"

CONFIG=$OUT/pgway.toml
sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$PORT\"/" \
    -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$ADMIN_PORT\"/" "$DEV_CONFIG" >"$CONFIG"
# start_pgway CONFIG LOG: the instrumented pgway, waited for until it answers.
start_pgway() {
    local _
    NO_COLOR=1 "$OUT/gen/release/pgway" --config "$1" >"$2" 2>&1 &
    PGWAY_PID=$!
    for _ in $(seq 1 100); do
        if PGPASSWORD=app-secret "$PG_BIN/psql" -X -h 127.0.0.1 -p "$PORT" -U app -d "$DB" -Atqc 'select 1' \
            >/dev/null 2>&1; then
            return
        fi
        sleep 0.1
    done
    die "the instrumented pgway did not come up; see $2"
}
# stop_pgway: its profile is written when it exits (into the same file for both runs).
stop_pgway() {
    kill -TERM "$PGWAY_PID"
    wait "$PGWAY_PID" || true
    PGWAY_PID=
}
step() {
    local out
    out=$(PGPASSWORD=app-secret "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U app "$@" "$DB" 2>&1) ||
        die "pgbench $* failed: $out"
    say "  pgbench $*: $(sed -nE 's/^tps = ([0-9.]+).*/\1 tps/p' <<<"$out")"
}

say "running the workload through it (${SECONDS_PER_STEP} s a step)"
start_pgway "$CONFIG" "$OUT/pgway.log"
step -T "$SECONDS_PER_STEP" -S -c 32 -j 2
step -T "$SECONDS_PER_STEP" -S -c 1
step -T "$SECONDS_PER_STEP" -S -M extended -c 16 -j 2
step -T "$SECONDS_PER_STEP" -S -M prepared -c 16 -j 2
step -T "$SECONDS_PER_STEP" -c 16 -j 2
step -T "$SECONDS_PER_STEP" -f "$REPO/benches/scripts/autocommit-update.sql" -c 16 -j 2
stop_pgway

# The result cache's path (off by default) in a run of its own, so that the first run's
# profile is that of the default config: 100 keys, read again and again. A fixed 20,000
# reads, a twentieth of the first run's statements: enough that the compiler does not take
# the cache's code for cold, too few to outweigh the default path (a cached read is about
# five times as fast, and four seconds of it made a -S statement 4% dearer).
say "and with the result cache on"
cp "$CONFIG" "$OUT/pgway-cache.toml"
cat >>"$OUT/pgway-cache.toml" <<EOF

[cache]
enabled = true

[[cache.rules]]
tables = ["public.pgbench_accounts"]
EOF
cat >"$OUT/cache-read.sql" <<EOF
\set aid random(1, 100)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
EOF
start_pgway "$OUT/pgway-cache.toml" "$OUT/pgway-cache.log"
step -t 2500 -f "$OUT/cache-read.sql" -c 4 -j 2
step -t 2500 -f "$OUT/cache-read.sql" -M extended -c 4 -j 2
stop_pgway

compgen -G "$RAW/*.profraw" >/dev/null || die "the instrumented pgway wrote no profile into $RAW"
"$PROFDATA" merge -o "$PROFILE" "$RAW"/*.profraw
# Named by its contents: cargo rebuilds when RUSTFLAGS change, not when a file they name does.
USED=$OUT/pgway-$(sha256sum "$PROFILE" | cut -c 1-16).profdata
cp "$PROFILE" "$USED"

say "building pgway with the profile (target/pgo/release)"
(cd "$REPO" && RUSTFLAGS="-Cprofile-use=$USED" cargo build --release --locked --bin pgway \
    --target-dir "$OUT")
find "$OUT" -maxdepth 1 -name 'pgway-*.profdata' ! -path "$USED" -delete
say "done: $OUT/release/pgway"
