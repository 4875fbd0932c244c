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
    tracing_subscriber::fmt()
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

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
