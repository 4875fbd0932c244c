//! Server connections and servers that die under pgway, against real servers: a pooled
//! connection terminated while idle is replaced without the client noticing; one
//! terminated under a statement fails that statement (an ERROR, not a closed connection)
//! and the session goes on; one terminated inside a transaction fails the transaction,
//! pgway answers its ROLLBACK and the session goes on. A primary that dies under a
//! transaction, or under a COMMIT, in a static topology; a replica killed under load, and
//! under a read whose first rows it had sent; a read cancelled by a recovery conflict.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// The ErrorResponse among `replies`, its fields by code; and the transaction status of
/// the ReadyForQuery that ends them.
fn error_and_status(replies: &[BackendMessage]) -> (std::collections::HashMap<u8, String>, u8) {
    let error = replies
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no ErrorResponse in {replies:?}"));
    let last = replies.last().expect("ReadyForQuery");
    assert_eq!(last.tag, b'Z', "{replies:?}");
    (error.fields(), last.body[0])
}

/// Waits until `count` backends on the server at `port` run a statement starting with
/// `prefix`, and returns their pids.
async fn running(cluster: &Cluster, port: u16, prefix: &str, count: usize) -> Vec<String> {
    eventually("the statements to run", WAIT, async || {
        let pids = cluster.psql_admin(
            port,
            &format!(
                "select string_agg(pid::text, ',') from pg_stat_activity \
                 where state = 'active' and query like '{prefix}%'"
            ),
        );
        let pids: Vec<String> = pids
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        (pids.len() >= count)
            .then_some(pids.clone())
            .ok_or(format!("{pids:?}"))
    })
    .await
}

/// pgway in front of `cluster` (static topology) that waits at most 2 s for a primary.
fn gateway_short_failover(cluster: &Cluster) -> Gateway {
    Gateway::start_toml(|listen| {
        gateway_toml(cluster, listen, "127.0.0.1:0", &GatewayOptions::default())
            + "failover_timeout = \"2s\"\n"
    })
}

/// The primary dies (killed: `pg_ctl stop -m immediate`) with a statement of a transaction
/// in flight: the client gets an ERROR and ReadyForQuery 'E', pgway answers its ROLLBACK;
/// reads go on at the replica while writes get a clear error; once the replica is
/// promoted the same session writes again, and nothing of the lost transaction exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_dying_under_a_transaction_fails_it_and_the_session_goes_on() {
    let mut cluster = Cluster::start_with_schema(1, "SET ROLE app;\nCREATE TABLE t (i int);\n");
    let gw = gateway_short_failover(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let replica = cluster.replica_ports()[0];
    let mut raw = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(
        query_ok(&mut raw, "begin; insert into t values (1)").await,
        b'T'
    );
    raw.send_message(b'Q', b"select pg_sleep(60)\0").await;
    running(&cluster, cluster.primary_port(), "select pg_sleep(60)", 1).await;

    cluster.kill_primary();

    let (fields, status) = error_and_status(&raw.until_ready().await);
    assert_eq!(
        fields.get(&b'S').map(String::as_str),
        Some("ERROR"),
        "{fields:?}"
    );
    assert_eq!(
        fields.get(&b'C').map(String::as_str),
        Some("08006"),
        "{fields:?}"
    );
    assert_eq!(status, b'E');
    let (fields, status) = error_and_status(&raw.query("select 1").await);
    assert_eq!(
        fields.get(&b'C').map(String::as_str),
        Some("25P02"),
        "{fields:?}"
    );
    assert_eq!(status, b'E');
    assert_eq!(query_ok(&mut raw, "rollback").await, b'I');

    // Reads go on at the replica; a write finds no primary and says so.
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    for _ in 0..5 {
        assert_eq!(served_by(&client).await, replica);
    }
    let e = client
        .batch_execute("insert into t values (2)")
        .await
        .expect_err("no primary to write to");
    assert_eq!(sqlstate(&e), "08006", "{e:?}");
    assert!(
        describe_error(&e).contains("no primary"),
        "{}",
        describe_error(&e)
    );

    // A promoted replica takes the writes, from the same session.
    cluster.promote_replica(0);
    let rows = eventually("a write after the promotion", WAIT, async || {
        let replies = raw
            .query("insert into t values (3) returning inet_server_port()")
            .await;
        match replies.iter().find(|m| m.tag == b'E') {
            Some(e) => Err(format!("{:?}", e.fields())),
            None => Ok(replies),
        }
    })
    .await;
    let port = rows
        .iter()
        .find(|m| m.tag == b'D')
        .map(|m| String::from_utf8_lossy(&m.body[6..]).into_owned());
    assert_eq!(port, Some(replica.to_string()));
    let rows = cluster.psql_admin(replica, "select string_agg(i::text, ',') from t");
    assert_eq!(rows, "3", "the lost transaction left nothing behind");
}

/// The primary dies while a COMMIT, and an autocommit INSERT, wait for a synchronous
/// standby: both may have committed, so both get 08007 (transaction resolution unknown),
/// not a plain connection error. Once the primary is back, the rows are there: committed
/// locally before it died, as PostgreSQL's own warning would have said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_flight_when_the_primary_dies_gets_08007() {
    let mut cluster = Cluster::start_with_schema(1, "SET ROLE app;\nCREATE TABLE t (i int);\n");
    let gw = gateway_short_failover(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let primary = cluster.primary_port();
    let mut raw = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(
        query_ok(&mut raw, "begin; insert into t values (1)").await,
        b'T'
    );
    // Commits now wait for a synchronous standby that never comes.
    cluster.psql_admin(
        primary,
        "alter system set synchronous_standby_names = 'nobody';\nselect pg_reload_conf();",
    );
    eventually("synchronous_standby_names to apply", WAIT, async || {
        let value = cluster.psql_admin(primary, "show synchronous_standby_names");
        (value == "nobody").then_some(()).ok_or(value)
    })
    .await;
    raw.send_message(b'Q', b"commit\0").await;
    let writer = {
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        tokio::spawn(async move {
            let result = client.batch_execute("insert into t values (2)").await;
            (client, result)
        })
    };
    eventually("both to wait for the standby", WAIT, async || {
        let waiting = cluster.psql_admin(
            primary,
            "select count(*) from pg_stat_activity where wait_event = 'SyncRep'",
        );
        (waiting == "2").then_some(()).ok_or(waiting)
    })
    .await;

    cluster.kill_primary();

    let (fields, status) = error_and_status(&raw.until_ready().await);
    assert_eq!(
        fields.get(&b'C').map(String::as_str),
        Some("08007"),
        "{fields:?}"
    );
    assert_eq!(status, b'I');
    let (writer, result) = writer.await.unwrap();
    let e = result.expect_err("the write's outcome is unknown");
    assert_eq!(sqlstate(&e), "08007", "{e:?}");
    // Both sessions go on.
    assert_eq!(query_ok(&mut raw, "select 1").await, b'I');
    assert_eq!(simple_value(&writer, "select 2").await.unwrap(), "2");

    cluster.start_primary();
    let rows = cluster.psql_admin(primary, "select string_agg(i::text, ',' order by i) from t");
    assert_eq!(
        rows, "1,2",
        "both had committed locally before the primary died"
    );
}

/// Clients reading through pgway while the replica is killed: reads in flight on it and
/// new ones go to the primary, and not one client sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_costs_no_client_an_error() {
    let mut cluster = Cluster::start(1);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let primary = cluster.primary_port();
    let replica = cluster.replica_ports()[0];
    let stop = Arc::new(AtomicBool::new(false));
    let served: Arc<Mutex<BTreeMap<u16, usize>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut readers = Vec::new();
    for r in 0..8 {
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        let (stop, served, errors) = (stop.clone(), served.clone(), errors.clone());
        readers.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // Simple and extended protocol in turn.
                let port = if (r + i).is_multiple_of(2) {
                    try_served_by(&client).await
                } else {
                    client
                        .query_one("select inet_server_port()", &[])
                        .await
                        .map(|row| row.get::<_, i32>(0) as u16)
                };
                match port {
                    Ok(port) => *served.lock().unwrap().entry(port).or_default() += 1,
                    Err(e) => errors.lock().unwrap().push(describe_error(&e)),
                }
                i += 1;
            }
        }));
    }
    let count = |port: u16| served.lock().unwrap().get(&port).copied().unwrap_or(0);
    eventually("reads on the replica", WAIT, async || {
        (count(replica) >= 200)
            .then_some(())
            .ok_or(count(replica).to_string())
    })
    .await;

    cluster.kill_replica(0);

    let before = count(primary);
    eventually("reads to go on at the primary", WAIT, async || {
        let after = count(primary) - before;
        (after >= 500).then_some(()).ok_or(after.to_string())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} client errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

/// A read whose server dies after part of its answer reached pgway (here 8 KiB of rows,
/// then a sleep on the replica) but none reached the client runs again on the primary:
/// pgway held the part back, and the client gets the primary's whole answer, no error.
/// Past 32 KiB an answer streams on, and the same death costs the client 08006 (not
/// 08007: a replica commits nothing); its session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_replica_dies_mid_answer_runs_again_on_the_primary() {
    let mut cluster = Cluster::start(1);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            extra: "[routing]\n\
                    read_only_functions = [\"pg_catalog.pg_sleep\", \"pg_catalog.pg_is_in_recovery\"]\n"
                .into(),
            ..GatewayOptions::default()
        },
    );
    let primary = cluster.primary_port();
    let replica = cluster.replica_ports()[0];
    let mut client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    for (sleep_at, rows) in [(100, 200), (400, 500)] {
        gw.wait_for_replica_reads(&cluster).await;
        // Rows of about 125 bytes (PostgreSQL sends each 8 KiB as it fills), then, on a
        // replica only, a long sleep.
        let sql = format!(
            "select g, repeat('x', 100) as pad, inet_server_port() as port, \
             pg_sleep(case when g = {sleep_at} and pg_is_in_recovery() then 60 else 0 end)::text \
             from generate_series(1, {rows}) g"
        );
        let reader = tokio::spawn(async move {
            let result = client.query(&sql, &[]).await;
            (client, result)
        });
        eventually("the read to sleep on the replica", WAIT, async || {
            let sleeping = cluster.psql_admin(
                replica,
                "select count(*) from pg_stat_activity where wait_event = 'PgSleep'",
            );
            (sleeping == "1").then_some(()).ok_or(sleeping)
        })
        .await;

        cluster.kill_replica(0);

        let result;
        (client, result) = reader.await.unwrap();
        if sleep_at == 100 {
            let rows = result.expect("the read runs again, unseen");
            let ports = rows.iter().fold(BTreeMap::new(), |mut ports, row| {
                *ports.entry(row.get::<_, i32>("port")).or_default() += 1;
                ports
            });
            assert_eq!(ports, BTreeMap::from([(i32::from(primary), 200usize)]));
        } else {
            let e = result.expect_err("399 rows had reached the client");
            assert_eq!(sqlstate(&e), "08006", "{e:?}");
        }
        assert_eq!(simple_value(&client, "select 1").await.unwrap(), "1");
        if sleep_at == 100 {
            // For the second pass.
            cluster.start_replica(0);
        }
    }
}

/// A read cancelled on the replica by a recovery conflict (the replica must replay a lock
/// its relation is held under; `max_standby_streaming_delay = 0` cancels at once) before
/// any of its answer reached the client runs again on the primary: the client gets the
/// primary's answer and no error, in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cancelled_by_a_recovery_conflict_runs_again_on_the_primary() {
    let cluster = Cluster::start_with_conf(1, "max_standby_streaming_delay = 0\n");
    cluster.psql_admin(
        cluster.primary_port(),
        "SET ROLE app;\nCREATE TABLE t (i int);\nINSERT INTO t VALUES (1);\n",
    );
    cluster.wait_replay();
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    let replica = cluster.replica_ports()[0];
    let client = Arc::new(connect(gw.port(), APP_USER, APP_PASSWORD).await);
    let sql = "/* pgway:replica */ select pg_is_in_recovery()::text, count(*)::text \
               from t, pg_sleep(2)";
    for extended in [false, true] {
        let read = {
            let client = client.clone();
            tokio::spawn(async move {
                if extended {
                    client
                        .query_one(sql, &[])
                        .await
                        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
                } else {
                    simple_rows(&client, sql).await.map(|rows| {
                        (
                            rows[0][0].clone().unwrap_or_default(),
                            rows[0][1].clone().unwrap_or_default(),
                        )
                    })
                }
            })
        };
        running(&cluster, replica, "/* pgway:replica */", 1).await;
        // The replica replays an ACCESS EXCLUSIVE lock on t, which its read holds.
        cluster.psql_admin(
            cluster.primary_port(),
            "begin;\nlock table t in access exclusive mode;\ncommit;",
        );
        let answer = read
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("extended {extended}: {}", describe_error(&e)));
        assert_eq!(
            answer,
            ("false".to_owned(), "1".to_owned()),
            "extended {extended}: answered by the primary"
        );
        let why = simple_value(&client, "show pgway.last_route")
            .await
            .unwrap();
        assert!(why.contains("recovery"), "{why}");
    }
    let replica_log =
        std::fs::read_to_string(cluster.dir().join("replica0.log")).unwrap_or_default();
    assert!(
        replica_log.contains("conflict with recovery"),
        "the replica cancelled the reads"
    );
}
