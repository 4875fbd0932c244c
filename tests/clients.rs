//! Real clients through pgway: psql (SSLRequest, scripts, `\copy`, `\d`, errors) and pgbench
//! (`-i`, select-only, TPC-B, extended and prepared protocols).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::process::Output;

use common::*;
use tokio::process::Command;

/// Runs a PostgreSQL client binary with a clean libpq environment and a 120 s limit.
async fn run_client(bin: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(pg_bin(bin));
    cmd.args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env_remove("PGSERVICE")
        .env_remove("PGSSLMODE")
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .kill_on_drop(true);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
    if let Some(text) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes())
            .await
            .expect("writing stdin");
        drop(pipe);
    }
    match tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {bin}: {e}")),
        Err(_) => panic!("{bin} {args:?} did not finish within 120 s"),
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// Runs psql with `args` and panics unless it exits 0; returns its standard output.
async fn psql_ok(dsn: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut all = vec![dsn, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"];
    all.extend_from_slice(args);
    let out = run_client("psql", &all, stdin).await;
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "psql {args:?} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_through_pgway() {
    let cluster = Cluster::start(1);
    let gw = Gateway::start(&cluster);
    gw.wait_for_replica_reads(&cluster).await;
    // libpq's default sslmode=prefer sends an SSLRequest first; pgway must decline it.
    let dsn = gw.dsn(APP_USER, APP_PASSWORD, DB);
    let replica = cluster.replica_ports()[0];

    let port = psql_ok(&dsn, &["-c", "select inet_server_port()"], None).await;
    assert_eq!(port, replica.to_string(), "psql's plain read");
    let port = psql_ok(
        &format!("{dsn}?sslmode=disable"),
        &["-c", "select inet_server_port()"],
        None,
    )
    .await;
    assert_eq!(port, replica.to_string(), "psql with sslmode=disable");

    // A script: DDL, \copy from a file, a write, a read inside a transaction.
    let csv = cluster.dir().join("in.csv");
    std::fs::write(&csv, "1,one\n2,two\n3,three\n").expect("writing in.csv");
    let script = format!(
        "create table psql_t (id int primary key, v text);\n\
         \\copy psql_t from '{}' with (format csv)\n\
         insert into psql_t values (4, 'four');\n\
         begin;\n\
         select count(*), inet_server_port() from psql_t;\n\
         commit;\n",
        csv.display()
    );
    let out = psql_ok(&dsn, &["-f", "-"], Some(&script)).await;
    assert_eq!(out, format!("4|{}", cluster.primary_port()));

    cluster.wait_replay();
    let out = psql_ok(
        &dsn,
        &[
            "-c",
            "\\copy (select id, v from psql_t order by id) to stdout with (format csv)",
        ],
        None,
    )
    .await;
    assert_eq!(out, "1,one\n2,two\n3,three\n4,four");
    let out = psql_ok(&dsn, &["-c", "\\d psql_t"], None).await;
    assert!(out.contains("id|integer"), "\\d psql_t:\n{out}");

    // Errors reach psql as PostgreSQL wrote them.
    let out = run_client(
        "psql",
        &[&dsn, "-X", "-v", "ON_ERROR_STOP=1", "-c", "select 1/0"],
        None,
    )
    .await;
    let (_, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "psql exit status; stderr: {stderr}"
    );
    assert!(stderr.contains("division by zero"), "{stderr}");

    // A wrong password is a connection failure (exit status 2).
    let out = run_client(
        "psql",
        &[&gw.dsn(APP_USER, "wrong", DB), "-X", "-c", "select 1"],
        None,
    )
    .await;
    let (_, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "psql exit status; stderr: {stderr}"
    );
    assert!(stderr.contains("FATAL"), "{stderr}");
}

/// The numbers pgbench reports.
#[derive(Debug)]
struct PgbenchReport {
    processed: u64,
    failed: u64,
}

/// Runs pgbench and checks it exited 0 with no failed transactions and some processed.
async fn pgbench(dsn: &str, args: &[&str]) -> PgbenchReport {
    let mut all: Vec<&str> = args.to_vec();
    all.push(dsn);
    let out = run_client("pgbench", &all, None).await;
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    let number = |prefix: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` in pgbench's output:\n{stdout}"))
    };
    let report = PgbenchReport {
        processed: number("number of transactions actually processed: "),
        failed: number("number of failed transactions: "),
    };
    assert_eq!(report.failed, 0, "pgbench {args:?}:\n{stdout}\n{stderr}");
    assert!(
        report.processed > 0,
        "pgbench {args:?}:\n{stdout}\n{stderr}"
    );
    report
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
async fn pgbench_runs_through_pgway() {
    let cluster = Cluster::start(1);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            pool_size: 4,
            wait_timeout: "30s".into(),
            ..GatewayOptions::default()
        },
    );
    gw.wait_for_replica_reads(&cluster).await;
    let dsn = gw.dsn(APP_USER, APP_PASSWORD, DB);

    // Initialisation: DDL, COPY of 100000 rows, VACUUM, primary keys.
    let out = run_client("pgbench", &["-i", "-s", "1", "-q", &dsn], None).await;
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "pgbench -i failed ({})\n{stdout}\n{stderr}",
        out.status
    );
    assert_eq!(
        cluster.psql_admin(
            cluster.primary_port(),
            "select count(*) from pgbench_accounts"
        ),
        "100000"
    );
    cluster.wait_replay();

    // Select-only: these reads belong on the replica.
    let replica = cluster.replica_ports()[0];
    let before = xact_commits(&cluster, replica);
    let select_only = pgbench(&dsn, &["-S", "-c", "4", "-j", "2", "-T", "5"]).await;
    eventually(
        "the replica's transaction count to grow by half of pgbench -S's transactions",
        WAIT,
        async || {
            let grown = xact_commits(&cluster, replica).saturating_sub(before);
            if grown >= select_only.processed / 2 {
                Ok(())
            } else {
                Err(format!(
                    "replica committed {grown} more transactions, pgbench processed {}",
                    select_only.processed
                ))
            }
        },
    )
    .await;

    // The default TPC-B-like script: BEGIN; UPDATE; SELECT; UPDATE; UPDATE; INSERT; END.
    pgbench(&dsn, &["-c", "4", "-j", "2", "-T", "5"]).await;
    let history = cluster.psql_admin(
        cluster.primary_port(),
        "select count(*) from pgbench_history",
    );
    assert!(
        history.parse::<u64>().expect("count") > 0,
        "TPC-B inserted nothing into pgbench_history"
    );

    // Protocol variants: extended, and prepared (Parse once, Bind/Execute many times).
    pgbench(
        &dsn,
        &["-S", "-M", "extended", "-c", "4", "-j", "2", "-T", "3"],
    )
    .await;
    pgbench(
        &dsn,
        &["-S", "-M", "prepared", "-c", "4", "-j", "2", "-T", "3"],
    )
    .await;
    pgbench(&dsn, &["-M", "prepared", "-c", "4", "-j", "2", "-T", "3"]).await;
}
