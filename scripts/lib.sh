# Shell helpers shared by scripts/dev-cluster.sh, scripts/patroni-cluster.sh and
# benches/compare.sh (sourced, not run).

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
