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

/// Waits until `select count(*) from <table>` through `client` gives `expected`: the
/// count, and the port of the server that answered.
async fn count_comes_from(cluster: &Cluster, client: &Client, table: &str, expected: (i64, u16)) {
    eventually(
        &format!(
            "{} rows of {table} from {}",
            expected.0,
            cluster.name_of(expected.1)
        ),
        WAIT,
        async || match count_and_port(client, table).await? {
            got if got == expected => Ok(()),
            (count, port) => Err(format!("count {count} from {}", cluster.name_of(port))),
        },
    )
    .await;
}

/// Runs `sql` in `psql` through the gateway as `app`, statement by statement (`-f -`),
/// and returns its unaligned, tuples-only output.
fn psql(gw: &Gateway, sql: &str) -> String {
    psql_with_messages(gw, sql).0
}

/// [`psql`], and what it printed on stderr (notices, warnings).
fn psql_with_messages(gw: &Gateway, sql: &str) -> (String, String) {
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
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn gateway(cluster: &Cluster, scope: &str) -> Gateway {
    gateway_with_admin(cluster, scope, free_loopback_port())
}

fn gateway_with_admin(cluster: &Cluster, scope: &str, admin: u16) -> Gateway {
    let opts = GatewayOptions {
        extra: format!("[routing]\nread_your_writes = \"{scope}\"\n"),
        ..GatewayOptions::default()
    };
    Gateway::start_with_admin(cluster, opts, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_reads_its_writes_at_once_and_others_keep_the_replica() {
    let cluster = Cluster::start(1);
    let primary = cluster.primary_port();
    let replica = cluster.replica_ports()[0];
    let admin = free_loopback_port();
    let gw = gateway_with_admin(&cluster, "user", admin);
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
    assert_eq!(
        simple_value(&writer, "show pgway.last_route")
            .await
            .expect("show pgway.last_route"),
        "primary: read-your-writes floor not replayed by any replica within 20ms"
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
    count_comes_from(&cluster, &writer, "t1", (2, replica)).await;

    // /topology shows the replica's replay position and how reads under a floor went.
    let topology = topology_json(admin).await;
    let node = topology["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["addr"] == format!("127.0.0.1:{replica}"))
        .expect("the replica")
        .clone();
    assert_eq!(node["role"], "replica", "{topology}");
    assert!(node["replay_lsn"].is_string(), "{topology}");
    let outcomes = &topology["read_your_writes"];
    let count = |name: &str| outcomes[name].as_u64().unwrap_or(0);
    assert!(count("primary") >= 3, "{topology}");
    assert!(
        count("replica") + count("replica_after_wait") >= 1,
        "{topology}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_scope_covers_only_the_writing_connection_and_off_reads_stale() {
    let cluster = Cluster::start_with_schema(
        1,
        "create table shared_t(i int); alter table shared_t owner to app;",
    );
    let (primary, replica) = (cluster.primary_port(), cluster.replica_ports()[0]);
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

/// Connects as `md5user` with `-c name=value` startup options.
async fn connect_with_options(gw: &Gateway, options: &str) -> Result<Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(gw.port())
        .user(MD5_USER)
        .password(MD5_PASSWORD)
        .dbname(DB)
        .options(options)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| describe_error(&e))?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_hints_carry_positions_across_users() {
    let cluster = Cluster::start_with_schema(
        1,
        "create table tok(i int); alter table tok owner to app; grant select on tok to md5user;",
    );
    let (primary, replica) = (cluster.primary_port(), cluster.replica_ports()[0]);
    let gw = gateway(&cluster, "user");
    gw.wait_for_replica_reads(&cluster).await;
    pause_replay(&cluster);

    // A writes and reads its token, in both protocols.
    let a = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(
        simple_value(&a, "show pgway.last_write_lsn")
            .await
            .expect("show"),
        "0/0"
    );
    a.batch_execute("insert into tok values (1)")
        .await
        .expect("insert");
    let token = simple_value(&a, "show pgway.last_write_lsn")
        .await
        .expect("show");
    assert_ne!(token, "0/0");
    let extended: String = a
        .query_one("show pgway.last_write_lsn", &[])
        .await
        .expect("show, extended")
        .get(0);
    assert_eq!(extended, token);

    // B is another user: no floor of its own.
    let b = connect(gw.port(), MD5_USER, MD5_PASSWORD).await;
    assert_eq!(count_and_port(&b, "tok").await.expect("read"), (0, replica));
    // The token as a session setting.
    b.batch_execute(&format!("set pgway.min_lsn = '{token}'"))
        .await
        .expect("set min_lsn");
    assert_eq!(count_and_port(&b, "tok").await.expect("read"), (1, primary));
    b.batch_execute("reset pgway.min_lsn").await.expect("reset");
    assert_eq!(count_and_port(&b, "tok").await.expect("read"), (0, replica));
    // The same in the extended protocol, and for a read-only transaction.
    b.execute(&format!("set pgway.min_lsn = '{token}'"), &[])
        .await
        .expect("set min_lsn, extended");
    let shown: String = b
        .query_one("show pgway.min_lsn", &[])
        .await
        .expect("show min_lsn, extended")
        .get(0);
    assert_eq!(shown, token);
    let rows = simple_rows(
        &b,
        "begin read only; select count(*), inet_server_port() from tok; commit",
    )
    .await
    .expect("a read-only transaction");
    assert_eq!(
        rows[0],
        vec![Some("1".to_owned()), Some(primary.to_string())]
    );
    b.execute("reset pgway.min_lsn", &[])
        .await
        .expect("reset, extended");
    assert_eq!(count_and_port(&b, "tok").await.expect("read"), (0, replica));
    // The token as a hint, in both protocols.
    let rows = simple_rows(
        &b,
        &format!("/* pgway:min_lsn={token} */ select count(*), inet_server_port() from tok"),
    )
    .await
    .expect("hinted read");
    assert_eq!(
        rows[0],
        vec![Some("1".to_owned()), Some(primary.to_string())]
    );
    let row = b
        .query_one(
            &format!("/* pgway:replica pgway:min_lsn={token} */ select count(*), inet_server_port() from tok"),
            &[],
        )
        .await
        .expect("hinted read, extended");
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i32>(1)),
        (1, i32::from(primary))
    );
    // The token as a startup option.
    let c = connect_with_options(&gw, &format!("-c pgway.min_lsn={token}"))
        .await
        .expect("connect with the token");
    assert_eq!(count_and_port(&c, "tok").await.expect("read"), (1, primary));

    // Bad tokens and a read-only setting are refused with the server's codes.
    let e = b
        .batch_execute("set pgway.min_lsn = 'yesterday'")
        .await
        .expect_err("a malformed position");
    assert_eq!(sqlstate(&e), "22P02", "{}", describe_error(&e));
    let e = b
        .batch_execute("set pgway.last_write_lsn = '0/1'")
        .await
        .expect_err("a read-only setting");
    assert_eq!(sqlstate(&e), "55P02", "{}", describe_error(&e));
    let e = connect_with_options(&gw, "-c pgway.min_lsn=soon")
        .await
        .expect_err("a malformed startup position");
    assert!(e.contains("22P02"), "{e}");

    // pgway:fresh sees a row committed directly on the primary, not through pgway.
    cluster.psql_admin_db(primary, DB, "insert into tok values (2)");
    assert_eq!(count_and_port(&b, "tok").await.expect("read"), (0, replica));
    let rows = simple_rows(
        &b,
        "/* pgway:fresh */ select count(*), inet_server_port() from tok",
    )
    .await
    .expect("fresh read");
    assert_eq!(
        rows[0],
        vec![Some("2".to_owned()), Some(primary.to_string())]
    );
    resume_replay(&cluster);
    eventually(
        "a fresh read to be served by the replica",
        WAIT,
        async || {
            let rows = simple_rows(
                &b,
                "/* pgway:fresh */ select count(*), inet_server_port() from tok",
            )
            .await
            .map_err(|e| describe_error(&e))?;
            if rows[0] == vec![Some("2".to_owned()), Some(replica.to_string())] {
                Ok(())
            } else {
                Err(format!("{rows:?}"))
            }
        },
    )
    .await;
}

/// A write under a floor, then the primary dies and a replica that never received that
/// write is promoted; a second replica follows the new primary. The floor lies on the old
/// primary's timeline, beyond anything the new one will have for a long time: after the
/// promotion it counts as the new primary's position, so the writer's reads go to the new
/// replica instead of waiting in vain and falling back to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_promotion_the_old_primarys_positions_make_no_read_wait() {
    let mut cluster = Cluster::start(2);
    cluster.psql_admin_db(
        cluster.primary_port(),
        DB,
        "create table big(i int, pad text); alter table big owner to app;",
    );
    cluster.wait_replay();
    let [new_primary, new_replica] = cluster.replica_ports()[..] else {
        panic!("two replicas");
    };
    let gw = gateway(&cluster, "user");
    gw.wait_for_replica_reads(&cluster).await;

    // Neither replica receives the write.
    cluster.stop_replica(0);
    cluster.stop_replica(1);
    let writer = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    writer
        .batch_execute(
            "insert into big select g, repeat('x', 200) from generate_series(1, 20000) g",
        )
        .await
        .expect("a write of some megabytes of WAL");
    cluster.stop_primary();
    cluster.start_replica(0);
    cluster.promote_replica(0);
    cluster.repoint_replica(1, new_primary);
    cluster.start_replica(1);

    wait_for_new_primary(gw.port(), new_primary).await;
    count_comes_from(&cluster, &writer, "big", (0, new_replica)).await;
}

/// The name and prepare time of pgway's WAL position statement on the primary connection
/// the client's transaction runs on (with `pool.size = 1`, the only one).
async fn position_statement(client: &Client, primary: u16) -> Vec<Vec<Option<String>>> {
    client.batch_execute("begin").await.expect("begin");
    assert_eq!(served_by(client).await, primary);
    let rows = simple_rows(
        client,
        "select name, prepare_time::text from pg_prepared_statements \
         where statement = 'SELECT pg_catalog.pg_current_wal_insert_lsn()'",
    )
    .await
    .expect("pg_prepared_statements");
    client.batch_execute("commit").await.expect("commit");
    rows
}

/// A gateway with `read_your_writes = "user"` and `pool.size = 1` (one primary connection,
/// whose prepared statements a test can look at), once it reads from the replica.
async fn one_connection_gateway(cluster: &Cluster) -> Gateway {
    let opts = GatewayOptions {
        pool_size: 1,
        extra: "[routing]\nread_your_writes = \"user\"\n".into(),
        ..GatewayOptions::default()
    };
    let gw = Gateway::start_with(cluster, opts);
    gw.wait_for_replica_reads(cluster).await;
    gw
}

/// A write in a transaction of its own (`begin`, the write, a lone `commit`, each a
/// request), whose `COMMIT` carries the position query.
async fn write_in_transaction(client: &Client, sql: &str) {
    for step in ["begin", sql, "commit"] {
        client.batch_execute(step).await.expect(step);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autocommit_writes_prepare_nothing_and_the_commits_statement_outlives_a_deallocate() {
    let cluster = Cluster::start(1);
    let primary = cluster.primary_port();
    let replica = cluster.replica_ports()[0];
    let gw = one_connection_gateway(&cluster).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    // Writes that commit on their own ask the position with a FunctionCall: it is
    // recorded, and nothing is prepared on the connection for it.
    let before = last_write(&client).await;
    client
        .batch_execute("create table p(i int)")
        .await
        .expect("create");
    let created = last_write(&client).await;
    assert_ne!(
        before, created,
        "the autocommit write's position was recorded"
    );
    // Recorded from the FunctionCall's answer: a lost position would have made reading
    // `pgway.last_write_lsn` look the primary's position up on a connection of its own.
    let lookups = cluster.psql_admin(
        primary,
        "select count(*) from pg_stat_activity \
         where query like '%pg_current_wal_insert_lsn() - ''0/0''%'",
    );
    assert_eq!(lookups.trim(), "0", "no look-up of the primary's position");
    assert_eq!(
        position_statement(&client, primary).await,
        Vec::<Vec<Option<String>>>::new(),
        "no statement for an autocommit write's position"
    );

    // A lone COMMIT's position query is a statement prepared by the first one, then
    // only executed.
    write_in_transaction(&client, "insert into p values (0)").await;
    let first = position_statement(&client, primary).await;
    assert_eq!(first.len(), 1, "one position statement: {first:?}");
    assert_ne!(last_write(&client).await, created, "the COMMIT's position");
    for i in 1..3 {
        write_in_transaction(&client, &format!("insert into p values ({i})")).await;
    }
    assert_eq!(
        position_statement(&client, primary).await,
        first,
        "the same statement, prepared at the same time"
    );
    let name = first[0][0].clone().expect("statement name");

    // The replica has everything so far; it stops replaying before the next write.
    count_comes_from(&cluster, &client, "p", (3, replica)).await;
    pause_replay(&cluster);

    // A COMMIT whose position query finds its statement gone (dropped in the same
    // transaction): the position is unknown, so the read after it goes where the write
    // is.
    client
        .batch_execute(&format!(
            "begin; deallocate \"{name}\"; insert into p values (3)"
        ))
        .await
        .expect("a write that drops the position statement");
    client.batch_execute("commit").await.expect("commit");
    assert_eq!(
        count_and_port(&client, "p").await.expect("read p"),
        (4, primary),
        "the write's position is unknown: the read goes where the write is"
    );

    // The next COMMIT prepares it again, and its position is known.
    let before = last_write(&client).await;
    write_in_transaction(&client, "insert into p values (4)").await;
    assert_ne!(
        before,
        last_write(&client).await,
        "the write's position was recorded"
    );
    let again = position_statement(&client, primary).await;
    assert_eq!(again.len(), 1, "prepared again: {again:?}");
    assert_ne!(again, first, "a new prepare time");
    assert_eq!(
        count_and_port(&client, "p").await.expect("read p"),
        (5, primary)
    );
    resume_replay(&cluster);
}

/// pgway asks an autocommit write's position by the OID of
/// `pg_catalog.pg_current_wal_insert_lsn()`: the server the tests run has it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_position_functions_oid_is_pg_current_wal_insert_lsn() {
    let cluster = Cluster::start(0);
    let client = connect(cluster.primary_port(), APP_USER, APP_PASSWORD).await;
    let oid = simple_value(
        &client,
        "select 'pg_catalog.pg_current_wal_insert_lsn()'::regprocedure::oid",
    )
    .await
    .expect("the function's OID");
    assert_eq!(
        oid,
        pgway::frontend::session::CURRENT_WAL_INSERT_LSN.to_string()
    );
}

/// `show pgway.last_write_lsn` through `client`.
async fn last_write(client: &Client) -> String {
    simple_value(client, "show pgway.last_write_lsn")
        .await
        .expect("show pgway.last_write_lsn")
}

/// A lone `COMMIT` goes with the position query behind it and one Sync for both: the
/// client sees the simple query's answer, the read after it sees the write, and a COMMIT
/// that fails (a deferred constraint) reports its own error and leaves the connection, and
/// the position statement pgway parsed with it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_commit_carries_its_position_and_a_failed_one_its_error() {
    let cluster = Cluster::start(1);
    let primary = cluster.primary_port();
    cluster.psql_admin(
        primary,
        "create table parent(id int primary key); \
         create table child(pid int references parent deferrable initially deferred); \
         grant all on parent, child to app",
    );
    cluster.wait_replay();
    let gw = one_connection_gateway(&cluster).await;
    pause_replay(&cluster);
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;

    // The first commit on the connection fails at COMMIT: the position statement pgway
    // parsed behind it was skipped with it.
    client.batch_execute("begin").await.expect("begin");
    client
        .batch_execute("insert into child values (42)")
        .await
        .expect("insert, checked at commit");
    let e = client
        .batch_execute("commit")
        .await
        .expect_err("the deferred constraint fails at COMMIT");
    assert_eq!(sqlstate(&e), "23503", "{}", describe_error(&e));
    assert_eq!(
        simple_value(&client, "select count(*) from child")
            .await
            .expect("the connection goes on"),
        "0"
    );

    // A commit that succeeds: its position is recorded before the client has its answer.
    let before = last_write(&client).await;
    client.batch_execute("begin").await.expect("begin");
    client
        .batch_execute("insert into parent values (42)")
        .await
        .expect("insert parent");
    client
        .batch_execute("insert into child values (42)")
        .await
        .expect("insert child");
    let messages = client.simple_query("END;").await.expect("END commits");
    assert!(
        matches!(
            messages.as_slice(),
            [tokio_postgres::SimpleQueryMessage::CommandComplete(0)]
        ),
        "the answer of a simple query, no more: {messages:?}"
    );
    let after = last_write(&client).await;
    assert_ne!(before, after, "the commit's position was recorded");
    let insert_lsn = cluster.psql_admin(
        primary,
        &format!("select pg_current_wal_insert_lsn() >= '{after}'::pg_lsn"),
    );
    assert_eq!(
        insert_lsn.trim(),
        "t",
        "{after} is a position the primary has reached"
    );
    assert_eq!(
        count_and_port(&client, "child").await.expect("read child"),
        (1, primary),
        "the replica has not replayed the commit: the primary answers"
    );

    // The position statement was parsed again once, after the failed COMMIT.
    let statements = position_statement(&client, primary).await;
    assert_eq!(
        statements.len(),
        1,
        "one position statement: {statements:?}"
    );

    // The same in the extended protocol (Parse, Bind, Execute, Sync of `commit`): the
    // position joins the client's batch before its Sync.
    client.batch_execute("begin").await.expect("begin");
    client
        .execute("insert into child values (43)", &[])
        .await
        .expect("insert, checked at commit");
    let e = client
        .execute("commit", &[])
        .await
        .expect_err("the deferred constraint fails at COMMIT");
    assert_eq!(sqlstate(&e), "23503", "{}", describe_error(&e));
    client.batch_execute("begin").await.expect("begin");
    client
        .execute("insert into child values (42)", &[])
        .await
        .expect("insert child");
    client.execute("commit", &[]).await.expect("commit");
    let extended = last_write(&client).await;
    assert_ne!(
        extended, after,
        "the extended COMMIT's position was recorded"
    );
    assert_eq!(
        count_and_port(&client, "child").await.expect("read child"),
        (2, primary),
        "the replica has not replayed the commit: the primary answers"
    );

    // Once the replica replays the commit, reads go back there.
    resume_replay(&cluster);
    let replica = cluster.replica_ports()[0];
    count_comes_from(&cluster, &client, "child", (2, replica)).await;

    // psql: a notice a deferred trigger raises at COMMIT reaches the client, the
    // position's answer does not, and the write is there to read.
    cluster.psql_admin(
        primary,
        "create function noisy() returns trigger language plpgsql as \
         $$ begin raise notice 'checked % at commit', new.pid; return null; end $$; \
         create constraint trigger noisy after insert on child \
         deferrable initially deferred for each row execute function noisy()",
    );
    let (out, messages) = psql_with_messages(
        &gw,
        "begin;\ninsert into child values (42);\ncommit;\nselect count(*) from child;\n",
    );
    assert_eq!(out, "3", "{messages}");
    assert_eq!(
        messages.matches("NOTICE").count(),
        1,
        "one notice, the trigger's: {messages}"
    );
    assert!(messages.contains("checked 42 at commit"), "{messages}");
}

/// A `COMMIT` whose Sync comes in a later write than its Execute (the client flushes in
/// between, as libpq's pipeline mode may): the read after it still sees the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_flushed_before_its_sync_raises_the_floor() {
    let cluster = Cluster::start(1);
    let primary = cluster.primary_port();
    let gw = gateway(&cluster, "user");
    gw.wait_for_replica_reads(&cluster).await;
    let reader = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    reader
        .batch_execute("create table f(i int)")
        .await
        .expect("create");
    let replica = cluster.replica_ports()[0];
    count_comes_from(&cluster, &reader, "f", (0, replica)).await;
    pause_replay(&cluster);

    let mut raw = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    raw.query("begin").await;
    raw.query("insert into f values (1)").await;
    let commit_then_flush = [
        message(b'P', b"\0commit\0\0\0"),
        message(b'B', &[0; 8]),
        message(b'E', &[0; 5]),
        message(b'H', b""),
    ]
    .concat();
    raw.send(&commit_then_flush).await;
    loop {
        let m = raw.recv_message().await;
        assert_ne!(m.tag, b'E', "{m:?}");
        if m.tag == b'C' {
            break;
        }
    }
    raw.send(&message(b'S', b"")).await;
    let ready = raw.until_ready().await;
    assert!(ready.iter().all(|m| m.tag != b'E'), "{ready:?}");

    assert_eq!(
        count_and_port(&reader, "f").await.expect("read f"),
        (1, primary),
        "the replica has not replayed the commit: the primary answers"
    );
    resume_replay(&cluster);
}
