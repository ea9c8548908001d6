//! Events: every state change, broadcast to whoever watches (`Admin.WatchEvents`). The channel holds 1024
//! events; emitting never waits and needs no subscriber, and a watcher that falls further behind learns it
//! missed some.

use std::net::SocketAddr;

use contract::model::{Event, EventKind, ServiceKey};
use tokio::sync::broadcast;
use tracing::info;

use super::{State, Store};

// === impl Store ===

impl Store {
    /// Follows every state change from now on.
    pub fn watch_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub(super) fn emit(&self, event: Event) {
        // No subscriber is fine: events are for whoever watches now.
        let _ = self.events.send(event);
    }

    /// Logs and emits the removal of `backend`, and of its service when it was the last backend.
    pub(super) fn removed(&self, state: &State, service: ServiceKey, backend: SocketAddr, reason: &str, version: u64) {
        info!(%service, %backend, reason, version, "backend removed");
        self.emit(Event::backend(EventKind::BackendRemoved, version, service, backend, reason));
        if !state.registry.services.contains_key(&service) {
            info!(%service, version, "service removed: no backend left, its port closes on every node");
            self.emit(Event::service(EventKind::ServiceRemoved, version, service, "no backend left"));
        }
    }
}
