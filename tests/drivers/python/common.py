"""Shared bits of the Python driver checks (run by tests/drivers.rs).

Settings come from the environment:
  PGWAY_HOST, PGWAY_PORT, PGWAY_USER, PGWAY_PASSWORD, PGWAY_DB   where pgway listens
  PRIMARY_PORT, REPLICA_PORT    the ports inet_server_port() reports for each node
  PREFIX                        a unique name prefix for this run's table and schema
"""

import os
import sys
import traceback


class Checks:
    """Collects failed checks; prints each check as it runs."""

    def __init__(self, driver):
        self.driver = driver
        self.failures = []

    def eq(self, what, got, want):
        if got == want:
            print(f"ok   {what}: {got!r}", flush=True)
        else:
            print(f"FAIL {what}: expected {want!r}, got {got!r}", flush=True)
            self.failures.append(f"{what}: expected {want!r}, got {got!r}")

    def true(self, what, cond, detail=""):
        if cond:
            print(f"ok   {what}", flush=True)
        else:
            print(f"FAIL {what} {detail}", flush=True)
            self.failures.append(f"{what} {detail}")

    def fail(self, what, err):
        traceback.print_exception(err, file=sys.stdout)
        print(f"FAIL {what}: {type(err).__name__}: {err}", flush=True)
        self.failures.append(f"{what}: {type(err).__name__}: {err}")

    def finish(self):
        if self.failures:
            print(f"\n{self.driver}: {len(self.failures)} check(s) failed:", flush=True)
            for f in self.failures:
                print(f"  - {f}", flush=True)
            sys.exit(1)
        print(f"\n{self.driver}: all checks passed", flush=True)


def settings():
    env = os.environ
    return {
        "host": env.get("PGWAY_HOST", "127.0.0.1"),
        "port": int(env["PGWAY_PORT"]),
        "user": env["PGWAY_USER"],
        "password": env["PGWAY_PASSWORD"],
        "db": env["PGWAY_DB"],
        "primary": int(env["PRIMARY_PORT"]),
        "replica": int(env["REPLICA_PORT"]),
        "prefix": env["PREFIX"],
    }
