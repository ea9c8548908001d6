//! Relays: the per-frontend tasks that move client traffic to backends.
//!
//! # Life of a connection
//!
//! Every node runs its data path on `--workers` threads (`workers.rs`, default one per core), each a
//! single-threaded runtime. A frontend is one socket per worker on the same port (`SO_REUSEPORT`, after a
//! check that nobody holds the port): the kernel spreads connections and UDP clients over the workers, and
//! everything a connection does happens on the worker that accepted it. Snapshots are applied on the main
//! runtime and reach the workers only through the routing table.
//!
//! **TCP** (`dataplane/src/relay/tcp.rs`):
//!
//! 1. A worker's frontend task accepts, takes two descriptors from the node's client share (`contract::limit`; none
//!    left: the client is closed) and loads the routing table once (`ArcSwap::load`, no lock). Past
//!    `--max-connections-per-service` the client waits up to `--queue-timeout`; with
//!    `--client-first-byte-timeout` a client that sends nothing is closed first.
//!    A service that accepts the PROXY protocol reads the front balancer's v1/v2 header first
//!    (`proxy::read`, exactly its bytes, within `--accept-proxy-timeout`); its client is the client from then on.
//! 2. `ServiceRoute::candidates` (`table.rs`) gives the balancer's pick first (`balance.rs`; load-aware
//!    algorithms read `active + remote` per backend), then every other backend once.
//! 3. `BackendStats::attempt` (`stats.rs`) counts the connection as active from the pick, so a burst of
//!    accepts does not pile onto one least-loaded backend; each candidate gets `--connect-timeout`, the
//!    first that accepts wins (`ConnectionGuard::established` adds it to the total). Passive health
//!    (`BackendStats::may_try`): a backend whose connects failed `--passive-failures` times in a row is
//!    skipped, but for one trial per `--passive-retry`, and tried last when no other took the client; the
//!    node's load rows carry it as `failing`. If none accepts, the client is closed. With `send_v2` the
//!    v2 header (`proxy::encode_v2`) goes to the backend before the client's bytes; a UDP session sends it
//!    before each datagram.
//! 4. `pump::both_ways` (`relay/pump.rs`) moves each direction until both sides close; an EOF becomes a
//!    write shutdown of the other side. A burst is read into the worker's 64 KiB buffer and written on at
//!    once (an idle connection holds no buffer); once a read fills the buffer the direction is bulk and goes
//!    through splice(2) with a pipe leased from the node's pool (`--splice-pipes`, `--pipe-size`) only while
//!    bytes are in it. No pipe left, or splice refused: the buffer path goes on.
//! 5. A backend that leaves rotation keeps its connections until `--drain-timeout`, then
//!    `BackendStats::evict_through` ends the ones older than its leaving. Dropping the guard uncounts it.
//! 6. With `--access-log`, the connection's task hands one `AccessRecord` to the node's bounded queue
//!    (`access_log.rs`) without waiting; a thread of its own writes the JSON lines.
//!
//! **Metrics.** A backend's counters in `BackendStats` are its Prometheus series themselves: handles taken
//! from the node's families (`metrics.rs`) when a snapshot first brings the backend, forgotten with it. The
//! relay adds to handles it already holds (bytes as each write completes, a connect time per connection);
//! a frontend's refusal and drop counters are taken when its port opens. Gauges that only describe state
//! (versions, pipes, descriptors) are read at scrape time by a collector, as are the controller's
//! (`controller/src/metrics.rs` reads the store's view).
//!
//! **UDP** (`dataplane/src/relay/udp.rs`): on each worker, the frontend socket's task owns the session
//! table of the clients the kernel sends it (no lock) and takes every waiting datagram with one recvmmsg(2) (`relay/batch.rs`).
//! A new client address opens a session (unless the frontend's `--udp-max-sessions` are open, or its address or its
//! /24 (IPv6: /64) holds its cap of sessions, `relay/sources.rs`, counted across the frontend's workers when a
//! session opens or ends: dropped) pinned to one backend through its own connected upstream socket; replies
//! leave from the frontend socket. A session ends after `--udp-idle-timeout` (`--udp-unanswered-timeout`
//! until its backend first answers), on ICMP unreachable or a failed send, when its backend leaves rotation
//! (checked on the next datagram) or drains, or when the frontend closes.
//!
//! **Counts.** Each node reports its counters (`NodeReport::Load`, at most every `--load-report-interval`,
//! on change). `store/nodes.rs` keeps each node's latest rows and a load generation that moves with every
//! report; the connected nodes' totals are summed once per generation, outside the store lock, and a
//! `ClusterLoadFeed` per node takes its own rows out of them (every 100 ms, only when the generation moved)
//! and hands on changes (in process for the embedded node, as
//! `ClusterLoad` on a `Sync` stream), which land in `BackendStats::remote`. A node without a controller
//! zeroes its remote counts. `--no-cluster-counts` turns the feed off.

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
