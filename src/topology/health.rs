//! Health checks for `kind = "static"`: every `health_interval`, each node is asked
//! `pg_is_in_recovery()` over a control connection (tokio-postgres). A node that fails
//! leaves the rotation at once; one that answers comes back with the role it reported, so a
//! promoted replica becomes the primary without a restart.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Role, TopologyHandle};
use crate::backend::Pools;
use crate::config::split_host_port;

/// Credentials and timing for the checks.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Role to log in as.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Database to log in to.
    pub database: String,
    /// Time between checks.
    pub interval: Duration,
    /// Limit on connect and on each query.
    pub timeout: Duration,
}

/// Runs one check of `addr` now: its role, or why it failed.
pub async fn check_node(
    addr: &str,
    settings: &HealthSettings,
    client: &mut Option<tokio_postgres::Client>,
) -> Result<Role, String> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let (host, port) = split_host_port(addr).ok_or("bad address")?;
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(port)
            .user(&settings.user)
            .password(&settings.password)
            .dbname(&settings.database)
            .application_name("pgway-health")
            .connect_timeout(settings.timeout);
        let (c, connection) = tokio::time::timeout(settings.timeout, config.connect(NoTls))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        *client = Some(c);
    }
    let Some(c) = client.as_ref() else {
        return Err("no connection".into());
    };
    let row = tokio::time::timeout(
        settings.timeout,
        c.query_one("select pg_is_in_recovery()", &[]),
    )
    .await
    .map_err(|_| "health query timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let in_recovery: bool = row.try_get(0).map_err(|e| e.to_string())?;
    Ok(if in_recovery {
        Role::Replica
    } else {
        Role::Primary
    })
}

/// Checks `addr` forever (until `shutdown`), publishing every change.
pub async fn monitor(
    addr: String,
    settings: HealthSettings,
    topology: Arc<TopologyHandle>,
    pools: Arc<Pools>,
    shutdown: CancellationToken,
) {
    let mut client = None;
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = check_node(&addr, &settings, &mut client).await;
        let changed = match &result {
            Ok(role) => topology.update(&addr, *role, true),
            Err(_) => {
                client = None;
                topology.update(&addr, Role::Unknown, false)
            }
        };
        if let Some(previous) = changed {
            match &result {
                Ok(role) => info!(node = %addr, ?role, was = ?previous.role, "node healthy"),
                Err(cause) => warn!(node = %addr, %cause, "node failed its health check"),
            }
            if result.as_ref().ok() != Some(&previous.role) {
                // Idle connections to a node that changed role or died are of no further use.
                pools.clear_node(&addr);
            }
        }
    }
}
