//! Load and backpressure, measured on the real `pgway` binary in front of a primary and
//! one streaming replica.
//!
//! - 2,000 concurrent clients (all connected at once) over a pool of 20 per node run a
//!   mix of reads and write transactions (`benches/load/generator.rs`): zero errors, every
//!   committed row is there, and pgway's peak resident memory stays under 100 MiB.
//! - A client that reads a ~100 MB result slowly costs pgway less than 32 MiB of resident
//!   memory: pgway reads from the server only as fast as the client takes the bytes.
//!
//! Memory is read from `/proc/<pid>/status` (`VmRSS`, and `VmHWM`, the peak). The CI
//! setting is short; `PGWAY_LOAD_CLIENTS`, `PGWAY_LOAD_PER_CLIENT` and
//! `PGWAY_LOAD_SECONDS` make it longer (`benches/LOAD.md` has the commands and figures).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test step that cannot go on fails the test, with its message"
)]

mod common;

#[path = "../benches/load/generator.rs"]
#[allow(
    dead_code,
    reason = "shared with the load bench, which uses other parts"
)]
mod generator;

use std::time::Duration;

use common::*;
use generator::{mib, resident_memory, Amount, Plan, Target};

const MIB: u64 = 1024 * 1024;

/// Pool size per node, as the issue asks.
const POOL_SIZE: usize = 20;

/// pgway's bound on resident memory under the load, for the release build.
const MEMORY_BOUND: u64 = 100 * MIB;

/// How much more resident memory the debug build of pgway holds from the start, for the
/// same work: unoptimised code and larger futures (measured: 36.3 MiB at start, 108 MiB
/// at the peak, against 20.8 and 91.4 MiB for the release build). The bound is a claim
/// about the release build (`cargo test --release --test load`); a debug run checks that
/// pgway's growth fits in it.
const DEBUG_BUILD_EXCESS: u64 = 16 * MIB;

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_over_a_pool_of_20_per_node_without_errors_in_under_100_mib() {
    let clients: usize = env_number("PGWAY_LOAD_CLIENTS").unwrap_or(2000);
    let amount = match env_number::<f64>("PGWAY_LOAD_SECONDS") {
        Some(s) => Amount::For(Duration::from_secs_f64(s)),
        None => Amount::PerClient(env_number("PGWAY_LOAD_PER_CLIENT").unwrap_or(10)),
    };
    // Our client sockets, and pgway's (which inherits the limit): one per client, plus
    // its server connections, listeners and files.
    raise_open_files(clients as u64 + 1024);

    // The clients log in as the md5 user: SCRAM's 4,096 rounds of PBKDF2, on both sides,
    // take about 100 ms a login in a debug build (over 3 minutes for 2,000 logins on 2
    // cores); the release build does them in ~1 ms, and the load bench uses SCRAM.
    let cluster = Cluster::start_with_schema(
        1,
        &format!(
            "{}ALTER TABLE pgway_load OWNER TO {MD5_USER};\n",
            generator::SCHEMA
        ),
    );
    let opts = GatewayOptions {
        pool_size: POOL_SIZE,
        // 2,000 clients share 20 connections per node: a client may queue behind many
        // transactions, so the wait is bounded generously (a 53300 would fail the test).
        wait_timeout: "120s".into(),
        extra: format!(
            "[client]\nmax_connections = {}\nlogin_timeout = \"120s\"\n",
            clients + 100
        ),
        ..GatewayOptions::default()
    };
    let mut pgway = GatewayProcess::start(&cluster, &opts);
    pgway.wait_ready(&cluster).await;
    let pid = pgway.pid();
    let (before, _) = resident_memory(pid).expect("pgway's memory");

    let target = Target {
        host: "127.0.0.1".into(),
        port: pgway.port(),
        user: MD5_USER.into(),
        password: MD5_PASSWORD.into(),
        db: DB.into(),
    };
    let plan = Plan {
        clients,
        connect_concurrency: 64,
        amount,
        write_every: 5,
        connect_timeout: Duration::from_secs(120),
    };
    let mut all_open = None;
    let report = generator::run(&target, &plan, |_| {
        all_open = Some(resident_memory(pid).expect("pgway's memory"));
    })
    .await;
    let (after, peak) = resident_memory(pid).expect("pgway's memory");
    let (open_rss, _) = all_open.expect("the barrier ran");

    let rows: u64 = cluster
        .psql_admin(cluster.primary_port(), "SELECT count(*) FROM pgway_load")
        .parse()
        .expect("a count");
    // pgway's server connections on each node, after the run (they stay parked).
    let server_conns = |port| {
        cluster.psql_admin(
            port,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{MD5_USER}' \
                 AND backend_type = 'client backend'"
            ),
        )
    };
    let primary_conns = server_conns(cluster.primary_port());
    let replica_conns = server_conns(cluster.replica_ports()[0]);

    println!(
        "load: {clients} clients ({} connected, {} open at once; ramp-up {:.1} s), \
         {:?} per client, pool {POOL_SIZE} per node; {} statements ({} reads, {} write \
         transactions) in {:.1} s = {:.0} statements/s; errors {:?}; pgway RSS before \
         {:.1} MiB, all open {:.1} MiB ({:.1} KiB per client), after {:.1} MiB, peak \
         (VmHWM) {:.1} MiB; server connections of the pool: primary {primary_conns}, replica \
         {replica_conns}",
        report.connected,
        report.open_at_barrier,
        report.ramp_up.as_secs_f64(),
        plan.amount,
        report.statements,
        report.reads,
        report.writes,
        report.work.as_secs_f64(),
        report.statements_per_second(),
        report.errors,
        mib(before),
        mib(open_rss),
        open_rss.saturating_sub(before) as f64 / 1024.0 / clients as f64,
        mib(after),
        mib(peak),
    );

    assert_eq!(report.errors, Default::default(), "errors by SQLSTATE");
    assert_eq!(report.connected, clients, "clients that logged in");
    assert_eq!(
        report.open_at_barrier, clients,
        "client connections open at once"
    );
    assert_eq!(rows, report.writes, "rows committed vs. in the table");
    let bound = if cfg!(debug_assertions) {
        MEMORY_BOUND + DEBUG_BUILD_EXCESS
    } else {
        MEMORY_BOUND
    };
    assert!(
        peak < bound,
        "pgway's peak resident memory {:.1} MiB is not under {:.0} MiB",
        mib(peak),
        mib(bound)
    );
    // The pool is bounded: 20 connections per node (pgway's health checks and catalog
    // look-ups log in as the first user of the config, app, not as this one).
    for (node, conns) in [("primary", &primary_conns), ("replica", &replica_conns)] {
        let conns: usize = conns.parse().expect("a count");
        assert!(
            conns <= POOL_SIZE,
            "{conns} server connections on the {node}"
        );
    }
    drop(pgway);
}

/// Follows the frames of a byte stream fed in arbitrary pieces: counts DataRows, notes an
/// ErrorResponse, and sees the ReadyForQuery that ends the reply.
#[derive(Default)]
struct FrameCounter {
    header: Vec<u8>,
    /// Body bytes of the current frame still to come.
    remaining: usize,
    tag: u8,
    data_rows: u64,
    errors: u64,
    ready: bool,
}

impl FrameCounter {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 5 {
                self.tag = self.header[0];
                let len = i32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                assert!(len >= 4, "frame length {len}");
                self.remaining = len as usize - 4;
                self.header.clear();
                match self.tag {
                    b'D' => self.data_rows += 1,
                    b'E' => self.errors += 1,
                    b'Z' => self.ready = true,
                    _ => {}
                }
            }
        }
    }

    fn done(&self) -> bool {
        self.ready && self.remaining == 0 && self.header.is_empty()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_of_a_100_mb_result_grows_pgway_by_less_than_32_mib() {
    const ROWS: u64 = 100_000;
    const CHUNK: usize = 64 * 1024;
    const PAUSE: Duration = Duration::from_millis(3);

    let cluster = Cluster::start(1);
    let mut pgway = GatewayProcess::start(&cluster, &GatewayOptions::default());
    pgway.wait_ready(&cluster).await;
    let pid = pgway.pid();

    let mut conn = RawConn::login(pgway.port(), APP_USER, APP_PASSWORD).await;
    let warm_up = conn
        .query("select repeat('x', 1000) from generate_series(1, 100)")
        .await;
    assert_eq!(warm_up.last().map(|m| m.tag), Some(b'Z'));
    let (before, _) = resident_memory(pid).expect("pgway's memory");

    let sql = format!("select repeat('x', 1000) from generate_series(1, {ROWS})");
    let mut body = sql.into_bytes();
    body.push(0);
    conn.send_message(b'Q', &body).await;
    // Read nothing for a while: a gateway that buffered the result would take it all now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut peak = resident_memory(pid).expect("pgway's memory").0;

    let mut frames = FrameCounter::default();
    let mut chunk = vec![0u8; CHUNK];
    let mut received: u64 = 0;
    while !frames.done() {
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read_raw(&mut chunk))
            .await
            .expect("pgway sent nothing for 30 s")
            .expect("reading the result");
        assert!(n > 0, "pgway closed the connection after {received} bytes");
        received += n as u64;
        frames.feed(&chunk[..n]);
        peak = peak.max(resident_memory(pid).expect("pgway's memory").0);
        tokio::time::sleep(PAUSE).await;
    }
    let (after, hwm) = resident_memory(pid).expect("pgway's memory");
    // VmHWM is the peak since pgway started, so this bound is conservative.
    let growth = peak.max(hwm).saturating_sub(before);

    println!(
        "backpressure: {received} bytes ({} rows) read {CHUNK} bytes every {PAUSE:?}; pgway \
         RSS before {:.1} MiB, sampled peak {:.1} MiB, VmHWM {:.1} MiB, after {:.1} MiB: \
         growth at most {:.1} MiB",
        frames.data_rows,
        mib(before),
        mib(peak),
        mib(hwm),
        mib(after),
        mib(growth),
    );
    assert_eq!(frames.errors, 0, "an ErrorResponse in the result");
    assert_eq!(frames.data_rows, ROWS, "rows received");
    assert!(received > 100_000_000, "{received} bytes");
    assert!(
        growth < 32 * MIB,
        "pgway's resident memory grew by {:.1} MiB relaying a result to a slow reader",
        mib(growth)
    );
    // The session is still usable.
    let after_query = conn.query("select 1").await;
    assert_eq!(after_query.last().map(|m| m.tag), Some(b'Z'));
    drop(pgway);
}
