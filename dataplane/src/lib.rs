//! The Switchboard data plane: a node owns one frontend socket per service of the current routing
//! snapshot and relays TCP connections and UDP sessions to the service's backends. It is a library so the
//! controller can embed a node, and the `dataplane` binary runs the very same node on other hosts, fed by
//! the controller's `Dataplane.Sync` stream.
//!
//! The node consumes snapshots from a `watch` channel and answers with `NodeReport`s (which frontends are
//! bound, per-backend connection counts); both types are the contract crate's. The data path reads one
//! immutable routing table per connection or new UDP session, swapped atomically, so it takes no lock. When the controller is gone a remote node
//! keeps serving its last snapshot.
//!
//! # Surface
//! What other crates use, all at this root: [`EmbeddedNode`] (with [`take_over`], [`Inherited`],
//! [`Successor`], [`RemoteLoad`] and [`metrics_endpoint`]) to embed a node, as the controller does;
//! [`Dataplane`] and [`Cli`] for the `dataplane` binary, which runs an [`EmbeddedNode`] too; [`NodeArgs`]
//! and [`NodeConfig`], a node's flags and settings; the error types. Every module is private.
//!
//! # Layout
//! - `embed`: the one way in, [`EmbeddedNode`].
//! - `node`: the reconcile loop: table swap, frontends opened and closed, drains, reports.
//! - `table`: a snapshot resolved for the data path.
//! - `balance`: which backend takes the next connection.
//! - `relay`: TCP and UDP relays.
//! - `listener`: how frontend sockets are bound.
//! - `stats`: per-backend connection counters and evictions; `metrics`: their Prometheus series, and
//!   the node's gauges, which the node hands it (a leaf, like `error`); `access_log`: one line per
//!   finished connection, written off the data path.
//! - `workers`: the data path's threads, one runtime per core.
//! - `proxy`: the PROXY protocol, sent to backends and read from a balancer in front (public with the
//!   `fuzzing` feature, for the fuzz targets).
//! - `sync`: the remote node's link to the controller; `sys`: the one module that calls libc, with a
//!   safe surface.
//! - `takeover`: upgrades that drop nothing: a successor takes over the listening sockets.
//! - `cli`, `admin`: the `dataplane` binary's flags (and [`NodeArgs`], which the controller takes for
//!   its embedded node) and admin HTTP server.

mod access_log;
mod admin;
mod balance;
mod cli;
mod embed;
mod error;
mod listener;
mod metrics;
mod node;
#[cfg(not(feature = "fuzzing"))]
mod proxy;
#[cfg(feature = "fuzzing")]
pub mod proxy;
mod relay;
mod stats;
mod sync;
mod sys;
mod table;
mod takeover;
mod workers;

use std::{net::SocketAddr, os::fd::AsFd, sync::Arc};

use contract::model::RoutingSnapshot;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};

pub use admin::metrics as metrics_endpoint;
pub use cli::{Cli, DataplaneConfig, NodeArgs};
pub use embed::{EmbeddedNode, RemoteLoad, Successor};
pub use error::{DataplaneError, TakeoverError};
pub use node::NodeConfig;
pub use takeover::{Inherited, take_over};

/// A `dataplane` process whose admin listener is bound, ready to [`run`](Dataplane::run).
#[derive(Debug)]
pub struct Dataplane {
    config: DataplaneConfig,
    admin: TcpListener,
    /// What the node that ran before at `--takeover` handed over.
    inherited: Option<Inherited>,
}

// === impl Dataplane ===

impl Dataplane {
    /// Takes over from the node at `--takeover` when one runs there, and binds the admin listener (port 0
    /// allowed; the old node's when it listens on the same address). Frontends are bound later, as
    /// snapshots list them.
    pub async fn bind(config: DataplaneConfig) -> Result<Self, DataplaneError> {
        let mut inherited = match &config.node.takeover {
            Some(path) => take_over(path).await?,
            None => None,
        };
        let addr = config.admin_listen;
        let admin = match inherited.as_mut().and_then(|inherited| inherited.listener("admin", addr)) {
            Some(listener) => TcpListener::from_std(listener),
            None => TcpListener::bind(addr).await,
        };
        let admin = admin.map_err(|source| DataplaneError::Bind { addr, source })?;
        Ok(Dataplane { config, admin, inherited })
    }

    /// Where the admin server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_listen)
    }

    /// The one line printed on stdout once serving.
    pub fn ready_line(&self) -> String {
        format!("READY admin={} node={}", self.admin_addr(), self.config.node.node_id)
    }

    /// Serves until `shutdown` turns true, then drains: frontends close at once, open connections get the
    /// drain timeout to finish. `ready` gets the READY line once the node serves: after a takeover, once
    /// it accepts on the old node's sockets, the old one has stopped, and `--takeover` is listened on.
    pub async fn run(
        self,
        shutdown: watch::Receiver<bool>,
        ready: impl FnOnce(&str) -> std::io::Result<()>,
    ) -> Result<(), DataplaneError> {
        let line = self.ready_line();
        let Dataplane { config, admin, inherited } = self;
        let mut registry = contract::metrics::registry("dataplane");
        let link = metrics::SyncMetrics::default();
        link.register(&mut registry);
        let mut node = EmbeddedNode::new(config.node.clone(), &mut registry)?;
        let first = match inherited {
            Some(inherited) => node.inherit(inherited).await,
            None => RoutingSnapshot::default(),
        };
        let takeover = config.node.takeover.as_deref().map(|path| node.listen_for_successor(path)).transpose()?;
        let (snapshots_tx, snapshots_rx) = watch::channel(Arc::new(first));
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(sync::SyncStatus::default());
        let settings = admin::AdminSettings {
            node_id: config.node.node_id.clone(),
            controllers: config.sync.controllers.clone(),
            registry: Arc::new(registry),
            token: config.admin_token.clone(),
        };
        // The admin server answers while the node drains, until the node is done or a successor took it.
        let (admin_stop, admin_stopped) = watch::channel(false);
        // For a successor, which takes it when it listens on the same address.
        let admin_copy = takeover.as_ref().and_then(|_| admin.as_fd().try_clone_to_owned().ok());
        let admin = tokio::spawn(admin::serve(admin, settings, node.handle(), status_rx, admin_stopped));
        let sync = tokio::spawn(sync::run(config.sync, snapshots_tx, reports_rx, status_tx, node.handle(), link));
        let successor = takeover.map(|takeover| {
            let listeners = admin_copy.into_iter().map(|fd| ("admin", fd)).collect();
            let (sync, admin_stop) = (sync.abort_handle(), admin_stop.clone());
            tokio::spawn(takeover.serve(listeners, move |taken| {
                // The successor may take this node's id: leave the controller now.
                sync.abort();
                if taken.iter().any(|name| name == "admin") {
                    admin_stop.send_replace(true);
                }
            }))
        });
        ready(&line).map_err(DataplaneError::Ready)?;
        node.run(snapshots_rx, reports_tx, shutdown).await;
        // The node is done: the controller sees the stream end and drops the node.
        sync.abort();
        if let Some(successor) = successor {
            successor.abort();
            let _ = successor.await;
        }
        admin_stop.send_replace(true);
        match admin.await {
            Ok(result) => result.map_err(DataplaneError::Admin),
            Err(_) => Ok(()),
        }
    }
}
