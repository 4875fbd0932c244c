//! The accept loop: wires config, topology, pools and routing together, serves clients
//! until shutdown, then lets sessions finish their transactions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin;
use crate::backend::Pools;
use crate::config::{Config, TopologyConfig};
use crate::error::ClientError;
use crate::frontend::auth::ScramVerifier;
use crate::frontend::cancel::CancelRegistry;
use crate::frontend::{startup, Shared, User};
use crate::route::{Catalog, Router};
use crate::topology::health::{supervise, HealthSettings};
use crate::topology::patroni::{self, PatroniSettings};
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
}

/// How long sessions get to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long background tasks (health checks, the etcd watch, the admin port, control
/// connections) get to end once the sessions are gone.
const BACKGROUND_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the gateway on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let config = Arc::new(config);
    let pools = Arc::new(Pools::new(config.pool.clone()));
    let tasks = TaskTracker::new();
    let max_lag = config.routing.max_replica_lag;
    let topology = match &config.topology {
        TopologyConfig::Static(s) => TopologyHandle::with_max_lag(&s.nodes, max_lag),
        TopologyConfig::Patroni(p) => {
            let topology = TopologyHandle::with_max_lag(&[], max_lag);
            tasks.spawn(patroni::watch(
                PatroniSettings {
                    endpoints: p.etcd.clone(),
                    namespace: p.namespace.clone(),
                    scope: p.scope.clone(),
                    timeout: config.pool.connect_timeout,
                },
                Arc::clone(&topology),
                Arc::clone(&pools),
                shutdown.clone(),
            ));
            topology
        }
    };

    let first_user = &config.users[0];
    let health = HealthSettings {
        user: first_user.name.clone(),
        password: first_user.password.clone(),
        database: config.topology.health_database().to_owned(),
        interval: config.topology.health_interval(),
        timeout: config.pool.connect_timeout,
    };
    tasks.spawn(supervise(
        health,
        Arc::clone(&topology),
        Arc::clone(&pools),
        tasks.clone(),
        shutdown.clone(),
    ));

    let credentials = Arc::new(
        config
            .users
            .iter()
            .map(|u| (u.name.clone(), u.password.clone()))
            .collect::<HashMap<_, _>>(),
    );
    let users = config
        .users
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                User {
                    config: u.clone(),
                    verifier: ScramVerifier::new(&u.password),
                },
            )
        })
        .collect();
    let shared = Arc::new(Shared {
        router: Router::new(
            Catalog::new(
                Arc::clone(&topology),
                credentials,
                config.pool.connect_timeout,
            )
            .with_tasks(tasks.clone()),
        ),
        config: Arc::clone(&config),
        users,
        pools,
        topology: Arc::clone(&topology),
        cancels: CancelRegistry::default(),
        shutdown: shutdown.clone(),
        greetings: moka::sync::Cache::new(10_000),
    });

    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.admin_listen.to_string(),
            source,
        })?;
    tasks.spawn(admin::serve(
        admin_listener,
        Arc::clone(&topology),
        shutdown.clone(),
    ));

    info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "pgway accepting clients");
    let connections = TaskTracker::new();
    let mut workers = {
        let shared = Arc::clone(&shared);
        Workers::start(
            config.workers.unwrap_or_else(workers::default_count),
            connections.clone(),
            move |stream, peer| startup::handle(Arc::clone(&shared), stream, peer),
        )?
    };
    let limit = Arc::new(Semaphore::new(config.client.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(cause) => {
                warn!(%cause, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match Arc::clone(&limit).try_acquire_owned() {
            Ok(permit) => {
                // The permit is held until the client's session ends (on its worker).
                workers.dispatch(stream, peer, permit);
            }
            Err(_) => {
                connections.spawn(refuse(stream));
            }
        }
    }
    info!("shutting down: no new clients; waiting for open transactions");
    drop(listener);
    workers.close();
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        warn!("sessions still open after the drain timeout; stopping anyway");
    }
    workers.shutdown().await;
    // The catalog's control connections end when the last holder of `shared` lets go.
    drop(shared);
    tasks.close();
    if tokio::time::timeout(BACKGROUND_STOP_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            running = tasks.len(),
            "background tasks still running after the stop timeout; stopping anyway"
        );
    }
    Ok(())
}

async fn refuse(stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    ClientError::TooManyClients.write(&mut out);
    let mut stream = stream;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}
