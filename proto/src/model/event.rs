//! State-change events, as `Admin.WatchEvents` streams them.

use std::net::SocketAddr;

use serde::Serialize;

use super::ServiceKey;

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// Snapshot version after the change.
    pub version: u64,
    /// The service concerned.
    pub service: Option<ServiceKey>,
    /// The backend concerned.
    pub backend: Option<SocketAddr>,
    /// The node concerned.
    pub node: Option<String>,
    /// A removal's reason, a new weight.
    pub detail: String,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A backend joined a service (or moved to a new registration).
    BackendRegistered,
    /// A backend left its service.
    BackendRemoved,
    /// Back in rotation after its registration reported it healthy.
    BackendHealthy,
    /// Out of rotation, still registered.
    BackendUnhealthy,
    /// Drained by an operator.
    BackendDraining,
    /// Its weight changed.
    WeightChanged,
    /// A service got its first backend.
    ServiceAdded,
    /// A service lost its last backend.
    ServiceRemoved,
    /// A node connected.
    NodeJoined,
    /// A node disconnected.
    NodeLeft,
    /// The warm-up window ended.
    WarmUpOver,
    /// A service's balancing algorithm changed.
    AlgorithmChanged,
}

// === impl Event ===

impl Event {
    /// A change of one backend.
    pub fn backend(kind: EventKind, version: u64, service: ServiceKey, backend: SocketAddr, detail: &str) -> Self {
        Event { kind, version, service: Some(service), backend: Some(backend), node: None, detail: detail.to_owned() }
    }

    /// A change of one service.
    pub fn service(kind: EventKind, version: u64, service: ServiceKey, detail: &str) -> Self {
        Event { kind, version, service: Some(service), backend: None, node: None, detail: detail.to_owned() }
    }

    /// A node joined or left.
    pub fn node(kind: EventKind, version: u64, node: &str) -> Self {
        Event { kind, version, service: None, backend: None, node: Some(node.to_owned()), detail: String::new() }
    }

    /// A change of the whole controller (the end of warm-up).
    pub fn controller(kind: EventKind, version: u64) -> Self {
        Event { kind, version, service: None, backend: None, node: None, detail: String::new() }
    }
}
