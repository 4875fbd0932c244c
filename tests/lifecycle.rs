//! Stopping and recycling, against real servers: the drain on shutdown (57P01 for idle
//! clients at once, for clients still inside a transaction at `shutdown_timeout`),
//! SIGTERM and SIGINT on the real binary, `pool.server_lifetime`,
//! `pool.server_idle_timeout`, and `log_format = "json"`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio_util::sync::CancellationToken;

const ADMIN_SHUTDOWN: &str = "57P01";

/// pgway in-process, with its shutdown token in the test's hands.
struct InProcess {
    port: u16,
    token: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(cluster: &Cluster, opts: &GatewayOptions) -> InProcess {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("address").port();
        let toml = gateway_toml(cluster, &format!("127.0.0.1:{port}"), "127.0.0.1:0", opts);
        let config = pgway::config::Config::from_toml_str(&toml)
            .unwrap_or_else(|e| panic!("config rejected: {e:?}\n{toml}"));
        let token = CancellationToken::new();
        let run_token = token.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                pgway::server::run(config, listener, run_token)
                    .await
                    .expect("pgway::server::run");
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        });
        InProcess {
            port,
            token,
            thread: Some(thread),
        }
    }

    /// `run` has returned.
    fn stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn with_shutdown_timeout(timeout: &str) -> GatewayOptions {
    GatewayOptions {
        extra: format!("shutdown_timeout = \"{timeout}\"\n"),
        ..GatewayOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_idle_clients_and_lets_transactions_commit() {
    let cluster = Cluster::start_with_schema(0, "SET ROLE app;\nCREATE TABLE t (i int);\n");
    let gw = InProcess::start(&cluster, &with_shutdown_timeout("2s"));
    let mut busy = RawConn::login(gw.port, APP_USER, APP_PASSWORD).await;
    let mut idle = RawConn::login(gw.port, APP_USER, APP_PASSWORD).await;
    assert_eq!(
        query_ok(&mut busy, "begin; insert into t values (1)").await,
        b'T'
    );

    gw.token.cancel();
    let asked = Instant::now();
    assert_eq!(fatal_then_close(&mut idle).await, ADMIN_SHUTDOWN);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );

    assert_eq!(query_ok(&mut busy, "insert into t values (2)").await, b'T');
    assert_eq!(query_ok(&mut busy, "commit").await, b'I');
    // Between transactions now: told to go.
    assert_eq!(fatal_then_close(&mut busy).await, ADMIN_SHUTDOWN);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let rows = cluster.psql_admin(cluster.primary_port(), "select count(*) from t");
    assert_eq!(rows, "2");
    wait_until_blocking("run to return", Duration::from_secs(5), || {
        gw.stopped().then_some(()).ok_or("running".to_string())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_open_past_the_deadline_gets_57p01() {
    let cluster = Cluster::start(0);
    let gw = InProcess::start(&cluster, &with_shutdown_timeout("2s"));
    let mut busy = RawConn::login(gw.port, APP_USER, APP_PASSWORD).await;
    assert_eq!(query_ok(&mut busy, "begin; select 1").await, b'T');

    gw.token.cancel();
    let asked = Instant::now();
    assert_eq!(fatal_then_close(&mut busy).await, ADMIN_SHUTDOWN);
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "told after {waited:?}"
    );
    wait_until_blocking("run to return", Duration::from_secs(5), || {
        gw.stopped().then_some(()).ok_or("running".to_string())
    });
}

/// The real binary, with its config in a file of its own.
struct Binary {
    child: Child,
    port: u16,
    /// The config file (rewritten by reload tests).
    path: std::path::PathBuf,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Binary {
    fn start(cluster: &Cluster, opts: &GatewayOptions, rust_log: &str) -> Binary {
        let port = free_loopback_port();
        let admin = free_loopback_port();
        let toml = gateway_toml(
            cluster,
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{admin}"),
            opts,
        );
        let base = std::env::var_os("PGWAY_TEST_TMPDIR")
            .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
        let dir = base.join(format!("lifecycle-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("config dir");
        let path = dir.join("pgway.toml");
        Self::start_toml(&path, &dir, port, &toml, rust_log)
    }

    /// The binary with `toml` written to `path` (in `dir`, removed on drop).
    fn start_toml(
        path: &std::path::Path,
        dir: &std::path::Path,
        port: u16,
        toml: &str,
        rust_log: &str,
    ) -> Binary {
        std::fs::write(path, toml).expect("config file");
        let child = Command::new(env!("CARGO_BIN_EXE_pgway"))
            .arg("--config")
            .arg(path)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting pgway");
        Binary {
            child,
            port,
            path: path.to_owned(),
            _dir: tempfile_dir::Dir(dir.to_owned()),
        }
    }

    async fn wait_ready(&self) {
        let port = self.port;
        eventually("pgway to accept clients", WAIT, async || {
            try_connect(port, APP_USER, APP_PASSWORD)
                .await
                .map(drop)
                .map_err(|e| describe_error(&e))
        })
        .await;
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Waits up to `timeout` for the process to exit; its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_until_blocking("pgway to exit", timeout, || {
            self.child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "still running".to_string())
        })
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_serving_and_sigterm_tells_idle_clients_and_exits_zero() {
    let cluster = Cluster::start(0);
    let mut pgway = Binary::start(&cluster, &GatewayOptions::default(), "info");
    pgway.wait_ready().await;
    let mut idle = RawConn::login(pgway.port, APP_USER, APP_PASSWORD).await;
    assert_eq!(query_ok(&mut idle, "select 1").await, b'I');

    // SIGHUP reloads; the same file changes nothing and ends nothing.
    pgway.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(query_ok(&mut idle, "select 1").await, b'I', "after SIGHUP");

    pgway.signal("TERM");
    assert_eq!(fatal_then_close(&mut idle).await, ADMIN_SHUTDOWN);
    let status = pgway.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_gives_open_transactions_a_short_grace() {
    let cluster = Cluster::start(0);
    let mut pgway = Binary::start(&cluster, &with_shutdown_timeout("30s"), "info");
    pgway.wait_ready().await;
    let mut busy = RawConn::login(pgway.port, APP_USER, APP_PASSWORD).await;
    assert_eq!(query_ok(&mut busy, "begin; select 1").await, b'T');

    let asked = Instant::now();
    pgway.signal("INT");
    assert_eq!(fatal_then_close(&mut busy).await, ADMIN_SHUTDOWN);
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
    let status = pgway.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_client_span() {
    let cluster = Cluster::start(0);
    let opts = GatewayOptions {
        extra: "log_format = \"json\"\n".into(),
        ..GatewayOptions::default()
    };
    let mut pgway = Binary::start(&cluster, &opts, "info,pgway=debug");
    let stderr = pgway.child.stderr.take().expect("stderr");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    pgway.wait_ready().await;
    let mut client = RawConn::login(pgway.port, APP_USER, APP_PASSWORD).await;
    query_ok(&mut client, "select 1").await;
    client.send_message(b'X', &[]).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines_rx.recv_timeout(left) else {
            break None;
        };
        let json: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        let span = &json["span"];
        if span["name"] == "client" && span["user"] == APP_USER && span["db"] == DB {
            break Some(json);
        }
        seen.push(line);
    };
    let found = found.unwrap_or_else(|| panic!("no line in a client span:\n{}", seen.join("\n")));
    assert!(found["span"]["peer"]
        .as_str()
        .is_some_and(|peer| peer.starts_with("127.0.0.1:")));
    assert!(found["fields"]["message"].is_string(), "{found}");
}

/// `select pg_backend_pid()` through pgway.
async fn backend_pid(conn: &mut RawConn) -> String {
    let replies = conn.query("select pg_backend_pid()").await;
    let row = replies
        .iter()
        .find(|m| m.tag == b'D')
        .unwrap_or_else(|| panic!("no row: {replies:?}"));
    // DataRow: column count (2), length (4), value.
    String::from_utf8(row.body[6..].to_vec()).expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_recycles_connections_between_transactions() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            pool_size: 1,
            pool_extra: "server_lifetime = \"1s\"".into(),
            ..GatewayOptions::default()
        },
    );
    let mut client = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    let first = backend_pid(&mut client).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = backend_pid(&mut client).await;
    assert_ne!(
        first, second,
        "a connection older than server_lifetime was reused"
    );

    // Inside a transaction the connection stays, however old it gets.
    assert_eq!(query_ok(&mut client, "begin").await, b'T');
    let in_txn = backend_pid(&mut client).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(backend_pid(&mut client).await, in_txn);
    query_ok(&mut client, "select pg_sleep(0.2)").await;
    assert_eq!(backend_pid(&mut client).await, in_txn);
    assert_eq!(query_ok(&mut client, "commit").await, b'I');
    // Released past its lifetime at the COMMIT: closed.
    assert_ne!(backend_pid(&mut client).await, in_txn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_idle_timeout_closes_parked_connections() {
    let cluster = Cluster::start(0);
    let gw = Gateway::start_with(
        &cluster,
        GatewayOptions {
            pool_extra: "server_idle_timeout = \"1s\"".into(),
            ..GatewayOptions::default()
        },
    );
    let mut client = RawConn::login(gw.port(), APP_USER, APP_PASSWORD).await;
    let pid = backend_pid(&mut client).await;
    let primary = cluster.primary_port();
    let present = |pid: &str| {
        try_psql(
            primary,
            DB,
            &format!("select count(*) from pg_stat_activity where pid = {pid}"),
        )
    };
    assert_eq!(present(&pid).as_deref(), Ok("1"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    eventually(
        "the parked connection to be closed",
        Duration::from_secs(5),
        async || match present(&pid)? {
            count if count == "0" => Ok(()),
            count => Err(format!("{count} backend(s) with pid {pid}")),
        },
    )
    .await;
    // The client goes on, on a new connection.
    assert_ne!(backend_pid(&mut client).await, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_pool_size_and_password_while_a_client_stays_connected() {
    let cluster = Cluster::start(0);
    let port = free_loopback_port();
    let admin = free_loopback_port();
    let opts = GatewayOptions {
        pool_size: 1,
        wait_timeout: "10s".into(),
        ..GatewayOptions::default()
    };
    let toml = gateway_toml(
        &cluster,
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{admin}"),
        &opts,
    )
    .replace(
        &format!("password = \"{APP_PASSWORD}\"\n"),
        &format!("password = \"{APP_PASSWORD}\"\nadmin = true\n"),
    );
    let base = std::env::var_os("PGWAY_TEST_TMPDIR")
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let dir = base.join(format!("reload-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("config dir");
    let mut pgway = Binary::start_toml(&dir.join("pgway.toml"), &dir, port, &toml, "info");
    let stderr = pgway.child.stderr.take().expect("stderr");
    let logged = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    pgway.wait_ready().await;
    let mut stays = RawConn::login(port, APP_USER, APP_PASSWORD).await;
    assert_eq!(query_ok(&mut stays, "begin; select 1").await, b'T');
    assert_eq!(query_ok(&mut stays, "commit").await, b'I');

    // pool.size = 1: three transactions at once share one server connection.
    assert_eq!(concurrent_pids(port, APP_PASSWORD, 3).await.len(), 1);

    // The password changes on the server and in the file, with a bigger pool: SIGHUP.
    const NEW_PASSWORD: &str = "app-secret-2";
    cluster.psql_admin(
        cluster.primary_port(),
        &format!("alter role {APP_USER} password '{NEW_PASSWORD}'"),
    );
    let reloaded = toml
        .replace(
            &format!("password = \"{APP_PASSWORD}\""),
            &format!("password = \"{NEW_PASSWORD}\""),
        )
        .replace("size = 1\n", "size = 3\n");
    std::fs::write(&pgway.path, &reloaded).expect("rewriting the config");
    pgway.signal("HUP");
    eventually("the new password to be accepted", WAIT, async || {
        try_connect(port, APP_USER, NEW_PASSWORD)
            .await
            .map(drop)
            .map_err(|e| describe_error(&e))
    })
    .await;
    let refused = try_connect(port, APP_USER, APP_PASSWORD)
        .await
        .expect_err("the old password after the reload");
    assert_eq!(sqlstate(&refused), "28P01", "{refused:?}");
    // New server connections log in with the new password; three at once now.
    assert_eq!(concurrent_pids(port, NEW_PASSWORD, 3).await.len(), 3);
    // The client connected before the reload carried on throughout.
    assert_eq!(query_ok(&mut stays, "begin; select 2").await, b'T');
    assert_eq!(query_ok(&mut stays, "commit").await, b'I');

    // A bad file is refused with the key named; the running config stays.
    std::fs::write(&pgway.path, format!("bogus_key = 1\n{reloaded}")).expect("bad config");
    pgway.signal("HUP");
    // The console's RELOAD says the same, as an error.
    let console = try_session(port, APP_USER, NEW_PASSWORD, "pgway")
        .await
        .expect("console login");
    let error = console
        .client
        .simple_query("RELOAD")
        .await
        .expect_err("RELOAD of a bad file");
    assert_eq!(sqlstate(&error), "F0000", "{error:?}");
    assert!(describe_error(&error).contains("bogus_key"), "{error:?}");
    assert_eq!(concurrent_pids(port, NEW_PASSWORD, 3).await.len(), 3);

    // RELOAD of a good file: the pool shrinks back to one connection.
    std::fs::write(&pgway.path, reloaded.replace("size = 3\n", "size = 1\n"))
        .expect("rewriting the config");
    console
        .client
        .simple_query("RELOAD")
        .await
        .expect("RELOAD of a good file");
    eventually("the pool to be back to one connection", WAIT, async || {
        let pids = concurrent_pids(port, NEW_PASSWORD, 3).await;
        (pids.len() == 1)
            .then_some(())
            .ok_or(format!("{} connections", pids.len()))
    })
    .await;
    assert_eq!(query_ok(&mut stays, "select 3").await, b'I');

    pgway.signal("TERM");
    assert!(pgway.wait_exit(Duration::from_secs(10)).success());
    let lines = logged.join().expect("stderr reader");
    // The refusal, then the parser's message naming the key (on lines of its own).
    let log = lines.join("\n");
    let refused = log
        .find("reload refused")
        .unwrap_or_else(|| panic!("no refusal:\n{log}"));
    assert!(
        log[refused..].contains("unknown field `bogus_key`"),
        "the key is not named:\n{log}"
    );
}

/// CPU time (user and system) the process has used so far, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let fields = proc_stat_fields(pid).expect("reading /proc/PID/stat");
    // utime and stime (fields 14 and 15), in clock ticks.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let per_second = String::from_utf8(
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf CLK_TCK")
            .stdout,
    )
    .expect("CLK_TCK text")
    .trim()
    .parse::<u64>()
    .expect("CLK_TCK");
    Duration::from_millis(ticks * 1000 / per_second)
}

/// `busy_poll` (on by default): while a client's statements flow, a worker may poll for
/// I/O without sleeping; once they stop, pgway sleeps again and uses (nearly) no CPU,
/// with the client still connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_traffic_stops_pgway_stops_polling() {
    let cluster = Cluster::start(1);
    let pgway = Binary::start(&cluster, &GatewayOptions::default(), "info");
    pgway.wait_ready().await;
    let mut client = RawConn::login(pgway.port, APP_USER, APP_PASSWORD).await;
    for _ in 0..2_000 {
        assert_eq!(query_ok(&mut client, "select 1").await, b'I');
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_time(pgway.child.id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_time(pgway.child.id()) - before;
    // A worker that kept polling would use about as much CPU as time passed.
    assert!(
        used < Duration::from_millis(400),
        "pgway used {used:?} of CPU in 2 s without traffic"
    );
    assert_eq!(
        query_ok(&mut client, "select 1").await,
        b'I',
        "the client still served"
    );
}
