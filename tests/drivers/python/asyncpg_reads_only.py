"""An asyncpg pool that only reads keeps its reads on the replica (run by tests/drivers.rs
with replay on the replica paused and read-your-writes in its default "user" scope).

Every release runs asyncpg's reset (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
RESET ALL`) on the primary; none of it writes, so none of it may raise the user's
read-your-writes floor: if it did, the reads after it would wait for the paused replica and
go to the primary. Exits non-zero listing every failed check.
"""

import asyncio

import asyncpg

from common import Checks, settings


async def run(ck, s):
    pool = await asyncpg.create_pool(
        host=s["host"],
        port=s["port"],
        user=s["user"],
        password=s["password"],
        database=s["db"],
        min_size=2,
        max_size=2,
        command_timeout=60,
    )
    try:
        ports = []
        for _ in range(30):
            async with pool.acquire() as con:
                ports.append(await con.fetchval("select inet_server_port()"))
                ports.append(await con.fetchval("select $1::int + inet_server_port() - $1", 7))
        ck.eq("60 reads across 30 acquisitions: servers", set(ports), {s["replica"]})
    finally:
        await pool.close()


async def main():
    s = settings()
    ck = Checks("asyncpg reads only")
    try:
        await asyncio.wait_for(run(ck, s), timeout=120)
    except Exception as e:  # noqa: BLE001 - report every kind of failure
        ck.fail("asyncpg run", e)
    ck.finish()


if __name__ == "__main__":
    asyncio.run(main())
