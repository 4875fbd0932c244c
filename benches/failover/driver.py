#!/usr/bin/python3
"""Failover benchmark driver (run by benches/failover.sh; not meant to be run alone).

For each round: autocommit writers and plain readers run through pgway and through HAProxy
at the same time against one Patroni cluster; the leader's Patroni and PostgreSQL are killed
with SIGKILL; an `etcdctl watch` on the leader key timestamps the moment the new leader key
appears. Every statement's outcome is timestamped with time.monotonic() (the same clock for
every thread and the watch), so per target we get:

  write outage      last write acknowledged before the kill -> first one after it
  delay after key   new leader key in etcd -> first write acknowledged after the kill
  failed writes     failed statements and failed connects (a failing client retries every
                    RETRY seconds)
  rows lost         acknowledged ids missing on the new primary afterwards
  failed reads / read outage (longest gap between successful reads)

The killed member is then restarted (it rejoins as a replica) before the next round.
Writes the results as JSON (--json) and Markdown tables (--markdown).
Uses psycopg2 from Debian's python3-psycopg2 (a dependency of the patroni package).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import threading
import time
import urllib.request

import psycopg2

RETRY = 0.05  # pause after a failed statement or connect


def first_line(e):
    text = str(e).strip() or e.__class__.__name__
    return text.splitlines()[0]


class Task(threading.Thread):
    """One client: a writer (insert ... returning id) or a reader (select inet_server_port())."""

    def __init__(self, via, kind, dsn, base, pace, stop):
        super().__init__(daemon=True)
        self.via, self.kind, self.dsn, self.base, self.pace, self.stop = via, kind, dsn, base, pace, stop
        self.acks = []  # (t, id, server port) for writers
        self.reads = []  # t for readers
        self.errors = []  # (t, message)

    def run(self):
        conn = None
        seq = 0
        while not self.stop.is_set():
            if conn is None or conn.closed:
                try:
                    conn = psycopg2.connect(self.dsn, connect_timeout=3)
                    conn.autocommit = True
                except Exception as e:  # noqa: BLE001 - every failure counts
                    conn = None
                    self.errors.append((time.monotonic(), "connect: " + first_line(e)))
                    time.sleep(RETRY)
                    continue
            try:
                with conn.cursor() as cur:
                    if self.kind == "w":
                        seq += 1
                        i = self.base + seq
                        cur.execute(
                            "insert into bench_ledger(id, via, at) values (%s, %s, clock_timestamp()) "
                            "returning id, inet_server_port()",
                            (i, self.via),
                        )
                        row = cur.fetchone()
                        self.acks.append((time.monotonic(), i, row[1]))
                    else:
                        cur.execute("select inet_server_port()")
                        cur.fetchone()
                        self.reads.append(time.monotonic())
            except Exception as e:  # noqa: BLE001
                self.errors.append((time.monotonic(), first_line(e)))
                time.sleep(RETRY)
                continue
            time.sleep(self.pace)
        if conn is not None and not conn.closed:
            conn.close()


class LeaderWatch(threading.Thread):
    """`etcdctl watch` on the leader key; records (t, value or None for a delete)."""

    def __init__(self, endpoint, key):
        super().__init__(daemon=True)
        self.events = []
        self.proc = subprocess.Popen(
            ["etcdctl", "--endpoints=http://" + endpoint, "watch", key],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, ETCDCTL_API="3"),
            text=True,
            bufsize=1,
        )

    def run(self):
        out = self.proc.stdout
        while True:
            kind = out.readline()
            if not kind:
                return
            t = time.monotonic()
            out.readline()  # the key
            value = out.readline().strip()
            kind = kind.strip()
            if kind in ("PUT", "DELETE"):
                self.events.append((t, value if kind == "PUT" else None))

    def close(self):
        self.proc.kill()
        self.proc.wait()


class PromotionWatch(threading.Thread):
    """Polls `select pg_is_in_recovery()` on a replica every 5 ms over one connection and
    records when it first answers false (its promotion has finished: it takes writes)."""

    def __init__(self, dsn):
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(dsn, connect_timeout=3)
        self.conn.autocommit = True
        self.stop = threading.Event()
        self.writable_at = None

    def run(self):
        try:
            with self.conn.cursor() as cur:
                while not self.stop.is_set():
                    cur.execute("select pg_is_in_recovery()")
                    if not cur.fetchone()[0]:
                        self.writable_at = time.monotonic()
                        return
                    time.sleep(0.005)
        except Exception:  # noqa: BLE001
            pass
        finally:
            self.conn.close()


def etcd_get(endpoint, key):
    out = subprocess.run(
        ["etcdctl", "--endpoints=http://" + endpoint, "get", "--print-value-only", key],
        capture_output=True,
        text=True,
        env=dict(os.environ, ETCDCTL_API="3"),
        check=True,
    )
    return out.stdout.strip() or None


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:  # noqa: BLE001
        return None


def wait_for(what, seconds, check):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.25)
    raise SystemExit(f"driver: timed out after {seconds}s waiting for {what}")


def query(dsn, sql, args=None):
    conn = psycopg2.connect(dsn, connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def kill_leader(cluster_dir, name):
    """SIGKILL the member's Patroni and its PostgreSQL (the postmaster's process group)."""
    pid = int(open(os.path.join(cluster_dir, name + ".pid")).read().strip())
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"patroni" in f.read(), f"pid {pid} is not Patroni"
    with open(os.path.join(cluster_dir, name, "postmaster.pid")) as f:
        pm = int(f.readline().strip())
    pgid = os.getpgid(pm)
    t = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    if pgid > 1 and pgid != os.getpgid(0):
        os.killpg(pgid, signal.SIGKILL)
    if pid_alive(pm):
        os.kill(pm, signal.SIGKILL)
    return t


def longest_gap(times, start, end):
    """Longest interval without an event inside [start, end] (edges count as events)."""
    pts = [start] + sorted(t for t in times if start <= t <= end) + [end]
    return max(b - a for a, b in zip(pts, pts[1:]))


def run_round(args, rnd, members):
    key = f"{args.namespace}/{args.scope}/leader"
    leader = etcd_get(args.etcd, key)
    if leader not in members:
        raise SystemExit(f"driver: leader key is {leader!r}")
    watch = LeaderWatch(args.etcd, key)
    watch.start()
    time.sleep(0.3)

    stop = threading.Event()
    targets = {"pgway": (args.pgway, args.pgway), "haproxy": (args.haproxy_write, args.haproxy_read)}
    tasks = {via: [] for via in targets}
    for v, (via, (wdsn, rdsn)) in enumerate(targets.items()):
        for i in range(args.writers):
            base = rnd * 100_000_000 + v * 10_000_000 + i * 1_000_000
            tasks[via].append(Task(via, "w", wdsn, base, args.pace, stop))
        for i in range(args.readers):
            tasks[via].append(Task(via, "r", rdsn, 0, args.pace, stop))
    for ts in tasks.values():
        for t in ts:
            t.start()
    time.sleep(args.warmup)
    for via, ts in tasks.items():
        if not any(t.acks for t in ts):
            raise SystemExit(f"driver: no write through {via} succeeded during the warm-up: "
                             f"{[t.errors[-1:] for t in ts]}")

    # With two members the other one takes over; watch it finish its promotion.
    promotion = {m: PromotionWatch(dsn) for m, dsn in members.items() if m != leader}
    for p in promotion.values():
        p.start()
    kill_at = kill_leader(args.dir, leader)
    print(f"driver: round {rnd + 1}: killed {leader} (Patroni and PostgreSQL)", flush=True)

    def new_key():
        for t, v in watch.events:
            if t > kill_at and v and v != leader:
                return t, v
        return None

    def resumed(via):
        # The first write acknowledged by the new primary (a reply from the killed one can
        # still be read a few ms after the kill).
        nk = new_key()
        if not nk:
            return None
        port = args.pgport[nk[1]]
        return min((a for t in tasks[via] for a, _, p in t.acks if a > kill_at and p == port), default=None)

    deadline = kill_at + args.max_wait
    while time.monotonic() < deadline:
        if new_key() and all(resumed(via) for via in targets):
            break
        time.sleep(0.05)
    time.sleep(args.settle)
    stop.set()
    for ts in tasks.values():
        for t in ts:
            t.join(timeout=40)
    end = time.monotonic()
    watch.close()
    for p in promotion.values():
        p.stop.set()
        p.join(timeout=5)

    nk = new_key()
    deleted = next((t for t, v in watch.events if t > kill_at and v is None), None)
    new_leader = nk[1] if nk else etcd_get(args.etcd, key)
    writable_at = promotion[new_leader].writable_at if new_leader in promotion else None
    result = {
        "round": rnd + 1,
        "killed": leader,
        "new_leader": new_leader,
        "key_deleted_after_kill_ms": round((deleted - kill_at) * 1000) if deleted else None,
        "new_key_after_kill_ms": round((nk[0] - kill_at) * 1000) if nk else None,
        "new_leader_writable_after_kill_ms": round((writable_at - kill_at) * 1000) if writable_at else None,
        "window_s": round(end - kill_at, 1),
        "targets": {},
    }
    primary_dsn = members[new_leader] if new_leader in members else None
    for via, ts in tasks.items():
        writers = [t for t in ts if t.kind == "w"]
        readers = [t for t in ts if t.kind == "r"]
        acks = sorted(a for t in writers for a in t.acks)
        first_after = resumed(via)
        old_port = args.pgport[leader]
        last_before = max((a for a, _, p in acks if p == old_port), default=None)
        acked = {i for _, i, _ in acks}
        lost = None
        if primary_dsn:
            stored = {r[0] for r in query(primary_dsn, "select id from bench_ledger where via = %s", (via,))}
            lost = len(acked - stored)
        werr = [e for t in writers for e in t.errors if e[0] > kill_at]
        rerr = [e for t in readers for e in t.errors if e[0] > kill_at]
        reads = [r for t in readers for r in t.reads]
        last_read_before = max((r for r in reads if r <= kill_at), default=kill_at)
        result["targets"][via] = {
            "last_ack_by_killed_after_kill_ms": round((last_before - kill_at) * 1000) if last_before else None,
            "write_outage_ms": round((first_after - last_before) * 1000) if first_after and last_before else None,
            "resumed_after_kill_ms": round((first_after - kill_at) * 1000) if first_after else None,
            "delay_after_key_ms": round((first_after - nk[0]) * 1000) if first_after and nk else None,
            "delay_after_writable_ms": round((first_after - writable_at) * 1000) if first_after and writable_at else None,
            "failed_writes": len(werr),
            "write_errors": sorted({m for _, m in werr})[:5],
            "acked_writes": len(acked),
            "acked_lost": lost,
            "failed_reads": len(rerr),
            "read_errors": sorted({m for _, m in rerr})[:5],
            "read_outage_ms": round(longest_gap(reads, last_read_before, end) * 1000),
            "reads_after_kill": sum(1 for r in reads if r > kill_at),
        }
    return result, leader


def rejoin(args, name, members):
    print(f"driver: restarting {name}; it rejoins as a replica", flush=True)
    subprocess.run([args.cluster_script, "start-node", name], check=True)
    api = args.api[name]
    wait_for(f"{name} to be a replica", 120, lambda: http_status(f"http://{api}/replica") == 200)
    wait_for(f"{name} to stream", 60, lambda: query(members[name], "select status from pg_stat_wal_receiver")[0][0] == "streaming")
    # HAProxy marks a server up after `rise 2` checks `inter 3s` apart; wait for both ports.
    wait_for("HAProxy's replica port", 60, lambda: query(args.haproxy_read, "select pg_is_in_recovery()")[0][0])
    wait_for("HAProxy's primary port", 60, lambda: not query(args.haproxy_write, "select pg_is_in_recovery()")[0][0])
    wait_for("pgway to write", 60, lambda: query(args.pgway, "select 1") is not None)


def fmt_ms(v):
    return "—" if v is None else f"{v / 1000:.2f} s"


def markdown(results, args):
    lines = []
    rows = [
        ("Write outage (last ack by the killed leader → first ack by the new one)", "write_outage_ms", fmt_ms),
        ("Delay from the new leader key in etcd to the first write acknowledged", "delay_after_key_ms", fmt_ms),
        ("Delay from the new leader's promotion (it answers pg_is_in_recovery() = false) to the first write",
         "delay_after_writable_ms", fmt_ms),
        ("Failed write statements (incl. failed connects)", "failed_writes", str),
        ("Acknowledged rows lost", "acked_lost", str),
        ("Failed reads", "failed_reads", str),
        ("Longest gap between successful reads", "read_outage_ms", fmt_ms),
    ]
    lines.append("| | pgway | HAProxy |")
    lines.append("| --- | --- | --- |")
    for label, k, f in rows:
        cells = []
        for via in ("pgway", "haproxy"):
            vals = [r["targets"][via][k] for r in results]
            known = [v for v in vals if v is not None]
            if len(results) == 1 or not known:
                cells.append(f(vals[0]) if len(results) == 1 else "—")
            elif k.endswith("_ms"):
                med = round(statistics.median(known))
                cells.append(f"{f(med)} (median of {', '.join(f(v) for v in vals)})")
            else:
                cells.append(f"{sum(known)} in all (per round: {', '.join(f(v) for v in vals)})")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines.append("")
    lines.append(
        "Acknowledged rows lost are commits the killed primary had acknowledged but not yet sent to "
        "the replica (asynchronous replication): PostgreSQL loses them whatever sits in front of it. "
        "Run with `--sync` (Patroni's `synchronous_mode`) to rule that out."
        if not args.sync else
        "Patroni ran in `synchronous_mode`: an acknowledged commit was on the replica already."
    )
    lines.append("")
    lines.append("Per round (times after the kill):")
    lines.append("")
    lines.append("| Round | Killed → new leader | Leader key deleted | New leader key | New leader promoted "
                 "| pgway: first write | HAProxy: first write | Load ran until |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        p, h = r["targets"]["pgway"], r["targets"]["haproxy"]
        lines.append(
            f"| {r['round']} | {r['killed']} → {r['new_leader']} | {fmt_ms(r['key_deleted_after_kill_ms'])} "
            f"| {fmt_ms(r['new_key_after_kill_ms'])} | {fmt_ms(r.get('new_leader_writable_after_kill_ms'))} "
            f"| {fmt_ms(p['resumed_after_kill_ms'])} "
            f"| {fmt_ms(h['resumed_after_kill_ms'])} | {r['window_s']:.1f} s |"
        )
    errs = []
    for r in results:
        for via in ("pgway", "haproxy"):
            t = r["targets"][via]
            for m in t["write_errors"] + t["read_errors"]:
                errs.append(f"- round {r['round']}, {via}: `{m}`")
    if errs:
        lines.append("")
        lines.append("Distinct error messages (first few per round and target):")
        lines.append("")
        lines.extend(sorted(set(errs)))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pgway", required=True)
    ap.add_argument("--haproxy-write", required=True)
    ap.add_argument("--haproxy-read", required=True)
    ap.add_argument("--etcd", required=True, help="host:port")
    ap.add_argument("--namespace", default="/service")
    ap.add_argument("--scope", required=True)
    ap.add_argument("--dir", required=True, help="the cluster dir of scripts/patroni-cluster.sh")
    ap.add_argument("--cluster-script", required=True)
    ap.add_argument("--member", action="append", required=True, help="NAME=PGPORT=APIPORT")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--pace", type=float, default=0.02)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--settle", type=float, default=12,
                    help="seconds to keep the load running after both targets resumed writing")
    ap.add_argument("--max-wait", type=float, default=60)
    ap.add_argument("--sync", action="store_true", help="Patroni runs in synchronous_mode (for the report)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown", required=True)
    args = ap.parse_args()
    members, args.api, args.pgport = {}, {}, {}
    for m in args.member:
        name, pg, api = m.split("=")
        members[name] = f"host=127.0.0.1 port={pg} user=postgres dbname=app"
        args.api[name] = f"127.0.0.1:{api}"
        args.pgport[name] = int(pg)

    query(members[etcd_get(args.etcd, f"{args.namespace}/{args.scope}/leader")],
          "set role app; create table if not exists bench_ledger "
          "(id bigint primary key, via text not null, at timestamptz not null)")
    query(args.pgway, "select 1")
    results = []
    for rnd in range(args.rounds):
        result, killed = run_round(args, rnd, members)
        results.append(result)
        print("driver: " + json.dumps(result), flush=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        rejoin(args, killed, members)
    with open(args.markdown, "w") as f:
        f.write(markdown(results, args))


if __name__ == "__main__":
    main()
