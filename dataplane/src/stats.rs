//! Per-backend connection counters, shared by the data path (atomics only) and the load reporter.
//!
//! Counters are keyed by (service, backend address) and outlive routing-table rebuilds, so a connection
//! opened under snapshot N is still counted, and still decremented, after snapshot N+1 replaced it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use contract::model::{BackendLoad, ServiceKey};
use tokio::sync::watch;

/// Live counters of one backend of one service on this node.
///
/// Connections are stamped with the generation current when they open; each time the backend leaves
/// rotation the generation moves on, so a drain can close exactly the connections that predate it.
#[derive(Debug)]
pub struct BackendStats {
    active: AtomicU64,
    total: AtomicU64,
    /// Connections the other nodes last reported (cluster-wide view from the controller).
    remote: AtomicU64,
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
}

// === impl BackendStats ===

impl Default for BackendStats {
    fn default() -> Self {
        BackendStats {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            remote: AtomicU64::new(0),
            generation: AtomicU64::new(1),
            evicted_through: watch::Sender::new(0),
        }
    }
}

impl BackendStats {
    /// Counts a connection being attempted as active (not yet in the total), so picks made meanwhile see
    /// it; [`ConnectionGuard::established`] adds it to the total, dropping the guard takes it away.
    pub fn attempt(self: &Arc<Self>) -> ConnectionGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::Acquire);
        ConnectionGuard { stats: Arc::clone(self), generation, evictions: self.evicted_through.subscribe() }
    }

    /// Counts a new connection; it stays active until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
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
        self.active.load(Ordering::Relaxed)
    }

    /// Connections ever opened.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Connections the other nodes hold, as last reported.
    pub fn remote(&self) -> u64 {
        self.remote.load(Ordering::Relaxed)
    }

    /// Records the other nodes' connections.
    pub fn set_remote(&self, connections: u64) {
        self.remote.store(connections, Ordering::Relaxed);
    }
}

// === impl ConnectionGuard ===

impl ConnectionGuard {
    /// The attempted connection is made: it counts in the total too.
    pub fn established(&self) {
        self.stats.total.fetch_add(1, Ordering::Relaxed);
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
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl StatsRegistry ===

impl StatsRegistry {
    /// The counters of `backend` in `service`, created on first use.
    pub fn get(&self, service: ServiceKey, backend: SocketAddr) -> Arc<BackendStats> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(entries.entry((service, backend)).or_default())
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
        let remote: std::collections::HashMap<(ServiceKey, SocketAddr), u64> =
            rows.iter().map(|r| ((r.service, r.backend), r.active)).collect();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for row in rows {
            entries.entry((row.service, row.backend)).or_default();
        }
        for (key, stats) in entries.iter() {
            stats.set_remote(remote.get(key).copied().unwrap_or(0));
        }
    }

    /// Forgets the counters of services no longer served that no connection still uses. A backend out of
    /// rotation keeps its counters while its service exists, so its total survives a health flap or a drain.
    pub fn retain_services(&self, served: impl Fn(&ServiceKey) -> bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(service, _), stats| served(service) || Arc::strong_count(stats) > 1);
    }

    /// Every counter, sorted, each with the other nodes' last reported connections to that backend.
    pub fn collect_with_remote(&self) -> Vec<(BackendLoad, u64)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(BackendLoad, u64)> = entries
            .iter()
            .map(|(&(service, backend), stats)| {
                (BackendLoad { service, backend, active: stats.active(), total: stats.total() }, stats.remote())
            })
            .collect();
        rows.sort_by_key(|(r, _)| (r.service, r.backend));
        rows
    }

    /// Every counter of this node that ever counted a connection, sorted (what it reports: a backend
    /// without a row has had none, so a node in front of 10,000 idle backends reports nothing).
    pub fn collect(&self) -> Vec<BackendLoad> {
        let rows = self.collect_with_remote().into_iter().map(|(row, _)| row);
        rows.filter(|row| row.active > 0 || row.total > 0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
