//! What names a service and how it balances: protocol, port, algorithm, and a backend's weight. Each type
//! holds only valid values, so a rule such as "weights are 1..=10000" is checked once, where a value is made.

use std::{fmt, str::FromStr};

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
    /// The least reported load of the servers (their agents' `--report-load`), combined with cluster-wide
    /// connections per unit of weight; a backend without a fresh report counts as average.
    LeastLoad,
}

/// The PROXY protocol on a service's two sides: a header to backends, so they learn the client's address,
/// and a header from a balancer in front, carrying the address of its client. Off by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ProxyProtocol {
    /// Send a PROXY v2 header to backends: at the start of each TCP connection, before each UDP datagram.
    pub send_v2: bool,
    /// TCP only: every client connection starts with a PROXY v1 or v2 header, whose source address is
    /// taken as the client's (for `source_hash`, the access log and the header sent on).
    pub accept: bool,
}

/// What a registration asks of its service besides its backend. The first registration of a service sets
/// it; a later one that asks for something else is refused, unless an operator chose (then the
/// operator's choice stands).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceAsk {
    /// The balancing algorithm.
    pub algorithm: Option<Algorithm>,
    /// The PROXY protocol settings.
    pub proxy: Option<ProxyProtocol>,
}

/// A backend's relative weight: always in `1..=10000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Weight(u32);

/// A weight outside `1..=10000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not in {min}..={max}", min = Weight::MIN, max = Weight::MAX)]
pub struct InvalidWeight(pub u64);

/// A protocol or algorithm name that is not known. Its `Display` lists the names that are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?} (expected {expected})")]
pub struct UnknownName {
    /// `protocol` or `algorithm`.
    pub what: &'static str,
    /// The name given.
    pub name: String,
    /// The names known, as a phrase.
    pub expected: String,
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
        [Protocol::Tcp, Protocol::Udp]
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownName { what: "protocol", name: s.to_owned(), expected: "tcp or udp".to_owned() })
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
    pub const ALL: [Algorithm; 7] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::Random,
        Algorithm::PowerOfTwo,
        Algorithm::SourceHash,
        Algorithm::LeastLoad,
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
            Algorithm::LeastLoad => "least_load",
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
        Algorithm::ALL.into_iter().find(|a| a.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let known: Vec<&str> = Algorithm::ALL.iter().map(|a| a.as_str()).collect();
            UnknownName { what: "algorithm", name: s.to_owned(), expected: format!("one of {}", known.join(", ")) }
        })
    }
}

// === impl ProxyProtocol ===

impl ProxyProtocol {
    /// The header to send, by name: `v2`, or `none`.
    pub fn parse_send(name: &str) -> Result<bool, UnknownName> {
        match name.to_ascii_lowercase().as_str() {
            "v2" => Ok(true),
            "none" | "off" => Ok(false),
            _ => Err(UnknownName { what: "proxy protocol", name: name.to_owned(), expected: "v2 or none".to_owned() }),
        }
    }

    /// Whether a service of `protocol` can have these settings: a UDP frontend has no connection for a
    /// header to start.
    pub fn check(self, protocol: Protocol) -> Result<(), String> {
        if self.accept && protocol == Protocol::Udp {
            return Err("accepting the PROXY protocol is for TCP services only".to_owned());
        }
        Ok(())
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.send_v2, self.accept) {
            (false, false) => f.write_str("no PROXY protocol"),
            (true, false) => f.write_str("PROXY v2 to backends"),
            (false, true) => f.write_str("PROXY from clients"),
            (true, true) => f.write_str("PROXY from clients and v2 to backends"),
        }
    }
}

// === impl ServiceAsk ===

impl ServiceAsk {
    /// Asks for `algorithm` only.
    pub fn algorithm(algorithm: Algorithm) -> Self {
        ServiceAsk { algorithm: Some(algorithm), proxy: None }
    }
}

// === impl Weight ===

impl Weight {
    /// The lightest weight, and the default.
    pub const MIN: Weight = Weight(1);
    /// The heaviest weight.
    pub const MAX: Weight = Weight(10_000);

    /// `value` as a weight, if it is in `1..=10000`.
    pub fn new(value: u64) -> Result<Self, InvalidWeight> {
        u32::try_from(value)
            .ok()
            .filter(|w| (Weight::MIN.0..=Weight::MAX.0).contains(w))
            .map(Weight)
            .ok_or(InvalidWeight(value))
    }

    /// `value` brought into `1..=10000`: for wire values a peer has already checked, where one odd weight
    /// should not cost a whole snapshot.
    pub fn clamped(value: u64) -> Self {
        Weight(u32::try_from(value).unwrap_or(u32::MAX).clamp(Weight::MIN.0, Weight::MAX.0))
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::MIN
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_are_case_insensitive() {
        assert_eq!("TCP".parse(), Ok(Protocol::Tcp));
        assert_eq!("Udp".parse(), Ok(Protocol::Udp));
        assert_eq!(
            "sctp".parse::<Protocol>().unwrap_err().to_string(),
            "unknown protocol \"sctp\" (expected tcp or udp)"
        );
        assert_eq!(ServiceKey::udp(53).to_string(), "udp:53");
    }

    #[test]
    fn algorithm_names_round_trip_and_unknown_ones_list_the_known() {
        for algorithm in Algorithm::ALL {
            assert_eq!(algorithm.as_str().to_uppercase().parse(), Ok(algorithm));
        }
        let err = "fastest".parse::<Algorithm>().unwrap_err().to_string();
        assert!(err.starts_with("unknown algorithm \"fastest\" (expected one of round_robin, "), "{err}");
    }

    #[test]
    fn weights_are_one_to_ten_thousand() {
        assert_eq!(Weight::new(1).map(Weight::get), Ok(1));
        assert_eq!(Weight::new(10_000).map(Weight::get), Ok(10_000));
        for bad in [0, 10_001, u64::from(u32::MAX) + 1] {
            assert_eq!(Weight::new(bad), Err(InvalidWeight(bad)));
        }
        assert_eq!(InvalidWeight(0).to_string(), "0 is not in 1..=10000");
        assert_eq!((Weight::clamped(0), Weight::clamped(u64::MAX)), (Weight::MIN, Weight::MAX));
        assert_eq!(Weight::clamped(7).get(), 7);
        assert_eq!(Weight::default(), Weight::MIN);
    }
}
