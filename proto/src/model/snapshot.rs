//! The routing snapshot: the versioned, immutable routing state a controller publishes to nodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use serde::Serialize;

use super::{Algorithm, ServiceKey, Weight};

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

// === impl RoutingSnapshot ===

impl RoutingSnapshot {
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
                (key, ServiceSpec { key, algorithm: Algorithm::RoundRobin, backends: Vec::new() })
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
}
