//! The routing snapshot: the versioned, immutable routing state a controller publishes to nodes.
//!
//! These are plain domain types: the controller builds them, nodes consume them, and only the API layers
//! convert them to and from wire messages.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    str::FromStr,
};

use serde::Serialize;

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A stream service: each client connection is relayed to one backend.
    Tcp,
    /// A datagram service: each client address is a session pinned to one backend.
    Udp,
}

/// A service: the (protocol, port) pair that clients reach on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceKey {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Public port of the frontend.
    pub port: u16,
}

/// How a service spreads new connections over its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Each new connection or session goes to the next backend in turn (weights ignored).
    #[default]
    RoundRobin,
    /// Smooth weighted round robin (nginx's): shares follow the weights, interleaved.
    WeightedRoundRobin,
    /// Fewest active connections per unit of weight, counting every node's connections.
    LeastConnections,
    /// Weighted random.
    Random,
    /// Two random backends, the less loaded (cluster-wide, per unit of weight) wins.
    PowerOfTwo,
    /// Maglev consistent hash of the client's IP: every node picks the same backend.
    SourceHash,
}

/// One backend in rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BackendSpec {
    /// Where the backend listens.
    pub addr: SocketAddr,
    /// Relative weight (at least 1).
    pub weight: u32,
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

// === impl Protocol ===

impl Protocol {
    /// Lower-case name as used on the wire: `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = UnknownName;

    /// Case-insensitive, as the HW1 channel requires.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Protocol::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Protocol::Udp)
        } else {
            Err(UnknownName)
        }
    }
}

// === impl ServiceKey ===

impl ServiceKey {
    /// A TCP service on `port`.
    pub fn tcp(port: u16) -> Self {
        ServiceKey { protocol: Protocol::Tcp, port }
    }

    /// A UDP service on `port`.
    pub fn udp(port: u16) -> Self {
        ServiceKey { protocol: Protocol::Udp, port }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.protocol, self.port)
    }
}

// === impl Algorithm ===

impl Algorithm {
    /// Every algorithm, in documentation order.
    pub const ALL: [Algorithm; 6] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::Random,
        Algorithm::PowerOfTwo,
        Algorithm::SourceHash,
    ];

    /// Name as used in flags, JSON and gRPC.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::Random => "random",
            Algorithm::PowerOfTwo => "power_of_two",
            Algorithm::SourceHash => "source_hash",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = UnknownName;

    /// Case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL.into_iter().find(|a| a.as_str().eq_ignore_ascii_case(s)).ok_or(UnknownName)
    }
}

/// A protocol or algorithm name that is not known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown name")]
pub struct UnknownName;

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

    #[test]
    fn protocol_names_are_case_insensitive() {
        assert_eq!("TCP".parse(), Ok(Protocol::Tcp));
        assert_eq!("Udp".parse(), Ok(Protocol::Udp));
        assert_eq!("sctp".parse::<Protocol>(), Err(UnknownName));
        assert_eq!(ServiceKey::udp(53).to_string(), "udp:53");
    }
}
