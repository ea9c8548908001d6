//! The node's Prometheus series. Families are registered once per process; the data path never looks a
//! label up: a backend's handles are taken when a snapshot brings it ([`crate::stats::BackendStats`]), a
//! frontend's when its port opens ([`FrontendStats`]), and each event is then one atomic add on a handle
//! the connection already holds. Gauges that only describe state (snapshot version, pipes, descriptors)
//! are read when scraped.

use std::sync::{Arc, atomic::AtomicU64};

use contract::{
    metrics::{BackendLabels, BackendReasonLabels, ServiceLabels, ServiceReasonLabels, const_counter, const_gauge},
    model::ServiceKey,
};
use prometheus_client::{
    collector::Collector,
    encoding::DescriptorEncoder,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// A gauge of a count.
pub type CountGauge = Gauge<u64, AtomicU64>;

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Why a backend's connect failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Connection refused (nothing listens, or a firewall said no).
    Refused,
    /// No answer within `--connect-timeout`.
    Timeout,
    /// Any other error (unreachable network, no route, ...).
    Error,
}

/// Why a TCP client was closed without reaching a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every backend refused or timed out, or the service has none in rotation.
    NoBackend,
    /// The service was at `--max-connections-per-service` past `--queue-timeout`.
    ServiceFull,
    /// The node's clients hold every descriptor they may.
    FdLimit,
    /// The client sent nothing within `--client-first-byte-timeout`.
    SilentClient,
    /// The service accepts the PROXY protocol and the client's header was bad, cut short or late.
    BadProxyHeader,
}

/// Why a UDP datagram from a client was not passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The frontend holds `--udp-max-sessions`.
    SessionLimit,
    /// The service has no backend in rotation.
    NoBackend,
    /// The node's clients hold every descriptor they may.
    FdLimit,
    /// No socket toward the backend could be opened.
    UpstreamSocket,
    /// The socket toward the backend had no room.
    UpstreamBusy,
    /// Sending to the backend failed (the session ends).
    SendFailed,
    /// Larger than the largest UDP payload.
    Truncated,
    /// The client's address holds `--udp-max-sessions-per-source`.
    SourceLimit,
    /// The client's /24 (IPv4) or /64 (IPv6) holds `--udp-max-sessions-per-prefix`.
    PrefixLimit,
}

/// Every family of the data path. Cloning shares them.
#[derive(Clone, Debug)]
pub struct DataMetrics {
    pub(crate) current_connections: Family<BackendLabels, CountGauge>,
    pub(crate) connections: Family<BackendLabels, Counter>,
    pub(crate) current_udp_sessions: Family<BackendLabels, CountGauge>,
    pub(crate) udp_sessions: Family<BackendLabels, Counter>,
    pub(crate) bytes_in: Family<BackendLabels, Counter>,
    pub(crate) bytes_out: Family<BackendLabels, Counter>,
    pub(crate) udp_datagrams_in: Family<BackendLabels, Counter>,
    pub(crate) udp_datagrams_out: Family<BackendLabels, Counter>,
    pub(crate) connect_failures: Family<BackendReasonLabels, Counter>,
    pub(crate) connect_time: HistogramFamily<BackendLabels>,
    refused: Family<ServiceReasonLabels, Counter>,
    udp_drops: Family<ServiceReasonLabels, Counter>,
    /// Time to apply one snapshot.
    pub(crate) apply_time: Histogram,
    /// Access-log records dropped because the writer fell behind.
    pub(crate) access_log_dropped: Counter,
}

/// The handles of one frontend's per-service series, taken when its port opens.
#[derive(Debug)]
pub struct FrontendStats {
    labels: ServiceLabels,
    refused: [Counter; 5],
    drops: [Counter; 9],
    /// Backend failures are logged at warn level at most once per 10 s per frontend.
    backend_warnings: std::sync::Mutex<contract::limit::Throttle>,
}

/// What a node's link to its controller counts (remote nodes only).
#[derive(Clone, Debug, Default)]
pub struct SyncMetrics {
    /// Snapshots acknowledged with every frontend bound.
    pub acks: Counter,
    /// Snapshots acknowledged with at least one frontend that could not be bound.
    pub nacks: Counter,
    /// Snapshots or deltas refused as malformed, out of step or older than the one held.
    pub rejected: Counter,
    /// 1 while a sync stream is open.
    pub connected: CountGauge,
    /// Sync streams opened after the first.
    pub reconnects: Counter,
}

/// What a node's state-describing gauges read when scraped. The node fills it in: this module knows the
/// series, not the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeGauges {
    /// Version of the routing snapshot served.
    pub snapshot_version: u64,
    /// Frontends open.
    pub frontends: u64,
    /// Data-path worker threads.
    pub workers: u64,
    /// Splice pipes holding bytes in flight.
    pub pipes_in_use: u64,
    /// Splice pipes in existence.
    pub pipes: u64,
    /// Descriptors the node's clients hold.
    pub client_fds: u64,
    /// Descriptors the node's clients may hold.
    pub client_fds_max: u64,
    /// Bytes the TCP relay moved by splice(2).
    pub spliced_bytes: u64,
    /// Bytes the TCP relay copied through a buffer.
    pub copied_bytes: u64,
    /// Bulk bursts that found no pipe and were copied.
    pub pipe_pool_empty: u64,
}

/// A node as its collector sees it: something that reads its gauges now.
pub trait GaugeSource: std::fmt::Debug + Send + Sync + 'static {
    /// The gauges' values at this moment.
    fn gauges(&self) -> NodeGauges;
}

/// Reads a node's state-describing gauges when scraped.
#[derive(Debug)]
struct NodeCollector<S> {
    node: S,
}

const CONNECT_FAILURES: [ConnectFailure; 3] = [ConnectFailure::Refused, ConnectFailure::Timeout, ConnectFailure::Error];
const REFUSALS: [Refusal; 5] =
    [Refusal::NoBackend, Refusal::ServiceFull, Refusal::FdLimit, Refusal::SilentClient, Refusal::BadProxyHeader];
const DROPS: [Dropped; 9] = [
    Dropped::SessionLimit,
    Dropped::NoBackend,
    Dropped::FdLimit,
    Dropped::UpstreamSocket,
    Dropped::UpstreamBusy,
    Dropped::SendFailed,
    Dropped::Truncated,
    Dropped::SourceLimit,
    Dropped::PrefixLimit,
];

fn connect_time_histogram() -> Histogram {
    // 50 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

// === impl DataMetrics ===

impl Default for DataMetrics {
    fn default() -> Self {
        DataMetrics {
            current_connections: Family::default(),
            connections: Family::default(),
            current_udp_sessions: Family::default(),
            udp_sessions: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            udp_datagrams_in: Family::default(),
            udp_datagrams_out: Family::default(),
            connect_failures: Family::default(),
            connect_time: Family::new_with_constructor(connect_time_histogram),
            refused: Family::default(),
            udp_drops: Family::default(),
            apply_time: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            access_log_dropped: Counter::default(),
        }
    }
}

impl DataMetrics {
    /// Registers every family in `registry` (names under its `switchboard_` prefix).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "backend_current_connections",
            "TCP connections open now to the backend from this node",
            self.current_connections.clone(),
        );
        r.register("backend_connections", "TCP connections made to the backend", self.connections.clone());
        r.register(
            "backend_current_udp_sessions",
            "UDP sessions open now to the backend from this node",
            self.current_udp_sessions.clone(),
        );
        r.register("backend_udp_sessions", "UDP sessions opened to the backend", self.udp_sessions.clone());
        r.register("backend_bytes_in", "Bytes from clients passed to the backend", self.bytes_in.clone());
        r.register("backend_bytes_out", "Bytes from the backend passed to clients", self.bytes_out.clone());
        r.register(
            "backend_udp_datagrams_in",
            "UDP datagrams from clients passed to the backend",
            self.udp_datagrams_in.clone(),
        );
        r.register(
            "backend_udp_datagrams_out",
            "UDP datagrams from the backend passed to clients",
            self.udp_datagrams_out.clone(),
        );
        r.register(
            "backend_connect_failures",
            "Connects to the backend that failed, by reason (refused, timeout, error)",
            self.connect_failures.clone(),
        );
        r.register_with_unit(
            "backend_connect_time",
            "Time to connect to the backend, once per connection",
            Unit::Seconds,
            self.connect_time.clone(),
        );
        r.register(
            "frontend_refused_connections",
            "TCP clients closed without a backend, by reason (no_backend, service_full, fd_limit, silent_client, bad_proxy_header)",
            self.refused.clone(),
        );
        r.register(
            "frontend_udp_dropped_datagrams",
            "UDP datagrams from clients not passed on, by reason",
            self.udp_drops.clone(),
        );
        r.register_with_unit(
            "node_snapshot_apply_time",
            "Time to apply one routing snapshot",
            Unit::Seconds,
            self.apply_time.clone(),
        );
        r.register(
            "access_log_dropped_records",
            "Access-log records dropped because the writer fell behind",
            self.access_log_dropped.clone(),
        );
    }

    /// Counts `failure` for the backend of `labels`; taken when the backend's stats are made.
    pub(crate) fn connect_failure(&self, labels: &BackendLabels, failure: ConnectFailure) -> Counter {
        self.connect_failures.get_or_create_owned(&labels.with_reason(failure.as_str()))
    }

    /// Forgets every series of the backend of `labels`.
    pub(crate) fn forget_backend(&self, labels: &BackendLabels) {
        self.current_connections.remove(labels);
        self.connections.remove(labels);
        self.current_udp_sessions.remove(labels);
        self.udp_sessions.remove(labels);
        self.bytes_in.remove(labels);
        self.bytes_out.remove(labels);
        self.udp_datagrams_in.remove(labels);
        self.udp_datagrams_out.remove(labels);
        self.connect_time.remove(labels);
        for failure in CONNECT_FAILURES {
            self.connect_failures.remove(&labels.with_reason(failure.as_str()));
        }
    }

    /// The handles of `service`'s frontend.
    pub fn frontend(&self, service: ServiceKey) -> Arc<FrontendStats> {
        let labels = ServiceLabels::new(service);
        Arc::new(FrontendStats {
            refused: REFUSALS.map(|r| self.refused.get_or_create_owned(&labels.with_reason(r.as_str()))),
            drops: DROPS.map(|d| self.udp_drops.get_or_create_owned(&labels.with_reason(d.as_str()))),
            labels,
            backend_warnings: std::sync::Mutex::new(contract::limit::Throttle::new(contract::limit::WARN_EVERY)),
        })
    }

    /// Forgets the series of a closed frontend.
    pub fn forget_frontend(&self, frontend: &FrontendStats) {
        for r in REFUSALS {
            self.refused.remove(&frontend.labels.with_reason(r.as_str()));
        }
        for d in DROPS {
            self.udp_drops.remove(&frontend.labels.with_reason(d.as_str()));
        }
    }
}

// === impl FrontendStats ===

impl FrontendStats {
    /// A TCP client was closed for `why`.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }

    /// `Some(failures held back since the last warning)` when a backend failure may be logged at warn
    /// level now.
    pub fn may_warn(&self) -> Option<u64> {
        self.backend_warnings.lock().unwrap_or_else(|e| e.into_inner()).admit(tokio::time::Instant::now())
    }

    /// A UDP datagram was dropped for `why`.
    pub fn dropped(&self, why: Dropped) {
        self.drops[why as usize].inc();
    }
}

// === impl reasons ===

impl ConnectFailure {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Error => "error",
        }
    }
}

impl Refusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoBackend => "no_backend",
            Refusal::ServiceFull => "service_full",
            Refusal::FdLimit => "fd_limit",
            Refusal::SilentClient => "silent_client",
            Refusal::BadProxyHeader => "bad_proxy_header",
        }
    }
}

impl Dropped {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::SessionLimit => "session_limit",
            Dropped::NoBackend => "no_backend",
            Dropped::FdLimit => "fd_limit",
            Dropped::UpstreamSocket => "upstream_socket",
            Dropped::UpstreamBusy => "upstream_busy",
            Dropped::SendFailed => "send_failed",
            Dropped::Truncated => "truncated",
            Dropped::SourceLimit => "source_limit",
            Dropped::PrefixLimit => "prefix_limit",
        }
    }
}

// === impl SyncMetrics ===

impl SyncMetrics {
    /// Registers the link's series in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("node_acks", "Snapshots acknowledged with every frontend bound", self.acks.clone());
        registry.register(
            "node_nacks",
            "Snapshots acknowledged with a frontend that could not be bound",
            self.nacks.clone(),
        );
        registry.register(
            "node_rejected_snapshots",
            "Snapshots or deltas refused as malformed, out of step or not newer",
            self.rejected.clone(),
        );
        registry.register("node_controller_connected", "1 while the node follows a controller", self.connected.clone());
        registry.register("node_reconnects", "Sync streams opened after the first", self.reconnects.clone());
    }
}

// === impl NodeCollector ===

/// Registers the gauges read from `node` when scraped: snapshot version, warm-up, relay and descriptors.
pub fn register_node(registry: &mut Registry, node: impl GaugeSource) {
    registry.register_collector(Box::new(NodeCollector { node }));
}

impl<S: GaugeSource> Collector for NodeCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let g = self.node.gauges();
        let gauges = [
            ("node_snapshot_version", "Version of the routing snapshot the node serves.", g.snapshot_version),
            ("node_frontends", "Frontends the node has open.", g.frontends),
            ("node_workers", "Data-path worker threads.", g.workers),
            ("relay_pipes_in_use", "Splice pipes holding bytes in flight.", g.pipes_in_use),
            ("relay_pipes", "Splice pipes in existence.", g.pipes),
            ("node_client_fds", "File descriptors the node's clients hold.", g.client_fds),
            ("node_client_fds_max", "File descriptors the node's clients may hold.", g.client_fds_max),
        ];
        for (name, help, value) in gauges {
            const_gauge(&mut encoder, name, help, value)?;
        }
        let counters = [
            ("relay_spliced_bytes", "Bytes the TCP relay moved by splice(2).", g.spliced_bytes),
            ("relay_copied_bytes", "Bytes the TCP relay copied through a buffer.", g.copied_bytes),
            ("relay_pipe_pool_empty", "Bulk bursts that found no pipe and were copied.", g.pipe_pool_empty),
        ];
        for (name, help, value) in counters {
            const_counter(&mut encoder, name, help, value)?;
        }
        Ok(())
    }
}
