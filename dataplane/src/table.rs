//! The node's routing table: a snapshot resolved for the data path (counters attached, balancers built),
//! swapped as a whole so no connection ever sees half of one version and half of another.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use contract::model::{Algorithm, ProxyProtocol, RoutingSnapshot, ServiceKey, ServiceSpec};

use crate::{
    balance::{Balancer, RouteBackend},
    stats::StatsRegistry,
};

/// Routing state of a node at one snapshot version.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Version of the snapshot this table was built from.
    pub version: u64,
    services: HashMap<ServiceKey, Arc<ServiceRoute>>,
}

/// How to reach the backends of one service.
#[derive(Debug)]
pub struct ServiceRoute {
    /// The algorithm `balancer` runs.
    pub algorithm: Algorithm,
    /// The PROXY protocol on both sides.
    pub proxy: ProxyProtocol,
    /// Backends in rotation, in snapshot order.
    pub backends: Vec<RouteBackend>,
    /// Picks among `backends`.
    pub balancer: Balancer,
}

// === impl RoutingTable ===

impl RoutingTable {
    /// Resolves `snapshot`. A service whose algorithm and backends (addresses and weights, in order) are
    /// those of `previous` keeps its route as it is: same balancer state, same counters, nothing rebuilt.
    /// The others get new balancers that continue from `previous` where they can.
    pub fn build(snapshot: &RoutingSnapshot, previous: &RoutingTable, stats: &StatsRegistry) -> Self {
        let services = snapshot
            .services
            .values()
            .map(|spec| {
                let before = previous.services.get(&spec.key);
                if let Some(route) = before.filter(|route| route.serves(spec)) {
                    return (spec.key, Arc::clone(route));
                }
                let backends: Vec<RouteBackend> = spec
                    .backends
                    .iter()
                    .map(|b| RouteBackend {
                        address: b.address,
                        weight: b.weight,
                        stats: stats.get(spec.key, b.address),
                    })
                    .collect();
                let balancer = Balancer::build(spec.algorithm, &backends, before.map(|r| &r.balancer));
                (spec.key, Arc::new(ServiceRoute { algorithm: spec.algorithm, proxy: spec.proxy, backends, balancer }))
            })
            .collect();
        RoutingTable { version: snapshot.version, services }
    }

    /// Every (service, backend) of the table with its counters.
    pub fn entries(&self) -> impl Iterator<Item = (ServiceKey, &RouteBackend)> {
        self.services.iter().flat_map(|(key, route)| route.backends.iter().map(move |b| (*key, b)))
    }

    /// True when `backend` is in rotation for `service`.
    pub fn contains(&self, service: &ServiceKey, backend: SocketAddr) -> bool {
        self.services.get(service).is_some_and(|r| r.contains(backend))
    }

    /// The route of `service`, if this table has it.
    pub fn route(&self, service: &ServiceKey) -> Option<Arc<ServiceRoute>> {
        self.services.get(service).cloned()
    }
}

// === impl ServiceRoute ===

impl ServiceRoute {
    /// Backends in the order to try them for a new connection from `client`: the balancer's pick first,
    /// then the others, so a refusing backend is skipped without another pick.
    pub fn candidates(&self, client: IpAddr) -> impl Iterator<Item = &RouteBackend> {
        let len = self.backends.len();
        let start = self.balancer.pick(&self.backends, client).unwrap_or(0);
        (0..len).map(move |i| &self.backends[(start + i) % len])
    }

    /// True when this route was built from exactly `spec`'s algorithm and backends.
    fn serves(&self, spec: &ServiceSpec) -> bool {
        self.algorithm == spec.algorithm
            && self.proxy == spec.proxy
            && self.backends.len() == spec.backends.len()
            && self.backends.iter().zip(&spec.backends).all(|(b, s)| b.address == s.address && b.weight == s.weight)
    }

    /// True when `addr` is still in rotation.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.backends.iter().any(|b| b.address == addr)
    }
}

#[cfg(test)]
mod tests {
    use contract::model::{BackendSpec, Weight};

    use super::*;

    fn snapshot(version: u64, backends: &[&str]) -> RoutingSnapshot {
        let key = ServiceKey::tcp(80);
        let backends =
            backends.iter().map(|a| BackendSpec { address: a.parse().unwrap(), weight: Weight::MIN }).collect();
        let spec = ServiceSpec { key, algorithm: Algorithm::RoundRobin, proxy: ProxyProtocol::default(), backends };
        RoutingSnapshot { version, services: [(key, spec)].into(), ..Default::default() }
    }

    #[test]
    fn counters_survive_rebuilds_and_candidates_cover_every_backend() {
        let stats = StatsRegistry::default();
        let t1 = RoutingTable::build(&snapshot(1, &["127.0.0.2:80", "127.0.0.3:80"]), &RoutingTable::default(), &stats);
        let route = t1.route(&ServiceKey::tcp(80)).unwrap();
        let _conn = route.backends[0].stats.open();
        let t2 = RoutingTable::build(&snapshot(2, &["127.0.0.2:80"]), &t1, &stats);
        let route2 = t2.route(&ServiceKey::tcp(80)).unwrap();
        assert_eq!(route2.backends[0].stats.active(), 1);
        assert!(!route2.contains("127.0.0.3:80".parse().unwrap()));
        let order: Vec<_> = route.candidates("127.0.0.1".parse().unwrap()).map(|b| b.address.to_string()).collect();
        assert_eq!(order.len(), 2);
        assert_ne!(order[0], order[1]);
        assert!(t2.route(&ServiceKey::udp(80)).is_none());
    }

    #[test]
    fn an_unchanged_service_keeps_its_route_across_a_snapshot_that_changes_another() {
        let stats = StatsRegistry::default();
        let (a, b) = (ServiceKey::tcp(80), ServiceKey::tcp(81));
        let spec = |key, backends: &[&str]| ServiceSpec {
            key,
            algorithm: Algorithm::RoundRobin,
            proxy: ProxyProtocol::default(),
            backends: backends
                .iter()
                .map(|a| BackendSpec { address: a.parse().unwrap(), weight: Weight::MIN })
                .collect(),
        };
        let snapshot = |version, b_backends: &[&str]| RoutingSnapshot {
            version,
            services: [(a, spec(a, &["127.0.0.2:80", "127.0.0.3:80", "127.0.0.4:80"])), (b, spec(b, b_backends))]
                .into(),
            ..Default::default()
        };
        let client = "127.0.0.1".parse().unwrap();
        let t1 = RoutingTable::build(&snapshot(1, &["127.0.0.5:81"]), &RoutingTable::default(), &stats);
        let route = t1.route(&a).unwrap();
        // Two picks: the round robin now points at the third backend.
        route.candidates(client).next();
        route.candidates(client).next();
        let _open = route.backends[0].stats.open();

        let t2 = RoutingTable::build(&snapshot(2, &["127.0.0.5:81", "127.0.0.6:81"]), &t1, &stats);
        let kept = t2.route(&a).unwrap();
        assert!(Arc::ptr_eq(&route, &kept), "the unchanged service's route was rebuilt");
        assert_eq!(kept.candidates(client).next().unwrap().address, "127.0.0.4:80".parse().unwrap());
        assert_eq!(kept.backends[0].stats.active(), 1);
        assert_eq!(t2.route(&b).unwrap().backends.len(), 2);

        // A weight change is a change: that route is rebuilt, its rotation carried on.
        let mut changed = snapshot(3, &["127.0.0.5:81", "127.0.0.6:81"]);
        changed.services.get_mut(&a).unwrap().backends[0].weight = Weight::new(2).unwrap();
        let t3 = RoutingTable::build(&changed, &t2, &stats);
        assert!(!Arc::ptr_eq(&kept, &t3.route(&a).unwrap()));
        assert_eq!(t3.route(&a).unwrap().backends[0].stats.active(), 1);
    }
}
