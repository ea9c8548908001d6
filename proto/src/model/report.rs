//! What a node tells the controller: which frontends it bound at a version, and how many connections
//! each backend holds there.

use std::net::{IpAddr, SocketAddr};

use super::ServiceKey;

/// How a node opens its link to the controller: who it is, and the last snapshot version it applied (so
/// the controller continues above it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeHello {
    /// The node's name, unique among connected nodes.
    pub node_id: String,
    /// The last version the node applied; 0 when it has none.
    pub known_version: u64,
    /// The node applies deltas ([`crate::model::RoutingDelta`]).
    pub accepts_deltas: bool,
    /// Where its frontends listen, when it says (older nodes do not).
    pub frontends_on: Option<FrontendAddresses>,
}

/// The addresses a node's frontends listen on, so the controller judges loops by where frontends really
/// are, not by the address the node's stream comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendAddresses {
    /// Its `--frontend-address`, or its host's addresses when that is a wildcard.
    pub addresses: Vec<IpAddr>,
    /// The frontends listen on a wildcard: every loopback address of the host reaches them too.
    pub wildcard: bool,
}

impl FrontendAddresses {
    /// Most addresses a node may list: a host with more is judged by the first ones.
    pub const MAX: usize = 256;

    /// True when a connection to `ip` reaches these frontends.
    pub fn covers(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        (self.wildcard && ip.is_loopback()) || self.addresses.iter().any(|a| a.to_canonical() == ip)
    }
}

/// What a node tells whoever feeds it snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeReport {
    /// A snapshot version is in force on this node (an ACK, with a NACK per frontend that failed).
    Applied {
        /// The version applied.
        version: u64,
        /// One entry per service the node serves at that version.
        frontends: Vec<FrontendStatus>,
    },
    /// A snapshot version is in force, written as the changes since the node's previous report on the
    /// same link: what a thousand unchanged frontends need not repeat.
    AppliedChanges {
        /// The version applied.
        version: u64,
        /// The services whose result is new or changed.
        changed: Vec<FrontendStatus>,
        /// The services no longer served.
        closed: Vec<ServiceKey>,
    },
    /// The node's per-backend counters changed.
    Load(Vec<BackendLoad>),
}

/// Whether a node listens for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendStatus {
    /// The service.
    pub service: ServiceKey,
    /// The bound address, or why binding failed (`bind ADDR: OS error`).
    pub result: Result<SocketAddr, String>,
}

/// One row of a load report: a backend's connections on one node, or summed over several.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendLoad {
    /// The service.
    pub service: ServiceKey,
    /// The backend.
    pub backend: SocketAddr,
    /// Connections or sessions open now.
    pub active: u64,
    /// Connections or sessions opened since the node first saw the backend.
    pub total: u64,
    /// Passive health: the node took the backend out of rotation after connects that failed in a row, until
    /// one succeeds again.
    pub failing: bool,
    /// From the controller to nodes: the load its server last reported, in thousandths (fresh reports only).
    pub reported: Option<u32>,
}
