//! Read-your-writes: after a write commits, the reads that must see it go only to a
//! replica that has replayed it, else to the primary. Replay on the replica is paused with
//! `pg_wal_replay_pause()`, so the replica is stale for as long as a test needs it to be.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::Client;

/// Pauses replay on every replica (and waits until it is paused).
fn pause_replay(cluster: &Cluster) {
    for port in cluster.replica_ports() {
        cluster.psql_admin(port, "select pg_wal_replay_pause()");
        wait_until_blocking("replay to pause", WAIT, || {
            let state = cluster.psql_admin(port, "select pg_get_wal_replay_pause_state()");
            if state.trim() == "paused" {
                Ok(())
            } else {
                Err(state)
            }
        });
    }
}

fn resume_replay(cluster: &Cluster) {
    for port in cluster.replica_ports() {
        cluster.psql_admin(port, "select pg_wal_replay_resume()");
    }
}

/// `select count(*) from <table>` and the port of the server that answered, in one
/// statement (simple protocol).
async fn count_and_port(client: &Client, table: &str) -> Result<(i64, u16), String> {
    let rows = simple_rows(
        client,
        &format!("select count(*), inet_server_port() from {table}"),
    )
    .await
    .map_err(|e| describe_error(&e))?;
    let row = rows.first().ok_or("no row")?;
    let value = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok((
        value(0).parse().map_err(|e| format!("{e}"))?,
        value(1).parse().map_err(|e| format!("{e}"))?,
    ))
}

/// Runs `sql` in `psql` through the gateway as `app`, statement by statement (`-f -`),
/// and returns its unaligned, tuples-only output.
fn psql(gw: &Gateway, sql: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(pg_bin("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .arg(gw.dsn(APP_USER, APP_PASSWORD, DB))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running psql");
    child
        .stdin
        .take()
        .expect("psql stdin")
        .write_all(sql.as_bytes())
        .expect("writing to psql");
    let out = child.wait_with_output().expect("psql output");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn gateway(cluster: &Cluster, scope: &str) -> Gateway {
    Gateway::start_with(
        cluster,
        GatewayOptions {
            extra: format!("[routing]\nread_your_writes = \"{scope}\"\n"),
            ..GatewayOptions::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_reads_its_writes_at_once_and_others_keep_the_replica() {
    let cluster = Cluster::start(1);
    let primary = cluster.primary_port();
    let replica = cluster.replica_ports()[0];
    let gw = gateway(&cluster, "user");
    gw.wait_for_replica_reads(&cluster).await;
    pause_replay(&cluster);

    // The quick start: create, insert, read at once.
    let writer = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    writer
        .batch_execute("create table t1(i int)")
        .await
        .expect("create");
    writer
        .batch_execute("insert into t1 values (1)")
        .await
        .expect("insert");
    let (count, port) = count_and_port(&writer, "t1").await.expect("read t1");
    assert_eq!(count, 1, "the writer sees its row");
    assert_eq!(
        port, primary,
        "the replica has not replayed it: the primary answers"
    );

    // SELECT ... INTO, then a read of the new table; prepared statements (extended).
    writer
        .batch_execute("select i into t2 from t1")
        .await
        .expect("select into");
    let (count, _) = count_and_port(&writer, "t2").await.expect("read t2");
    assert_eq!(count, 1);
    let insert = writer
        .prepare("insert into t1 values ($1)")
        .await
        .expect("prepare");
    writer.execute(&insert, &[&2i32]).await.expect("execute");
    let row = writer
        .query_one("select count(*) from t1 where i = $1", &[&2i32])
        .await
        .expect("prepared read");
    assert_eq!(
        row.get::<_, i64>(0),
        1,
        "the prepared read sees the prepared write"
    );

    // Another connection of the same user (user scope) sees the writes too.
    let pooled = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let (count, port) = count_and_port(&pooled, "t1").await.expect("read t1");
    assert_eq!((count, port), (2, primary));

    // No time window stands in for the position: a second later, still the primary.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (count, port) = count_and_port(&writer, "t1").await.expect("read t1");
    assert_eq!((count, port), (2, primary));

    // A user that did not write keeps reading from the replica, also after the release
    // statements pools send (they write nothing).
    let reader = connect(gw.port(), MD5_USER, MD5_PASSWORD).await;
    for _ in 0..3 {
        reader
            .batch_execute("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL")
            .await
            .expect("release statements");
        assert_eq!(served_by(&reader).await, replica);
    }

    // Once the replica replays, the writer's reads return to it.
    resume_replay(&cluster);
    eventually(
        "the writer's reads to return to the replica",
        WAIT,
        async || {
            let (count, port) = count_and_port(&writer, "t1").await?;
            if (count, port) == (2, replica) {
                Ok(())
            } else {
                Err(format!("count {count} from {}", cluster.name_of(port)))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_scope_covers_only_the_writing_connection_and_off_reads_stale() {
    let cluster = Cluster::start(1);
    let primary = cluster.primary_port();
    let replica = cluster.replica_ports()[0];
    cluster.psql_admin_db(
        primary,
        DB,
        "create table shared_t(i int); alter table shared_t owner to app;",
    );
    cluster.wait_replay();
    let session_gw = gateway(&cluster, "session");
    let off_gw = gateway(&cluster, "off");
    session_gw.wait_for_replica_reads(&cluster).await;
    off_gw.wait_for_replica_reads(&cluster).await;
    pause_replay(&cluster);

    let writer = connect(session_gw.port(), APP_USER, APP_PASSWORD).await;
    let other = connect(session_gw.port(), APP_USER, APP_PASSWORD).await;
    writer
        .batch_execute("insert into shared_t values (1)")
        .await
        .expect("insert");
    assert_eq!(
        count_and_port(&writer, "shared_t").await.expect("read"),
        (1, primary)
    );
    // Session scope: the same user's other connection is not held to it.
    assert_eq!(
        count_and_port(&other, "shared_t").await.expect("read"),
        (0, replica)
    );

    // With "off", the writer's own read goes to the stale replica: proof that the
    // checks above can fail.
    let off = connect(off_gw.port(), APP_USER, APP_PASSWORD).await;
    off.batch_execute("insert into shared_t values (2)")
        .await
        .expect("insert");
    assert_eq!(
        count_and_port(&off, "shared_t").await.expect("read"),
        (0, replica)
    );
    resume_replay(&cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_the_quick_start_sequence() {
    let cluster = Cluster::start(1);
    let gw = gateway(&cluster, "user");
    gw.wait_for_replica_reads(&cluster).await;
    pause_replay(&cluster);
    let out = psql(
        &gw,
        "create table q1(i int); insert into q1 values (1); select count(*) from q1;",
    );
    assert_eq!(out.trim(), "1", "{out}");
    // A transaction that wrote raises the floor at its COMMIT.
    let out = psql(
        &gw,
        "begin; insert into q1 values (2); commit; select count(*) from q1;",
    );
    assert_eq!(out.trim(), "2", "{out}");
    // COPY FROM STDIN writes too.
    let out = psql(
        &gw,
        "copy q1 from stdin;\n3\n\\.\nselect count(*) from q1;\n",
    );
    assert_eq!(out.trim(), "3", "{out}");
    resume_replay(&cluster);
}
