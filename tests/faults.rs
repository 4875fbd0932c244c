//! Server connections that die under pgway, against real servers: a pooled connection
//! terminated while idle is replaced without the client noticing; one terminated under a
//! statement fails that statement (an ERROR, not a closed connection) and the session goes
//! on; one terminated inside a transaction fails the transaction, pgway answers its
//! ROLLBACK and the session goes on.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use common::*;

/// pgway with one server connection per pool, in front of a primary alone (every
/// statement goes there).
fn gateway(cluster: &Cluster) -> Gateway {
    Gateway::start_with(
        cluster,
        GatewayOptions {
            pool_size: 1,
            ..GatewayOptions::default()
        },
    )
}

/// Terminates backend `pid` on the primary and waits until it is gone.
async fn terminate(cluster: &Cluster, pid: &str) {
    let primary = cluster.primary_port();
    cluster.psql_admin(primary, &format!("select pg_terminate_backend({pid})"));
    eventually("the backend to be gone", WAIT, async || {
        let left = cluster.psql_admin(
            primary,
            &format!("select count(*) from pg_stat_activity where pid = {pid}"),
        );
        (left == "0").then_some(()).ok_or(left)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pooled_connection_terminated_is_replaced_unseen() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster);
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let before = simple_value(&client, "select pg_backend_pid()::text")
        .await
        .unwrap();
    terminate(&cluster, &before).await;
    // The parked connection is dead: the next statement gets a new one, and no error.
    let after = simple_value(&client, "select pg_backend_pid()::text")
        .await
        .expect("no error after the idle connection died");
    assert_ne!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_terminated_under_a_statement_fails_only_that_statement() {
    let cluster = Cluster::start(0);
    let gw = gateway(&cluster);
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let sleeper = {
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        tokio::spawn(async move {
            let result = client.simple_query("select pg_sleep(60)").await.map(drop);
            (client, result)
        })
    };
    let primary = cluster.primary_port();
    let pid = eventually("the sleep to run", WAIT, async || {
        let pid = cluster.psql_admin(
            primary,
            "select pid from pg_stat_activity where query = 'select pg_sleep(60)'",
        );
        (!pid.is_empty()).then_some(pid).ok_or("not yet".to_owned())
    })
    .await;
    terminate(&cluster, &pid).await;
    let (sleeper, result) = sleeper.await.unwrap();
    let e = result.expect_err("the terminated statement fails");
    assert_eq!(sqlstate(&e), "57P01", "{e:?}");
    // The server's FATAL reached the client as an ERROR: its session goes on.
    assert_eq!(simple_value(&sleeper, "select 1").await.unwrap(), "1");
    assert_eq!(simple_value(&client, "select 2").await.unwrap(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_terminated_inside_a_transaction_fails_it_and_pgway_answers_rollback() {
    let cluster = Cluster::start_with_schema(0, "SET ROLE app;\nCREATE TABLE t (i int);\n");
    let gw = gateway(&cluster);
    let mut raw = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(
        query_ok(&mut raw, "begin; insert into t values (1)").await,
        b'T'
    );
    let replies = raw.query("select pg_backend_pid()").await;
    let pid = replies
        .iter()
        .find(|m| m.tag == b'D')
        .map(|m| String::from_utf8_lossy(&m.body[6..]).into_owned())
        .expect("a pid");
    terminate(&cluster, &pid).await;

    // The transaction is gone: an ERROR and ReadyForQuery 'E', the connection stays.
    let replies = raw.query("insert into t values (2)").await;
    let error = replies.iter().find(|m| m.tag == b'E').expect("an error");
    let fields = error.fields();
    assert_eq!(
        fields.get(&b'S').map(String::as_str),
        Some("ERROR"),
        "{fields:?}"
    );
    assert!(
        matches!(
            fields.get(&b'C').map(String::as_str),
            Some("08006" | "57P01")
        ),
        "{fields:?}"
    );
    assert_eq!(replies.last().expect("ReadyForQuery").body[0], b'E');
    // Anything but its end: 25P02, as PostgreSQL says in a failed transaction.
    let replies = raw.query("select 1").await;
    let error = replies.iter().find(|m| m.tag == b'E').expect("25P02");
    assert_eq!(error.fields().get(&b'C').map(String::as_str), Some("25P02"));
    // pgway answers the ROLLBACK itself; the session goes on, nothing was committed.
    assert_eq!(query_ok(&mut raw, "rollback").await, b'I');
    assert_eq!(query_ok(&mut raw, "insert into t values (3)").await, b'I');
    let rows = cluster.psql_admin(
        cluster.primary_port(),
        "select string_agg(i::text, ',') from t",
    );
    assert_eq!(rows, "3");
}
