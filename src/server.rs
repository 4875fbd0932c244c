//! The accept loop: wires config, topology, pools and routing together, serves clients
//! until shutdown, then lets sessions finish their transactions.
//!
//! [`run`] goes through these steps in order:
//! 1. `build_shared`: the state every session shares (users, pools, topology, router);
//! 2. `start_workers`: the threads that run client sessions;
//! 3. `start_background`: the topology watcher, the health checks and the admin port;
//! 4. `accept_loop`: hands clients to the workers until `shutdown` is cancelled;
//! 5. `drain`: lets open sessions finish their transactions, up to `shutdown_timeout`
//!    (or until the caller's hard stop, see [`Triggers`]), then tells clients
//!    still inside one 57P01;
//! 6. `stop_background`: waits for the background tasks, up to 5 s.
//!
//! Two [`TaskTracker`]s hold every task `run` starts: one for client connections (sessions
//! and refusals), one for everything else. Background tasks end on the `shutdown` token
//! (control connections when their client is dropped), so by step 6 they are ending.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin;
use crate::backend::{Account, Pools, Secret};
use crate::cache::stream::Streams;
use crate::cache::ResultCache;
use crate::config::{Config, ReadYourWrites, TopologyConfig, UserConfig};
use crate::frontend::auth::ScramVerifier;
use crate::frontend::cancel::CancelRegistry;
use crate::frontend::{startup, Shared, User};
use crate::metrics::Metrics;
use crate::net::tls::{self, ClientTls, ClientTlsPolicy, TlsError};
use crate::net::{Connector, SwapConnector};
use crate::reload::{self, Reloader};
use crate::route::catalog::Credentials;
use crate::route::catalog::FunctionRules;
use crate::route::floors::Floors;
use crate::route::{Catalog, Router};
use crate::topology::health::{supervise, HealthSettings};
use crate::topology::replay::ReplayPositions;
use crate::topology::TopologyHandle;
use crate::workers::{self, WorkerError, Workers};

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The worker threads could not be started.
    #[error(transparent)]
    Workers(#[from] WorkerError),
    /// `[client.tls]` or `[server_tls]` names files that cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// How long sessions get, once the drain deadline has passed, to tell their clients 57P01
/// and close. A session still running then (one waiting on its server for a long
/// statement) is dropped with its task: its client's socket closes without a message.
const HARD_STOP_GRACE: Duration = Duration::from_secs(1);

/// How long background tasks (health checks, the etcd watch, the admin port, control
/// connections) get to end once the sessions are gone.
const BACKGROUND_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the gateway on `listener` until `shutdown` is cancelled, then drains: open
/// transactions get up to `shutdown_timeout` to finish.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let triggers = Triggers {
        shutdown,
        ..Triggers::default()
    };
    run_with(config, listener, triggers).await
}

/// What ends or reloads a running gateway, besides its config.
#[derive(Debug, Clone, Default)]
pub struct Triggers {
    /// Cancelled: stop accepting, let open transactions finish (up to
    /// `shutdown_timeout`).
    pub shutdown: CancellationToken,
    /// Once `shutdown` is cancelled, cancelling this ends the drain as the deadline would
    /// (SIGINT, or a second signal: clients still inside a transaction are told 57P01 at
    /// once).
    pub hard_stop: CancellationToken,
    /// Notified: read the config file again and apply it (SIGHUP).
    pub reload: Arc<Notify>,
}

/// [`run`], with a hard stop and a reload trigger (see [`Triggers`]).
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    triggers: Triggers,
) -> Result<(), ServerError> {
    let Triggers {
        shutdown,
        hard_stop,
        reload,
    } = triggers;
    let background = TaskTracker::new();
    // TLS material is read before anything starts: a bad file stops pgway here.
    let client_tls = ClientTlsPolicy::from_config(config.client.tls.as_ref())?;
    let server_connector = Arc::new(SwapConnector::new(tls::server_connector(
        &config.server_tls,
    )?));
    let pools = Arc::new(Pools::over(
        config.pool.clone(),
        Arc::clone(&server_connector) as Arc<dyn Connector>,
    ));
    let reloader = Reloader::new(
        config.path.clone(),
        server_connector,
        config.client.max_connections,
    );
    let shared = build_shared(Arc::new(config), pools, reloader, &background, &shutdown);
    shared.client_tls.replace(client_tls);
    let sessions = TaskTracker::new();
    // On an error below, dropping `workers` stops their threads.
    let workers = start_workers(&shared, &sessions)?;
    start_background(&shared, &background).await?;
    background.spawn(Arc::clone(&shared.pools).sweep(shutdown.clone()));
    background.spawn(reload_on(Arc::clone(&shared), reload));
    accept_loop(listener, &workers, &sessions, &shared).await;
    drain(workers, sessions, &shared, &hard_stop).await;
    // The catalog's control connections end when the last holder of `shared` lets go.
    drop(shared);
    stop_background(background).await;
    Ok(())
}

/// Reloads the config each time `trigger` is notified (SIGHUP), until shutdown. A refused
/// reload is logged; the running config stays.
async fn reload_on(shared: Arc<Shared>, trigger: Arc<Notify>) {
    loop {
        tokio::select! {
            () = trigger.notified() => {}
            () = shared.shutdown.cancelled() => return,
        }
        if let Err(cause) = reload::reload(&shared).await {
            warn!(%cause, "SIGHUP: reload refused; the running config stays");
        }
    }
}

/// The state every session shares: users with their SCRAM verifiers, `pools`, the
/// topology (the static node list, or empty until the Patroni watcher fills it) and the
/// router, whose catalog runs its control connections on `background`, as the pools' end of
/// waits past `pool.wait_timeout` ([`Pools::expire_waits`]). (The session tests
/// build theirs here too, with pools that connect over in-memory streams.)
pub(crate) fn build_shared(
    config: Arc<Config>,
    pools: Arc<Pools>,
    reloader: Reloader,
    background: &TaskTracker,
    shutdown: &CancellationToken,
) -> Arc<Shared> {
    let max_lag = config.routing.max_replica_lag;
    // How control connections reach the servers: `[server_tls]`, as the pools.
    let control = pools.control_connector();
    let topology = match &config.topology {
        TopologyConfig::Static(s) => TopologyHandle::with_max_lag(&s.nodes, max_lag),
        TopologyConfig::Patroni(_) => TopologyHandle::with_max_lag(&[], max_lag),
    };
    let credentials = Credentials::of(&config.users);
    let users = users_of(&config.users, &HashMap::new());
    pools.reconfigure(config.pool.clone(), accounts_of(&config.users));
    background.spawn(Arc::clone(&pools).expire_waits(shutdown.clone()));
    let routing = &config.routing;
    let catalog = Catalog::new(
        Arc::clone(&topology),
        credentials,
        config.pool.connect_timeout,
    )
    .with_tasks(background.clone())
    .with_connector(Arc::clone(&control))
    .with_rules(FunctionRules {
        read_only: routing.read_only_functions.clone(),
        write: routing.write_functions.clone(),
        ttl: routing.function_analysis_ttl,
    });
    let router = Router::new(catalog);
    let (router, cache) = if config.cache.enabled {
        (
            router.with_cache_facts(),
            Some(Arc::new(build_cache(
                &config, &topology, &control, background, shutdown,
            ))),
        )
    } else {
        (router, None)
    };
    let health = Arc::new(ArcSwap::from_pointee(health_settings(&config, &control)));
    Arc::new(Shared {
        router: Arc::new(router),
        cache,
        client_tls: Arc::new(ClientTls::default()),
        metrics: Arc::new(Metrics::new()),
        clients: Arc::default(),
        users: ArcSwap::from_pointee(users),
        pools,
        topology,
        cancels: CancelRegistry::default(),
        shutdown: shutdown.clone(),
        hard_stop: CancellationToken::new(),
        greetings: moka::sync::Cache::new(10_000),
        floors: Arc::new(Floors::new(config.routing.read_your_writes)),
        replay: Arc::new(ReplayPositions::new(
            Arc::clone(&health),
            background.clone(),
            tokio::runtime::Handle::current(),
            shutdown.clone(),
        )),
        health,
        per_user: Arc::default(),
        auth_query: Default::default(),
        reloader,
        busy_poll: Arc::new(workers::BusyPoll::new(config.busy_poll)),
        placement: Arc::new(workers::Placement::new(
            config.workers.unwrap_or_else(workers::default_count),
        )),
        config: ArcSwap::new(config),
    })
}

/// The result cache, following each database's WAL as `cache.wal_user` if one is set.
fn build_cache(
    config: &Config,
    topology: &Arc<TopologyHandle>,
    connector: &Arc<dyn Connector>,
    background: &TaskTracker,
    shutdown: &CancellationToken,
) -> ResultCache {
    let cache = ResultCache::new(&config.cache);
    match &config.cache.wal_user {
        Some(user) => cache.with_streams(Streams {
            topology: Arc::clone(topology),
            user: user.clone(),
            password: config.cache.wal_password.clone(),
            connector: Arc::clone(connector),
            timeout: config.pool.connect_timeout,
            tasks: background.clone(),
            runtime: tokio::runtime::Handle::current(),
            shutdown: shutdown.clone(),
        }),
        None => {
            warn!(
                "cache.wal_user is not set: the result cache is invalidated only by writes \
                 through pgway, and by its TTL"
            );
            cache
        }
    }
}

/// Starts the worker threads that run client sessions ([`startup::handle`]), each session
/// tracked by `sessions`.
fn start_workers(shared: &Arc<Shared>, sessions: &TaskTracker) -> Result<Workers, ServerError> {
    let placement = Arc::clone(&shared.placement);
    let busy_poll = Arc::clone(&shared.busy_poll);
    let shared = Arc::clone(shared);
    let workers = Workers::start(
        placement,
        sessions.clone(),
        busy_poll,
        move |stream, peer, seat| startup::handle(Arc::clone(&shared), stream, peer, seat),
    )?;
    Ok(workers)
}

/// Starts the background tasks on `background`, each ending on the shutdown token: the
/// Patroni watcher (for `kind = "patroni"`), the health-check supervisor (a monitor per
/// node) and the admin HTTP port. The admin port is bound first, so a failure to bind it
/// leaves nothing running.
async fn start_background(
    shared: &Arc<Shared>,
    background: &TaskTracker,
) -> Result<(), ServerError> {
    let config = shared.config.load();
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.admin_listen.to_string(),
            source,
        })?;
    if let TopologyConfig::Patroni(p) = &config.topology {
        // Before the admin port serves: `/topology` says "etcd" from the start.
        shared.topology.etcd().started(&p.etcd);
        shared.reloader.start_watch(
            shared,
            reload::patroni_settings(&config),
            background,
            &shared.shutdown,
        );
    }
    background.spawn(supervise(
        Arc::clone(&shared.health),
        Arc::clone(&shared.topology),
        Arc::clone(&shared.pools),
        background.clone(),
        shared.shutdown.clone(),
    ));
    if config.routing.read_your_writes != ReadYourWrites::Off {
        background.spawn(follow_for_freshness(
            Arc::clone(&shared.topology),
            Arc::clone(&shared.floors),
            Arc::clone(&shared.replay),
            shared.shutdown.clone(),
        ));
    }
    if let Some(cache) = &shared.cache {
        cache.check_wal_level(config.topology.health_database());
    }
    background.spawn(Arc::clone(&shared.placement).follow_load(shared.shutdown.clone()));
    background.spawn(count_failovers(
        Arc::clone(&shared.topology),
        Arc::clone(&shared.metrics),
        shared.shutdown.clone(),
    ));
    background.spawn(admin::serve(
        admin_listener,
        admin::Views {
            topology: Arc::clone(&shared.topology),
            replay: Arc::clone(&shared.replay),
            router: Arc::clone(&shared.router),
            cache: shared.cache.clone(),
            metrics: Arc::clone(&shared.metrics),
            pools: Arc::clone(&shared.pools),
            placement: Arc::clone(&shared.placement),
        },
        shared.shutdown.clone(),
    ));
    Ok(())
}

/// Counts failovers (a primary other than the last one known) and the time without a
/// primary, for `/metrics`.
async fn count_failovers(
    topology: Arc<TopologyHandle>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut changes = topology.subscribe();
    let mut last: Option<Arc<str>> = None;
    loop {
        let primary = topology.primary();
        metrics.primary_present(primary.is_some());
        if let Some(primary) = primary {
            if last.as_ref().is_some_and(|last| *last != primary) {
                metrics.failover();
            }
            last = Some(primary);
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Read-your-writes follows the topology: every readable replica gets its replay prober
/// (connected before the first read needs it), and a new primary caps the floors raised
/// under the old one at its own position.
async fn follow_for_freshness(
    topology: Arc<TopologyHandle>,
    floors: Arc<Floors>,
    replay: Arc<ReplayPositions>,
    shutdown: CancellationToken,
) {
    let mut changes = topology.subscribe();
    let mut primary: Option<Arc<str>> = None;
    loop {
        let snapshot = topology.snapshot();
        for addr in topology.readable_replicas() {
            replay.prepare(&addr);
        }
        if let Some(now) = snapshot.primary() {
            if primary.as_ref().is_some_and(|before| *before != now.addr) {
                info!(primary = %now.addr, "new primary: read-your-writes positions of the old one are capped at its position");
                floors.promoted(now.lsn.unwrap_or(0));
            }
            primary = Some(Arc::clone(&now.addr));
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Users by name with their SCRAM verifiers, reusing those of `before` whose password
/// did not change (deriving one takes 4096 rounds of HMAC).
pub(crate) fn users_of(
    entries: &[UserConfig],
    before: &HashMap<String, User>,
) -> HashMap<String, User> {
    entries
        .iter()
        .map(|u| {
            let verifier = match before.get(&u.name) {
                Some(old) if old.config.password == u.password => old.verifier.clone(),
                _ => ScramVerifier::new(&u.password),
            };
            (
                u.name.clone(),
                User {
                    config: u.clone(),
                    verifier,
                },
            )
        })
        .collect()
}

/// How the pools log in as each `[[users]]` entry, and its pool size.
pub(crate) fn accounts_of(entries: &[UserConfig]) -> Vec<(String, Account)> {
    entries
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                Account {
                    secret: Secret::password_of(&u.password),
                    pool_size: u.pool_size,
                },
            )
        })
        .collect()
}

/// Health checks log in as the first `[[users]]` entry, through `connector`.
pub(crate) fn health_settings(config: &Config, connector: &Arc<dyn Connector>) -> HealthSettings {
    let first_user = &config.users[0];
    HealthSettings {
        user: first_user.name.clone(),
        password: first_user.password.clone(),
        database: config.topology.health_database().to_owned(),
        interval: config.topology.health_interval(),
        timeout: config.pool.connect_timeout,
        connector: Arc::clone(connector),
    }
}

/// Accepts clients until the shutdown token is cancelled, handing each to a worker while
/// fewer than `client.max_connections` are connected and refusing the rest (tracked by
/// `sessions`). The listener closes when this returns.
async fn accept_loop(
    listener: TcpListener,
    workers: &Workers,
    sessions: &TaskTracker,
    shared: &Arc<Shared>,
) {
    info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "pgway accepting clients");
    let limit = &shared.reloader.client_limit.permits;
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(cause) => {
                warn!(%cause, "accept failed");
                crate::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match Arc::clone(limit).try_acquire_owned() {
            Ok(permit) => {
                // The permit is held until the client's session ends (on its worker).
                workers.dispatch(stream, peer, permit);
            }
            Err(_) => {
                let timeout = shared.config.load().client.login_timeout;
                sessions.spawn(startup::refuse(Arc::clone(shared), stream, timeout));
            }
        }
    }
}

/// Lets open sessions finish their transactions (they end between transactions once the
/// shutdown token is cancelled), up to `shutdown_timeout` or until `hard_stop` is
/// cancelled. Then `shared.hard_stop` tells the sessions still waiting for their client
/// inside a transaction to end with 57P01; after [`HARD_STOP_GRACE`] the workers stop,
/// with whatever session is still running.
async fn drain(
    mut workers: Workers,
    sessions: TaskTracker,
    shared: &Shared,
    hard_stop: &CancellationToken,
) {
    let timeout = shared.config.load().shutdown_timeout;
    info!(
        ?timeout,
        "shutting down: no new clients; waiting for open transactions"
    );
    workers.close();
    sessions.close();
    let finished = tokio::select! {
        () = sessions.wait() => true,
        () = crate::timer::sleep(timeout) => false,
        () = hard_stop.cancelled() => false,
    };
    if !finished {
        warn!(
            open = sessions.len(),
            "drain deadline: closing sessions still inside a transaction (57P01)"
        );
        shared.hard_stop.cancel();
        if crate::timer::timeout(HARD_STOP_GRACE, sessions.wait())
            .await
            .is_err()
        {
            warn!(
                open = sessions.len(),
                "sessions still waiting on a server; stopping them"
            );
        }
    }
    workers.shutdown().await;
}

/// Waits up to [`BACKGROUND_STOP_TIMEOUT`] for the background tasks, which end on the
/// shutdown token, and warns if some do not.
async fn stop_background(background: TaskTracker) {
    background.close();
    if crate::timer::timeout(BACKGROUND_STOP_TIMEOUT, background.wait())
        .await
        .is_err()
    {
        warn!(
            running = background.len(),
            "background tasks still running after the stop timeout; stopping anyway"
        );
    }
}
