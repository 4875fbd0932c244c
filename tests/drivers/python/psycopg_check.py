"""psycopg 3 through pgway with several connections and prepare=True (run by tests/drivers.rs).

With prepare=True psycopg prepares each query as a named server-side statement (`_pg3_N`)
the first time and then only binds and executes it. The connections are in autocommit mode,
so that plain reads may go to the replica. Exits non-zero listing every failed check.
"""

import time

import psycopg

from common import Checks, settings

DEFAULT_PATH = '"$user", public'


def connect(s, **kwargs):
    return psycopg.connect(
        host=s["host"],
        port=s["port"],
        user=s["user"],
        password=s["password"],
        dbname=s["db"],
        autocommit=True,
        connect_timeout=10,
        **kwargs,
    )


def one(conn, sql, params=None):
    return conn.execute(sql, params, prepare=True).fetchone()


def wait_for(what, fn, want, timeout=20.0):
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = fn()
        if got == want:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what}: still {got!r} after {timeout}s, expected {want!r}")


def run(ck, s):
    t = f"{s['prefix']}_items"
    schema = f"{s['prefix']}_s"
    primary, replica = s["primary"], s["replica"]
    conns = [connect(s, application_name="pgway-psycopg") for _ in range(4)]
    try:
        ports = {one(c, "select inet_server_port()")[0] for c in conns for _ in range(3)}
        ck.eq("plain reads (prepare=True) from 4 connections: servers", ports, {replica})

        conns[0].execute(f"create table {t} (id int primary key, v text not null, n bigint, f float8, ok bool)")
        conns[0].execute(f"create schema {schema}")
        conns[0].execute(f"create table {schema}.things (v text)")
        conns[0].execute(f"insert into {schema}.things values ('in-schema')")

        insert = f"insert into {t} (id, v, n, f, ok) values (%s, %s, %s, %s, %s) returning inet_server_port()"
        ports = set()
        for i in range(40):
            c = conns[i % len(conns)]
            ports.add(one(c, insert, (i, f"v{i}", i * 1_000_000_000, i / 4, i % 2 == 0))[0])
        ck.eq("40 prepared inserts round-robin over 4 connections: servers", ports, {primary})

        wait_for("rows on the replica", lambda: one(conns[1], f"select count(*) from {t}")[0], 40)
        select = f"select v, n, f, ok, inet_server_port() from {t} where id = %s"
        for rnd in range(3):
            got, ports = [], set()
            for i in range(40):
                row = one(conns[(i + rnd) % len(conns)], select, (i,))
                got.append(row[:4])
                ports.add(row[4])
            ck.eq(
                f"round {rnd}: 40 prepared selects",
                got,
                [(f"v{i}", i * 1_000_000_000, i / 4, i % 2 == 0) for i in range(40)],
            )
            ck.eq(f"round {rnd}: prepared selects: servers", ports, {replica})
        prepared = one(conns[0], "select count(*) from pg_prepared_statements")[0]
        print(f"     (pg_prepared_statements on the replica connection: {prepared})", flush=True)

        # A transaction runs on the primary.
        with conns[2].transaction():
            row = one(conns[2], f"select count(*), inet_server_port() from {t}")
        ck.eq("transaction: (count, server)", tuple(row), (40, primary))

        # application_name from the StartupMessage, on a read and on a write.
        ck.eq(
            "application_name on a read",
            tuple(one(conns[3], "select current_setting('application_name'), inet_server_port()")),
            ("pgway-psycopg", replica),
        )
        ck.eq(
            "application_name on a write",
            tuple(
                one(
                    conns[3],
                    f"insert into {t} (id, v) values (1000, 'app') "
                    "returning current_setting('application_name'), inet_server_port()",
                )
            ),
            ("pgway-psycopg", primary),
        )

        # search_path in the StartupMessage (options=-c ...) of a fifth connection.
        wait_for("the schema on the replica", lambda: one(conns[0], f"select count(*) from {schema}.things")[0], 1)
        with connect(s, application_name="pgway-psycopg-opts", options=f"-c search_path={schema},public") as c5:
            for i in range(5):
                for c in conns:
                    one(c, "select inet_server_port()")
                    one(c, f"update {t} set n = n where id = 1 returning id")
                row = one(c5, "select v, current_setting('search_path'), inet_server_port() from things")
                # (as given in options: PostgreSQL shows it unchanged, without a space)
                ck.eq(f"{i}: options search_path: read", tuple(row), ("in-schema", f"{schema},public", replica))
                row = one(c5, "insert into things values (%s) returning v, inet_server_port()", (f"o{i}",))
                ck.eq(f"{i}: options search_path: write", tuple(row), (f"o{i}", primary))

        # SET on one connection sticks to it; the others are not affected.
        conns[1].execute(f"set search_path = {schema}, public")
        conns[1].execute("set application_name = 'psycopg-renamed'")
        for i in range(5):
            for c in (conns[0], conns[2]):
                ck.eq(
                    f"{i}: other connection's application_name",
                    one(c, "select current_setting('application_name')")[0],
                    "pgway-psycopg",
                )
                ck.eq(f"{i}: other connection's search_path", one(c, "show search_path")[0], DEFAULT_PATH)
            row = one(conns[1], "select v, current_setting('application_name'), inet_server_port() from things")
            ck.eq(f"{i}: after SET: read", tuple(row), ("in-schema", "psycopg-renamed", replica))
            row = one(
                conns[1],
                "insert into things values (%s) returning v, current_setting('application_name'), inet_server_port()",
                (f"s{i}",),
            )
            ck.eq(f"{i}: after SET: write", tuple(row), (f"s{i}", "psycopg-renamed", primary))
    finally:
        for c in conns:
            c.close()


def main():
    s = settings()
    ck = Checks("psycopg")
    print(f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()})", flush=True)
    try:
        run(ck, s)
    except Exception as e:  # noqa: BLE001 - report every kind of failure
        ck.fail("psycopg run", e)
    ck.finish()


if __name__ == "__main__":
    main()
