//! Health checks: every `health_interval`, each node is asked `pg_is_in_recovery()` and its
//! WAL position over a control connection (tokio-postgres). A node that fails leaves the
//! rotation at once; one that answers comes back with the role it reported, so a
//! promoted replica becomes the primary without a restart. A node that may be the primary
//! but does not answer as one yet (a Patroni leader being promoted), while there is no
//! primary, is checked every [`PROMOTION_PROBE`] instead, so writes move within a fraction
//! of a second.
//!
//! Monitors and their control connections run on the [`TaskTracker`] that
//! [`crate::server::run`] waits for at shutdown; each monitor ends when its node leaves the
//! topology or pgway stops, and its control connection ends with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Role, TopologyHandle};
use crate::backend::control::{self, ControlError, ControlLogin};
use crate::backend::Pools;
use crate::net::Connector;

/// Check interval for a node that should become the primary but is not one yet.
pub const PROMOTION_PROBE: Duration = Duration::from_millis(50);

/// Credentials and timing for the checks. Its `Debug` leaves the password out.
#[derive(Clone)]
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
    /// Opens the control connections (plain TCP, or TLS as `[server_tls]` says).
    pub connector: Arc<dyn Connector>,
}

impl std::fmt::Debug for HealthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthSettings")
            .field("user", &self.user)
            .field("password", &"***")
            .field("database", &self.database)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("connector", &self.connector)
            .finish()
    }
}

/// The settings in force, swapped whole by a reload; checks and probes read them before
/// each look (a changed password applies to the next login, a changed interval to the
/// next pause).
pub type LiveHealth = Arc<ArcSwap<HealthSettings>>;

impl HealthSettings {
    /// The control connection to `addr` in `client`, connected first (as
    /// `application_name`, its connection's task on `tasks`) if it is missing or closed.
    pub async fn control_client<'c>(
        &self,
        addr: &str,
        application_name: &str,
        tasks: &TaskTracker,
        client: &'c mut Option<tokio_postgres::Client>,
    ) -> Result<&'c mut tokio_postgres::Client, ControlError> {
        let c = match client.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => {
                let login = ControlLogin {
                    addr,
                    user: &self.user,
                    password: &self.password,
                    database: &self.database,
                    application_name,
                    connector: &*self.connector,
                };
                control::connect(login, self.timeout, tasks).await?
            }
        };
        Ok(client.insert(c))
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Primary or replica.
    pub role: Role,
    /// WAL write position (primary) or replay position (replica), in bytes.
    pub lsn: Option<u64>,
}

const CHECK: &str = "select pg_is_in_recovery(), \
     (case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end \
      - '0/0'::pg_lsn)::int8";

/// Why a health check failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// No control connection to the node could be made.
    #[error(transparent)]
    Connect(#[from] ControlError),
    /// The check query did not answer within the timeout.
    #[error("health query timed out")]
    Timeout,
    /// The check query failed.
    #[error(transparent)]
    Query(tokio_postgres::Error),
    /// The row the check query returned is not what it asks for.
    #[error(transparent)]
    UnexpectedRow(tokio_postgres::Error),
}

/// Runs one check of `addr` now, over `client` (connected first if it is missing or
/// closed, with its connection's task on `tasks`).
pub async fn check_node(
    addr: &str,
    settings: &HealthSettings,
    tasks: &TaskTracker,
    client: &mut Option<tokio_postgres::Client>,
) -> Result<Observation, HealthError> {
    let c = settings
        .control_client(addr, "pgway-health", tasks, client)
        .await?;
    let row = crate::timer::timeout(settings.timeout, c.query_one(CHECK, &[]))
        .await
        .map_err(|_| HealthError::Timeout)?
        .map_err(HealthError::Query)?;
    let in_recovery: bool = row.try_get(0).map_err(HealthError::UnexpectedRow)?;
    let lsn: Option<i64> = row.try_get(1).map_err(HealthError::UnexpectedRow)?;
    Ok(Observation {
        role: if in_recovery {
            Role::Replica
        } else {
            Role::Primary
        },
        lsn: lsn.and_then(|l| u64::try_from(l).ok()),
    })
}

/// Checks `addr` until `stop`, publishing every change. A check under way when `stop` is
/// cancelled is abandoned.
pub async fn monitor(
    addr: String,
    live: LiveHealth,
    topology: Arc<TopologyHandle>,
    pools: Arc<Pools>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let mut client = None;
    let wake = topology.waker(&addr, true).unwrap_or_default();
    loop {
        let settings = live.load_full();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = check_node(&addr, &settings, &tasks, &mut client) => result,
        };
        match &result {
            Ok(seen) => debug!(node = %addr, role = ?seen.role, lsn = ?seen.lsn, "health check"),
            Err(cause) => debug!(node = %addr, %cause, "health check failed"),
        }
        let changed = match &result {
            Ok(seen) => topology.observe(&addr, seen.role, true, seen.lsn),
            Err(_) => {
                client = None;
                topology.update(&addr, Role::Unknown, false)
            }
        };
        if let Some(previous) = changed {
            match &result {
                Ok(seen) => {
                    info!(node = %addr, role = ?seen.role, was = ?previous.role, "node healthy")
                }
                Err(cause) => warn!(node = %addr, %cause, "node failed its health check"),
            }
            if result.as_ref().ok().map(|seen| seen.role) != Some(previous.role) {
                // Idle connections to a node that changed role or died are of no further use.
                pools.clear_node(&addr);
            }
        }
        // Only while there is no primary: a static topology lets every node be the
        // primary, and its replicas need no 50 ms checks while the primary is up.
        let snapshot = topology.snapshot();
        let awaiting_promotion = snapshot.primary().is_none()
            && snapshot
                .nodes
                .iter()
                .any(|n| *n.addr == *addr && n.may_be_primary && n.role != Role::Primary);
        let pause = if awaiting_promotion {
            PROMOTION_PROBE.min(settings.interval)
        } else {
            settings.interval
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = crate::timer::sleep(pause) => {}
            _ = wake.notified() => {}
        }
    }
}

/// Keeps one [`monitor`] running per node in the topology, starting and stopping them as
/// members come and go, until `shutdown`. The monitors run on `tasks` and end with
/// `shutdown` too.
pub async fn supervise(
    settings: LiveHealth,
    topology: Arc<TopologyHandle>,
    pools: Arc<Pools>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    let mut changes = topology.subscribe();
    loop {
        let snapshot = topology.snapshot();
        running.retain(|addr, stop| {
            let keep = snapshot.nodes.iter().any(|n| *n.addr == **addr);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for node in &snapshot.nodes {
            if !running.contains_key(&*node.addr) {
                let stop = shutdown.child_token();
                running.insert(node.addr.to_string(), stop.clone());
                tasks.spawn(monitor(
                    node.addr.to_string(),
                    Arc::clone(&settings),
                    Arc::clone(&topology),
                    Arc::clone(&pools),
                    tasks.clone(),
                    stop,
                ));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Member;
    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            user: "app".into(),
            password: "app-secret".into(),
            database: "postgres".into(),
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
            connector: Arc::new(crate::net::TcpConnector),
        }
    }

    #[test]
    fn debug_leaves_the_password_out() {
        let text = format!("{:?}", settings());
        assert!(
            !text.contains("app-secret") && text.contains("\"app\""),
            "{text}"
        );
    }

    /// Waits (up to a second) until `tasks` holds `count` tasks.
    async fn until_running(tasks: &TaskTracker, count: usize) {
        let running = async {
            while tasks.len() != count {
                crate::timer::sleep(Duration::from_millis(1)).await;
            }
        };
        if crate::timer::timeout(Duration::from_secs(1), running)
            .await
            .is_err()
        {
            panic!("{} tasks running, not {count}", tasks.len());
        }
    }

    #[tokio::test]
    async fn monitors_are_tracked_and_end_with_their_node_or_shutdown() {
        // Nothing listens on these ports: every check fails at once.
        let topology = TopologyHandle::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into()]);
        let pools = Arc::new(Pools::new(crate::config::PoolConfig::default()));
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        tasks.spawn(supervise(
            Arc::new(ArcSwap::from_pointee(settings())),
            Arc::clone(&topology),
            pools,
            tasks.clone(),
            shutdown.clone(),
        ));
        // The supervisor and one monitor per node.
        until_running(&tasks, 3).await;
        topology.set_members(vec![Member {
            addr: "127.0.0.1:1".into(),
            may_be_primary: true,
            may_take_reads: true,
        }]);
        until_running(&tasks, 2).await;
        shutdown.cancel();
        tasks.close();
        crate::timer::timeout(Duration::from_secs(1), tasks.wait())
            .await
            .expect("every task ends on shutdown");
    }
}
