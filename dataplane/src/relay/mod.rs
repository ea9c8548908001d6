//! Relays: the per-frontend tasks that move client traffic to backends.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use contract::limit::Limit;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{access_log::AccessLog, table::RoutingTable};

mod batch;
pub mod pump;
pub mod sources;
pub mod tcp;
pub mod udp;

/// What every relay task of a node shares: the current routing table and the node's settings.
#[derive(Debug)]
pub struct RelayContext {
    /// Swapped whole on every snapshot; read once per connection or new session.
    pub table: ArcSwap<RoutingTable>,
    /// Time allowed to connect to one backend before the next is tried.
    pub connect_timeout: Duration,
    /// Passive health of backends.
    pub passive: crate::stats::Passive,
    /// Time a client of a service that accepts the PROXY protocol has to send its header.
    pub accept_proxy_timeout: Duration,
    /// A UDP session with no datagram either way for this long ends.
    pub udp_idle_timeout: Duration,
    /// A UDP session whose backend has not answered yet ends after this long without a datagram (at
    /// most `udp_idle_timeout`).
    pub udp_unanswered_timeout: Duration,
    /// Most UDP sessions one frontend keeps; datagrams that would open more are dropped.
    pub udp_max_sessions: usize,
    /// Most UDP sessions of one frontend per client address.
    pub udp_max_sessions_per_source: usize,
    /// Most UDP sessions of one frontend per client /24 (IPv4) or /64 (IPv6).
    pub udp_max_sessions_per_prefix: usize,
    /// The descriptors every client of the node shares: a TCP connection takes two, a UDP session one.
    pub client_fds: Arc<Limit>,
    /// Most TCP connections at once per service.
    pub max_connections_per_service: usize,
    /// How long a client past that bound waits for a slot.
    pub queue_timeout: Duration,
    /// A TCP client silent for this long after connecting is closed before any backend is tried.
    pub first_byte_timeout: Option<Duration>,
    /// Pipes for the TCP relay's splice path.
    pub pipes: pump::PipePool,
    /// Every TCP connection task, so a shutdown can wait for them to finish.
    pub connections: TaskTracker,
    /// Where finished connections and sessions are recorded (`--access-log`), when anywhere.
    pub access_log: Option<AccessLog>,
    /// Cancelled when a successor accepts on this node's sockets (`--takeover`): TCP frontends stop
    /// accepting, UDP frontends stop reading and keep only their sessions' replies going.
    pub handed_over: CancellationToken,
}
