//! Read/write routing: which server answers each kind of statement.
//!
//! Every check asks the server itself: `inet_server_port()` is the port of the PostgreSQL
//! server that executed the statement, `pg_is_in_recovery()` is true only on a replica, and
//! `pg_backend_pid()` identifies the server connection.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use common::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Tables and a sequence owned by `app`, created directly on the primary.
const SCHEMA: &str = "SET ROLE app;\n\
    CREATE TABLE items (id int, v text);\n\
    INSERT INTO items VALUES (1, 'one'), (2, 'two');\n\
    CREATE SEQUENCE item_seq;\n";

#[derive(Clone, Copy, Debug)]
enum Proto {
    Simple,
    Extended,
}

/// Runs `sql` and returns the first column of the first row, which every statement in these
/// tests makes `inet_server_port()`.
async fn port_of(client: &Client, sql: &str, proto: Proto) -> Result<u16, String> {
    match proto {
        Proto::Simple => {
            let rows = simple_rows(client, sql)
                .await
                .map_err(|e| describe_error(&e))?;
            let v = rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .ok_or_else(|| format!("no rows: {rows:?}"))?;
            v.parse().map_err(|e| format!("not a port {v:?}: {e}"))
        }
        Proto::Extended => {
            let rows = client
                .query(sql, &[])
                .await
                .map_err(|e| describe_error(&e))?;
            let row = rows.first().ok_or("no rows")?;
            let port: i32 = row.try_get(0).map_err(|e| e.to_string())?;
            Ok(port as u16)
        }
    }
}

/// Runs every statement with `proto` and returns one line per statement that was not
/// answered by one of `want` (or failed).
async fn misrouted(
    cluster: &Cluster,
    client: &Client,
    statements: &[&str],
    proto: Proto,
    want: &[u16],
) -> Vec<String> {
    let want_names: Vec<String> = want.iter().map(|p| cluster.name_of(*p)).collect();
    let mut failures = Vec::new();
    for sql in statements {
        match port_of(client, sql, proto).await {
            Ok(port) if want.contains(&port) => {}
            Ok(port) => failures.push(format!(
                "{proto:?} `{sql}`: served by {}, expected {want_names:?}",
                cluster.name_of(port)
            )),
            Err(e) => failures.push(format!("{proto:?} `{sql}`: failed: {e}")),
        }
    }
    failures
}

fn assert_no_failures(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} statement(s) misrouted or failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_reads_outside_transactions_go_to_a_replica() {
    let cluster = Cluster::start_with_schema(1, SCHEMA);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let replicas = cluster.replica_ports();

    let reads = [
        "select inet_server_port()",
        "SELECT inet_server_port() FROM items WHERE id = 1",
        "values (inet_server_port())",
        "with a as (select id from items) select inet_server_port() from a limit 1",
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 3) \
         select inet_server_port() from r limit 1",
        "select inet_server_port(), count(*) from items i join items j using (id)",
        "select inet_server_port(), now(), lower('X'), length(v) from items limit 1",
        "select inet_server_port() from items where id in (select id from items) limit 1",
        "-- a leading comment\nselect inet_server_port()",
    ];
    let mut failures = misrouted(&cluster, &client, &reads, Proto::Simple, &replicas).await;
    failures.extend(misrouted(&cluster, &client, &reads, Proto::Extended, &replicas).await);
    // A multi-statement string made only of reads.
    failures.extend(
        misrouted(
            &cluster,
            &client,
            &["select inet_server_port(); select count(*) from items"],
            Proto::Simple,
            &replicas,
        )
        .await,
    );
    assert_no_failures("reads outside a transaction", &failures);

    let in_recovery = simple_value(&client, "select pg_is_in_recovery()")
        .await
        .expect("select pg_is_in_recovery()");
    assert_eq!(
        in_recovery, "t",
        "a plain read must be answered by a replica"
    );
    let rows = simple_rows(&client, "select id, v from items order by id")
        .await
        .expect("select from items");
    assert_eq!(
        rows,
        vec![
            vec![Some("1".into()), Some("one".into())],
            vec![Some("2".into()), Some("two".into())]
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_locking_reads_and_write_functions_go_to_the_primary() {
    let cluster = Cluster::start_with_schema(1, SCHEMA);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let primary = [cluster.primary_port()];

    let statements = [
        // DML
        "insert into items (id, v) values (100, 'hundred') returning inet_server_port()",
        "update items set v = 'uno' where id = 1 returning inet_server_port()",
        "delete from items where id = 100 returning inet_server_port()",
        // locking clauses
        "select inet_server_port() from items where id = 1 for update",
        "select inet_server_port() from items where id = 1 for no key update",
        "select inet_server_port() from items where id = 1 for share",
        "select inet_server_port() from items where id = 1 for key share",
        "select inet_server_port() from items where id = 1 for update skip locked",
        "select inet_server_port() from items \
         where id = (select id from items where id = 1 for update)",
        // data-modifying CTEs
        "with ins as (insert into items (id, v) values (101, 'cte') returning id) \
         select inet_server_port() from ins",
        "with upd as (update items set v = 'dos' where id = 2 returning id) \
         select inet_server_port() from upd",
        // built-in functions that write
        "select inet_server_port(), nextval('item_seq')",
        "SELECT inet_server_port(), NEXTVAL('item_seq')",
        "select inet_server_port(), pg_catalog.nextval('item_seq')",
        "select inet_server_port(), lower(nextval('item_seq')::text)",
        "select inet_server_port(), setval('item_seq', 10)",
        "select inet_server_port(), txid_current()",
        "select inet_server_port(), pg_current_xact_id()",
        "select inet_server_port(), pg_current_wal_lsn()",
        "select inet_server_port(), pg_advisory_lock(42)",
        "select inet_server_port(), pg_advisory_unlock(42)",
        "select inet_server_port(), pg_try_advisory_xact_lock(7)",
        "select inet_server_port(), set_config('pgway.test', 'x', false)",
        "select inet_server_port(), pg_notify('pgway_test', 'x')",
        // SQL that sqlparser 0.63 cannot parse (ROWS FROM) but PostgreSQL runs
        "select inet_server_port() from rows from (generate_series(1, 1)) as g",
    ];
    for proto in [Proto::Simple, Proto::Extended] {
        // A fresh client per protocol, so a session pinned by the first pass (advisory lock)
        // cannot hide a routing bug in the second.
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        let failures = misrouted(&cluster, &client, &statements, proto, &primary).await;
        assert_no_failures(&format!("writes ({proto:?} protocol)"), &failures);
    }

    // Multi-statement strings with any non-read go to the primary as a whole.
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let multi = [
        "select inet_server_port(); insert into items (id, v) values (102, 'multi')",
        "select inet_server_port(); select nextval('item_seq')",
        "select inet_server_port(); update items set v = 'x' where id = 102",
    ];
    let failures = misrouted(&cluster, &client, &multi, Proto::Simple, &primary).await;
    assert_no_failures("multi-statement strings with a write", &failures);

    let rows = cluster.psql_admin(
        cluster.primary_port(),
        "select count(*) from items where id in (101, 102)",
    );
    assert_eq!(rows, "3", "CTE insert (ran twice) + multi-statement insert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_select_into_do_and_call_run_on_the_primary() {
    let cluster = Cluster::start(1);
    cluster.psql_admin(
        cluster.primary_port(),
        &format!(
            "{SCHEMA}CREATE TABLE do_port (p int);\n\
             CREATE TABLE call_port (p int);\n\
             CREATE PROCEDURE record_port() LANGUAGE sql \
             AS $$ INSERT INTO call_port SELECT inet_server_port() $$;\n"
        ),
    );
    cluster.wait_replay();
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    // Each statement records the port of the server that ran it (on a replica each would fail
    // with 25006 read_only_sql_transaction).
    let statements = [
        "create table ddl_port as select inet_server_port() as p",
        "select inet_server_port() as p into into_port",
        "do $$ begin insert into do_port select inet_server_port(); end $$",
        "call record_port()",
        "create index items_id on items (id)",
        "alter table items add column w int",
        "grant select on items to md5user",
    ];
    let mut failures = Vec::new();
    for sql in statements {
        if let Err(e) = client.simple_query(sql).await {
            failures.push(format!("`{sql}`: {}", describe_error(&e)));
        }
    }
    assert_no_failures("DDL / SELECT INTO / DO / CALL", &failures);
    let recorded = cluster.psql_admin(
        cluster.primary_port(),
        "select (select p from ddl_port) || ',' || (select p from into_port) || ',' || \
         (select p from do_port) || ',' || (select p from call_port)",
    );
    let p = cluster.primary_port();
    assert_eq!(
        recorded,
        format!("{p},{p},{p},{p}"),
        "ports recorded by CREATE TABLE AS, SELECT INTO, DO, CALL (primary is {p})"
    );
}

/// Runs `select inet_server_port(), pg_backend_pid(), pg_is_in_recovery()` with the simple
/// protocol and returns the three values.
async fn where_am_i(client: &Client, extra: &str) -> Result<(u16, i32, bool), String> {
    let sql = format!("select inet_server_port(), pg_backend_pid(), pg_is_in_recovery() {extra}");
    let rows = simple_rows(client, &sql)
        .await
        .map_err(|e| format!("`{sql}`: {}", describe_error(&e)))?;
    let r = rows.first().ok_or_else(|| format!("`{sql}`: no rows"))?;
    let get = |i: usize| r[i].clone().unwrap_or_default();
    Ok((
        get(0).parse().map_err(|e| format!("{e}"))?,
        get(1).parse().map_err(|e| format!("{e}"))?,
        get(2) == "t",
    ))
}

/// [`where_am_i`] with the extended protocol.
async fn where_am_i_extended(client: &Client) -> Result<(u16, i32, bool), String> {
    let row = client
        .query_one(
            "select inet_server_port(), pg_backend_pid(), pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(|e| format!("extended where_am_i: {}", describe_error(&e)))?;
    Ok((row.get::<_, i32>(0) as u16, row.get(1), row.get(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_transactions_run_on_the_primary_on_one_server_connection() {
    let cluster = Cluster::start_with_schema(1, SCHEMA);
    // The transactions write, and the read after COMMIT asserts the replica: on a loaded
    // machine replaying the write can take longer than the default 20 ms wait.
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            extra: "[routing]\nread_your_writes_wait = \"30s\"\n".into(),
            ..GatewayOptions::default()
        },
    );
    gw.wait_for_replica_reads(&cluster).await;
    let mut client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let primary = cluster.primary_port();

    for begin in [
        "begin",
        "BEGIN",
        "start transaction",
        "begin isolation level repeatable read",
        "begin transaction isolation level serializable",
    ] {
        client
            .simple_query(begin)
            .await
            .unwrap_or_else(|e| panic!("`{begin}`: {}", describe_error(&e)));
        let mut seen = Vec::new();
        for extra in ["", "from items limit 1", "where true"] {
            seen.push(
                where_am_i(&client, extra)
                    .await
                    .expect("statement in transaction"),
            );
        }
        let ins = simple_rows(
            &client,
            "insert into items (id, v) values (200, 'tx') \
             returning inet_server_port(), pg_backend_pid(), pg_is_in_recovery()",
        )
        .await
        .expect("insert in transaction");
        seen.push((
            ins[0][0].clone().unwrap().parse().unwrap(),
            ins[0][1].clone().unwrap().parse().unwrap(),
            ins[0][2].as_deref() == Some("t"),
        ));
        seen.push(
            where_am_i_extended(&client)
                .await
                .expect("extended in transaction"),
        );
        client.simple_query("commit").await.expect("commit");

        let ports: Vec<String> = seen.iter().map(|s| cluster.name_of(s.0)).collect();
        assert!(
            seen.iter().all(|s| s.0 == primary && !s.2),
            "`{begin}`: every statement must run on the primary ({}), got {ports:?}",
            cluster.name_of(primary)
        );
        let pids: Vec<i32> = seen.iter().map(|s| s.1).collect();
        assert!(
            pids.iter().all(|p| *p == pids[0]),
            "`{begin}`: one server connection for the whole transaction, got backend pids {pids:?}"
        );
    }

    // After COMMIT the session is no longer in a transaction: reads go to a replica again.
    let after = served_by(&client).await;
    assert!(
        cluster.replica_ports().contains(&after),
        "read after COMMIT served by {}",
        cluster.name_of(after)
    );

    // A whole transaction in one simple-query string.
    let rows = simple_rows(
        &client,
        "begin; select inet_server_port(), pg_backend_pid(); \
         insert into items (id, v) values (201, 'one-string'); \
         select inet_server_port(), pg_backend_pid(); commit",
    )
    .await
    .expect("one-string transaction");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0], rows[1],
        "same server connection in one transaction"
    );
    assert_eq!(rows[0][0].as_deref(), Some(primary.to_string().as_str()));

    // The tokio-postgres transaction API (BEGIN ... COMMIT).
    let tx = client.transaction().await.expect("transaction()");
    let a = tx
        .query_one("select inet_server_port(), pg_backend_pid()", &[])
        .await
        .expect("query in transaction");
    tx.execute("insert into items (id, v) values (202, 'api')", &[])
        .await
        .expect("insert in transaction");
    let b = tx
        .query_one("select inet_server_port(), pg_backend_pid()", &[])
        .await
        .expect("query in transaction");
    tx.commit().await.expect("commit");
    assert_eq!(a.get::<_, i32>(0) as u16, primary);
    assert_eq!(
        a.get::<_, i32>(1),
        b.get::<_, i32>(1),
        "backend pid changed"
    );

    // ROLLBACK discards the transaction's writes.
    client
        .batch_execute("begin; insert into items (id, v) values (300, 'gone'); rollback")
        .await
        .expect("rolled-back transaction");
    let kept = cluster.psql_admin(
        primary,
        "select string_agg(id::text, ',' order by id) from items where id >= 200",
    );
    assert_eq!(kept, "200,200,200,200,200,201,202");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_transactions_run_on_one_replica() {
    let cluster = Cluster::start_with_schema(2, SCHEMA);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let mut client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let replicas = cluster.replica_ports();

    for begin in [
        "begin read only",
        "BEGIN TRANSACTION READ ONLY",
        "start transaction read only",
        "start transaction isolation level repeatable read, read only",
    ] {
        client
            .simple_query(begin)
            .await
            .unwrap_or_else(|e| panic!("`{begin}`: {}", describe_error(&e)));
        let mut seen = Vec::new();
        for extra in ["", "from items limit 1", "where true", ""] {
            seen.push(
                where_am_i(&client, extra)
                    .await
                    .expect("statement in transaction"),
            );
        }
        seen.push(
            where_am_i_extended(&client)
                .await
                .expect("extended in transaction"),
        );
        client.simple_query("commit").await.expect("commit");

        let names: Vec<String> = seen.iter().map(|s| cluster.name_of(s.0)).collect();
        assert!(
            seen.iter().all(|s| replicas.contains(&s.0) && s.2),
            "`{begin}`: every statement must run on a replica, got {names:?}"
        );
        assert!(
            seen.iter().all(|s| s.0 == seen[0].0 && s.1 == seen[0].1),
            "`{begin}`: one server connection on one replica for the whole transaction, \
             got (server, backend pid) {:?}",
            seen.iter()
                .map(|s| (cluster.name_of(s.0), s.1))
                .collect::<Vec<_>>()
        );
    }

    // tokio-postgres's builder sends START TRANSACTION READ ONLY.
    let tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .expect("read-only transaction");
    let a = tx
        .query_one("select inet_server_port(), pg_backend_pid()", &[])
        .await
        .expect("query");
    let b = tx
        .query_one("select inet_server_port(), pg_backend_pid()", &[])
        .await
        .expect("query");
    tx.commit().await.expect("commit");
    let port = a.get::<_, i32>(0) as u16;
    assert!(
        replicas.contains(&port),
        "served by {}",
        cluster.name_of(port)
    );
    assert_eq!(
        (a.get::<_, i32>(0), a.get::<_, i32>(1)),
        (b.get::<_, i32>(0), b.get::<_, i32>(1))
    );

    // A write inside a read-only transaction fails as it would on PostgreSQL, and the session
    // recovers after ROLLBACK.
    client.simple_query("begin read only").await.expect("begin");
    let err = client
        .simple_query("insert into items (id, v) values (400, 'no')")
        .await
        .expect_err("insert in a read-only transaction");
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{}",
        describe_error(&err)
    );
    client.simple_query("rollback").await.expect("rollback");
    let _ = served_by(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hint_comments_force_the_target() {
    let cluster = Cluster::start(1);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let primary = [cluster.primary_port()];
    let replicas = cluster.replica_ports();

    let to_primary = ["/* pgway:primary */ select inet_server_port()"];
    let to_replica = ["/* pgway:replica */ select inet_server_port()"];
    let mut failures = Vec::new();
    for proto in [Proto::Simple, Proto::Extended] {
        failures.extend(misrouted(&cluster, &client, &to_primary, proto, &primary).await);
        failures.extend(misrouted(&cluster, &client, &to_replica, proto, &replicas).await);
        // The hint applies to its statement only.
        failures.extend(
            misrouted(
                &cluster,
                &client,
                &["select inet_server_port()"],
                proto,
                &replicas,
            )
            .await,
        );
    }
    assert_no_failures("hints", &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_functions_route_by_volatility() {
    let cluster = Cluster::start(1);
    // touch_user and default_volatility run their query with EXECUTE: pgway cannot prove
    // them read-only, so they stay on the primary (tests/functions.rs has the functions it
    // can prove read-only).
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app;\n\
         CREATE SCHEMA accounts;\n\
         CREATE FUNCTION accounts.get_user_by_identifier_v1(ident text) \
           RETURNS TABLE (port int, ident_out text) LANGUAGE sql STABLE \
           AS $$ SELECT inet_server_port(), ident $$;\n\
         CREATE FUNCTION accounts.port_immutable() RETURNS int LANGUAGE plpgsql IMMUTABLE \
           AS $$ BEGIN RETURN inet_server_port(); END $$;\n\
         CREATE FUNCTION public.stable_port() RETURNS int LANGUAGE sql STABLE \
           AS $$ SELECT inet_server_port() $$;\n\
         CREATE FUNCTION accounts.touch_user(ident text) RETURNS int LANGUAGE plpgsql VOLATILE \
           AS $$ DECLARE r int; BEGIN EXECUTE 'select inet_server_port()' INTO r; RETURN r; END $$;\n\
         CREATE FUNCTION accounts.default_volatility() RETURNS int LANGUAGE plpgsql \
           AS $$ DECLARE r int; BEGIN EXECUTE 'select inet_server_port()' INTO r; RETURN r; END $$;\n",
    );
    cluster.wait_replay();
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let primary = [cluster.primary_port()];
    let replicas = cluster.replica_ports();

    let reads = [
        "select port from accounts.get_user_by_identifier_v1('alice')",
        "select (accounts.get_user_by_identifier_v1('alice')).port",
        "select accounts.port_immutable()",
        "select stable_port()",
    ];
    let writes = [
        "select accounts.touch_user('alice')",
        "select accounts.default_volatility()",
        "select port from accounts.get_user_by_identifier_v1('alice') \
         where accounts.touch_user('bob') > 0",
    ];
    let mut failures = Vec::new();
    // Twice: the second round is answered from pgway's cache of function volatility.
    for _round in 0..2 {
        for proto in [Proto::Simple, Proto::Extended] {
            failures.extend(misrouted(&cluster, &client, &reads, proto, &replicas).await);
            failures.extend(misrouted(&cluster, &client, &writes, proto, &primary).await);
        }
    }
    // With a bound parameter, as an application would call it.
    match client
        .query(
            "select port, ident_out from accounts.get_user_by_identifier_v1($1)",
            &[&"carol"],
        )
        .await
    {
        Ok(rows) if rows.len() == 1 => {
            let port = rows[0].get::<_, i32>(0) as u16;
            let ident: String = rows[0].get(1);
            assert_eq!(ident, "carol");
            if !replicas.contains(&port) {
                failures.push(format!(
                    "get_user_by_identifier_v1($1): served by {}",
                    cluster.name_of(port)
                ));
            }
        }
        Ok(rows) => failures.push(format!(
            "get_user_by_identifier_v1($1): {} rows",
            rows.len()
        )),
        Err(e) => failures.push(format!(
            "get_user_by_identifier_v1($1): {}",
            describe_error(&e)
        )),
    }
    assert_no_failures("user functions", &failures);
}

/// Connects with `options` in the StartupMessage (a DSN's `options=-c ...`).
async fn connect_with_options(port: u16, options: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(DB)
        .options(options)
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(std::time::Duration::from_secs(10));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgway_target_routes_the_rest_of_the_session() {
    let cluster = Cluster::start(1);
    cluster.psql_admin(cluster.primary_port(), SCHEMA);
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app;\n\
         CREATE FUNCTION public.volatile_port() RETURNS int LANGUAGE plpgsql \
           AS $$ DECLARE r int; BEGIN EXECUTE 'select inet_server_port()' INTO r; RETURN r; END $$;\n",
    );
    cluster.wait_replay();
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let primary = [cluster.primary_port()];
    let replicas = cluster.replica_ports();
    let read = ["select inet_server_port()"];
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let mut failures = Vec::new();

    assert_eq!(
        simple_value(&client, "show pgway.target").await.unwrap(),
        "auto"
    );
    for proto in [Proto::Simple, Proto::Extended] {
        // primary: reads too, in both protocols, until RESET.
        client
            .batch_execute("SET pgway.target = 'primary'")
            .await
            .unwrap();
        assert_eq!(
            simple_value(&client, "show pgway.target").await.unwrap(),
            "primary"
        );
        failures.extend(misrouted(&cluster, &client, &read, proto, &primary).await);
        let in_recovery = simple_value(&client, "select pg_is_in_recovery()")
            .await
            .unwrap();
        assert_eq!(
            in_recovery, "f",
            "pgway.target = primary: read on a replica"
        );
        client.batch_execute("RESET pgway.target").await.unwrap();
        failures.extend(misrouted(&cluster, &client, &read, proto, &replicas).await);

        // replica: a read calling a volatile function goes to the replica; writes do not.
        client
            .batch_execute("SET pgway.target TO replica")
            .await
            .unwrap();
        failures.extend(
            misrouted(
                &cluster,
                &client,
                &["select volatile_port()"],
                proto,
                &replicas,
            )
            .await,
        );
        failures.extend(
            misrouted(
                &cluster,
                &client,
                &["select inet_server_port(), nextval('item_seq')"],
                proto,
                &primary,
            )
            .await,
        );
        // RESET ALL returns to the startup value (auto): the volatile function goes back
        // to the primary.
        client.batch_execute("RESET ALL").await.unwrap();
        failures.extend(
            misrouted(
                &cluster,
                &client,
                &["select volatile_port()"],
                proto,
                &primary,
            )
            .await,
        );
    }
    // Inside a transaction that rolls back, the SET does not count.
    client
        .batch_execute("BEGIN; SET pgway.target = 'primary'; ROLLBACK")
        .await
        .unwrap();
    failures.extend(misrouted(&cluster, &client, &read, Proto::Simple, &replicas).await);
    assert_no_failures("pgway.target", &failures);

    // Anything else is refused with 22023, and nothing changes.
    let err = client
        .batch_execute("SET pgway.target = 'elsewhere'")
        .await
        .expect_err("an invalid pgway.target");
    assert_eq!(sqlstate(&err), "22023", "{}", describe_error(&err));
    let err = client
        .query("SET pgway.target = 'elsewhere'", &[])
        .await
        .expect_err("an invalid pgway.target (extended protocol)");
    assert_eq!(sqlstate(&err), "22023", "{}", describe_error(&err));
    assert_eq!(served_by(&client).await, replicas[0]);

    // A migration DSN: the startup option sets it for the whole connection.
    let migration = connect_with_options(gw.port(), "-c pgway.target=primary")
        .await
        .unwrap();
    assert_eq!(served_by(&migration).await, primary[0]);
    assert_eq!(
        simple_value(&migration, "show pgway.target").await.unwrap(),
        "primary"
    );
    migration.batch_execute("RESET pgway.target").await.unwrap();
    assert_eq!(
        served_by(&migration).await,
        primary[0],
        "RESET goes back to the startup value"
    );
    let err = connect_with_options(gw.port(), "-c pgway.target=nowhere")
        .await
        .expect_err("an invalid startup pgway.target");
    assert_eq!(sqlstate(&err), "22023", "{}", describe_error(&err));
}

/// An unlogged table has no rows on a standby, which refuses to read it (`0A000 cannot
/// access temporary or unlogged relations during recovery`): pgway sends the read to the
/// primary instead of handing the client that error, in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_an_unlogged_table_are_answered_by_the_primary() {
    let cluster = Cluster::start_with_schema(
        1,
        "SET ROLE app;\n\
         CREATE UNLOGGED TABLE scratch (id int);\n\
         INSERT INTO scratch VALUES (1), (2), (3);\n",
    );
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let sql = "select inet_server_port(), count(*)::int from scratch";
    for proto in [Proto::Simple, Proto::Extended] {
        let (port, count) = match proto {
            Proto::Simple => {
                let rows = simple_rows(&client, sql)
                    .await
                    .unwrap_or_else(|e| panic!("simple read: {}", describe_error(&e)));
                (
                    rows[0][0].clone().unwrap_or_default(),
                    rows[0][1].clone().unwrap_or_default(),
                )
            }
            Proto::Extended => {
                let row = client
                    .query_one(sql, &[])
                    .await
                    .unwrap_or_else(|e| panic!("extended read: {}", describe_error(&e)));
                (
                    row.get::<_, i32>(0).to_string(),
                    row.get::<_, i32>(1).to_string(),
                )
            }
        };
        assert_eq!(port, cluster.primary_port().to_string(), "{proto:?}");
        assert_eq!(count, "3", "{proto:?}");
    }
}
