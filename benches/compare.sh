#!/usr/bin/env bash
# Load comparison: pgway against HAProxy (two ports), pgbouncer (transaction mode) and direct
# PostgreSQL, with pgbench, on one machine, in interleaved rounds; and pgway (read-your-writes
# on, the default) against a second pgway with read_your_writes = "off". Writes
# benches/RESULTS.md, benches/results.png and (full runs only) the results block of README.md.
# Around each run through a gateway it also reads the gateway process's user and system CPU
# time (/proc/PID/stat), reported per transaction.
#
#   benches/compare.sh            install what is missing, build pgway (profile-guided, see
#                                 scripts/build-pgo.sh; PGO=0 for a plain release), set up or
#                                 reuse a primary + streaming replica, start HAProxy, pgbouncer
#                                 and the two pgways, run the rounds, write the results, stop
#                                 them (the PostgreSQL pair keeps running for the next run)
#   benches/compare.sh status     show the PostgreSQL pair's state
#   benches/compare.sh stop       stop the PostgreSQL pair (and any helper left running)
#   benches/compare.sh destroy    stop it and delete its data
#
# Knobs (environment):
#   ROUNDS=3          rounds; every scenario runs once per target per round, targets rotated
#   DURATION=10       seconds per pgbench run (-T)
#   CLIENT_CONNS=5000 idle client connections for the memory measurement (0 skips it)
#   SCALE=10          pgbench scale (the tables are re-initialised when it changes)
#   ROUTE_BENCH=1     also run `cargo bench --bench route` (the cached route decision); 0 skips
#   RYW_BENCH=1       also run benches/read-your-writes.sh (each read-your-writes scope under
#                     a write-then-read load; writes benches/READ_YOUR_WRITES.md); 0 skips
#   CACHE_BENCH=1     also run benches/cache.sh (the result cache: select-only throughput at
#                     32 clients direct / pgway / pgway with the cache, and the invalidation
#                     delay; writes benches/CACHE.md); 0 skips
#   PGO=1             measure the profile-guided build of scripts/build-pgo.sh
#                     (target/pgo/release/pgway); 0: the plain `cargo build --release`
#   PGWAY_BENCH_DIR   where the servers, configs and logs live (default: ./.bench, or
#                     /tmp/pgway-bench when the postgres user cannot use ./.bench)
# Quick check of the harness:  ROUNDS=1 DURATION=3 CLIENT_CONNS=500 benches/compare.sh
#
# Ports (loopback): primary 5461, replica 5462, pgway 6462 (admin 9962), pgway with
# read_your_writes = "off" 6464 (admin 9964), pgbouncer 6463, HAProxy 5432 (writes) + 5433
# (reads), or 15432 + 15433 when 5432/5433 are taken.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
HERE=$REPO/benches/compare
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
PY=/usr/bin/python3 # Debian's, where python3-psycopg2 is installed

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENT_CONNS=${CLIENT_CONNS:-5000}
SCALE=${SCALE:-10}
ROUTE_BENCH=${ROUTE_BENCH:-1}
RYW_BENCH=${RYW_BENCH:-1}
CACHE_BENCH=${CACHE_BENCH:-1}
PGO=${PGO:-1}

PRIMARY_PORT=5461
REPLICA_PORT=5462
PGWAY_PORT=6462
PGWAY_ADMIN_PORT=9962
PGWAY_RYWOFF_PORT=6464 # the second pgway: the same config with [routing] read_your_writes = "off"
PGWAY_RYWOFF_ADMIN_PORT=9964
PGBOUNCER_PORT=6463
HAPROXY_WRITE_PORT= # chosen at start: 5432/5433 if free, else 15432/15433
HAPROXY_READ_PORT=

DB=bench
APP_USER=app
APP_PASSWORD=app-secret
POOL_SIZE=20

say() { echo "compare: $*"; }
warn() { echo "compare: WARNING: $*" >&2; }



for v in ROUNDS DURATION CLIENT_CONNS SCALE; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((ROUNDS >= 1)) || die "ROUNDS must be at least 1"
((DURATION >= 1)) || die "DURATION must be at least 1"
((SCALE >= 1)) || die "SCALE must be at least 1"

# ---------------------------------------------------------------------------------------------
# The directory, the PostgreSQL pair
# ---------------------------------------------------------------------------------------------

choose_dir() {
    BENCH_DIR=$(pg_work_dir "${PGWAY_BENCH_DIR:-$REPO/.bench}" "${PGWAY_BENCH_DIR:-/tmp/pgway-bench}")
    PRIMARY=$BENCH_DIR/primary
    REPLICA=$BENCH_DIR/replica
    RUN_DIR=$BENCH_DIR/run # this run's configs, logs, pidfiles and raw results
}

running() { [[ -f $1/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

start_server() { # data dir, log file
    if running "$1"; then
        say "$(basename "$1") already running (reused)"
        return
    fi
    say "starting $(basename "$1") (log: $2)"
    # 9>&-: the servers outlive this run and must not hold its lock.
    if ! as_pg "$PG_BIN/pg_ctl" -D "$1" -l "$2" -w -t 120 start >/dev/null 9>&-; then
        echo "compare: could not start $(basename "$1"); last lines of $2:" >&2
        tail -n 20 "$2" >&2 || true
        exit 1
    fi
}

stop_server() {
    if running "$1"; then
        say "stopping $(basename "$1")"
        as_pg "$PG_BIN/pg_ctl" -D "$1" -m fast -w -t 120 stop >/dev/null
    fi
}

admin_psql() { # port, then psql arguments
    local port=$1
    shift
    "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

app_psql() { # port, then psql arguments
    local port=$1
    shift
    PGPASSWORD=$APP_PASSWORD PGCONNECT_TIMEOUT=5 \
        "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U "$APP_USER" -d "$DB" "$@"
}

setup_primary() {
    if [[ ! -f $PRIMARY/PG_VERSION ]]; then
        rm -rf "$PRIMARY"
        say "initialising the primary in $PRIMARY"
        init_primary "$PRIMARY" benches/compare.sh
        # Unix sockets off: everything here goes over loopback TCP (and a deep checkout path
        # would overflow the socket path limit).
        as_pg tee -a "$PRIMARY/postgresql.conf" >/dev/null <<EOF

# benches/compare.sh
listen_addresses = '127.0.0.1'
port = $PRIMARY_PORT
unix_socket_directories = ''
max_connections = 300
shared_buffers = 256MB
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
wal_keep_size = 1GB
hot_standby = on
hot_standby_feedback = on
EOF
    fi
    start_server "$PRIMARY" "$BENCH_DIR/primary.log"
    # Idempotent: create what is missing, (re)set the password.
    admin_psql "$PRIMARY_PORT" -d postgres >/dev/null <<EOF
SELECT 'CREATE ROLE $APP_USER LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$APP_USER') \gexec
SET password_encryption = 'scram-sha-256';
ALTER ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD';
SELECT 'CREATE DATABASE $DB OWNER $APP_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB') \gexec
EOF
}

setup_replica() {
    if [[ ! -f $REPLICA/PG_VERSION ]]; then
        rm -rf "$REPLICA"
        say "cloning the replica into $REPLICA (pg_basebackup -R)"
        as_pg "$PG_BIN/pg_basebackup" -D "$REPLICA" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
            -R -X stream -c fast
        echo "port = $REPLICA_PORT" | as_pg tee -a "$REPLICA/postgresql.conf" >/dev/null
    fi
    start_server "$REPLICA" "$BENCH_DIR/replica.log"
    local deadline=$((SECONDS + 60))
    until [[ $(admin_psql "$REPLICA_PORT" -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null) == t ]]; do
        ((SECONDS < deadline)) || die "the replica on port $REPLICA_PORT is not in recovery after 60 s; see $BENCH_DIR/replica.log"
        sleep 0.5
    done
}

init_data() {
    local have
    have=$(admin_psql "$PRIMARY_PORT" -d "$DB" -c \
        "select case when to_regclass('pgbench_branches') is null then -1 else (select count(*) from pgbench_branches) end" 2>/dev/null || echo -1)
    if [[ $have == "$SCALE" ]]; then
        say "pgbench tables (scale $SCALE) already there (reused)"
    else
        say "pgbench -i -s $SCALE on the primary (found scale $have)"
        PGPASSWORD=$APP_PASSWORD "$PG_BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PRIMARY_PORT" \
            -U "$APP_USER" "$DB" >"$BENCH_DIR/pgbench-init.log" 2>&1 ||
            {
                tail -n 20 "$BENCH_DIR/pgbench-init.log" >&2
                die "pgbench -i failed (log: $BENCH_DIR/pgbench-init.log)"
            }
    fi
    # Wait for the replica to replay everything written so far.
    local lsn deadline=$((SECONDS + 300))
    lsn=$(admin_psql "$PRIMARY_PORT" -d postgres -c 'select pg_current_wal_lsn()')
    say "waiting for the replica to replay up to $lsn"
    until [[ $(admin_psql "$REPLICA_PORT" -d postgres -c \
        "select coalesce(pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn, false)" 2>/dev/null) == t ]]; do
        ((SECONDS < deadline)) || die "the replica has not replayed $lsn after 300 s; see $BENCH_DIR/replica.log"
        sleep 0.5
    done
    [[ $(app_psql "$REPLICA_PORT" -c 'select count(*) from pgbench_branches') == "$SCALE" ]] ||
        die "the replica does not have the pgbench tables at scale $SCALE"
}

# ---------------------------------------------------------------------------------------------
# Ports and processes
# ---------------------------------------------------------------------------------------------

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port, what, seconds, log
    local deadline=$((SECONDS + $3))
    until port_open "$1"; do
        if ((SECONDS >= deadline)); then
            echo "compare: $2 does not accept connections on 127.0.0.1:$1 after $3 s; last lines of $4:" >&2
            tail -n 20 "$4" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

require_free() { # port, what
    if port_open "$1"; then
        die "port 127.0.0.1:$1 (for $2) is already in use by another program: $(ss -ltnpH "sport = :$1" 2>/dev/null | sed -E 's/.*users:\(\((.*)\)\)/\1/' | head -1)"
    fi
}

# Stops the process in a pidfile if it is still the program we started (its name matches).
stop_pidfile() { # pidfile, expected comm, seconds to wait
    local pidfile=$1 comm=$2 wait=${3:-10} pid i
    [[ -f $pidfile ]] || return 0
    pid=$(head -n 1 "$pidfile" 2>/dev/null || true)
    rm -f "$pidfile"
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    [[ $(cat "/proc/$pid/comm" 2>/dev/null || true) == "$comm" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < wait * 10; i++)); do
        [[ -e /proc/$pid ]] || return 0
        sleep 0.1
    done
    warn "$comm (pid $pid) did not stop after ${wait}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

stop_helpers() {
    [[ -n ${RUN_DIR:-} ]] || return 0
    local stopped=0 spec pidfile comm wait
    for spec in "pgway.pid pgway 40" "pgway-rywoff.pid pgway 40" "pgbouncer.pid pgbouncer 10" \
        "haproxy.pid haproxy 10"; do
        read -r pidfile comm wait <<<"$spec"
        if [[ -f $RUN_DIR/$pidfile ]]; then
            stop_pidfile "$RUN_DIR/$pidfile" "$comm" "$wait"
            stopped=1
        fi
    done
    if ((stopped)); then say "stopped HAProxy, pgbouncer and the two pgways"; fi
}

choose_haproxy_ports() {
    if ! port_open 5432 && ! port_open 5433; then
        HAPROXY_WRITE_PORT=5432
        HAPROXY_READ_PORT=5433
    elif ! port_open 15432 && ! port_open 15433; then
        say "5432 or 5433 is taken; HAProxy uses 15432 (writes) and 15433 (reads)"
        HAPROXY_WRITE_PORT=15432
        HAPROXY_READ_PORT=15433
    else
        die "neither 5432+5433 nor 15432+15433 are free for HAProxy"
    fi
}

start_haproxy() {
    choose_haproxy_ports
    local cfg=$RUN_DIR/haproxy.cfg
    cat >"$cfg" <<EOF
# Generated by benches/compare.sh: the usual two-port setup (writes, reads), plain TCP checks
# for this static pair (with Patroni these would be 'option httpchk GET /primary' etc.).
global
    maxconn 4096
    pidfile $RUN_DIR/haproxy.pid

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout check 3s
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions

listen postgres_write
    bind 127.0.0.1:$HAPROXY_WRITE_PORT
    server primary 127.0.0.1:$PRIMARY_PORT check

listen postgres_read
    bind 127.0.0.1:$HAPROXY_READ_PORT
    server replica 127.0.0.1:$REPLICA_PORT check
EOF
    haproxy -c -q -f "$cfg" || die "haproxy rejected $cfg"
    say "starting HAProxy: writes 127.0.0.1:$HAPROXY_WRITE_PORT, reads 127.0.0.1:$HAPROXY_READ_PORT"
    haproxy -f "$cfg" -D -p "$RUN_DIR/haproxy.pid" >"$RUN_DIR/haproxy.log" 2>&1 9>&- ||
        {
            cat "$RUN_DIR/haproxy.log" >&2
            die "haproxy did not start"
        }
    wait_port "$HAPROXY_WRITE_PORT" HAProxy 15 "$RUN_DIR/haproxy.log"
    wait_port "$HAPROXY_READ_PORT" HAProxy 15 "$RUN_DIR/haproxy.log"
}

start_pgbouncer() {
    require_free "$PGBOUNCER_PORT" pgbouncer
    local dir=$RUN_DIR/pgbouncer
    mkdir -p "$dir"
    printf '"%s" "%s"\n' "$APP_USER" "$APP_PASSWORD" >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
; Generated by benches/compare.sh: transaction pooling in front of the replica (reads).
[databases]
$DB = host=127.0.0.1 port=$REPLICA_PORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 1000
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
    chmod 600 "$dir/userlist.txt"
    rm -f "$dir/pgbouncer.pid" # a stale one (pgbouncer killed) would be taken for the new one
    if is_root; then chown -R postgres:postgres "$dir"; fi
    say "starting pgbouncer on 127.0.0.1:$PGBOUNCER_PORT (transaction mode, pool $POOL_SIZE, -> replica)"
    # pgbouncer refuses to run as root; -d daemonises and writes the pidfile.
    as_pg /usr/sbin/pgbouncer -d -q "$dir/pgbouncer.ini" >"$dir/stdout.log" 2>&1 9>&- ||
        {
            cat "$dir/stdout.log" "$dir/pgbouncer.log" >&2 2>/dev/null || true
            die "pgbouncer did not start"
        }
    local deadline=$((SECONDS + 10))
    until [[ -s $dir/pgbouncer.pid ]]; do
        ((SECONDS < deadline)) || die "pgbouncer wrote no pidfile; see $dir/pgbouncer.log"
        sleep 0.1
    done
    cp "$dir/pgbouncer.pid" "$RUN_DIR/pgbouncer.pid"
    wait_port "$PGBOUNCER_PORT" pgbouncer 15 "$dir/pgbouncer.log"
}

# Writes $RUN_DIR/pgway.toml and $RUN_DIR/pgway-rywoff.toml: the same config but for the
# ports and, in the second, [routing] read_your_writes = "off" (the first keeps the default,
# "user").
write_pgway_configs() {
    local max_clients=10000
    ((CLIENT_CONNS + 1000 <= max_clients)) || max_clients=$((CLIENT_CONNS + 1000))
    cat >"$RUN_DIR/pgway.toml" <<EOF
# Generated by benches/compare.sh.
listen = "127.0.0.1:$PGWAY_PORT"
admin_listen = "127.0.0.1:$PGWAY_ADMIN_PORT"

[[users]]
name = "$APP_USER"
password = "$APP_PASSWORD"

[pool]
size = $POOL_SIZE
wait_timeout = "5s"

[client]
max_connections = $max_clients

[topology]
kind = "static"
nodes = ["127.0.0.1:$PRIMARY_PORT", "127.0.0.1:$REPLICA_PORT"]
health_interval = "1s"
EOF
    sed -E -e "s/^listen = .*/listen = \"127.0.0.1:$PGWAY_RYWOFF_PORT\"/" \
        -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$PGWAY_RYWOFF_ADMIN_PORT\"/" \
        "$RUN_DIR/pgway.toml" >"$RUN_DIR/pgway-rywoff.toml"
    printf '\n[routing]\nread_your_writes = "off"\n' >>"$RUN_DIR/pgway-rywoff.toml"
}

start_pgway() { # name (config, log and pidfile: $RUN_DIR/NAME.toml, .log, .pid), port, admin port
    local name=$1 port=$2 admin=$3 cfg=$RUN_DIR/$1.toml log=$RUN_DIR/$1.log
    "$PGWAY_BIN" check --config "$cfg" >/dev/null || die "pgway check rejected $cfg"
    say "starting $name on 127.0.0.1:$port (admin $admin, pool $POOL_SIZE; log: $log)"
    # In a session of its own, as HAProxy (-D) and pgbouncer (-d) put themselves and as a
    # service manager starts it: with the kernel's autogroups on (Debian's default), a
    # background job of this script shares one group's CPU share with the pgbench runs
    # started from here, where HAProxy and pgbouncer have a group each (benches/PROFILE.md,
    # twentieth round). setsid executes pgway in place (a background job leads no process
    # group), so $! is pgway's pid.
    NO_COLOR=1 setsid "$PGWAY_BIN" --config "$cfg" >"$log" 2>&1 9>&- &
    echo "$!" >"$RUN_DIR/$name.pid"
    wait_port "$port" "$name" 30 "$log"
    # Reads must really reach the replica: wait until pgway has found the roles.
    local deadline=$((SECONDS + 30))
    until [[ $(app_psql "$port" -c 'select pg_is_in_recovery()' 2>/dev/null) == t ]]; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$log" >&2 || true
            die "after 30 s a read through $name still does not reach the replica (log above: $log)"
        fi
        sleep 0.5
    done
    [[ $(app_psql "$port" -c begin -c 'select pg_is_in_recovery()' -c commit 2>/dev/null) == f ]] ||
        die "a transaction through $name does not reach the primary (log: $log)"
}

start_pgways() {
    require_free "$PGWAY_PORT" pgway
    require_free "$PGWAY_ADMIN_PORT" "pgway admin"
    require_free "$PGWAY_RYWOFF_PORT" pgway-rywoff
    require_free "$PGWAY_RYWOFF_ADMIN_PORT" "pgway-rywoff admin"
    write_pgway_configs
    start_pgway pgway "$PGWAY_PORT" "$PGWAY_ADMIN_PORT"
    PGWAY_PID=$(cat "$RUN_DIR/pgway.pid")
    start_pgway pgway-rywoff "$PGWAY_RYWOFF_PORT" "$PGWAY_RYWOFF_ADMIN_PORT"
    PGWAY_RYWOFF_PID=$(cat "$RUN_DIR/pgway-rywoff.pid")
}

restart_pgway() {
    say "restarting pgway after the memory measurement (its log so far: $RUN_DIR/pgway-memory.log)"
    stop_pidfile "$RUN_DIR/pgway.pid" pgway 40
    mv "$RUN_DIR/pgway.log" "$RUN_DIR/pgway-memory.log"
    start_pgway pgway "$PGWAY_PORT" "$PGWAY_ADMIN_PORT"
    PGWAY_PID=$(cat "$RUN_DIR/pgway.pid")
}

smoke_test() { # port, what, expected pg_is_in_recovery()
    local got
    got=$(app_psql "$1" -c 'select pg_is_in_recovery()' 2>&1) || die "a query through $2 (port $1) failed: $got"
    [[ $got == "$3" ]] || die "a query through $2 (port $1) answered pg_is_in_recovery() = $got, expected $3"
}

pgway_alive() { # pgway | pgway-rywoff
    local pid=${PGWAY_PID:-}
    if [[ $1 == pgway-rywoff ]]; then pid=${PGWAY_RYWOFF_PID:-}; fi
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

alive_at_end() { # pgway | pgway-rywoff: prints yes or no (and, for no, warns with its log's end)
    if pgway_alive "$1"; then
        echo yes
        return
    fi
    echo no
    warn "$1 exited during the run; last lines of $RUN_DIR/$1.log:"
    tail -n 20 "$RUN_DIR/$1.log" >&2 || true
}

# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

raise_nofile() {
    local need=$((CLIENT_CONNS + 2048))
    local soft hard
    soft=$(ulimit -Sn)
    hard=$(ulimit -Hn)
    [[ $soft == unlimited ]] && return 0
    ((soft >= need)) && return 0
    if [[ $hard != unlimited ]] && ((hard < need)); then
        ulimit -Hn "$need" 2>/dev/null || die "open-files limit is $hard, $need needed for CLIENT_CONNS=$CLIENT_CONNS (raise it, or lower CLIENT_CONNS)"
    fi
    ulimit -Sn "$need"
    say "raised the open-files limit to $need"
}

measure_memory() {
    if ((CLIENT_CONNS == 0)); then
        say "memory: skipped (CLIENT_CONNS=0)"
        return
    fi
    say "memory: opening $CLIENT_CONNS idle client connections to pgway (pid $PGWAY_PID)"
    local out=$RUN_DIR/memory.json
    if ! "$PY" "$HERE/idle_clients.py" --pid "$PGWAY_PID" --count "$CLIENT_CONNS" \
        --dsn "host=127.0.0.1 port=$PGWAY_PORT user=$APP_USER password=$APP_PASSWORD dbname=$DB" \
        >"$out" 2>"$RUN_DIR/memory.log"; then
        warn "the memory measurement failed; see $RUN_DIR/memory.log"
        tail -n 5 "$RUN_DIR/memory.log" >&2 || true
        echo '{"error": "idle_clients.py failed; see memory.log"}' >"$out"
        return
    fi
    say "memory: $(cat "$out")"
    pgway_alive pgway || warn "pgway is no longer running after the memory measurement (log: $RUN_DIR/pgway.log)"
}

# scenario -> pgbench options; target -> port
scenario_opts() {
    case $1 in
    s1) echo "-n -S -c 1 -j 1 -T $DURATION" ;;
    s32) echo "-n -S -c 32 -j 2 -T $DURATION" ;;
    tpcb) echo "-n -c 16 -j 2 -T $DURATION" ;;
    ext32) echo "-n -S -M extended -c 32 -j 2 -T $DURATION" ;;
    prep32) echo "-n -S -M prepared -c 32 -j 2 -T $DURATION" ;;
    esac
}
scenario_targets() {
    case $1 in
    s1 | s32) echo "haproxy pgbouncer pgway pgway-rywoff direct" ;;
    tpcb) echo "haproxy pgway direct" ;;
    ext32) echo "haproxy pgbouncer pgway direct" ;; # a Parse of the unnamed statement per query
    prep32) echo "haproxy pgway direct" ;; # pgbouncer 1.18: no prepared statements in transaction mode
    esac
}
target_port() { # scenario, target
    case $2 in
    haproxy) if [[ $1 == tpcb ]]; then echo "$HAPROXY_WRITE_PORT"; else echo "$HAPROXY_READ_PORT"; fi ;;
    pgbouncer) echo "$PGBOUNCER_PORT" ;;
    pgway) echo "$PGWAY_PORT" ;;
    pgway-rywoff) echo "$PGWAY_RYWOFF_PORT" ;;
    direct) if [[ $1 == tpcb ]]; then echo "$PRIMARY_PORT"; else echo "$REPLICA_PORT"; fi ;;
    esac
}
SCENARIOS="s1 s32 tpcb ext32 prep32"

pgbench_cmd() { # scenario, target (as it is run, less PGPASSWORD)
    echo "pgbench $(scenario_opts "$1") -h 127.0.0.1 -p $(target_port "$1" "$2") -U $APP_USER $DB"
}

gateway_pid() { # target: the gateway process's pid (none for direct)
    local file
    case $1 in
    haproxy) file=$RUN_DIR/haproxy.pid ;;
    pgbouncer) file=$RUN_DIR/pgbouncer/pgbouncer.pid ;;
    pgway | pgway-rywoff) file=$RUN_DIR/$1.pid ;;
    *) return 0 ;;
    esac
    head -n 1 "$file" 2>/dev/null || true
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
# pgbench's progress reports between which the gateways' CPU time is measured.
if ((DURATION >= 4)); then CPU_WINDOW=(2 $((DURATION - 1))); else CPU_WINDOW=(0 0); fi

run_one() { # round, scenario, target
    local round=$1 sc=$2 tg=$3 port log rc tps lat failed status note pid figures n du ds user= sys=
    port=$(target_port "$sc" "$tg")
    log=$RUN_DIR/runs/r$round-$sc-$tg.log
    printf 'compare: round %s  %-7s %-12s ' "$round" "$sc" "$tg"
    pid=$(gateway_pid "$tg")
    rc=0
    # The gateway's own CPU time per transaction (microseconds) from pgbench's second
    # progress report to its last but one, once every client has logged in: CPU_WINDOW
    # (steady_pgbench: scripts/lib.sh; none with DURATION below 4 s).
    # shellcheck disable=SC2046
    figures=$(PGPASSWORD=$APP_PASSWORD PGCONNECT_TIMEOUT=10 PGBENCH_TIMEOUT=$((DURATION + 60)) steady_pgbench "$pid" "${CPU_WINDOW[@]}" "$log" \
        $(scenario_opts "$sc") -h 127.0.0.1 -p "$port" -U "$APP_USER" "$DB") || rc=$?
    tps=$(sed -nE 's/^tps = ([0-9.]+) \(without initial connection time\).*/\1/p' "$log" | head -n 1)
    lat=$(sed -nE 's/^latency average = ([0-9.]+) ms.*/\1/p' "$log" | head -n 1)
    failed=$(sed -nE 's/^number of failed transactions: ([0-9]+).*/\1/p' "$log" | head -n 1)
    if [[ -n $pid && -n $figures ]]; then
        read -r n du ds _ <<<"$figures"
        if ((n > 0)); then
            read -r user sys < <(awk -v du="$du" -v ds="$ds" -v t="$TICK_US" -v n="$n" \
                'BEGIN {printf "%.2f %.2f\n", du * t / n, ds * t / n}')
        fi
    fi
    status=ok
    note=
    if ((rc != 0)); then
        status=FAIL
        if ((rc == 124 || rc == 137)); then note="pgbench timed out after $((DURATION + 60)) s"; else note="pgbench exit code $rc"; fi
    fi
    if [[ -z $failed ]]; then
        status=FAIL
        note="${note:+$note; }no 'number of failed transactions' line"
    elif ((failed != 0)); then
        status=FAIL
        note="${note:+$note; }$failed failed transactions"
    fi
    if [[ -z $tps || -z $lat ]]; then
        status=FAIL
        note="${note:+$note; }no tps/latency in the output"
    fi
    if [[ $status == FAIL ]]; then
        local err
        err=$(grep -m 1 -E 'error|ERROR|FATAL|abort' "$log" | tr '\t' ' ' | cut -c 1-300 || true)
        [[ -n $err ]] && note="$note: $err"
        if [[ $tg == pgway* ]] && ! pgway_alive "$tg"; then note="$note ($tg is no longer running)"; fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$sc" "$tg" "$port" "$rc" "${tps:-}" \
        "${lat:-}" "${failed:-}" "$status" "${note//$'\t'/ }" "$user" "$sys" >>"$RUN_DIR/results.tsv"
    if [[ $status == ok ]]; then
        printf 'tps %10s  latency %7s ms%s\n' "$tps" "$lat" "${user:+  cpu/tx user $user µs, system $sys µs}"
    else
        printf 'FAILED: %s (log: %s)\n' "$note" "$log"
    fi
}

run_rounds() {
    mkdir -p "$RUN_DIR/runs"
    printf 'round\tscenario\ttarget\tport\trc\ttps\tlatency_ms\tfailed_tx\tstatus\tnote\tuser_us_per_tx\tsys_us_per_tx\n' \
        >"$RUN_DIR/results.tsv"
    local round sc targets n i k tg
    for ((round = 1; round <= ROUNDS; round++)); do
        say "round $round of $ROUNDS"
        for sc in $SCENARIOS; do
            read -r -a targets <<<"$(scenario_targets "$sc")"
            n=${#targets[@]}
            # Rotate the order each round so that no target always runs first or last.
            for ((i = 0; i < n; i++)); do
                k=$(((i + round - 1) % n))
                tg=${targets[$k]}
                run_one "$round" "$sc" "$tg"
            done
        done
    done
}

route_bench() {
    if [[ $ROUTE_BENCH == 0 ]]; then
        say "route micro-benchmark: skipped (ROUTE_BENCH=0)"
        return
    fi
    say "route micro-benchmark: cargo bench --bench route -- --noplot cached (log: $RUN_DIR/route-bench.log)"
    # A target directory of its own: `cargo bench` builds the pgway binary too, with the
    # dev-dependencies' features (tokio's `process`, whose orphan reaping then runs on every
    # park), and would leave that build in target/release for the scripts that measure it.
    if ! (cd "$REPO" && cargo bench --target-dir "$REPO/target/route-bench" --bench route -- --noplot cached) \
        >"$RUN_DIR/route-bench.log" 2>&1; then
        warn "cargo bench --bench route failed; see $RUN_DIR/route-bench.log"
    fi
}

write_meta() {
    local cmd="" v
    for v in ROUNDS DURATION CLIENT_CONNS SCALE ROUTE_BENCH PGO PGWAY_BENCH_DIR; do
        if printenv "$v" >/dev/null; then cmd+="$v=$(printenv "$v") "; fi
    done
    cmd+="benches/compare.sh"
    {
        echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "nproc=$(nproc)"
        echo "cpu=$(sed -nE 's/^model name\s*:\s*//p' /proc/cpuinfo | head -n 1)"
        echo "mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
        echo "kernel=$(uname -r)"
        echo "loadavg_start=${LOADAVG_START:-}"
        echo "loadavg_end=$(cut -d ' ' -f 1-3 /proc/loadavg)"
        echo "command=$cmd"
        echo "rounds=$ROUNDS"
        echo "duration=$DURATION"
        echo "client_conns=$CLIENT_CONNS"
        echo "scale=$SCALE"
        echo "pool_size=$POOL_SIZE"
        echo "postgres=$("$PG_BIN/postgres" --version | sed -E 's/^postgres \(PostgreSQL\) //')"
        echo "haproxy=$(haproxy -v | head -n 1 | awk '{print $3}')"
        echo "pgbouncer=$(/usr/sbin/pgbouncer --version | head -n 1 | awk '{print $2}')"
        echo "pgway_build=$([[ $PGO == 1 ]] && echo "profile-guided (scripts/build-pgo.sh)" || echo "cargo build --release")"
        echo "pgway_rev=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$REPO" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (with uncommitted changes in src/)')"
        echo "primary_port=$PRIMARY_PORT"
        echo "replica_port=$REPLICA_PORT"
        echo "pgway_port=$PGWAY_PORT"
        echo "pgway_rywoff_port=$PGWAY_RYWOFF_PORT"
        echo "pgbouncer_port=$PGBOUNCER_PORT"
        echo "haproxy_write_port=$HAPROXY_WRITE_PORT"
        echo "haproxy_read_port=$HAPROXY_READ_PORT"
        echo "bench_dir=${BENCH_DIR#"$REPO"/}" # relative when inside the checkout
        echo "pgway_alive_end=${PGWAY_ALIVE_END:-unknown}"
        echo "pgway_rywoff_alive_end=${PGWAY_RYWOFF_ALIVE_END:-unknown}"
        for sc in $SCENARIOS; do
            echo "opts_$sc=$(scenario_opts "$sc")"
            for tg in $(scenario_targets "$sc"); do
                echo "cmd_${sc}_$tg=$(pgbench_cmd "$sc" "$tg")"
            done
        done
    } >"$RUN_DIR/meta.txt"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_helpers || true
    if ((rc != 0)); then echo "compare: stopped with an error (exit $rc); logs in ${RUN_DIR:-?}" >&2; fi
    exit "$rc"
}

run() {
    LOADAVG_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
    raise_nofile # first: fail before anything slow if the limit cannot be raised
    bash "$REPO/scripts/install-deps.sh"
    if [[ $PGO == 1 ]]; then
        say "building pgway (profile-guided: scripts/build-pgo.sh)"
        bash "$REPO/scripts/build-pgo.sh"
        PGWAY_BIN=$REPO/target/pgo/release/pgway
    else
        say "building pgway (cargo build --release)"
        (cd "$REPO" && cargo build --release)
        PGWAY_BIN=$REPO/target/release/pgway
    fi
    [[ -x $PGWAY_BIN ]] || die "$PGWAY_BIN is missing after the build"

    choose_dir
    mkdir -p "$RUN_DIR"
    exec 9>"$BENCH_DIR/lock"
    flock -n 9 || die "another benches/compare.sh is running (lock: $BENCH_DIR/lock)"
    stop_helpers # left over from a run that was killed
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    rm -rf "$RUN_DIR/runs" "$RUN_DIR/results.tsv" "$RUN_DIR/memory.json" "$RUN_DIR/route-bench.log" \
        "$RUN_DIR/pgway-memory.log"

    setup_primary
    setup_replica
    init_data
    say "primary 127.0.0.1:$PRIMARY_PORT, replica 127.0.0.1:$REPLICA_PORT, data in $BENCH_DIR"

    start_haproxy
    start_pgbouncer
    start_pgways
    smoke_test "$HAPROXY_WRITE_PORT" "HAProxy's write port" f
    smoke_test "$HAPROXY_READ_PORT" "HAProxy's read port" t
    smoke_test "$PGBOUNCER_PORT" pgbouncer t
    smoke_test "$PGWAY_PORT" pgway t
    smoke_test "$PGWAY_RYWOFF_PORT" "pgway (read_your_writes = \"off\")" t

    # On a fresh pgway, before the load runs, so that memory the allocator kept from them is
    # not reused by the idle clients and hidden.
    measure_memory
    # The memory measurement leaves pgway with the heap and tables of 5,000 clients that
    # came and went: the rounds start from a fresh pgway, as they do for the second one.
    if ((CLIENT_CONNS > 0)); then restart_pgway; fi
    run_rounds
    PGWAY_ALIVE_END=$(alive_at_end pgway)
    PGWAY_RYWOFF_ALIVE_END=$(alive_at_end pgway-rywoff)
    stop_helpers
    # Warnings and errors the pgways logged while they ran (the report lists the first few).
    cat "$RUN_DIR/pgway-memory.log" "$RUN_DIR/pgway.log" 2>/dev/null | grep -E '(WARN|ERROR)' \
        >"$RUN_DIR/pgway-problems.log" || true
    grep -E '(WARN|ERROR)' "$RUN_DIR/pgway-rywoff.log" >"$RUN_DIR/pgway-rywoff-problems.log" || true
    route_bench
    write_meta

    say "writing benches/RESULTS.md, benches/results.png and the results block of README.md"
    "$PY" "$HERE/report.py" --run-dir "$RUN_DIR" --markdown "$REPO/benches/RESULTS.md" \
        --png "$REPO/benches/results.png" --readme "$REPO/README.md"
    local nfail
    nfail=$(awk -F '\t' 'NR > 1 && $9 != "ok"' "$RUN_DIR/results.tsv" | wc -l)
    if ((nfail > 0)); then
        echo
        echo "compare: !!! $nfail pgbench run(s) FAILED; they are listed at the top of benches/RESULTS.md" >&2
        awk -F '\t' 'NR > 1 && $9 != "ok" {printf "compare: !!!   round %s %s via %s: %s\n", $1, $2, $3, $10}' \
            "$RUN_DIR/results.tsv" >&2
    fi
    if [[ $RYW_BENCH == 1 ]]; then
        say "read-your-writes scopes under load (benches/read-your-writes.sh)"
        DURATION=$DURATION PGWAY_BENCH_DIR=$BENCH_DIR bash "$REPO/benches/read-your-writes.sh" "$PGWAY_BIN" ||
            warn "benches/read-your-writes.sh failed"
    fi
    if [[ $CACHE_BENCH == 1 ]]; then
        say "the result cache (benches/cache.sh)"
        DURATION=$DURATION PGWAY_BENCH_DIR=$BENCH_DIR bash "$REPO/benches/cache.sh" "$PGWAY_BIN" ||
            warn "benches/cache.sh failed"
    fi
    say "done: benches/RESULTS.md, benches/results.png (raw logs in $RUN_DIR)"
}

case ${1:-run} in
run) run ;;
status)
    choose_dir
    for d in "$PRIMARY" "$REPLICA"; do
        if running "$d"; then say "$(basename "$d"): running ($d)"; else say "$(basename "$d"): stopped ($d)"; fi
    done
    ;;
stop)
    choose_dir
    stop_helpers
    stop_server "$REPLICA"
    stop_server "$PRIMARY"
    ;;
destroy)
    choose_dir
    stop_helpers
    stop_server "$REPLICA"
    stop_server "$PRIMARY"
    say "deleting $BENCH_DIR"
    rm -rf "$BENCH_DIR"
    ;;
-h | --help | help) sed -n '2,29p' "$0" ;;
*)
    echo "usage: $0 [run|status|stop|destroy]" >&2
    exit 2
    ;;
esac
