//! The admin HTTP server: `GET /api/state` returns the whole state as JSON, `GET /api/events?after=N` the
//! latest events, `GET /metrics` the Prometheus series, and `GET /` the dashboard, a page compiled into
//! the binary that polls the first two. The data endpoints are behind the admin token when one is set; the
//! page itself is not (it holds no data, and asks for the token).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::header,
    middleware,
    response::{Html, IntoResponse, Response},
    routing::get,
};
use contract::{model::StateView, process::stopped};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    auth::{Guard, http_guard},
    in_flight::{Connection, track},
    listener::CappedListener,
};
use crate::{
    error::ControllerError,
    store::{Store, events::RecentEvent},
};

/// The dashboard: one self-contained page (markup, style and script), nothing loaded from elsewhere.
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The registry.
    pub store: Arc<Store>,
    /// The process's metrics.
    pub registry: Arc<Registry>,
}

/// Serves the admin endpoints, the data ones behind `guard`, until `shutdown` turns true.
pub async fn serve(
    listener: CappedListener,
    state: AdminState,
    guard: Guard,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ControllerError> {
    let app = Router::new()
        .route("/api/state", get(view))
        .route("/api/events", get(events))
        .route("/metrics", get(dataplane::metrics_endpoint).with_state(Arc::clone(&state.registry)))
        .layer(middleware::from_fn_with_state(guard, http_guard))
        .route("/", get(dashboard))
        .with_state(state)
        // Counts each connection's requests in flight: a connection without one is closed after its
        // door's timeouts, and is the first to make room when the door is full.
        .layer(middleware::from_fn(track));
    axum::serve(listener, app.into_make_service_with_connect_info::<Connection>())
        .with_graceful_shutdown(async move { stopped(&mut shutdown).await })
        .await
        .map_err(ControllerError::Admin)
}

async fn view(State(admin): State<AdminState>) -> Json<StateView> {
    Json(admin.store.view())
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Only events numbered above this.
    #[serde(default)]
    after: u64,
}

#[derive(Serialize)]
struct EventsView {
    /// The number of the latest event (poll again with `after` set to it).
    last: u64,
    events: Vec<RecentEvent>,
}

async fn events(State(admin): State<AdminState>, Query(query): Query<EventsQuery>) -> Json<EventsView> {
    let (events, last) = admin.store.recent_events(query.after);
    Json(EventsView { last, events })
}

async fn dashboard() -> Response {
    // The page runs no script from elsewhere and may not be framed.
    let headers = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, Html(DASHBOARD)).into_response()
}
