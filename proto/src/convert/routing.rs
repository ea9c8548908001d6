//! `Dataplane.Sync`: snapshots out, bind results and load reports back, cluster-wide counts out.

use std::{collections::BTreeMap, net::IpAddr};

use super::{ConvertError, invalid, socket_addr};
use crate::{
    model::{
        Algorithm, BackendLoad, BackendSpec, FrontendAddresses, FrontendStatus, NodeHello, NodeReport, ProxyProtocol,
        RoutingDelta, RoutingSnapshot, ServiceKey, ServiceSpec, Weight,
    },
    v1,
};

impl From<&ServiceSpec> for v1::ServiceSpec {
    fn from(spec: &ServiceSpec) -> Self {
        v1::ServiceSpec {
            service: Some(spec.key.into()),
            algorithm: spec.algorithm.to_string(),
            send_proxy_v2: spec.proxy.send_v2,
            accept_proxy: spec.proxy.accept,
            backends: spec
                .backends
                .iter()
                .map(|b| v1::BackendSpec { address: b.address.to_string(), weight: b.weight.get() })
                .collect(),
        }
    }
}

impl TryFrom<&v1::ServiceSpec> for ServiceSpec {
    type Error = ConvertError;

    fn try_from(s: &v1::ServiceSpec) -> Result<Self, Self::Error> {
        let key = ServiceKey::try_from(s.service.as_ref())?;
        // A controller newer than this node may name an algorithm it does not know: keep serving the
        // service, round robin, rather than refusing the whole snapshot.
        let algorithm: Algorithm = s.algorithm.parse().unwrap_or_else(|_| {
            tracing::warn!(service = %key, algorithm = %s.algorithm, "unknown algorithm; using round_robin");
            Algorithm::RoundRobin
        });
        let backends = s
            .backends
            .iter()
            // A weight out of range is brought into it (an older controller sent 0 for "unset"), as
            // nodes always did, rather than refusing the whole snapshot.
            .map(|b| {
                let address = socket_addr("backend address", &b.address)?;
                Ok(BackendSpec { address, weight: Weight::clamped(b.weight.into()) })
            })
            .collect::<Result<_, ConvertError>>()?;
        let proxy = ProxyProtocol { send_v2: s.send_proxy_v2, accept: s.accept_proxy };
        Ok(ServiceSpec { key, algorithm, proxy, backends })
    }
}

impl From<&RoutingSnapshot> for v1::Snapshot {
    fn from(snapshot: &RoutingSnapshot) -> Self {
        v1::Snapshot {
            version: snapshot.version,
            services: snapshot.services.values().map(Into::into).collect(),
            warming_up: snapshot.warming_up,
            retired: snapshot.retired.iter().map(|&k| k.into()).collect(),
        }
    }
}

impl TryFrom<v1::Snapshot> for RoutingSnapshot {
    type Error = ConvertError;

    fn try_from(snapshot: v1::Snapshot) -> Result<Self, Self::Error> {
        let services = snapshot
            .services
            .iter()
            .map(|s| ServiceSpec::try_from(s).map(|spec| (spec.key, spec)))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let retired = snapshot.retired.iter().map(|k| ServiceKey::try_from(Some(k))).collect::<Result<_, _>>()?;
        Ok(RoutingSnapshot { version: snapshot.version, services, warming_up: snapshot.warming_up, retired })
    }
}

impl From<&RoutingDelta> for v1::SnapshotDelta {
    fn from(delta: &RoutingDelta) -> Self {
        v1::SnapshotDelta {
            base_version: delta.base_version,
            version: delta.version,
            services: delta.services.iter().map(Into::into).collect(),
            removed: delta.removed.iter().map(|&k| k.into()).collect(),
            warming_up: delta.warming_up,
            retired: delta.retired.iter().map(|&k| k.into()).collect(),
        }
    }
}

impl TryFrom<v1::SnapshotDelta> for RoutingDelta {
    type Error = ConvertError;

    fn try_from(delta: v1::SnapshotDelta) -> Result<Self, Self::Error> {
        let key = |k: &v1::ServiceKey| ServiceKey::try_from(Some(k));
        Ok(RoutingDelta {
            base_version: delta.base_version,
            version: delta.version,
            services: delta.services.iter().map(ServiceSpec::try_from).collect::<Result<_, _>>()?,
            removed: delta.removed.iter().map(key).collect::<Result<_, _>>()?,
            warming_up: delta.warming_up,
            retired: delta.retired.iter().map(key).collect::<Result<_, _>>()?,
        })
    }
}

impl From<&FrontendStatus> for v1::FrontendResult {
    fn from(status: &FrontendStatus) -> Self {
        let result = match &status.result {
            Ok(addr) => v1::frontend_result::Result::Listening(addr.to_string()),
            Err(error) => v1::frontend_result::Result::Error(error.clone()),
        };
        v1::FrontendResult { service: Some(status.service.into()), result: Some(result) }
    }
}

impl TryFrom<&v1::FrontendResult> for FrontendStatus {
    type Error = ConvertError;

    fn try_from(result: &v1::FrontendResult) -> Result<Self, Self::Error> {
        let service = ServiceKey::try_from(result.service.as_ref())?;
        let result = match &result.result {
            Some(v1::frontend_result::Result::Listening(addr)) => Ok(socket_addr("listening address", addr)?),
            Some(v1::frontend_result::Result::Error(error)) => Err(error.clone()),
            None => return Err(invalid("frontend result", "neither listening nor error")),
        };
        Ok(FrontendStatus { service, result })
    }
}

impl From<&BackendLoad> for v1::BackendLoad {
    fn from(load: &BackendLoad) -> Self {
        v1::BackendLoad {
            service: Some(load.service.into()),
            backend: load.backend.to_string(),
            active: load.active,
            total: load.total,
            failing: load.failing,
            reported_load_permille: load.reported,
        }
    }
}

impl TryFrom<&v1::BackendLoad> for BackendLoad {
    type Error = ConvertError;

    fn try_from(load: &v1::BackendLoad) -> Result<Self, Self::Error> {
        Ok(BackendLoad {
            service: ServiceKey::try_from(load.service.as_ref())?,
            backend: socket_addr("backend", &load.backend)?,
            active: load.active,
            total: load.total,
            failing: load.failing,
            reported: load.reported_load_permille,
        })
    }
}

impl From<&NodeReport> for v1::NodeMessage {
    fn from(report: &NodeReport) -> Self {
        let msg = match report {
            NodeReport::Applied { version, frontends } => v1::node_message::Msg::Ack(v1::SnapshotAck {
                version: *version,
                frontends: frontends.iter().map(Into::into).collect(),
                partial: false,
                closed: Vec::new(),
            }),
            NodeReport::AppliedChanges { version, changed, closed } => v1::node_message::Msg::Ack(v1::SnapshotAck {
                version: *version,
                frontends: changed.iter().map(Into::into).collect(),
                partial: true,
                closed: closed.iter().map(|&k| k.into()).collect(),
            }),
            NodeReport::Load(rows) => {
                v1::node_message::Msg::Load(v1::LoadReport { backends: rows.iter().map(Into::into).collect() })
            }
        };
        v1::NodeMessage { msg: Some(msg) }
    }
}

impl TryFrom<v1::SnapshotAck> for NodeReport {
    type Error = ConvertError;

    fn try_from(ack: v1::SnapshotAck) -> Result<Self, Self::Error> {
        let frontends = ack.frontends.iter().map(FrontendStatus::try_from).collect::<Result<_, _>>()?;
        if !ack.partial {
            return Ok(NodeReport::Applied { version: ack.version, frontends });
        }
        let closed = ack.closed.iter().map(|k| ServiceKey::try_from(Some(k))).collect::<Result<_, _>>()?;
        Ok(NodeReport::AppliedChanges { version: ack.version, changed: frontends, closed })
    }
}

impl TryFrom<v1::LoadReport> for NodeReport {
    type Error = ConvertError;

    fn try_from(load: v1::LoadReport) -> Result<Self, Self::Error> {
        Ok(NodeReport::Load(load.backends.iter().map(BackendLoad::try_from).collect::<Result<_, _>>()?))
    }
}

/// Largest version a node may claim to know: far beyond any real history (a change per microsecond for
/// a century), far enough below `u64::MAX` that versions never wrap.
pub const MAX_KNOWN_VERSION: u64 = 1 << 62;

impl TryFrom<&v1::NodeHello> for NodeHello {
    type Error = ConvertError;

    fn try_from(hello: &v1::NodeHello) -> Result<Self, Self::Error> {
        if hello.node_id.trim().is_empty() {
            return Err(invalid("node_id", "must not be empty"));
        }
        if hello.known_version > MAX_KNOWN_VERSION {
            return Err(invalid("known_version", format!("{} is not plausible", hello.known_version)));
        }
        if hello.frontend_addresses.len() > FrontendAddresses::MAX {
            return Err(invalid("frontend_addresses", format!("more than {} addresses", FrontendAddresses::MAX)));
        }
        let addresses = hello
            .frontend_addresses
            .iter()
            .map(|a| a.parse().map_err(|_| invalid("frontend_addresses", format!("{a:?} is not an IP address"))))
            .collect::<Result<Vec<IpAddr>, _>>()?;
        let frontends_on = (!addresses.is_empty() || hello.frontend_wildcard)
            .then_some(FrontendAddresses { addresses, wildcard: hello.frontend_wildcard });
        Ok(NodeHello {
            node_id: hello.node_id.clone(),
            known_version: hello.known_version,
            accepts_deltas: hello.accepts_deltas,
            frontends_on,
        })
    }
}

impl From<&NodeHello> for v1::NodeMessage {
    fn from(hello: &NodeHello) -> Self {
        let frontends_on = hello.frontends_on.clone().unwrap_or_default();
        let hello = v1::NodeHello {
            node_id: hello.node_id.clone(),
            known_version: hello.known_version,
            accepts_deltas: hello.accepts_deltas,
            frontend_addresses: frontends_on.addresses.iter().map(ToString::to_string).collect(),
            frontend_wildcard: frontends_on.wildcard,
        };
        v1::NodeMessage { msg: Some(v1::node_message::Msg::Hello(hello)) }
    }
}

/// A snapshot, as the controller sends it on a `Sync` stream.
pub fn snapshot_message(snapshot: &RoutingSnapshot) -> v1::ControllerMessage {
    v1::ControllerMessage { msg: Some(v1::controller_message::Msg::Snapshot(snapshot.into())) }
}

/// The changes from one snapshot to the next, as the controller sends them to a node that accepts them.
pub fn delta_message(delta: &RoutingDelta) -> v1::ControllerMessage {
    v1::ControllerMessage { msg: Some(v1::controller_message::Msg::Delta(delta.into())) }
}

/// The other nodes' counts, as the controller sends them to one node.
pub fn cluster_load_message(rows: &[BackendLoad]) -> v1::ControllerMessage {
    let backends = rows.iter().map(Into::into).collect();
    v1::ControllerMessage { msg: Some(v1::controller_message::Msg::ClusterLoad(v1::ClusterLoad { backends })) }
}

/// The rows of a cluster-wide count a node can use; a row it cannot read counts as no connection elsewhere.
pub fn cluster_load(load: &v1::ClusterLoad) -> Vec<BackendLoad> {
    load.backends.iter().filter_map(|row| BackendLoad::try_from(row).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_and_reports_survive_the_wire() {
        let key = ServiceKey::udp(53);
        let spec = ServiceSpec {
            key,
            algorithm: Algorithm::RoundRobin,
            proxy: ProxyProtocol { send_v2: true, accept: false },
            backends: vec![BackendSpec { address: "127.0.0.2:5353".parse().unwrap(), weight: Weight::new(3).unwrap() }],
        };
        let snapshot = RoutingSnapshot {
            version: 42,
            services: [(key, spec)].into(),
            warming_up: true,
            retired: [ServiceKey::tcp(80)].into(),
        };
        assert_eq!(RoutingSnapshot::try_from(v1::Snapshot::from(&snapshot)).unwrap(), snapshot);
        let delta = snapshot.delta_from(&RoutingSnapshot { version: 41, ..Default::default() });
        let Some(v1::controller_message::Msg::Delta(wire)) = delta_message(&delta).msg else { panic!() };
        assert_eq!(RoutingDelta::try_from(wire).unwrap(), delta);

        let report = NodeReport::Applied {
            version: 42,
            frontends: vec![
                FrontendStatus { service: key, result: Ok("0.0.0.0:53".parse().unwrap()) },
                FrontendStatus { service: ServiceKey::tcp(80), result: Err("bind 0.0.0.0:80: denied".into()) },
            ],
        };
        let Some(v1::node_message::Msg::Ack(ack)) = v1::NodeMessage::from(&report).msg else { panic!() };
        assert_eq!(NodeReport::try_from(ack).unwrap(), report);
        let changes = NodeReport::AppliedChanges {
            version: 43,
            changed: vec![FrontendStatus { service: key, result: Ok("0.0.0.0:53".parse().unwrap()) }],
            closed: vec![ServiceKey::tcp(80)],
        };
        let Some(v1::node_message::Msg::Ack(ack)) = v1::NodeMessage::from(&changes).msg else { panic!() };
        assert!(ack.partial);
        assert_eq!(NodeReport::try_from(ack).unwrap(), changes);

        let frontends_on = Some(FrontendAddresses { addresses: vec!["127.0.0.2".parse().unwrap()], wildcard: false });
        let hello = NodeHello { node_id: "n1".into(), known_version: 7, accepts_deltas: true, frontends_on };
        let Some(v1::node_message::Msg::Hello(wire)) = v1::NodeMessage::from(&hello).msg else { panic!() };
        assert_eq!(NodeHello::try_from(&wire), Ok(hello));
        let forged = v1::NodeHello { node_id: " ".into(), known_version: 1, ..Default::default() };
        assert_eq!(NodeHello::try_from(&forged).unwrap_err().what, "node_id");
        let forged = v1::NodeHello { node_id: "n1".into(), known_version: u64::MAX, ..Default::default() };
        assert_eq!(NodeHello::try_from(&forged).unwrap_err().what, "known_version");
        let forged =
            v1::NodeHello { node_id: "n1".into(), frontend_addresses: vec!["a.b".into()], ..Default::default() };
        assert_eq!(NodeHello::try_from(&forged).unwrap_err().what, "frontend_addresses");
        let many = vec!["127.0.0.1".to_owned(); FrontendAddresses::MAX + 1];
        let forged = v1::NodeHello { node_id: "n1".into(), frontend_addresses: many, ..Default::default() };
        assert_eq!(NodeHello::try_from(&forged).unwrap_err().what, "frontend_addresses");
        let old = v1::NodeHello { node_id: "n1".into(), ..Default::default() };
        assert_eq!(NodeHello::try_from(&old).unwrap().frontends_on, None, "an older node says nothing");

        let rows = vec![BackendLoad {
            service: key,
            backend: "127.0.0.2:5353".parse().unwrap(),
            active: 2,
            total: 9,
            failing: true,
            reported: Some(750),
        }];
        let Some(v1::controller_message::Msg::ClusterLoad(load)) = cluster_load_message(&rows).msg else { panic!() };
        assert_eq!(cluster_load(&load), rows);
    }

    #[test]
    fn invalid_wire_values_are_errors_not_panics() {
        let bad = |address: &str, weight: u32| v1::Snapshot {
            services: vec![v1::ServiceSpec {
                service: Some(ServiceKey::tcp(80).into()),
                algorithm: "round_robin".into(),
                backends: vec![v1::BackendSpec { address: address.into(), weight }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(RoutingSnapshot::try_from(bad("nowhere", 1)).is_err());
        let weight = |w| {
            RoutingSnapshot::try_from(bad("127.0.0.2:80", w)).unwrap().services[&ServiceKey::tcp(80)].backends[0].weight
        };
        assert_eq!((weight(0), weight(10_001)), (Weight::MIN, Weight::MAX));
    }
}
