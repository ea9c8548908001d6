//! The node: applies each routing snapshot (swap the table, close frontends whose service left, open
//! frontends for new services) and reports what it did and how loaded its backends are.
//!
//! A node knows nothing about where snapshots come from: the controller's embedded node reads the store's
//! watch channel directly, a remote node a gRPC stream. Both run this same loop.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    listener,
    relay::{self, RelayContext},
    snapshot::{Protocol, RoutingSnapshot, ServiceKey},
    stats::{BackendLoad, StatsRegistry},
    table::RoutingTable,
};

/// Settings of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Name under which the node reports.
    pub node_id: String,
    /// IP address every frontend binds.
    pub frontend_address: IpAddr,
    /// Time allowed to connect to one backend before the next is tried.
    pub connect_timeout: Duration,
    /// A UDP session with no traffic for this long ends.
    pub udp_idle_timeout: Duration,
    /// Most UDP sessions per frontend.
    pub udp_max_sessions: usize,
    /// Shortest time between two load reports.
    pub load_report_interval: Duration,
}

/// What a node tells whoever feeds it snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeReport {
    /// A snapshot version is in force on this node (an ACK, with a NACK per frontend that failed).
    Applied {
        /// The version applied.
        version: u64,
        /// One entry per service of that snapshot.
        frontends: Vec<FrontendStatus>,
    },
    /// The node's per-backend counters changed.
    Load(Vec<BackendLoad>),
}

/// Whether a node listens for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendStatus {
    /// The service.
    pub service: ServiceKey,
    /// The bound address, or why binding failed (`bind ADDR: OS error`).
    pub result: Result<SocketAddr, String>,
}

/// One data-plane node.
pub struct Node {
    config: NodeConfig,
    ctx: Arc<RelayContext>,
    stats: Arc<StatsRegistry>,
    frontends: HashMap<ServiceKey, Frontend>,
    /// Last bind error per service, so a failure repeated on every snapshot is logged once.
    failures: HashMap<ServiceKey, String>,
}

/// An open frontend: its socket lives inside `task`.
struct Frontend {
    local: SocketAddr,
    task: JoinHandle<()>,
}

// === impl Node ===

impl Node {
    /// A node with no frontends yet.
    pub fn new(config: NodeConfig) -> Self {
        let ctx = Arc::new(RelayContext {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            connect_timeout: config.connect_timeout,
            udp_idle_timeout: config.udp_idle_timeout,
            udp_max_sessions: config.udp_max_sessions,
        });
        Node { config, ctx, stats: Arc::default(), frontends: HashMap::new(), failures: HashMap::new() }
    }

    /// Applies every snapshot published on `snapshots` and reports on `reports`, until `shutdown` turns
    /// true, the snapshot source goes away, or nobody reads the reports. Closes every frontend on the way out.
    pub async fn run(
        mut self,
        mut snapshots: watch::Receiver<Arc<RoutingSnapshot>>,
        reports: mpsc::UnboundedSender<NodeReport>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let reporter =
            tokio::spawn(report_load(Arc::clone(&self.stats), reports.clone(), self.config.load_report_interval));
        loop {
            let snapshot = Arc::clone(&snapshots.borrow_and_update());
            let frontends = self.apply(&snapshot).await;
            if reports.send(NodeReport::Applied { version: snapshot.version, frontends }).is_err() {
                break;
            }
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { break },
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        reporter.abort();
        for (service, frontend) in self.frontends.drain() {
            let addr = frontend.local;
            frontend.close().await;
            info!(node = %self.config.node_id, %service, %addr, "port closed");
        }
    }

    async fn apply(&mut self, snapshot: &RoutingSnapshot) -> Vec<FrontendStatus> {
        // The new table first: connections accepted from here on see the new backends.
        let table = RoutingTable::build(snapshot, &self.ctx.table.load(), &self.stats);
        self.ctx.table.store(Arc::new(table));

        let gone: Vec<ServiceKey> =
            self.frontends.keys().filter(|service| !snapshot.services.contains_key(service)).copied().collect();
        for service in gone {
            if let Some(frontend) = self.frontends.remove(&service) {
                let addr = frontend.local;
                frontend.close().await;
                info!(node = %self.config.node_id, %service, %addr, "port closed");
            }
        }
        self.failures.retain(|service, _| snapshot.services.contains_key(service));

        let mut statuses = Vec::with_capacity(snapshot.services.len());
        for &service in snapshot.services.keys() {
            let result = match self.frontends.get(&service) {
                Some(frontend) => Ok(frontend.local),
                // A service whose bind failed before is retried with every snapshot.
                None => self.open(service),
            };
            statuses.push(FrontendStatus { service, result });
        }
        statuses
    }

    fn open(&mut self, service: ServiceKey) -> Result<SocketAddr, String> {
        let addr = SocketAddr::new(self.config.frontend_address, service.port);
        let ctx = Arc::clone(&self.ctx);
        let opened = match service.protocol {
            Protocol::Tcp => listener::bind_tcp(addr).and_then(|l| {
                let local = l.local_addr().map_err(|source| crate::FrontendError::Bind { addr, source })?;
                Ok((local, tokio::spawn(relay::tcp::serve(l, service, ctx))))
            }),
            Protocol::Udp => listener::bind_udp(addr).and_then(|s| {
                let local = s.local_addr().map_err(|source| crate::FrontendError::Bind { addr, source })?;
                Ok((local, tokio::spawn(relay::udp::serve(s, service, ctx))))
            }),
        };
        match opened {
            Ok((local, task)) => {
                info!(node = %self.config.node_id, %service, addr = %local, "port opened");
                self.failures.remove(&service);
                self.frontends.insert(service, Frontend { local, task });
                Ok(local)
            }
            Err(error) => {
                let error = error.to_string();
                if self.failures.get(&service) != Some(&error) {
                    warn!(node = %self.config.node_id, %service, %error, "port could not be opened");
                    self.failures.insert(service, error.clone());
                }
                Err(error)
            }
        }
    }
}

// === impl Frontend ===

impl Frontend {
    /// Stops accepting and releases the port before returning: the socket is dropped with the task.
    async fn close(self) {
        self.task.abort();
        // `abort` only schedules the cancellation; awaiting the task is what guarantees the port is closed
        // by the time the node acknowledges the snapshot.
        let _ = self.task.await;
    }
}

/// Sends the node's counters whenever they changed, at most once per `interval`.
async fn report_load(stats: Arc<StatsRegistry>, reports: mpsc::UnboundedSender<NodeReport>, interval: Duration) {
    let mut last = Vec::new();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let rows = stats.collect();
        if rows != last {
            if reports.send(NodeReport::Load(rows.clone())).is_err() {
                return;
            }
            last = rows;
        }
    }
}
