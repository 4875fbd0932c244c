# Shell helpers shared by scripts/dev-cluster.sh, scripts/patroni-cluster.sh, the bench
# scripts under benches/ (sourced, not run).

is_root() { [[ $(id -u) -eq 0 ]]; }

# Prints "SCRIPT: ERROR: MESSAGE" on stderr (SCRIPT: the running script's name without
# .sh) and exits 1.
die() {
    echo "$(basename "$0" .sh): ERROR: $*" >&2
    exit 1
}

# Starts the array PIDS (empty) and a temporary file OUT; when the script exits, the
# processes whose pids it has put in PIDS are killed and OUT is removed.
clean_up_on_exit() {
    PIDS=()
    OUT=$(mktemp)
    trap 'for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -f "$OUT"' EXIT
}

# Runs a command as the OS user that owns the servers, from a directory it can enter.
as_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

# pg_work_dir DIR FALLBACK: a directory the postgres user can write to, made and owned by it:
# DIR if that works (the repository may sit where postgres cannot go), else FALLBACK. Its
# contents are ignored by git. Prints the directory chosen; says why on stderr if it fell back.
pg_work_dir() {
    local dir=$1 fallback=$2
    mkdir -p "$dir"
    if is_root; then
        chown postgres:postgres "$dir"
    fi
    if ! as_pg test -w "$dir" -a -x "$dir"; then
        echo "the postgres user cannot use $dir; using $fallback" >&2
        rmdir "$dir" 2>/dev/null || true
        dir=$fallback
        mkdir -p "$dir"
        if is_root; then
            chown postgres:postgres "$dir"
        fi
    fi
    [[ -f $dir/.gitignore ]] || echo '*' >"$dir/.gitignore"
    printf '%s\n' "$dir"
}

# init_primary DATADIR WRITER: initdb as postgres (SCRAM for TCP logins, UTF8, C locale) and
# the pg_hba.conf these scripts share: trust for local sockets and for the postgres
# superuser and replication on loopback, SCRAM for everyone else on loopback.
init_primary() {
    local data=$1 writer=$2
    as_pg "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C >/dev/null
    as_pg tee "$data/pg_hba.conf" >/dev/null <<EOF
# written by $writer
local all         all                     trust
local replication all                     trust
host  replication postgres 127.0.0.1/32   trust
host  replication all      127.0.0.1/32   scram-sha-256
host  all         postgres 127.0.0.1/32   trust
host  all         all      127.0.0.1/32   scram-sha-256
EOF
}

# bench_pair_dir: the directory where benches/compare.sh left its primary, replica and
# run/ configs ($PGWAY_BENCH_DIR, else .bench in the repository, else /tmp/pgway-bench, the
# fallback compare.sh uses when the postgres user cannot write to the repository). Needs
# REPO. The scripts that reuse that setup (benches/*-per-statement.sh) call it.
bench_pair_dir() {
    local dir=${PGWAY_BENCH_DIR:-$REPO/.bench}
    [[ -d $dir/run ]] || dir=/tmp/pgway-bench
    printf '%s\n' "$dir"
}

# start_bench_pair DIR: starts the primary and replica compare.sh made in DIR (as postgres),
# each only if it is not running. Needs PG_BIN.
start_bench_pair() {
    local node
    for node in primary replica; do
        if ! as_pg "$PG_BIN/pg_ctl" -D "$1/$node" status >/dev/null 2>&1; then
            as_pg "$PG_BIN/pg_ctl" -D "$1/$node" -l "$1/$node.log" -w -t 120 start >/dev/null
        fi
    done
}

# server_cpu_ticks POSTMASTER_PID: CPU clock ticks of a PostgreSQL server so far, user and
# system: the postmaster with its reaped children (fields 14 to 17 of /proc/PID/stat; a
# backend's time reaches them once it has exited) and its live children.
server_cpu_ticks() {
    local ticks child
    ticks=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat")
    for child in $(pgrep -P "$1"); do
        ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$child/stat" 2>/dev/null || echo 0)))
    done
    echo "$ticks"
}

# cpu_ticks PID: a process's user and system CPU clock ticks so far, all its threads
# (fields 14 and 15 of /proc/PID/stat), as "USER SYSTEM"; nothing if it is gone.
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat" 2>/dev/null || true; }

# machine_ticks: the whole machine's busy CPU clock ticks so far (/proc/stat: user, nice,
# system, irq and softirq).
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# involuntary_switches PID: a process's involuntary context switches so far, all threads.
involuntary_switches() {
    cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^nonvoluntary_ctxt_switches/ {n += $2} END {print n + 0}'
}

# steady_pgbench PID FIRST LAST OUT PGBENCH_ARGS...: runs pgbench with PGBENCH_ARGS (which
# set -T to more than LAST seconds) and a progress report every second, and measures
# process PID over the seconds between its FIRST and its LAST report: the clients have
# logged in by then, so a gateway's cost per login is not in the figures. (A SCRAM login
# costs pgbouncer 1.18 about 4 ms of CPU, pgway about 0.3: over a 5-second run of 32
# clients, pgbouncer's logins alone add more than a microsecond to each statement.)
# pgbench's output goes to OUT; prints "STATEMENTS USER SYSTEM MACHINE INVOLUNTARY":
# the transactions pgbench completed in that span (its own counts, from the reports'
# timestamps and rates) and PID's user and system ticks, the machine's busy ticks and
# PID's involuntary context switches over the same span (the process figures are 0
# when PID is ""). Prints nothing if a report was missing; returns pgbench's exit status
# (124 or 137: it ran for more than PGBENCH_TIMEOUT seconds, default 600, and was stopped).
steady_pgbench() {
    local pid=$1 first=$2 last=$3 out=$4 k=0 line reports= rc u s m c
    local -a at=()
    shift 4
    _steady_sample() {
        u=0 s=0 c=0
        if [[ -n $pid ]]; then
            read -r u s < <(cpu_ticks "$pid")
            c=$(involuntary_switches "$pid")
        fi
        m=$(machine_ticks)
        at+=("$u" "$s" "$m" "$c")
    }
    : >"$out"
    while IFS= read -r line; do
        printf '%s\n' "$line" >>"$out"
        [[ $line == progress:* ]] || continue
        k=$((k + 1))
        if ((k == first || k == last)); then _steady_sample; fi
        if ((k >= first && k <= last)); then reports+="$line"$'\n'; fi
    done < <(timeout --kill-after=10 "${PGBENCH_TIMEOUT:-600}" "$PG_BIN/pgbench" -P 1 --progress-timestamp "$@" 2>&1 ||
        echo "pgbench-exit: $?")
    rc=$(sed -nE 's/^pgbench-exit: ([0-9]+)$/\1/p' "$out")
    if ((${#at[@]} == 8)); then
        # "progress: 1733470001.005 s, 15234.5 tps, ...": the rate over the second before then.
        awk -v du=$((at[4] - at[0])) -v ds=$((at[5] - at[1])) -v dm=$((at[6] - at[2])) -v dc=$((at[7] - at[3])) '
            { t = $2; r = $4; if (NR > 1) n += r * (t - prev); prev = t }
            END { printf "%.0f %d %d %d %d\n", n, du, ds, dm, dc }' <<<"$reports"
    fi
    return "${rc:-0}"
}

# start_bench_gateways RUN PGWAY_BIN PGWAY_CONFIG PGWAY_LOG: starts HAProxy, pgbouncer and
# pgway from the configs benches/compare.sh left in RUN, each in a session of its own:
# HAProxy (-D) and pgbouncer (-d) put themselves in one, pgway goes through setsid, which
# executes it in place (a background job leads no process group), so $! is its pid. With
# PGWAY_OWN_SESSION=0 pgway stays in the caller's session, as the bench scripts ran it
# before benches/PROFILE.md's twentieth round. Fills GATEWAY_PID and GATEWAY_PORT
# (haproxy: its read port; pgbouncer; pgway); the caller stops the pids. Needs as_pg's
# runuser; returns 1 with a message on stderr if a gateway did not start.
start_bench_gateways() {
    local run=$1 bin=$2 config=$3 log=$4 pgway
    declare -gA GATEWAY_PID=() GATEWAY_PORT=()
    # The configs name their own pidfiles (haproxy.cfg: $run/haproxy.pid; pgbouncer.ini:
    # $run/pgbouncer/pgbouncer.pid).
    rm -f "$run/haproxy.pid" "$run/pgbouncer/pgbouncer.pid"
    haproxy -f "$run/haproxy.cfg" -D >/dev/null 2>&1 || { echo "haproxy did not start" >&2 && return 1; }
    as_pg /usr/sbin/pgbouncer -d -q "$run/pgbouncer/pgbouncer.ini" ||
        { echo "pgbouncer did not start" >&2 && return 1; }
    if [[ ${PGWAY_OWN_SESSION:-1} == 0 ]]; then
        NO_COLOR=1 "$bin" --config "$config" >"$log" 2>&1 &
    else
        NO_COLOR=1 setsid "$bin" --config "$config" >"$log" 2>&1 &
    fi
    pgway=$!
    sleep 2
    [[ -s $run/haproxy.pid && -s $run/pgbouncer/pgbouncer.pid ]] ||
        { echo "no pidfile from haproxy or pgbouncer" >&2 && return 1; }
    GATEWAY_PID=(
        [pgway]=$pgway
        [haproxy]=$(head -n 1 "$run/haproxy.pid")
        [pgbouncer]=$(cat "$run/pgbouncer/pgbouncer.pid")
    )
    GATEWAY_PORT=(
        [pgway]=$(sed -nE 's/^listen = "[^:]+:([0-9]+)"/\1/p' "$config")
        [haproxy]=$(awk '/listen postgres_read/ {getline; split($2, a, ":"); print a[2]}' "$run/haproxy.cfg")
        [pgbouncer]=$(sed -nE 's/^listen_port = ([0-9]+)/\1/p' "$run/pgbouncer/pgbouncer.ini")
    )
}
