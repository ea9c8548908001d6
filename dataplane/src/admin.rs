//! The node's admin HTTP server: `GET /api/state` returns what the node serves, its frontends, its
//! per-backend counts and whether it follows a controller; `GET /metrics` its Prometheus series. With
//! `--admin-token`, both need `authorization: Bearer <token>`.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use contract::{
    auth::Token,
    model::{FrontendView, ServiceKey, ServiceSpec},
};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{node::NodeHandle, relay::pump::PumpStats, sync::SyncStatus};

/// What `/api/state` reads.
#[derive(Clone)]
struct AdminState {
    node_id: String,
    controllers: Vec<String>,
    node: NodeHandle,
    sync: watch::Receiver<SyncStatus>,
}

/// The body of a node's `/api/state`.
#[derive(Serialize)]
struct NodeStateView {
    node_id: String,
    /// The controller it follows now (or tries next).
    controller: String,
    /// Every controller it may follow, in order.
    controllers: Vec<String>,
    connected: bool,
    last_error: Option<String>,
    version: u64,
    warming_up: bool,
    services: Vec<ServiceSpec>,
    frontends: Vec<FrontendView>,
    backends: Vec<LoadView>,
    /// Microseconds the last snapshot took to apply.
    last_apply_us: u64,
    /// Data-path worker threads.
    workers: usize,
    /// What the TCP relay moved, by splice or by copy.
    relay: PumpStats,
}

#[derive(Serialize)]
struct LoadView {
    #[serde(flatten)]
    service: ServiceKey,
    backend: SocketAddr,
    active_connections: u64,
    total_connections: u64,
    /// The other nodes' connections to it, as the controller last told.
    remote_connections: u64,
}

/// What the admin server serves besides the node itself.
pub struct AdminSettings {
    /// The node's name.
    pub node_id: String,
    /// The controllers it may follow, in order.
    pub controllers: Vec<String>,
    /// The process's metrics.
    pub registry: Arc<Registry>,
    /// Required of every request when set.
    pub token: Option<Token>,
}

/// Serves `/api/state` and `/metrics` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    settings: AdminSettings,
    node: NodeHandle,
    sync: watch::Receiver<SyncStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let AdminSettings { node_id, controllers, registry, token } = settings;
    let state = AdminState { node_id, controllers, node, sync };
    let app = Router::new()
        .route("/api/state", get(state_view))
        .with_state(state)
        .route("/metrics", get(metrics).with_state(registry))
        .layer(middleware::from_fn_with_state(token.map(Arc::new), require_token));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { contract::process::stopped(&mut shutdown).await })
        .await
}

/// `GET /metrics`: the Prometheus text format, or OpenMetrics when the scraper asks for it.
pub async fn metrics(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = contract::metrics::exposition(&registry, accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// With a token, every request must present it.
async fn require_token(State(token): State<Option<Arc<Token>>>, request: Request, next: Next) -> Response {
    let presented = request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    match token {
        Some(token) if !presented.is_some_and(|header| token.matches(header)) => {
            let body = Json(serde_json::json!({
                "error": "missing or wrong bearer token: this node needs `authorization: Bearer <--admin-token>`"
            }));
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        }
        _ => next.run(request).await,
    }
}

async fn state_view(State(admin): State<AdminState>) -> Json<NodeStateView> {
    let node = admin.node.state();
    let sync = admin.sync.borrow().clone();
    Json(NodeStateView {
        node_id: admin.node_id,
        controller: if sync.controller.is_empty() {
            admin.controllers.first().cloned().unwrap_or_default()
        } else {
            sync.controller.clone()
        },
        controllers: admin.controllers,
        connected: sync.connected,
        last_error: sync.last_error,
        version: node.snapshot.version,
        warming_up: node.snapshot.warming_up,
        services: node.snapshot.services.values().cloned().collect(),
        frontends: node.frontends.iter().map(FrontendView::from).collect(),
        backends: admin
            .node
            .load()
            .into_iter()
            .map(|(l, remote)| LoadView {
                service: l.service,
                backend: l.backend,
                active_connections: l.active,
                total_connections: l.total,
                remote_connections: remote,
            })
            .collect(),
        last_apply_us: u64::try_from(node.apply_time.as_micros()).unwrap_or(u64::MAX),
        workers: admin.node.workers(),
        relay: admin.node.pump_stats(),
    })
}
