//! Load generator: many concurrent clients against a running pgway (or any PostgreSQL
//! endpoint), a mix of reads and write transactions, errors counted by SQLSTATE, and the
//! gateway's resident memory sampled from `/proc/<pid>/status` when `--pid` is given.
//!
//! ```sh
//! cargo bench --bench load -- --port 6432 --user app --password app-secret --db appdb \
//!     --setup --clients 2000 --seconds 60 --pid "$(pgrep -nx pgway)"
//! ```
//!
//! Run without `--port` (as a plain `cargo bench` does) it prints how to use it and exits.
//! `tests/load.rs` runs the same generator against a pgway it starts itself; see
//! `benches/LOAD.md` for both and for the figures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[path = "load/generator.rs"]
#[allow(
    dead_code,
    reason = "shared with tests/load.rs, which uses other parts"
)]
mod generator;

use generator::{mib, resident_memory, Amount, Plan, Target};

#[derive(Parser, Debug)]
#[command(
    name = "load",
    about = "Concurrent clients against pgway: reads, write transactions, errors by SQLSTATE"
)]
struct Args {
    /// Host to connect to.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to connect to (pgway's `listen`); without it, nothing runs.
    #[arg(long)]
    port: Option<u16>,
    /// User to log in as.
    #[arg(long, default_value = "app")]
    user: String,
    /// Password of `--user`.
    #[arg(long, env = "PGPASSWORD", default_value = "")]
    password: String,
    /// Database.
    #[arg(long, default_value = "appdb")]
    db: String,
    /// Concurrent client connections (all held open at once).
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// Logins in flight at once during the ramp-up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Units of work (a read, or a write transaction) per client.
    #[arg(long, conflicts_with = "seconds")]
    per_client: Option<u64>,
    /// Seconds each client works (default 30, unless --per-client is given).
    #[arg(long)]
    seconds: Option<f64>,
    /// One unit of work in this many is a write transaction (0: reads only).
    #[arg(long, default_value_t = 5)]
    write_every: u64,
    /// pgway's process id: its resident memory is sampled every 100 ms and reported.
    #[arg(long)]
    pid: Option<u32>,
    /// Create the load's table first (`CREATE TABLE IF NOT EXISTS pgway_load ...`).
    #[arg(long)]
    setup: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(port) = args.port else {
        println!(
            "load: nothing to do without --port; e.g. `cargo bench --bench load -- --port 6432 \
             --password app-secret --setup --clients 2000 --seconds 30` (see benches/LOAD.md)"
        );
        return Ok(());
    };
    let target = Target {
        host: args.host.clone(),
        port,
        user: args.user.clone(),
        password: args.password.clone(),
        db: args.db.clone(),
    };
    let amount = match (args.per_client, args.seconds) {
        (Some(n), _) => Amount::PerClient(n),
        (None, Some(s)) => Amount::For(Duration::from_secs_f64(s)),
        (None, None) => Amount::For(Duration::from_secs(30)),
    };
    let plan = Plan {
        clients: args.clients,
        connect_concurrency: args.connect_concurrency,
        amount,
        write_every: args.write_every,
        connect_timeout: Duration::from_secs(60),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(target, plan, args.pid, args.setup))
}

async fn run(target: Target, plan: Plan, pid: Option<u32>, setup: bool) -> anyhow::Result<()> {
    if setup {
        let (client, connection) = tokio_postgres::Config::new()
            .host(&target.host)
            .port(target.port)
            .user(&target.user)
            .password(&target.password)
            .dbname(&target.db)
            .connect(tokio_postgres::NoTls)
            .await
            .context("connecting for --setup")?;
        let connection = tokio::spawn(connection);
        client
            .batch_execute(generator::SCHEMA)
            .await
            .context("creating the load's table")?;
        drop(client);
        let _ = connection.await;
    }

    let before = pid
        .map(resident_memory)
        .transpose()
        .context("reading --pid's memory")?;
    let peak_rss = Arc::new(AtomicU64::new(before.map_or(0, |(rss, _)| rss)));
    let sampling = Arc::new(AtomicBool::new(pid.is_some()));
    let sampler = pid.map(|pid| {
        let (peak_rss, sampling) = (Arc::clone(&peak_rss), Arc::clone(&sampling));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Ok((rss, _)) = resident_memory(pid) {
                    peak_rss.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    let mut at_barrier = None;
    let report = generator::run(&target, &plan, |open| {
        at_barrier = pid.and_then(|pid| resident_memory(pid).ok());
        println!("all open: {open} client connections");
    })
    .await;
    sampling.store(false, Ordering::Relaxed);
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }

    println!("clients:               {}", plan.clients);
    println!("connected:             {}", report.connected);
    println!("open at once:          {}", report.open_at_barrier);
    println!(
        "ramp-up:               {:.1} s",
        report.ramp_up.as_secs_f64()
    );
    println!("work:                  {:.1} s", report.work.as_secs_f64());
    println!(
        "statements:            {} ({} reads, {} write transactions)",
        report.statements, report.reads, report.writes
    );
    println!(
        "statements/s:          {:.0}",
        report.statements_per_second()
    );
    println!("errors:                {}", report.error_count());
    for (kind, (n, example)) in &report.errors {
        println!("  {kind}: {n} (e.g. {example})");
    }
    if let Some(pid) = pid {
        let (rss, hwm) = resident_memory(pid).context("reading --pid's memory")?;
        if let Some((before, _)) = before {
            println!("pgway RSS before:      {:.1} MiB", mib(before));
        }
        if let Some((open, _)) = at_barrier {
            println!("pgway RSS, all open:   {:.1} MiB", mib(open));
        }
        println!(
            "pgway RSS peak:        {:.1} MiB sampled, {:.1} MiB VmHWM",
            mib(peak_rss.load(Ordering::Relaxed).max(rss)),
            mib(hwm)
        );
        println!("pgway RSS after:       {:.1} MiB", mib(rss));
    }
    if report.error_count() > 0 {
        anyhow::bail!("{} errors", report.error_count());
    }
    Ok(())
}
