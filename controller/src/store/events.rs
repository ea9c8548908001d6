//! Events: every state change, broadcast to whoever watches (`Admin.WatchEvents`). The channel holds 1024
//! events; emitting never waits and needs no subscriber, and a watcher that falls further behind learns it
//! missed some. The latest [`RECENT_KEPT`] are also kept, numbered, for pollers (`/api/events`, the
//! dashboard).

use std::{collections::VecDeque, net::SocketAddr, time::SystemTime};

use contract::model::{Event, EventKind, ServiceKey};
use serde::Serialize;
use tokio::sync::broadcast;
use tracing::info;

use super::{State, Store};

/// Events kept for pollers.
pub const RECENT_KEPT: usize = 200;

/// The latest events.
#[derive(Debug, Default)]
pub struct Recent {
    last: u64,
    events: VecDeque<RecentEvent>,
}

/// One of the latest events, numbered from 1 in the order emitted.
#[derive(Debug, Clone, Serialize)]
pub struct RecentEvent {
    /// Its number.
    pub seq: u64,
    /// When it was emitted, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

// === impl Store ===

impl Store {
    /// Follows every state change from now on.
    pub fn watch_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The kept events numbered above `after`, oldest first, and the number of the latest one.
    pub fn recent_events(&self, after: u64) -> (Vec<RecentEvent>, u64) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        (recent.events.iter().filter(|e| e.seq > after).cloned().collect(), recent.last)
    }

    pub(super) fn emit(&self, event: Event) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent.last += 1;
            if recent.events.len() == RECENT_KEPT {
                recent.events.pop_front();
            }
            let at_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let seq = recent.last;
            recent.events.push_back(RecentEvent { seq, at_ms, event: event.clone() });
        }
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
