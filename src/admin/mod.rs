//! HTTP admin port: `GET /health` answers 200 while pgway runs; `GET /topology` is JSON of
//! the nodes (role, health, WAL position at the last check, last known replay position),
//! of where they come from (`source`: `static` or `etcd`, with the etcd watch's state), of
//! how reads under a read-your-writes floor were served, and of how many statements a
//! replica refused as writes (each sent again to the primary); `/ready` says whether
//! pgway can serve and what is degraded; `/cache` and `/metrics` give the counters.
//!
//! [`console`] is the other admin surface: database `pgway` on the client port.

pub mod console;

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;

use crate::backend::Pools;
use crate::cache::{ResultCache, StreamState};
use crate::metrics::{self, Metrics, Sources};
use crate::route::floors::format_lsn;
use crate::route::Router as StatementRouter;
use crate::topology::patroni::{WatchReport, WatchState};
use crate::topology::replay::ReplayPositions;
use crate::topology::{Role, TopologyHandle};

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct Views {
    /// The topology.
    pub topology: Arc<TopologyHandle>,
    /// Replay positions and read-your-writes outcomes.
    pub replay: Arc<ReplayPositions>,
    /// Routing counters.
    pub router: Arc<StatementRouter>,
    /// The result cache, when it is on.
    pub cache: Option<Arc<ResultCache>>,
    /// pgway's own counters.
    pub metrics: Arc<Metrics>,
    /// Server connection pools.
    pub pools: Arc<Pools>,
    /// Which workers take sessions, and their sessions.
    pub placement: Arc<crate::workers::Placement>,
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(listener: TcpListener, views: Views, shutdown: CancellationToken) {
    let registry = Arc::new(metrics::registry(Sources {
        metrics: Arc::clone(&views.metrics),
        replay: Arc::clone(&views.replay),
        router: Arc::clone(&views.router),
        pools: Arc::clone(&views.pools),
        cache: views.cache.clone(),
        placement: Arc::clone(&views.placement),
    }));
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/topology", get(topology))
        .route("/cache", get(cache))
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move { prometheus(&registry) }
            }),
        )
        .with_state(views);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(cause) = result {
        warn!(%cause, "admin HTTP server stopped");
    }
}

/// `/metrics`: the Prometheus (OpenMetrics) text.
fn prometheus(registry: &Registry) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics could not be encoded\n".to_owned(),
        ),
    }
}

/// `/ready`: 200 while pgway can serve (it knows its nodes and reaches at least one, so
/// reads flow and writes wait through a failover), 503 before that or when no node is
/// reachable. The body names what is degraded (no primary, etcd unreachable: the
/// topology last learned keeps serving, a cache stream down).
async fn ready(State(views): State<Views>) -> impl IntoResponse {
    let snapshot = views.topology.snapshot();
    let reachable = snapshot.nodes.iter().filter(|n| n.healthy).count();
    let mut degraded = Vec::new();
    if snapshot.primary().is_none() {
        degraded.push("no primary".to_owned());
    }
    if views.topology.etcd().state() == WatchState::Unreachable {
        degraded.push("etcd unreachable".to_owned());
    }
    if let Some(cache) = &views.cache {
        for db in cache.dbs() {
            let state = db.state();
            if matches!(state, StreamState::Down | StreamState::NotLogical) {
                degraded.push(format!("cache stream for {} {}", db.name(), state.name()));
            }
        }
    }
    let status = if reachable == 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    // Not ready: the reason, then anything else degraded except the missing primary (no
    // node at all implies it).
    let also: String = degraded
        .iter()
        .filter(|d| *d != "no primary")
        .map(|d| format!("; {d}"))
        .collect();
    let body = match (reachable, degraded.is_empty()) {
        (0, _) if snapshot.nodes.is_empty() => format!("not ready: no topology yet{also}\n"),
        (0, _) => format!("not ready: no node is reachable{also}\n"),
        (_, true) => "ready\n".to_owned(),
        (_, false) => format!("ready, degraded: {}\n", degraded.join("; ")),
    };
    (status, body)
}

/// `/topology`: the source (`static`, or `etcd` with its watch), the nodes, and routing's
/// read-your-writes and replica-retry counters.
async fn topology(State(views): State<Views>) -> Json<Value> {
    let snapshot = views.topology.snapshot();
    let nodes: Vec<Value> = snapshot
        .nodes
        .iter()
        .map(|node| {
            let replay = views.replay.known(&node.addr);
            json!({
                "addr": &*node.addr,
                "role": match node.role {
                    Role::Primary => "primary",
                    Role::Replica => "replica",
                    Role::Unknown => "unknown",
                },
                "healthy": node.healthy,
                "lsn": node.lsn.map(format_lsn),
                "replay_lsn": (replay > 0).then(|| format_lsn(replay)),
                "may_be_primary": node.may_be_primary,
                "may_take_reads": node.may_take_reads,
            })
        })
        .collect();
    let outcomes: serde_json::Map<String, Value> = views
        .replay
        .outcomes()
        .into_iter()
        .map(|(name, count)| (name.to_owned(), json!(count)))
        .collect();
    let etcd = views.topology.etcd().report();
    let (source, etcd) = match etcd.state {
        WatchState::Off => ("static", Value::Null),
        _ => ("etcd", watch_json(&etcd)),
    };
    Json(json!({
        "source": source,
        "etcd": etcd,
        "nodes": nodes,
        "read_your_writes": outcomes,
        "replica_retries": views.router.replica_retries(),
        "recovery_conflict_retries": views.router.conflict_retries(),
        "cache_streams": views.cache.as_deref().map(streams),
    }))
}

/// The etcd watch: endpoints, state, whole seconds in it, last error, last revision seen.
fn watch_json(report: &WatchReport) -> Value {
    json!({
        "endpoints": report.endpoints,
        "state": report.state.name(),
        "since": report.since.as_secs(),
        "last_error": report.last_error,
        "revision": report.revision,
    })
}

/// The result cache's counters and its invalidation streams.
async fn cache(State(views): State<Views>) -> Json<Value> {
    let Some(cache) = views.cache.as_deref() else {
        return Json(json!({ "enabled": false }));
    };
    let (entries, bytes) = cache.size();
    let stats = cache.stats();
    let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "enabled": true,
        "entries": entries,
        "bytes": bytes,
        "hits": count(&stats.hits),
        "misses": count(&stats.misses),
        "bypassed": count(&stats.bypassed),
        "fills": count(&stats.fills),
        "fills_refused": count(&stats.fills_refused),
        "evictions": count(&stats.evictions),
        "invalidations": count(&stats.invalidations),
        "streams": streams(cache),
    }))
}

/// Each database's invalidation stream: state, slot, position decoded.
fn streams(cache: &ResultCache) -> Value {
    let mut dbs = cache.dbs();
    dbs.sort_by(|a, b| a.name().cmp(b.name()));
    dbs.iter()
        .map(|db| {
            json!({
                "database": db.name(),
                "state": db.state().name(),
                "slot": db.slot(),
                "position": format_lsn(db.position()),
            })
        })
        .collect()
}
