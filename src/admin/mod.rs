//! HTTP admin port: `GET /health` answers 200 while pgway runs; `GET /topology` is JSON of
//! the nodes (role, health, WAL position at the last check, last known replay position),
//! of how reads under a read-your-writes floor were served, and of how many statements a
//! replica refused as writes (each sent again to the primary). The operations issue adds
//! `/ready` and `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::route::floors::format_lsn;
use crate::route::Router as StatementRouter;
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
}

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(listener: TcpListener, views: Views, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/topology", get(topology))
        .with_state(views);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(cause) = result {
        warn!(%cause, "admin HTTP server stopped");
    }
}

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
    Json(json!({
        "nodes": nodes,
        "read_your_writes": outcomes,
        "replica_retries": views.router.replica_retries(),
    }))
}
