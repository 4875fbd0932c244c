#!/usr/bin/env bash
# The result cache under load, and its invalidation delay. On compare.sh's primary and
# streaming replica, a table of 100 rows (cache_bench) and this pgbench script, at 32 clients:
#   \set id random(1, 100)
#   SELECT id, name, grp FROM cache_bench WHERE id = :id;
# against three targets: the replica directly, a pgway without the cache and a pgway with
# [cache] on and a rule for public.cache_bench (both pgways: compare.sh's config, other
# ports), with -M extended and -M simple (100 distinct keys either way). Target: the cached
# pgway at least 2x the replica's throughput. Then the invalidation delay, the time from a
# write's commit to the first read through the cached pgway that shows it:
#   through pgway   UPDATE through pgway, then read on a connection that has not read yet
#   on the primary  UPDATE directly on the primary (pgway learns of it from the WAL), then
#                   poll through pgway and, in the same loop, the replica directly
# each over TRIALS trials, the row read (and cached) before each write. Reads and writes go
# through long-lived psql processes fed by fifos, timed with $EPOCHREALTIME, so a poll costs
# one round trip (its mean is reported as the resolution), not a psql start.
# Writes benches/CACHE.md; raw logs in <bench dir>/run/cache.
#
#   benches/cache.sh [PGWAY_BINARY]
#
# Run it after benches/compare.sh (which calls it at the end unless CACHE_BENCH=0): it uses
# compare.sh's PostgreSQL pair and pgway config (.bench/run). It makes sure the primary
# runs with wal_level = logical and max_replication_slots >= 4 (ALTER SYSTEM and a restart
# when not), that pg_hba.conf lets replication roles in by SCRAM on loopback, and that the
# role pgway_wal (LOGIN REPLICATION) exists. Knobs (environment):
#   DURATION=10        seconds per pgbench run
#   CLIENTS=32         pgbench clients; THREADS=2 pgbench threads (-j)
#   ROUNDS=1           rounds (targets rotated each round; the report gives the median)
#   MODES="extended simple"   pgbench protocols (-M)
#   WARMUP=3           seconds of unreported pgbench per target before the first round
#   TRIALS=20          invalidation trials per kind of write
#   POLL_TIMEOUT=10    seconds a trial polls before it counts the write as never seen
#   STREAM_WAIT=60     seconds to wait for the invalidation stream to be 'following'; 0 does
#                      not wait (and does not need GET /cache): a check of the harness alone
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
PY=/usr/bin/python3
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run
LOGS=$RUN/cache
BIN=${1:-$REPO/target/release/pgway}

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-32}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-1}
MODES=${MODES:-extended simple}
WARMUP=${WARMUP:-3}
TRIALS=${TRIALS:-20}
POLL_TIMEOUT=${POLL_TIMEOUT:-10}
STREAM_WAIT=${STREAM_WAIT:-60}
STREAM_NOTE=

PRIMARY_PORT=5461
REPLICA_PORT=5462
PLAIN_PORT=6472 # pgway without the cache
PLAIN_ADMIN_PORT=9972
CACHE_PORT=6473 # pgway with the cache
CACHE_ADMIN_PORT=9973
DB=bench
APP_USER=app
APP_PASSWORD=app-secret
WAL_USER=pgway_wal
WAL_PASSWORD=wal-secret
TABLE=cache_bench
OUT_MD=$REPO/benches/CACHE.md

say() { echo "cache: $*"; }
warn() { echo "cache: WARNING: $*" >&2; }

for v in DURATION CLIENTS THREADS ROUNDS WARMUP TRIALS POLL_TIMEOUT STREAM_WAIT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((DURATION >= 1 && CLIENTS >= 1 && THREADS >= 1 && ROUNDS >= 1 && TRIALS >= 1 && POLL_TIMEOUT >= 1)) ||
    die "DURATION, CLIENTS, THREADS, ROUNDS, TRIALS and POLL_TIMEOUT must be at least 1"
for m in $MODES; do
    [[ $m == extended || $m == simple || $m == prepared ]] || die "MODES: unknown pgbench protocol '$m'"
done
[[ -f $RUN/pgway.toml ]] || die "no config in $RUN: run benches/compare.sh first"
[[ -x $BIN ]] || die "no pgway binary at $BIN: cargo build --release"
command -v curl >/dev/null || die "curl is missing (scripts/install-deps.sh installs it)"

# A write to a psql that has exited must fail, not kill this script.
trap '' PIPE

WORK=$(mktemp -d)
PGWAY_PIDS=()
declare -A S_IN S_OUT S_PID
cleanup() {
    local rc=$? name pid
    trap - EXIT
    for name in "${!S_PID[@]}"; do close_session "$name"; done
    for pid in "${PGWAY_PIDS[@]}"; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

admin_psql() { # port, then psql arguments
    "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres "${@:2}"
}
app_psql() { # port, then psql arguments
    PGPASSWORD=$APP_PASSWORD PGCONNECT_TIMEOUT=5 \
        "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U "$APP_USER" -d "$DB" "${@:2}"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

now_us() { # the time in microseconds, into NOW_US (no fork)
    local t=$EPOCHREALTIME
    NOW_US=${t/[.,]/}
}

# ---------------------------------------------------------------------------------------------
# The pair: logical decoding on the primary, the WAL role, the table
# ---------------------------------------------------------------------------------------------

wait_replica_streaming() {
    local deadline=$((SECONDS + 60))
    until [[ $(admin_psql "$PRIMARY_PORT" -d postgres -c \
        "select count(*) from pg_stat_replication where state = 'streaming'" 2>/dev/null) -ge 1 ]]; do
        ((SECONDS < deadline)) || die "the replica does not stream from the primary 60 s after its restart; see $BENCH_DIR/replica.log"
        sleep 0.5
    done
}

wait_replayed() {
    local lsn deadline=$((SECONDS + 120))
    lsn=$(admin_psql "$PRIMARY_PORT" -d postgres -c 'select pg_current_wal_lsn()')
    until [[ $(admin_psql "$REPLICA_PORT" -d postgres -c \
        "select coalesce(pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn, false)" 2>/dev/null) == t ]]; do
        ((SECONDS < deadline)) || die "the replica has not replayed $lsn after 120 s; see $BENCH_DIR/replica.log"
        sleep 0.2
    done
}

setup_primary() {
    local primary=$BENCH_DIR/primary level slots restart=0
    start_bench_pair "$BENCH_DIR" 9>&-
    level=$(admin_psql "$PRIMARY_PORT" -d postgres -c 'show wal_level')
    slots=$(admin_psql "$PRIMARY_PORT" -d postgres -c 'show max_replication_slots')
    if [[ $level != logical ]]; then
        say "primary: wal_level = $level; ALTER SYSTEM SET wal_level = logical (restart)"
        admin_psql "$PRIMARY_PORT" -d postgres -c 'alter system set wal_level = logical'
        restart=1
    fi
    if ((slots < 4)); then
        say "primary: max_replication_slots = $slots; ALTER SYSTEM SET max_replication_slots = 10 (restart)"
        admin_psql "$PRIMARY_PORT" -d postgres -c 'alter system set max_replication_slots = 10'
        restart=1
    fi
    # Pairs made before scripts/lib.sh let replication roles in by SCRAM.
    if ! as_pg grep -qE '^[[:space:]]*host[[:space:]]+replication[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+scram-sha-256' \
        "$primary/pg_hba.conf"; then
        say "primary: pg_hba.conf gets 'host replication all 127.0.0.1/32 scram-sha-256'"
        printf '%s\n' "# benches/cache.sh: the result cache's invalidation stream (cache.wal_user)" \
            "host  replication all      127.0.0.1/32   scram-sha-256" |
            as_pg tee -a "$primary/pg_hba.conf" >/dev/null
        ((restart)) || admin_psql "$PRIMARY_PORT" -d postgres -c 'select pg_reload_conf()' >/dev/null
    fi
    if ((restart)); then
        # 9>&-: the server outlives this run and must not hold compare.sh's lock.
        as_pg "$PG_BIN/pg_ctl" -D "$primary" -l "$BENCH_DIR/primary.log" -m fast -w -t 120 restart >/dev/null 9>&- ||
            die "the primary did not restart; see $BENCH_DIR/primary.log"
        [[ $(admin_psql "$PRIMARY_PORT" -d postgres -c 'show wal_level') == logical ]] ||
            die "the primary still does not run with wal_level = logical"
        wait_replica_streaming
    fi
    admin_psql "$PRIMARY_PORT" -d postgres >/dev/null <<EOF
SELECT 'CREATE ROLE $WAL_USER LOGIN REPLICATION' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$WAL_USER') \gexec
SET password_encryption = 'scram-sha-256';
ALTER ROLE $WAL_USER LOGIN REPLICATION PASSWORD '$WAL_PASSWORD';
EOF
    app_psql "$PRIMARY_PORT" >/dev/null <<EOF
SET client_min_messages = warning;
CREATE TABLE IF NOT EXISTS $TABLE (id int PRIMARY KEY, name text NOT NULL, grp int NOT NULL);
DELETE FROM $TABLE WHERE id NOT BETWEEN 1 AND 100;
INSERT INTO $TABLE SELECT g, 'name-' || g, g % 10 FROM generate_series(1, 100) g
    ON CONFLICT (id) DO UPDATE SET name = excluded.name, grp = excluded.grp;
ANALYZE $TABLE;
EOF
    wait_replayed
    [[ $(app_psql "$REPLICA_PORT" -c "select count(*) from $TABLE") == 100 ]] ||
        die "the replica does not have the 100 rows of $TABLE"
    PRIMARY_SETTINGS="wal_level = $(admin_psql "$PRIMARY_PORT" -d postgres -c 'show wal_level'), max_replication_slots = $(admin_psql "$PRIMARY_PORT" -d postgres -c 'show max_replication_slots')"
    say "primary: $PRIMARY_SETTINGS; role $WAL_USER; $TABLE (100 rows) on both nodes"
}

# ---------------------------------------------------------------------------------------------
# The two pgways
# ---------------------------------------------------------------------------------------------

# compare.sh's config on other ports, without any [cache] tables it may have.
base_config() { # port, admin port
    sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$1\"/" \
        -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$2\"/" \
        -e "s/^# Generated by .*/# Generated by benches\/cache.sh from $(basename "$RUN")\/pgway.toml./" \
        "$RUN/pgway.toml" |
        awk '/^[[:space:]]*\[/ { skip = ($0 ~ /^[[:space:]]*\[\[?[[:space:]]*cache[].]/) } !skip'
}

write_configs() {
    base_config "$PLAIN_PORT" "$PLAIN_ADMIN_PORT" >"$LOGS/pgway-plain.toml"
    base_config "$CACHE_PORT" "$CACHE_ADMIN_PORT" >"$LOGS/pgway-cache.toml"
    cat >>"$LOGS/pgway-cache.toml" <<EOF

[cache]
enabled = true
max_memory = "256MB"
max_entry_size = "1MB"
default_ttl = "60s"
wal_user = "$WAL_USER"
wal_password = "$WAL_PASSWORD"

[[cache.rules]]
tables = ["public.$TABLE"]
ttl = "3h"
EOF
    local which out
    for which in plain cache; do
        out=$("$BIN" check --config "$LOGS/pgway-$which.toml" 2>&1) ||
            die "pgway check rejected $LOGS/pgway-$which.toml: $out"
    done
}

start_pgway() { # plain|cache, port, admin port
    local which=$1 port=$2 admin=$3 log=$LOGS/pgway-$1.log pid
    for p in "$port" "$admin"; do
        ! port_open "$p" || die "port 127.0.0.1:$p (pgway $which) is already in use"
    done
    say "starting pgway ($which) on 127.0.0.1:$port (admin $admin; log: $log)"
    NO_COLOR=1 setsid "$BIN" --config "$LOGS/pgway-$which.toml" >"$log" 2>&1 9>&- &
    pid=$!
    PGWAY_PIDS+=("$pid")
    local deadline=$((SECONDS + 30))
    until [[ $(app_psql "$port" -c 'select pg_is_in_recovery()' 2>/dev/null) == t ]]; do
        kill -0 "$pid" 2>/dev/null || die "pgway ($which) exited: $(tail -n 5 "$log")"
        ((SECONDS < deadline)) || die "after 30 s a read through pgway ($which) still does not reach the replica: $(tail -n 5 "$log")"
        sleep 0.3
    done
}

cache_json() { # admin port: GET /cache
    curl -fsS --max-time 5 "http://127.0.0.1:$1/cache"
}

# "STATE ENABLED": the invalidation stream's state for the bench database, and whether the
# cache is on (from GET /cache).
stream_state() {
    cache_json "$CACHE_ADMIN_PORT" 2>/dev/null | "$PY" -c '
import json, sys
o = json.load(sys.stdin)
st = [s.get("state", "?") for s in o.get("streams", []) if s.get("database") == sys.argv[1]]
print(st[0] if st else "none", str(o.get("enabled")).lower())' "$DB" 2>/dev/null || echo "unavailable -"
}

# "hits misses entries invalidations bypassed" from GET /cache (zeros when it does not answer).
cache_counters() {
    cache_json "$CACHE_ADMIN_PORT" 2>/dev/null | "$PY" -c '
import json, sys
o = json.load(sys.stdin)
print(*(int(o.get(k) or 0) for k in ("hits", "misses", "entries", "invalidations", "bypassed")))' 2>/dev/null ||
        echo "0 0 0 0 0"
}

wait_following() {
    local deadline=$((SECONDS + STREAM_WAIT)) state enabled
    if ((STREAM_WAIT == 0)); then
        read -r state enabled <<<"$(stream_state)"
        STREAM_NOTE="**Not waited for the invalidation stream (STREAM_WAIT=0): at the start its state was '$state', the cache enabled: $enabled.**"
        warn "STREAM_WAIT=0: not waiting for the invalidation stream (state '$state', cache enabled: $enabled)"
        return 0
    fi
    say "waiting for the cached pgway's invalidation stream for '$DB' to be 'following' (GET /cache)"
    while :; do
        # pgway starts a database's stream at its first cacheable read.
        app_psql "$CACHE_PORT" -c "SELECT id, name, grp FROM $TABLE WHERE id = 1" >/dev/null 2>&1 || true
        read -r state enabled <<<"$(stream_state)"
        [[ $state == following ]] && break
        if ((SECONDS >= deadline)); then
            echo "cache: GET http://127.0.0.1:$CACHE_ADMIN_PORT/cache answers:" >&2
            cache_json "$CACHE_ADMIN_PORT" >&2 || echo "(no answer)" >&2
            echo >&2
            tail -n 10 "$LOGS/pgway-cache.log" >&2 || true
            die "$STREAM_WAIT s after the start the stream for '$DB' is '$state' (cache enabled: $enabled), not 'following'"
        fi
        sleep 0.5
    done
    [[ $enabled == true ]] || die "GET /cache says the cache is not enabled ($enabled)"
    say "stream for '$DB': following"
}

# ---------------------------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------------------------

target_port() {
    case $1 in
    direct) echo "$REPLICA_PORT" ;;
    plain) echo "$PLAIN_PORT" ;;
    cache) echo "$CACHE_PORT" ;;
    esac
}

# pgbench_run LOG PORT MODE SECONDS: runs the script; sets RUN_TPS and RUN_STATUS (ok, or why not).
pgbench_run() {
    local log=$1 port=$2 mode=$3 secs=$4 rc=0 failed err
    PGPASSWORD=$APP_PASSWORD PGCONNECT_TIMEOUT=10 timeout --kill-after=10 $((secs + 60)) \
        "$PG_BIN/pgbench" -n -M "$mode" -c "$CLIENTS" -j "$THREADS" -T "$secs" -f "$WORK/select.sql" \
        -h 127.0.0.1 -p "$port" -U "$APP_USER" "$DB" >"$log" 2>&1 || rc=$?
    RUN_TPS=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' "$log" | head -n 1)
    failed=$(sed -nE 's/^number of failed transactions: ([0-9]+).*/\1/p' "$log" | head -n 1)
    RUN_STATUS=ok
    if ((rc != 0)) || [[ -z $RUN_TPS || ${failed:-1} != 0 ]]; then
        err=$(grep -m 1 -E 'error|ERROR|FATAL|abort' "$log" | cut -c 1-200 || true)
        RUN_STATUS="pgbench exit $rc, ${failed:-?} failed transactions${err:+: $err}"
        RUN_TPS=
    fi
}

run_throughput() {
    cat >"$WORK/select.sql" <<EOF
\\set id random(1, 100)
SELECT id, name, grp FROM $TABLE WHERE id = :id;
EOF
    printf 'round\tmode\ttarget\ttps\thits\tmisses\tbypassed\tstatus\n' >"$LOGS/results.tsv"
    local targets=(direct plain cache) round mode i k tg h0 m0 b0 h1 m1 b1 hits misses bypassed
    if ((WARMUP > 0)); then
        for tg in "${targets[@]}"; do
            say "warm-up: $tg, ${WARMUP} s (not reported)"
            pgbench_run "$LOGS/warm-up-$tg.log" "$(target_port "$tg")" extended "$WARMUP"
            [[ $RUN_STATUS == ok ]] || warn "warm-up of $tg: $RUN_STATUS"
        done
    fi
    for ((round = 1; round <= ROUNDS; round++)); do
        for mode in $MODES; do
            for ((i = 0; i < 3; i++)); do
                k=$(((i + round - 1) % 3))
                tg=${targets[$k]}
                hits=-
                misses=-
                bypassed=-
                [[ $tg == cache ]] && read -r h0 m0 _ _ b0 <<<"$(cache_counters)"
                pgbench_run "$LOGS/r$round-$mode-$tg.log" "$(target_port "$tg")" "$mode" "$DURATION"
                if [[ $tg == cache ]]; then
                    read -r h1 m1 _ _ b1 <<<"$(cache_counters)"
                    hits=$((h1 - h0))
                    misses=$((m1 - m0))
                    bypassed=$((b1 - b0))
                fi
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$tg" "${RUN_TPS:--}" "$hits" "$misses" \
                    "$bypassed" "$RUN_STATUS" >>"$LOGS/results.tsv"
                printf 'cache: round %s  -M %-8s %-7s tps %10s  %s\n' "$round" "$mode" "$tg" "${RUN_TPS:--}" \
                    "$([[ $tg == cache ]] && echo "hits $hits misses $misses bypassed $bypassed ")$([[ $RUN_STATUS == ok ]] || echo "FAILED: $RUN_STATUS")"
            done
        done
    done
}

# ---------------------------------------------------------------------------------------------
# Invalidation delay
# ---------------------------------------------------------------------------------------------

# A long-lived psql fed through a fifo; ask() sends a statement and reads its first line.
open_session() { # name, port
    local name=$1 port=$2 fd_in fd_out
    mkfifo "$WORK/$name.in" "$WORK/$name.out"
    (
        # Not the other sessions' fifos: each psql must see its own input's end when closed.
        for fd_in in "${S_IN[@]}" "${S_OUT[@]}"; do exec {fd_in}>&-; done
        PGPASSWORD=$APP_PASSWORD PGCONNECT_TIMEOUT=5 exec "$PG_BIN/psql" -X -A -t -q -h 127.0.0.1 \
            -p "$port" -U "$APP_USER" -d "$DB" <"$WORK/$name.in" >"$WORK/$name.out" 2>&1 9>&-
    ) &
    S_PID[$name]=$!
    exec {fd_in}>"$WORK/$name.in"
    exec {fd_out}<"$WORK/$name.out"
    S_IN[$name]=$fd_in
    S_OUT[$name]=$fd_out
    if ! { ask "$name" 'select 1' && [[ $REPLY_LINE == 1 ]]; }; then
        die "a psql session to port $port did not answer: ${REPLY_LINE:-no answer}"
    fi
}

close_session() {
    local name=$1 fd_in fd_out
    [[ -n ${S_PID[$name]:-} ]] || return 0
    fd_in=${S_IN[$name]}
    fd_out=${S_OUT[$name]}
    exec {fd_in}>&- {fd_out}<&-
    wait "${S_PID[$name]}" 2>/dev/null || true
    unset "S_PID[$name]" "S_IN[$name]" "S_OUT[$name]"
    rm -f "$WORK/$name.in" "$WORK/$name.out"
}

# Sends one statement, then reads to a marker; REPLY_LINE: the statement's first line of output
# (its value, or psql's error). Fails on no answer within 5 s.
ask_send() {
    local fd=${S_IN[$1]}
    { printf '%s;\n\\echo __end__\n' "$2" >&"$fd"; } 2>/dev/null
}
ask_read() {
    local line first='' got=0
    while IFS= read -r -t 5 line <&"${S_OUT[$1]}"; do
        if [[ $line == __end__ ]]; then
            REPLY_LINE=$first
            return 0
        fi
        if ((got == 0)); then
            first=$line
            got=1
        fi
    done
    REPLY_LINE="no answer${first:+ ($first)}"
    return 1
}
ask() { ask_send "$@" && ask_read "$1"; }

READ_SQL="SELECT name FROM $TABLE WHERE id = 1"

# Reads the row through the cached pgway twice on session R; 0 if the second read was a
# cache hit (GET /cache's hits went up).
cache_row() { # expected value
    local h0 h1
    ask R "$READ_SQL" || return 1
    read -r h0 _ <<<"$(cache_counters)"
    ask R "$READ_SQL" || return 1
    read -r h1 _ <<<"$(cache_counters)"
    [[ $REPLY_LINE == "$1" ]] || warn "before a write the cached pgway read '$REPLY_LINE', expected '$1'"
    ((h1 > h0))
}

# Stats of a file of microsecond figures: "count median max" in ms (or "0 - -").
stats_ms() {
    sort -n "$1" | awk '{ a[NR] = $1 } END {
        if (NR == 0) { print "0 - -"; exit }
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "%d %.2f %.2f\n", NR, m / 1000, a[NR] / 1000 }'
}

# through pgway: the writer W and the readers are all connections to the cached pgway; each
# trial's first read after the UPDATE is on a connection opened for the trial that has not
# read before.
trials_through_pgway() {
    local i new t_ack t polls never=0 stale=0 uncached=0 old poll_us=0 npolls=0 cached
    : >"$LOGS/delay-pgway.us"
    printf 'write\ttrial\tcached_before\tpolls\tpgway_us\treplica_us\n' >"$LOGS/trials.tsv"
    old=$(app_psql "$PRIMARY_PORT" -c "$READ_SQL")
    for ((i = 1; i <= TRIALS; i++)); do
        cached=yes
        cache_row "$old" || {
            uncached=$((uncached + 1))
            cached=no
        }
        open_session N "$CACHE_PORT"
        new="pgway-$i-$RANDOM"
        if ! { ask W "UPDATE $TABLE SET name = '$new' WHERE id = 1 RETURNING name" && [[ $REPLY_LINE == "$new" ]]; }; then
            die "the UPDATE through pgway failed: $REPLY_LINE"
        fi
        now_us
        t_ack=$NOW_US
        polls=0
        while :; do
            ask N "$READ_SQL" || die "a read through pgway failed: $REPLY_LINE"
            now_us
            t=$NOW_US
            polls=$((polls + 1))
            [[ $REPLY_LINE == "$new" ]] && break
            if ((t - t_ack > POLL_TIMEOUT * 1000000)); then
                never=$((never + 1))
                break
            fi
        done
        close_session N
        ((polls > 1)) && stale=$((stale + polls - 1))
        if [[ $REPLY_LINE == "$new" ]]; then
            echo $((t - t_ack)) >>"$LOGS/delay-pgway.us"
            poll_us=$((poll_us + (t - t_ack)))
            npolls=$((npolls + polls))
        fi
        printf 'pgway\t%s\t%s\t%s\t%s\t-\n' "$i" "$cached" "$polls" \
            "$([[ $REPLY_LINE == "$new" ]] && echo $((t - t_ack)) || echo never)" >>"$LOGS/trials.tsv"
        old=$new
    done
    D_PGWAY=$(stats_ms "$LOGS/delay-pgway.us")
    D_PGWAY_NEVER=$never
    D_PGWAY_STALE=$stale
    D_PGWAY_UNCACHED=$uncached
    D_PGWAY_POLL=$(awk -v u="$poll_us" -v n="$npolls" 'BEGIN { if (n == 0) print "-"; else printf "%.2f", u / n / 1000 }')
}

# on the primary: the writer P is a direct connection to the primary; R polls through the
# cached pgway and D polls the replica directly, in the same loop (both queries sent, then
# both answers read).
trials_on_primary() {
    local i new t_ack polls never=0 uncached=0 old seen_p seen_r poll_us=0 npolls=0 cached
    : >"$LOGS/delay-primary.us"
    : >"$LOGS/delay-replica.us"
    : >"$LOGS/delay-behind-replica.us"
    old=$(app_psql "$PRIMARY_PORT" -c "$READ_SQL")
    for ((i = 1; i <= TRIALS; i++)); do
        cached=yes
        cache_row "$old" || {
            uncached=$((uncached + 1))
            cached=no
        }
        new="primary-$i-$RANDOM"
        if ! { ask P "UPDATE $TABLE SET name = '$new' WHERE id = 1 RETURNING name" && [[ $REPLY_LINE == "$new" ]]; }; then
            die "the UPDATE on the primary failed: $REPLY_LINE"
        fi
        now_us
        t_ack=$NOW_US
        seen_p=
        seen_r=
        polls=0
        while [[ -z $seen_p || -z $seen_r ]]; do
            [[ -n $seen_p ]] || ask_send R "$READ_SQL" || die "pgway's psql session has gone"
            [[ -n $seen_r ]] || ask_send D "$READ_SQL" || die "the replica's psql session has gone"
            if [[ -z $seen_p ]]; then
                ask_read R || die "a read through pgway failed: $REPLY_LINE"
                now_us
                [[ $REPLY_LINE == "$new" ]] && seen_p=$((NOW_US - t_ack))
            fi
            if [[ -z $seen_r ]]; then
                ask_read D || die "a read on the replica failed: $REPLY_LINE"
                now_us
                [[ $REPLY_LINE == "$new" ]] && seen_r=$((NOW_US - t_ack))
            fi
            polls=$((polls + 1))
            ((NOW_US - t_ack <= POLL_TIMEOUT * 1000000)) || break
        done
        if [[ -n $seen_p ]]; then
            echo "$seen_p" >>"$LOGS/delay-primary.us"
            poll_us=$((poll_us + (NOW_US - t_ack)))
            npolls=$((npolls + polls))
        else
            never=$((never + 1))
        fi
        [[ -n $seen_r ]] && echo "$seen_r" >>"$LOGS/delay-replica.us"
        if [[ -n $seen_p && -n $seen_r ]]; then
            echo $((seen_p > seen_r ? seen_p - seen_r : 0)) >>"$LOGS/delay-behind-replica.us"
        fi
        printf 'primary\t%s\t%s\t%s\t%s\t%s\n' "$i" "$cached" "$polls" "${seen_p:-never}" "${seen_r:-never}" \
            >>"$LOGS/trials.tsv"
        old=$new
        # The row as pgway serves it next trial: the new value, or (never seen) the old one.
        [[ -n $seen_p ]] || old=$(app_psql "$CACHE_PORT" -c "$READ_SQL")
    done
    D_PRIMARY=$(stats_ms "$LOGS/delay-primary.us")
    D_REPLICA=$(stats_ms "$LOGS/delay-replica.us")
    D_BEHIND=$(stats_ms "$LOGS/delay-behind-replica.us")
    D_PRIMARY_NEVER=$never
    D_PRIMARY_UNCACHED=$uncached
    D_PRIMARY_POLL=$(awk -v u="$poll_us" -v n="$npolls" 'BEGIN { if (n == 0) print "-"; else printf "%.2f", u / n / 1000 }')
}

run_invalidation() {
    say "invalidation delay: $TRIALS trials through pgway, $TRIALS on the primary (poll timeout ${POLL_TIMEOUT} s)"
    open_session R "$CACHE_PORT"
    open_session W "$CACHE_PORT"
    open_session P "$PRIMARY_PORT"
    open_session D "$REPLICA_PORT"
    trials_through_pgway
    trials_on_primary
    close_session R
    close_session W
    close_session P
    close_session D
    read -r _ _ CACHE_ENTRIES CACHE_INVALIDATIONS _ <<<"$(cache_counters)"
}

# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

median_tps() { # mode, target
    awk -F '\t' -v m="$1" -v t="$2" 'NR > 1 && $2 == m && $3 == t && $4 != "-" { print $4 }' "$LOGS/results.tsv" |
        sort -n | awk '{ a[NR] = $1 } END {
            if (NR == 0) { print "-"; exit }
            printf "%.0f\n", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
sum_col() { # mode, column (5 hits, 6 misses, 7 bypassed) of the cache runs
    awk -F '\t' -v m="$1" -v c="$2" 'NR > 1 && $2 == m && $3 == "cache" && $c != "-" { s += $c } END { print s + 0 }' "$LOGS/results.tsv"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2fx", a / b }'; }

delay_row() { # label, "count median max", never, stale-or-dash, uncached, poll ms
    local n med max
    read -r n med max <<<"$2"
    echo "| $1 | $n of $TRIALS | $med | $max | $3 | $4 | $5 | $6 |"
}

write_report() {
    local cmd="" v val mode d p c hits misses bypassed met=yes failures
    for v in DURATION CLIENTS THREADS ROUNDS MODES WARMUP TRIALS POLL_TIMEOUT STREAM_WAIT PGWAY_BENCH_DIR; do
        if val=$(printenv "$v"); then
            if [[ $val == *" "* ]]; then cmd+="$v=\"$val\" "; else cmd+="$v=$val "; fi
        fi
    done
    cmd+="benches/cache.sh"
    {
        echo "# Result cache"
        echo
        echo "Made by \`$cmd\` ($(date -u +%Y-%m-%d), $(nproc) cores, ${DURATION} s per run, $CLIENTS clients, \`-j $THREADS\`, $ROUNDS round(s), pgway $REV;"
        echo "load average at the start $LOADAVG_START, at the end $(cut -d ' ' -f 1-3 /proc/loadavg))."
        echo "compare.sh's primary and streaming replica (asynchronous; primary: $PRIMARY_SETTINGS), pgbench and"
        echo "pgway all on this machine. Two pgways with compare.sh's config (pool of $(sed -nE 's/^size = ([0-9]+).*/\1/p' "$LOGS/pgway-cache.toml" | head -n 1) per node), one with"
        echo "\`[cache] enabled = true\` and \`[[cache.rules]] tables = [\"public.$TABLE\"], ttl = \"3h\"\`,"
        echo "its invalidation stream (logical decoding on the primary, role \`$WAL_USER\`) \`following\` before any run."
        if [[ -n $STREAM_NOTE ]]; then
            echo
            echo "$STREAM_NOTE"
        fi
        echo
        echo "## Throughput"
        echo
        echo "The pgbench script, over \`$TABLE\` (100 rows, primary key \`id\`; 100 distinct keys):"
        echo
        echo '```'
        cat "$WORK/select.sql"
        echo '```'
        echo
        echo "| protocol | direct (replica) tps | pgway, no cache tps | pgway, cache tps | cache / direct | cache / no cache | cache hits |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        for mode in $MODES; do
            d=$(median_tps "$mode" direct)
            p=$(median_tps "$mode" plain)
            c=$(median_tps "$mode" cache)
            hits=$(sum_col "$mode" 5)
            misses=$(sum_col "$mode" 6)
            bypassed=$(sum_col "$mode" 7)
            echo "| \`-M $mode\` | $d | $p | $c | $(ratio "$c" "$d") | $(ratio "$c" "$p") | $(awk -v h="$hits" -v m="$misses" -v b="$bypassed" 'BEGIN { if (h + m + b == 0) print "none"; else printf "%.1f%%", 100 * h / (h + m + b) }') |"
            awk -v c="$c" -v d="$d" 'BEGIN { exit !(c != "-" && d != "-" && c >= 2 * d) }' || met=no
        done
        echo
        if [[ $met == yes ]]; then
            echo "Target (cache at least 2x direct PostgreSQL): **met** for every protocol."
        else
            echo "Target (cache at least 2x direct PostgreSQL): **not met** (see the ratios above)."
        fi
        echo "\"cache hits\": hits / (hits + misses + bypassed) of the cached pgway's \`GET /cache\` counters over its runs."
        failures=$(awk -F '\t' 'NR > 1 && $8 != "ok" { printf "- round %s, `-M %s`, %s: %s\n", $1, $2, $3, $8 }' "$LOGS/results.tsv")
        if [[ -n $failures ]]; then
            echo
            echo "**Failed runs** (not in the medians):"
            echo
            echo "$failures"
        fi
        echo
        echo "## Invalidation delay"
        echo
        echo "From the moment a write's COMMIT is acknowledged to the end of the first read through the cached"
        echo "pgway that returns the new value, for \`UPDATE $TABLE SET name = ... WHERE id = 1\`; before each"
        echo "write the row is read twice through that pgway (\"cached before\": the second read was a cache hit)."
        echo "Reads and writes go through long-lived psql sessions (fifos), timed with bash's \`\$EPOCHREALTIME\`:"
        echo "the figures include one read's round trip (\"poll\", the mean time of one poll, is the resolution)."
        echo
        echo "- **through pgway**: the UPDATE through the cached pgway (autocommit); the reads on a connection to it"
        echo "  opened for the trial, that has not read before (not the writer's). pgway drops the entry before it"
        echo "  acknowledges the commit, so the first read should show the write (\"stale reads\": reads that did"
        echo "  not, target 0). That first read is a miss, and under \`read_your_writes = \"user\"\` (the default) it"
        echo "  goes to the replica once the replica has replayed the write: the delay is that read's own time."
        echo "- **on the primary**: the UPDATE directly on the primary, which pgway learns of from the WAL; reads"
        echo "  through pgway polled until they show it. In the same loop the replica is polled directly: the"
        echo "  replica's own delay, and by how much pgway's came after it (a read that misses the cache goes to the"
        echo "  replica, so pgway cannot show the write before the replica has replayed it)."
        echo
        echo "| write | trials seen | median ms | max ms | never seen (${POLL_TIMEOUT} s) | stale reads | cached before | poll ms |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        delay_row "through pgway" "$D_PGWAY" "$D_PGWAY_NEVER" "$D_PGWAY_STALE" "$((TRIALS - D_PGWAY_UNCACHED)) of $TRIALS" "$D_PGWAY_POLL"
        delay_row "on the primary, read through pgway" "$D_PRIMARY" "$D_PRIMARY_NEVER" "-" "$((TRIALS - D_PRIMARY_UNCACHED)) of $TRIALS" "$D_PRIMARY_POLL"
        delay_row "on the primary, read on the replica directly" "$D_REPLICA" "-" "-" "-" "-"
        delay_row "pgway after the replica (on the primary)" "$D_BEHIND" "-" "-" "-" "-"
        echo
        local later
        later=$(awk '$1 > 0' "$LOGS/delay-behind-replica.us" | wc -l)
        echo "In $later of $(wc -l <"$LOGS/delay-behind-replica.us") trials on the primary a read through pgway returned the old row at a poll"
        echo "after the one where the replica, read directly, returned the new one (\"pgway after the replica\" > 0)."
        echo
        echo "At the end the cached pgway held $CACHE_ENTRIES entries and had counted $CACHE_INVALIDATIONS invalidations."
        echo "Raw logs: \`${LOGS#"$REPO"/}\` (pgbench logs, results.tsv, trials.tsv and the delays in µs, the pgway configs and logs)."
    } >"$OUT_MD"
}

# ---------------------------------------------------------------------------------------------

LOADAVG_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
# The checkout as the run starts (the binary is the one built last; compare.sh builds it first).
REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || REV+=" with uncommitted changes in src/"
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.tsv "$LOGS"/*.us "$LOGS"/*.toml
setup_primary
write_configs
start_pgway plain "$PLAIN_PORT" "$PLAIN_ADMIN_PORT"
start_pgway cache "$CACHE_PORT" "$CACHE_ADMIN_PORT"
wait_following
run_throughput
run_invalidation
for pid in "${PGWAY_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || warn "a pgway (pid $pid) exited during the run; see $LOGS/pgway-*.log"
done
grep -hE '(WARN|ERROR)' "$LOGS"/pgway-*.log >"$LOGS/pgway-problems.log" 2>/dev/null || true
[[ -s $LOGS/pgway-problems.log ]] && warn "pgway logged $(wc -l <"$LOGS/pgway-problems.log") warnings/errors; see $LOGS/pgway-problems.log"
write_report
say "wrote $OUT_MD"
cat "$OUT_MD"
