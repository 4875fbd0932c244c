//! Reload: SIGHUP and the console's `RELOAD` read the config file again and apply it
//! while clients stay connected.
//!
//! [`reload`] loads and checks the whole file, and reads the TLS files it names, before it
//! changes anything: a config that fails any of that is refused with the key named, and
//! the running one stays. Then it applies, each where it is read:
//! - `[[users]]`: logins from now on (passwords, `auth`, `admin`, `max_connections`), and
//!   the pools' next server connections and sizes (`pool_size`);
//! - `[pool]`: sizes grow at once and shrink as lent connections come back; timeouts and
//!   recycling apply to the next look;
//! - `[client]`: `login_timeout` and `max_connections`; `[client.tls]`: the certificate
//!   new clients get; `[server_tls]`: new server and control connections;
//! - `[routing]`: the lag limit at once, read-your-writes for clients that log in after,
//!   function rules with what was learned under the old ones forgotten;
//! - `[cache]`: `default_ttl` and `rules` (the cache is emptied if they changed);
//! - `[topology]`: a static node list, health settings and `failover_timeout`; for
//!   Patroni, new etcd endpoints, namespace or scope restart the watch;
//! - `shutdown_timeout`, and `busy_poll` (each worker reads it when it next starts
//!   polling).
//!
//! Keys read once at start ([`RESTART_KEYS`]) keep their running value, with a warning
//! naming each one that changed. Connections already open are never closed by a reload.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::capacity::Capacity;
use crate::config::{Config, ConfigError, TopologyConfig};
use crate::frontend::Shared;
use crate::net::tls::{self, ClientTlsPolicy, TlsError};
use crate::net::SwapConnector;
use crate::route::catalog::{Credentials, FunctionRules};
use crate::topology::patroni::{self, PatroniSettings};

/// Keys that need a restart: a reload that changes one warns and keeps the running value.
pub const RESTART_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "workers",
    "log_format",
    "topology.kind",
    "cache.enabled",
    "cache.max_memory",
    "cache.max_entry_size",
    "cache.wal_user",
    "cache.wal_password",
];

/// Why a reload was refused (the running config stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// pgway was started from a config that is not a file (tests).
    #[error("pgway was not started from a config file; there is nothing to reload")]
    NoFile,
    /// The file does not load or does not pass the checks.
    #[error("config {path} refused: {source}")]
    Config {
        /// The file.
        path: String,
        /// Why (names the key).
        source: ConfigError,
    },
    /// A TLS file it names cannot be used.
    #[error("config {path} refused: {source}")]
    Tls {
        /// The file.
        path: String,
        /// Why (names the key).
        source: TlsError,
    },
    /// Another reload is under way.
    #[error("a reload is already under way")]
    Busy,
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct Report {
    /// Tables or keys whose new values apply.
    pub applied: Vec<String>,
    /// Restart-only keys that changed (their running values stay).
    pub need_restart: Vec<&'static str>,
}

/// What a reload needs besides the shared state: handles to swap what was built once.
#[derive(Debug)]
pub struct Reloader {
    /// The file the config came from (`None`: built in memory).
    path: Option<PathBuf>,
    /// Connections to the servers (pools and control connections), per `[server_tls]`.
    pub(crate) server_connector: Arc<SwapConnector>,
    /// `client.max_connections`.
    pub(crate) client_limit: Arc<Capacity>,
    /// The Patroni watch in force, stopped by this token when a reload starts another.
    watch: Mutex<Option<CancellationToken>>,
    /// Where background tasks (the watch) run.
    background: Mutex<Option<(TaskTracker, CancellationToken)>>,
    /// One reload at a time.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// Handles for a config loaded from `path`.
    pub fn new(
        path: Option<PathBuf>,
        server_connector: Arc<SwapConnector>,
        client_limit: usize,
    ) -> Self {
        Self {
            path,
            server_connector,
            client_limit: Arc::new(Capacity::new(client_limit)),
            watch: Mutex::new(None),
            background: Mutex::new(None),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Starts the Patroni watch on `tasks` (stopped by `shutdown` or by the reload that
    /// replaces it).
    pub fn start_watch(
        &self,
        shared: &Shared,
        settings: PatroniSettings,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let stop = shutdown.child_token();
        tasks.spawn(patroni::watch(
            settings,
            Arc::clone(&shared.topology),
            Arc::clone(&shared.pools),
            stop.clone(),
        ));
        if let Ok(mut watch) = self.watch.lock() {
            if let Some(previous) = watch.replace(stop) {
                previous.cancel();
            }
        }
        if let Ok(mut background) = self.background.lock() {
            *background = Some((tasks.clone(), shutdown.clone()));
        }
    }
}

/// Reads the config file again and applies it (see the module doc).
pub async fn reload(shared: &Shared) -> Result<Report, ReloadError> {
    let reloader = &shared.reloader;
    let Ok(_one) = reloader.running.try_lock() else {
        return Err(ReloadError::Busy);
    };
    let path = reloader.path.as_ref().ok_or(ReloadError::NoFile)?;
    let shown = path.display().to_string();
    let next = Config::load(path).map_err(|source| ReloadError::Config {
        path: shown.clone(),
        source,
    })?;
    let tls_error = |source| ReloadError::Tls {
        path: shown.clone(),
        source,
    };
    let client_tls = ClientTlsPolicy::from_config(next.client.tls.as_ref()).map_err(tls_error)?;
    let server_connector = tls::server_connector(&next.server_tls).map_err(tls_error)?;

    let current = shared.config.load_full();
    let (next, need_restart) = keep_restart_keys(&current, next);
    let mut report = Report {
        need_restart,
        ..Report::default()
    };
    let mut applied = |what: &str, changed: bool| {
        if changed {
            report.applied.push(what.to_owned());
        }
    };

    // Users and pools first: a client that logs in with the new password finds pools
    // that log in with it too.
    let users = crate::server::users_of(&next.users, &shared.users.load());
    shared.users.store(Arc::new(users));
    shared
        .pools
        .reconfigure(next.pool.clone(), crate::server::accounts_of(&next.users));
    applied("users", users_changed(&current, &next));
    applied("pool", debug_differs(&current.pool, &next.pool));

    reloader.server_connector.replace(server_connector);
    applied(
        "server_tls",
        debug_differs(&current.server_tls, &next.server_tls),
    );
    shared.client_tls.replace(client_tls);
    applied(
        "client.tls",
        debug_differs(&current.client.tls, &next.client.tls),
    );
    reloader.client_limit.resize(next.client.max_connections);
    applied("client", debug_differs(&current.client, &next.client));

    let catalog = shared.router.catalog();
    catalog.set_credentials(Credentials::of(&next.users));
    let routing = &next.routing;
    if debug_differs(&current.routing, routing) {
        catalog.set_rules(FunctionRules {
            read_only: routing.read_only_functions.clone(),
            write: routing.write_functions.clone(),
            ttl: routing.function_analysis_ttl,
        });
        shared.topology.set_max_lag(routing.max_replica_lag);
        shared.floors.set_scope(routing.read_your_writes);
        applied("routing", true);
    }
    if let Some(cache) = &shared.cache {
        applied("cache", cache.reconfigure(&next.cache));
    }

    shared.health.store(Arc::new(crate::server::health_settings(
        &next,
        &shared.pools.control_connector(),
    )));
    applied("topology", reload_topology(shared, &current, &next));
    applied(
        "shutdown_timeout",
        current.shutdown_timeout != next.shutdown_timeout,
    );
    shared.busy_poll.set(next.busy_poll);
    applied("busy_poll", current.busy_poll != next.busy_poll);
    shared.config.store(Arc::new(next));

    for key in &report.need_restart {
        warn!(
            key,
            "reload: this key needs a restart; the running value stays"
        );
    }
    info!(applied = ?report.applied, "config reloaded from {shown}");
    Ok(report)
}

/// `next` with the running value of every key in [`RESTART_KEYS`], and the keys that
/// differed.
fn keep_restart_keys(current: &Config, mut next: Config) -> (Config, Vec<&'static str>) {
    let mut differ = Vec::new();
    let mut keep = |key: &'static str, changed: bool| {
        if changed {
            differ.push(key);
        }
    };
    keep("listen", current.listen != next.listen);
    next.listen = current.listen;
    keep("admin_listen", current.admin_listen != next.admin_listen);
    next.admin_listen = current.admin_listen;
    keep("workers", current.workers != next.workers);
    next.workers = current.workers;
    keep("log_format", current.log_format != next.log_format);
    next.log_format = current.log_format;
    let kinds_differ = matches!(
        (&current.topology, &next.topology),
        (TopologyConfig::Static(_), TopologyConfig::Patroni(_))
            | (TopologyConfig::Patroni(_), TopologyConfig::Static(_))
    );
    keep("topology.kind", kinds_differ);
    if kinds_differ {
        next.topology = current.topology.clone();
    }
    let (was, cache) = (&current.cache, &mut next.cache);
    keep("cache.enabled", was.enabled != cache.enabled);
    keep("cache.max_memory", was.max_memory != cache.max_memory);
    keep(
        "cache.max_entry_size",
        was.max_entry_size != cache.max_entry_size,
    );
    keep("cache.wal_user", was.wal_user != cache.wal_user);
    keep("cache.wal_password", was.wal_password != cache.wal_password);
    cache.enabled = was.enabled;
    cache.max_memory = was.max_memory;
    cache.max_entry_size = was.max_entry_size;
    cache.wal_user.clone_from(&was.wal_user);
    cache.wal_password.clone_from(&was.wal_password);
    (next, differ)
}

/// The node list of a static topology, or a new Patroni watch if etcd, namespace or
/// scope changed. True if anything in `[topology]` changed.
fn reload_topology(shared: &Shared, current: &Config, next: &Config) -> bool {
    match (&current.topology, &next.topology) {
        (TopologyConfig::Static(was), TopologyConfig::Static(now)) if was.nodes != now.nodes => {
            shared.topology.set_static_nodes(&now.nodes);
        }
        (TopologyConfig::Patroni(was), TopologyConfig::Patroni(now))
            if (&was.etcd, &was.namespace, &was.scope)
                != (&now.etcd, &now.namespace, &now.scope) =>
        {
            let background = shared
                .reloader
                .background
                .lock()
                .ok()
                .and_then(|b| b.clone());
            if let Some((tasks, shutdown)) = background {
                info!(etcd = ?now.etcd, scope = %now.scope, "reload: watching Patroni again");
                shared
                    .reloader
                    .start_watch(shared, patroni_settings(next), &tasks, &shutdown);
            }
        }
        _ => {}
    }
    debug_differs(&current.topology, &next.topology)
}

/// The Patroni watch's settings (`[topology]` must be `kind = "patroni"`; otherwise the
/// watch gets no endpoints).
pub fn patroni_settings(config: &Config) -> PatroniSettings {
    let (endpoints, namespace, scope) = match &config.topology {
        TopologyConfig::Patroni(p) => (p.etcd.clone(), p.namespace.clone(), p.scope.clone()),
        TopologyConfig::Static(_) => (Vec::new(), String::new(), String::new()),
    };
    PatroniSettings {
        endpoints,
        namespace,
        scope,
        timeout: config.pool.connect_timeout,
    }
}

/// Any `[[users]]` entry added, removed or changed (passwords included, which `Debug`
/// hides).
fn users_changed(current: &Config, next: &Config) -> bool {
    current.users.len() != next.users.len()
        || current
            .users
            .iter()
            .zip(&next.users)
            .any(|(a, b)| a.password != b.password || debug_differs(a, b))
}

/// Compares two config sections by their `Debug` text (which leaves passwords out).
fn debug_differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(&format!(
            r#"
            {extra}
            [[users]]
            name = "app"
            password = "secret"
            [topology]
            kind = "static"
            nodes = ["127.0.0.1:5432"]
            "#
        ))
        .expect("test config")
    }

    #[test]
    fn restart_keys_keep_their_running_value_and_are_named() {
        let current = config("listen = \"127.0.0.1:6432\"\nlog_format = \"text\"");
        let next = config("listen = \"127.0.0.1:7000\"\nlog_format = \"json\"");
        let (kept, differ) = keep_restart_keys(&current, next);
        assert_eq!(kept.listen, current.listen);
        assert_eq!(kept.log_format, current.log_format);
        assert_eq!(differ, vec!["listen", "log_format"]);
    }

    #[test]
    fn a_changed_password_counts_as_a_change() {
        let current = config("");
        let mut next = current.clone();
        assert!(!users_changed(&current, &next));
        next.users[0].password = "other".into();
        assert!(users_changed(&current, &next));
    }
}
