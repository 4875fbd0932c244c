#!/usr/bin/env bash
# How much of pgway's user time goes to atomic read-modify-write instructions: perf samples
# pgway's user time (`perf record -e cpu-clock:u`, no hardware counters needed) while
# `pgbench -n -S -c 32 -j 2` runs against it, and counts the samples that land on an
# atomic instruction (x86 `lock`-prefixed ones and `xchg` with memory) or on the
# instruction right after one, where a timer interrupt's sample lands after a slow
# instruction. Prints tps, user time per statement under perf, that share, and the sites
# with the most samples (address, samples, the function it was inlined into). A profile,
# not a benchmark: compare two builds one right after the other, by the share, which moves
# less than the time per statement does. benches/PROFILE.md (fortieth round) quotes it.
# `ATOMICS=1 benches/instructions-per-statement.sh` counts the same instructions exactly.
#
#   benches/perf-atomics.sh [PGWAY_BINARY]
#
# Run after benches/compare.sh (its config, port and PostgreSQL pair). PGWAY_BINARY
# defaults to target/release/pgway. Knobs: DURATION=8 (seconds sampled), CLIENTS=32,
# TOP=12 (sites listed).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
PG_BIN=${PGWAY_PG_BIN:-/usr/lib/postgresql/15/bin}
BENCH_DIR=$(bench_pair_dir)
RUN=$BENCH_DIR/run
BIN=$(realpath "${1:-$REPO/target/release/pgway}")
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-32}
TOP=${TOP:-12}

[[ -f $RUN/pgway.toml ]] || die "no pgway.toml in $RUN: run benches/compare.sh first"
[[ -x $BIN ]] || die "no pgway binary at $BIN: cargo build --release"
command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
command -v objdump >/dev/null || { apt-get update -qq && apt-get install -y -qq binutils >/dev/null; }

start_bench_pair "$BENCH_DIR"
PORT=$(sed -nE 's/^listen = "[^:]+:([0-9]+)"/\1/p' "$RUN/pgway.toml")
OUT=$(mktemp -d)
GW=
cleanup() {
    [[ -n $GW ]] && kill "$GW" 2>/dev/null
    rm -rf "$OUT"
}
trap cleanup EXIT

NO_COLOR=1 "$BIN" --config "$RUN/pgway.toml" >"$OUT/pgway.log" 2>&1 &
GW=$!
for _ in $(seq 1 100); do
    PGPASSWORD=app-secret psql -h 127.0.0.1 -p "$PORT" -U app -d bench -Atqc 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
done
PGPASSWORD=app-secret pgbench -n -S -c "$CLIENTS" -j 2 -T $((DURATION + 5)) -h 127.0.0.1 -p "$PORT" -U app bench \
    >"$OUT/pgbench.log" 2>&1 &
BENCH=$!
sleep 3
perf record -q -e cpu-clock:u -F 4999 -p "$GW" -o "$OUT/perf.data" -- sleep "$DURATION" 2>/dev/null
wait "$BENCH" || die "pgbench failed: $(tail -3 "$OUT/pgbench.log")"
TPS=$(sed -nE 's/^tps = ([0-9.]+) .*/\1/p' "$OUT/pgbench.log")

perf script -i "$OUT/perf.data" --show-mmap-events 2>/dev/null | grep 'PERF_RECORD_MMAP2' >"$OUT/maps" || true
perf script -i "$OUT/perf.data" -F ip 2>/dev/null >"$OUT/ips"
python3 - "$BIN" "$OUT" "$TPS" "$DURATION" "$TOP" <<'PYEOF'
import bisect, collections, re, subprocess, sys

binary, out, tps, duration, top = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])

def run(*args):
    return subprocess.run(args, capture_output=True, text=True).stdout

# Executable mappings of the binary and libc: start, size, file offset, path.
maps = []
for line in open(f"{out}/maps"):
    m = re.search(r"\[0x([0-9a-f]+)\(0x([0-9a-f]+)\) @ (0x[0-9a-f]+|0) .*\]: r-xp (\S+)", line)
    if m and (m.group(4) == binary or "/libc.so" in m.group(4)):
        maps.append((int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16), m.group(4)))

objects = {}
for _, _, _, path in maps:
    if path in objects:
        continue
    # File offset to address: the executable segment's difference.
    delta = 0
    for line in run("readelf", "-lW", path).splitlines():
        f = line.split()
        if f and f[0] == "LOAD" and " R E " in line:
            delta = int(f[2], 16) - int(f[1], 16)
    addresses, atomic = [], set()
    for line in run("objdump", "-d", "--no-show-raw-insn", path).splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S+)\s*(\S*)", line)
        if not m:
            continue
        address = int(m.group(1), 16)
        addresses.append(address)
        if m.group(2) == "lock" or (m.group(2).startswith("xchg") and "(" in m.group(3)):
            atomic.add(address)
    addresses.sort()
    objects[path] = (addresses, atomic, delta)

samples = on = after = 0
sites = collections.Counter()
for word in open(f"{out}/ips").read().split():
    ip = int(word, 16)
    samples += 1
    for start, size, offset, path in maps:
        if start <= ip < start + size:
            addresses, atomic, delta = objects[path]
            address = ip - start + offset + delta
            i = bisect.bisect_left(addresses, address)
            if i < len(addresses) and addresses[i] == address:
                if address in atomic:
                    on += 1
                    sites[(path, address)] += 1
                elif i > 0 and addresses[i - 1] in atomic:
                    after += 1
                    sites[(path, addresses[i - 1])] += 1
            break

statements = tps * duration
print(f"pgway: {tps:.0f} tps, {samples} user samples, {samples / 4999 * 1e6 / statements:.2f} µs of user time per statement under perf")
print(f"on an atomic instruction or right after one: {on + after} samples, {100 * (on + after) / max(samples, 1):.1f}%")
for (path, address), n in sites.most_common(top):
    where = "?"
    if path == binary:
        frames = run("addr2line", "-i", "-f", "-C", "-e", path, hex(address)).splitlines()[::2]
        own = [f for f in frames if f.startswith("pgway::") or "<pgway::" in f]
        where = (own or frames or ["?"])[0]
    print(f"  {n:5d}  {path.split('/')[-1]} {address:#x}  {where[:110]}")
PYEOF
