//! A load generator for pgway: many concurrent tokio-postgres clients, each running a mix
//! of reads and write transactions, counting errors by SQLSTATE.
//!
//! Shared by the `load` bench (`benches/load.rs`, a command-line tool) and the load test
//! (`tests/load.rs`), which include this file with `#[path]`.
//!
//! A run has three phases:
//! 1. **Ramp-up**: `clients` connections open, at most `connect_concurrency` logging in at
//!    once.
//! 2. **All open**: every client waits at a barrier until all of them have connected (or
//!    failed to), so all connections are held open at the same moment; the caller's
//!    `on_all_open` runs there (e.g. to sample pgway's memory).
//! 3. **Work**: each client runs its statements, by count (`statements_per_client`) or for
//!    a `duration`, then closes. Every `write_every`-th unit of work is a write transaction
//!    (`BEGIN; INSERT; SELECT count(*); COMMIT`), the others are single reads outside a
//!    transaction (which pgway sends to a replica).
//!
//! The schema is [`SCHEMA`]; [`Report::writes`] is the number of rows the run inserted,
//! which a caller can check against the table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Barrier, Semaphore};
use tokio_postgres::{Client, NoTls, Statement};

/// The table the load writes to and reads from (run it once, as the owner, before a run).
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS pgway_load (\n\
     id bigserial PRIMARY KEY,\n\
     client int NOT NULL,\n\
     seq int NOT NULL,\n\
     payload text NOT NULL\n\
 );\n\
 CREATE INDEX IF NOT EXISTS pgway_load_client ON pgway_load (client, id);\n";

const READ: &str =
    "SELECT id, seq, payload FROM pgway_load WHERE client = $1 ORDER BY id DESC LIMIT 5";
const INSERT: &str = "INSERT INTO pgway_load (client, seq, payload) VALUES ($1, $2, $3)";
const COUNT: &str = "SELECT count(*) FROM pgway_load WHERE client = $1";

/// Where the clients connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub db: String,
}

/// How long each client works.
#[derive(Debug, Clone, Copy)]
pub enum Amount {
    /// This many units of work (a read, or a write transaction) per client.
    PerClient(u64),
    /// Until this long after the barrier.
    For(Duration),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Concurrent client connections, all open at once.
    pub clients: usize,
    /// Logins in flight at once during the ramp-up.
    pub connect_concurrency: usize,
    /// Work per client.
    pub amount: Amount,
    /// One unit of work in this many is a write transaction (0: reads only).
    pub write_every: u64,
    /// Give up on a login after this long (counted as an error).
    pub connect_timeout: Duration,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Clients that logged in.
    pub connected: usize,
    /// Client connections open at the barrier (all at once).
    pub open_at_barrier: usize,
    /// Time from the first login attempt to the barrier.
    pub ramp_up: Duration,
    /// Time from the barrier to the last client's end.
    pub work: Duration,
    /// SQL statements that succeeded (BEGIN, INSERT, SELECT and COMMIT count one each).
    pub statements: u64,
    /// Reads outside a transaction that succeeded.
    pub reads: u64,
    /// Write transactions committed (rows inserted).
    pub writes: u64,
    /// Errors by SQLSTATE (or `connect`, `closed`, `timeout`, `other` for errors without
    /// one), with one example message each.
    pub errors: BTreeMap<String, (u64, String)>,
}

impl Report {
    /// Every error, of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().map(|(n, _)| n).sum()
    }

    /// Successful statements per second of the work phase.
    pub fn statements_per_second(&self) -> f64 {
        self.statements as f64 / self.work.as_secs_f64().max(1e-9)
    }
}

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    open: AtomicUsize,
    statements: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    errors: Mutex<BTreeMap<String, (u64, String)>>,
}

impl Counters {
    fn error(&self, kind: String, message: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let entry = errors.entry(kind).or_insert((0, message));
        entry.0 += 1;
    }

    fn pg_error(&self, e: &tokio_postgres::Error) {
        let kind = match e.code() {
            Some(code) => code.code().to_owned(),
            None if e.is_closed() => "closed".to_owned(),
            None => "other".to_owned(),
        };
        let message = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => format!("{e:?}"),
        };
        self.error(kind, message);
    }
}

/// Runs `plan` against `target`. `on_all_open` runs once, while every client connection
/// is open (before any client starts working).
pub async fn run(target: &Target, plan: &Plan, on_all_open: impl FnOnce(usize)) -> Report {
    let counters = Arc::new(Counters::default());
    let logins = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    // Every client plus the coordinator below, which runs `on_all_open` between the two.
    let all_open = Arc::new(Barrier::new(plan.clients + 1));
    let go = Arc::new(Barrier::new(plan.clients + 1));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(plan.clients);
    for id in 0..plan.clients {
        let target = target.clone();
        let plan = plan.clone();
        let counters = Arc::clone(&counters);
        let logins = Arc::clone(&logins);
        let all_open = Arc::clone(&all_open);
        let go = Arc::clone(&go);
        tasks.push(tokio::spawn(async move {
            let client = {
                let _permit = logins.acquire().await;
                connect(&target, plan.connect_timeout, &counters).await
            };
            all_open.wait().await;
            go.wait().await;
            let deadline = match plan.amount {
                Amount::For(d) => Some(Instant::now() + d),
                Amount::PerClient(_) => None,
            };
            if let Some((client, connection)) = client {
                work(&client, id as i32, &plan, deadline, &counters).await;
                drop(client);
                let _ = connection.await;
                counters.open.fetch_sub(1, Ordering::Relaxed);
            }
        }));
    }
    all_open.wait().await;
    let ramp_up = started.elapsed();
    let open_at_barrier = counters.open.load(Ordering::Relaxed);
    on_all_open(open_at_barrier);
    go.wait().await;
    let work_started = Instant::now();
    for task in tasks {
        if let Err(e) = task.await {
            counters.error("panic".into(), e.to_string());
        }
    }
    let work = work_started.elapsed();
    let errors = counters
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Report {
        connected: counters.connected.load(Ordering::Relaxed),
        open_at_barrier,
        ramp_up,
        work,
        statements: counters.statements.load(Ordering::Relaxed),
        reads: counters.reads.load(Ordering::Relaxed),
        writes: counters.writes.load(Ordering::Relaxed),
        errors,
    }
}

type Connection = tokio::task::JoinHandle<()>;

/// Logs in; the client and its connection task, or `None` (the error counted).
async fn connect(
    target: &Target,
    timeout: Duration,
    counters: &Counters,
) -> Option<(Client, Connection)> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&target.host)
        .port(target.port)
        .user(&target.user)
        .password(&target.password)
        .dbname(&target.db)
        .application_name("pgway-load")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_timeout(timeout);
    match tokio::time::timeout(timeout, config.connect(NoTls)).await {
        Ok(Ok((client, connection))) => {
            counters.connected.fetch_add(1, Ordering::Relaxed);
            counters.open.fetch_add(1, Ordering::Relaxed);
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            Some((client, task))
        }
        Ok(Err(e)) => {
            let (kind, message) = match e.as_db_error() {
                Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
                None => ("connect".to_owned(), format!("{e:?}")),
            };
            counters.error(kind, message);
            None
        }
        Err(_) => {
            counters.error("timeout".into(), format!("no login within {timeout:?}"));
            None
        }
    }
}

/// One client's work; stops at its first connection-level error.
async fn work(
    client: &Client,
    id: i32,
    plan: &Plan,
    deadline: Option<Instant>,
    counters: &Counters,
) {
    let payload = format!("client {id} was here");
    // Named statements, as most drivers use them: pgway prepares them on whichever server
    // connection each transaction lands on.
    let prepared = async {
        Ok::<_, tokio_postgres::Error>((
            client.prepare(READ).await?,
            client.prepare(INSERT).await?,
            client.prepare(COUNT).await?,
        ))
    };
    let statements = match prepared.await {
        Ok(s) => s,
        Err(e) => return counters.pg_error(&e),
    };
    let (read, insert, count) = &statements;
    let mut seq: i32 = 0;
    loop {
        match (plan.amount, deadline) {
            (Amount::PerClient(n), _) if seq as u64 >= n => return,
            (_, Some(deadline)) if Instant::now() >= deadline => return,
            _ => {}
        }
        // Clients start their writes at different points, so writes and reads interleave.
        let write =
            plan.write_every > 0 && (seq as u64 + id as u64).is_multiple_of(plan.write_every);
        let result = if write {
            write_transaction(client, (insert, count), id, seq, &payload)
                .await
                .map(|n| {
                    counters.statements.fetch_add(n, Ordering::Relaxed);
                    counters.writes.fetch_add(1, Ordering::Relaxed);
                })
        } else {
            client.query(read, &[&id]).await.map(|_| {
                counters.statements.fetch_add(1, Ordering::Relaxed);
                counters.reads.fetch_add(1, Ordering::Relaxed);
            })
        };
        if let Err(e) = result {
            counters.pg_error(&e);
            if client.is_closed() {
                return;
            }
        }
        seq += 1;
    }
}

/// `BEGIN; INSERT; SELECT count(*); COMMIT`; the number of statements run.
async fn write_transaction(
    client: &Client,
    (insert, count): (&Statement, &Statement),
    id: i32,
    seq: i32,
    payload: &str,
) -> Result<u64, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let body = async {
        client.execute(insert, &[&id, &seq, &payload]).await?;
        client.query_one(count, &[&id]).await?;
        client.batch_execute("COMMIT").await
    };
    match body.await {
        Ok(()) => Ok(4),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Resident memory of process `pid`: (current `VmRSS`, peak `VmHWM`), in bytes.
pub fn resident_memory(pid: u32) -> std::io::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("no {name} in /proc/{pid}/status"),
                )
            })
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Bytes as MiB, for reports.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
