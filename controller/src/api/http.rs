//! The admin HTTP server: `GET /api/state` returns the whole state as JSON.

use std::sync::Arc;

use axum::{Json, Router, extract::State, middleware, routing::get};
use contract::{model::StateView, process::stopped};
use tokio::sync::watch;

use super::{
    auth::{Guard, http_guard},
    listener::CappedListener,
};
use crate::{error::ControllerError, store::Store};

/// Serves the admin endpoints, each behind `guard`, until `shutdown` turns true.
pub async fn serve(
    listener: CappedListener,
    store: Arc<Store>,
    guard: Guard,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ControllerError> {
    let app = Router::new()
        .route("/api/state", get(state))
        .with_state(store)
        .layer(middleware::from_fn_with_state(guard, http_guard));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stopped(&mut shutdown).await })
        .await
        .map_err(ControllerError::Admin)
}

async fn state(State(store): State<Arc<Store>>) -> Json<StateView> {
    Json(store.view())
}
