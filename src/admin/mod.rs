//! HTTP admin port: `GET /health` answers 200 while pgway runs. The operations issue adds
//! `/ready`, `/topology` and `/metrics`.

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::topology::TopologyHandle;

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    _topology: Arc<TopologyHandle>,
    shutdown: CancellationToken,
) {
    let app = Router::new().route("/health", get(|| async { "ok\n" }));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(cause) = result {
        warn!(%cause, "admin HTTP server stopped");
    }
}
