//! What a controller derives from its mirror of the shared store: the routing snapshot (the same on every
//! controller at one revision), the other controllers' backends, nodes and counts, and the operators'
//! choices.
//!
//! The snapshot nodes get is a function of the mirror alone, at its revision: every backend any
//! controller holds (in rotation when healthy and not drained), the operators' choices applied, and the
//! etcd revision as its version. So every controller sends the same version for the same state, and a
//! node that moves to another controller never gets an older one.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    net::SocketAddr,
};

use contract::{
    convert,
    model::{BackendLoad, BackendSpec, RoutingSnapshot, ServiceKey, ServiceSpec, Weight},
};
use tracing::debug;

use super::codec::{self, BACKENDS, LOAD, NODES, SERVICES};
use crate::{
    etcd::Mirror,
    store::{
        nodes::RemoteNode,
        shared::{OperatorChoices, SharedBackend},
    },
};

/// The routing state at the mirror's revision, the same on every controller: every backend any controller
/// holds (of two holding one, the newer key), in rotation when healthy and not drained, with the
/// operators' choices applied; a service's algorithm is an operator's if one chose, else the one its
/// service key holds (its first registration's), else that of its oldest backend key.
pub(super) fn snapshot(mirror: &Mirror, operator: &OperatorChoices) -> RoutingSnapshot {
    let mut held: BTreeMap<ServiceKey, BTreeMap<SocketAddr, (i64, SharedBackend)>> = BTreeMap::new();
    for (key, entry) in mirror.entries.range(BACKENDS.to_owned()..) {
        if !key.starts_with(BACKENDS) {
            break;
        }
        let Ok((_, backend)) = codec::parse_backend(&entry.value) else { continue };
        let slot = held.entry(backend.service).or_default().entry(backend.address);
        match slot {
            Entry::Vacant(v) => {
                v.insert((entry.mod_revision, backend));
            }
            Entry::Occupied(mut o) if o.get().0 < entry.mod_revision => {
                o.insert((entry.mod_revision, backend));
            }
            Entry::Occupied(_) => {}
        }
    }
    let services = held
        .into_iter()
        .map(|(key, backends)| {
            let oldest_backend = backends.values().min_by_key(|(revision, _)| *revision).map(|(_, b)| b);
            let oldest = oldest_backend.map(|b| b.algorithm);
            // The PROXY protocol is its first backend's, as the first registration chooses it.
            let proxy = oldest_backend.map(|b| b.proxy).unwrap_or_default();
            let chosen = operator.algorithms.get(&key).or(operator.first.get(&key)).copied();
            let algorithm = chosen.or(oldest).unwrap_or_default();
            let backends = backends
                .into_values()
                .filter_map(|(_, b)| {
                    let (weight, drained) = operator.backends.get(&(key, b.address)).copied().unwrap_or((None, false));
                    (b.healthy && !b.draining && !drained)
                        .then(|| BackendSpec { address: b.address, weight: weight.unwrap_or(b.weight) })
                })
                .collect();
            (key, ServiceSpec { key, algorithm, proxy, backends })
        })
        .collect();
    let version = u64::try_from(routing_revision(mirror)).unwrap_or(0);
    RoutingSnapshot { version, services, warming_up: false, retired: Default::default() }
}

/// The revision of the latest change that can change routing: a backend's or an operator's key written,
/// or any key removed. Counts (`load/`) are written every second and do not make new versions.
pub(super) fn routing_revision(mirror: &Mirror) -> i64 {
    let routing = mirror.entries.iter().filter(|(key, _)| key.starts_with(BACKENDS) || key.starts_with(SERVICES));
    routing.map(|(_, entry)| entry.mod_revision).max().unwrap_or(0).max(mirror.last_removal)
}

/// Every operator's choice in `mirror`; keys that do not parse are skipped.
pub(super) fn choices(mirror: &Mirror) -> OperatorChoices {
    let mut choices = OperatorChoices::default();
    for (key, entry) in mirror.entries.range(SERVICES.to_owned()..) {
        let Some(rest) = key.strip_prefix(SERVICES) else { break };
        let Some(value) = codec::parse_service_value(&entry.value) else { continue };
        let mut parts = rest.splitn(2, '/');
        let Some(service) = parts.next().and_then(codec::parse_service) else { continue };
        match parts.next() {
            None => {
                let algorithm = value.algorithm.as_deref().and_then(|a| convert::algorithm(a).ok());
                if let Some(algorithm) = algorithm {
                    if value.operator {
                        choices.algorithms.insert(service, algorithm);
                    } else {
                        choices.first.insert(service, algorithm);
                    }
                }
            }
            Some(backend) => {
                let Ok(backend) = backend.parse::<SocketAddr>() else { continue };
                let weight = value.weight.and_then(|w| Weight::new(u64::from(w)).ok());
                choices.backends.insert((service, backend), (weight, value.draining));
            }
        }
    }
    choices
}

/// The nodes following other controllers in `mirror` (of two keys for one node, moving between
/// controllers, the newer).
pub(super) fn nodes(mirror: &Mirror, me: &str) -> BTreeMap<String, RemoteNode> {
    let mut found: BTreeMap<String, (i64, RemoteNode)> = BTreeMap::new();
    for (key, entry) in mirror.entries.range(NODES.to_owned()..) {
        let Some(rest) = key.strip_prefix(NODES) else { break };
        let Some((node, controller)) = rest.rsplit_once('/') else { continue };
        if controller == me {
            continue;
        }
        let Some(remote) = codec::parse_node(&entry.value) else { continue };
        if found.get(node).is_none_or(|(revision, _)| *revision < entry.mod_revision) {
            found.insert(node.to_owned(), (entry.mod_revision, remote));
        }
    }
    found.into_iter().map(|(node, (_, remote))| (node, remote)).collect()
}

/// The other controllers' summed counts in `mirror`.
pub(super) fn loads(mirror: &Mirror, me: &str) -> BTreeMap<String, Vec<BackendLoad>> {
    let mut loads = BTreeMap::new();
    for (key, entry) in mirror.entries.range(LOAD.to_owned()..) {
        let Some(controller) = key.strip_prefix(LOAD) else { break };
        if controller == me {
            continue;
        }
        let Some(rows) = codec::parse_load(&entry.value) else { continue };
        loads.insert(controller.to_owned(), rows);
    }
    loads
}

/// The other controllers' backends in `mirror`, newest first (so of two holding one backend, the one that
/// registered it last wins). A value that does not parse is skipped.
pub(super) fn imported(mirror: &Mirror, me: &str) -> Vec<SharedBackend> {
    let mut found: Vec<(i64, SharedBackend)> = mirror
        .entries
        .iter()
        .filter(|(key, _)| key.starts_with(BACKENDS))
        .filter_map(|(key, entry)| match codec::parse_backend(&entry.value) {
            Ok((controller, _)) if controller == me => None,
            Ok((_, backend)) => Some((entry.mod_revision, backend)),
            Err(why) => {
                debug!(%key, %why, "skipping a backend key that does not parse");
                None
            }
        })
        .collect();
    found.sort_by_key(|(revision, _)| std::cmp::Reverse(*revision));
    found.into_iter().map(|(_, backend)| backend).collect()
}

#[cfg(test)]
mod tests {
    use contract::model::{Algorithm, ProxyProtocol, Weight};

    use super::*;
    use crate::etcd::Entry;

    #[test]
    fn a_backend_key_round_trips_and_bad_values_are_skipped() {
        let backend = SharedBackend {
            service: ServiceKey::tcp(8080),
            address: "127.0.0.2:9000".parse().unwrap(),
            weight: Weight::new(3).unwrap(),
            healthy: true,
            draining: false,
            algorithm: Algorithm::LeastConnections,
            proxy: ProxyProtocol { send_v2: true, accept: false },
        };
        let (key, value) = (codec::backend_key, codec::backend_value);
        assert_eq!(key(&backend, "c1"), "backends/tcp:8080/127.0.0.2:9000/c1");
        let entry = |value: Vec<u8>, mod_revision| Entry { value, mod_revision, lease: 1 };
        let mut mirror = Mirror::default();
        mirror.entries.insert(key(&backend, "c1"), entry(value(&backend, "c1"), 5));
        mirror.entries.insert(key(&backend, "c2"), entry(value(&backend, "c2"), 7));
        mirror.entries.insert("backends/garbage".into(), entry(b"{not json".to_vec(), 8));
        let bad_weight = String::from_utf8(value(&backend, "c3")).unwrap().replace("\"weight\":3", "\"weight\":0");
        mirror.entries.insert("backends/x/y/c3".into(), entry(bad_weight.into_bytes(), 9));
        // Counts written later make no new version; a removal does.
        let routing = routing_revision(&mirror);
        mirror.entries.insert("load/c2".into(), entry(b"[]".to_vec(), 20));
        mirror.revision = 20;
        assert_eq!(snapshot(&mirror, &OperatorChoices::default()).version, u64::try_from(routing).unwrap());
        mirror.last_removal = 21;
        assert_eq!(routing_revision(&mirror), 21);
        let seen_by_c1 = imported(&mirror, "c1");
        assert_eq!(seen_by_c1, vec![backend.clone()], "only the other controller's, and no bad one");
        assert_eq!(imported(&mirror, "c9").len(), 2);
    }
}
