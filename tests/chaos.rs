//! Chaos soak (issue 15, point 6): many clients write and read through pgway, with
//! read-your-writes (the default, scope `user`) and the result cache on, while the replica is
//! crashed and restarted, Patroni switches over, and the leader is killed (`kill -9` of its
//! Patroni and PostgreSQL) and rejoins. One Patroni cluster (etcd + two nodes, synchronous
//! replication) serves the whole soak.
//!
//! # What the clients do
//! Each client (`PGWAY_CHAOS_CLIENTS`, default 24; even ones use the simple protocol, odd
//! ones prepared statements) loops over random operations, recording every outcome:
//! - an autocommit `INSERT` of one row, with an id unique to the client and a per-client
//!   sequence number;
//! - an explicit transaction `BEGIN; INSERT; INSERT; COMMIT`, each statement on its own;
//! - an autocommit `UPDATE chaos_ref SET v = v + 1 ... RETURNING v` on a small shared
//!   table;
//! - a `BEGIN READ ONLY` transaction reading the client's own rows (it may run on a replica);
//!
//! and after every one of them reads its own rows (`count(*)`, `max(seq)`) and a row of
//! `chaos_ref` (a table that changes rarely, so these reads hit the cache). Both tables are
//! under a cache rule.
//!
//! # Accounting
//! A row is *acknowledged* when its `INSERT` (autocommit) or its transaction's `COMMIT`
//! returned OK. It is *maybe committed* when that statement failed: the outcome of a
//! `COMMIT` in flight on a dying primary is unknown (pgway answers 08007, or, before that
//! change, the connection closes with 08006), and an autocommit statement that failed may
//! have committed before its server died. It is *not committed* when its transaction failed
//! before `COMMIT` was sent. The same holds for the increments of `chaos_ref`.
//!
//! # Assertions
//! - No acknowledged write lost: at the end every acknowledged row is on the final primary
//!   (and on the replica), no row is there that was never sent in a `COMMIT`, and each
//!   `chaos_ref` counter lies between its acknowledged and its acknowledged-plus-maybe
//!   increments. This needs synchronous replication (Patroni `synchronous_mode: true`):
//!   with asynchronous replication the primary acknowledges a `COMMIT` as soon as the WAL
//!   is flushed on its own disk, and the replica receives it a moment later; when the
//!   primary is killed in between, Patroni still promotes the replica (if it is less than
//!   `maximum_lag_on_failover`, 1 MB here, behind), the new timeline lacks those commits, and
//!   `pg_rewind` discards them from the old primary when it rejoins. The last commits before
//!   the crash (up to that much WAL) are gone although PostgreSQL itself acknowledged them;
//!   nothing in front of the database can prevent that. In synchronous mode `COMMIT` returns
//!   only once the synchronous standby has the WAL, and Patroni promotes only that standby.
//!   (With the standby down, Patroni's non-strict synchronous mode lets the primary commit
//!   alone; the soak never kills the primary then.)
//! - No client statement ran on a replica and failed with "read-only transaction" or
//!   "recovery is in progress": the servers log `application_name` (`%a` in
//!   `log_line_prefix`); clients are `chaos-*`, pgway's own connections `pgway-*` /
//!   `pgway_cache`. A control write sent straight to the replica before the soak must show
//!   up in that check. And pgway's `replica_retries` (`/topology`, `/metrics`) stays 0.
//! - No read older than the client's own writes: after each acknowledged write the client's
//!   next read of its own rows has `max(seq)` at least that write's and `count(*)` at least
//!   its acknowledged rows (and at most acknowledged plus maybe); a read of a `chaos_ref`
//!   row is at least the value the client's own last acknowledged increment returned.
//! - No protocol error (08P01, an unexpected or unparsable message, a reset connection, a
//!   statement with no answer in 60 s): the only errors allowed are the clean ones the README
//!   documents for a primary that goes away (57P01/57P02/57P03, 08000/08003/08006/08007, or
//!   a connection closed after such an error), and only for statements sent during a
//!   switchover or failover window, or, during a replica fault, for a `BEGIN READ ONLY`
//!   transaction that was running on that replica. An autocommit read never gets an error
//!   from a replica fault. Errors are counted by SQLSTATE and reported (with, for the rows
//!   left maybe committed, how many of them committed after all); clients reconnect and go
//!   on.
//!
//! # Running it
//! `cargo test --test chaos -- --nocapture`. The soak runs rounds of faults until
//! `PGWAY_CHAOS_SECS` seconds (default 0: one round, the CI setting, about 30-40 s of load;
//! with the cluster start the test takes about 75 s on 2 cores) have passed. Each round:
//! a replica fault (even rounds: its PostgreSQL alone is killed and Patroni restarts it; odd
//! rounds: its Patroni and PostgreSQL are killed and started again), a switchover, then a
//! failover (the leader killed) and the old leader's rejoin, with a few seconds of steady load
//! between events. The long run: `PGWAY_CHAOS_SECS=300 cargo test --test chaos -- --nocapture`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::patroni::*;
use common::*;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};

/// PostgreSQL's `log_line_prefix` in the soak: `%a` is the `application_name`.
const LOG_LINE_PREFIX: &str = "%m [%p] %q[app=%a] %u@%d ";

/// `application_name` of every client connection of the soak (plus its number).
const CLIENT_APP: &str = "chaos-";

/// Rows of `chaos_ref`.
const REF_KEYS: i32 = 16;

/// Pause between two operations of one client.
const PACE: Duration = Duration::from_millis(5);

/// A statement with no answer for this long counts as a hang (a liveness bound, not a speed
/// assertion: a failover takes Patroni's TTL, 10 s, and writes wait up to 30 s for it).
const OP_TIMEOUT: Duration = Duration::from_secs(60);

/// Steady load between two faults.
const STEADY: Duration = Duration::from_secs(3);

/// A statement sent this long before a fault began may still be hit by it.
const WINDOW_LEAD: Duration = Duration::from_secs(1);

/// A statement sent this long after pgway was seen running writes on the new primary may
/// still be hit by the fault (a pooled connection that had not noticed yet).
const WINDOW_GRACE: Duration = Duration::from_secs(3);

/// SQLSTATEs (and `closed`: the connection closed after such an error) a client may see when
/// the primary goes away under it: admin/crash shutdown, cannot connect now, connection
/// failure, transaction resolution unknown.
const CLEAN_ERRORS: [&str; 8] = [
    "57P01", "57P02", "57P03", "08000", "08003", "08006", "08007", "closed",
];

/// The steps of a `BEGIN READ ONLY` transaction, which pgway may run on a replica.
const READ_ONLY_TX_STEPS: [&str; 3] = ["begin-ro", "ro-read", "ro-commit"];

const SCHEMA: &str = "SET ROLE app;\n\
     CREATE TABLE chaos (id bigint PRIMARY KEY, client int NOT NULL, seq bigint NOT NULL);\n\
     CREATE INDEX ON chaos (client, seq);\n\
     CREATE TABLE chaos_ref (k int PRIMARY KEY, v bigint NOT NULL);\n\
     INSERT INTO chaos_ref SELECT k, 0 FROM generate_series(0, 15) k;\n";

const INSERT: &str = "insert into chaos (id, client, seq) values ($1, $2, $3)";
const OWN_ROWS: &str = "select count(*), coalesce(max(seq), 0) from chaos where client = $1";
const REF_UPDATE: &str = "update chaos_ref set v = v + 1 where k = $1 returning v";
const REF_READ: &str = "select v from chaos_ref where k = $1";

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
        Err(_) => default,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// xorshift64*: a seeded, dependency-free choice of operations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

// ---------------------------------------------------------------------------------------
// Client accounting
// ---------------------------------------------------------------------------------------

/// What became of a row a client wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Its `INSERT` (autocommit) or its transaction's `COMMIT` returned OK.
    Acked,
    /// That statement failed: it may or may not have committed.
    Maybe,
    /// Its transaction failed before `COMMIT` was sent.
    NotCommitted,
}

/// A failed statement.
#[derive(Clone, Debug)]
struct ErrorEvent {
    client: usize,
    /// When the statement was sent.
    sent: Instant,
    /// Which step: `insert`, `begin`, `tx-insert`, `commit`, `rollback`, `ref-update`, `read`, ...
    stage: &'static str,
    /// The SQLSTATE, or `closed`, `timeout`, `io`, `unexpected-message`, `parse-error`,
    /// `other`.
    key: String,
    msg: String,
}

#[derive(Default)]
struct ClientLog {
    rows: BTreeMap<i64, Outcome>,
    /// `chaos_ref` increments per key: acknowledged, maybe.
    ref_acked: BTreeMap<i32, i64>,
    ref_maybe: BTreeMap<i32, i64>,
    errors: Vec<ErrorEvent>,
    /// Why each maybe-committed row is maybe: `step SQLSTATE` of the failure.
    maybe_cause: BTreeMap<i64, String>,
    reconnects: usize,
    /// Operations completed without error (writes, transactions, reads).
    ok_ops: u64,
    /// Reads checked against the client's own writes.
    checked_reads: u64,
    /// Reads that broke read-your-writes (or showed rows never committed).
    violations: Vec<String>,
}

/// A failed statement, classified.
struct Failure {
    key: String,
    msg: String,
    /// The connection is unusable: connect again.
    fatal: bool,
}

fn classify(client: &Client, e: &tokio_postgres::Error) -> Failure {
    let (key, fatal) = match e.as_db_error() {
        Some(db) => (db.code().code().to_string(), db.severity() == "FATAL"),
        None if e.is_closed() => ("closed".to_string(), true),
        None => {
            let text = e.to_string();
            let key = if text.starts_with("unexpected message") {
                "unexpected-message"
            } else if text.starts_with("error parsing") {
                "parse-error"
            } else if text.starts_with("error communicating") {
                "io"
            } else {
                "other"
            };
            (key.to_string(), true)
        }
    };
    Failure {
        key,
        msg: describe_error(e),
        fatal: fatal || client.is_closed(),
    }
}

/// One client connection through pgway: the simple protocol (literal SQL), or prepared
/// statements (`stmts`).
struct Conn {
    client: Client,
    id: i32,
    stmts: Option<[Statement; 4]>,
}

impl Conn {
    async fn open(port: u16, c: usize, extended: bool) -> Result<Conn, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user(APP_USER)
            .password(APP_PASSWORD)
            .dbname(DB)
            .application_name(format!("{CLIENT_APP}{c}"))
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let stmts = if extended {
            Some([
                client.prepare(INSERT).await?,
                client.prepare(OWN_ROWS).await?,
                client.prepare(REF_UPDATE).await?,
                client.prepare(REF_READ).await?,
            ])
        } else {
            None
        };
        Ok(Conn {
            client,
            id: c as i32,
            stmts,
        })
    }

    async fn batch(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }

    /// The first column of the first row of `sql` (simple protocol) as an integer.
    async fn simple_i64(&self, sql: &str) -> Result<Vec<i64>, tokio_postgres::Error> {
        let rows = simple_rows(&self.client, sql).await?;
        Ok(rows
            .first()
            .map(|r| {
                r.iter()
                    .map(|v| v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(-1))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn insert(&self, id: i64, seq: i64) -> Result<(), tokio_postgres::Error> {
        match &self.stmts {
            Some(s) => self
                .client
                .execute(&s[0], &[&id, &self.id, &seq])
                .await
                .map(drop),
            None => {
                self.batch(&format!(
                    "insert into chaos (id, client, seq) values ({id}, {}, {seq})",
                    self.id
                ))
                .await
            }
        }
    }

    /// `count(*)` and `max(seq)` of this client's rows.
    async fn own_rows(&self) -> Result<(i64, i64), tokio_postgres::Error> {
        match &self.stmts {
            Some(s) => {
                let row = self.client.query_one(&s[1], &[&self.id]).await?;
                Ok((row.get(0), row.get(1)))
            }
            None => {
                let v = self
                    .simple_i64(&OWN_ROWS.replace("$1", &self.id.to_string()))
                    .await?;
                Ok((
                    v.first().copied().unwrap_or(-1),
                    v.get(1).copied().unwrap_or(-1),
                ))
            }
        }
    }

    async fn ref_update(&self, k: i32) -> Result<i64, tokio_postgres::Error> {
        match &self.stmts {
            Some(s) => Ok(self.client.query_one(&s[2], &[&k]).await?.get(0)),
            None => {
                let v = self
                    .simple_i64(&REF_UPDATE.replace("$1", &k.to_string()))
                    .await?;
                Ok(v.first().copied().unwrap_or(-1))
            }
        }
    }

    async fn ref_read(&self, k: i32) -> Result<i64, tokio_postgres::Error> {
        match &self.stmts {
            Some(s) => Ok(self.client.query_one(&s[3], &[&k]).await?.get(0)),
            None => {
                let v = self
                    .simple_i64(&REF_READ.replace("$1", &k.to_string()))
                    .await?;
                Ok(v.first().copied().unwrap_or(-1))
            }
        }
    }
}

/// Runs `fut` with [`OP_TIMEOUT`]; a failure is recorded in `log` and returned.
async fn step<T>(
    conn: &Conn,
    log: &Mutex<ClientLog>,
    stage: &'static str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Failure> {
    let sent = Instant::now();
    let failure = match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => classify(&conn.client, &e),
        Err(_) => Failure {
            key: "timeout".into(),
            msg: format!("no answer within {OP_TIMEOUT:?}"),
            fatal: true,
        },
    };
    lock(log).errors.push(ErrorEvent {
        client: conn.id as usize,
        sent,
        stage,
        key: failure.key.clone(),
        msg: failure.msg.clone(),
    });
    Err(failure)
}

/// What one client knows of its own writes.
#[derive(Default)]
struct Known {
    acked_rows: i64,
    maybe_rows: i64,
    last_acked_seq: i64,
    /// Per `chaos_ref` key: the value the client's last acknowledged increment returned.
    ref_floor: BTreeMap<i32, i64>,
}

impl Known {
    /// Checks a read of the client's own rows.
    fn check_own(&self, log: &Mutex<ClientLog>, what: &str, (count, max_seq): (i64, i64)) {
        let mut l = lock(log);
        l.checked_reads += 1;
        if max_seq < self.last_acked_seq || count < self.acked_rows {
            l.violations.push(format!(
                "{what}: count {count}, max(seq) {max_seq}, but {} rows acknowledged, the last \
                 with seq {}",
                self.acked_rows, self.last_acked_seq
            ));
        } else if count > self.acked_rows + self.maybe_rows {
            l.violations.push(format!(
                "{what}: count {count}, but only {} rows acknowledged and {} maybe committed",
                self.acked_rows, self.maybe_rows
            ));
        }
    }

    fn check_ref(&self, log: &Mutex<ClientLog>, k: i32, v: i64) {
        let floor = self.ref_floor.get(&k).copied().unwrap_or(0);
        let mut l = lock(log);
        l.checked_reads += 1;
        if v < floor {
            l.violations.push(format!(
                "chaos_ref[{k}] read {v}, but the client's own increment had returned {floor}"
            ));
        }
    }
}

/// Sets `ids` to `outcome` in the log (and in `known`).
fn record_rows(log: &Mutex<ClientLog>, known: &mut Known, ids: &[(i64, i64)], outcome: Outcome) {
    let mut l = lock(log);
    for &(id, seq) in ids {
        l.rows.insert(id, outcome);
        if outcome == Outcome::Maybe {
            let cause = l
                .errors
                .last()
                .map(|e| format!("{} {}", e.stage, e.key))
                .unwrap_or_default();
            l.maybe_cause.insert(id, cause);
        }
        match outcome {
            Outcome::Acked => {
                known.acked_rows += 1;
                known.last_acked_seq = known.last_acked_seq.max(seq);
            }
            Outcome::Maybe => known.maybe_rows += 1,
            Outcome::NotCommitted => {}
        }
    }
}

/// One client of the soak; runs until `stop`.
async fn client_task(
    port: u16,
    c: usize,
    log: Arc<Mutex<ClientLog>>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) {
    let extended = c % 2 == 1;
    let mut rng = Rng::new(c as u64 + 1);
    let mut known = Known::default();
    let mut seq: i64 = 0;
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        if !first {
            lock(&log).reconnects += 1;
        }
        first = false;
        let sent = Instant::now();
        let conn = match tokio::time::timeout(OP_TIMEOUT, Conn::open(port, c, extended)).await {
            Ok(Ok(conn)) => conn,
            failed => {
                let (key, msg) = match failed {
                    Ok(Err(e)) => (
                        e.code()
                            .map(|c| c.code().to_string())
                            .unwrap_or_else(|| "closed".into()),
                        describe_error(&e),
                    ),
                    _ => ("timeout".into(), "connect: no answer".into()),
                };
                lock(&log).errors.push(ErrorEvent {
                    client: c,
                    sent,
                    stage: "connect",
                    key,
                    msg,
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // One operation per turn; `Err` means connect again.
        while !stop.load(Ordering::SeqCst) {
            let r = one_op(&conn, &log, &mut rng, &mut known, &mut seq).await;
            ops.fetch_add(1, Ordering::Relaxed);
            if r.is_err() {
                break;
            }
            tokio::time::sleep(PACE).await;
        }
    }
}

/// One random operation, then the reads that check it. `Err` when the connection is gone.
async fn one_op(
    conn: &Conn,
    log: &Mutex<ClientLog>,
    rng: &mut Rng,
    known: &mut Known,
    seq: &mut i64,
) -> Result<(), ()> {
    // (id, seq) of the client's next row: ids are unique across clients.
    let c = i64::from(conn.id);
    let mut next_row = || {
        *seq += 1;
        ((c + 1) * 1_000_000_000 + *seq, *seq)
    };
    // Fatal failures end the turn (connect again); others go on.
    macro_rules! fatal {
        ($f:expr) => {
            if $f.fatal {
                return Err(());
            }
        };
    }
    let pick = rng.below(100);
    let mut ok = true;
    let what;
    if pick < 50 {
        what = "after an autocommit insert";
        let row = next_row();
        match step(conn, log, "insert", conn.insert(row.0, row.1)).await {
            Ok(()) => record_rows(log, known, &[row], Outcome::Acked),
            Err(f) => {
                record_rows(log, known, &[row], Outcome::Maybe);
                fatal!(f);
                ok = false;
            }
        }
    } else if pick < 80 {
        what = "after a transaction";
        let rows = [next_row(), next_row()];
        let mut failed = None;
        if let Err(f) = step(conn, log, "begin", conn.batch("begin")).await {
            failed = Some(f);
        } else {
            for row in rows {
                if let Err(f) = step(conn, log, "tx-insert", conn.insert(row.0, row.1)).await {
                    failed = Some(f);
                    break;
                }
            }
        }
        match failed {
            Some(f) => {
                // COMMIT was never sent: none of these rows may ever show up.
                record_rows(log, known, &rows, Outcome::NotCommitted);
                ok = false;
                fatal!(f);
                if let Err(f) = step(conn, log, "rollback", conn.batch("rollback")).await {
                    fatal!(f);
                }
            }
            None => match step(conn, log, "commit", conn.batch("commit")).await {
                Ok(()) => record_rows(log, known, &rows, Outcome::Acked),
                Err(f) => {
                    record_rows(log, known, &rows, Outcome::Maybe);
                    ok = false;
                    fatal!(f);
                    // Whatever state the session is in, leave no transaction open.
                    if let Err(f) = step(conn, log, "rollback", conn.batch("rollback")).await {
                        fatal!(f);
                    }
                }
            },
        }
    } else if pick < 90 {
        what = "after a chaos_ref increment";
        let k = rng.below(REF_KEYS as u64) as i32;
        match step(conn, log, "ref-update", conn.ref_update(k)).await {
            Ok(v) => {
                let mut l = lock(log);
                *l.ref_acked.entry(k).or_default() += 1;
                drop(l);
                let floor = known.ref_floor.entry(k).or_default();
                *floor = (*floor).max(v);
            }
            Err(f) => {
                *lock(log).ref_maybe.entry(k).or_default() += 1;
                fatal!(f);
                ok = false;
            }
        }
        match step(conn, log, "ref-read", conn.ref_read(k)).await {
            Ok(v) => known.check_ref(log, k, v),
            Err(f) => {
                fatal!(f);
                ok = false;
            }
        }
    } else {
        what = "in a read-only transaction";
        let read = async {
            step(conn, log, "begin-ro", conn.batch("begin read only")).await?;
            let r = step(conn, log, "ro-read", conn.own_rows()).await?;
            step(conn, log, "ro-commit", conn.batch("commit")).await?;
            Ok::<_, Failure>(r)
        };
        match read.await {
            Ok(r) => known.check_own(log, what, r),
            Err(f) => {
                fatal!(f);
                ok = false;
                if let Err(f) = step(conn, log, "rollback", conn.batch("rollback")).await {
                    fatal!(f);
                }
            }
        }
    }
    // The client's next read of its own rows sees every write it had acknowledged.
    match step(conn, log, "read", conn.own_rows()).await {
        Ok(r) => known.check_own(log, what, r),
        Err(f) => {
            fatal!(f);
            ok = false;
        }
    }
    // A read of a table that changes rarely: mostly answered by the cache.
    let k = rng.below(REF_KEYS as u64) as i32;
    match step(conn, log, "ref-read", conn.ref_read(k)).await {
        Ok(v) => known.check_ref(log, k, v),
        Err(f) => {
            fatal!(f);
            ok = false;
        }
    }
    if ok {
        lock(log).ok_ops += 1;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The load and the faults
// ---------------------------------------------------------------------------------------

struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    logs: Vec<Arc<Mutex<ClientLog>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    async fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let mut load = Load {
            stop: Arc::clone(&stop),
            ops: Arc::clone(&ops),
            logs: Vec::new(),
            tasks: Vec::new(),
        };
        for c in 0..clients {
            let log = Arc::new(Mutex::new(ClientLog::default()));
            load.logs.push(Arc::clone(&log));
            load.tasks.push(tokio::spawn(client_task(
                port,
                c,
                log,
                Arc::clone(&stop),
                Arc::clone(&ops),
            )));
        }
        eventually("every client to complete an operation", WAIT, async || {
            if load.logs.iter().all(|l| lock(l).ok_ops > 0) {
                Ok(())
            } else {
                Err(format!("errors so far: {:?}", load.errors()))
            }
        })
        .await;
        load
    }

    async fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(OP_TIMEOUT + Duration::from_secs(10), t).await;
        }
    }

    fn errors(&self) -> Vec<ErrorEvent> {
        let mut all: Vec<ErrorEvent> = self
            .logs
            .iter()
            .flat_map(|l| lock(l).errors.clone())
            .collect();
        all.sort_by_key(|e| e.sent);
        all
    }
}

/// A fault and how long it lasted (from the first signal until pgway and Patroni had
/// settled again).
struct Window {
    /// `replica`, `switchover`, `failover` or `rejoin`.
    kind: &'static str,
    what: String,
    /// A switchover or failover: clean connection errors are allowed in it.
    primary_change: bool,
    start: Instant,
    end: Instant,
}

impl Window {
    fn covers(&self, t: Instant) -> bool {
        t + WINDOW_LEAD >= self.start && t <= self.end + WINDOW_GRACE
    }
}

/// Waits until a write transaction through pgway runs on member `name`.
async fn wait_writes_on(pc: &PatroniCluster, gw: &Gateway, name: &str) {
    let port = pc.member_port(name);
    let probe = Conn::open(gw.port(), 9999, false)
        .await
        .expect("a probe connection to pgway");
    eventually(
        &format!("pgway to run write transactions on {name}"),
        Duration::from_secs(60),
        async || {
            let rows = simple_rows(&probe.client, "begin; select inet_server_port(); commit")
                .await
                .map_err(|e| describe_error(&e))?;
            let got = rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .unwrap_or_default();
            if got == port.to_string() {
                Ok(())
            } else {
                Err(format!("ran on {got}"))
            }
        },
    )
    .await;
}

fn since(t: Instant, t0: Instant) -> String {
    format!("+{:.1}s", t.saturating_duration_since(t0).as_secs_f64())
}

/// One round of faults; returns their windows.
async fn round(
    pc: &mut PatroniCluster,
    gw: &Gateway,
    r: u64,
    t0: Instant,
    ops: &AtomicU64,
) -> Vec<Window> {
    let mut windows = Vec::new();
    let note = |w: Window, windows: &mut Vec<Window>| {
        eprintln!(
            "chaos: {} from {} to {} ({} operations so far)",
            w.what,
            since(w.start, t0),
            since(w.end, t0),
            ops.load(Ordering::Relaxed)
        );
        windows.push(w);
    };

    // 1. The replica dies and comes back.
    let leader = pc.leader_name();
    let replica = pc.other_member(&leader);
    let start = Instant::now();
    let what = if r.is_multiple_of(2) {
        pc.kill_member_postgres(&replica);
        pc.wait_replica(&replica);
        format!("round {r}: {replica}'s PostgreSQL killed, restarted by Patroni")
    } else {
        pc.kill_member(&replica);
        tokio::time::sleep(STEADY).await;
        pc.restart_member(&replica);
        format!("round {r}: replica {replica} (Patroni + PostgreSQL) killed and restarted")
    };
    note(
        Window {
            kind: "replica",
            what,
            primary_change: false,
            start,
            end: Instant::now(),
        },
        &mut windows,
    );
    tokio::time::sleep(STEADY).await;

    // 2. A planned switchover; the old leader comes back as the synchronous standby.
    let start = Instant::now();
    let (old, candidate) = pc.switchover();
    let (new, _) = pc.wait_new_leader_key_async(&old, PATRONI_WAIT).await;
    assert_eq!(new, candidate, "the switchover went to another member");
    pc.wait_primary(&new);
    wait_writes_on(pc, gw, &new).await;
    pc.wait_replica(&old);
    note(
        Window {
            kind: "switchover",
            what: format!("round {r}: switchover {old} -> {new}"),
            primary_change: true,
            start,
            end: Instant::now(),
        },
        &mut windows,
    );
    tokio::time::sleep(STEADY).await;

    // 3. The leader is killed; the standby takes over; the old leader rejoins.
    let killed = pc.kill_leader();
    let (new, _) = pc
        .wait_new_leader_key_async(&killed.name, PATRONI_WAIT)
        .await;
    pc.wait_primary(&new);
    wait_writes_on(pc, gw, &new).await;
    note(
        Window {
            kind: "failover",
            what: format!(
                "round {r}: failover, {} killed, {new} promoted",
                killed.name
            ),
            primary_change: true,
            start: killed.at,
            end: Instant::now(),
        },
        &mut windows,
    );
    tokio::time::sleep(STEADY).await;
    let start = Instant::now();
    pc.restart_member(&killed.name);
    note(
        Window {
            kind: "rejoin",
            what: format!("round {r}: {} rejoined as a replica", killed.name),
            primary_change: false,
            start,
            end: Instant::now(),
        },
        &mut windows,
    );
    tokio::time::sleep(STEADY).await;
    windows
}

// ---------------------------------------------------------------------------------------
// Evidence from the servers and from pgway
// ---------------------------------------------------------------------------------------

/// Log lines of the servers that report a statement refused by a node in recovery, by
/// `application_name` (`(app, line)`).
fn recovery_refusals(pc: &PatroniCluster) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for name in pc.member_names() {
        let path = pc.member_log(&name);
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
        for line in text.lines() {
            if !(line.contains("read-only transaction") || line.contains("recovery is in progress"))
                || line.contains("STATEMENT:")
            {
                continue;
            }
            let app = line
                .split_once("[app=")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(app, _)| app.to_string())
                .unwrap_or_else(|| "?".into());
            found.push((app, format!("{name}: {line}")));
        }
    }
    found
}

/// `application_name` of the control statement [`refused_on_replica`] runs.
const CONTROL_APP: &str = "chaos-control";

/// A control for the log check: a write sent straight to the replica at `port` (not through
/// pgway) as [`CONTROL_APP`], which the replica refuses ("read-only transaction"). The log
/// check must find it, so that finding no client refusal means something.
async fn refused_on_replica(port: u16) {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(DB)
        .application_name(CONTROL_APP)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connecting to the replica directly");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let e = client
        .batch_execute("insert into chaos_ref values (-1, 0)")
        .await
        .expect_err("a replica refuses a write");
    assert_eq!(sqlstate(&e), "25006", "{}", describe_error(&e));
}

/// Is `app` one of pgway's own connections (health checks, replay positions, catalog
/// look-ups, the cache's stream)?
fn is_pgway_probe(app: &str) -> bool {
    app.starts_with("pgway-") || app.starts_with("pgway_")
}

/// The samples of `/metrics` whose names start with one of `prefixes`.
async fn metrics(admin: u16, prefixes: &[&str]) -> Vec<(String, f64)> {
    let text = http_get(admin, "/metrics").await.expect("GET /metrics");
    text.lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Ids (one per line) in `text`.
fn ids(text: &str) -> std::collections::BTreeSet<i64> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.trim().parse().expect("an id"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak() {
    let soak = Duration::from_secs(env_u64("PGWAY_CHAOS_SECS", 0));
    let clients = env_u64("PGWAY_CHAOS_CLIENTS", 24) as usize;
    let test_started = Instant::now();
    let mut pc = PatroniCluster::start_with(PatroniOptions {
        synchronous_mode: true,
        log_line_prefix: Some(LOG_LINE_PREFIX.into()),
        ..PatroniOptions::default()
    });
    let leader = pc.leader_name();
    pc.psql_db(
        &leader,
        "postgres",
        &format!("CREATE ROLE {WAL_USER} LOGIN REPLICATION PASSWORD '{WAL_PASSWORD}';"),
    );
    pc.psql(&leader, SCHEMA);
    pc.wait_replay();
    refused_on_replica(pc.member_port(&pc.other_member(&leader))).await;

    let admin = free_loopback_port();
    let opts = PatroniGatewayOptions {
        pool_size: 16,
        wait_timeout: "30s".into(),
        extra: format!(
            "[cache]\nenabled = true\nwal_user = \"{WAL_USER}\"\nwal_password = \
             \"{WAL_PASSWORD}\"\n\n[[cache.rules]]\ntables = [\"chaos\", \"chaos_ref\"]\n\
             ttl = \"1h\"\n"
        ),
        ..PatroniGatewayOptions::default()
    };
    let gw = Gateway::start_toml(|listen| {
        let toml = pc.gateway_toml(listen, &opts);
        let admin_line = "admin_listen = \"127.0.0.1:0\"";
        assert!(toml.contains(admin_line), "{toml}");
        toml.replace(admin_line, &format!("admin_listen = \"127.0.0.1:{admin}\""))
    });
    pc.wait_for_replica_reads(&gw).await;

    let mut load = Load::start(gw.port(), clients).await;
    let t0 = Instant::now();
    eprintln!(
        "chaos: {clients} clients running ({:.1?} after the test started); soak of at least \
         {soak:?}",
        t0 - test_started
    );
    tokio::time::sleep(STEADY).await;
    let mut windows = Vec::new();
    let mut rounds = 0;
    loop {
        windows.extend(round(&mut pc, &gw, rounds, t0, &load.ops).await);
        rounds += 1;
        if t0.elapsed() >= soak {
            break;
        }
    }
    load.stop().await;
    let load_time = t0.elapsed();

    // ---- What the servers hold at the end.
    let primary = pc.leader_name();
    pc.wait_primary(&primary);
    pc.wait_replay();
    let replica = pc.other_member(&primary);
    let on_primary = ids(&pc.psql(&primary, "select id from chaos"));
    let on_replica = ids(&pc.psql(&replica, "select id from chaos"));
    let ref_final: BTreeMap<i32, i64> = pc
        .psql(&primary, "select k, v from chaos_ref")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('|')?;
            Some((k.parse().ok()?, v.parse().ok()?))
        })
        .collect();

    let mut outcomes: BTreeMap<i64, Outcome> = BTreeMap::new();
    // (step SQLSTATE) -> (maybe rows present at the end, absent)
    let mut maybe_by_cause: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut ref_acked: BTreeMap<i32, i64> = BTreeMap::new();
    let mut ref_maybe: BTreeMap<i32, i64> = BTreeMap::new();
    let mut violations = Vec::new();
    let (mut ok_ops, mut checked_reads, mut reconnects) = (0, 0, 0);
    for (c, l) in load.logs.iter().enumerate() {
        let l = lock(l);
        outcomes.extend(l.rows.iter().map(|(&id, &o)| (id, o)));
        for (id, cause) in &l.maybe_cause {
            let e = maybe_by_cause.entry(cause.clone()).or_default();
            if on_primary.contains(id) {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        for (&k, &n) in &l.ref_acked {
            *ref_acked.entry(k).or_default() += n;
        }
        for (&k, &n) in &l.ref_maybe {
            *ref_maybe.entry(k).or_default() += n;
        }
        violations.extend(l.violations.iter().map(|v| format!("client {c}: {v}")));
        ok_ops += l.ok_ops;
        checked_reads += l.checked_reads;
        reconnects += l.reconnects;
    }
    let count = |o: Outcome| outcomes.values().filter(|&&x| x == o).count();
    let (acked, maybe, not_committed) = (
        count(Outcome::Acked),
        count(Outcome::Maybe),
        count(Outcome::NotCommitted),
    );
    let lost: Vec<i64> = outcomes
        .iter()
        .filter(|(id, o)| **o == Outcome::Acked && !on_primary.contains(id))
        .map(|(&id, _)| id)
        .collect();
    let maybe_present = outcomes
        .iter()
        .filter(|(id, o)| **o == Outcome::Maybe && on_primary.contains(id))
        .count();
    let phantoms: Vec<String> = on_primary
        .iter()
        .filter(|id| outcomes.get(id).is_none_or(|o| *o == Outcome::NotCommitted))
        .map(|id| format!("{id} ({:?})", outcomes.get(id)))
        .collect();
    let ref_bad: Vec<String> = (0..REF_KEYS)
        .filter_map(|k| {
            let v = ref_final.get(&k).copied().unwrap_or(-1);
            let a = ref_acked.get(&k).copied().unwrap_or(0);
            let m = ref_maybe.get(&k).copied().unwrap_or(0);
            (v < a || v > a + m)
                .then(|| format!("chaos_ref[{k}] = {v}, {a} increments acknowledged, {m} maybe"))
        })
        .collect();

    // ---- Errors, by window.
    let errors = load.errors();
    let mut by_key: BTreeMap<(String, &'static str, String), usize> = BTreeMap::new();
    let mut bad_errors = Vec::new();
    let mut clean_errors = Vec::new();
    for e in &errors {
        // The latest fault that may have hit it.
        let window = windows
            .iter()
            .filter(|w| w.covers(e.sent))
            .max_by_key(|w| w.start);
        let label = window.map_or("steady", |w| w.kind).to_string();
        *by_key.entry((label, e.stage, e.key.clone())).or_default() += 1;
        // A primary change may cost any statement in flight or in a transaction a clean
        // error; a replica fault only a read-only transaction that was running on it (its
        // snapshot is there), never an autocommit read (pgway sends it elsewhere).
        let allowed = CLEAN_ERRORS.contains(&e.key.as_str())
            && windows.iter().any(|w| {
                w.covers(e.sent) && (w.primary_change || READ_ONLY_TX_STEPS.contains(&e.stage))
            });
        let line = format!(
            "client {} at {} ({}): {} -> {}",
            e.client,
            since(e.sent, t0),
            window.map_or("steady load", |w| w.what.as_str()),
            e.stage,
            e.msg
        );
        if allowed {
            clean_errors.push(line);
        } else {
            bad_errors.push(line);
        }
    }

    // ---- The servers' logs and pgway's counters.
    let refusals = recovery_refusals(&pc);
    let mut refusals_by_app: BTreeMap<String, usize> = BTreeMap::new();
    for (app, _) in &refusals {
        *refusals_by_app.entry(app.clone()).or_default() += 1;
    }
    let control_seen = refusals.iter().any(|(app, _)| app == CONTROL_APP);
    let client_refusals: Vec<&String> = refusals
        .iter()
        .filter(|(app, _)| !is_pgway_probe(app) && app != CONTROL_APP)
        .map(|(_, line)| line)
        .collect();
    let topology = topology_json(admin).await;
    let retries = topology["replica_retries"].as_u64();
    let samples = metrics(
        admin,
        &[
            "pgway_replica_retries",
            "pgway_cache_hits",
            "pgway_cache_misses",
            "pgway_cache_bypassed",
            "pgway_cache_invalidations",
            "pgway_failovers",
            "pgway_queries",
            "pgway_read_your_writes",
            "pgway_errors",
        ],
    )
    .await;
    let metric = |name: &str| samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v);

    // ---- Report.
    let mut report = String::new();
    let _ = writeln!(
        report,
        "{clients} clients, {rounds} round(s) of faults, {:.1?} of load ({:.1?} in all with the \
         cluster start)",
        load_time,
        test_started.elapsed()
    );
    for w in &windows {
        let _ = writeln!(
            report,
            "  {} {}..{}",
            w.what,
            since(w.start, t0),
            since(w.end, t0)
        );
    }
    let _ = writeln!(
        report,
        "operations without error {ok_ops}, reads checked against the client's own writes \
         {checked_reads}, reconnects {reconnects}"
    );
    let _ = writeln!(
        report,
        "rows: {acked} acknowledged, {maybe} maybe committed ({maybe_present} of them present), \
         {not_committed} not committed; {} on the final primary {primary}, {} on {replica}; \
         chaos_ref increments acknowledged {}, maybe {}",
        on_primary.len(),
        on_replica.len(),
        ref_acked.values().sum::<i64>(),
        ref_maybe.values().sum::<i64>()
    );
    let _ = writeln!(
        report,
        "maybe-committed rows by the failure that left them unknown (present, absent at the \
         end): {maybe_by_cause:?}"
    );
    let _ = writeln!(report, "client errors by (window, step, SQLSTATE):");
    for ((w, stage, key), n) in &by_key {
        let _ = writeln!(report, "  {w:<12} {stage:<10} {key:<20} {n}");
    }
    for line in clean_errors.iter().take(40) {
        let _ = writeln!(report, "  {line}");
    }
    let _ = writeln!(
        report,
        "server log lines with \"read-only transaction\" / \"recovery is in progress\", by \
         application_name: {refusals_by_app:?}"
    );
    let _ = writeln!(
        report,
        "replica_retries: /topology {retries:?}, /metrics {:?}; read_your_writes {}",
        metric("pgway_replica_retries_total"),
        topology["read_your_writes"]
    );
    for (name, value) in &samples {
        let _ = writeln!(report, "  {name} {value}");
    }
    eprintln!("--- chaos soak\n{report}");

    let mut failures = Vec::new();
    if !lost.is_empty() {
        failures.push(format!(
            "{} acknowledged rows are missing on the final primary {primary}: {:?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        ));
    }
    if !phantoms.is_empty() {
        failures.push(format!(
            "{} rows on the primary were never committed by their client: {:?}",
            phantoms.len(),
            &phantoms[..phantoms.len().min(20)]
        ));
    }
    if on_primary != on_replica {
        failures.push(format!(
            "the replica {replica} has {} rows, the primary {}",
            on_replica.len(),
            on_primary.len()
        ));
    }
    if !ref_bad.is_empty() {
        failures.push(ref_bad.join("\n"));
    }
    if !violations.is_empty() {
        failures.push(format!(
            "{} reads older than the client's own writes:\n{}",
            violations.len(),
            violations[..violations.len().min(20)].join("\n")
        ));
    }
    if !bad_errors.is_empty() {
        failures.push(format!(
            "{} client errors that are not a clean error of a primary change:\n{}",
            bad_errors.len(),
            bad_errors[..bad_errors.len().min(30)].join("\n")
        ));
    }
    if !client_refusals.is_empty() {
        failures.push(format!(
            "{} client statements refused by a node in recovery:\n{}",
            client_refusals.len(),
            client_refusals[..client_refusals.len().min(20)]
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    if !control_seen {
        failures.push(format!(
            "the control statement refused by the replica ({CONTROL_APP}) is not in the \
             servers' logs: the log check sees nothing"
        ));
    }
    if retries != Some(0) || metric("pgway_replica_retries_total") != Some(0.0) {
        failures.push(format!(
            "pgway sent statements refused by a replica to the primary: /topology \
             replica_retries {retries:?}, /metrics {:?}",
            metric("pgway_replica_retries_total")
        ));
    }
    assert!(
        failures.is_empty(),
        "{}\n--- report\n{report}",
        failures.join("\n")
    );
    drop(gw);
}
