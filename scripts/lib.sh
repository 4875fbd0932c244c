# Shell helpers shared by scripts/dev-cluster.sh, scripts/patroni-cluster.sh, the bench
# scripts under benches/ (sourced, not run).

is_root() { [[ $(id -u) -eq 0 ]]; }

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
