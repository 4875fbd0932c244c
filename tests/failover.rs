//! Patroni topology (`topology.kind = "patroni"`): pgway follows Patroni's leader key in etcd
//! through a `kill -9` of the leader, a planned `patronictl switchover` and an etcd outage, and
//! takes replicas out of the read rotation when they lag or carry the `noloadbalance` tag.
//!
//! Each test starts its own etcd and two Patroni nodes (about 15-25 s, see
//! `common::patroni`). The tests run one at a time: failover delays are measured, and the
//! machine has two cores. Timelines are printed (`cargo test --test failover -- --nocapture`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::patroni::*;
use common::*;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// One test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The requirement: writes resume within this long after the new leader key appears.
const MAX_DELAY_AFTER_KEY: Duration = Duration::from_secs(1);

/// Pause between two statements of one load task.
const PACE: Duration = Duration::from_millis(10);

const LEDGER_DDL: &str = "SET ROLE app;\n\
     CREATE TABLE ledger (id bigint PRIMARY KEY, at timestamptz NOT NULL);\n";

// ---------------------------------------------------------------------------------------
// Load: autocommit writers and readers through pgway, every outcome timestamped
// ---------------------------------------------------------------------------------------

/// How long after the kill signals are sent the killed node may still take a statement
/// (signal delivery and a backend noticing its postmaster's death are not instantaneous).
const KILL_LANDS_WITHIN: Duration = Duration::from_millis(50);

/// An acknowledged insert.
#[derive(Clone, Copy)]
struct Ack {
    /// When the statement was sent.
    sent: Instant,
    /// When the reply arrived.
    at: Instant,
    id: i64,
    /// `inet_server_port()` of the server that ran it.
    port: u16,
}

/// A failed statement (or connect).
#[derive(Clone, Debug)]
struct Fail {
    sent: Instant,
    at: Instant,
    msg: String,
}

#[derive(Default)]
struct WriterLog {
    acks: Vec<Ack>,
    errors: Vec<Fail>,
    /// Times the writer had to connect to pgway again because its connection was closed.
    reconnects: usize,
}

#[derive(Default)]
struct ReaderLog {
    /// Successful reads: when, and the server port that answered.
    reads: Vec<(Instant, u16)>,
    errors: Vec<Fail>,
    reconnects: usize,
}

struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<Arc<Mutex<WriterLog>>>,
    readers: Vec<Arc<Mutex<ReaderLog>>>,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Load {
    /// Starts `writers` writer and `readers` reader tasks against pgway on `port`; returns once
    /// every task has connected and completed one statement.
    async fn start(port: u16, writers: usize, readers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = Load {
            stop: Arc::clone(&stop),
            writers: Vec::new(),
            readers: Vec::new(),
            tasks: Vec::new(),
            started: Instant::now(),
        };
        for w in 0..writers {
            let log = Arc::new(Mutex::new(WriterLog::default()));
            load.writers.push(Arc::clone(&log));
            load.tasks
                .push(tokio::spawn(writer(port, w, log, Arc::clone(&stop))));
        }
        for r in 0..readers {
            let log = Arc::new(Mutex::new(ReaderLog::default()));
            load.readers.push(Arc::clone(&log));
            load.tasks
                .push(tokio::spawn(reader(port, r, log, Arc::clone(&stop))));
        }
        eventually(
            "every load task to complete a statement",
            WAIT,
            async || {
                let w = load.writers.iter().all(|l| !lock(l).acks.is_empty());
                let r = load.readers.iter().all(|l| !lock(l).reads.is_empty());
                if w && r {
                    Ok(())
                } else {
                    Err(format!(
                        "writer errors {:?}, reader errors {:?}",
                        load.writer_errors(),
                        load.reader_errors()
                    ))
                }
            },
        )
        .await;
        load
    }

    async fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(60), t).await;
        }
    }

    /// Every acknowledgement, in order of arrival.
    fn acks(&self) -> Vec<Ack> {
        let mut all: Vec<Ack> = self
            .writers
            .iter()
            .flat_map(|l| lock(l).acks.clone())
            .collect();
        all.sort_by_key(|a| a.at);
        all
    }

    /// Every acknowledged id.
    fn acked_ids(&self) -> BTreeSet<i64> {
        self.acks().iter().map(|a| a.id).collect()
    }

    /// The earliest acknowledgement after `t` by the server on `port`.
    fn first_ack_on(&self, port: u16, t: Instant) -> Option<Instant> {
        self.writers
            .iter()
            .filter_map(|l| {
                lock(l)
                    .acks
                    .iter()
                    .find(|a| a.at > t && a.port == port)
                    .map(|a| a.at)
            })
            .min()
    }

    /// The latest acknowledgement before `t`.
    fn last_ack_before(&self, t: Instant) -> Option<Instant> {
        self.writers
            .iter()
            .filter_map(|l| lock(l).acks.iter().map(|a| a.at).rfind(|&at| at < t))
            .max()
    }

    fn acks_between(&self, from: Instant, to: Instant) -> usize {
        self.acks()
            .iter()
            .filter(|a| a.at >= from && a.at <= to)
            .count()
    }

    fn reads_between(&self, from: Instant, to: Instant) -> usize {
        self.readers
            .iter()
            .map(|l| {
                lock(l)
                    .reads
                    .iter()
                    .filter(|a| a.0 >= from && a.0 <= to)
                    .count()
            })
            .sum()
    }

    /// (writer, failure) for every writer error, in time order.
    fn writer_errors(&self) -> Vec<(usize, Fail)> {
        let mut out = Vec::new();
        for (i, l) in self.writers.iter().enumerate() {
            out.extend(lock(l).errors.iter().map(|f| (i, f.clone())));
        }
        out.sort_by_key(|e| e.1.at);
        out
    }

    /// (reader, failure) for every reader error, in time order.
    fn reader_errors(&self) -> Vec<(usize, Fail)> {
        let mut out = Vec::new();
        for (i, l) in self.readers.iter().enumerate() {
            out.extend(lock(l).errors.iter().map(|f| (i, f.clone())));
        }
        out.sort_by_key(|e| e.1.at);
        out
    }

    fn reconnects(&self) -> (usize, usize) {
        (
            self.writers.iter().map(|l| lock(l).reconnects).sum(),
            self.readers.iter().map(|l| lock(l).reconnects).sum(),
        )
    }

    /// How many reads each server port answered between `from` and `to`.
    fn read_ports(&self, from: Instant, to: Instant) -> BTreeMap<u16, usize> {
        let mut out = BTreeMap::new();
        for l in &self.readers {
            for (at, port) in &lock(l).reads {
                if *at >= from && *at <= to {
                    *out.entry(*port).or_insert(0) += 1;
                }
            }
        }
        out
    }

    /// Errors as readable lines, times relative to `t0`.
    fn describe_errors(errors: &[(usize, Fail)], t0: Instant) -> String {
        let mut s = String::new();
        for (i, f) in errors.iter().take(20) {
            let _ = writeln!(
                s,
                "    task {i}: sent at {}, failed at {}: {}",
                rel(f.sent, t0),
                rel(f.at, t0),
                f.msg
            );
        }
        if errors.len() > 20 {
            let _ = writeln!(s, "    ... and {} more", errors.len() - 20);
        }
        s
    }
}

const INSERT: &str =
    "insert into ledger(id, at) values ($1, clock_timestamp()) returning id, inet_server_port()";

/// Whether the client must connect again after `e` (a FATAL error or a closed connection).
fn fatal(client: &Client, e: &tokio_postgres::Error) -> bool {
    client.is_closed() || e.as_db_error().is_some_and(|d| d.severity() == "FATAL") || e.is_closed()
}

async fn writer(port: u16, w: usize, log: Arc<Mutex<WriterLog>>, stop: Arc<AtomicBool>) {
    // Even writers use the simple protocol, odd ones a prepared statement (which pgway must
    // prepare again on the new primary).
    let prepared = w % 2 == 1;
    let mut seq: i64 = 0;
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        if !first {
            lock(&log).reconnects += 1;
        }
        first = false;
        let sent = Instant::now();
        let client = match try_connect(port, APP_USER, APP_PASSWORD).await {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("connect: {}", describe_error(&e));
                let at = Instant::now();
                lock(&log).errors.push(Fail { sent, at, msg });
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let stmt = if prepared {
            let sent = Instant::now();
            match client.prepare(INSERT).await {
                Ok(s) => Some(s),
                Err(e) => {
                    let msg = format!("prepare: {}", describe_error(&e));
                    let at = Instant::now();
                    lock(&log).errors.push(Fail { sent, at, msg });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        } else {
            None
        };
        while !stop.load(Ordering::SeqCst) {
            seq += 1;
            let id = (w as i64 + 1) * 1_000_000_000 + seq;
            let sent = Instant::now();
            let result: Result<Option<(i64, u16)>, tokio_postgres::Error> = match &stmt {
                Some(s) => client
                    .query_one(s, &[&id])
                    .await
                    .map(|row| Some((row.get::<_, i64>(0), row.get::<_, i32>(1) as u16))),
                None => simple_rows(&client, &INSERT.replace("$1", &id.to_string()))
                    .await
                    .map(|rows| {
                        let r = rows.first()?;
                        let id = r.first()?.as_deref()?.parse().ok()?;
                        let port = r.get(1)?.as_deref()?.parse().ok()?;
                        Some((id, port))
                    }),
            };
            let at = Instant::now();
            match result {
                Ok(Some((got, port))) if got == id => {
                    lock(&log).acks.push(Ack { sent, at, id, port })
                }
                Ok(other) => lock(&log).errors.push(Fail {
                    sent,
                    at,
                    msg: format!("insert {id} returned {other:?}"),
                }),
                Err(e) => {
                    lock(&log).errors.push(Fail {
                        sent,
                        at,
                        msg: format!("insert {id}: {}", describe_error(&e)),
                    });
                    if fatal(&client, &e) {
                        break;
                    }
                }
            }
            tokio::time::sleep(PACE).await;
        }
    }
}

async fn reader(port: u16, r: usize, log: Arc<Mutex<ReaderLog>>, stop: Arc<AtomicBool>) {
    let prepared = r % 2 == 1;
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        if !first {
            lock(&log).reconnects += 1;
        }
        first = false;
        let sent = Instant::now();
        let client = match try_connect(port, APP_USER, APP_PASSWORD).await {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("connect: {}", describe_error(&e));
                let at = Instant::now();
                lock(&log).errors.push(Fail { sent, at, msg });
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while !stop.load(Ordering::SeqCst) {
            let sent = Instant::now();
            let result = read_once(&client, prepared).await;
            let at = Instant::now();
            match result {
                Ok(port) => lock(&log).reads.push((at, port)),
                Err(e) => {
                    let msg = describe_error(&e);
                    lock(&log).errors.push(Fail { sent, at, msg });
                    if fatal(&client, &e) {
                        break;
                    }
                }
            }
            tokio::time::sleep(PACE).await;
        }
    }
}

async fn read_once(client: &Client, prepared: bool) -> Result<u16, tokio_postgres::Error> {
    if prepared {
        let row = client
            .query_one(
                "select inet_server_port(), count(*) from ledger where id % 7 = 3",
                &[],
            )
            .await?;
        Ok(row.get::<_, i32>(0) as u16)
    } else {
        let rows = simple_rows(client, "select inet_server_port(), max(id) from ledger").await?;
        Ok(rows[0][0]
            .as_deref()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0))
    }
}

/// `t` relative to `t0`, e.g. `+1.234s` or `-0.010s`.
fn rel(t: Instant, t0: Instant) -> String {
    if t >= t0 {
        format!("+{:.3}s", (t - t0).as_secs_f64())
    } else {
        format!("-{:.3}s", (t0 - t).as_secs_f64())
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Polls `select pg_is_in_recovery()` directly on the server at `port` (as the superuser,
/// over one connection, every 5 ms) and yields the instant it first answers false: when that
/// replica's promotion had finished. The task ends after 120 s or on an error.
async fn watch_promotion(port: u16) -> JoinHandle<Option<Instant>> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {port} to watch its promotion: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    tokio::spawn(async move {
        let stmt = client.prepare("select pg_is_in_recovery()").await.ok()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let row = client.query_one(&stmt, &[]).await.ok()?;
            if !row.get::<_, bool>(0) {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    })
}

/// Ids in the ledger on member `name` (superuser, directly).
fn ledger_ids(pc: &PatroniCluster, name: &str) -> BTreeSet<i64> {
    pc.psql(name, "select id from ledger")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().expect("an id"))
        .collect()
}

/// The port of the server that runs a write transaction through pgway (the primary pgway
/// uses now), or the error.
async fn primary_through(client: &Client) -> Result<u16, String> {
    let rows = simple_rows(client, "begin; select inet_server_port(); commit")
        .await
        .map_err(|e| describe_error(&e))?;
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no port in {rows:?}"))
}

// ---------------------------------------------------------------------------------------
// The harness itself (no pgway): Patroni fails over and the old leader rejoins
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroni_harness_fails_over_and_rejoins() {
    let _serial = SERIAL.lock().await;
    let mut pc = PatroniCluster::start();
    let leader = pc.leader_name();
    assert_eq!(leader, "node1");
    let replica = pc.other_member(&leader);
    let lp = pc.member_port(&leader);
    let rp = pc.member_port(&replica);
    assert_eq!(pc.psql(&leader, "select pg_is_in_recovery()"), "f");
    assert_eq!(pc.psql(&replica, "select pg_is_in_recovery()"), "t");
    pc.psql(&leader, LEDGER_DDL);
    pc.psql(&leader, "insert into ledger values (1, now())");
    pc.wait_replay();
    assert_eq!(pc.psql(&replica, "select count(*) from ledger"), "1");
    // app logs in with SCRAM on both.
    for port in [lp, rp] {
        let c = connect(port, APP_USER, APP_PASSWORD).await;
        assert_eq!(served_by(&c).await, port);
    }

    let killed = pc.kill_leader();
    let (new, key_at) = pc
        .wait_new_leader_key_async(&killed.name, PATRONI_WAIT)
        .await;
    assert_eq!(new, replica);
    pc.wait_primary(&new);
    let promoted = Instant::now();
    eprintln!(
        "leader key -> {new} at {} after the kill; primary (REST) by {}",
        rel(key_at, killed.at),
        rel(promoted, killed.at)
    );
    assert_eq!(pc.psql(&new, "select pg_is_in_recovery()"), "f");
    pc.psql(&new, "insert into ledger values (2, now())");

    pc.restart_member(&killed.name);
    pc.wait_replay();
    assert_eq!(pc.psql(&killed.name, "select pg_is_in_recovery()"), "t");
    assert_eq!(pc.psql(&killed.name, "select count(*) from ledger"), "2");
    assert_eq!(pc.leader_name(), new);
}

// ---------------------------------------------------------------------------------------
// pgway through failures
// ---------------------------------------------------------------------------------------

/// `kill -9` of the leader's Patroni and PostgreSQL under load: writes through pgway resume
/// within 1 s after the new leader key appears, readers see no error at all, no acknowledged
/// write is lost, and the old leader, restarted, serves reads again without a pgway restart.
///
/// Patroni runs with `synchronous_mode` here, so that an acknowledged commit is on the
/// replica by definition; with asynchronous replication a crash may lose the last commits in
/// PostgreSQL itself, whatever sits in front of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_under_load() {
    let _serial = SERIAL.lock().await;
    let mut pc = PatroniCluster::start_with(PatroniOptions {
        synchronous_mode: true,
        ..PatroniOptions::default()
    });
    let old = pc.leader_name();
    let replica = pc.other_member(&old);
    pc.psql(&old, LEDGER_DDL);
    pc.wait_replay();
    let gw = pc.gateway(PatroniGatewayOptions::default());
    pc.wait_for_replica_reads(&gw).await;

    let mut load = Load::start(gw.port(), 4, 4).await;
    // A client inside an explicit transaction on the primary when it dies.
    let in_tx = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    in_tx
        .batch_execute("begin; insert into ledger(id, at) values (-1, now())")
        .await
        .expect("an open transaction on the primary");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let promotion = watch_promotion(pc.member_port(&replica)).await;

    let killed = pc.kill_leader();
    assert_eq!(killed.name, old);
    let t0 = killed.at;
    let (new, key_at) = pc.wait_new_leader_key_async(&old, PATRONI_WAIT).await;
    assert_eq!(new, replica, "the replica should take over");
    let new_port = pc.member_port(&new);
    let deleted_at = pc
        .leader_events()
        .iter()
        .find(|e| e.at > t0 && e.value.is_none())
        .map(|e| e.at);

    // Writes resume on the new primary (given up to failover_timeout here; the assertion
    // below is the 1 s).
    let resumed = eventually(
        "a write through pgway to succeed on the new primary",
        Duration::from_secs(40),
        async || {
            load.first_ack_on(new_port, t0)
                .ok_or_else(|| "no write acknowledged by the new primary yet".to_string())
        },
    )
    .await;
    let delay = resumed.saturating_duration_since(key_at);
    let promoted = promotion.await.ok().flatten();
    // The last reply from the killed primary (some arrive a few ms after the kill signal).
    let last_before = load
        .acks()
        .iter()
        .filter(|a| a.port == killed.port)
        .map(|a| a.at)
        .max()
        .or_else(|| load.last_ack_before(t0));
    let stragglers: Vec<Ack> = load
        .acks()
        .into_iter()
        .filter(|a| a.at > t0 && a.port == killed.port)
        .collect();
    let mut timeline = String::new();
    let _ = writeln!(
        timeline,
        "kill -9 of {old} (Patroni + PostgreSQL) at +0.000s"
    );
    if let Some(l) = last_before {
        let _ = writeln!(
            timeline,
            "last write acknowledged by {old} at {}",
            rel(l, t0)
        );
    }
    if !stragglers.is_empty() {
        let _ = writeln!(
            timeline,
            "{} writes acknowledged by {old} after the kill signals were sent, the last at {}",
            stragglers.len(),
            rel(stragglers.last().expect("one").at, t0)
        );
    }
    if let Some(d) = deleted_at {
        let _ = writeln!(timeline, "leader key deleted at {}", rel(d, t0));
    }
    let _ = writeln!(timeline, "leader key = {new} at {}", rel(key_at, t0));
    let promoted_note = match promoted {
        Some(p) => format!(
            "{new} answered pg_is_in_recovery() = false at {} ({} after the new leader key)",
            rel(p, t0),
            ms(p.saturating_duration_since(key_at))
        ),
        None => format!("{new}'s promotion was not observed"),
    };
    let _ = writeln!(timeline, "{promoted_note}");
    let _ = writeln!(
        timeline,
        "first write acknowledged by {new} through pgway at {}: {} after the new leader key; \
         write outage {}",
        rel(resumed, t0),
        ms(delay),
        last_before
            .map(|l| ms(resumed - l))
            .unwrap_or_else(|| "?".into())
    );

    // The transaction that was open on the dead primary cannot commit: a clear error, at once.
    let commit_started = Instant::now();
    let commit = tokio::time::timeout(Duration::from_secs(10), in_tx.batch_execute("commit")).await;
    let commit_took = commit_started.elapsed();
    let _ = writeln!(
        timeline,
        "commit of the transaction open on {old} at the kill: {} after {}",
        match &commit {
            Ok(Ok(())) => "succeeded".to_string(),
            Ok(Err(e)) => format!("error \"{}\"", describe_error(e)),
            Err(_) => "no answer".to_string(),
        },
        ms(commit_took)
    );

    // A few seconds on the new primary, then the old leader rejoins as a replica.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rejoin_started = Instant::now();
    pc.restart_member(&old);
    let rejoined = Instant::now();
    let _ = writeln!(
        timeline,
        "{old} restarted at {}, streaming replica at {}",
        rel(rejoin_started, t0),
        rel(rejoined, t0)
    );
    let probe = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let back = eventually(
        "reads through pgway to reach the rejoined old leader",
        Duration::from_secs(60),
        async || match try_served_by(&probe).await {
            Ok(p) if p == killed.port => Ok(Instant::now()),
            Ok(p) => Err(format!("served by {}", pc.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    let _ = writeln!(
        timeline,
        "reads through pgway served by {old} again at {}",
        rel(back, t0)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop().await;
    let end = Instant::now();

    // No acknowledged write lost.
    pc.wait_replay();
    let acked = load.acked_ids();
    let stored = ledger_ids(&pc, &new);
    let lost: Vec<i64> = acked.difference(&stored).copied().collect();
    let on_old = ledger_ids(&pc, &old);
    let writer_errors = load.writer_errors();
    let reader_errors = load.reader_errors();
    let (w_reconnects, r_reconnects) = load.reconnects();
    let _ = writeln!(
        timeline,
        "{} writes acknowledged ({} after the kill), {} reads; reads by port before the kill \
         {:?}, after the new key {:?}",
        acked.len(),
        load.acks_between(t0, end),
        load.reads_between(load.started, end),
        load.read_ports(load.started, t0),
        load.read_ports(key_at, end)
    );
    let _ = writeln!(
        timeline,
        "writer errors {} (reconnects {w_reconnects}), reader errors {} (reconnects \
         {r_reconnects})\n{}",
        writer_errors.len(),
        reader_errors.len(),
        Load::describe_errors(&writer_errors, t0)
    );
    eprintln!("--- kill_leader_under_load timeline\n{timeline}");

    let mut failures = Vec::new();
    if delay >= MAX_DELAY_AFTER_KEY {
        failures.push(format!(
            "writes resumed {} after the new leader key appeared (limit {}); {promoted_note}, \
             so pgway wrote {} after the promotion",
            ms(delay),
            ms(MAX_DELAY_AFTER_KEY),
            promoted
                .map(|p| ms(resumed.saturating_duration_since(p)))
                .unwrap_or_else(|| "?".into())
        ));
    }
    if !reader_errors.is_empty() || r_reconnects > 0 {
        failures.push(format!(
            "readers saw {} errors and {r_reconnects} reconnects during the failover:\n{}",
            reader_errors.len(),
            Load::describe_errors(&reader_errors, t0)
        ));
    }
    // A statement in flight on the primary when it died may fail (a clear error, and the
    // connection may close with it). A statement sent after the kill must wait for the new
    // primary instead. The node does not die the instant the signals are sent: a backend
    // still takes a statement until it notices its postmaster is gone (and one waiting for
    // the synchronous standby then exits without a word). So a statement sent before the
    // node's last acknowledgment, or within the same few-ms allowance the straggler check
    // above uses, counts as in flight.
    let alive_until = stragglers
        .iter()
        .map(|a| a.at)
        .max()
        .unwrap_or(t0)
        .max(t0 + KILL_LANDS_WITHIN);
    let late: Vec<(usize, Fail)> = writer_errors
        .iter()
        .filter(|(_, f)| f.sent >= alive_until)
        .cloned()
        .collect();
    if !late.is_empty() {
        failures.push(format!(
            "{} write statements sent after the kill failed instead of waiting for the new \
             primary:\n{}",
            late.len(),
            Load::describe_errors(&late, t0)
        ));
    }
    // Sanity check of the kill itself: nothing sent well after it was acknowledged by the
    // dead node (signal delivery is not instantaneous: allow a few ms).
    if let Some(a) = stragglers.iter().find(|a| a.sent > t0 + KILL_LANDS_WITHIN) {
        failures.push(format!(
            "write {} was sent at {} and acknowledged by the killed {old}",
            a.id,
            rel(a.sent, t0)
        ));
    }
    match &commit {
        Ok(Err(_)) => {}
        Ok(Ok(())) => failures.push(format!(
            "a transaction open on the killed {old} committed after the failover"
        )),
        Err(_) => failures.push(format!(
            "the commit of a transaction open on the killed {old} got no answer within 10 s"
        )),
    }
    if stored.contains(&-1) {
        failures.push("the row of the transaction open at the kill is on the new primary".into());
    }
    if !lost.is_empty() {
        failures.push(format!(
            "{} acknowledged writes are missing on the new primary {new}: {:?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        ));
    }
    if stored != on_old {
        failures.push(format!(
            "the rejoined {old} has {} rows, the primary {new} {}",
            on_old.len(),
            stored.len()
        ));
    }
    assert!(
        failures.is_empty(),
        "{}\n--- timeline\n{timeline}",
        failures.join("\n")
    );
}

/// A planned `patronictl switchover` under autocommit load costs the clients no error at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_without_errors() {
    let _serial = SERIAL.lock().await;
    let pc = PatroniCluster::start();
    let old = pc.leader_name();
    pc.psql(&old, LEDGER_DDL);
    pc.wait_replay();
    let gw = pc.gateway(PatroniGatewayOptions::default());
    pc.wait_for_replica_reads(&gw).await;
    let mut load = Load::start(gw.port(), 4, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let promotion = watch_promotion(pc.member_port(&pc.other_member(&old))).await;
    let t0 = Instant::now();
    let (_, candidate) = pc.switchover();
    let (new, key_at) = pc.wait_new_leader_key_async(&old, PATRONI_WAIT).await;
    assert_eq!(new, candidate);
    let probe = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let new_port = pc.member_port(&new);
    let promoted = promotion.await.ok().flatten();
    let on_new = eventually(
        "write transactions through pgway to run on the new primary",
        Duration::from_secs(30),
        async || match primary_through(&probe).await {
            Ok(p) if p == new_port => Ok(Instant::now()),
            Ok(p) => Err(format!("ran on {}", pc.name_of(p))),
            Err(e) => Err(e),
        },
    )
    .await;
    // The old leader comes back as a replica by itself.
    pc.wait_replica(&old);
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop().await;
    let end = Instant::now();

    let first_on_new = load.first_ack_on(pc.member_port(&new), key_at);
    let deleted_at = pc
        .leader_events()
        .iter()
        .find(|e| e.at > t0 && e.value.is_none())
        .map(|e| e.at);
    let gap = {
        // The longest time without an acknowledged write during the switchover.
        let acks: Vec<Instant> = load
            .acks()
            .iter()
            .map(|a| a.at)
            .filter(|&at| at >= t0)
            .collect();
        acks.windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    };
    pc.wait_replay();
    let acked = load.acked_ids();
    let stored = ledger_ids(&pc, &new);
    let lost: Vec<i64> = acked.difference(&stored).copied().collect();
    let writer_errors = load.writer_errors();
    let reader_errors = load.reader_errors();
    let (w_reconnects, r_reconnects) = load.reconnects();
    let mut timeline = String::new();
    let _ = writeln!(timeline, "patronictl switchover {old} -> {new} at +0.000s");
    if let Some(d) = deleted_at {
        let _ = writeln!(timeline, "leader key deleted at {}", rel(d, t0));
    }
    let _ = writeln!(timeline, "leader key = {new} at {}", rel(key_at, t0));
    if let Some(p) = promoted {
        let _ = writeln!(
            timeline,
            "{new} answered pg_is_in_recovery() = false at {}",
            rel(p, t0)
        );
    }
    if let Some(f) = first_on_new {
        let _ = writeln!(
            timeline,
            "first write acknowledged by {new} at {} ({} after the new key{})",
            rel(f, t0),
            ms(f.saturating_duration_since(key_at)),
            promoted
                .map(|p| format!(
                    ", {} after the promotion",
                    ms(f.saturating_duration_since(p))
                ))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        timeline,
        "probe transaction on the new primary at {}; longest gap between acknowledged writes {}",
        rel(on_new, t0),
        ms(gap)
    );
    let _ = writeln!(
        timeline,
        "{} writes acknowledged, {} reads; writer errors {} (reconnects {w_reconnects}), \
         reader errors {} (reconnects {r_reconnects})",
        acked.len(),
        load.reads_between(load.started, end),
        writer_errors.len(),
        reader_errors.len()
    );
    eprintln!("--- switchover_under_load_without_errors timeline\n{timeline}");

    let mut failures = Vec::new();
    if !writer_errors.is_empty() || w_reconnects > 0 {
        failures.push(format!(
            "autocommit writers saw {} errors, {w_reconnects} reconnects:\n{}",
            writer_errors.len(),
            Load::describe_errors(&writer_errors, t0)
        ));
    }
    if !reader_errors.is_empty() || r_reconnects > 0 {
        failures.push(format!(
            "readers saw {} errors, {r_reconnects} reconnects:\n{}",
            reader_errors.len(),
            Load::describe_errors(&reader_errors, t0)
        ));
    }
    if !lost.is_empty() {
        failures.push(format!(
            "{} acknowledged writes are missing on {new}: {:?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        ));
    }
    assert!(
        failures.is_empty(),
        "{}\n--- timeline\n{timeline}",
        failures.join("\n")
    );
}

/// etcd down for 10 s under load: pgway keeps serving reads and writes without an error.
/// While etcd is down, `/ready` says so (still 200); `/topology` says the source is etcd.
/// After etcd is back, pgway watches again: a switchover is followed, and a `noloadbalance`
/// tag (which only etcd tells) takes the replica out of the read rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_then_rewatch() {
    let _serial = SERIAL.lock().await;
    let mut pc = PatroniCluster::start();
    let old = pc.leader_name();
    pc.psql(&old, LEDGER_DDL);
    pc.wait_replay();
    let admin = free_loopback_port();
    let opts = PatroniGatewayOptions::default();
    let gw = Gateway::start_toml(|listen| {
        pc.gateway_toml(listen, &opts).replace(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"127.0.0.1:{admin}\""),
        )
    });
    pc.wait_for_replica_reads(&gw).await;
    let topology = topology_json(admin).await;
    assert_eq!(topology["source"], "etcd", "{topology}");
    assert_eq!(topology["etcd"]["state"], "watching", "{topology}");
    let mut load = Load::start(gw.port(), 4, 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let t0 = Instant::now();
    pc.stop_etcd();
    // pgway says etcd is unreachable, and stays ready on the topology it last learned.
    let ready = eventually(
        "/ready to say etcd is unreachable",
        Duration::from_secs(9),
        async || {
            let response = http_get(admin, "/ready").await?;
            if response.contains("etcd unreachable") {
                Ok(response)
            } else {
                Err(response)
            }
        },
    )
    .await;
    assert!(ready.contains("200 OK"), "{ready}");
    tokio::time::sleep_until((t0 + Duration::from_secs(10)).into()).await;
    let outage_end = Instant::now();
    let writes_during = load.acks_between(t0, outage_end);
    let reads_during = load.reads_between(t0, outage_end);
    let errors_during: Vec<_> = load
        .writer_errors()
        .into_iter()
        .chain(load.reader_errors())
        .filter(|e| e.1.at >= t0)
        .collect();
    pc.start_etcd();
    let etcd_back = Instant::now();
    // Patroni settles (the leader keeps its key, or takes it again).
    pc.wait_primary(&old);
    pc.wait_replica(&pc.other_member(&old));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A switchover after the outage is followed.
    let s0 = Instant::now();
    let (_, candidate) = pc.switchover();
    let (new, key_at) = pc.wait_new_leader_key_async(&old, PATRONI_WAIT).await;
    assert_eq!(new, candidate);
    let probe = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    let new_port = pc.member_port(&new);
    let followed = eventually(
        "write transactions through pgway to run on the new primary after the outage",
        Duration::from_secs(30),
        async || match primary_through(&probe).await {
            Ok(p) if p == new_port => Ok(Instant::now()),
            Ok(p) => Err(format!("ran on {}", pc.name_of(p))),
            Err(e) => Err(e),
        },
    )
    .await;
    let topology = topology_json(admin).await;
    assert_eq!(topology["etcd"]["state"], "watching", "{topology}");
    pc.wait_replica(&old);
    let old_port = pc.member_port(&old);
    eventually(
        "reads through pgway to reach the new replica",
        Duration::from_secs(60),
        async || match try_served_by(&probe).await {
            Ok(p) if p == old_port => Ok(()),
            Ok(p) => Err(format!("served by {}", pc.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    let first_on_new = load.first_ack_on(new_port, key_at);
    let switchover_errors: Vec<_> = load
        .writer_errors()
        .into_iter()
        .chain(load.reader_errors())
        .filter(|e| e.1.at >= s0)
        .collect();

    // Only etcd knows about tags: the replica tagged noloadbalance leaves the rotation.
    pc.set_noloadbalance(&old, true);
    eventually(
        "reads to leave the replica tagged noloadbalance",
        Duration::from_secs(30),
        async || match try_served_by(&probe).await {
            Ok(p) if p == new_port => Ok(()),
            Ok(p) => Err(format!("served by {}", pc.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    pc.set_noloadbalance(&old, false);
    eventually(
        "reads to return to the replica once the tag is cleared",
        Duration::from_secs(30),
        async || match try_served_by(&probe).await {
            Ok(p) if p == old_port => Ok(()),
            Ok(p) => Err(format!("served by {}", pc.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    load.stop().await;

    let mut timeline = String::new();
    let _ = writeln!(
        timeline,
        "etcd killed at +0.000s, started again at {}: {writes_during} writes and {reads_during} \
         reads acknowledged while it was down, {} errors",
        rel(etcd_back, t0),
        errors_during.len()
    );
    let _ = writeln!(
        timeline,
        "switchover {old} -> {new} at {}, key at {}, probe on the new primary at {} ({} after \
         the key), first write after the key {}; {} errors from the switchover on",
        rel(s0, t0),
        rel(key_at, t0),
        rel(followed, t0),
        ms(followed.saturating_duration_since(key_at)),
        first_on_new
            .map(|f| ms(f.saturating_duration_since(key_at)))
            .unwrap_or_else(|| "none".into()),
        switchover_errors.len()
    );
    eprintln!("--- etcd_outage_then_rewatch timeline\n{timeline}");

    let mut failures = Vec::new();
    if !errors_during.is_empty() {
        failures.push(format!(
            "{} errors while etcd was down:\n{}",
            errors_during.len(),
            Load::describe_errors(&errors_during, t0)
        ));
    }
    if writes_during == 0 || reads_during == 0 {
        failures.push(format!(
            "pgway did not keep serving while etcd was down: {writes_during} writes, \
             {reads_during} reads"
        ));
    }
    if !switchover_errors.is_empty() {
        // switchover_under_load_without_errors owns this; reported here for the record.
        eprintln!(
            "note: {} errors during the switchover after the outage:\n{}",
            switchover_errors.len(),
            Load::describe_errors(&switchover_errors, t0)
        );
    }
    assert!(
        failures.is_empty(),
        "{}\n--- timeline\n{timeline}",
        failures.join("\n")
    );
}

/// `routing.max_replica_lag = "1MB"`: a replica whose replay is paused while the primary
/// writes several MB takes no reads until it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_leaves_the_rotation() {
    let _serial = SERIAL.lock().await;
    let pc = PatroniCluster::start();
    let leader = pc.leader_name();
    let replica = pc.other_member(&leader);
    let (lp, rp) = (pc.member_port(&leader), pc.member_port(&replica));
    pc.psql(
        &leader,
        "SET ROLE app;\n\
         CREATE TABLE filler (id int, pad text);\n",
    );
    pc.wait_replay();
    let gw = pc.gateway(PatroniGatewayOptions {
        max_replica_lag: Some("1MB".into()),
        ..PatroniGatewayOptions::default()
    });
    pc.wait_for_replica_reads(&gw).await;
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    assert_eq!(served_by(&client).await, rp);

    // Patroni resumes paused replay at its next HA loop unless the cluster is in
    // maintenance mode.
    pc.set_maintenance(true);
    pc.psql(&replica, "select pg_wal_replay_pause()");
    // About 6 MB of WAL the replica receives but does not replay.
    pc.psql(
        &leader,
        "insert into filler select g, repeat('x', 1000) from generate_series(1, 5000) g",
    );
    let lag = pc.psql(
        &leader,
        &format!(
            "select pg_current_wal_lsn() - '{}'::pg_lsn",
            pc.psql(&replica, "select pg_last_wal_replay_lsn()")
        ),
    );
    eprintln!("replica {replica} paused; replay lag {lag} bytes");
    eventually(
        "reads to leave the lagging replica",
        Duration::from_secs(30),
        async || match try_served_by(&client).await {
            Ok(p) if p == lp => Ok(()),
            Ok(p) => Err(format!("served by {}", pc.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    // Once away from the replica, reads see the new rows (no stale read by surprise).
    for _ in 0..10 {
        let rows = simple_rows(&client, "select count(*), inet_server_port() from filler")
            .await
            .expect("read while the replica lags");
        assert_eq!(
            rows[0],
            vec![Some("5000".to_string()), Some(lp.to_string())],
            "a read while the replica lags"
        );
    }

    // The replica was held back the whole time, so the reads above were a real test.
    assert_eq!(
        pc.psql(&replica, "select pg_get_wal_replay_pause_state()"),
        "paused",
        "replay on {replica} was resumed behind the test's back"
    );
    pc.psql(&replica, "select pg_wal_replay_resume()");
    pc.set_maintenance(false);
    eventually(
        "reads to return to the replica once it has caught up",
        Duration::from_secs(30),
        async || match try_served_by(&client).await {
            Ok(p) if p == rp => Ok(()),
            Ok(p) => Err(format!("served by {}", pc.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
    let rows = simple_rows(&client, "select count(*) from filler")
        .await
        .expect("read after catching up");
    assert_eq!(rows[0][0].as_deref(), Some("5000"));
}

/// A member started with the `noloadbalance` tag takes no reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noloadbalance_member_takes_no_reads() {
    let _serial = SERIAL.lock().await;
    let mut pc = PatroniCluster::start_with(PatroniOptions {
        noloadbalance: vec!["node2".into()],
        ..PatroniOptions::default()
    });
    assert_eq!(pc.leader_name(), "node1");
    let (lp, rp) = (pc.member_port("node1"), pc.member_port("node2"));
    let gw = pc.gateway(PatroniGatewayOptions::default());
    let client = connect(gw.port(), APP_USER, APP_PASSWORD).await;
    // Give pgway time to read the members and health-check them; every read stays on the
    // primary meanwhile.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(
            served_by(&client).await,
            lp,
            "a read went to the replica tagged noloadbalance"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pc.set_noloadbalance("node2", false);
    eventually(
        "reads to reach node2 once its noloadbalance tag is cleared",
        Duration::from_secs(30),
        async || match try_served_by(&client).await {
            Ok(p) if p == rp => Ok(()),
            Ok(p) => Err(format!("served by {}", pc.name_of(p))),
            Err(e) => Err(describe_error(&e)),
        },
    )
    .await;
}
