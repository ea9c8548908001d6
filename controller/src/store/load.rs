//! Cluster load: every node's connection counts summed per backend, each node's view of the others' (the
//! cluster-wide counts least_connections and power_of_two balance on), and the servers' own load reports
//! (`least_load`), aged out after `--load-report-max-age`.
//!
//! None of this is a commit: a load report changes no snapshot.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use contract::model::{BackendLoad, ServiceKey};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::{State, Store, nodes::NodeLink};

/// How often a node's view of the other nodes' counts is refreshed (only changes are sent).
pub const CLUSTER_LOAD_INTERVAL: Duration = Duration::from_millis(100);

/// The connected nodes' counts at one load generation, summed per (service, backend), with each node's
/// own rows so its view can be taken out consistently.
#[derive(Debug, Default)]
pub(super) struct ClusterTotals {
    generation: u64,
    sums: BTreeMap<(ServiceKey, SocketAddr), Contributed>,
    per_node: BTreeMap<String, Arc<Vec<BackendLoad>>>,
}

/// A backend's fresh load report, in thousandths.
type Report = ((ServiceKey, SocketAddr), u32);

/// One row of the sums and how many nodes reported it.
#[derive(Debug, Clone, Copy)]
struct Contributed {
    sum: BackendLoad,
    nodes: u32,
}

/// The other nodes' connection counts for one node, each time they change: what that node adds to its own
/// counts for cluster-wide least connections.
#[derive(Debug)]
pub struct ClusterLoadFeed {
    store: Arc<Store>,
    node: String,
    ticks: Interval,
    /// Load generation of the last computed view: nothing to compute until it moves...
    seen: Option<u64>,
    /// ... or until a report in that view may have aged out.
    stale_at: Option<Instant>,
    last: Option<Vec<BackendLoad>>,
}

// === impl Store ===

impl Store {
    /// The connection counts of every connected node except `node`, summed per backend: the totals less
    /// the node's own rows, O(rows) once the totals are known. Only backends with connections open
    /// elsewhere are listed (a backend not listed has none, which is all a node balances on), so an idle
    /// cluster sends no counts at all.
    pub fn cluster_load_excluding(&self, node: &str) -> Vec<BackendLoad> {
        self.cluster_view(node).0
    }

    /// [`Store::cluster_load_excluding`], with the fresh load reports set on its rows, and when the first of
    /// those reports ages out (the view changes then without a new load generation).
    fn cluster_view(&self, node: &str) -> (Vec<BackendLoad>, Option<Instant>) {
        let totals = self.cluster_totals();
        let totals = totals.lock().unwrap_or_else(|e| e.into_inner());
        let own: BTreeMap<_, _> = totals
            .per_node
            .get(node)
            .map(|rows| rows.iter().map(|row| ((row.service, row.backend), row)).collect())
            .unwrap_or_default();
        let rows = totals
            .sums
            .iter()
            .filter_map(|(key, c)| match own.get(key) {
                None => Some(c.sum),
                Some(mine) if c.nodes > 1 => Some(BackendLoad {
                    active: c.sum.active.saturating_sub(mine.active),
                    total: c.sum.total.saturating_sub(mine.total),
                    ..c.sum
                }),
                Some(_) => None,
            })
            .filter(|row| row.active > 0)
            .collect::<Vec<_>>();
        drop(totals);
        let (reports, stale_at) = self.fresh_reports();
        (with_reports(rows, &reports), stale_at)
    }

    /// Records the load a registration's server reported for each of its backends.
    pub(super) fn report_load(&self, registration: super::registration::RegistrationId, load: u32) {
        let mut state = self.lock();
        let Some(reg) = state.registry.registrations.get(&registration) else { return };
        let backends: Vec<_> = reg.backends.iter().copied().collect();
        let now = Instant::now();
        let max_age = self.policy.load_report_max_age;
        let nodes = &mut state.nodes;
        let mut changed = false;
        for backend in backends {
            changed |= nodes.reports.insert(backend, (load, now)).is_none_or(|(old, _)| old != load);
        }
        // Reports of backends gone or servers gone quiet go at most once per max age.
        if nodes.reports_swept.is_none_or(|at| now.duration_since(at) > max_age) {
            nodes.reports.retain(|_, (_, at)| now.duration_since(*at) <= max_age);
            nodes.reports_swept = Some(now);
        }
        if changed {
            nodes.load_generation += 1;
        }
    }

    /// The fresh reports of backends the registry holds, in thousandths, sorted, and when the oldest of
    /// this controller's ages out. With replicas, a backend whose agent follows another controller has that
    /// controller's report (shared with its counts, fresh there).
    fn fresh_reports(&self) -> (Vec<Report>, Option<Instant>) {
        let (fresh, stale_at) = fresh_reports(&self.lock(), self.policy.load_report_max_age);
        (fresh.into_iter().collect(), stale_at)
    }

    /// The counts of this controller's connected nodes, summed per backend, with this controller's fresh
    /// load reports: what it shares with the other controllers.
    pub fn shared_load(&self) -> Vec<BackendLoad> {
        let rows = self.own_load();
        let (reports, _) = own_reports(&self.lock(), self.policy.load_report_max_age);
        with_reports(rows, &reports)
    }

    /// The counts of this controller's connected nodes, summed per backend (what it shares with the other
    /// controllers).
    pub fn own_load(&self) -> Vec<BackendLoad> {
        let state = self.lock();
        sum_load(state.nodes.nodes.values().filter(|n| n.connected).map(|n| n.load.as_slice()))
    }

    /// Takes in the other controllers' counts (each controller's nodes summed); they count in every
    /// node's cluster view and in the operators' view.
    pub fn set_remote_load(&self, remote: BTreeMap<String, Vec<BackendLoad>>) {
        let mut state = self.lock();
        let same = state.nodes.remote_load.len() == remote.len()
            && remote.iter().all(|(id, rows)| state.nodes.remote_load.get(id).is_some_and(|held| **held == *rows));
        if same {
            return;
        }
        state.nodes.remote_load = remote.into_iter().map(|(id, rows)| (id, Arc::new(rows))).collect();
        state.nodes.load_generation += 1;
    }

    /// The load generation now: the cluster view of any node can only have changed when it moved.
    pub fn load_generation(&self) -> u64 {
        self.lock().nodes.load_generation
    }

    /// The totals, brought up to date when a report came in since they were summed. Under the state lock
    /// only the nodes' rows are collected (shared, not copied); the sums are made outside it.
    fn cluster_totals(&self) -> &Mutex<ClusterTotals> {
        let (generation, per_node, remote) = {
            let state = self.lock();
            let generation = state.nodes.load_generation;
            if self.totals.lock().unwrap_or_else(|e| e.into_inner()).generation == generation {
                return &self.totals;
            }
            let connected = state.nodes.nodes.iter().filter(|(_, n)| n.connected);
            let per_node: BTreeMap<String, Arc<Vec<BackendLoad>>> =
                connected.map(|(id, n)| (id.clone(), Arc::clone(&n.load))).collect();
            let remote: Vec<Arc<Vec<BackendLoad>>> = state.nodes.remote_load.values().cloned().collect();
            (generation, per_node, remote)
        };
        let sums = sum_rows(per_node.values().chain(&remote).map(|rows| rows.as_slice()));
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        // Another caller may have summed a later generation meanwhile: keep the newer.
        if generation >= totals.generation {
            *totals = ClusterTotals { generation, sums, per_node };
        }
        &self.totals
    }
}

/// This controller's fresh reports of backends the registry holds, sorted, and when the oldest ages out.
fn own_reports(state: &State, max_age: Duration) -> (Vec<Report>, Option<Instant>) {
    let registered = |(service, backend): &(ServiceKey, SocketAddr)| {
        state.registry.services.get(service).is_some_and(|s| s.backends.contains_key(backend))
    };
    let fresh = state.nodes.reports.iter().filter(|(key, (_, at))| at.elapsed() <= max_age && registered(key));
    let stale_at = fresh.clone().map(|(_, &(_, at))| at + max_age).min();
    let mut fresh: Vec<_> = fresh.map(|(&key, &(load, _))| (key, load)).collect();
    fresh.sort_unstable();
    (fresh, stale_at)
}

/// Every fresh report of a backend the registry holds: this controller's, else the one another controller
/// shares with its counts (replicas); and when the oldest of this controller's ages out.
pub(super) fn fresh_reports(
    state: &State,
    max_age: Duration,
) -> (BTreeMap<(ServiceKey, SocketAddr), u32>, Option<Instant>) {
    let (own, stale_at) = own_reports(state, max_age);
    let remote = state.nodes.remote_load.values().flat_map(|rows| rows.iter());
    let mut fresh: BTreeMap<_, _> =
        remote.filter_map(|row| Some(((row.service, row.backend), row.reported?))).collect();
    fresh.extend(own);
    (fresh, stale_at)
}

/// `rows` (sorted) with the fresh `reports` (sorted) set on them, and a row of no connections for each
/// reported backend without one.
fn with_reports(rows: Vec<BackendLoad>, reports: &[Report]) -> Vec<BackendLoad> {
    if reports.is_empty() {
        return rows;
    }
    let mut merged: BTreeMap<(ServiceKey, SocketAddr), BackendLoad> =
        rows.into_iter().map(|row| ((row.service, row.backend), row)).collect();
    for &((service, backend), load) in reports {
        let row = merged.entry((service, backend)).or_insert(BackendLoad {
            service,
            backend,
            active: 0,
            total: 0,
            failing: false,
            reported: None,
        });
        row.reported = Some(load);
    }
    merged.into_values().collect()
}

/// The rows of several nodes, summed per (service, backend), sorted.
pub(super) fn sum_load<'a>(nodes: impl Iterator<Item = &'a [BackendLoad]>) -> Vec<BackendLoad> {
    sum_rows(nodes).into_values().map(|c| c.sum).collect()
}

/// The rows of several nodes, summed per (service, backend), each with how many nodes reported it.
fn sum_rows<'a>(nodes: impl Iterator<Item = &'a [BackendLoad]>) -> BTreeMap<(ServiceKey, SocketAddr), Contributed> {
    let mut sums: BTreeMap<(ServiceKey, SocketAddr), Contributed> = BTreeMap::new();
    for row in nodes.flatten() {
        let c = sums.entry((row.service, row.backend)).or_insert(Contributed {
            sum: BackendLoad { active: 0, total: 0, failing: false, reported: None, ..*row },
            nodes: 0,
        });
        c.sum.active += row.active;
        c.sum.total += row.total;
        c.sum.failing |= row.failing;
        c.nodes += 1;
    }
    sums
}

// === impl NodeLink ===

impl NodeLink {
    /// The other nodes' counts for this node, as they change.
    pub fn cluster_load(&self) -> ClusterLoadFeed {
        let mut ticks = tokio::time::interval(CLUSTER_LOAD_INTERVAL);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        ClusterLoadFeed {
            store: Arc::clone(&self.store),
            node: self.node.clone(),
            ticks,
            seen: None,
            stale_at: None,
            last: None,
        }
    }
}

// === impl ClusterLoadFeed ===

impl ClusterLoadFeed {
    /// The sums at the next tick where they differ from the last ones returned. Cancel-safe. A tick where
    /// no node reported and no load report aged out costs one look at the load generation.
    pub async fn changed(&mut self) -> Vec<BackendLoad> {
        loop {
            self.ticks.tick().await;
            let generation = self.store.load_generation();
            if self.seen == Some(generation) && self.stale_at.is_none_or(|at| Instant::now() < at) {
                continue;
            }
            self.seen = Some(generation);
            let (load, stale_at) = self.store.cluster_view(&self.node);
            self.stale_at = stale_at;
            if self.last.as_ref() != Some(&load) {
                self.last = Some(load.clone());
                return load;
            }
        }
    }
}
