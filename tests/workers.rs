//! Worker threads that follow the load, against real servers: a busy worker brings in
//! another, new clients go to it, and once the load is light again the sessions gather on
//! one worker, each moving between two of its requests and keeping its settings, its
//! prepared statements and its routing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use common::*;

/// `pgway_workers_active` and `pgway_worker_sessions` per worker, from `/metrics`.
async fn placement(admin: u16, workers: usize) -> (f64, Vec<f64>) {
    let text = scrape(admin).await;
    let active = sample(&text, "pgway_workers_active").unwrap_or(-1.0);
    let sessions = (0..workers)
        .map(|w| sample(&text, &format!("pgway_worker_sessions{{worker=\"{w}\"}}")).unwrap_or(-1.0))
        .collect();
    (active, sessions)
}

/// Waits until `active` of the two workers take sessions.
async fn until_active(admin: u16, active: usize) {
    let what = format!("{active} worker(s) taking sessions");
    eventually(&what, WAIT, async || match placement(admin, 2).await {
        (n, _) if n == active as f64 => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_the_load_between_workers_and_keep_their_state() {
    let cluster = Cluster::start(1);
    let replica = cluster.replica_ports()[0];
    let admin = free_loopback_port();
    let opts = GatewayOptions {
        extra: "workers = 2\n".into(),
        ..GatewayOptions::default()
    };
    let gw = Gateway::start_with_admin(&cluster, opts, admin);
    gw.wait_for_replica_reads(&cluster).await;

    // Nothing to do: one worker takes sessions.
    until_active(admin, 1).await;

    // pgbench keeps the worker busy: a second worker takes sessions.
    let script = cluster.dir().join("select1.sql");
    std::fs::write(&script, "SELECT 1;\n").expect("pgbench script");
    let dsn = gw.dsn(APP_USER, APP_PASSWORD, DB);
    let script = script.display().to_string();
    let mut load = tokio::process::Command::new(pg_bin("pgbench"))
        .args(["-n", "-f", &script, "-c", "8", "-j", "2", "-T", "120", &dsn])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("pgbench");
    until_active(admin, 2).await;

    // New clients go to the worker with the fewest sessions: the first one to the
    // second worker, whose sessions pgbench's have just started to fill.
    let mut clients = Vec::new();
    for i in 0..4 {
        let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
        client
            .batch_execute(&format!("SET application_name = 'moved{i}'"))
            .await
            .expect("SET");
        let statement = client
            .prepare("SELECT $1::int * 2, current_setting('application_name'), inet_server_port()")
            .await
            .expect("prepare");
        clients.push((client, statement));
    }
    let _ = load.kill().await;
    let _ = load.wait().await;
    // pgbench's sessions end; the clients' stay where they are while they send nothing.
    let sessions = eventually("pgbench's sessions gone", WAIT, async || {
        match placement(admin, 2).await {
            (_, sessions) if sessions.iter().sum::<f64>() == 4.0 => Ok(sessions),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        sessions[1] >= 1.0,
        "a client on the second worker: {sessions:?}"
    );

    // Light again: the second worker stops taking sessions, and each client's session
    // moves to the first between two of its requests.
    eventually("the sessions moved to the first worker", WAIT, async || {
        for (client, statement) in &clients {
            client
                .query_one(statement, &[&1i32])
                .await
                .map_err(|e| describe_error(&e))?;
        }
        match placement(admin, 2).await {
            (1.0, sessions) if sessions == [4.0, 0.0] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Each kept its setting and its prepared statement, and reads still go to the
    // replica, transactions to the primary.
    for (i, (client, statement)) in clients.iter().enumerate() {
        let row = client
            .query_one(statement, &[&21i32])
            .await
            .expect("the prepared statement after the move");
        assert_eq!(row.get::<_, i32>(0), 42);
        assert_eq!(row.get::<_, String>(1), format!("moved{i}"));
        assert_eq!(row.get::<_, i32>(2), i32::from(replica));
        assert_eq!(
            simple_value(client, "SHOW application_name")
                .await
                .expect("SHOW"),
            format!("moved{i}")
        );
        client.batch_execute("BEGIN").await.expect("BEGIN");
        assert_eq!(served_by(client).await, cluster.primary_port());
        client.batch_execute("COMMIT").await.expect("COMMIT");
    }
}
