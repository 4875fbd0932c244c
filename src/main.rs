//! The `pgway` binary: CLI, logging, config, runtime, then [`pgway::server::run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{info, warn};

use pgway::config::LogFormat;
use pgway::server::Triggers;

/// The most a SIGINT lets open transactions run on (a tenth of `shutdown_timeout` if that
/// is shorter).
const INTERRUPT_GRACE: Duration = Duration::from_secs(1);

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

    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    init_logging(config.log_format, colour);
    raise_open_file_limit(config.client.max_connections);

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
        let triggers = pgway::server::Triggers::default();
        let interrupt_grace = (config.shutdown_timeout / 10).min(INTERRUPT_GRACE);
        let signals = Signals::new().context("cannot install signal handlers")?;
        tokio::spawn(signals.handle(triggers.clone(), interrupt_grace));
        pgway::server::run_with(config, listener, triggers).await?;
        info!("pgway stopped");
        Ok(())
    })
}

/// Descriptors pgway needs besides one per client: server connections, listeners, logs.
const SPARE_FILES: u64 = 1024;

/// Raises the soft limit on open files to the hard limit (a client is a descriptor, and
/// the usual soft limit of 1,024 is below `client.max_connections`), and warns if even
/// that is short of `max_connections` plus [`SPARE_FILES`].
fn raise_open_file_limit(max_connections: usize) {
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(SPARE_FILES);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => warn!(
            limit,
            wanted,
            "the open-file limit is below client.max_connections plus server connections: \
             raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)"
        ),
        Ok(limit) => info!(limit, "open-file limit"),
        Err(cause) => warn!(%cause, "cannot raise the open-file limit"),
    }
}

/// SIGTERM, SIGINT and SIGHUP, installed before pgway accepts anyone.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// Reloads the config.
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// SIGTERM cancels `shutdown`: no new clients, idle ones are told 57P01, open
    /// transactions get up to `shutdown_timeout`. SIGINT does the same, but cancels
    /// `hard_stop` after `interrupt_grace`. A second signal of either kind cancels
    /// `hard_stop` at once: clients still inside a transaction are told 57P01.
    async fn handle(mut self, triggers: Triggers, interrupt_grace: Duration) {
        let Triggers {
            shutdown,
            hard_stop,
            reload,
        } = triggers;
        let interrupted = loop {
            tokio::select! {
                _ = self.term.recv() => break false,
                _ = self.int.recv() => break true,
                _ = self.hup.recv() => {
                    info!("SIGHUP: reloading the config");
                    reload.notify_one();
                }
            }
        };
        if interrupted {
            info!(grace = ?interrupt_grace, "SIGINT: stopping; open transactions get the grace");
        } else {
            info!("SIGTERM: stopping; open transactions get up to shutdown_timeout");
        }
        shutdown.cancel();
        tokio::select! {
            _ = self.term.recv() => warn!("second signal: stopping now"),
            _ = self.int.recv() => warn!("second signal: stopping now"),
            () = tokio::time::sleep(interrupt_grace), if interrupted => {}
            () = hard_stop.cancelled() => return,
        }
        hard_stop.cancel();
    }
}

/// Logs to stderr, as text or one JSON object a line (`log_format`), filtered by
/// `RUST_LOG` (default `info`). JSON lines carry the current span's fields and its
/// parents' (a client's `addr`, `user`, `database`).
///
/// Each client session runs inside a tracing span that is entered and left on every poll.
/// `EnvFilter` takes a lock shared by all threads on each enter and exit, to track
/// span-field directives; a plain `target=level` list (`Targets`) does not. So `RUST_LOG`
/// is read as such a list, and only one that uses span or field directives (`[span]`,
/// `{field}`) falls back to `EnvFilter`.
fn init_logging(format: LogFormat, colour: bool) {
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
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(colour),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(text)
        .with(json)
        .with(targets)
        .with(env_filter)
        .init();
}
