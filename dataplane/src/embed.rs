//! The crate's one way in: a node to embed in a process, the controller's or the `dataplane` binary's.
//! Everything the embedding process does with its node goes through [`EmbeddedNode`]: build it and
//! register its series, serve what a predecessor handed over, listen for a successor, feed it the other
//! nodes' load, and run it against a snapshot source and a report sink.

use std::{future::Future, os::fd::OwnedFd, path::Path, sync::Arc};

use contract::model::{BackendLoad, NodeReport, RoutingSnapshot};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};

use crate::{
    error::DataplaneError,
    metrics::{self, DataMetrics},
    node::{Node, NodeConfig, NodeHandle},
    takeover::{Inherited, TakeoverListener, TakeoverStep},
};

/// A data-plane node inside the process that runs it: its worker threads are started and its series
/// registered; it serves once [`run`](EmbeddedNode::run).
pub struct EmbeddedNode {
    node: Node,
}

/// The other nodes' connection counts, fed to a running node for its load-aware algorithms.
#[derive(Clone, Debug)]
pub struct RemoteLoad {
    node: NodeHandle,
}

/// The takeover socket a node listens on for its successor, bound and not yet served.
#[derive(Debug)]
pub struct Successor {
    listener: TakeoverListener,
    steps: mpsc::Sender<TakeoverStep>,
}

// === impl EmbeddedNode ===

impl EmbeddedNode {
    /// A node with no frontends yet, its worker threads started and its access log open, whose series
    /// (the data path's counters, and the gauges read at scrape time) are registered in `registry`.
    pub fn new(config: NodeConfig, registry: &mut Registry) -> Result<Self, DataplaneError> {
        let data = DataMetrics::default();
        data.register(registry);
        let node = Node::new(config, &data)?;
        metrics::register_node(registry, node.handle());
        Ok(EmbeddedNode { node })
    }

    /// Serves what the node that ran before handed over (see [`take_over`](crate::take_over)) on its
    /// sockets, then releases that node; returns the routing state served, which
    /// [`run`](EmbeddedNode::run) goes on from.
    pub async fn inherit(&mut self, inherited: Inherited) -> RoutingSnapshot {
        self.node.inherit(inherited).await
    }

    /// Listens on `path` (`--takeover`) for a successor; [`Successor::serve`] answers it.
    pub fn listen_for_successor(&mut self, path: &Path) -> Result<Successor, DataplaneError> {
        let listener = TakeoverListener::bind(path)?;
        Ok(Successor { listener, steps: self.node.takeover_link() })
    }

    /// Where the other nodes' connection counts go, for as long as the node runs.
    pub fn remote_load(&self) -> RemoteLoad {
        RemoteLoad { node: self.node.handle() }
    }

    /// Read access to the node's state and counters, for the admin server and the sync link.
    pub(crate) fn handle(&self) -> NodeHandle {
        self.node.handle()
    }

    /// Applies every snapshot published on `snapshots` and reports on `reports`, until `shutdown` turns
    /// true, the snapshot source goes away, or nobody reads the reports; then closes its frontends and
    /// waits up to the drain timeout for open connections.
    pub async fn run(
        self,
        snapshots: watch::Receiver<Arc<RoutingSnapshot>>,
        reports: mpsc::UnboundedSender<NodeReport>,
        shutdown: watch::Receiver<bool>,
    ) {
        self.node.run(snapshots, reports, shutdown).await;
    }
}

impl std::fmt::Debug for EmbeddedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedNode").field("node", &self.node.handle()).finish()
    }
}

// === impl RemoteLoad ===

impl RemoteLoad {
    /// Takes in the other nodes' connection counts (sums per backend), replacing the last ones.
    pub fn set(&self, rows: &[BackendLoad]) {
        self.node.set_remote_load(rows);
    }
}

// === impl Successor ===

impl Successor {
    /// Serves successors one at a time until one takes over: hands it the node's frontends and
    /// `listeners` (the process's other listening sockets, by name: `admin`; the controller's `json`,
    /// `grpc`), and once it accepts, has the node stop accepting and calls `released` with the names of
    /// the listeners it took; the node then drains. A successor that fails leaves everything as it was.
    pub fn serve<R>(self, listeners: Vec<(&'static str, OwnedFd)>, released: R) -> impl Future<Output = ()> + use<R>
    where
        R: FnOnce(&[String]),
    {
        self.listener.serve(self.steps, listeners, released)
    }
}
