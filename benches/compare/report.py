#!/usr/bin/python3
"""Writes benches/RESULTS.md and benches/results.png from a benches/compare.sh run.

Input (in --run-dir): results.tsv (one line per pgbench run, with the gateway's user and
system CPU time per transaction where there is a gateway), meta.txt (key=value: machine,
command, ports, versions), memory.json (idle_clients.py's output; optional) and
route-bench.log (criterion's output; optional). The chart is drawn with gnuplot.
Standard library only.
"""

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys

SCENARIOS = [
    # key, title, metric ("lat": ms, lower is better; "tps": higher is better)
    ("s1", "`-S`, 1 client", "lat"),
    ("s32", "`-S`, 32 clients", "tps"),
    ("tpcb", "TPC-B, 16 clients", "tps"),
    # -M extended: Parse of the unnamed statement, Bind, Execute per query, as psycopg 3 and
    # pgjdbc below their prepare thresholds and node-postgres with parameters talk. No target.
    ("ext32", "`-S -M extended`, 32 clients", "tps"),
    ("prep32", "`-S -M prepared`, 32 clients", "tps"),
]
# pgway-rywoff: a second pgway, the same config with [routing] read_your_writes = "off"
# (pgway's default, and the first pgway's, is "user").
TARGET_ORDER = ["haproxy", "pgbouncer", "pgway", "pgway-rywoff", "direct"]
COLORS = {"haproxy": "#8c8c8c", "pgbouncer": "#e69f00", "pgway": "#0072b2",
          "pgway-rywoff": "#cc79a7", "direct": "#009e73"}
RYWOFF_LABEL = "pgway, read-your-writes off"
# Targets of issue #16.
S1_HAPROXY_TARGET = 0.95  # -S 1 client: pgway latency <= 0.95x HAProxy's read port (medians)
S32_PGBOUNCER_TARGET = 1.05  # -S 32 clients: pgway tps >= 1.05x pgbouncer's in the same round,
S32_PGBOUNCER_SHARE = (4, 5)  # in at least 4 of 5 rounds (ceil(4/5 of the rounds))
TPCB_HAPROXY_TARGET = 1.0  # TPC-B 16 clients: pgway >= 1.0x HAProxy's write port (medians)
PREP32_DIRECT_TARGET = 0.8  # -S -M prepared 32 clients: pgway >= 0.8x direct (medians)
RYW_S1_LAT_TARGET = 1.03  # read-your-writes on / off, median of the rounds' ratios: latency <=
RYW_S32_TPS_TARGET = 0.97  # ... and tps >= ("nothing measurable": within 3%)
MEMORY_TARGET_KIB = 16.0
ROUTE_TARGET_NS = 1000.0


def read_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                meta[k] = v
    return meta


def read_runs(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def target_label(meta, sc, tg, short=False):
    if tg == "haproxy":
        if sc == "tpcb":
            return "HAProxy write" if short else f"HAProxy write port (:{meta['haproxy_write_port']})"
        return "HAProxy read" if short else f"HAProxy read port (:{meta['haproxy_read_port']})"
    if tg == "pgbouncer":
        return "pgbouncer" if short else f"pgbouncer (:{meta['pgbouncer_port']}, transaction mode)"
    if tg == "pgway":
        return "pgway" if short else f"pgway (:{meta['pgway_port']})"
    if tg == "pgway-rywoff":
        return RYWOFF_LABEL if short else f"{RYWOFF_LABEL} (:{meta['pgway_rywoff_port']})"
    if sc == "tpcb":
        return "direct" if short else f"direct to the primary (:{meta['primary_port']})"
    return "direct" if short else f"direct to the replica (:{meta['replica_port']})"


def rounds_needed(n):
    """ceil(4/5 of n) for S32_PGBOUNCER_SHARE = (4, 5), in integers (4 of 5, 8 of 10, 3 of 3)."""
    a, b = S32_PGBOUNCER_SHARE
    return (a * n + b - 1) // b


def fmt_num(metric, v):
    if v is None:
        return "—"
    if metric == "lat":
        return f"{v:.3f} ms"
    return f"{v:,.0f} tps"


def parse_route(path):
    """criterion's middle estimate for route/*/cached, in ns."""
    if not os.path.exists(path):
        return None
    text = open(path, errors="replace").read()
    units = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}
    out = {}
    pat = re.compile(
        r"^(route/\S+/cached)\s*(?:\n\s*)?time:\s*\[\s*([\d.]+)\s*(\S+)\s+([\d.]+)\s*(\S+)\s+([\d.]+)\s*(\S+)\s*\]",
        re.M,
    )
    for m in pat.finditer(text):
        name, mid, unit = m.group(1), float(m.group(4)), m.group(5)
        if unit in units:
            out[name] = mid * units[unit]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--readme", help="README whose results block is replaced (full runs only)")
    args = ap.parse_args()

    meta = read_meta(os.path.join(args.run_dir, "meta.txt"))
    runs = read_runs(os.path.join(args.run_dir, "results.tsv"))
    rounds = int(meta["rounds"])
    duration = int(meta["duration"])

    memory = None
    mpath = os.path.join(args.run_dir, "memory.json")
    if os.path.exists(mpath):
        try:
            memory = json.load(open(mpath))
        except ValueError:
            memory = {"error": "memory.json is not valid JSON"}
    route = parse_route(os.path.join(args.run_dir, "route-bench.log"))

    # medians[(sc, tg)] = {"value": median or None, "ok": n, "n": n, "values": [...]}
    medians = {}
    for sc, _title, metric in SCENARIOS:
        for tg in TARGET_ORDER:
            rows = [r for r in runs if r["scenario"] == sc and r["target"] == tg]
            if not rows:
                continue
            rows.sort(key=lambda r: int(r["round"]))
            key = "latency_ms" if metric == "lat" else "tps"
            ok_vals = [float(r[key]) for r in rows if r["status"] == "ok"]
            medians[(sc, tg)] = {
                "value": statistics.median(ok_vals) if ok_vals else None,
                "ok": len(ok_vals),
                "n": len(rows),
                "rows": rows,
                "key": key,
            }

    def med(sc, tg):
        m = medians.get((sc, tg))
        return m["value"] if m else None

    def cpu_values(sc, tg, key):
        """The gateway's CPU µs per transaction (key: user_us_per_tx or sys_us_per_tx) in
        each ok run of (sc, tg) that measured it, by round."""
        m = medians.get((sc, tg))
        if not m:
            return []
        return [float(r[key]) for r in m["rows"] if r["status"] == "ok" and r.get(key)]

    def cpu_med(sc, tg, key):
        vals = cpu_values(sc, tg, key)
        return statistics.median(vals) if vals else None

    def all_ok(*cells):
        return all(medians.get(c) and medians[c]["ok"] == medians[c]["n"] for c in cells)

    def per_round(sc, tg, other):
        """[(round, tg's value / other's in the same round, or None, why)] over the rounds;
        a round where either run failed (or is missing) has None and says which."""
        a, b = medians.get((sc, tg)), medians.get((sc, other))
        if not a or not b:
            return []
        ra = {int(r["round"]): r for r in a["rows"]}
        rb = {int(r["round"]): r for r in b["rows"]}
        out = []
        for rnd in sorted(set(ra) | set(rb)):
            bad = [target_label(meta, sc, t, short=True) for t, rows in ((tg, ra), (other, rb))
                   if rnd not in rows or rows[rnd]["status"] != "ok"]
            if not bad and not float(rb[rnd][a["key"]]):
                bad = [target_label(meta, sc, other, short=True) + " (0)"]
            if bad:
                out.append((rnd, None, " and ".join(bad) + " failed"))
            else:
                out.append((rnd, float(ra[rnd][a["key"]]) / float(rb[rnd][a["key"]]), ""))
        return out

    def fmt_rounds(rs, digits):
        """'1.07x, 1.02x, round 3 left out (pgbouncer failed), ...'"""
        return ", ".join(f"{v:.{digits}f}x" if v is not None else f"round {rnd} left out ({why})"
                         for rnd, v, why in rs)

    def ratio_to_direct(sc, tg):
        """As the table shows it: latency ratio for s1 (lower is better), tps ratio otherwise."""
        v, d = med(sc, tg), med(sc, "direct")
        if v is None or not d:
            return None
        return v / d

    def speed_to_direct(sc, tg):
        """For the chart: higher is better everywhere (1-client: direct latency / latency)."""
        v, d = med(sc, tg), med(sc, "direct")
        if v is None or not d or not v:
            return None
        return d / v if sc == "s1" else v / d

    failures = [r for r in runs if r["status"] != "ok"]
    quick = rounds < 3 or duration < 10

    md = []
    md.append("# Load comparison: pgway vs HAProxy, pgbouncer and direct PostgreSQL")
    md.append("")
    md.append(f"Generated by `benches/compare.sh` on {meta['date']}.")
    md.append("")
    if failures:
        md.append(f"> **⚠ {len(failures)} pgbench run(s) FAILED** — their numbers are left out of "
                  "the medians (a cell shows how many runs of it succeeded):")
        md.append(">")
        for r in failures:
            md.append(f"> - round {r['round']}, {dict((s, t) for s, t, _ in SCENARIOS)[r['scenario']]} via "
                      f"{target_label(meta, r['scenario'], r['target'])}: {r['note']} "
                      f"(log: `{meta['bench_dir']}/run/runs/r{r['round']}-{r['scenario']}-{r['target']}.log`)")
        md.append("")
    if memory and (memory.get("error") or memory.get("failed") or memory.get("gateway_alive") is False):
        md.append("> **⚠ The idle-connection memory measurement had problems:** "
                  + (memory.get("error") or
                     f"{memory.get('failed', 0)} of {memory.get('requested')} connections failed "
                     f"({'; '.join(memory.get('first_errors', []))})"
                     + ("; pgway was no longer running" if memory.get("gateway_alive") is False else "")))
        md.append("")
    for name, what in (("pgway", "pgway"), ("pgway-rywoff", f"the second pgway ({RYWOFF_LABEL})")):
        if meta.get(f"{name.replace('-', '_')}_alive_end") == "no":
            md.append(f"> **⚠ {what} exited during the run** (log: `{meta['bench_dir']}/run/{name}.log`).")
            md.append("")
        problems = []
        ppath = os.path.join(args.run_dir, f"{name}-problems.log")
        if os.path.exists(ppath):
            problems = [line.rstrip("\n") for line in open(ppath, errors="replace") if line.strip()]
        if problems:
            md.append(f"> **⚠ {what} logged {len(problems)} warning/error line(s)** during the run "
                      f"(`{meta['bench_dir']}/run/{name}.log`); the first ones:")
            md.append(">")
            md.append("> ```")
            for line in problems[:5]:
                md.append(f"> {line[:300]}")
            md.append("> ```")
            md.append("")
    if quick:
        md.append(f"> **Quick run** ({rounds} round(s) of {duration} s): a check of the harness; the "
                  "numbers are not representative. The reference run is `benches/compare.sh` "
                  "(3 rounds of 10 s) on an otherwise idle machine.")
        md.append("")

    md.append("## Machine and command")
    md.append("")
    md.append(f"- Command: `{meta['command']}`")
    md.append(f"- Machine: {meta['nproc']} cores (`nproc`), {meta['cpu']}, {meta['mem']}, "
              f"Linux {meta['kernel']}; load average {meta['loadavg_start']} at the start, "
              f"{meta['loadavg_end']} at the end")
    md.append(f"- Versions: PostgreSQL {meta['postgres']}, HAProxy {meta['haproxy']}, "
              f"pgbouncer {meta['pgbouncer']}, pgway {meta['pgway_rev']} "
              f"({meta.get('pgway_build', 'cargo build --release')})")
    md.append(f"- Setup, all on loopback: primary :{meta['primary_port']} and streaming replica "
              f":{meta['replica_port']} (`pg_basebackup -R`; default settings except `shared_buffers = "
              f"256MB`, `max_connections = 300`, `hot_standby_feedback = on`), pgbench scale {meta['scale']}, user `app` logging in with SCRAM-SHA-256 "
              "everywhere;")
    md.append(f"  HAProxy 2-port setup, mode tcp, `check inter 3s fall 3 rise 2`: writes on "
              f":{meta['haproxy_write_port']} → primary, reads on :{meta['haproxy_read_port']} → replica;")
    md.append(f"  pgbouncer :{meta['pgbouncer_port']}, `pool_mode = transaction`, `default_pool_size = "
              f"{meta['pool_size']}`, → replica;")
    rywoff = "pgway_rywoff_port" in meta
    md.append(f"  pgway :{meta['pgway_port']}, static topology over both nodes, `pool.size = "
              f"{meta['pool_size']}` (reads outside transactions → replica, the rest → primary), "
              "read-your-writes on (`read_your_writes = \"user\"`, the default)"
              + (";" if rywoff else "."))
    if rywoff:
        md.append(f"  a second pgway :{meta['pgway_rywoff_port']}, the same config with `[routing] "
                  "read_your_writes = \"off\"` (\"pgway, read-your-writes off\"; in the `-S` "
                  "scenarios).")
    md.append(f"- {rounds} round(s); in each round every scenario runs once against each of its targets "
              f"(the order of targets rotates from round to round), `-T {duration}` per run. "
              "Medians over the rounds. Every run must exit 0 and report `number of failed "
              "transactions: 0`.")
    md.append("- pgbench runs (with `PGPASSWORD=app-secret`):")
    md.append("")
    md.append("```sh")
    for sc, _title, _metric in SCENARIOS:
        for tg in TARGET_ORDER:
            c = meta.get(f"cmd_{sc}_{tg}")
            if c:
                md.append(c)
    md.append("```")
    md.append("")

    md.append("## Results (medians)")
    md.append("")
    md.append("1-client rows give the average latency (lower is better) and its ratio to direct; the "
              "other rows give tps excluding connection time (higher is better) and its ratio to "
              "direct.")
    md.append("")
    results_at = len(md)
    md.append("| Scenario | Target | Median | vs direct | Runs ok | Every round |")
    md.append("| --- | --- | ---: | ---: | ---: | --- |")
    for sc, title, metric in SCENARIOS:
        for tg in TARGET_ORDER:
            m = medians.get((sc, tg))
            if not m:
                continue
            r = ratio_to_direct(sc, tg)
            each = []
            for row in m["rows"]:
                if row["status"] == "ok":
                    v = float(row[m["key"]])
                    each.append(f"{v:.3f}" if metric == "lat" else f"{v:,.0f}")
                else:
                    each.append("FAILED")
            okc = f"{m['ok']}/{m['n']}" + ("" if m["ok"] == m["n"] else " ⚠")
            md.append(f"| {title} | {target_label(meta, sc, tg)} | {fmt_num(metric, m['value'])} | "
                      f"{'—' if r is None else f'{r:.2f}x'} | {okc} | {', '.join(each)} |")
    results_table = md[results_at:]
    md.append("")

    # The gateways' own CPU time, from /proc/PID/stat in the middle of each run.
    if any(cpu_values(sc, tg, "user_us_per_tx") for sc, _t, _m in SCENARIOS for tg in TARGET_ORDER):
        md.append("## Gateway CPU per transaction (medians)")
        md.append("")
        md.append("Each gateway process's user and system CPU time (`/proc/PID/stat`, all "
                  "threads, 10 ms ticks) from pgbench's second progress report to its last but "
                  "one, divided by the transactions pgbench completed in that span (from its "
                  "reports); a transaction is one statement except in TPC-B (seven). The "
                  "clients have logged in by the second report, so logins are not in it (a "
                  "SCRAM login costs pgbouncer about 4 ms of CPU, pgway about 0.3 ms). The "
                  "servers' and pgbench's time is not in it.")
        md.append("")
        md.append("| Scenario | Target | user µs | system µs | user µs, every round |")
        md.append("| --- | --- | ---: | ---: | --- |")
        for sc, title, _metric in SCENARIOS:
            for tg in TARGET_ORDER:
                users = cpu_values(sc, tg, "user_us_per_tx")
                if not users:
                    continue
                sys_m = cpu_med(sc, tg, "sys_us_per_tx")
                md.append(f"| {title} | {target_label(meta, sc, tg)} | "
                          f"{statistics.median(users):.1f} | "
                          f"{'—' if sys_m is None else f'{sys_m:.1f}'} | "
                          f"{', '.join(f'{u:.1f}' for u in users)} |")
        md.append("")

    # Memory and route micro-benchmark.
    md.append("## Memory per idle client connection (pgway)")
    md.append("")
    per_conn = None
    if memory is None:
        md.append("Not measured (`CLIENT_CONNS=0`).")
    elif memory.get("error"):
        md.append(f"Measurement failed: {memory['error']}.")
    else:
        per_conn = memory.get("per_conn_kib")
        md.append(f"pgway's resident size (VmRSS) on a fresh pgway after one warm-up query: "
                  f"{memory.get('rss_before_kib', 0) / 1024:.1f} MiB; with "
                  f"{memory.get('opened')} idle clients logged in (of {memory.get('requested')} "
                  f"requested, opened in {memory.get('open_seconds')} s, psycopg2, SCRAM): "
                  f"{memory.get('rss_after_kib', 0) / 1024:.1f} MiB; after they closed: "
                  f"{memory.get('rss_after_close_kib', 0) / 1024:.1f} MiB. "
                  f"**{per_conn} KiB per idle client connection** "
                  f"((after − before) / {memory.get('opened')}). "
                  f"{memory.get('sample_queries_ok', 0)} of 10 sampled idle clients then ran a query. "
                  "pgway is then restarted, so the rounds run on a fresh pgway, as on the second "
                  "one.")
    md.append("")
    md.append("## Route decision (criterion)")
    md.append("")
    if route:
        md.append("`cargo bench --bench route -- --noplot cached`, criterion's middle estimate:")
        md.append("")
        for name, ns in sorted(route.items()):
            md.append(f"- `{name}`: {ns:.1f} ns")
    elif route is None:
        md.append("Not run (`ROUTE_BENCH=0`).")
    else:
        md.append("`cargo bench --bench route` printed no `route/*/cached` times (see "
                  f"`{meta['bench_dir']}/run/route-bench.log`).")
    md.append("")

    # Targets from the issue.
    md.append("## Targets (issue #16)")
    md.append("")
    targets_at = len(md)
    md.append("| Target | Measured | Result |")
    md.append("| --- | --- | --- |")

    def verdict(ok, cells):
        if ok is None:
            if any(medians.get(c) and medians[c]["ok"] == 0 for c in cells):
                return "**no result** (⚠ every run of a target failed)"
            return "not measured"
        s = "met" if ok else "**NOT met**"
        if not all_ok(*cells):
            s += " (⚠ some runs failed)"
        return s

    def round_verdict(ok, cells, rs):
        """verdict() for a target judged round by round: no round with both runs ok, no result."""
        if ok is None and rs and all(v is None for _, v, _ in rs):
            return "**no result** (⚠ no round where both runs succeeded)"
        return verdict(ok, cells)

    metric_of = {sc: metric for sc, _title, metric in SCENARIOS}

    def median_row(title, sc, other, other_name, limit):
        """A target on the medians: pgway within `limit` times `other` (at most, for
        latency; at least, for tps)."""
        metric = metric_of[sc]
        p, o = med(sc, "pgway"), med(sc, other)
        measured = "—"
        ok = None
        if p and o:
            measured = (f"pgway {fmt_num(metric, p)}, {other_name} {fmt_num(metric, o)} "
                        f"({p / o:.2f}x)")
            ok = p <= limit * o if metric == "lat" else p >= limit * o
        md.append(f"| {title} | {measured} | {verdict(ok, [(sc, 'pgway'), (sc, other)])} |")

    median_row(f"`-S` 1 client: pgway latency ≤ {S1_HAPROXY_TARGET}x HAProxy's read port (medians)",
               "s1", "haproxy", "HAProxy", S1_HAPROXY_TARGET)

    rs = per_round("s32", "pgway", "pgbouncer")
    judged = [v for _, v, _ in rs if v is not None]
    need = rounds_needed(len(judged))
    good = sum(v >= S32_PGBOUNCER_TARGET for v in judged)
    ok = None if not judged else good >= need
    measured = "—"
    if judged:
        measured = (f"tps ratio per round: {fmt_rounds(rs, 2)}; {good} of {len(judged)} "
                    + ("round" if len(judged) == 1 else "rounds")
                    + ("" if len(judged) == len(rs) else " judged")
                    + f" ≥ {S32_PGBOUNCER_TARGET}x (needed: {need})")
    md.append(f"| `-S` 32 clients: pgway ≥ {S32_PGBOUNCER_TARGET}x pgbouncer in at least "
              f"{rounds_needed(rounds)} of {rounds} round{'s' if rounds != 1 else ''} (tps in the same "
              f"round) | {measured} | "
              f"{round_verdict(ok, [('s32', 'pgway'), ('s32', 'pgbouncer')], rs)} |")

    median_row(f"TPC-B 16 clients: pgway ≥ {TPCB_HAPROXY_TARGET}x HAProxy's write port (medians)",
               "tpcb", "haproxy", "HAProxy", TPCB_HAPROXY_TARGET)
    median_row(f"`-S -M prepared` 32 clients: pgway ≥ {PREP32_DIRECT_TARGET}x direct (medians)",
               "prep32", "direct", "direct", PREP32_DIRECT_TARGET)

    pu, bu = cpu_med("s32", "pgway", "user_us_per_tx"), cpu_med("s32", "pgbouncer", "user_us_per_tx")
    cpu_ok = None if pu is None or bu is None else pu <= bu
    measured = "—" if cpu_ok is None else f"pgway {pu:.1f} µs, pgbouncer {bu:.1f} µs ({pu / bu:.2f}x)"
    md.append(f"| `-S` 32 clients: pgway's user CPU per statement ≤ pgbouncer's (medians; see "
              f"the CPU table above) | {measured} | "
              f"{verdict(cpu_ok, [('s32', 'pgway'), ('s32', 'pgbouncer')])} |")

    for sc, what, limit in (("s1", "latency on / off ≤", RYW_S1_LAT_TARGET),
                            ("s32", "tps on / off ≥", RYW_S32_TPS_TARGET)):
        rs = per_round(sc, "pgway", "pgway-rywoff")
        judged = [v for _, v, _ in rs if v is not None]
        m = statistics.median(judged) if judged else None
        ok = None if m is None else (m <= limit if sc == "s1" else m >= limit)
        measured = "—"
        if judged:
            measured = (f"{'latency' if sc == 's1' else 'tps'} ratio per round: {fmt_rounds(rs, 3)}; "
                        f"median {m:.3f}x" + ("" if len(judged) == len(rs) else
                                              f" (of the {len(judged)} rounds judged)"))
        md.append(f"| `-S` {'1 client' if sc == 's1' else '32 clients'}: read-your-writes on (pgway) "
                  f"costs nothing measurable against off (:{meta.get('pgway_rywoff_port', '?')}): "
                  f"{what} {limit}, median of the per-round ratios | {measured} | "
                  f"{round_verdict(ok, [(sc, 'pgway'), (sc, 'pgway-rywoff')], rs)} |")
    mem_ok = None if per_conn is None else per_conn <= MEMORY_TARGET_KIB
    mem_v = "met" if mem_ok else ("not measured" if mem_ok is None else "**NOT met**")
    if mem_ok is not None and memory.get("failed"):
        mem_v += " (⚠ some connections failed)"
    md.append(f"| ≤ {MEMORY_TARGET_KIB:.0f} KiB resident per idle client connection | "
              + (f"{per_conn} KiB ({memory.get('opened')} clients)" if per_conn is not None else "—")
              + f" | {mem_v} |")
    if route:
        worst = max(route.values())
        md.append(f"| repeated statement's route decision ≤ 1 µs | slowest cached: {worst:.1f} ns | "
                  f"{'met' if worst <= ROUTE_TARGET_NS else '**NOT met**'} |")
    else:
        md.append("| repeated statement's route decision ≤ 1 µs | — | not measured |")
    if any("NOT met" in line for line in md[targets_at:]):
        md.append("")
        md.append("Where a target is not met, [`benches/PROFILE.md`](PROFILE.md) has the profile "
                  "that explains it and what would fix it.")
    targets_table = md[targets_at:]
    md.append("")

    # Also: pgway vs the others in every scenario, for reference.
    md.append("pgway against each other target, per scenario (for 1 client: latency ratio, lower "
              "is better; otherwise tps ratio, higher is better):")
    md.append("")
    for sc, title, metric in SCENARIOS:
        p = med(sc, "pgway")
        parts = []
        for tg in TARGET_ORDER:
            if tg == "pgway":
                continue
            o = med(sc, tg)
            if p and o:
                parts.append(f"{p / o:.2f}x {target_label(meta, sc, tg, short=True)}")
        if parts:
            md.append(f"- {title}: pgway = " + "; ".join(parts))
    md.append("")
    md.append("![Chart: throughput relative to direct per scenario and target](results.png)")
    md.append("")
    md.append(f"Raw pgbench logs of this run: `{meta['bench_dir']}/run/runs/`.")
    md.append("")

    with open(args.markdown, "w") as f:
        f.write("\n".join(md))

    if args.readme:
        if quick:
            print(f"report: a quick run (rounds={rounds}, duration={duration}s): "
                  f"{args.readme} keeps its numbers")
        else:
            update_readme(args.readme, meta, results_table, targets_table)

    draw_chart(args, meta, medians, speed_to_direct, per_conn, memory, quick)


README_BEGIN = "<!-- benches/compare.sh results: begin -->"
README_END = "<!-- benches/compare.sh results: end -->"


def update_readme(path, meta, results_table, targets_table):
    """Replaces the block between README_BEGIN and README_END with this run's tables."""
    text = open(path).read()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        print(f"report: no results block in {path}; left as it is")
        return
    block = [
        README_BEGIN,
        f"From one run of `benches/compare.sh` on {meta['date']} (pgway {meta.get('pgway_rev', '?')}, "
        f"{meta.get('pgway_build', 'cargo build --release')}, "
        f"{meta.get('nproc', '?')} cores; machine, commands and every round in "
        "[`benches/RESULTS.md`](benches/RESULTS.md)):",
        "",
        *results_table,
        "",
        *[line.replace("](PROFILE.md)", "](benches/PROFILE.md)") for line in targets_table],
        "",
        "![Throughput relative to direct PostgreSQL, per scenario and target](benches/results.png)",
        "",
    ]
    with open(path, "w") as f:
        f.write(text[:begin] + "\n".join(block) + text[end:])
    print(f"report: updated the results block in {path}")


def draw_chart(args, meta, medians, speed_to_direct, per_conn, memory, quick):
    # Bars at explicit x positions: one cluster per scenario, one bar per target it has.
    width = 0.8 / len(TARGET_ORDER)
    data = {tg: [] for tg in TARGET_ORDER}  # x, y, label
    failed_marks = []
    xtics = []
    for i, (sc, title, _metric) in enumerate(SCENARIOS):
        present = [tg for tg in TARGET_ORDER if (sc, tg) in medians]
        title = title.replace("`", "")
        sub = "(direct latency / latency)" if sc == "s1" else "(tps / direct tps)"
        xtics.append(f'"{title}\\n{sub}" {i}')
        for j, tg in enumerate(present):
            x = i + (j - (len(present) - 1) / 2) * width
            v = speed_to_direct(sc, tg)
            if v is None:
                failed_marks.append((x, tg))
            else:
                data[tg].append((x, v))
    dat = os.path.join(args.run_dir, "chart.dat")
    with open(dat, "w") as f:
        for tg in TARGET_ORDER:
            f.write(f"# {tg}\n")
            for x, y in data[tg]:
                f.write(f"{x:.4f} {y:.4f}\n")
            if not data[tg]:
                f.write("-10 0\n")  # keeps the block (and its key entry) without a visible bar
            f.write("\n\n")
    ymax = max([y for vals in data.values() for _, y in vals] + [1.0]) * 1.12
    labels = {"haproxy": "HAProxy (read / write port)", "pgbouncer": "pgbouncer (transaction mode)",
              "pgway": "pgway", "pgway-rywoff": RYWOFF_LABEL, "direct": "direct to PostgreSQL"}
    title = (f"pgway load comparison, {meta['date']}: {meta['nproc']} cores, "
             f"{meta['rounds']} round(s) x {meta['duration']} s, medians")
    if quick:
        title += " (QUICK RUN, not representative)"
    sub = ""
    if per_conn is not None:
        sub = f"pgway: {per_conn} KiB resident per idle client ({memory.get('opened')} clients)"
    gp = [
        "set terminal {term} size 1300,640 noenhanced font 'sans,10'",
        f"set output '{args.png}'",
        f"set title \"{title}{chr(92) + 'n' + sub if sub else ''}\"",
        "set style fill solid 0.9 border lc rgb '#333333'",
        f"set boxwidth {width * 0.92:.4f} absolute",
        f"set xrange [-0.6:{len(SCENARIOS) - 0.4}]",
        f"set yrange [0:{ymax:.3f}]",
        "set ylabel 'relative to direct (higher is better)'",
        "set xtics (" + ", ".join(xtics) + ") scale 0",
        "set grid ytics lc rgb '#dddddd'",
        "set key outside top center horizontal",
        "set bmargin 4",
        "set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lc rgb '#444444'",
    ]
    for x, _tg in failed_marks:
        gp.append(f"set label 'failed' at {x:.4f}, {ymax * 0.04:.3f} center rotate by 90 tc rgb '#cc0000'")
    plots = []
    for k, tg in enumerate(TARGET_ORDER):
        plots.append(f"'{dat}' index {k} using 1:2 with boxes lc rgb '{COLORS[tg]}' title '{labels[tg]}'")
        plots.append(f"'{dat}' index {k} using 1:2:(sprintf('%.2f', $2)) with labels offset 0,0.7 notitle")
    gp.append("plot " + ", \\\n     ".join(plots))
    script = "\n".join(gp) + "\n"
    for term in ("pngcairo", "png"):
        path = os.path.join(args.run_dir, "chart.gp")
        with open(path, "w") as f:
            f.write(script.replace("{term}", term))
        res = subprocess.run(["gnuplot", path], capture_output=True, text=True)
        if res.returncode == 0 and os.path.exists(args.png) and os.path.getsize(args.png) > 0:
            return
    print(f"report: gnuplot failed:\n{res.stderr}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
