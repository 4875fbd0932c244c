//! A real Patroni cluster for integration tests: one etcd (v3 API) and two Patroni 3.0 nodes
//! (`node1`, `node2`) running PostgreSQL 15, all on free loopback ports, in a temporary
//! directory; plus a way to start pgway with `topology.kind = "patroni"` in front of it.
//!
//! # Layout
//! - etcd runs as the invoking user; Patroni (and so PostgreSQL) as the `postgres` OS user when
//!   the tests run as root. etcd and each Patroni run in a process group of their own; Patroni
//!   starts the postmaster in a session of its own, so a member's PostgreSQL is killed through
//!   the process group of the pid in its `postmaster.pid`.
//! - Patroni's config (`<dir>/nodeN.yml`) uses the `etcd3:` section (the v3 API: the `etcd:`
//!   section speaks v2, which etcd 3.4 disables), `ttl: 10`, `loop_wait: 2`,
//!   `retry_timeout: 5`, `use_pg_rewind: true` (with `wal_log_hints`), replication slots,
//!   `failsafe_mode: true` (the primary keeps running while etcd is down, as long as it reaches
//!   every member) and optionally `synchronous_mode` and a `log_line_prefix`. pg_hba lets
//!   [`super::WAL_USER`] open replication connections (the cache's stream) once a test has
//!   created that role.
//! - [`PatroniCluster::start`] bootstraps `node1` first (it becomes the leader), then `node2`
//!   clones it; it returns when `node1` is primary and `node2` streams from it (and, with
//!   `synchronous_mode`, is the synchronous standby). The role `app` (password `app-secret`,
//!   SCRAM) owns the database `appdb`, like in [`super::Cluster`]. The PostgreSQL superuser
//!   `postgres` is trusted on loopback, so [`super::try_psql`] works against every member.
//! - A watcher (`etcdctl watch` on the leader key) timestamps every change of
//!   `/<namespace>/<scope>/leader` the moment etcd reports it: [`PatroniCluster::wait_new_leader_key`]
//!   returns that instant, which is what failover delays are measured from.
//! - Failures: [`PatroniCluster::kill_leader`] (SIGKILL to the leader's Patroni and PostgreSQL
//!   at once; [`PatroniCluster::kill_member`] for any member,
//!   [`PatroniCluster::kill_member_postgres`] for its PostgreSQL alone),
//!   [`PatroniCluster::restart_member`] (it rejoins as a replica, with `pg_rewind`),
//!   [`PatroniCluster::switchover`] (`patronictl switchover --force`),
//!   [`PatroniCluster::stop_etcd`] / [`PatroniCluster::start_etcd`],
//!   [`PatroniCluster::set_noloadbalance`] (config rewrite + SIGHUP).
//! - [`PatroniCluster::gateway`] starts pgway in-process (like [`super::Gateway::start_with`])
//!   with `topology.kind = "patroni"` pointing at this etcd and scope.
//! - Most methods block (they run etcdctl, psql, patronictl and poll): call them from the test
//!   body, not from tasks that share the runtime's worker threads with the load.
//! - Dropping the cluster kills every process it started (Patroni, PostgreSQL, etcd, the
//!   watcher) and removes the directory (`PGWAY_TEST_KEEP=1` keeps it). When a test panics,
//!   the tails of the Patroni and etcd logs are printed.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    describe_error, eventually, free_port, is_root, log_tail, pg_bin_dir, run_ok, try_connect,
    try_psql, try_served_by, wait_until_blocking, Gateway, APP_PASSWORD, APP_USER, DB, WAL_USER,
};

/// Patroni's `namespace` in every test cluster.
pub const NAMESPACE: &str = "/service";

/// Deadline for Patroni to bootstrap, clone, fail over or rejoin.
pub const PATRONI_WAIT: Duration = Duration::from_secs(90);

/// Member names, in start order (`node1` bootstraps the cluster and is the first leader).
const MEMBERS: [&str; 2] = ["node1", "node2"];

/// Knobs for the Patroni cluster.
#[derive(Debug, Clone, Default)]
pub struct PatroniOptions {
    /// Patroni's `synchronous_mode`: the replica is a synchronous standby, so no acknowledged
    /// commit can be lost when the leader is killed. Off: asynchronous replication.
    pub synchronous_mode: bool,
    /// Members started with the `noloadbalance` tag.
    pub noloadbalance: Vec<String>,
    /// PostgreSQL's `log_line_prefix` (PostgreSQL's default when `None`). The servers log
    /// to their member's Patroni log (`<dir>/nodeN.log`, see [`PatroniCluster::member_log`]);
    /// `%a` (application_name) tells clients' statements apart from pgway's probes.
    pub log_line_prefix: Option<String>,
}

/// One change of the leader key, as the watcher saw it.
#[derive(Debug, Clone)]
pub struct LeaderEvent {
    /// When the watcher read the event from etcd.
    pub at: Instant,
    /// The new value (a member name), or `None` when the key was deleted.
    pub value: Option<String>,
}

/// What [`PatroniCluster::kill_leader`] killed, and when.
#[derive(Debug, Clone)]
pub struct Killed {
    /// The member that was the leader.
    pub name: String,
    /// Its PostgreSQL port.
    pub port: u16,
    /// Just before the first `kill`.
    pub at: Instant,
}

struct Member {
    name: String,
    pg_port: u16,
    api_port: u16,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    noloadbalance: bool,
    patroni: Option<Child>,
}

struct Etcd {
    data: PathBuf,
    log: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

struct Watch {
    child: Child,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// etcd plus two Patroni-managed PostgreSQL nodes on loopback.
pub struct PatroniCluster {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    scope: String,
    opts: PatroniOptions,
    pg_uid: Option<(u32, u32)>,
    etcd: Etcd,
    members: Vec<Member>,
    events: Arc<Mutex<Vec<LeaderEvent>>>,
    watch: Option<Watch>,
}

static SCOPE_COUNTER: AtomicU32 = AtomicU32::new(0);

fn uid_gid_of(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = run_ok(Command::new("id").args([flag, user]));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("id {flag} {user}: {e}"))
    };
    (id("-u"), id("-g"))
}

fn open_log(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// The HTTP status of `GET path` on the Patroni REST API at `port`.
pub fn patroni_http_status(port: u16, path: &str) -> Result<u16, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect to REST API {port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("write to REST API {port}: {e}"))?;
    let mut buf = Vec::new();
    let _ = s.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status from REST API {port}: {text:?}"))?;
    Ok(status)
}

/// The process group of process `pid` (field 5 of `/proc/<pid>/stat`), if it is alive.
fn pgid_of(pid: u32) -> Option<u32> {
    let fields = super::proc_stat_fields(pid)?;
    if fields.first().map(String::as_str) == Some("Z") {
        return None;
    }
    fields.get(2)?.parse().ok()
}

fn alive(pid: u32) -> bool {
    pgid_of(pid).is_some()
}

/// `kill -<signal> -- <target>` (a pid, or `-pgid` for a process group). Errors are ignored.
fn send_signal(signal: &str, target: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The postmaster pid written in `data/postmaster.pid`, if that process is alive.
fn postmaster_pid(data: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// Kills the postmaster of `data` and every process of its process group (its backends and
/// auxiliary processes) with SIGKILL, and waits until the postmaster is gone.
fn kill_postgres(data: &Path) {
    let Some(pid) = postmaster_pid(data) else {
        return;
    };
    // Patroni starts the postmaster from a helper that called setsid(), so the group is
    // PostgreSQL's own; never signal our own group.
    match pgid_of(pid) {
        Some(pgid) if pgid > 1 && Some(pgid) != pgid_of(std::process::id()) => {
            send_signal("KILL", &format!("-{pgid}"))
        }
        _ => {}
    }
    send_signal("KILL", &pid.to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl PatroniCluster {
    /// [`PatroniCluster::start_with`] with the default options (asynchronous replication).
    pub fn start() -> PatroniCluster {
        PatroniCluster::start_with(PatroniOptions::default())
    }

    /// Starts etcd and both Patroni nodes and waits until `node1` is the primary and `node2`
    /// a streaming replica (about 15-25 s).
    pub fn start_with(opts: PatroniOptions) -> PatroniCluster {
        for tool in ["etcd", "etcdctl", "patroni", "patronictl"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                found,
                "`{tool}` is not installed: run scripts/install-deps.sh (packages etcd-server, \
                 etcd-client, patroni)"
            );
        }
        let parent = std::env::var_os("PGWAY_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        std::fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        let dir = tempfile::Builder::new()
            .prefix("pgway-patroni-")
            .tempdir_in(&parent)
            .expect("creating the Patroni cluster temp dir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("sock")).expect("creating the socket dir");
        let pg_uid = if is_root() {
            run_ok(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&root),
            );
            Some(uid_gid_of("postgres"))
        } else {
            None
        };

        let mut taken = Vec::new();
        let client_port = free_port(&mut taken);
        let peer_port = free_port(&mut taken);
        let mut members = Vec::new();
        for name in MEMBERS {
            members.push(Member {
                name: name.to_string(),
                pg_port: free_port(&mut taken),
                api_port: free_port(&mut taken),
                config: root.join(format!("{name}.yml")),
                data: root.join(name),
                log: root.join(format!("{name}.log")),
                noloadbalance: opts.noloadbalance.iter().any(|n| n == name),
                patroni: None,
            });
        }
        drop(taken);

        let scope = format!(
            "pgway-{}-{}",
            std::process::id(),
            SCOPE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut pc = PatroniCluster {
            etcd: Etcd {
                data: root.join("etcd"),
                log: root.join("etcd.log"),
                client_port,
                peer_port,
                child: None,
            },
            dir: Some(dir),
            root,
            scope,
            opts,
            pg_uid,
            members,
            events: Arc::new(Mutex::new(Vec::new())),
            watch: None,
        };
        pc.start_etcd();
        pc.start_watch();
        for i in 0..pc.members.len() {
            pc.write_config(i);
        }
        let started = Instant::now();
        pc.spawn_patroni("node1");
        pc.wait_primary("node1");
        pc.spawn_patroni("node2");
        pc.psql_db(
            "node1",
            "postgres",
            "CREATE ROLE app LOGIN PASSWORD 'app-secret';\n\
             CREATE DATABASE appdb OWNER app;\n",
        );
        pc.wait_replica("node2");
        pc.wait_replay();
        eprintln!(
            "patroni cluster {} up in {:.1?}: etcd 127.0.0.1:{}, {}",
            pc.scope,
            started.elapsed(),
            pc.etcd.client_port,
            pc.members
                .iter()
                .map(|m| format!("{} pg {} api {}", m.name, m.pg_port, m.api_port))
                .collect::<Vec<_>>()
                .join(", ")
        );
        pc
    }

    fn member_index(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member named {name:?}"))
    }

    fn member(&self, name: &str) -> &Member {
        &self.members[self.member_index(name)]
    }

    fn write_config(&self, i: usize) {
        let m = &self.members[i];
        let yaml = format!(
            "# Patroni {name}, written by the pgway test harness\n\
             scope: {scope}\n\
             namespace: {NAMESPACE}\n\
             name: {name}\n\
             log:\n\
             \x20 level: INFO\n\
             restapi:\n\
             \x20 listen: 127.0.0.1:{api}\n\
             \x20 connect_address: 127.0.0.1:{api}\n\
             etcd3:\n\
             \x20 hosts: 127.0.0.1:{etcd}\n\
             bootstrap:\n\
             \x20 dcs:\n\
             \x20   ttl: 10\n\
             \x20   loop_wait: 2\n\
             \x20   retry_timeout: 5\n\
             \x20   maximum_lag_on_failover: 1048576\n\
             \x20   failsafe_mode: true\n\
             \x20   synchronous_mode: {sync}\n\
             \x20   postgresql:\n\
             \x20     use_pg_rewind: true\n\
             \x20     use_slots: true\n\
             \x20     parameters:\n\
             \x20       wal_level: logical\n\
             \x20       hot_standby: \"on\"\n\
             \x20       max_connections: 200\n\
             \x20       max_wal_senders: 10\n\
             \x20       max_replication_slots: 10\n\
             \x20       wal_keep_size: 256MB\n\
             \x20       wal_log_hints: \"on\"\n\
             \x20       fsync: \"off\"\n\
             \x20 initdb:\n\
             \x20   - encoding: UTF8\n\
             \x20   - locale: C\n\
             \x20   - no-sync\n\
             postgresql:\n\
             \x20 listen: 127.0.0.1:{pg}\n\
             \x20 connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {data}\n\
             \x20 bin_dir: {bin}\n\
             \x20 pgpass: {root}/{name}.pgpass\n\
             \x20 basebackup:\n\
             \x20   - checkpoint: fast\n\
             \x20 authentication:\n\
             \x20   superuser:\n\
             \x20     username: postgres\n\
             \x20     password: postgres-secret\n\
             \x20   replication:\n\
             \x20     username: replicator\n\
             \x20     password: replicator-secret\n\
             \x20 parameters:\n\
             \x20   unix_socket_directories: {root}/sock\n\
             {prefix}\
             \x20 pg_hba:\n\
             \x20   - local all all trust\n\
             \x20   - local replication all trust\n\
             \x20   - host replication replicator 127.0.0.1/32 scram-sha-256\n\
             \x20   - host replication {WAL_USER} 127.0.0.1/32 scram-sha-256\n\
             \x20   - host all postgres 127.0.0.1/32 trust\n\
             \x20   - host all all 127.0.0.1/32 scram-sha-256\n\
             tags:\n\
             \x20 nofailover: false\n\
             \x20 noloadbalance: {nolb}\n\
             \x20 clonefrom: false\n\
             \x20 nosync: false\n",
            name = m.name,
            scope = self.scope,
            api = m.api_port,
            etcd = self.etcd.client_port,
            sync = self.opts.synchronous_mode,
            pg = m.pg_port,
            data = m.data.display(),
            bin = pg_bin_dir().display(),
            root = self.root.display(),
            nolb = m.noloadbalance,
            prefix = self
                .opts
                .log_line_prefix
                .as_ref()
                .map(|p| format!("\x20   log_line_prefix: \"{p}\"\n"))
                .unwrap_or_default(),
        );
        std::fs::write(&m.config, yaml)
            .unwrap_or_else(|e| panic!("writing {}: {e}", m.config.display()));
        if is_root() {
            run_ok(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&m.config),
            );
        }
    }

    fn spawn_patroni(&mut self, name: &str) {
        let i = self.member_index(name);
        let log = open_log(&self.members[i].log);
        let mut cmd = Command::new("patroni");
        cmd.arg(&self.members[i].config)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .env_remove("PGDATA")
            .env_remove("PGUSER")
            .env_remove("PGDATABASE")
            .env_remove("PGPASSWORD")
            .env("LC_ALL", "C.UTF-8")
            .process_group(0);
        if let Some((uid, gid)) = self.pg_uid {
            cmd.uid(uid)
                .gid(gid)
                .env("HOME", "/var/lib/postgresql")
                .env("USER", "postgres")
                .env("LOGNAME", "postgres");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting Patroni {name}: {e}"));
        self.members[i].patroni = Some(child);
    }

    // -------------------------------------------------------------------------------------
    // etcd
    // -------------------------------------------------------------------------------------

    /// `host:port` of etcd's client listener.
    pub fn etcd_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.etcd.client_port)
    }

    /// Patroni's `scope` (unique per cluster).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    fn etcdctl(&self) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=http://{}", self.etcd_endpoint()))
            .args(["--dial-timeout=2s", "--command-timeout=3s"])
            .stdin(Stdio::null());
        cmd
    }

    /// The value of `key` under `/<namespace>/<scope>/` (`leader`, `members/node1`, ...).
    pub fn try_etcd_get(&self, key: &str) -> Result<Option<String>, String> {
        let full = format!("{NAMESPACE}/{}/{key}", self.scope);
        let out = self
            .etcdctl()
            .args(["get", "--print-value-only", &full])
            .output()
            .map_err(|e| format!("running etcdctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "etcdctl get {full}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let v = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        Ok((!v.is_empty()).then_some(v))
    }

    /// Starts etcd (again, on the same ports and data) and waits until it answers.
    pub fn start_etcd(&mut self) {
        assert!(self.etcd.child.is_none(), "etcd is already running");
        let url = format!("http://127.0.0.1:{}", self.etcd.client_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd.peer_port);
        let log = open_log(&self.etcd.log);
        let child = Command::new("etcd")
            .args(["--name", "default", "--data-dir"])
            .arg(&self.etcd.data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd: {e}"));
        self.etcd.child = Some(child);
        wait_until_blocking("etcd to answer", Duration::from_secs(30), || {
            self.try_etcd_get("leader").map(|_| ())
        });
        // A watch that outlived an etcd outage resumes only after gRPC's reconnect backoff,
        // and would then timestamp events late: watch afresh.
        if self.watch.is_some() {
            self.stop_watch();
            self.start_watch();
        }
    }

    /// Kills etcd (SIGKILL). Patroni and pgway lose their DCS until [`PatroniCluster::start_etcd`].
    pub fn stop_etcd(&mut self) {
        if let Some(mut child) = self.etcd.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_watch(&mut self) {
        if let Some(mut w) = self.watch.take() {
            let _ = w.child.kill();
            let _ = w.child.wait();
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn start_watch(&mut self) {
        let key = format!("{NAMESPACE}/{}/leader", self.scope);
        let mut child = self
            .etcdctl()
            .args(["watch", &key])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcdctl watch: {e}"));
        let stdout = child.stdout.take().expect("watch stdout");
        let events = Arc::clone(&self.events);
        // `etcdctl watch` prints three lines per event: PUT|DELETE, the key, the value. It
        // keeps running (and resumes) across an etcd restart.
        let thread = std::thread::Builder::new()
            .name("leader-watch".into())
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                while let Some(Ok(kind)) = lines.next() {
                    let at = Instant::now();
                    let (Some(Ok(_key)), Some(Ok(value))) = (lines.next(), lines.next()) else {
                        break;
                    };
                    let value = match kind.trim() {
                        "PUT" => Some(value.trim().to_string()),
                        "DELETE" => None,
                        _ => continue,
                    };
                    events
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(LeaderEvent { at, value });
                }
            })
            .expect("spawning the watch thread");
        self.watch = Some(Watch {
            child,
            thread: Some(thread),
        });
        // The watch is live once etcdctl has connected; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Every leader-key event seen so far.
    pub fn leader_events(&self) -> Vec<LeaderEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the leader key holds a member other than `old` and returns that member and
    /// the instant the watcher saw the change (only events after the last one that named `old`
    /// count).
    pub fn wait_new_leader_key(&self, old: &str, timeout: Duration) -> (String, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.leader_events();
            let start = events
                .iter()
                .rposition(|e| e.value.as_deref() == Some(old))
                .map(|i| i + 1)
                .unwrap_or(0);
            if let Some(e) = events[start..]
                .iter()
                .find(|e| e.value.as_deref().is_some_and(|v| v != old))
            {
                return (e.value.clone().expect("a value"), e.at);
            }
            if Instant::now() >= deadline {
                panic!(
                    "no new leader key (other than {old}) within {timeout:?}; events: {:?}; \
                     leader key now: {:?}",
                    events
                        .iter()
                        .map(|e| e.value.as_deref().unwrap_or("<deleted>"))
                        .collect::<Vec<_>>(),
                    self.try_etcd_get("leader")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Async version of [`PatroniCluster::wait_new_leader_key`] (polls without blocking the
    /// runtime).
    pub async fn wait_new_leader_key_async(
        &self,
        old: &str,
        timeout: Duration,
    ) -> (String, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.leader_events();
            let start = events
                .iter()
                .rposition(|e| e.value.as_deref() == Some(old))
                .map(|i| i + 1)
                .unwrap_or(0);
            if let Some(e) = events[start..]
                .iter()
                .find(|e| e.value.as_deref().is_some_and(|v| v != old))
            {
                return (e.value.clone().expect("a value"), e.at);
            }
            if Instant::now() >= deadline {
                return self.wait_new_leader_key(old, Duration::ZERO);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // -------------------------------------------------------------------------------------
    // Members
    // -------------------------------------------------------------------------------------

    /// Member names (`node1`, `node2`).
    pub fn member_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The member that is not `name`.
    pub fn other_member(&self, name: &str) -> String {
        self.members
            .iter()
            .find(|m| m.name != name)
            .map(|m| m.name.clone())
            .expect("two members")
    }

    /// PostgreSQL port of member `name`.
    pub fn member_port(&self, name: &str) -> u16 {
        self.member(name).pg_port
    }

    /// Patroni REST API port of member `name`.
    pub fn api_port(&self, name: &str) -> u16 {
        self.member(name).api_port
    }

    /// `name:port` for a PostgreSQL port of this cluster, or `unknown:port`.
    pub fn name_of(&self, port: u16) -> String {
        self.members
            .iter()
            .find(|m| m.pg_port == port)
            .map(|m| format!("{}:{port}", m.name))
            .unwrap_or_else(|| format!("unknown:{port}"))
    }

    /// The current value of the leader key, if any.
    pub fn try_leader_name(&self) -> Option<String> {
        self.try_etcd_get("leader").ok().flatten()
    }

    /// The current leader (panics when there is none).
    pub fn leader_name(&self) -> String {
        self.try_leader_name()
            .unwrap_or_else(|| panic!("no leader key in etcd for scope {}", self.scope))
    }

    /// The directory of the cluster (configs, data, logs).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Waits until `name` holds the leader key, its REST API answers `/primary` with 200 and
    /// its PostgreSQL is out of recovery (Patroni reports the role before the promotion ends).
    pub fn wait_primary(&self, name: &str) {
        let (api, port) = (self.api_port(name), self.member_port(name));
        wait_until_blocking(&format!("{name} to be the primary"), PATRONI_WAIT, || {
            let leader = self.try_leader_name();
            if leader.as_deref() != Some(name) {
                return Err(format!("leader key = {leader:?}"));
            }
            match patroni_http_status(api, "/primary")? {
                200 => {}
                s => return Err(format!("GET /primary -> {s}")),
            }
            match try_psql(port, "postgres", "select pg_is_in_recovery()")?.as_str() {
                "f" => Ok(()),
                r => Err(format!("pg_is_in_recovery() = {r}")),
            }
        });
    }

    /// Waits until `name` is a running replica (REST `/replica` 200, or `/read-only` with the
    /// `noloadbalance` tag) that streams from the leader; with `synchronous_mode`, until it is
    /// the synchronous standby.
    pub fn wait_replica(&self, name: &str) {
        let m = self.member(name);
        let (api, port) = (m.api_port, m.pg_port);
        // Patroni answers /replica with 503 for a member tagged noloadbalance.
        let probe = if m.noloadbalance {
            "/health"
        } else {
            "/replica"
        };
        wait_until_blocking(
            &format!("{name} to be a streaming replica"),
            PATRONI_WAIT,
            || {
                match patroni_http_status(api, probe)? {
                    200 => {}
                    s => return Err(format!("GET {probe} -> {s}")),
                }
                if patroni_http_status(api, "/primary")? == 200 {
                    return Err("it is the primary".into());
                }
                let status = try_psql(port, "postgres", "select status from pg_stat_wal_receiver")?;
                if status != "streaming" {
                    return Err(format!("wal receiver status {status:?}"));
                }
                if self.opts.synchronous_mode {
                    let leader = self.try_leader_name().ok_or("no leader")?;
                    let state = try_psql(
                        self.member_port(&leader),
                        "postgres",
                        &format!(
                            "select sync_state from pg_stat_replication \
                             where application_name = '{name}'"
                        ),
                    )?;
                    if state != "sync" {
                        return Err(format!("sync_state on {leader} = {state:?}"));
                    }
                }
                Ok(())
            },
        );
    }

    /// Waits until every running replica has replayed the leader's current WAL position.
    pub fn wait_replay(&self) {
        let leader = self.leader_name();
        let target = self.psql_db(&leader, "postgres", "select pg_current_wal_lsn()");
        for m in self.members.iter().filter(|m| m.name != leader) {
            if m.patroni.is_none() {
                continue;
            }
            let port = m.pg_port;
            wait_until_blocking(
                &format!("{} to replay up to {target}", m.name),
                PATRONI_WAIT,
                || {
                    let out = try_psql(
                        port,
                        "postgres",
                        &format!("select pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
                    )?;
                    if out == "t" {
                        Ok(())
                    } else {
                        Err(format!("replayed: {out}"))
                    }
                },
            );
        }
    }

    /// Runs `sql` (a script) as the superuser on member `name`, in `appdb`. Panics on error.
    pub fn psql(&self, name: &str, sql: &str) -> String {
        self.psql_db(name, DB, sql)
    }

    /// [`PatroniCluster::psql`] in another database.
    pub fn psql_db(&self, name: &str, db: &str, sql: &str) -> String {
        try_psql(self.member_port(name), db, sql)
            .unwrap_or_else(|e| panic!("{e}\n--- on {name}, script\n{sql}"))
    }

    /// Kills the leader's Patroni and its PostgreSQL (the postmaster and its whole process
    /// group) with SIGKILL at once, as a crash would, and returns which member it was and
    /// when (the instant every signal had been sent).
    pub fn kill_leader(&mut self) -> Killed {
        let name = self.leader_name();
        self.kill_member(&name)
    }

    /// [`PatroniCluster::kill_leader`] for any member: SIGKILL to `name`'s Patroni and its
    /// PostgreSQL at once. [`PatroniCluster::restart_member`] brings it back.
    pub fn kill_member(&mut self, name: &str) -> Killed {
        let name = name.to_string();
        let i = self.member_index(&name);
        let m = &mut self.members[i];
        let mut patroni = m
            .patroni
            .take()
            .unwrap_or_else(|| panic!("Patroni {name} is not running"));
        let pm =
            postmaster_pid(&m.data).unwrap_or_else(|| panic!("no running postmaster for {name}"));
        let own = pgid_of(std::process::id());
        let mut targets = vec![format!("-{}", patroni.id()), pm.to_string()];
        if let Some(pgid) = pgid_of(pm).filter(|&g| g > 1 && Some(g) != own) {
            targets.push(format!("-{pgid}"));
        }
        let started = Instant::now();
        let _ = patroni.kill();
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .args(&targets)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let at = Instant::now();
        let _ = patroni.wait();
        kill_postgres(&m.data);
        eprintln!(
            "killed {name} (Patroni and PostgreSQL) within {:.1?}",
            at - started
        );
        Killed {
            name,
            port: m.pg_port,
            at,
        }
    }

    /// Kills only `name`'s PostgreSQL (the postmaster and its process group, SIGKILL), as a
    /// crash of the server would, and leaves its Patroni running: Patroni starts PostgreSQL
    /// again at its next HA loop (a replica goes back to streaming by itself). Returns when
    /// the postmaster is gone.
    pub fn kill_member_postgres(&self, name: &str) -> Killed {
        let m = self.member(name);
        let at = Instant::now();
        kill_postgres(&m.data);
        eprintln!("killed {name}'s PostgreSQL (Patroni keeps running)");
        Killed {
            name: name.to_string(),
            port: m.pg_port,
            at,
        }
    }

    /// The log of member `name`: its Patroni's output and its PostgreSQL server's log (the
    /// postmaster inherits Patroni's stderr).
    pub fn member_log(&self, name: &str) -> PathBuf {
        self.member(name).log.clone()
    }

    /// Starts Patroni for `name` again and waits until it runs as a streaming replica (after
    /// a crash Patroni runs crash recovery and `pg_rewind` first).
    pub fn restart_member(&mut self, name: &str) {
        let i = self.member_index(name);
        assert!(
            self.members[i].patroni.is_none(),
            "Patroni {name} is still running"
        );
        self.spawn_patroni(name);
        self.wait_replica(name);
    }

    /// Runs `patronictl` with `args` against the cluster (through the leader's config) and
    /// returns its output; panics if it fails.
    fn patronictl(&self, args: &[&str]) -> String {
        let leader = self.leader_name();
        let out = Command::new("patronictl")
            .arg("-c")
            .arg(&self.member(&leader).config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running patronictl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "patronictl {} failed ({}):\n{text}",
            args.join(" "),
            out.status
        );
        text
    }

    /// A planned switchover from the current leader to the other member with
    /// `patronictl switchover --force`. Returns (old leader, candidate).
    pub fn switchover(&self) -> (String, String) {
        let leader = self.leader_name();
        let candidate = self.other_member(&leader);
        let text = self.patronictl(&[
            "switchover",
            "--leader",
            &leader,
            "--candidate",
            &candidate,
            "--force",
        ]);
        eprintln!(
            "patronictl switchover {leader} -> {candidate}: {}",
            text.trim()
        );
        (leader, candidate)
    }

    /// Puts the cluster in (or takes it out of) Patroni's maintenance mode and waits until
    /// every member has seen it (`patronictl pause --wait` / `resume --wait`). Needed to keep
    /// a replica's WAL replay paused: outside maintenance mode, Patroni resumes paused replay
    /// on PostgreSQL 14+ at its next HA loop.
    pub fn set_maintenance(&self, on: bool) {
        self.patronictl(&[if on { "pause" } else { "resume" }, "--wait"]);
    }

    /// Sets or clears member `name`'s `noloadbalance` tag (rewrites its config and sends
    /// Patroni SIGHUP) and waits until its member key in etcd shows the new tags.
    pub fn set_noloadbalance(&mut self, name: &str, on: bool) {
        let i = self.member_index(name);
        self.members[i].noloadbalance = on;
        self.write_config(i);
        let pid = self.members[i]
            .patroni
            .as_ref()
            .unwrap_or_else(|| panic!("Patroni {name} is not running"))
            .id();
        send_signal("HUP", &pid.to_string());
        wait_until_blocking(
            &format!("{name}'s member key to show noloadbalance = {on}"),
            Duration::from_secs(30),
            || {
                let v = self
                    .try_etcd_get(&format!("members/{name}"))?
                    .ok_or("no member key")?;
                let json: serde_json::Value =
                    serde_json::from_str(&v).map_err(|e| format!("{e}: {v}"))?;
                let tag = json
                    .get("tags")
                    .and_then(|t| t.get("noloadbalance"))
                    .and_then(|t| t.as_bool())
                    .unwrap_or(false);
                if tag == on {
                    Ok(())
                } else {
                    Err(format!("member key {v}"))
                }
            },
        );
    }

    // -------------------------------------------------------------------------------------
    // pgway
    // -------------------------------------------------------------------------------------

    /// The gateway's TOML for this cluster.
    pub fn gateway_toml(&self, listen: &str, opts: &PatroniGatewayOptions) -> String {
        let mut routing = String::new();
        if let Some(lag) = &opts.max_replica_lag {
            let _ = write!(routing, "\n[routing]\nmax_replica_lag = \"{lag}\"\n");
        }
        let health = opts
            .health_interval
            .as_ref()
            .map(|h| format!("health_interval = \"{h}\"\n"))
            .unwrap_or_default();
        format!(
            "listen = \"{listen}\"\n\
             admin_listen = \"127.0.0.1:0\"\n\
             {extra}\n\
             [[users]]\n\
             name = \"{APP_USER}\"\n\
             password = \"{APP_PASSWORD}\"\n\
             \n\
             [pool]\n\
             size = {size}\n\
             wait_timeout = \"{wait}\"\n\
             \n\
             [topology]\n\
             kind = \"patroni\"\n\
             etcd = [\"{etcd}\"]\n\
             namespace = \"{NAMESPACE}\"\n\
             scope = \"{scope}\"\n\
             failover_timeout = \"{failover}\"\n\
             {health}\
             {routing}",
            extra = opts.extra,
            size = opts.pool_size,
            wait = opts.wait_timeout,
            etcd = self.etcd_endpoint(),
            scope = self.scope,
            failover = opts.failover_timeout,
        )
    }

    /// Starts pgway in-process with `topology.kind = "patroni"` pointing at this cluster.
    pub fn gateway(&self, opts: PatroniGatewayOptions) -> Gateway {
        Gateway::start_toml(|listen| self.gateway_toml(listen, &opts))
    }

    /// Waits until a plain read through `gw` is answered by a replica of this cluster
    /// (pgway has read the members from etcd and health-checked them).
    pub async fn wait_for_replica_reads(&self, gw: &Gateway) {
        let port = gw.port();
        eventually(
            "a read through pgway to be served by a Patroni replica",
            PATRONI_WAIT,
            async || {
                let leader = self.try_leader_name().ok_or("no leader key")?;
                let client = try_connect(port, APP_USER, APP_PASSWORD)
                    .await
                    .map_err(|e| format!("connect: {}", describe_error(&e)))?;
                let served = try_served_by(&client)
                    .await
                    .map_err(|e| format!("select inet_server_port(): {}", describe_error(&e)))?;
                if served != self.member_port(&leader)
                    && self.members.iter().any(|m| m.pg_port == served)
                {
                    Ok(())
                } else {
                    Err(format!(
                        "served by {}, leader is {leader}",
                        self.name_of(served)
                    ))
                }
            },
        )
        .await;
    }
}

/// Knobs for the gateway's TOML with a Patroni topology.
#[derive(Debug, Clone)]
pub struct PatroniGatewayOptions {
    /// `pool.size`.
    pub pool_size: usize,
    /// `pool.wait_timeout`.
    pub wait_timeout: String,
    /// `topology.failover_timeout`.
    pub failover_timeout: String,
    /// `topology.health_interval` (omitted when `None`).
    pub health_interval: Option<String>,
    /// `routing.max_replica_lag` (no `[routing]` table when `None`).
    pub max_replica_lag: Option<String>,
    /// Extra top-level TOML inserted before `[[users]]`.
    pub extra: String,
}

impl Default for PatroniGatewayOptions {
    fn default() -> Self {
        PatroniGatewayOptions {
            pool_size: 10,
            wait_timeout: "5s".into(),
            failover_timeout: "30s".into(),
            health_interval: Some("1s".into()),
            max_replica_lag: None,
            extra: String::new(),
        }
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut report = String::new();
            let events: Vec<String> = self
                .leader_events()
                .iter()
                .map(|e| e.value.clone().unwrap_or_else(|| "<deleted>".into()))
                .collect();
            let _ = writeln!(
                report,
                "--- patroni cluster {} in {}; leader key events: {events:?}",
                self.scope,
                self.root.display()
            );
            for m in &self.members {
                let _ = writeln!(
                    report,
                    "--- {} (pg {}, api {}) log tail, {}\n{}",
                    m.name,
                    m.pg_port,
                    m.api_port,
                    m.log.display(),
                    log_tail(&m.log, 40)
                );
            }
            let _ = writeln!(
                report,
                "--- etcd log tail, {}\n{}",
                self.etcd.log.display(),
                log_tail(&self.etcd.log, 10)
            );
            eprintln!("{report}");
        }
        // Patroni first (it would restart PostgreSQL), then PostgreSQL, then etcd.
        for m in &mut self.members {
            if let Some(mut child) = m.patroni.take() {
                let pid = child.id();
                let _ = child.kill();
                send_signal("KILL", &format!("-{pid}"));
                let _ = child.wait();
            }
        }
        for m in &self.members {
            kill_postgres(&m.data);
        }
        self.stop_watch();
        self.stop_etcd();
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("PGWAY_TEST_KEEP").is_some() {
                eprintln!("keeping Patroni cluster dir {}", dir.keep().display());
            }
        }
    }
}
