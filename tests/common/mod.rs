//! Integration-test harness: real PostgreSQL 15 clusters, an in-process pgway, and clients.
//!
//! # Layout
//! - [`Cluster`]: a primary plus N streaming replicas (`pg_basebackup -R`) in a temporary
//!   directory under `/tmp` (or `$PGWAY_TEST_TMPDIR`), each server on its own loopback port.
//!   Servers run as the `postgres` OS user when the tests run as root. Dropping the cluster
//!   stops every server (`pg_ctl stop -m immediate`) and removes the directory.
//! - [`Gateway`]: `pgway::server::run` on a dedicated multi-thread runtime in a background
//!   thread, listening on `127.0.0.1:<ephemeral>`. Dropping it cancels the shutdown token and
//!   joins the thread.
//! - Client helpers: [`connect`] / [`try_connect`] (tokio-postgres), [`served_by`]
//!   (`inet_server_port()`), [`eventually`] (polling with a deadline), and [`RawConn`], a tiny
//!   hand-written wire-protocol client for feeding the gateway bad input.
//!
//! Every test builds its own `Cluster` and `Gateway`; nothing is shared between tests, so
//! cleanup is by `Drop`, also when a test panics (the server logs are then printed).
//!
//! Environment knobs: `PGWAY_PG_BIN` (PostgreSQL bin dir, default
//! `/usr/lib/postgresql/15/bin`), `PGWAY_TEST_TMPDIR` (parent dir for clusters, default
//! `/tmp`), `PGWAY_TEST_KEEP=1` (keep the cluster dir after the test), `RUST_LOG` (gateway
//! tracing filter; output is shown for failing tests).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a harness step that cannot go on fails the test, with its message"
)]
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

pub mod patroni;

/// Login role for the application (SCRAM-SHA-256 in PostgreSQL and in pgway).
pub const APP_USER: &str = "app";
/// Password of [`APP_USER`].
pub const APP_PASSWORD: &str = "app-secret";
/// Login role whose password PostgreSQL stores as md5 and that logs in to pgway with md5.
pub const MD5_USER: &str = "md5user";
/// Password of [`MD5_USER`].
pub const MD5_PASSWORD: &str = "md5-secret";
/// Database owned by [`APP_USER`]; `md5user` may connect and create in `public`.
pub const DB: &str = "appdb";
/// A role with `REPLICATION` (SCRAM, allowed replication connections on loopback), for
/// the result cache's invalidation stream (`cache.wal_user`).
pub const WAL_USER: &str = "pgway_wal";
/// Password of [`WAL_USER`].
pub const WAL_PASSWORD: &str = "wal-secret";

/// Deadline for every "wait until" loop in the harness.
pub const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

fn pg_bin_dir() -> PathBuf {
    std::env::var_os("PGWAY_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// Path of a PostgreSQL client or server binary (`psql`, `pgbench`, `pg_ctl`, ...).
pub fn pg_bin(name: &str) -> PathBuf {
    pg_bin_dir().join(name)
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// A command for a PostgreSQL server tool, run as the `postgres` OS user when we are root
/// (the server refuses to run as root), in `cwd` (a directory that user can enter).
fn server_command(bin: &str, cwd: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(bin));
        c
    } else {
        Command::new(pg_bin(bin))
    };
    cmd.current_dir(cwd)
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATA")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion and panics with its output when it fails.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run `{}`: {e}", describe(cmd)));
    if !out.status.success() {
        panic!(
            "`{}` failed with {}\n--- stdout\n{}\n--- stderr\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs `psql` (as the invoking OS user) against `127.0.0.1:port` as the PostgreSQL
/// superuser `postgres` (trusted on loopback), feeding `sql` on standard input so that a
/// script of several statements runs statement by statement. Returns unaligned, tuples-only
/// output, or the error text.
pub fn try_psql(port: u16, db: &str, sql: &str) -> Result<String, String> {
    let mut child = Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-f",
            "-",
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not run psql: {e}"))?;
    {
        let mut stdin = child.stdin.take().expect("psql stdin");
        stdin
            .write_all(sql.as_bytes())
            .map_err(|e| format!("writing to psql: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "psql on port {port} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Polls `check` every 50 ms until it returns `Ok`, panicking with the last error after
/// `timeout`. Blocking; for use outside async code or in harness setup.
pub fn wait_until_blocking<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last result: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Polls the async `check` every 100 ms until it returns `Ok`, panicking with the last error
/// after `timeout`. Never use it to assert that something is fast: pick generous deadlines.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last result: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A free loopback TCP port below the kernel's ephemeral range (32768+), so that a server
/// restarted on the same port never collides with a client socket's ephemeral port.
fn free_port(taken: &mut Vec<StdTcpListener>) -> u16 {
    // Ports handed out in this process: a server may start seconds after its port was
    // picked (a replica, after initdb and the base backup), and a cluster started meanwhile
    // by a test running in parallel must not pick the same one.
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let seed = RandomState::new();
    for attempt in 0u64..1000 {
        let mut h = seed.build_hasher();
        h.write_u64(attempt);
        h.write_u32(std::process::id());
        let port = 15000 + (h.finish() % 17000) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if let Ok(l) = StdTcpListener::bind(("127.0.0.1", port)) {
            handed_out.push(port);
            // Keep it bound until the caller has picked all its ports.
            taken.push(l);
            return port;
        }
    }
    panic!("no free loopback port found in 15000..32000");
}

/// A loopback port that is free right now (below the ephemeral range, see `free_port`).
pub fn free_loopback_port() -> u16 {
    free_port(&mut Vec::new())
}

// ---------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------

/// One PostgreSQL server of a [`Cluster`].
#[derive(Debug)]
struct Node {
    name: String,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    running: bool,
}

/// A PostgreSQL primary and its streaming replicas, on loopback, in a temporary directory.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    primary: Node,
    replicas: Vec<Node>,
}

impl Cluster {
    /// Starts a primary with `replicas` streaming replicas and waits until every replica is in
    /// recovery and has replayed a marker table created on the primary after it started.
    ///
    /// The primary has roles `app` (SCRAM) and `md5user` (md5-stored password), and the
    /// database `appdb` owned by `app`.
    pub fn start(replicas: usize) -> Cluster {
        Cluster::start_with_conf(replicas, "")
    }

    /// [`Cluster::start`], then `schema` run on the primary (as superuser, in `appdb`) and
    /// replayed by every replica.
    pub fn start_with_schema(replicas: usize, schema: &str) -> Cluster {
        let cluster = Cluster::start(replicas);
        cluster.psql_admin(cluster.primary_port(), schema);
        cluster.wait_replay();
        cluster
    }

    /// [`Cluster::start`] with `extra_conf` appended to the primary's `postgresql.conf`
    /// before it first starts (e.g. `"max_prepared_transactions = 10\n"`). Replicas are
    /// base backups of the primary, so they start with the same lines.
    pub fn start_with_conf(replicas: usize, extra_conf: &str) -> Cluster {
        let parent = std::env::var_os("PGWAY_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        std::fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        let dir = tempfile::Builder::new()
            .prefix("pgway-test-")
            .tempdir_in(&parent)
            .expect("creating the cluster temp dir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("sock")).expect("creating the socket dir");
        if is_root() {
            run_ok(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&root),
            );
        }

        let mut taken = Vec::new();
        let primary_port = free_port(&mut taken);
        let replica_ports: Vec<u16> = (0..replicas).map(|_| free_port(&mut taken)).collect();
        drop(taken);

        let mut cluster = Cluster {
            primary: Node {
                name: "primary".into(),
                data: root.join("primary"),
                log: root.join("primary.log"),
                port: primary_port,
                running: false,
            },
            replicas: Vec::new(),
            dir: Some(dir),
            root,
        };
        cluster.init_primary(extra_conf);
        for (i, port) in replica_ports.into_iter().enumerate() {
            cluster.add_replica(i, port);
        }
        // Proof that streaming works: a table created after the replicas started must appear
        // on every one of them.
        cluster.psql_admin_db(
            cluster.primary.port,
            "postgres",
            "CREATE TABLE pgway_harness_marker (id int);",
        );
        for r in &cluster.replicas {
            let port = r.port;
            wait_until_blocking(
                &format!("{} (port {port}) to replay the marker table", r.name),
                WAIT,
                || {
                    let out = try_psql(
                        port,
                        "postgres",
                        "SELECT pg_is_in_recovery(), to_regclass('pgway_harness_marker') IS NOT NULL;",
                    )?;
                    if out == "t|t" {
                        Ok(())
                    } else {
                        Err(format!("in recovery | marker visible = {out}"))
                    }
                },
            );
        }
        cluster.wait_replay();
        cluster
    }

    fn init_primary(&mut self, extra_conf: &str) {
        let root = self.root.clone();
        run_ok(
            server_command("initdb", &root)
                .arg("-D")
                .arg(&self.primary.data)
                .args(["-U", "postgres", "--auth-local=trust", "--auth-host=trust"])
                .args(["--no-sync", "--encoding=UTF8", "--locale=C"]),
        );
        std::fs::write(
            self.primary.data.join("pg_hba.conf"),
            "# written by the pgway test harness\n\
             local all         all                     trust\n\
             local replication all                     trust\n\
             host  replication postgres 127.0.0.1/32   trust\n\
             host  replication all      127.0.0.1/32   scram-sha-256\n\
             host  all         postgres 127.0.0.1/32   trust\n\
             host  all         md5user  127.0.0.1/32   md5\n\
             host  all         all      127.0.0.1/32   scram-sha-256\n",
        )
        .expect("writing pg_hba.conf");
        let conf = format!(
            "\n# pgway test harness\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{sock}'\n\
             shared_buffers = 16MB\n\
             max_connections = 200\n\
             wal_level = logical\n\
             max_replication_slots = 20\n\
             max_wal_senders = 10\n\
             wal_keep_size = 256MB\n\
             hot_standby = on\n\
             fsync = off\n\
             full_page_writes = off\n\
             autovacuum = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n",
            sock = self.root.join("sock").display()
        );
        append(&self.primary.data.join("postgresql.conf"), &conf);
        if !extra_conf.is_empty() {
            append(
                &self.primary.data.join("postgresql.conf"),
                &format!("# extra settings of the test\n{extra_conf}\n"),
            );
        }
        start_node(&self.root, &mut self.primary);
        self.psql_admin_db(
            self.primary.port,
            "postgres",
            "CREATE ROLE app LOGIN PASSWORD 'app-secret';\n\
             SET password_encryption = 'md5';\n\
             CREATE ROLE md5user LOGIN PASSWORD 'md5-secret';\n\
             RESET password_encryption;\n\
             CREATE ROLE pgway_wal LOGIN REPLICATION PASSWORD 'wal-secret';\n\
             CREATE DATABASE appdb OWNER app;\n\
             GRANT CONNECT ON DATABASE appdb TO md5user;\n\
             \\connect appdb\n\
             GRANT USAGE, CREATE ON SCHEMA public TO md5user;\n",
        );
        let stored = self.psql_admin_db(
            self.primary.port,
            "postgres",
            "SELECT rolname || '=' || CASE WHEN rolpassword LIKE 'SCRAM-SHA-256$%' THEN 'scram' \
             WHEN rolpassword LIKE 'md5%' THEN 'md5' ELSE 'other' END \
             FROM pg_authid WHERE rolname IN ('app', 'md5user') ORDER BY 1;",
        );
        assert_eq!(
            stored, "app=scram\nmd5user=md5",
            "unexpected kinds of stored passwords"
        );
    }

    fn add_replica(&mut self, i: usize, port: u16) {
        let mut node = Node {
            name: format!("replica{i}"),
            data: self.root.join(format!("replica{i}")),
            log: self.root.join(format!("replica{i}.log")),
            port,
            running: false,
        };
        let root = self.root.clone();
        run_ok(
            server_command("pg_basebackup", &root)
                .arg("-D")
                .arg(&node.data)
                .args(["-h", "127.0.0.1", "-p", &self.primary.port.to_string()])
                .args([
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ]),
        );
        start_node(&self.root, &mut node);
        self.replicas.push(node);
    }

    /// Port of the primary.
    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// Ports of the replicas, in creation order (running or not).
    pub fn replica_ports(&self) -> Vec<u16> {
        self.replicas.iter().map(|r| r.port).collect()
    }

    /// Stops replica `i` (`pg_ctl stop -m fast`).
    pub fn stop_replica(&mut self, i: usize) {
        let root = self.root.clone();
        stop_node(&root, &mut self.replicas[i], "fast");
    }

    /// Kills replica `i` as a crash would (`pg_ctl stop -m immediate`: its backends exit
    /// at once, without a shutdown checkpoint).
    pub fn kill_replica(&mut self, i: usize) {
        let root = self.root.clone();
        stop_node(&root, &mut self.replicas[i], "immediate");
    }

    /// Starts replica `i` again (on the same port) and waits until it accepts connections.
    pub fn start_replica(&mut self, i: usize) {
        let root = self.root.clone();
        start_node(&root, &mut self.replicas[i]);
    }

    /// Stops the primary (`pg_ctl stop -m fast`).
    pub fn stop_primary(&mut self) {
        let root = self.root.clone();
        stop_node(&root, &mut self.primary, "fast");
    }

    /// Kills the primary as a crash would (`pg_ctl stop -m immediate`).
    pub fn kill_primary(&mut self) {
        let root = self.root.clone();
        stop_node(&root, &mut self.primary, "immediate");
    }

    /// Starts the primary again (on the same port) and waits until it accepts connections.
    pub fn start_primary(&mut self) {
        let root = self.root.clone();
        start_node(&root, &mut self.primary);
    }

    /// Makes stopped replica `i` stream from the server at `port` (a promoted replica) when
    /// it starts again: its `primary_conninfo` (written by `pg_basebackup -R`) names that
    /// port instead of the first primary's.
    pub fn repoint_replica(&mut self, i: usize, port: u16) {
        let node = &self.replicas[i];
        assert!(!node.running, "replica{i} must be stopped to be repointed");
        let conf = node.data.join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&conf)
            .unwrap_or_else(|e| panic!("reading {}: {e}", conf.display()));
        let from = format!("port={}", self.primary.port);
        assert!(
            text.contains(&from),
            "no {from} in {}:\n{text}",
            conf.display()
        );
        std::fs::write(&conf, text.replace(&from, &format!("port={port}")))
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
    }

    /// Promotes replica `i` (`pg_ctl promote`, waiting until it accepts writes).
    pub fn promote_replica(&mut self, i: usize) {
        run_ok(
            server_command("pg_ctl", &self.root)
                .arg("-D")
                .arg(&self.replicas[i].data)
                .args(["-w", "-t", "60", "promote"]),
        );
    }

    /// Runs `sql` (a script; statements run one by one) in `appdb` as the superuser
    /// `postgres` directly on the server at `port`, bypassing pgway. Panics on error.
    pub fn psql_admin(&self, port: u16, sql: &str) -> String {
        self.psql_admin_db(port, DB, sql)
    }

    /// [`Cluster::psql_admin`] in another database.
    pub fn psql_admin_db(&self, port: u16, db: &str, sql: &str) -> String {
        try_psql(port, db, sql).unwrap_or_else(|e| panic!("{e}\n--- script\n{sql}"))
    }

    /// Waits until every running replica has replayed the primary's current WAL position.
    pub fn wait_replay(&self) {
        let target = self.psql_admin_db(
            self.primary.port,
            "postgres",
            "SELECT pg_current_wal_lsn();",
        );
        for r in self.replicas.iter().filter(|r| r.running) {
            let port = r.port;
            wait_until_blocking(
                &format!("{} (port {port}) to replay up to {target}", r.name),
                WAIT,
                || {
                    let out = try_psql(
                        port,
                        "postgres",
                        &format!(
                            "SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn, \
                             pg_last_wal_replay_lsn();"
                        ),
                    )?;
                    if out.starts_with("t|") {
                        Ok(())
                    } else {
                        Err(format!("replayed | lsn = {out}"))
                    }
                },
            );
        }
    }

    /// A readable name for a server port: `primary:5432`, `replica1:5434`, or `unknown:N`.
    pub fn name_of(&self, port: u16) -> String {
        self.nodes()
            .find(|n| n.port == port)
            .map(|n| format!("{}:{port}", n.name))
            .unwrap_or_else(|| format!("unknown:{port}"))
    }

    /// The cluster's directory (data dirs, logs, sockets).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    fn nodes(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.primary).chain(self.replicas.iter())
    }
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Writes the node's port (the last `port =` line wins) and starts it with `pg_ctl -w`.
/// Stops `node` with `pg_ctl stop -m <mode>` (`fast` or `immediate`).
fn stop_node(root: &Path, node: &mut Node, mode: &str) {
    run_ok(
        server_command("pg_ctl", root)
            .arg("-D")
            .arg(&node.data)
            .args(["-m", mode, "-w", "-t", "60", "stop"]),
    );
    node.running = false;
}

fn start_node(root: &Path, node: &mut Node) {
    append(
        &node.data.join("postgresql.conf"),
        &format!("port = {}\n", node.port),
    );
    let out = server_command("pg_ctl", root)
        .arg("-D")
        .arg(&node.data)
        .arg("-l")
        .arg(&node.log)
        .args(["-w", "-t", "60", "start"])
        .output()
        .expect("running pg_ctl start");
    if !out.status.success() {
        panic!(
            "pg_ctl start of {} on port {} failed ({})\n--- stderr\n{}\n--- log tail\n{}",
            node.name,
            node.port,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            log_tail(&node.log, 40)
        );
    }
    node.running = true;
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut report = String::new();
            for n in self.nodes() {
                let _ = writeln!(
                    report,
                    "--- {} (port {}) log tail, {}\n{}",
                    n.name,
                    n.port,
                    n.log.display(),
                    log_tail(&n.log, 30)
                );
            }
            eprintln!("{report}");
        }
        let root = self.root.clone();
        for n in self.nodes() {
            if n.data.join("postmaster.pid").exists() {
                let _ = server_command("pg_ctl", &root)
                    .arg("-D")
                    .arg(&n.data)
                    .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("PGWAY_TEST_KEEP").is_some() {
                eprintln!("keeping cluster dir {}", dir.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------------------

/// Knobs for the gateway's TOML config.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// `pool.size`: server connections per node per (database, user).
    pub pool_size: usize,
    /// `pool.wait_timeout`, e.g. `"2s"`.
    pub wait_timeout: String,
    /// `topology.health_interval`, e.g. `"200ms"`.
    pub health_interval: String,
    /// Extra TOML inserted after `listen`/`admin_listen` and before `[[users]]`: top-level
    /// keys or whole tables (e.g. `"[routing]\n..."`).
    pub extra: String,
    /// Extra TOML lines inside the `[pool]` table, e.g. `"statement_cache = 2"` (a second
    /// `[pool]` header in [`GatewayOptions::extra`] would be a duplicate table).
    pub pool_extra: String,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            pool_size: 4,
            wait_timeout: "2s".into(),
            health_interval: "200ms".into(),
            extra: String::new(),
            pool_extra: String::new(),
        }
    }
}

/// The gateway's TOML config for `cluster` (nodes: primary first, then replicas).
pub fn gateway_toml(cluster: &Cluster, listen: &str, admin: &str, opts: &GatewayOptions) -> String {
    let nodes: Vec<String> = std::iter::once(cluster.primary_port())
        .chain(cluster.replica_ports())
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    format!(
        "listen = \"{listen}\"\n\
         admin_listen = \"{admin}\"\n\
         {extra}\n\
         [[users]]\n\
         name = \"{APP_USER}\"\n\
         password = \"{APP_PASSWORD}\"\n\
         \n\
         [[users]]\n\
         name = \"{MD5_USER}\"\n\
         password = \"{MD5_PASSWORD}\"\n\
         auth = \"md5\"\n\
         \n\
         [pool]\n\
         size = {size}\n\
         wait_timeout = \"{wait}\"\n\
         {pool_extra}\n\
         \n\
         [topology]\n\
         kind = \"static\"\n\
         nodes = [{nodes}]\n\
         health_interval = \"{health}\"\n",
        extra = opts.extra,
        size = opts.pool_size,
        wait = opts.wait_timeout,
        pool_extra = opts.pool_extra,
        nodes = nodes.join(", "),
        health = opts.health_interval,
    )
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,pgway=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The fields of `/proc/<pid>/stat` after the command name (field 2, in parentheses, may
/// contain spaces): `[0]` is field 3, the state. `None` if the process is gone.
pub fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// pgway running in-process on `127.0.0.1:<ephemeral>` in front of a [`Cluster`].
pub struct Gateway {
    port: u16,
    token: CancellationToken,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    toml: String,
    /// The config file (removed on drop).
    path: PathBuf,
}

/// How long the gateway may take to return from `run` after its token is cancelled.
const GATEWAY_STOP_GRACE: Duration = Duration::from_secs(5);

impl Gateway {
    /// Starts pgway with the default [`GatewayOptions`].
    pub fn start(cluster: &Cluster) -> Gateway {
        Gateway::start_with(cluster, GatewayOptions::default())
    }

    /// Starts pgway with `opts`. The listener is bound before this returns, so clients may
    /// connect at once; topology discovery happens in the background (see
    /// [`Gateway::wait_for_replica_reads`]).
    pub fn start_with(cluster: &Cluster, opts: GatewayOptions) -> Gateway {
        Gateway::start_toml(|listen| gateway_toml(cluster, listen, "127.0.0.1:0", &opts))
    }

    /// [`Gateway::start_with`] with the admin HTTP port on `admin`.
    pub fn start_with_admin(cluster: &Cluster, opts: GatewayOptions, admin: u16) -> Gateway {
        Gateway::start_toml(|listen| {
            gateway_toml(cluster, listen, &format!("127.0.0.1:{admin}"), &opts)
        })
    }

    /// Starts pgway in-process with the config `toml(listen)`, where `listen` is the
    /// `host:port` of the listener already bound for it.
    pub fn start_toml(toml: impl FnOnce(&str) -> String) -> Gateway {
        init_tracing();
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("binding the gateway listener");
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let port = listener.local_addr().expect("listener address").port();
        let toml = toml(&format!("127.0.0.1:{port}"));
        // From a file, as the binary reads it: the console's RELOAD reads it again.
        let path = std::env::var_os("PGWAY_TEST_TMPDIR")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join(format!("pgway-{}-{port}.toml", std::process::id()));
        std::fs::write(&path, &toml).expect("writing the gateway config");
        let config = pgway::config::Config::load(&path)
            .unwrap_or_else(|e| panic!("pgway rejected the test config: {e:?}\n{toml}"));
        let token = CancellationToken::new();
        let thread_token = token.clone();
        let thread = std::thread::Builder::new()
            .name(format!("pgway-{port}"))
            .spawn(move || -> Result<(), String> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("pgway-worker")
                    .enable_all()
                    .build()
                    .map_err(|e| format!("building the gateway runtime: {e}"))?;
                let result = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .map_err(|e| format!("registering the listener: {e}"))?;
                    let run = pgway::server::run(config, listener, thread_token.clone());
                    tokio::select! {
                        r = run => r.map_err(|e| format!("pgway::server::run returned {e:?}")),
                        _ = async {
                            thread_token.cancelled().await;
                            tokio::time::sleep(GATEWAY_STOP_GRACE).await;
                        } => {
                            eprintln!(
                                "warning: pgway did not return from run() within \
                                 {GATEWAY_STOP_GRACE:?} of shutdown; abandoning it"
                            );
                            Ok(())
                        }
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
                result
            })
            .expect("spawning the gateway thread");
        let mut gw = Gateway {
            port,
            token,
            thread: Some(thread),
            toml,
            path,
        };
        // Surface an immediate startup failure (e.g. a config the server rejects) here rather
        // than as a connection that is never accepted.
        std::thread::sleep(Duration::from_millis(100));
        if gw.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let r = gw.thread.take().expect("thread").join();
            panic!(
                "pgway stopped right after starting: {r:?}\n--- config\n{}",
                gw.toml
            );
        }
        gw
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TOML the gateway started with.
    pub fn toml(&self) -> &str {
        &self.toml
    }

    /// Writes `toml` to the gateway's config file and has it reloaded (the console's
    /// `RELOAD`, as `user`, who must be `admin = true`); the error text if refused.
    pub async fn reload(&self, toml: &str, user: &str, password: &str) -> Result<(), String> {
        std::fs::write(&self.path, toml).expect("rewriting the gateway config");
        let console = try_session(self.port, user, password, "pgway")
            .await
            .map_err(|e| describe_error(&e))?;
        console
            .client
            .simple_query("RELOAD")
            .await
            .map(drop)
            .map_err(|e| describe_error(&e))
    }

    /// A libpq URL for this gateway, e.g. for `psql` and `pgbench`.
    pub fn dsn(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// Waits until a plain read through the gateway is answered by one of the cluster's
    /// replicas (the gateway has found the replicas' roles). Panics after [`WAIT`].
    pub async fn wait_for_replica_reads(&self, cluster: &Cluster) {
        let replicas = cluster.replica_ports();
        eventually(
            "a read through pgway to be served by a replica",
            WAIT,
            async || {
                let client = try_connect(self.port, APP_USER, APP_PASSWORD)
                    .await
                    .map_err(|e| format!("connect: {}", describe_error(&e)))?;
                let served = try_served_by(&client)
                    .await
                    .map_err(|e| format!("select inet_server_port(): {}", describe_error(&e)))?;
                if replicas.contains(&served) {
                    Ok(())
                } else {
                    Err(format!(
                        "served by {}, replicas are {replicas:?}",
                        cluster.name_of(served)
                    ))
                }
            },
        )
        .await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.token.cancel();
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) if !std::thread::panicking() => panic!("{e}"),
                Ok(Err(e)) => eprintln!("{e}"),
                Err(_) if !std::thread::panicking() => panic!("the pgway thread panicked"),
                Err(_) => eprintln!("the pgway thread panicked"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// A tokio-postgres client plus the messages its connection received asynchronously
/// (notices and notifications) and the connection task.
pub struct Session {
    /// The client.
    pub client: Client,
    /// Notices (`AsyncMessage::Notice`) and notifications, in arrival order.
    pub messages: mpsc::UnboundedReceiver<AsyncMessage>,
    /// The task driving the connection; `abort()` it to drop the socket without a Terminate
    /// message (an abrupt client disconnect).
    pub task: JoinHandle<()>,
}

/// Connects to `port` as `user` to `db`, forwarding asynchronous messages to
/// [`Session::messages`].
pub async fn try_session(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Session, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .application_name("pgway-tests")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(10));
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(Ok(msg)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            let _ = tx.send(msg);
        }
    });
    Ok(Session {
        client,
        messages: rx,
        task,
    })
}

/// [`try_session`] that panics on failure.
pub async fn session(port: u16, user: &str, password: &str) -> Session {
    try_session(port, user, password, DB)
        .await
        .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port} as {user}: {e:?}"))
}

/// Connects to `appdb` on `port`; the connection runs in a spawned task.
pub async fn try_connect(
    port: u16,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    Ok(try_session(port, user, password, DB).await?.client)
}

/// [`try_connect`] that panics on failure.
pub async fn connect(port: u16, user: &str, password: &str) -> Client {
    session(port, user, password).await.client
}

/// `select inet_server_port()` (extended protocol): the port of the server that answered.
pub async fn try_served_by(client: &Client) -> Result<u16, tokio_postgres::Error> {
    let row = client.query_one("select inet_server_port()", &[]).await?;
    let port: i32 = row.get(0);
    Ok(u16::try_from(port).expect("a TCP port"))
}

/// [`try_served_by`] that panics on failure.
pub async fn served_by(client: &Client) -> u16 {
    try_served_by(client)
        .await
        .unwrap_or_else(|e| panic!("select inet_server_port() failed: {e:?}"))
}

/// Runs `sql` with the simple query protocol and returns every data row's columns as text
/// (NULL as `None`), across all result sets.
pub async fn simple_rows(
    client: &Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let mut rows = Vec::new();
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
        }
    }
    Ok(rows)
}

/// The first column of the first row of `sql` (simple protocol), as text.
pub async fn simple_value(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let rows = simple_rows(client, sql).await?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_else(|| panic!("`{sql}` returned no value: {rows:?}")))
}

/// The SQLSTATE of a tokio-postgres error, as a string (`"none"` when there is none).
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| "none".into())
}

/// A tokio-postgres error as a user sees it: `ERROR 42601: syntax error at ...`.
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// A set of ports, for readable assertions.
pub fn port_set(ports: impl IntoIterator<Item = u16>) -> BTreeSet<u16> {
    ports.into_iter().collect()
}

// ---------------------------------------------------------------------------------------
// Raw wire-protocol client
// ---------------------------------------------------------------------------------------

/// Protocol version 3.0, as sent in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;

/// A backend message: its type byte and body (without the length).
#[derive(Debug, Clone)]
pub struct BackendMessage {
    /// Message type, e.g. `b'E'`.
    pub tag: u8,
    /// Body after the length field.
    pub body: Vec<u8>,
}

impl BackendMessage {
    /// Fields of an ErrorResponse or NoticeResponse, by field code (`b'C'`: SQLSTATE, ...).
    pub fn fields(&self) -> HashMap<u8, String> {
        let mut out = HashMap::new();
        let mut rest = &self.body[..];
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            out.insert(code, String::from_utf8_lossy(&tail[..end]).into_owned());
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        out
    }

    /// The authentication request code of an `R` message (0 ok, 3 cleartext, 5 md5, 10 SASL).
    pub fn auth_code(&self) -> i32 {
        assert_eq!(self.tag, b'R', "not an authentication message: {self:?}");
        i32::from_be_bytes(self.body[..4].try_into().expect("4 bytes"))
    }
}

/// How a [`RawConn`] read ended when no message came.
#[derive(Debug)]
pub enum RawEnd {
    /// Orderly close (FIN).
    Eof,
    /// The peer reset the connection.
    Reset,
    /// Neither a message nor a close within the read deadline.
    Timeout,
    /// The server sent something that is not a valid backend message.
    Invalid(String),
}

/// A hand-written protocol client over a plain TCP socket, for sending malformed input.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Deadline for a single raw read.
const RAW_READ_TIMEOUT: Duration = Duration::from_secs(15);

impl RawConn {
    /// Opens a TCP connection to `127.0.0.1:port`.
    pub async fn connect(port: u16) -> RawConn {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("raw connect to {port}: {e}"));
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` as they are.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw write");
        self.stream.flush().await.expect("raw flush");
    }

    /// Closes our write side (the server sees EOF) while we keep reading.
    pub async fn shutdown_write(&mut self) {
        self.stream.shutdown().await.expect("raw shutdown");
    }

    /// Sends a well-formed StartupMessage (protocol 3.0) for `user` and `db`.
    pub async fn send_startup(&mut self, user: &str, db: &str) {
        let msg = startup_message(&[("user", user), ("database", db)]);
        self.send(&msg).await;
    }

    /// Sends a regular message: `tag`, length, `body`.
    pub async fn send_message(&mut self, tag: u8, body: &[u8]) {
        self.send(&message(tag, body)).await;
    }

    /// Reads the next backend message, or how the connection ended (15 s deadline).
    pub async fn recv(&mut self) -> Result<BackendMessage, RawEnd> {
        let deadline = tokio::time::Instant::now() + RAW_READ_TIMEOUT;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes"));
                if !(4..=1 << 30).contains(&len) {
                    return Err(RawEnd::Invalid(format!(
                        "message with length {len}: {:?}",
                        &self.buf[..5]
                    )));
                }
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let body = self.buf[5..total].to_vec();
                    let tag = self.buf[0];
                    self.buf.drain(..total);
                    return Ok(BackendMessage { tag, body });
                }
            }
            let mut chunk = [0u8; 8192];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RawEnd::Timeout),
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(RawEnd::Reset)
                }
                Ok(Err(e)) => return Err(RawEnd::Invalid(format!("read error: {e}"))),
            };
            if n == 0 {
                if self.buf.is_empty() {
                    return Err(RawEnd::Eof);
                }
                return Err(RawEnd::Invalid(format!(
                    "closed in the middle of a message: {:?}",
                    self.buf
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads the next message and panics unless it is one.
    pub async fn recv_message(&mut self) -> BackendMessage {
        match self.recv().await {
            Ok(m) => m,
            Err(end) => panic!("expected a message from the server, got {end:?}"),
        }
    }

    /// Sends a simple Query and returns every message up to and including ReadyForQuery.
    pub async fn query(&mut self, sql: &str) -> Vec<BackendMessage> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.send_message(b'Q', &body).await;
        self.until_ready().await
    }

    /// Reads messages up to and including ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<BackendMessage> {
        let mut out = Vec::new();
        loop {
            let m = self.recv_message().await;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Expects an ErrorResponse (after any NoticeResponses) followed by the server closing
    /// the connection. Returns the error's fields, or what happened instead.
    pub async fn expect_error_then_close(&mut self) -> Result<HashMap<u8, String>, String> {
        let err = loop {
            match self.recv().await {
                Ok(m) if m.tag == b'N' => continue,
                Ok(m) if m.tag == b'E' => break m,
                Ok(m) => {
                    return Err(format!(
                        "expected an ErrorResponse, got message '{}' {:?}",
                        m.tag as char,
                        String::from_utf8_lossy(&m.body)
                    ))
                }
                Err(end) => return Err(format!("expected an ErrorResponse, got {end:?}")),
            }
        };
        let fields = err.fields();
        match self.recv().await {
            Err(RawEnd::Eof | RawEnd::Reset) => Ok(fields),
            Err(end) => Err(format!(
                "expected the connection to close after the error {fields:?}, got {end:?}"
            )),
            Ok(m) => Err(format!(
                "expected the connection to close after the error {fields:?}, got message '{}'",
                m.tag as char
            )),
        }
    }

    /// Connects and sends a StartupMessage for `user`, up to pgway's password request.
    pub async fn awaiting_password(port: u16, user: &str) -> Result<RawConn, String> {
        let mut raw = RawConn::connect(port).await;
        raw.send_startup(user, DB).await;
        let m = raw.recv_message().await;
        if m.tag != b'R' || m.auth_code() == 0 {
            return Err(format!(
                "expected a password request, got '{}'",
                m.tag as char
            ));
        }
        Ok(raw)
    }

    /// Connects and logs in as `user` to `appdb` (SCRAM-SHA-256, md5 or cleartext, as the
    /// server asks), reading up to the first ReadyForQuery.
    pub async fn login(port: u16, user: &str, password: &str) -> RawConn {
        RawConn::login_with(port, user, password, &[]).await.0
    }

    /// [`RawConn::login`] with extra StartupMessage parameters (e.g. `("TimeZone", "UTC")`,
    /// `("options", "-c search_path=x")`). Also returns every message the server sent before
    /// the first ReadyForQuery (ParameterStatus, BackendKeyData, ...), in order.
    pub async fn login_with(
        port: u16,
        user: &str,
        password: &str,
        params: &[(&str, &str)],
    ) -> (RawConn, Vec<BackendMessage>) {
        let mut conn = RawConn::connect(port).await;
        let mut all = vec![("user", user), ("database", DB)];
        all.extend_from_slice(params);
        conn.send(&startup_message(&all)).await;
        let mut seen = Vec::new();
        let mut scram: Option<postgres_protocol::authentication::sasl::ScramSha256> = None;
        loop {
            let m = conn.recv_message().await;
            match m.tag {
                b'R' => match m.auth_code() {
                    0 => {}
                    3 => {
                        let mut body = password.as_bytes().to_vec();
                        body.push(0);
                        conn.send_message(b'p', &body).await;
                    }
                    5 => {
                        let salt: [u8; 4] = m.body[4..8].try_into().expect("md5 salt");
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            password.as_bytes(),
                            salt,
                        );
                        let mut body = hash.into_bytes();
                        body.push(0);
                        conn.send_message(b'p', &body).await;
                    }
                    10 => {
                        let s = postgres_protocol::authentication::sasl::ScramSha256::new(
                            password.as_bytes(),
                            postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
                        );
                        let mut body = b"SCRAM-SHA-256\0".to_vec();
                        body.extend_from_slice(&(s.message().len() as i32).to_be_bytes());
                        body.extend_from_slice(s.message());
                        conn.send_message(b'p', &body).await;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().expect("SASLContinue before SASL");
                        s.update(&m.body[4..]).expect("SCRAM server-first message");
                        let reply = s.message().to_vec();
                        conn.send_message(b'p', &reply).await;
                    }
                    12 => {
                        let s = scram.as_mut().expect("SASLFinal before SASL");
                        s.finish(&m.body[4..]).expect("SCRAM server signature");
                    }
                    other => panic!("unexpected authentication request {other}"),
                },
                b'E' => panic!("raw login as {user} failed: {:?}", m.fields()),
                b'Z' => {
                    seen.push(m);
                    return (conn, seen);
                }
                _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
            }
            seen.push(m);
        }
    }
}

/// A StartupMessage (protocol 3.0) with `params`.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// A regular frontend message: `tag`, length (including itself), `body`.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![tag];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(body);
    msg
}

/// The value of the sample `name{labels}` (exactly as written in `/metrics`'s text), if
/// present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
}

/// `/metrics` from the admin port `admin`.
pub async fn scrape(admin: u16) -> String {
    http_get(admin, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
}

pub async fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf),
    )
    .await
    .map_err(|_| "no complete HTTP response within 10 s".to_string())?
    .map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `GET /topology` on the admin port, as JSON.
pub async fn topology_json(admin: u16) -> serde_json::Value {
    let response = http_get(admin, "/topology").await.expect("GET /topology");
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no HTTP body in {response}"));
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/topology is not JSON ({e}): {body}"))
}

/// Waits until pgway runs transactions on the node at `new_primary` (after a promotion),
/// asking through a connection of its own as `md5user`.
pub async fn wait_for_new_primary(gateway_port: u16, new_primary: u16) {
    let probe = connect(gateway_port, MD5_USER, MD5_PASSWORD).await;
    eventually("pgway to find the new primary", WAIT, async || {
        let rows = simple_rows(&probe, "begin; select inet_server_port(); commit")
            .await
            .map_err(|e| describe_error(&e))?;
        let port = rows.first().and_then(|r| r[0].clone()).unwrap_or_default();
        if port == new_primary.to_string() {
            Ok(())
        } else {
            Err(format!("a transaction ran on {port}"))
        }
    })
    .await;
}

/// Backend pids seen by `clients` transactions run at once, each holding its server
/// connection for a moment (on the primary: `begin` pins it there).
pub async fn concurrent_pids(
    port: u16,
    password: &str,
    clients: usize,
) -> std::collections::HashSet<i32> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let password = password.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = connect(port, APP_USER, &password).await;
            let rows = simple_rows(
                &client,
                "begin; select pg_backend_pid(); select pg_sleep(0.4); commit",
            )
            .await
            .expect("a transaction through pgway");
            rows[0][0]
                .clone()
                .expect("a pid")
                .parse::<i32>()
                .expect("an int")
        }));
    }
    let mut pids = std::collections::HashSet::new();
    for task in tasks {
        pids.insert(task.await.expect("client task"));
    }
    pids
}

// ---------------------------------------------------------------------------------------
// The pgway binary as its own process (for measuring its memory), and raw reads
// ---------------------------------------------------------------------------------------

/// The `pgway` binary (`CARGO_BIN_EXE_pgway`) running as a child process with its config in
/// a file, stderr in `pgway.log` next to it (printed when a test fails). Dropping it kills
/// the process and removes the directory.
pub struct GatewayProcess {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts the binary in front of `cluster` with [`gateway_toml`] for `opts`, logging
    /// at `RUST_LOG` (default `warn`). The child inherits this process's limits (see
    /// [`raise_open_files`]).
    pub fn start(cluster: &Cluster, opts: &GatewayOptions) -> GatewayProcess {
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        GatewayProcess::start_logging(cluster, opts, &rust_log)
    }

    /// [`GatewayProcess::start`] with the tracing filter `rust_log` (see
    /// [`GatewayProcess::log`]).
    pub fn start_logging(
        cluster: &Cluster,
        opts: &GatewayOptions,
        rust_log: &str,
    ) -> GatewayProcess {
        let port = free_loopback_port();
        let admin = free_loopback_port();
        let toml = gateway_toml(
            cluster,
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{admin}"),
            opts,
        );
        let parent =
            std::env::var_os("PGWAY_TEST_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let dir = tempfile::Builder::new()
            .prefix("pgway-bin-")
            .tempdir_in(&parent)
            .expect("creating the binary's temp dir");
        let config = dir.path().join("pgway.toml");
        std::fs::write(&config, &toml).expect("writing the config file");
        let log = std::fs::File::create(dir.path().join("pgway.log")).expect("creating the log");
        let child = Command::new(env!("CARGO_BIN_EXE_pgway"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting pgway");
        GatewayProcess { child, port, dir }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgway.log")).unwrap_or_default()
    }

    /// Waits until a client can log in and, if `cluster` has replicas, a plain read is
    /// answered by one of them (pgway has found the replicas' roles).
    pub async fn wait_ready(&mut self, cluster: &Cluster) {
        let (port, replicas) = (self.port, cluster.replica_ports());
        let child = &mut self.child;
        eventually("the pgway binary to serve reads", WAIT, async || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("pgway exited with {status}");
            }
            let client = try_connect(port, APP_USER, APP_PASSWORD)
                .await
                .map_err(|e| describe_error(&e))?;
            let served = try_served_by(&client)
                .await
                .map_err(|e| describe_error(&e))?;
            if replicas.is_empty() || replicas.contains(&served) {
                Ok(())
            } else {
                Err(format!("a read was served by port {served}"))
            }
        })
        .await;
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- pgway binary log tail\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// Raises this process's open-file limit (`RLIMIT_NOFILE`) to at least `need`, with
/// `prlimit` (tests forbid `unsafe`, so no `setrlimit` call). Child processes started
/// afterwards, such as a [`GatewayProcess`], inherit it. Panics if the hard limit is lower
/// and cannot be raised (that needs root or `CAP_SYS_RESOURCE`).
pub fn raise_open_files(need: u64) {
    let limits = |what: &str| -> (u64, u64) {
        let text = std::fs::read_to_string("/proc/self/limits").expect("reading /proc/self/limits");
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or_else(|| panic!("no open-files line in /proc/self/limits {what}"));
        let mut values = line["Max open files".len()..].split_whitespace().map(|v| {
            if v == "unlimited" {
                u64::MAX
            } else {
                v.parse::<u64>().expect("a limit")
            }
        });
        (values.next().expect("soft"), values.next().expect("hard"))
    };
    let (soft, hard) = limits("before");
    if soft >= need {
        return;
    }
    let hard = hard.max(need);
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={need}:{hard}"))
        .status()
        .expect("running prlimit (util-linux)");
    let (now, _) = limits("after");
    assert!(
        status.success() && now >= need,
        "the open-files limit is {soft} and could not be raised to {need} ({status}); \
         raise it (ulimit -n {need}) before running this test"
    );
}

impl RawConn {
    /// Reads raw bytes (what was already buffered first), without parsing them: for a
    /// client that reads its results slowly. 0 means the server closed the connection.
    pub async fn read_raw(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if !self.buf.is_empty() {
            let n = out.len().min(self.buf.len());
            out[..n].copy_from_slice(&self.buf[..n]);
            self.buf.drain(..n);
            return Ok(n);
        }
        self.stream.read(out).await
    }
}

/// Roles only the servers know, and a SECURITY DEFINER look-up as pgbouncer's docs
/// recommend (`pgway_auth` may run it, not read `pg_authid`).
pub const AUTH_QUERY_SCHEMA: &str = "\
    CREATE ROLE pgway_auth LOGIN PASSWORD 'auth-secret';\n\
    CREATE SCHEMA pgway_auth;\n\
    CREATE FUNCTION pgway_auth.get_auth(p_usename text)\n\
      RETURNS TABLE(username text, password text) LANGUAGE sql SECURITY DEFINER\n\
      AS $$ SELECT rolname::text, rolpassword::text FROM pg_authid WHERE rolname = p_usename $$;\n\
    REVOKE ALL ON FUNCTION pgway_auth.get_auth(text) FROM PUBLIC;\n\
    GRANT USAGE ON SCHEMA pgway_auth TO pgway_auth;\n\
    GRANT EXECUTE ON FUNCTION pgway_auth.get_auth(text) TO pgway_auth;\n\
    CREATE ROLE dyn LOGIN PASSWORD 'dyn-secret';\n\
    SET password_encryption = 'md5';\n\
    CREATE ROLE dyn_md5 LOGIN PASSWORD 'dyn-md5-secret';\n\
    RESET password_encryption;\n\
    CREATE ROLE dyn_nopass LOGIN;\n\
    CREATE TABLE dyn_t (i int);\n\
    GRANT ALL ON dyn_t TO dyn;\n";

/// The SQLSTATE of an ErrorResponse the client gets, followed by the connection closing.
pub async fn fatal_then_close(conn: &mut RawConn) -> String {
    let fields = conn
        .expect_error_then_close()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        fields.get(&b'S').map(String::as_str),
        Some("FATAL"),
        "{fields:?}"
    );
    fields.get(&b'C').cloned().unwrap_or_default()
}

/// Runs `sql` and asserts it succeeded (no ErrorResponse); returns the transaction status.
pub async fn query_ok(conn: &mut RawConn, sql: &str) -> u8 {
    let replies = conn.query(sql).await;
    if let Some(e) = replies.iter().find(|m| m.tag == b'E') {
        panic!("{sql}: {:?}", e.fields());
    }
    replies.last().expect("ReadyForQuery").body[0]
}
