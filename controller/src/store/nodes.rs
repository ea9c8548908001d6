//! Nodes: which are connected (one link per id: a node that connects again replaces its older link),
//! where each one's frontends listen (the loop rule judges backends by it), which frontends each bound at
//! which version (the verdict a registration waits for), and when a node that left is forgotten. Their
//! counts are summed in [`super::load`].
//!
//! None of this is a commit: a node joining, acking or reporting its load changes no snapshot.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use contract::model::{BackendLoad, Event, EventKind, FrontendAddresses, FrontendStatus, NodeReport, ServiceKey};
use tokio::{sync::watch, time::Instant};
use tracing::info;

use super::{State, Store};
use crate::error::StoreError;

/// The name of the node that runs inside the controller.
pub const EMBEDDED_NODE: &str = "embedded";

/// Every node that ever connected.
#[derive(Debug, Default)]
pub(super) struct NodeTable {
    pub nodes: BTreeMap<String, NodeRecord>,
    next_link: u64,
    /// Moves whenever a connected node's counts change (a load report, a node leaving), or another
    /// controller's.
    pub(super) load_generation: u64,
    /// With replicas: the counts of the nodes following each other controller, summed per controller.
    pub remote_load: BTreeMap<String, Arc<Vec<BackendLoad>>>,
    /// With replicas: the nodes following other controllers, as their keys say.
    pub remote_nodes: BTreeMap<String, RemoteNode>,
    /// The servers' own load reports (agents' `--report-load`), in thousandths, per backend, with when
    /// each came. They reach nodes with the counts, never as a snapshot version.
    pub reports: HashMap<(ServiceKey, SocketAddr), (u32, Instant)>,
    /// When expired reports were last swept out.
    pub(super) reports_swept: Option<Instant>,
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

#[derive(Debug)]
pub(super) struct NodeRecord {
    /// Which link of the node is current: a node that reconnects before its old stream is noticed dead
    /// replaces it, and the old stream's end must not disconnect the new one.
    link: u64,
    pub connected: bool,
    /// When it left, for `--node-forget-after`.
    pub left_at: Option<Instant>,
    pub address: Option<SocketAddr>,
    /// Where its frontends listen, as its hello said (none: judged by `address`).
    pub frontends_on: Option<FrontendAddresses>,
    /// Ends the current link's stream when the node connects again on another.
    replaced: watch::Sender<bool>,
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
    pub(super) store: Arc<Store>,
    pub(super) node: String,
    link: u64,
    /// Turns true when the node connected again on another link: this one is over.
    replaced: watch::Receiver<bool>,
}

// === impl Store ===

impl Store {
    /// A node joined (or rejoined): registrations wait for its bind results from now on. A node that
    /// connects under the id of a connected one replaces it (the older link is told, and its stream
    /// ends): a node that restarts before its old stream is seen dead is never locked out of its own id.
    /// `frontends_on` is where its frontends listen, as its hello says.
    pub fn connect_node(
        self: &Arc<Self>,
        node: &str,
        address: Option<SocketAddr>,
        frontends_on: Option<FrontendAddresses>,
    ) -> Result<NodeLink, StoreError> {
        let mut state = self.lock();
        let version = state.version;
        let now = Instant::now();
        let forget_after = self.policy.node_forget_after;
        let table = &mut state.nodes;
        table.forget(now, forget_after);
        let previous = table.nodes.get(node).filter(|n| n.connected).map(|n| (n.address, n.replaced.clone()));
        table.next_link += 1;
        let link = table.next_link;
        let (replaced, replaced_rx) = watch::channel(false);
        let record = NodeRecord {
            link,
            connected: true,
            left_at: None,
            address,
            frontends_on,
            replaced,
            acked_version: None,
            last_seen: now,
            frontends: BTreeMap::new(),
            load: Arc::default(),
        };
        table.nodes.insert(node.to_owned(), record);
        if previous.is_some() {
            // Its counts are the new link's to report now.
            table.load_generation += 1;
        }
        // Emitted under the lock, so events keep the order of the changes they describe.
        self.emit(Event::node(EventKind::NodeJoined, version, node));
        drop(state);
        if let Some((old, replaced)) = previous {
            replaced.send_replace(true);
            let old = old.map(|a| a.to_string()).unwrap_or_default();
            info!(node, previous = %old, "node connected again: its previous stream is ended");
        }
        match address {
            Some(address) => info!(node, %address, "node joined"),
            None => info!(node, "node joined"),
        }
        self.node_updates.send_modify(|n| *n += 1);
        self.node_changed();
        Ok(NodeLink { store: Arc::clone(self), node: node.to_owned(), link, replaced: replaced_rx })
    }

    /// Forgets the nodes that left more than `--node-forget-after` ago; called now and then, so a node
    /// churn leaves no trail of records.
    pub fn forget_nodes(&self) {
        let after = self.policy.node_forget_after;
        self.lock().nodes.forget(Instant::now(), after);
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
        record.left_at = Some(Instant::now());
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
}

// === impl NodeTable ===

impl NodeTable {
    /// Drops the records of nodes that left more than `after` before `now`.
    fn forget(&mut self, now: Instant, after: Duration) {
        let before = self.nodes.len();
        self.nodes.retain(|_, n| n.connected || n.left_at.is_none_or(|left| now.duration_since(left) < after));
        let forgotten = before - self.nodes.len();
        if forgotten > 0 {
            info!(forgotten, after = ?after, "forgot nodes that left (--node-forget-after)");
        }
    }

    /// True when a connected node's frontends listen on `ip` (as its hello said; an older node that said
    /// nothing is judged by the address its stream comes from).
    pub fn frontend_at(&self, ip: std::net::IpAddr) -> bool {
        self.nodes.values().filter(|n| n.connected).any(|n| match &n.frontends_on {
            Some(on) => on.covers(ip),
            None => n.address.is_some_and(|a| a.ip().to_canonical() == ip.to_canonical()),
        })
    }

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

    /// Waits until the node connects again on another link (then this one is over).
    pub async fn replaced(&mut self) {
        if self.replaced.wait_for(|replaced| *replaced).await.is_err() {
            // The record is gone (forgotten): nothing will replace this link.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        self.store.disconnect_node(&self.node, self.link);
    }
}
