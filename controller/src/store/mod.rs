//! The store: the controller's single source of truth, in rooms around one [`State`]:
//!
//! - [`registry`]: services, backends and registrations, with their invariants and the snapshot they make.
//! - [`changes`]: every change of the registry, each validated on a draft and committed by [`Store::commit`].
//! - [`registration`]: the handle a live registration holds; dropping it removes what it registered.
//! - [`nodes`]: connected nodes, the addresses their frontends listen on and their bind results (the
//!   verdict a registration waits for).
//! - [`load`]: the nodes' connection counts summed into each node's cluster view, and servers' load reports.
//! - [`policy`]: the ports services may use and the bounds on what registrations may hold.
//! - [`events`]: the broadcast of state changes.
//! - [`replication`]: the port commits are published through: alone, at once; with replicas, through the
//!   shared store (`crate::replica`).
//! - [`shared`]: with replicas, the backends this controller publishes and the ones it imports, the
//!   operators' choices made anywhere, and the snapshots made from the shared store.
//! - [`statics`]: the static backends of the configuration file, each (re)load one version.
//! - [`view`]: the read model operators see, and `--print-state`.
//!
//! The commit path, top to bottom: a change takes the lock, returns early when it changes nothing (no
//! version), copies the registry into a draft, applies itself to the draft, and hands the draft to
//! [`Store::commit`] (or to `Store::keep` when no snapshot shows the change). The commit checks the invariants: a draft that breaks one is refused (the caller
//! gets [`StoreError::Invariant`], nothing is published). Otherwise the draft becomes the registry, the
//! version goes up by one, and the snapshot of that version is published on a watch channel that every
//! node follows.

mod changes;
pub mod events;
pub mod load;
pub mod nodes;
mod policy;
pub mod registration;
mod registry;
pub mod replication;
pub mod shared;
pub mod statics;
mod view;

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use contract::model::{Event, RoutingSnapshot};
use tokio::sync::{broadcast, watch};
use tracing::error;

pub use load::ClusterLoadFeed;
pub use nodes::{EMBEDDED_NODE, FrontendVerdict, NodeLink};
pub use policy::{PortRanges, RegistryLimits};
pub use registration::{Credential, Origin, OriginKind, Registration, Requester};
pub use replication::{InMemory, Replication};

use self::{nodes::NodeTable, registry::Registry};
use crate::{error::StoreError, metrics::ControllerMetrics};

/// Which ports services may use, and which backends are the balancer itself.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `--allowed-ports`.
    pub allowed_ports: PortRanges,
    /// The controller's own listeners: their ports are never a frontend, their addresses never a backend.
    pub own_listeners: Vec<SocketAddr>,
    /// Where the embedded node binds its frontends (none without an embedded node).
    pub frontend_ip: Option<IpAddr>,
    /// Bounds on what registrations may make the store hold.
    pub limits: RegistryLimits,
    /// A server's load report counts this long (`--load-report-max-age`).
    pub load_report_max_age: std::time::Duration,
    /// The registration token is set: only an authenticated registration or an operator chooses a
    /// service's algorithm and PROXY protocol.
    pub settings_need_authority: bool,
    /// A node that left is forgotten this long after (`--node-forget-after`).
    pub node_forget_after: std::time::Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_ports: PortRanges::default(),
            own_listeners: Vec::new(),
            frontend_ip: None,
            limits: RegistryLimits::default(),
            load_report_max_age: std::time::Duration::from_secs(10),
            settings_need_authority: false,
            node_forget_after: std::time::Duration::from_secs(600),
        }
    }
}

/// The store. See the module documentation.
#[derive(Debug)]
pub struct Store {
    /// A std mutex, not tokio's: critical sections are short, never hold an `.await`, and are taken from
    /// both async tasks and `Drop`.
    state: Mutex<State>,
    policy: Policy,
    print_state: bool,
    snapshots: watch::Sender<Arc<RoutingSnapshot>>,
    /// Bumped on every node report, so registrations waiting for bind results wake up.
    node_updates: watch::Sender<u64>,
    /// Every state change, for `Admin.WatchEvents`.
    events: broadcast::Sender<Event>,
    /// The latest events, numbered, for the dashboard.
    recent: Mutex<events::Recent>,
    /// What the store counts for `/metrics`.
    metrics: ControllerMetrics,
    /// How commits reach nodes: at once, or through the shared store.
    replication: Arc<dyn Replication>,
    /// Every connected node's counts summed, computed once per change of any of them and outside the
    /// state lock; each node's view is this less its own rows.
    totals: Mutex<load::ClusterTotals>,
}

/// Everything behind the store's lock.
#[derive(Debug, Default)]
struct State {
    /// Version of the last published snapshot.
    version: u64,
    /// What the snapshots are made of.
    registry: Registry,
    /// Who follows them.
    nodes: NodeTable,
    /// When the latest versions were published, for the time nodes take to ack them.
    published: VecDeque<(u64, Instant)>,
}

/// Versions whose publication time is kept.
const PUBLISHED_KEPT: usize = 64;

// === impl Store ===

impl Store {
    /// An empty store at version 0, alone: every commit is published at once.
    pub fn new(policy: Policy, print_state: bool) -> Arc<Self> {
        Self::with_replication(policy, print_state, Arc::new(InMemory))
    }

    /// An empty store at version 0 whose commits reach nodes through `replication`. With a shared store
    /// (`--store etcd://`), commits change the registry (this controller's registrations and what it
    /// imported) but publish nothing; the replica publishes the snapshot of every etcd revision, the same
    /// on every controller.
    pub fn with_replication(policy: Policy, print_state: bool, replication: Arc<dyn Replication>) -> Arc<Self> {
        Arc::new(Store {
            state: Mutex::default(),
            policy,
            print_state,
            snapshots: watch::Sender::new(Arc::default()),
            node_updates: watch::Sender::new(0),
            events: broadcast::Sender::new(1024),
            recent: Mutex::default(),
            metrics: ControllerMetrics::default(),
            replication,
            totals: Mutex::default(),
        })
    }

    /// Follows the published snapshots (what a node consumes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingSnapshot>> {
        self.snapshots.subscribe()
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<RoutingSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// The gate every change passes: `draft` becomes the registry and is published as the next version,
    /// unless it breaks an invariant; then nothing changes and the caller gets the error. Called with the
    /// lock held, so versions are published in order and never twice.
    fn commit(&self, state: &mut State, draft: Registry) -> Result<u64, StoreError> {
        Self::check(state, &draft)?;
        state.version += 1;
        state.registry = draft;
        let version = state.version;
        if let Some(snapshot) = self.replication.committed(&|| state.registry.snapshot(version)) {
            self.snapshots.send_replace(Arc::new(snapshot));
        }
        if state.published.len() == PUBLISHED_KEPT {
            state.published.pop_front();
        }
        state.published.push_back((version, Instant::now()));
        Ok(version)
    }

    /// Refuses a change while the shared store cannot be reached.
    pub fn check_shared(&self) -> Result<(), StoreError> {
        self.replication.check()
    }

    /// A node of this controller joined, left or acked.
    fn node_changed(&self) {
        self.replication.nodes_changed();
    }

    /// What the store counts for `/metrics`.
    pub fn metrics(&self) -> &ControllerMetrics {
        &self.metrics
    }

    /// Live registrations per origin.
    pub fn registrations_by_origin(&self) -> [(OriginKind, usize); 5] {
        let state = self.lock();
        let count = |kind| state.registry.registrations.values().filter(|r| r.origin.kind == kind).count();
        OriginKind::ALL.map(|kind| (kind, count(kind)))
    }

    /// The same gate for a change that no snapshot shows (a registration opened or closed with nothing
    /// routed, a verdict or an operator's choice that routes nothing yet): checked, kept, not published.
    fn keep(state: &mut State, draft: Registry) -> Result<(), StoreError> {
        Self::check(state, &draft)?;
        state.registry = draft;
        Ok(())
    }

    fn check(state: &State, draft: &Registry) -> Result<(), StoreError> {
        draft.check_invariants().map_err(|broken| {
            error!(%broken, version = state.version, "change refused: it would break a store invariant");
            StoreError::Invariant(broken)
        })
    }

    fn print(&self, state: &State) {
        if self.print_state {
            eprint!("{}", state.view(self.policy.load_report_max_age));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: changes are made on a draft
        // and committed last, so the state behind a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests;
