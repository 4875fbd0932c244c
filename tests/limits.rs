//! Client limits and timeouts (`[client]`, and `databases` in `[[users]]`), as pgbouncer
//! users configure them, against real servers: `max_connections` refusing a client that
//! opened with an SSLRequest, `idle_timeout`, `idle_in_transaction_timeout` (the server
//! connection rolled back and returned), `query_timeout` (the query cancelled on the
//! server), `max_prepared_statements` and a user's `databases`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::error::SqlState;

/// pgway in front of a primary with table `t`, with `client` lines in `[client]` and
/// `user` lines in the app user's `[[users]]` entry.
fn gateway(cluster: &Cluster, client: &str, user: &str) -> Gateway {
    Gateway::start_toml(|listen| {
        gateway_toml(
            cluster,
            listen,
            "127.0.0.1:0",
            &GatewayOptions {
                extra: format!("[client]\n{client}\n"),
                ..GatewayOptions::default()
            },
        )
        .replace(
            &format!("password = \"{APP_PASSWORD}\"\n"),
            &format!("password = \"{APP_PASSWORD}\"\n{user}\n"),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_connections_an_ssl_request_is_answered_then_refused_with_53300() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, "max_connections = 2", "");
    let _one = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let _two = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    // libpq's default sslmode (prefer) opens with an SSLRequest: pgway answers it ('N',
    // no certificate here), then refuses the StartupMessage with an error libpq can show.
    let mut raw = RawConn::connect(gw.port()).await;
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    let mut answer = [0u8; 1];
    let read = raw
        .read_raw(&mut answer)
        .await
        .expect("the SSLRequest's answer");
    assert_eq!((read, answer[0]), (1, b'N'));
    raw.send_startup(APP_USER, DB).await;
    assert_eq!(fatal_then_close(&mut raw).await, "53300");

    let refused = try_connect(gw.port(), APP_USER, APP_PASSWORD)
        .await
        .expect_err("a third client");
    assert_eq!(refused.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    assert!(
        describe_error(&refused).contains("too many clients"),
        "{refused:?}"
    );
    // psql, with its SSLRequest, shows the refusal itself.
    let out = std::process::Command::new(pg_bin("psql"))
        .args(["-X", "-c", "select 1", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={DB} \
             sslmode=prefer",
            gw.port()
        ))
        .output()
        .expect("running psql");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("sorry, too many clients already"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_silent_client_between_transactions() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, "idle_timeout = \"1s\"", "");
    let mut quiet = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(query_ok(&mut quiet, "select 1").await, b'I');
    // A client that keeps talking stays (each message starts the wait again).
    let busy = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        simple_value(&busy, "select 1")
            .await
            .expect("a busy client stays");
    }
    assert_eq!(fatal_then_close(&mut quiet).await, "08P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_timeout_rolls_back_and_returns_the_server_connection() {
    let cluster = Cluster::start_with_schema(0, "SET ROLE app;\nCREATE TABLE t (i int);\n");
    let gw = gateway(&cluster, "idle_in_transaction_timeout = \"1s\"", "");
    let mut holder = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(
        query_ok(&mut holder, "begin; insert into t values (1)").await,
        b'T'
    );
    assert_eq!(fatal_then_close(&mut holder).await, "25P03");

    // Rolled back, and the server connection went back to the pool rather than away:
    // the next client is served by the same backend, which is idle, not in a transaction.
    let primary = cluster.primary_port();
    let count = cluster.psql_admin(primary, "select count(*) from t");
    assert_eq!(count, "0", "the open transaction was rolled back");
    let states = cluster.psql_admin(
        primary,
        "select string_agg(state, ',') from pg_stat_activity where usename = 'app'",
    );
    assert!(!states.contains("idle in transaction"), "{states}");
    let next = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    simple_value(&next, "select 1")
        .await
        .expect("the pool serves on");
    // Outside a transaction the same client may stay silent (idle_timeout is off).
    let mut idle = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(query_ok(&mut idle, "select 1").await, b'I');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_the_query_on_the_server_and_the_session_goes_on() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, "query_timeout = \"1s\"", "");
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let e = client
        .simple_query("select pg_sleep(30)")
        .await
        .expect_err("a query past query_timeout");
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e:?}");
    assert_eq!(simple_value(&client, "select 1").await.unwrap(), "1");

    // Inside a transaction: the transaction fails, as a statement_timeout would make it.
    client.batch_execute("begin").await.unwrap();
    let e = client
        .batch_execute("select pg_sleep(30)")
        .await
        .expect_err("inside a transaction");
    assert_eq!(e.code(), Some(&SqlState::QUERY_CANCELED), "{e:?}");
    client.batch_execute("rollback").await.unwrap();
    // Nothing is left running on the server.
    let running = cluster.psql_admin(
        cluster.primary_port(),
        "select count(*) from pg_stat_activity where query like 'select pg_sleep(30)%' \
         and state = 'active'",
    );
    assert_eq!(running, "0");
    // A query that answers in time is not touched.
    assert_eq!(
        simple_value(&client, "select pg_sleep(0.2)::text || 'ok'")
            .await
            .unwrap(),
        "ok"
    );
    // Nor one that runs past an earlier request's deadline but answers within its own:
    // the session's timer, still set for that earlier deadline, fires and is set again.
    assert_eq!(simple_value(&client, "select 1").await.unwrap(), "1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        simple_value(&client, "select pg_sleep(0.8)::text || 'ok'")
            .await
            .expect("a query within its own query_timeout"),
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_prepared_statements_bounds_what_a_client_keeps() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, "max_prepared_statements = 3", "");
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let mut kept = Vec::new();
    for i in 0..3 {
        kept.push(
            client
                .prepare(&format!("select {i}::int4"))
                .await
                .expect("within the limit"),
        );
    }
    let e = client
        .prepare("select 3::int4")
        .await
        .expect_err("a fourth named statement");
    assert_eq!(
        e.code(),
        Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED),
        "{e:?}"
    );
    // The client goes on: its statements run, and closing one makes room.
    let row = client.query_one(&kept[1], &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    drop(kept.pop());
    let again = eventually("room after a Close", WAIT, async || {
        client
            .prepare("select 4::int4")
            .await
            .map_err(|e| describe_error(&e))
    })
    .await;
    assert_eq!(
        client
            .query_one(&again, &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reaches_only_the_databases_listed() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster, "", "databases = [\"appdb\"]");
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(
        simple_value(&client, "select current_database()")
            .await
            .unwrap(),
        DB
    );
    let refused = try_session(gw.port(), APP_USER, APP_PASSWORD, "postgres")
        .await
        .map(drop)
        .expect_err("a database not listed");
    assert_eq!(
        refused.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{refused:?}"
    );
    // Other users are not limited by it.
    let other = try_session(gw.port(), MD5_USER, MD5_PASSWORD, "postgres").await;
    assert!(other.is_ok(), "{:?}", other.err());
}
