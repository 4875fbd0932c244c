//! Client side: startup, authentication, cancel requests and the per-client session
//! ([`session`], a state machine).

pub mod auth;
pub mod auth_query;
pub mod cancel;
pub mod registry;
pub mod session;
pub mod startup;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use tokio_util::sync::CancellationToken;

use crate::backend::Pools;
use crate::config::{Config, UserConfig};
use crate::route::floors::Floors;
use crate::route::Router;
use crate::settings::Settings;
use crate::sync::lock;
use crate::topology::replay::ReplayPositions;
use crate::topology::TopologyHandle;
use auth::ScramVerifier;
use cancel::CancelRegistry;

/// A configured user with its derived SCRAM verifier.
#[derive(Debug)]
pub struct User {
    /// The `[[users]]` entry.
    pub config: UserConfig,
    /// Derived once at start-up.
    pub verifier: ScramVerifier,
}

/// Client connections per user, for `max_connections` in `[[users]]`.
#[derive(Debug, Default)]
pub struct PerUser(Mutex<HashMap<String, usize>>);

impl PerUser {
    /// Counts a client of `user` while the slot lives; `None` if `limit` of them are
    /// connected already.
    pub fn enter(self: &Arc<Self>, user: &str, limit: Option<usize>) -> Option<UserSlot> {
        let mut counts = lock(&self.0);
        let count = counts.entry(user.to_owned()).or_default();
        if limit.is_some_and(|limit| *count >= limit) {
            return None;
        }
        *count += 1;
        Some(UserSlot {
            counts: Arc::clone(self),
            user: user.to_owned(),
        })
    }
}

/// One client of a user, counted until dropped.
#[derive(Debug)]
pub struct UserSlot {
    counts: Arc<PerUser>,
    user: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts.0);
        if let Some(count) = counts.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

/// (database, user, hash of the startup settings).
pub type GreetingKey = (String, String, u64);

/// What every client task shares.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force, swapped whole by a reload: read it with `load()` where
    /// it is used rather than keeping a copy, so the next use sees the reloaded one.
    pub config: ArcSwap<Config>,
    /// Users by name, swapped whole by a reload.
    pub users: ArcSwap<HashMap<String, User>>,
    /// Server pools.
    pub pools: Arc<Pools>,
    /// Current topology.
    pub topology: Arc<TopologyHandle>,
    /// Statement routing.
    pub router: Arc<Router>,
    /// Cancel keys handed out to clients.
    pub cancels: CancelRegistry,
    /// Cancelled when pgway is stopping.
    pub shutdown: CancellationToken,
    /// Cancelled when the drain deadline (`shutdown_timeout`) passes: clients still inside
    /// a transaction are told 57P01 and closed.
    pub hard_stop: CancellationToken,
    /// What new clients are greeted with, per (database, user, startup settings hash).
    pub greetings: moka::sync::Cache<GreetingKey, Arc<Greeting>>,
    /// Read-your-writes floors by scope.
    pub floors: Arc<Floors>,
    /// Replay positions of replicas, for reads under a floor.
    pub replay: Arc<ReplayPositions>,
    /// The result cache, when `cache.enabled`.
    pub cache: Option<Arc<crate::cache::ResultCache>>,
    /// What clients are offered after an SSLRequest (`[client.tls]`), swappable.
    pub client_tls: Arc<crate::net::tls::ClientTls>,
    /// What health checks and replay probes log in with, swapped by a reload.
    pub health: crate::topology::health::LiveHealth,
    /// Client connections per user.
    pub per_user: Arc<PerUser>,
    /// Look-ups of users not in `[[users]]`, when `[auth_query]` is set.
    pub auth_query: auth_query::AuthQuery,
    /// What a reload swaps besides the fields above.
    pub reloader: crate::reload::Reloader,
    /// `busy_poll`, as the workers read it.
    pub busy_poll: Arc<crate::workers::BusyPoll>,
    /// Which workers take sessions (`workers` of them at most), and their sessions.
    pub placement: Arc<crate::workers::Placement>,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Connected clients and the `PAUSE` gate, for the admin console.
    pub clients: Arc<registry::Clients>,
}

/// A cached greeting: the ParameterStatus values for clients with these startup settings,
/// and the settings themselves, which such clients then share (so comparing a client's
/// settings with a connection's is mostly a pointer comparison).
#[derive(Debug)]
pub struct Greeting {
    /// ParameterStatus name and value pairs.
    pub params: Vec<(String, String)>,
    /// The startup settings they were learned with.
    pub settings: Settings,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_limit_counts_connected_clients_only() {
        let per_user = Arc::new(PerUser::default());
        let first = per_user.enter("app", Some(2)).expect("1 of 2");
        let second = per_user.enter("app", Some(2)).expect("2 of 2");
        assert!(
            per_user.enter("app", Some(2)).is_none(),
            "a third is refused"
        );
        assert!(per_user.enter("other", Some(1)).is_some(), "per user");
        drop(first);
        let _third = per_user.enter("app", Some(2)).expect("a slot came free");
        drop(second);
        assert!(per_user.enter("app", None).is_some(), "no limit");
    }
}
