//! Client side: startup, authentication, cancel requests and the per-client session
//! ([`session`], a state machine).

pub mod auth;
pub mod cancel;
pub mod registry;
pub mod session;
pub mod startup;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use tokio_util::sync::CancellationToken;

use crate::backend::Pools;
use crate::config::{Config, UserConfig};
use crate::route::floors::Floors;
use crate::route::Router;
use crate::settings::Settings;
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
    /// What a reload swaps besides the fields above.
    pub reloader: crate::reload::Reloader,
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
