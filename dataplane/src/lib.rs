//! The Switchboard data plane: a node owns one frontend socket per service of the current routing
//! snapshot and relays TCP connections and UDP sessions to the service's backends. It is a library so the
//! controller can embed a node, and the `dataplane` binary runs the very same node on other hosts, fed by
//! the controller's `Dataplane.Sync` stream.
//!
//! The node consumes snapshots from a `watch` channel and answers with `NodeReport`s (which frontends are
//! bound, per-backend connection counts); both types are the contract crate's. The data path reads one immutable [`RoutingTable`] per connection
//! or new UDP session, swapped atomically, so it takes no lock. When the controller is gone a remote node
//! keeps serving its last snapshot.
//!
//! # Layout
//! - [`node`]: the reconcile loop: table swap, frontends opened and closed, drains, reports.
//! - [`table`]: a snapshot resolved for the data path.
//! - [`balance`]: which backend takes the next connection.
//! - [`relay`]: TCP and UDP relays.
//! - [`listener`]: how frontend sockets are bound.
//! - [`stats`]: per-backend connection counters and evictions; [`metrics`]: their Prometheus series, and
//!   the node's; [`access_log`]: one line per finished connection, written off the data path.
//! - [`workers`]: the data path's threads, one runtime per core.
//! - [`proxy`]: the PROXY protocol, sent to backends and read from a balancer in front.
//! - [`sync`]: the remote node's link to the controller; [`sys`]: the one module that calls libc.
//! - [`cli`], [`admin`]: the `dataplane` binary's flags (and [`NodeArgs`], which the controller takes for
//!   its embedded node) and admin HTTP server.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod cli;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod relay;
pub mod stats;
pub mod sync;
pub mod sys;
pub mod table;
pub mod workers;

use std::{net::SocketAddr, sync::Arc};

use contract::model::RoutingSnapshot;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};

pub use cli::{Cli, DataplaneConfig, NodeArgs};
pub use error::{DataplaneError, FrontendError};
pub use node::{Node, NodeConfig, NodeHandle, ServedState};
pub use table::RoutingTable;

/// A `dataplane` process whose admin listener is bound, ready to [`run`](Dataplane::run).
#[derive(Debug)]
pub struct Dataplane {
    config: DataplaneConfig,
    admin: TcpListener,
}

// === impl Dataplane ===

impl Dataplane {
    /// Binds the admin listener (port 0 allowed). Frontends are bound later, as snapshots list them.
    pub async fn bind(config: DataplaneConfig) -> Result<Self, DataplaneError> {
        let addr = config.admin_listen;
        let admin = TcpListener::bind(addr).await.map_err(|source| DataplaneError::Bind { addr, source })?;
        Ok(Dataplane { config, admin })
    }

    /// Where the admin server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_listen)
    }

    /// The one line printed on stdout once bound.
    pub fn ready_line(&self) -> String {
        format!("READY admin={} node={}", self.admin_addr(), self.config.node.node_id)
    }

    /// Serves until `shutdown` turns true, then drains: frontends close at once, open connections get the
    /// drain timeout to finish.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), DataplaneError> {
        let Dataplane { config, admin } = self;
        let mut registry = contract::metrics::registry("dataplane");
        let (data, link) = (metrics::DataMetrics::default(), metrics::SyncMetrics::default());
        data.register(&mut registry);
        link.register(&mut registry);
        let node = Node::new(config.node.clone(), &data)?;
        metrics::register_node(&mut registry, node.handle());
        let (snapshots_tx, snapshots_rx) = watch::channel(Arc::new(RoutingSnapshot::default()));
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(sync::SyncStatus::default());
        let settings = admin::AdminSettings {
            node_id: config.node.node_id.clone(),
            controllers: config.sync.controllers.clone(),
            registry: Arc::new(registry),
            token: config.admin_token.clone(),
        };
        let admin = tokio::spawn(admin::serve(admin, settings, node.handle(), status_rx, shutdown.clone()));
        let sync = tokio::spawn(sync::run(config.sync, snapshots_tx, reports_rx, status_tx, node.handle(), link));
        node.run(snapshots_rx, reports_tx, shutdown).await;
        // The node is done: the controller sees the stream end and drops the node.
        sync.abort();
        match admin.await {
            Ok(result) => result.map_err(DataplaneError::Admin),
            Err(_) => Ok(()),
        }
    }
}
