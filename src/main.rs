//! The `pgway` binary: CLI, logging, config, runtime, then [`pgway::server::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

// Every transaction allocates and frees a few buffers, from whichever worker thread runs
// the client; mimalloc's per-thread free lists make that cheaper than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "pgway",
    version,
    about = "PostgreSQL gateway: one port, reads to replicas, writes to the primary"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, env = "PGWAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config file and exit (non-zero, naming the offending key, if invalid).
    Check,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli
        .config
        .context("no config file: pass --config FILE or set PGWAY_CONFIG")?;
    let config = pgway::config::Config::load(&path)
        .with_context(|| format!("invalid config {}", path.display()))?;
    if let Some(Command::Check) = cli.command {
        println!("{}: ok", path.display());
        return Ok(());
    }

    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    init_logging(colour);

    // This runtime accepts clients and runs health checks, the etcd watch and the admin
    // port; client sessions run on pgway's own worker threads (see `pgway::workers`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("stop requested");
            signals.cancel();
        });
        pgway::server::run(config, listener, shutdown).await?;
        Ok(())
    })
}

/// Logs to stdout, filtered by `RUST_LOG` (default `info`).
///
/// Each client session runs inside a tracing span that is entered and left on every poll.
/// `EnvFilter` takes a lock shared by all threads on each enter and exit, to track
/// span-field directives; a plain `target=level` list (`Targets`) does not. So `RUST_LOG`
/// is read as such a list, and only one that uses span or field directives (`[span]`,
/// `{field}`) falls back to `EnvFilter`.
fn init_logging(colour: bool) {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let spec = if spec.trim().is_empty() {
        "info"
    } else {
        spec.trim()
    };
    let (targets, env_filter) = match spec.parse::<Targets>() {
        Ok(targets) if !spec.contains(['[', '{']) => (Some(targets), None),
        _ => (None, Some(EnvFilter::new(spec))),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_ansi(colour))
        .with(targets)
        .with(env_filter)
        .init();
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
