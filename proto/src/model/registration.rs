//! What a registering client asks for and what it is told: the domain side of `Registry.Register` and
//! `Registry.Deregister`, and of the Admin calls that name one backend.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::{ServiceAsk, ServiceKey, Weight};

/// Where a client says its backend listens. What it leaves out, the controller fills in: the IP from the
/// registration's peer, the port from the service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendTarget {
    /// The backend's IP, if not the peer's.
    pub ip: Option<IpAddr>,
    /// The backend's port, if not the service's.
    pub port: Option<u16>,
}

/// Probe timings a registration asks for; the unset ones are the controller's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeOverrides {
    /// Time between two hellos.
    pub interval: Option<Duration>,
    /// Time to answer one hello.
    pub timeout: Option<Duration>,
    /// Missed hellos in a row that end the registration.
    pub failures: Option<u32>,
}

/// One backend announced over a registration (the `register` message of a `Register` stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistrationRequest {
    /// The service to join.
    pub service: ServiceKey,
    /// Where the backend listens.
    pub backend: BackendTarget,
    /// Relative weight.
    pub weight: Weight,
    /// Balancing algorithm and PROXY protocol asked for (the first registration of a service sets them).
    pub ask: ServiceAsk,
    /// Probe timings asked for.
    pub probe: ProbeOverrides,
    /// The client's own verdict on its backend; unset means healthy.
    pub healthy: Option<bool>,
}

/// A backend to remove, from whichever registration announced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deregistration {
    /// The service it leaves.
    pub service: ServiceKey,
    /// Where the backend listens.
    pub backend: BackendTarget,
}

/// One backend of one service, as operators name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRef {
    /// The service.
    pub service: ServiceKey,
    /// The backend.
    pub backend: SocketAddr,
}

/// The answer to a registration, whichever channel carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterReply {
    /// Whether the backend is registered.
    pub success: bool,
    /// The reason of a failure, or a note on a success.
    pub message: Option<String>,
    /// The backend as recorded; none when the request was not understood.
    pub backend: Option<SocketAddr>,
}

/// A registration's answer to hello `seq` (0: unasked, a heartbeat or a verdict change), with its own
/// verdict on its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloAnswer {
    /// The hello answered.
    pub seq: u64,
    /// Whether the backends should be in rotation.
    pub healthy: bool,
    /// The load of the server, in thousandths (1000: fully loaded), when the client reports one.
    pub load: Option<u32>,
}

// === impl BackendTarget ===

impl BackendTarget {
    /// A backend at exactly `backend`.
    pub fn exact(backend: SocketAddr) -> Self {
        BackendTarget { ip: Some(backend.ip()), port: Some(backend.port()) }
    }

    /// The backend's address, with the registration's `peer` IP and the `service` port as defaults.
    pub fn resolve(self, peer: IpAddr, service: ServiceKey) -> SocketAddr {
        SocketAddr::new(self.ip.unwrap_or(peer), self.port.unwrap_or(service.port))
    }
}
