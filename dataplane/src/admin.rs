//! The node's admin HTTP server: `GET /api/state` returns what the node serves, its frontends, its
//! per-backend counts and whether it follows a controller.

use std::net::SocketAddr;

use axum::{Json, Router, extract::State, routing::get};
use contract::model::{FrontendView, ServiceKey, ServiceSpec};
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{node::NodeHandle, relay::pump::PumpStats, sync::SyncStatus};

/// What `/api/state` reads.
#[derive(Clone)]
struct AdminState {
    node_id: String,
    controller: String,
    node: NodeHandle,
    sync: watch::Receiver<SyncStatus>,
}

/// The body of a node's `/api/state`.
#[derive(Serialize)]
struct NodeStateView {
    node_id: String,
    controller: String,
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

/// Serves `/api/state` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    node_id: String,
    controller: String,
    node: NodeHandle,
    sync: watch::Receiver<SyncStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let state = AdminState { node_id, controller, node, sync };
    let app = Router::new().route("/api/state", get(state_view)).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { contract::process::stopped(&mut shutdown).await })
        .await
}

async fn state_view(State(admin): State<AdminState>) -> Json<NodeStateView> {
    let node = admin.node.state();
    let sync = admin.sync.borrow().clone();
    Json(NodeStateView {
        node_id: admin.node_id,
        controller: admin.controller,
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
