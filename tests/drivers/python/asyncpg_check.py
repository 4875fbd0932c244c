"""asyncpg through pgway with a pool of 4 connections (run by tests/drivers.rs).

asyncpg prepares every query as a named statement (its statement cache) and prepares
explicitly with Connection.prepare(); its pool runs `RESET ALL` (and more) when a connection
is released. Exits non-zero listing every failed check.
"""

import asyncio
import time

import asyncpg

from common import Checks, settings

DEFAULT_PATH = '"$user", public'


async def wait_for(what, fn, want, timeout=20.0):
    """Polls fn() until it returns want (replication to the replica is asynchronous)."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = await fn()
        if got == want:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: still {got!r} after {timeout}s, expected {want!r}")


async def run(ck, s):
    t = f"{s['prefix']}_items"
    schema = f"{s['prefix']}_s"
    primary, replica = s["primary"], s["replica"]
    pool = await asyncpg.create_pool(
        host=s["host"],
        port=s["port"],
        user=s["user"],
        password=s["password"],
        database=s["db"],
        min_size=4,
        max_size=4,
        server_settings={"application_name": "pgway-asyncpg"},
        command_timeout=60,
    )
    try:
        # Plain reads from every pooled connection go to the replica.
        ports = await asyncio.gather(*(pool.fetchval("select inet_server_port()") for _ in range(12)))
        ck.eq("12 concurrent plain reads: servers", set(ports), {replica})

        await pool.execute(
            f"create table {t} (id int primary key, v text not null, n bigint, f float8, ok bool)"
        )
        await pool.execute(
            f"create schema {schema}; create table {schema}.things (v text); "
            f"insert into {schema}.things values ('in-schema')"
        )

        # Inserts through an explicitly prepared statement.
        insert = f"insert into {t} (id, v, n, f, ok) values ($1, $2, $3, $4, $5) returning inet_server_port()"
        async with pool.acquire() as con:
            stmt = await con.prepare(insert)
            ports = [
                await stmt.fetchval(i, f"v{i}", i * 1_000_000_000, i / 4, i % 2 == 0) for i in range(20)
            ]
        ck.eq("20 inserts via Connection.prepare(): servers", set(ports), {primary})

        # Concurrent inserts through the pool (asyncpg's statement cache: named statements).
        ports = await asyncio.gather(
            *(pool.fetchval(insert, i, f"v{i}", i * 1_000_000_000, i / 4, i % 2 == 0) for i in range(20, 40))
        )
        ck.eq("20 concurrent inserts through the pool: servers", set(ports), {primary})

        # Read back on the replica.
        await wait_for("rows on the replica", lambda: pool.fetchval(f"select count(*) from {t}"), 40)
        rows = await pool.fetch(f"select id, v, n, f, ok, inet_server_port() as port from {t} order by id")
        ck.eq(
            "rows read back",
            [(r["id"], r["v"], r["n"], r["f"], r["ok"]) for r in rows],
            [(i, f"v{i}", i * 1_000_000_000, i / 4, i % 2 == 0) for i in range(40)],
        )
        ck.eq("read back: servers", {r["port"] for r in rows}, {replica})

        # One prepared SELECT, executed many times from every connection.
        select = f"select v, n, inet_server_port() as port from {t} where id = $1"
        for rnd in range(3):
            got = await asyncio.gather(*(pool.fetchrow(select, i) for i in range(40)))
            ck.eq(
                f"round {rnd}: 40 concurrent prepared selects",
                [(r["v"], r["n"]) for r in got],
                [(f"v{i}", i * 1_000_000_000) for i in range(40)],
            )
            ck.eq(f"round {rnd}: prepared selects: servers", {r["port"] for r in got}, {replica})
        async with pool.acquire() as con:
            stmt = await con.prepare(select)
            got = [await stmt.fetchrow(i % 40) for i in range(30)]
            await asyncio.gather(*(pool.fetchval("select 1") for _ in range(8)))
            got += [await stmt.fetchrow(i % 40) for i in range(30)]
        ck.eq("one PreparedStatement run 60 times", [r["v"] for r in got], [f"v{i % 40}" for i in range(30)] * 2)
        ck.eq("one PreparedStatement: servers", {r["port"] for r in got}, {replica})

        # A transaction runs on the primary and sees everything.
        async with pool.acquire() as con:
            async with con.transaction():
                port = await con.fetchval("select inet_server_port()")
                n = await con.fetchval(f"select count(*) from {t}")
        ck.eq("transaction: (server, count)", (port, n), (primary, 40))

        # application_name from the StartupMessage, on a read and on a write.
        ck.eq(
            "application_name on a read",
            await pool.fetchval("select current_setting('application_name')"),
            "pgway-asyncpg",
        )
        row = await pool.fetchrow(
            f"insert into {t} (id, v) values (1000, 'app') "
            "returning current_setting('application_name') as app, inet_server_port() as port"
        )
        ck.eq("application_name on a write", (row["app"], row["port"]), ("pgway-asyncpg", primary))

        # SET on one connection sticks to it while the other connections work.
        await wait_for(
            "the schema on the replica", lambda: pool.fetchval(f"select count(*) from {schema}.things"), 1
        )
        async with pool.acquire() as con:
            await con.execute(f"set search_path = {schema}, public")
            await con.execute("set application_name = 'asyncpg-renamed'")
            for i in range(5):
                await asyncio.gather(
                    *(pool.fetchval("select inet_server_port()") for _ in range(3)),
                    pool.execute(f"update {t} set n = n where id = 1"),
                )
                row = await con.fetchrow(
                    "select v, current_setting('search_path') as path, inet_server_port() as port from things"
                )
                ck.eq(
                    f"{i}: read after SET search_path",
                    (row["v"], row["path"], row["port"]),
                    ("in-schema", f"{schema}, public", replica),
                )
                row = await con.fetchrow(
                    "insert into things values ($1) returning v, current_setting('application_name') as app, "
                    "inet_server_port() as port",
                    f"w{i}",
                )
                ck.eq(
                    f"{i}: write after SET search_path, application_name",
                    (row["v"], row["app"], row["port"]),
                    (f"w{i}", "asyncpg-renamed", primary),
                )
                ck.eq(f"{i}: SHOW search_path", await con.fetchval("show search_path"), f"{schema}, public")
        # The pool's reset on release (RESET ALL) brings back the startup values.
        for i in range(4):
            async with pool.acquire() as con:
                ck.eq(f"after release {i}: SHOW search_path", await con.fetchval("show search_path"), DEFAULT_PATH)
                ck.eq(
                    f"after release {i}: application_name",
                    await con.fetchval("select current_setting('application_name')"),
                    "pgway-asyncpg",
                )
    finally:
        await pool.close()


async def main():
    s = settings()
    ck = Checks("asyncpg")
    try:
        await asyncio.wait_for(run(ck, s), timeout=150)
    except Exception as e:  # noqa: BLE001 - report every kind of failure
        ck.fail("asyncpg run", e)
    ck.finish()


if __name__ == "__main__":
    asyncio.run(main())
