//! `Admin`: backend references in, the read model and events out.

use super::{ConvertError, invalid, socket_addr};
use crate::{
    model::{BackendRef, Event, EventKind, FrontendStatus, ServiceKey, StateView},
    v1,
};

impl TryFrom<Option<&v1::BackendRef>> for BackendRef {
    type Error = ConvertError;

    fn try_from(reference: Option<&v1::BackendRef>) -> Result<Self, Self::Error> {
        let reference = reference.ok_or_else(|| invalid("backend", "missing"))?;
        Ok(BackendRef {
            service: ServiceKey::try_from(reference.service.as_ref())?,
            backend: socket_addr("backend", &reference.backend)?,
        })
    }
}

impl From<EventKind> for v1::EventKind {
    fn from(kind: EventKind) -> Self {
        match kind {
            EventKind::BackendRegistered => v1::EventKind::BackendRegistered,
            EventKind::BackendRemoved => v1::EventKind::BackendRemoved,
            EventKind::BackendHealthy => v1::EventKind::BackendHealthy,
            EventKind::BackendUnhealthy => v1::EventKind::BackendUnhealthy,
            EventKind::BackendDraining => v1::EventKind::BackendDraining,
            EventKind::WeightChanged => v1::EventKind::WeightChanged,
            EventKind::ServiceAdded => v1::EventKind::ServiceAdded,
            EventKind::ServiceRemoved => v1::EventKind::ServiceRemoved,
            EventKind::NodeJoined => v1::EventKind::NodeJoined,
            EventKind::NodeLeft => v1::EventKind::NodeLeft,
            EventKind::WarmUpOver => v1::EventKind::WarmUpOver,
            EventKind::AlgorithmChanged => v1::EventKind::AlgorithmChanged,
        }
    }
}

/// An event for `WatchEvents`, with the state at the time it is sent when the watcher asked for it.
pub fn event_message(event: Event, state: Option<StateView>) -> v1::Event {
    v1::Event {
        kind: v1::EventKind::from(event.kind).into(),
        version: event.version,
        service: event.service.map(Into::into),
        backend: event.backend.map(|b| b.to_string()).unwrap_or_default(),
        node: event.node.unwrap_or_default(),
        detail: event.detail,
        state: state.map(Into::into),
    }
}

impl From<StateView> for v1::ListServicesResponse {
    fn from(view: StateView) -> Self {
        let services = view
            .services
            .into_iter()
            .map(|s| v1::ServiceInfo {
                service: Some(s.service.into()),
                algorithm: s.algorithm.to_string(),
                active_connections: s.active_connections,
                backends: s
                    .backends
                    .into_iter()
                    .map(|b| v1::BackendInfo {
                        address: b.address.to_string(),
                        weight: b.weight.get(),
                        healthy: b.healthy,
                        draining: b.draining,
                        active_connections: b.active_connections,
                        total_connections: b.total_connections,
                        registration: b.registration,
                    })
                    .collect(),
            })
            .collect();
        v1::ListServicesResponse { version: view.version, services }
    }
}

impl From<StateView> for v1::ListNodesResponse {
    fn from(view: StateView) -> Self {
        let nodes = view
            .nodes
            .into_iter()
            .map(|n| v1::NodeInfo {
                id: n.id,
                connected: n.connected,
                acked_version: n.acked_version,
                last_seen_ms_ago: n.last_seen_ms_ago,
                address: n.address.map(|a| a.to_string()).unwrap_or_default(),
                frontends: n.frontends.iter().map(|f| (&FrontendStatus::from(f)).into()).collect(),
            })
            .collect();
        v1::ListNodesResponse { version: view.version, nodes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_refs_are_checked() {
        let good = v1::BackendRef { service: Some(ServiceKey::tcp(80).into()), backend: "127.0.0.2:80".into() };
        assert_eq!(BackendRef::try_from(Some(&good)).unwrap().backend, "127.0.0.2:80".parse().unwrap());
        assert_eq!(BackendRef::try_from(None).unwrap_err().what, "backend");
        let bad = v1::BackendRef { backend: "nowhere".into(), ..good };
        assert_eq!(
            BackendRef::try_from(Some(&bad)).unwrap_err().to_string(),
            "invalid backend: \"nowhere\" is not ip:port"
        );
    }
}
