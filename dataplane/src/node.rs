//! The node: applies each routing snapshot (swap the table, close frontends whose service left, open
//! frontends for new services) and reports what it did and how loaded its backends are.
//!
//! A node knows nothing about where snapshots come from: the controller's embedded node reads the store's
//! watch channel directly, a remote node a gRPC stream. Both run this same loop.
//!
//! Connections outlive the routing state that created them: a removed backend's connections go on until
//! `drain_timeout`, and a node told to stop closes its frontends, then waits up to the same grace for its
//! connections to finish.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use contract::limit::Limit;
use contract::model::{BackendLoad, FrontendStatus, NodeReport, Protocol, RoutingSnapshot, ServiceKey};
use tokio::{
    sync::{mpsc, watch},
    task::{JoinHandle, JoinSet},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, info, warn};

use crate::{
    DataplaneError, FrontendError,
    access_log::{AccessLog, AccessLogTarget},
    listener,
    metrics::{DataMetrics, FrontendStats},
    relay::{
        self, RelayContext,
        pump::{PipePool, PumpStats},
    },
    stats::{BackendStats, Passive, StatsRegistry},
    table::RoutingTable,
    workers::Workers,
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
    /// Passive health of backends.
    pub passive: Passive,
    /// Time a client has to send its PROXY header, on services that accept one.
    pub accept_proxy_timeout: Duration,
    /// A UDP session with no traffic for this long ends.
    pub udp_idle_timeout: Duration,
    /// Most UDP sessions per frontend.
    pub udp_max_sessions: usize,
    /// Shortest time between two load reports.
    pub load_report_interval: Duration,
    /// How long connections of a removed backend go on, and how long a stopping node waits for its
    /// connections.
    pub drain_timeout: Duration,
    /// File descriptors clients may hold (two per TCP connection, one per UDP session); the rest of the
    /// process's limit stays for the control plane.
    pub client_fds: usize,
    /// Most TCP connections at once per service.
    pub max_connections_per_service: usize,
    /// How long a client past that bound waits for a slot.
    pub queue_timeout: Duration,
    /// A TCP client silent for this long after connecting is closed (none: never).
    pub first_byte_timeout: Option<Duration>,
    /// Data-path worker threads (at least one).
    pub workers: usize,
    /// Most splice pipes (0: never splice).
    pub splice_pipes: usize,
    /// Capacity asked of each splice pipe, in bytes.
    pub pipe_size: usize,
    /// Where to write one line per finished connection or session (none: nowhere).
    pub access_log: Option<AccessLogTarget>,
}

/// What the node serves now, for its admin API.
#[derive(Clone, Debug, Default)]
pub struct ServedState {
    /// The routing state in force (during a controller's warm-up, more than the controller sent).
    pub snapshot: Arc<RoutingSnapshot>,
    /// One entry per service of `snapshot`.
    pub frontends: Vec<FrontendStatus>,
    /// How long applying `snapshot` took, from receiving it to its report being ready.
    pub apply_time: Duration,
}

/// Read access to a running node, for its admin API.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    state: watch::Receiver<ServedState>,
    stats: Arc<StatsRegistry>,
    ctx: Arc<RelayContext>,
    workers: usize,
}

/// One data-plane node.
pub struct Node {
    config: NodeConfig,
    workers: Workers,
    ctx: Arc<RelayContext>,
    stats: Arc<StatsRegistry>,
    metrics: DataMetrics,
    frontends: HashMap<ServiceKey, Frontend>,
    /// Last bind error per service, so a failure repeated on every snapshot is logged once.
    failures: HashMap<ServiceKey, String>,
    state: watch::Sender<ServedState>,
    /// Drain timers of removed backends.
    drains: JoinSet<()>,
}

/// An open frontend: one socket per worker, each inside its worker's task, which returns once `stop`
/// fires.
struct Frontend {
    local: SocketAddr,
    stats: Arc<FrontendStats>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

// === impl Node ===

impl Node {
    /// A node with no frontends yet, its worker threads started and its access log open. Its counters
    /// are series of `metrics`.
    pub fn new(config: NodeConfig, metrics: &DataMetrics) -> Result<Self, DataplaneError> {
        let access_log = match &config.access_log {
            Some(target) => Some(
                AccessLog::open(target, metrics.access_log_dropped.clone())
                    .map_err(|source| DataplaneError::AccessLog { target: target.clone(), source })?,
            ),
            None => None,
        };
        let workers = Workers::start(config.workers).map_err(DataplaneError::Workers)?;
        let client_fds = Limit::new("client file descriptors", config.client_fds);
        let ctx = Arc::new(RelayContext {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            connect_timeout: config.connect_timeout,
            passive: config.passive,
            accept_proxy_timeout: config.accept_proxy_timeout,
            udp_idle_timeout: config.udp_idle_timeout,
            udp_max_sessions: config.udp_max_sessions,
            pipes: PipePool::new(config.splice_pipes, config.pipe_size, Arc::clone(&client_fds)),
            client_fds,
            max_connections_per_service: config.max_connections_per_service,
            queue_timeout: config.queue_timeout,
            first_byte_timeout: config.first_byte_timeout,
            connections: TaskTracker::new(),
            access_log,
        });
        let passive = config.passive;
        Ok(Node {
            config,
            workers,
            ctx,
            stats: Arc::new(StatsRegistry::new(metrics.clone(), passive)),
            metrics: metrics.clone(),
            frontends: HashMap::new(),
            failures: HashMap::new(),
            state: watch::Sender::new(ServedState::default()),
            drains: JoinSet::new(),
        })
    }

    /// Read access to this node's state and counters, valid while it runs.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            state: self.state.subscribe(),
            stats: Arc::clone(&self.stats),
            ctx: Arc::clone(&self.ctx),
            workers: self.workers.len(),
        }
    }

    /// Applies every snapshot published on `snapshots` and reports on `reports`, until `shutdown` turns
    /// true, the snapshot source goes away, or nobody reads the reports. Then it stops accepting, closes
    /// every frontend, and waits up to the drain timeout for open connections before returning.
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
            let span = tracing::info_span!("apply", node = %self.config.node_id, version = snapshot.version);
            let frontends = self.apply(&snapshot).instrument(span).await;
            if reports.send(NodeReport::Applied { version: snapshot.version, frontends }).is_err() {
                break;
            }
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { break },
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        reporter.abort();
        self.stop().await;
    }

    async fn apply(&mut self, received: &RoutingSnapshot) -> Vec<FrontendStatus> {
        let started = std::time::Instant::now();
        let snapshot = received.applied_over(&self.state.borrow().snapshot);
        // The new table first: connections accepted from here on see the new backends.
        let old = self.ctx.table.load_full();
        let table = RoutingTable::build(&snapshot, &old, &self.stats);
        for (service, backend) in old.entries() {
            if !table.contains(&service, backend.address) && backend.stats.active() > 0 {
                self.schedule_drain(service, backend.address, Arc::clone(&backend.stats));
            }
        }
        self.ctx.table.store(Arc::new(table));
        self.stats.retain_services(|service| snapshot.services.contains_key(service));

        let gone: Vec<ServiceKey> =
            self.frontends.keys().filter(|service| !snapshot.services.contains_key(service)).copied().collect();
        for service in gone {
            if let Some(frontend) = self.frontends.remove(&service) {
                self.metrics.forget_frontend(&frontend.stats);
                frontend.close(&self.config.node_id, service).await;
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
        if received.warming_up && snapshot.services.len() > received.services.len() {
            info!(
                node = %self.config.node_id,
                kept = snapshot.services.len() - received.services.len(),
                "controller warming up: keeping services it does not list yet"
            );
        }
        let apply_time = started.elapsed();
        self.metrics.apply_time.observe(apply_time.as_secs_f64());
        self.state.send_replace(ServedState { snapshot: Arc::new(snapshot), frontends: statuses.clone(), apply_time });
        statuses
    }

    /// Closes the connections of a backend that left rotation once the drain timeout is over, unless it
    /// is back in rotation by then.
    fn schedule_drain(&mut self, service: ServiceKey, backend: SocketAddr, stats: Arc<BackendStats>) {
        let ctx = Arc::clone(&self.ctx);
        let drain = self.config.drain_timeout;
        let generation = stats.left_rotation();
        info!(%service, %backend, open = stats.active(), ?drain, "backend left rotation: draining its connections");
        self.drains.spawn(async move {
            tokio::time::sleep(drain).await;
            // Back in rotation by now: its connections are welcome again.
            if !ctx.table.load().contains(&service, backend) && stats.active() > 0 {
                info!(%service, %backend, "drain timeout: closing the connections opened before it left");
                stats.evict_through(generation);
            }
        });
        while self.drains.try_join_next().is_some() {}
    }

    fn open(&mut self, service: ServiceKey) -> Result<SocketAddr, String> {
        let addr = SocketAddr::new(self.config.frontend_address, service.port);
        let stop = CancellationToken::new();
        let count = self.workers.len();
        let local_of =
            |local: std::io::Result<SocketAddr>| local.map_err(|source| FrontendError::Bind { addr, source });
        let (ctx, workers) = (&self.ctx, &self.workers);
        let stats = self.metrics.frontend(service);
        let opened = match service.protocol {
            Protocol::Tcp => listener::bind_tcp(addr, count).and_then(|sockets| {
                let local = local_of(sockets[0].local_addr())?;
                // Lives as long as the frontend: the service's connections across workers and snapshots.
                let slots = Limit::new("TCP connections of one service", ctx.max_connections_per_service);
                let serve = |socket| {
                    let (ctx, stats, slots) = (Arc::clone(ctx), Arc::clone(&stats), Arc::clone(&slots));
                    relay::tcp::serve(socket, service, ctx, stats, slots, stop.clone())
                };
                Ok((local, workers.spawn_each(sockets, serve)))
            }),
            Protocol::Udp => listener::bind_udp(addr, count).and_then(|sockets| {
                let local = local_of(sockets[0].local_addr())?;
                let slots = Limit::new("UDP sessions of one frontend", ctx.udp_max_sessions);
                let serve = |socket| {
                    let (ctx, stats, slots) = (Arc::clone(ctx), Arc::clone(&stats), Arc::clone(&slots));
                    relay::udp::serve(socket, service, ctx, stats, slots, stop.clone())
                };
                Ok((local, workers.spawn_each(sockets, serve)))
            }),
        };
        match opened {
            Ok((local, tasks)) => {
                info!(node = %self.config.node_id, %service, addr = %local, workers = count, "port opened");
                self.failures.remove(&service);
                self.frontends.insert(service, Frontend { local, stats, stop, tasks });
                Ok(local)
            }
            Err(error) => {
                self.metrics.forget_frontend(&stats);
                let error = error.to_string();
                if self.failures.get(&service) != Some(&error) {
                    warn!(node = %self.config.node_id, %service, %error, "port could not be opened");
                    self.failures.insert(service, error.clone());
                }
                Err(error)
            }
        }
    }

    /// Stops accepting, then gives open connections the drain timeout to finish before closing them.
    async fn stop(mut self) {
        for (service, frontend) in self.frontends.drain() {
            frontend.close(&self.config.node_id, service).await;
        }
        self.drains.shutdown().await;
        let connections = &self.ctx.connections;
        connections.close();
        if !connections.is_empty() {
            let grace = self.config.drain_timeout;
            info!(node = %self.config.node_id, open = connections.len(), ?grace, "waiting for open connections");
            if tokio::time::timeout(grace, connections.wait()).await.is_err() {
                warn!(node = %self.config.node_id, open = connections.len(), "grace over: closing the remaining connections");
                self.stats.evict_all();
                connections.wait().await;
            }
        }
        info!(node = %self.config.node_id, "node stopped");
    }
}

// === impl Frontend ===

impl Frontend {
    /// Stops accepting and releases the port before returning.
    async fn close(self, node: &str, service: ServiceKey) {
        self.stop.cancel();
        // Waiting for the tasks is what guarantees the sockets are closed by the time the node acknowledges
        // the snapshot.
        for task in self.tasks {
            let _ = task.await;
        }
        info!(node, %service, addr = %self.local, "port closed");
    }
}

// === impl NodeHandle ===

impl NodeHandle {
    /// What the node serves now.
    pub fn state(&self) -> ServedState {
        self.state.borrow().clone()
    }

    /// The node's per-backend counters, each with the other nodes' connections as last reported.
    pub fn load(&self) -> Vec<(BackendLoad, u64)> {
        self.stats.collect_with_remote()
    }

    /// Data-path worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Descriptors the node's clients hold now, and may hold at most.
    pub fn client_fds(&self) -> (usize, usize) {
        (self.ctx.client_fds.held(), self.ctx.client_fds.max())
    }

    /// What the TCP relay's pumps have moved, and how.
    pub fn pump_stats(&self) -> PumpStats {
        self.ctx.pipes.stats()
    }

    /// Takes in the other nodes' connection counts (sums per backend), for the load-aware algorithms.
    pub fn set_remote_load(&self, rows: &[BackendLoad]) {
        self.stats.set_remote(rows);
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
