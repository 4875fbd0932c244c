#!/usr/bin/python3
"""Resident memory per idle client connection of a running gateway (used by benches/compare.sh).

Reads the gateway's VmRSS from /proc/PID/status, opens COUNT client connections that complete
the login (psycopg2 returns from connect() only after ReadyForQuery) and then stay idle, reads
VmRSS again, checks that the gateway still answers on a few of them, closes them all, and
prints one JSON object with the numbers. Connection failures are counted, not fatal: the
caller records them.

Uses Debian's python3-psycopg2 (installed by scripts/install-deps.sh); run it with
/usr/bin/python3. The caller raises the open-files limit (COUNT sockets are held here).
"""

import argparse
import json
import os
import sys
import threading
import time

import psycopg2


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def alive(pid):
    return os.path.exists(f"/proc/{pid}/status")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True, help="the gateway's process id")
    ap.add_argument("--dsn", required=True, help="libpq connection string")
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait before measuring")
    args = ap.parse_args()

    result = {"requested": args.count}

    # Warm up: one login and one query, so that lazily created state (server pools, caches)
    # is in the "before" figure and not charged to the idle clients.
    warm = psycopg2.connect(args.dsn, connect_timeout=30)
    with warm.cursor() as cur:
        cur.execute("select 1")
        cur.fetchall()
    warm.close()
    time.sleep(args.settle)
    result["rss_before_kib"] = rss_kib(args.pid)

    conns = []
    errors = []
    lock = threading.Lock()
    opened = [0]

    def worker(n):
        mine = []
        for _ in range(n):
            try:
                mine.append(psycopg2.connect(args.dsn, connect_timeout=30))
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
                continue
            with lock:
                opened[0] += 1
                if opened[0] % 1000 == 0:
                    print(f"idle-clients: {opened[0]} open", file=sys.stderr, flush=True)
        with lock:
            conns.extend(mine)

    threads = max(1, min(args.threads, args.count))
    per = [args.count // threads + (1 if i < args.count % threads else 0) for i in range(threads)]
    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(n,)) for n in per]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    result["open_seconds"] = round(time.monotonic() - t0, 2)
    result["opened"] = len(conns)
    result["failed"] = len(errors)
    result["first_errors"] = sorted(set(errors))[:5]

    time.sleep(args.settle)
    if not alive(args.pid):
        result["gateway_alive"] = False
        print(json.dumps(result))
        return
    result["rss_after_kib"] = rss_kib(args.pid)
    result["gateway_alive"] = True

    # The idle clients are real sessions: a few of them still get answers.
    sample_ok = 0
    sample_errors = []
    step = max(1, len(conns) // 10)
    for c in conns[::step][:10]:
        try:
            c.autocommit = True
            with c.cursor() as cur:
                cur.execute("select 1")
                cur.fetchall()
            sample_ok += 1
        except Exception as e:  # noqa: BLE001
            sample_errors.append(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    result["sample_queries_ok"] = sample_ok
    result["sample_errors"] = sorted(set(sample_errors))[:5]

    for c in conns:
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass
    time.sleep(args.settle)
    if alive(args.pid):
        result["rss_after_close_kib"] = rss_kib(args.pid)

    if result["opened"]:
        delta = result["rss_after_kib"] - result["rss_before_kib"]
        result["per_conn_kib"] = round(delta / result["opened"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
