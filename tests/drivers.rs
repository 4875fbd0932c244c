//! Real drivers through pgway, each with a pool of several connections, reading (replica) and
//! writing (primary) with prepared statements and per-connection settings: tokio-postgres,
//! `pgbench -M extended|prepared`, asyncpg, psycopg 3, pgjdbc and node-postgres.
//!
//! The Python, Java and JavaScript programs live in `tests/drivers/`; each exits non-zero
//! with a list of failed checks. `tests/drivers/setup.sh` installs what they need (a venv
//! with asyncpg and psycopg from PyPI, Debian's pgjdbc, `pg` from the npm registry) the first
//! time, and is quick when everything is there; it fails, loudly, when a registry is
//! unreachable.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use tokio::process::Command;

fn drivers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

fn show(out: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Runs `cmd` with a deadline; kills it when the deadline passes.
async fn run_with_deadline(mut cmd: Command, what: &str, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {what}: {e}"));
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// Installs the driver(s) for `target` (python, java, node) unless already there.
async fn setup(target: &str) {
    let mut cmd = Command::new("bash");
    cmd.arg(drivers_dir().join("setup.sh")).arg(target);
    let out = run_with_deadline(
        cmd,
        &format!("tests/drivers/setup.sh {target}"),
        Duration::from_secs(600),
    )
    .await;
    assert!(
        out.status.success(),
        "tests/drivers/setup.sh {target} failed ({}): the {target} driver could not be \
         installed\n{}",
        out.status,
        show(&out)
    );
}

/// A cluster (primary + 1 replica) and pgway with a pool of 4 connections per node.
async fn start() -> (Gateway, Cluster) {
    let cluster = Cluster::start(1);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            pool_size: 4,
            wait_timeout: "30s".into(),
            // A read right after a write waits for the replica to replay it; on a loaded
            // machine that can take longer than the default 20ms, and these tests check
            // where reads go, not the wait.
            extra: "[routing]\nread_your_writes_wait = \"5s\"\n".into(),
            ..GatewayOptions::default()
        },
    );
    gw.wait_for_replica_reads(&cluster).await;
    (gw, cluster)
}

/// Runs a driver program with the connection settings in its environment and asserts it
/// exits 0; prints its output either way.
async fn run_driver(gw: &Gateway, cluster: &Cluster, prefix: &str, program: &str, args: &[&str]) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(drivers_dir())
        .env("PGWAY_HOST", "127.0.0.1")
        .env("PGWAY_PORT", gw.port().to_string())
        .env("PGWAY_USER", APP_USER)
        .env("PGWAY_PASSWORD", APP_PASSWORD)
        .env("PGWAY_DB", DB)
        .env("PRIMARY_PORT", cluster.primary_port().to_string())
        .env("REPLICA_PORT", cluster.replica_ports()[0].to_string())
        .env("PREFIX", prefix)
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGPASSWORD")
        .env_remove("PGDATABASE")
        .env_remove("PGOPTIONS")
        .env_remove("PGAPPNAME")
        .env_remove("PGTZ")
        .env_remove("PGSSLMODE");
    let what = format!("{program} {}", args.join(" "));
    let out = run_with_deadline(cmd, &what, Duration::from_secs(240)).await;
    println!("{what}: {}\n{}", out.status, show(&out));
    assert!(
        out.status.success(),
        "{what} failed ({}): see its output\n{}",
        out.status,
        show(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_with_a_pool() {
    setup("python").await;
    let (gw, cluster) = start().await;
    let python = drivers_dir().join(".venv/bin/python");
    run_driver(
        &gw,
        &cluster,
        "asyncpg",
        python.to_str().expect("utf-8 path"),
        &["python/asyncpg_check.py"],
    )
    .await;
}

/// Read-your-writes: the statements asyncpg's pool runs at every release write nothing, so
/// a pool that only reads keeps all its reads on the replica, even while the replica's
/// replay is paused (a raised floor would send them to the primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_pool_that_only_reads_stays_on_the_replica() {
    setup("python").await;
    let (gw, cluster) = start().await;
    let replica = cluster.replica_ports()[0];
    cluster.psql_admin(replica, "select pg_wal_replay_pause()");
    let python = drivers_dir().join(".venv/bin/python");
    run_driver(
        &gw,
        &cluster,
        "asyncpg_reads",
        python.to_str().expect("utf-8 path"),
        &["python/asyncpg_reads_only.py"],
    )
    .await;
    cluster.psql_admin(replica, "select pg_wal_replay_resume()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_with_prepare_true() {
    setup("python").await;
    let (gw, cluster) = start().await;
    let python = drivers_dir().join(".venv/bin/python");
    run_driver(
        &gw,
        &cluster,
        "psycopg",
        python.to_str().expect("utf-8 path"),
        &["python/psycopg_check.py"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_with_prepare_threshold_reached() {
    setup("java").await;
    let (gw, cluster) = start().await;
    let jar =
        std::env::var("PGWAY_JDBC_JAR").unwrap_or_else(|_| "/usr/share/java/postgresql.jar".into());
    run_driver(
        &gw,
        &cluster,
        "pgjdbc",
        "java",
        &[
            "-Duser.timezone=Asia/Tokyo",
            "-cp",
            &jar,
            "java/PgjdbcCheck.java",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_with_a_pool() {
    setup("node").await;
    let (gw, cluster) = start().await;
    run_driver(&gw, &cluster, "nodepg", "node", &["node/pg_check.js"]).await;
}

// ---------------------------------------------------------------------------------------
// tokio-postgres: typed parameters and results, named and unnamed statements
// ---------------------------------------------------------------------------------------

/// One row of the typed table.
#[derive(Debug, Clone, PartialEq)]
struct Typed {
    id: i32,
    small: i16,
    big: i64,
    name: String,
    flag: bool,
    score: f64,
    ratio: f32,
    data: Vec<u8>,
    tags: Vec<String>,
    note: Option<String>,
}

impl Typed {
    fn new(id: i32) -> Typed {
        Typed {
            id,
            small: (id % 300) as i16 - 150,
            big: i64::from(id) * 10_000_000_000 + 7,
            name: format!("name-{id}-é✓"),
            flag: id % 3 == 0,
            score: f64::from(id) / 8.0 + 0.5,
            ratio: id as f32 / 4.0,
            data: vec![0, 1, 2, 255, id as u8],
            tags: vec![format!("t{id}"), "x,y".into(), "\"q\"".into()],
            note: if id % 2 == 0 {
                None
            } else {
                Some(format!("note {id}"))
            },
        }
    }

    fn from_row(row: &tokio_postgres::Row) -> Typed {
        Typed {
            id: row.get("id"),
            small: row.get("small"),
            big: row.get("big"),
            name: row.get("name"),
            flag: row.get("flag"),
            score: row.get("score"),
            ratio: row.get("ratio"),
            data: row.get("data"),
            tags: row.get("tags"),
            note: row.get("note"),
        }
    }
}

const TYPED_TABLE: &str = "create table typed (id int4 primary key, small int2 not null, \
    big int8 not null, name text not null, flag bool not null, score float8 not null, \
    ratio float4 not null, data bytea not null, tags text[] not null, note varchar(40))";

const TYPED_COLUMNS: &str = "id, small, big, name, flag, score, ratio, data, tags, note";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_typed_prepared_queries_from_several_clients() {
    const CLIENTS: i32 = 4;
    const ROWS: i32 = 15;
    let (gw, cluster) = start().await;
    let (primary, replica) = (cluster.primary_port(), cluster.replica_ports()[0]);
    let admin = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    admin
        .batch_execute(TYPED_TABLE)
        .await
        .unwrap_or_else(|e| panic!("{TYPED_TABLE}: {}", describe_error(&e)));

    // Writers: each client prepares its insert once and runs it for its rows.
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let port = gw.port();
        tasks.push(tokio::spawn(async move {
            let client = connect(port, APP_USER, APP_PASSWORD).await;
            let insert = client
                .prepare(&format!(
                    "insert into typed ({TYPED_COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     returning inet_server_port()"
                ))
                .await
                .unwrap_or_else(|e| panic!("client {c}: prepare insert: {}", describe_error(&e)));
            let mut ports = Vec::new();
            for k in 0..ROWS {
                let t = Typed::new(c * 100 + k);
                let row = client
                    .query_one(
                        &insert,
                        &[
                            &t.id, &t.small, &t.big, &t.name, &t.flag, &t.score, &t.ratio,
                            &t.data, &t.tags, &t.note,
                        ],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("client {c}: insert {}: {}", t.id, describe_error(&e)));
                ports.push(row.get::<_, i32>(0) as u16);
            }
            ports
        }));
    }
    for t in tasks {
        let ports = t.await.expect("writer task");
        assert_eq!(
            port_set(ports),
            port_set([primary]),
            "prepared inserts ran on"
        );
    }
    cluster.wait_replay();

    // Readers: a named statement with typed parameters, many times from each client.
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let port = gw.port();
        tasks.push(tokio::spawn(async move {
            let client = connect(port, APP_USER, APP_PASSWORD).await;
            let by_id = client
                .prepare(&format!(
                    "select {TYPED_COLUMNS}, inet_server_port() as port from typed where id = $1"
                ))
                .await
                .unwrap_or_else(|e| panic!("client {c}: prepare select: {}", describe_error(&e)));
            let range = client
                .prepare(
                    "select count(*), sum(big)::int8, bool_and(flag or not flag) from typed \
                     where id >= $1 and id < $2 and name like $3",
                )
                .await
                .unwrap_or_else(|e| panic!("client {c}: prepare select: {}", describe_error(&e)));
            let mut ports = Vec::new();
            for round in 0..3 {
                for w in 0..CLIENTS {
                    for k in 0..ROWS {
                        let id = w * 100 + k;
                        let row = client.query_one(&by_id, &[&id]).await.unwrap_or_else(|e| {
                            panic!("client {c}: select {id}: {}", describe_error(&e))
                        });
                        assert_eq!(
                            Typed::from_row(&row),
                            Typed::new(id),
                            "client {c}, round {round}: row {id} read back"
                        );
                        ports.push(row.get::<_, i32>("port") as u16);
                    }
                }
                let row = client
                    .query_one(&range, &[&0i32, &1000i32, &"name-%"])
                    .await
                    .unwrap_or_else(|e| panic!("client {c}: aggregate: {}", describe_error(&e)));
                let want_sum: i64 = (0..CLIENTS)
                    .flat_map(|w| (0..ROWS).map(move |k| Typed::new(w * 100 + k).big))
                    .sum();
                assert_eq!(
                    (
                        row.get::<_, i64>(0),
                        row.get::<_, i64>(1),
                        row.get::<_, bool>(2)
                    ),
                    (i64::from(CLIENTS * ROWS), want_sum, true)
                );
                // Unnamed statements with explicit parameter types (query_typed).
                let row = client
                    .query_typed(
                        "select $1::int8 * 2, $2 || '!', inet_server_port()",
                        &[
                            (&21i64, tokio_postgres::types::Type::INT8),
                            (&"typed", tokio_postgres::types::Type::TEXT),
                        ],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("client {c}: query_typed: {}", describe_error(&e)))
                    .remove(0);
                assert_eq!(
                    (row.get::<_, i64>(0), row.get::<_, String>(1)),
                    (42, "typed!".into())
                );
                ports.push(row.get::<_, i32>(2) as u16);
            }
            ports
        }));
    }
    for t in tasks {
        let ports = t.await.expect("reader task");
        assert_eq!(
            port_set(ports),
            port_set([replica]),
            "prepared selects ran on"
        );
    }

    // A typed update and a read inside a transaction: all on the primary.
    let mut client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let tx = client.transaction().await.expect("BEGIN");
    let n = tx
        .execute(
            "update typed set note = $1 where flag = $2",
            &[&Some("flagged"), &true],
        )
        .await
        .expect("typed update");
    let row = tx
        .query_one(
            "select count(*), inet_server_port() from typed where note = $1",
            &[&"flagged"],
        )
        .await
        .expect("read in transaction");
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i32>(1) as u16),
        (n as i64, primary)
    );
    tx.commit().await.expect("COMMIT");
}

// ---------------------------------------------------------------------------------------
// pgbench
// ---------------------------------------------------------------------------------------

/// Runs pgbench with `args` against `dsn` and checks: exit 0, transactions processed, and
/// zero failed. Returns the number processed.
async fn pgbench(dsn: &str, args: &[&str]) -> u64 {
    let mut cmd = Command::new(pg_bin("pgbench"));
    cmd.args(args)
        .arg(dsn)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env_remove("PGSERVICE")
        .env_remove("PGSSLMODE")
        .env_remove("PGOPTIONS");
    let what = format!("pgbench {}", args.join(" "));
    let out = run_with_deadline(cmd, &what, Duration::from_secs(120)).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what} failed ({})\n{}",
        out.status,
        show(&out)
    );
    let number = |prefix: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` in the output of {what}:\n{}", show(&out)))
    };
    let processed = number("number of transactions actually processed: ");
    let failed = number("number of failed transactions: ");
    assert_eq!(failed, 0, "{what}: failed transactions\n{}", show(&out));
    assert!(processed > 0, "{what}: nothing processed\n{}", show(&out));
    processed
}

fn xact_commits(cluster: &Cluster, port: u16) -> u64 {
    cluster
        .psql_admin(
            port,
            "select xact_commit from pg_stat_database where datname = 'appdb'",
        )
        .parse()
        .expect("xact_commit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_and_prepared_select_only_and_tpcb() {
    let (gw, cluster) = start().await;
    let dsn = gw.dsn(APP_USER, APP_PASSWORD, DB);
    let mut init = Command::new(pg_bin("pgbench"));
    init.args(["-i", "-s", "1", "-q", &dsn])
        .env_remove("PGOPTIONS");
    let out = run_with_deadline(init, "pgbench -i", Duration::from_secs(120)).await;
    assert!(out.status.success(), "pgbench -i failed\n{}", show(&out));
    cluster.wait_replay();
    let replica = cluster.replica_ports()[0];

    for mode in ["extended", "prepared"] {
        // Select-only: the prepared SELECTs belong on the replica.
        let before = xact_commits(&cluster, replica);
        let processed = pgbench(&dsn, &["-S", "-M", mode, "-c", "4", "-j", "2", "-T", "3"]).await;
        eventually(
            &format!("the replica to have run most of pgbench -S -M {mode}"),
            WAIT,
            async || {
                let grown = xact_commits(&cluster, replica).saturating_sub(before);
                if grown >= processed / 2 {
                    Ok(())
                } else {
                    Err(format!(
                        "replica committed {grown} more transactions, pgbench processed {processed}"
                    ))
                }
            },
        )
        .await;

        // TPC-B: BEGIN; UPDATE; SELECT; UPDATE; UPDATE; INSERT; END, all prepared.
        let history_before: u64 = cluster
            .psql_admin(
                cluster.primary_port(),
                "select count(*) from pgbench_history",
            )
            .parse()
            .expect("count");
        let processed = pgbench(&dsn, &["-M", mode, "-c", "4", "-j", "2", "-T", "3"]).await;
        let history_after: u64 = cluster
            .psql_admin(
                cluster.primary_port(),
                "select count(*) from pgbench_history",
            )
            .parse()
            .expect("count");
        assert_eq!(
            history_after - history_before,
            processed,
            "pgbench -M {mode} TPC-B: one pgbench_history row per processed transaction"
        );
    }
}
