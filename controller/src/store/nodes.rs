//! Nodes: which are connected, which frontends each bound at which version (the verdict a registration
//! waits for), and how many connections each holds per backend (the cluster-wide counts).
//!
//! None of this is a commit: a node joining, acking or reporting its load changes no snapshot.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use contract::model::{BackendLoad, Event, EventKind, FrontendStatus, NodeReport, ServiceKey};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::info;

use super::{State, Store};
use crate::error::StoreError;

/// How often a node's view of the other nodes' counts is refreshed (only changes are sent).
pub const CLUSTER_LOAD_INTERVAL: Duration = Duration::from_millis(100);

/// Every node that ever connected.
#[derive(Debug, Default)]
pub(super) struct NodeTable {
    pub nodes: BTreeMap<String, NodeRecord>,
    next_link: u64,
    /// Moves whenever a connected node's counts change (a load report, a node leaving), or another
    /// controller's.
    load_generation: u64,
    /// With replicas: the counts of the nodes following each other controller, summed per controller.
    pub remote_load: BTreeMap<String, Arc<Vec<BackendLoad>>>,
    /// With replicas: the nodes following other controllers, as their keys say.
    pub remote_nodes: BTreeMap<String, RemoteNode>,
    /// The servers' own load reports (agents' `--report-load`), in thousandths, per backend, with when
    /// each came. They reach nodes with the counts, never as a snapshot version.
    pub reports: HashMap<(ServiceKey, SocketAddr), (u32, Instant)>,
    /// When expired reports were last swept out.
    reports_swept: Option<Instant>,
}

/// A node that follows another controller (replicas), as its key in etcd says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    /// The controller it follows.
    pub controller: String,
    /// Last version it applied.
    pub acked_version: Option<u64>,
    /// Its bind results at that version.
    pub frontends: BTreeMap<ServiceKey, Result<SocketAddr, String>>,
}

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

#[derive(Debug)]
pub(super) struct NodeRecord {
    /// Which link of the node is current: a node that reconnects before its old stream is noticed dead
    /// replaces it, and the old stream's end must not disconnect the new one.
    link: u64,
    pub connected: bool,
    pub address: Option<SocketAddr>,
    pub acked_version: Option<u64>,
    pub last_seen: Instant,
    pub frontends: BTreeMap<ServiceKey, Result<SocketAddr, String>>,
    /// Shared with the cluster totals, so summing happens outside the lock.
    pub load: Arc<Vec<BackendLoad>>,
}

/// Whether nodes serve a service, as far as their reports tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendVerdict {
    /// At least one connected node listens; the others' errors, if any.
    Serving(Option<String>),
    /// No node is connected; the frontend opens when one connects.
    NoNodes,
    /// No node listens: each node's error.
    Failed(String),
}

/// A connected node's link to the store (the embedded node, or a `Sync` stream). Dropping it marks the
/// node disconnected.
#[derive(Debug)]
pub struct NodeLink {
    store: Arc<Store>,
    node: String,
    link: u64,
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
    /// A node joined (or rejoined): registrations wait for its bind results from now on. An id that a
    /// connected node holds is refused: a second stream may not displace the first (a node that lost its
    /// stream gets its id back once the controller notices, by the stream's end or its keep-alive).
    pub fn connect_node(self: &Arc<Self>, node: &str, address: Option<SocketAddr>) -> Result<NodeLink, StoreError> {
        let mut state = self.lock();
        let version = state.version;
        let table = &mut state.nodes;
        if table.nodes.get(node).is_some_and(|n| n.connected) {
            return Err(StoreError::NodeTaken { node: node.to_owned() });
        }
        table.next_link += 1;
        let link = table.next_link;
        let record = NodeRecord {
            link,
            connected: true,
            address,
            acked_version: None,
            last_seen: Instant::now(),
            frontends: BTreeMap::new(),
            load: Arc::default(),
        };
        table.nodes.insert(node.to_owned(), record);
        // Emitted under the lock, so events keep the order of the changes they describe.
        self.emit(Event::node(EventKind::NodeJoined, version, node));
        drop(state);
        match address {
            Some(address) => info!(node, %address, "node joined"),
            None => info!(node, "node joined"),
        }
        self.node_updates.send_modify(|n| *n += 1);
        self.node_changed();
        Ok(NodeLink { store: Arc::clone(self), node: node.to_owned(), link })
    }

    fn node_report(&self, node: &str, link: u64, report: NodeReport) {
        let mut state = self.lock();
        let State { nodes, published, .. } = &mut *state;
        let Some(record) = nodes.nodes.get_mut(node).filter(|n| n.link == link) else { return };
        record.last_seen = Instant::now();
        if let NodeReport::Applied { version, .. } | NodeReport::AppliedChanges { version, .. } = &report
            && record.acked_version != Some(*version)
            && let Some((_, at)) = published.iter().find(|(v, _)| v == version)
        {
            self.metrics.snapshot_push.observe(at.elapsed().as_secs_f64());
        }
        let acked = !matches!(report, NodeReport::Load(_));
        match report {
            NodeReport::Applied { version, frontends } => {
                record.acked_version = Some(version);
                record.frontends =
                    frontends.into_iter().map(|FrontendStatus { service, result }| (service, result)).collect();
            }
            NodeReport::AppliedChanges { version, changed, closed } => {
                record.acked_version = Some(version);
                for service in closed {
                    record.frontends.remove(&service);
                }
                record
                    .frontends
                    .extend(changed.into_iter().map(|FrontendStatus { service, result }| (service, result)));
            }
            NodeReport::Load(load) => {
                record.load = Arc::new(load);
                nodes.load_generation += 1;
            }
        }
        drop(state);
        self.node_updates.send_modify(|n| *n += 1);
        if acked {
            self.node_changed();
        }
    }

    /// A node left: it stays listed as disconnected, its counts leave the cluster view and its frontends no
    /// longer answer for registrations.
    fn disconnect_node(&self, node: &str, link: u64) {
        let mut state = self.lock();
        let version = state.version;
        let Some(record) = state.nodes.nodes.get_mut(node).filter(|n| n.link == link && n.connected) else {
            return;
        };
        record.connected = false;
        record.load = Arc::default();
        state.nodes.load_generation += 1;
        self.emit(Event::node(EventKind::NodeLeft, version, node));
        drop(state);
        info!(node, "node left");
        self.node_updates.send_modify(|n| *n += 1);
        self.node_changed();
    }

    /// Waits until the nodes' reports tell whether `service` is served at `version` or later, at most
    /// `timeout`.
    pub async fn await_frontend(&self, service: ServiceKey, version: u64, timeout: Duration) -> FrontendVerdict {
        let deadline = Instant::now() + timeout;
        let mut updates = self.node_updates.subscribe();
        loop {
            updates.borrow_and_update();
            if let Some(verdict) = self.lock().nodes.frontend_verdict(service, version, false) {
                return verdict;
            }
            if tokio::time::timeout_at(deadline, updates.changed()).await.is_err() {
                break;
            }
        }
        self.lock().nodes.frontend_verdict(service, version, true).unwrap_or(FrontendVerdict::NoNodes)
    }

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
    pub(super) fn report_load(&self, registration: super::registry::RegistrationId, load: u32) {
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

    /// The nodes following this controller, connected now: id, acked version, bind results.
    pub fn own_nodes(&self) -> Vec<(String, RemoteNode)> {
        let state = self.lock();
        let connected = state.nodes.nodes.iter().filter(|(_, n)| n.connected);
        connected
            .map(|(id, n)| {
                let node = RemoteNode {
                    controller: String::new(),
                    acked_version: n.acked_version,
                    frontends: n.frontends.clone(),
                };
                (id.clone(), node)
            })
            .collect()
    }

    /// Takes in the nodes following other controllers: registrations wait for their bind results too.
    pub fn set_remote_nodes(&self, nodes: BTreeMap<String, RemoteNode>) {
        let mut state = self.lock();
        if state.nodes.remote_nodes == nodes {
            return;
        }
        state.nodes.remote_nodes = nodes;
        drop(state);
        self.node_updates.send_modify(|n| *n += 1);
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

// === impl NodeTable ===

impl NodeTable {
    fn frontend_verdict(&self, service: ServiceKey, version: u64, last_call: bool) -> Option<FrontendVerdict> {
        let local = self.nodes.iter().filter(|(_, n)| n.connected).map(|(id, n)| (id, n.acked_version, &n.frontends));
        let remote = self.remote_nodes.iter().map(|(id, n)| (id, n.acked_version, &n.frontends));
        let connected: Vec<_> = local.chain(remote).collect();
        if connected.is_empty() {
            return Some(FrontendVerdict::NoNodes);
        }
        // Every connected node is heard (or the time is up), so a success can still name the nodes that failed.
        let mut serving = false;
        let mut errors = Vec::new();
        let mut pending = Vec::new();
        for (id, acked_version, frontends) in connected {
            match acked_version {
                Some(acked) if acked >= version => match frontends.get(&service) {
                    Some(Ok(_)) => serving = true,
                    Some(Err(error)) => errors.push(format!("node {id}: {error}")),
                    None => errors.push(format!("node {id}: service no longer in its snapshot")),
                },
                _ => pending.push(id),
            }
        }
        if !pending.is_empty() && !last_call {
            return None;
        }
        errors.extend(pending.into_iter().map(|id| format!("node {id}: no bind result in time")));
        let errors = errors.join("; ");
        Some(match (serving, errors.is_empty()) {
            (true, true) => FrontendVerdict::Serving(None),
            (true, false) => FrontendVerdict::Serving(Some(errors)),
            (false, _) => FrontendVerdict::Failed(errors),
        })
    }
}

// === impl NodeLink ===

impl NodeLink {
    /// Records one report of the node.
    pub fn report(&self, report: NodeReport) {
        self.store.node_report(&self.node, self.link, report);
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

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

impl Drop for NodeLink {
    fn drop(&mut self) {
        self.store.disconnect_node(&self.node, self.link);
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
