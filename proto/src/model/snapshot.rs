//! The routing snapshot: the versioned, immutable routing state a controller publishes to nodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use serde::Serialize;

use super::{Algorithm, ProxyProtocol, ServiceKey, Weight};

/// One backend in rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BackendSpec {
    /// Where the backend listens (`addr` in a node's `/api/state`, as it always was).
    #[serde(rename = "addr")]
    pub address: SocketAddr,
    /// Relative weight.
    pub weight: Weight,
}

/// One service as nodes serve it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    /// Protocol and port.
    pub key: ServiceKey,
    /// Balancing algorithm.
    pub algorithm: Algorithm,
    /// PROXY protocol toward backends and from clients.
    pub proxy: ProxyProtocol,
    /// Backends that may take new connections, in a stable order. May be empty (all backends out of
    /// rotation): the frontend stays open because the service still has registered backends.
    pub backends: Vec<BackendSpec>,
}

/// The whole routing state at one version. Immutable once published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingSnapshot {
    /// Strictly increasing with every published change.
    pub version: u64,
    /// Every service that has at least one registered backend.
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
    /// Published by a controller that has just started and does not know every service yet: nodes keep
    /// serving the services they have that this snapshot lacks (unless `retired`), so servers have time to
    /// re-register before their frontends close.
    pub warming_up: bool,
    /// Services removed since the controller started: during warm-up, nodes drop these even if they have
    /// them.
    pub retired: BTreeSet<ServiceKey>,
}

/// The routing state at `version`, written as the changes from the state at `base_version`: what a
/// `Sync` stream sends instead of the whole state once the node has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingDelta {
    /// The version the changes start from.
    pub base_version: u64,
    /// The version they lead to.
    pub version: u64,
    /// Services added or changed, each whole.
    pub services: Vec<ServiceSpec>,
    /// Services of the base that are gone.
    pub removed: Vec<ServiceKey>,
    /// As in [`RoutingSnapshot`].
    pub warming_up: bool,
    /// As in [`RoutingSnapshot`], whole.
    pub retired: BTreeSet<ServiceKey>,
}

// === impl RoutingSnapshot ===

impl RoutingSnapshot {
    /// The changes that turn `base` into `self`.
    pub fn delta_from(&self, base: &RoutingSnapshot) -> RoutingDelta {
        RoutingDelta {
            base_version: base.version,
            version: self.version,
            services: self
                .services
                .iter()
                .filter(|(key, spec)| base.services.get(key) != Some(spec))
                .map(|(_, spec)| spec.clone())
                .collect(),
            removed: base.services.keys().filter(|key| !self.services.contains_key(key)).copied().collect(),
            warming_up: self.warming_up,
            retired: self.retired.clone(),
        }
    }

    /// `self` with `delta` applied, or `None` when the delta starts from another version.
    pub fn with_delta(&self, delta: RoutingDelta) -> Option<RoutingSnapshot> {
        if delta.base_version != self.version {
            return None;
        }
        let mut services = self.services.clone();
        for key in &delta.removed {
            services.remove(key);
        }
        services.extend(delta.services.into_iter().map(|spec| (spec.key, spec)));
        Some(RoutingSnapshot { version: delta.version, services, warming_up: delta.warming_up, retired: delta.retired })
    }

    /// What a node serves when `self` arrives while it serves `current`: `self` itself, or during a
    /// controller's warm-up, `self` plus the services of `current` it neither lists nor retired.
    pub fn applied_over(&self, current: &RoutingSnapshot) -> RoutingSnapshot {
        let mut effective = self.clone();
        if self.warming_up {
            for (key, spec) in &current.services {
                if !self.services.contains_key(key) && !self.retired.contains(key) {
                    effective.services.insert(*key, spec.clone());
                }
            }
        }
        effective
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(version: u64, ports: &[u16], warming_up: bool, retired: &[u16]) -> RoutingSnapshot {
        let services = ports
            .iter()
            .map(|&p| {
                let key = ServiceKey::tcp(p);
                (
                    key,
                    ServiceSpec {
                        key,
                        algorithm: Algorithm::RoundRobin,
                        proxy: ProxyProtocol::default(),
                        backends: Vec::new(),
                    },
                )
            })
            .collect();
        let retired = retired.iter().map(|&p| ServiceKey::tcp(p)).collect();
        RoutingSnapshot { version, services, warming_up, retired }
    }

    #[test]
    fn warm_up_snapshots_keep_unlisted_services_except_retired_ones() {
        let current = snapshot(7, &[80, 81, 82], false, &[]);
        let warm = snapshot(100, &[80, 90], true, &[82]);
        let effective = warm.applied_over(&current);
        assert_eq!(effective.version, 100);
        let ports: Vec<u16> = effective.services.keys().map(|k| k.port).collect();
        assert_eq!(ports, [80, 81, 90]);
        // After warm-up the controller's word is final.
        let done = snapshot(101, &[80], false, &[]);
        assert_eq!(done.applied_over(&effective).services.len(), 1);
    }

    #[test]
    fn a_delta_rebuilds_the_snapshot_it_was_made_from_and_only_from_its_base() {
        let mut base = snapshot(4, &[80, 81, 82], false, &[]);
        base.services.get_mut(&ServiceKey::tcp(81)).unwrap().algorithm = Algorithm::Random;
        let next = snapshot(5, &[80, 81, 83], true, &[82]);
        let delta = next.delta_from(&base);
        // 80 is the same in both: not sent. 81 changed, 83 is new, 82 left.
        let sent: Vec<_> = delta.services.iter().map(|s| s.key.port).collect();
        assert_eq!(sent, [81, 83]);
        assert_eq!(delta.removed, [ServiceKey::tcp(82)]);
        assert_eq!(base.with_delta(delta.clone()), Some(next.clone()));
        assert_eq!(next.with_delta(delta), None, "a delta applies to its base version only");
        assert_eq!(next.delta_from(&next).services, []);
    }
}
