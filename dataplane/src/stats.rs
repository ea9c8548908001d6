//! Per-backend connection counters, shared by the data path (atomics only), the load reporter and
//! `/metrics`.
//!
//! Counters are keyed by (service, backend address) and outlive routing-table rebuilds, so a connection
//! opened under snapshot N is still counted, and still decremented, after snapshot N+1 replaced it. They
//! are the Prometheus handles themselves, taken from the node's families when a snapshot first brings the
//! backend: the data path adds to them and never looks a label up.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use contract::{
    metrics::BackendLabels,
    model::{BackendLoad, Protocol, ServiceKey},
};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tokio::sync::watch;

use crate::metrics::{ConnectFailure, CountGauge, DataMetrics};

/// Live counters of one backend of one service on this node.
///
/// Connections are stamped with the generation current when they open; each time the backend leaves
/// rotation the generation moves on, so a drain can close exactly the connections that predate it.
#[derive(Debug)]
pub struct BackendStats {
    /// Connections (UDP: sessions) open now.
    active: CountGauge,
    /// Connections (UDP: sessions) ever made.
    total: Counter,
    /// Bytes from clients to the backend, and back.
    bytes_in: Counter,
    bytes_out: Counter,
    /// UDP datagrams from clients to the backend, and back.
    datagrams_in: Counter,
    datagrams_out: Counter,
    /// TCP only: failed connects, by [`ConnectFailure`], and connect times.
    connect_failures: [Counter; 3],
    connect_time: Histogram,
    /// Connections the other nodes last reported (cluster-wide view from the controller).
    remote: AtomicU64,
    /// The load the backend's server last reported, in thousandths, plus one (0: no fresh report).
    reported: AtomicU32,
    /// Passive health: TCP connects that failed in a row (reset by one that succeeds).
    failures_in_row: AtomicU32,
    /// Passive health: from this time ([`clock_ms`]) one trial connect may go to the backend while it is out
    /// of rotation.
    retry_at_ms: AtomicU64,
    generation: AtomicU64,
    /// Connections of this generation or older must close.
    evicted_through: watch::Sender<u64>,
}

/// Keeps one connection (TCP) or session (UDP) counted as active until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    stats: Arc<BackendStats>,
    generation: u64,
    evictions: watch::Receiver<u64>,
}

/// Owner of every [`BackendStats`] of a node.
///
/// A std mutex: it is taken only when a routing table is rebuilt and when a load report is collected,
/// never on the data path, and never across an `.await`.
#[derive(Debug, Default)]
pub struct StatsRegistry {
    entries: Mutex<HashMap<(ServiceKey, SocketAddr), Arc<BackendStats>>>,
    /// Where new backends' handles come from.
    metrics: DataMetrics,
    /// The passive-health rule, for the `failing` of each report row.
    passive: Passive,
}

/// Passive health (HAProxy's `observe layer4`): after `failures` TCP connects in a row fail, a node takes
/// the backend out of its rotation; one new connection tries it every `retry`, and the first that succeeds
/// puts it back. A backend out of rotation is still tried when no other backend took the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passive {
    /// Failed connects in a row that take a backend out (0: never).
    pub failures: u32,
    /// Time between two trial connects while it is out.
    pub retry: Duration,
}

impl Default for Passive {
    fn default() -> Self {
        Passive { failures: 3, retry: Duration::from_secs(2) }
    }
}

impl Passive {
    fn retry_ms(self) -> u64 {
        u64::try_from(self.retry.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Milliseconds since the first call: the clock of passive-health retries.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

// === impl BackendStats ===

impl Default for BackendStats {
    /// Counters registered nowhere.
    fn default() -> Self {
        BackendStats {
            active: CountGauge::default(),
            total: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            datagrams_in: Counter::default(),
            datagrams_out: Counter::default(),
            connect_failures: Default::default(),
            connect_time: Histogram::new([]),
            remote: AtomicU64::new(0),
            reported: AtomicU32::new(0),
            failures_in_row: AtomicU32::new(0),
            retry_at_ms: AtomicU64::new(0),
            generation: AtomicU64::new(1),
            evicted_through: watch::Sender::new(0),
        }
    }
}

impl BackendStats {
    /// The counters of `labels`' backend, from `metrics`' families: a TCP service's backends get the
    /// connection series, a UDP service's the session and datagram series.
    fn registered(metrics: &DataMetrics, protocol: Protocol, labels: &BackendLabels) -> Self {
        let mut stats = BackendStats {
            bytes_in: metrics.bytes_in.get_or_create_owned(labels),
            bytes_out: metrics.bytes_out.get_or_create_owned(labels),
            ..BackendStats::default()
        };
        match protocol {
            Protocol::Tcp => {
                stats.active = metrics.current_connections.get_or_create_owned(labels);
                stats.total = metrics.connections.get_or_create_owned(labels);
                stats.connect_failures = [ConnectFailure::Refused, ConnectFailure::Timeout, ConnectFailure::Error]
                    .map(|failure| metrics.connect_failure(labels, failure));
                stats.connect_time = metrics.connect_time.get_or_create_owned(labels);
            }
            Protocol::Udp => {
                stats.active = metrics.current_udp_sessions.get_or_create_owned(labels);
                stats.total = metrics.udp_sessions.get_or_create_owned(labels);
                stats.datagrams_in = metrics.udp_datagrams_in.get_or_create_owned(labels);
                stats.datagrams_out = metrics.udp_datagrams_out.get_or_create_owned(labels);
            }
        }
        stats
    }

    /// Counts a connection being attempted as active (not yet in the total), so picks made meanwhile see
    /// it; [`ConnectionGuard::established`] adds it to the total, dropping the guard takes it away.
    pub fn attempt(self: &Arc<Self>) -> ConnectionGuard {
        self.active.inc();
        let generation = self.generation.load(Ordering::Acquire);
        ConnectionGuard { stats: Arc::clone(self), generation, evictions: self.evicted_through.subscribe() }
    }

    /// Counts a new connection; it stays active until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.active.inc();
        self.total.inc();
        let generation = self.generation.load(Ordering::Acquire);
        ConnectionGuard { stats: Arc::clone(self), generation, evictions: self.evicted_through.subscribe() }
    }

    /// The backend left rotation: returns the generation of every connection open now, for
    /// [`BackendStats::evict_through`] once their drain time is over.
    pub fn left_rotation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel)
    }

    /// Closes every connection of `generation` or older.
    pub fn evict_through(&self, generation: u64) {
        self.evicted_through.send_if_modified(|through| {
            let newer = generation > *through;
            if newer {
                *through = generation;
            }
            newer
        });
    }

    /// Closes every connection open now; connections opened later are not affected.
    pub fn evict(&self) {
        self.evict_through(self.left_rotation());
    }

    /// Connections open now.
    pub fn active(&self) -> u64 {
        self.active.get()
    }

    /// Connections ever opened.
    pub fn total(&self) -> u64 {
        self.total.get()
    }

    /// Bytes from clients to the backend (the relay adds to it as it moves them).
    pub fn bytes_in(&self) -> &Counter {
        &self.bytes_in
    }

    /// Bytes from the backend to clients.
    pub fn bytes_out(&self) -> &Counter {
        &self.bytes_out
    }

    /// One UDP datagram of `len` bytes passed to the backend.
    pub fn datagram_in(&self, len: usize) {
        self.datagrams_in.inc();
        self.bytes_in.inc_by(len as u64);
    }

    /// `count` UDP datagrams of `len` bytes in all passed back to a client.
    pub fn datagrams_out(&self, count: u64, len: u64) {
        self.datagrams_out.inc_by(count);
        self.bytes_out.inc_by(len);
    }

    /// A connect to the backend failed. Returns true when that takes it out of rotation on this node
    /// (`passive`'s failures in a row, reached just now).
    pub fn connect_failed(&self, why: ConnectFailure, passive: Passive) -> bool {
        self.connect_failures[why as usize].inc();
        let in_row = self.failures_in_row.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let ejected = passive.failures != 0 && in_row == passive.failures;
        if ejected {
            self.retry_at_ms.store(clock_ms().saturating_add(passive.retry_ms()), Ordering::Release);
        }
        ejected
    }

    /// A connect to the backend took `took`. Returns true when it was out of rotation (passive health) and
    /// is back.
    pub fn connected_in(&self, took: Duration, passive: Passive) -> bool {
        self.connect_time.observe(took.as_secs_f64());
        // Read first: on the common path (no failure before) nothing is written.
        self.failures_in_row.load(Ordering::Acquire) != 0
            && self.failures_in_row.swap(0, Ordering::AcqRel) >= passive.failures
            && passive.failures != 0
    }

    /// Passive health: true while failed connects in a row keep the backend out of rotation on this node.
    pub fn failing(&self, passive: Passive) -> bool {
        passive.failures != 0 && self.failures_in_row.load(Ordering::Acquire) >= passive.failures
    }

    /// Whether a new connection may try the backend now: always when it is in rotation; when it is out
    /// (passive health), one trial per `passive.retry`, claimed by the first caller after it is due.
    pub fn may_try(&self, passive: Passive) -> bool {
        if !self.failing(passive) {
            return true;
        }
        let now = clock_ms();
        let due = self.retry_at_ms.load(Ordering::Acquire);
        now >= due
            && self
                .retry_at_ms
                .compare_exchange(due, now.saturating_add(passive.retry_ms()), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Connections the other nodes hold, as last reported.
    pub fn remote(&self) -> u64 {
        self.remote.load(Ordering::Relaxed)
    }

    /// Records the other nodes' connections.
    pub fn set_remote(&self, connections: u64) {
        self.remote.store(connections, Ordering::Relaxed);
    }

    /// The load the backend's server last reported, in thousandths, while the report is fresh.
    pub fn reported(&self) -> Option<u32> {
        self.reported.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Records the server's reported load (none: no fresh report).
    pub fn set_reported(&self, load: Option<u32>) {
        self.reported.store(load.map_or(0, |l| l.saturating_add(1)), Ordering::Relaxed);
    }
}

// === impl ConnectionGuard ===

impl ConnectionGuard {
    /// The attempted connection is made: it counts in the total too.
    pub fn established(&self) {
        self.stats.total.inc();
    }

    /// The backend's counters.
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    /// Resolves when the connection must close (its backend was evicted after it opened).
    pub async fn evicted(&mut self) {
        let generation = self.generation;
        // The sender lives in the stats this guard holds, so this only returns on an eviction.
        let _ = self.evictions.wait_for(|through| *through >= generation).await;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.stats.active.dec();
    }
}

// === impl StatsRegistry ===

impl StatsRegistry {
    /// A registry whose counters are series of `metrics`, and whose rows say `failing` by `passive`.
    pub fn new(metrics: DataMetrics, passive: Passive) -> Self {
        StatsRegistry { entries: Mutex::default(), metrics, passive }
    }

    /// The counters of `backend` in `service`, created (and their series with them) on first use.
    pub fn get(&self, service: ServiceKey, backend: SocketAddr) -> Arc<BackendStats> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let stats = entries.entry((service, backend)).or_insert_with(|| {
            Arc::new(BackendStats::registered(&self.metrics, service.protocol, &BackendLabels::new(service, backend)))
        });
        Arc::clone(stats)
    }

    /// Closes every open connection of every backend.
    pub fn evict_all(&self) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for stats in entries.values() {
            stats.evict();
        }
    }

    /// Takes in the other nodes' counts: `rows` are their sums per (service, backend); a backend not
    /// listed has none elsewhere.
    pub fn set_remote(&self, rows: &[BackendLoad]) {
        let remote: std::collections::HashMap<(ServiceKey, SocketAddr), (u64, Option<u32>)> =
            rows.iter().map(|r| ((r.service, r.backend), (r.active, r.reported))).collect();
        for row in rows {
            drop(self.get(row.service, row.backend));
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for (key, stats) in entries.iter() {
            let (connections, reported) = remote.get(key).copied().unwrap_or((0, None));
            stats.set_remote(connections);
            stats.set_reported(reported);
        }
    }

    /// Forgets the counters of services no longer served that no connection still uses. A backend out of
    /// rotation keeps its counters while its service exists, so its total survives a health flap or a drain.
    pub fn retain_services(&self, served: impl Fn(&ServiceKey) -> bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|&(service, backend), stats| {
            let keep = served(&service) || Arc::strong_count(stats) > 1;
            if !keep {
                self.metrics.forget_backend(&BackendLabels::new(service, backend));
            }
            keep
        });
    }

    /// Every counter, sorted, each with the other nodes' last reported connections to that backend.
    pub fn collect_with_remote(&self) -> Vec<(BackendLoad, u64)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(BackendLoad, u64)> = entries
            .iter()
            .map(|(&(service, backend), stats)| {
                let failing = stats.failing(self.passive);
                (
                    BackendLoad {
                        service,
                        backend,
                        active: stats.active(),
                        total: stats.total(),
                        failing,
                        reported: None,
                    },
                    stats.remote(),
                )
            })
            .collect();
        rows.sort_by_key(|(r, _)| (r.service, r.backend));
        rows
    }

    /// Every counter of this node that ever counted a connection or holds its backend out of rotation,
    /// sorted (what it reports: a backend without a row has had none and is not failing, so a node in front
    /// of 10,000 idle backends reports nothing).
    pub fn collect(&self) -> Vec<BackendLoad> {
        let rows = self.collect_with_remote().into_iter().map(|(row, _)| row);
        rows.filter(|row| row.active > 0 || row.total > 0 || row.failing).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_health_takes_a_refusing_backend_out_and_one_success_brings_it_back() {
        let stats = BackendStats::default();
        let passive = Passive { failures: 3, retry: Duration::from_secs(3600) };
        assert!(!stats.connect_failed(ConnectFailure::Refused, passive));
        assert!(!stats.connect_failed(ConnectFailure::Timeout, passive));
        assert!(stats.may_try(passive) && !stats.failing(passive), "two failures are not three");
        assert!(stats.connect_failed(ConnectFailure::Refused, passive), "the third in a row takes it out");
        assert!(stats.failing(passive));
        assert!(!stats.may_try(passive), "no trial before the retry is due");
        assert!(!stats.connect_failed(ConnectFailure::Refused, passive), "already out: said once");
        assert!(stats.connected_in(Duration::ZERO, passive), "one success puts it back");
        assert!(!stats.failing(passive) && stats.may_try(passive));
        assert!(!stats.connected_in(Duration::ZERO, passive), "and only once");

        // A success between failures starts the count again.
        for _ in 0..2 {
            stats.connect_failed(ConnectFailure::Refused, passive);
        }
        stats.connected_in(Duration::ZERO, passive);
        assert!(!stats.connect_failed(ConnectFailure::Refused, passive));

        // Due at once: exactly one caller gets the trial, then the next retry is a retry away.
        let due = Passive { failures: 1, retry: Duration::from_secs(3600) };
        let other = BackendStats::default();
        assert!(other.connect_failed(ConnectFailure::Refused, due));
        other.retry_at_ms.store(0, Ordering::Release);
        assert!(other.may_try(due));
        assert!(!other.may_try(due), "one trial per retry");

        // Off: never out.
        let off = Passive { failures: 0, retry: Duration::ZERO };
        let never = BackendStats::default();
        for _ in 0..10 {
            assert!(!never.connect_failed(ConnectFailure::Refused, off));
        }
        assert!(!never.failing(off) && never.may_try(off));
    }

    #[test]
    fn guards_count_exactly_and_counters_live_as_long_as_their_service() {
        let registry = StatsRegistry::default();
        let addr: SocketAddr = "127.0.0.2:80".parse().unwrap();
        let stats = registry.get(ServiceKey::tcp(80), addr);
        let a = stats.open();
        let b = stats.open();
        drop(a);
        assert_eq!(registry.collect()[0].active, 1);
        assert_eq!(registry.collect()[0].total, 2);
        drop(stats);
        // Out of every table, but its service is still served: kept, total and all.
        registry.retain_services(|_| true);
        drop(b);
        registry.retain_services(|s| *s == ServiceKey::tcp(80));
        assert_eq!(registry.collect()[0].total, 2);
        // The service is gone and nothing uses the counters: forgotten.
        registry.retain_services(|_| false);
        assert!(registry.collect().is_empty());
    }

    #[tokio::test]
    async fn eviction_reaches_open_connections_only() {
        let stats = Arc::new(BackendStats::default());
        let mut old = stats.open();
        stats.evict();
        let mut new = stats.open();
        tokio::time::timeout(std::time::Duration::from_secs(1), old.evicted()).await.expect("old connection evicted");
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), new.evicted()).await;
        assert!(pending.is_err(), "a connection opened after the eviction stays");
    }

    #[tokio::test]
    async fn a_drain_closes_only_connections_older_than_the_removal() {
        let stats = Arc::new(BackendStats::default());
        let mut before = stats.open();
        let first_removal = stats.left_rotation();
        // Back in rotation, a new connection, then removed again.
        let mut middle = stats.open();
        let _second_removal = stats.left_rotation();
        stats.evict_through(first_removal);
        tokio::time::timeout(std::time::Duration::from_secs(1), before.evicted()).await.expect("closed");
        let spared = tokio::time::timeout(std::time::Duration::from_millis(20), middle.evicted()).await;
        assert!(spared.is_err(), "the middle connection has its own drain time");
    }
}
