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
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use contract::limit::Limit;
use contract::model::{BackendLoad, FrontendStatus, NodeReport, Protocol, RoutingSnapshot, ServiceKey};
use socket2::SockRef;
use tokio::{
    sync::{mpsc, watch},
    task::{JoinHandle, JoinSet},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, info, warn};

use crate::{
    access_log::{AccessLog, AccessLogTarget},
    error::{DataplaneError, FrontendError},
    listener,
    metrics::{DataMetrics, FrontendStats, GaugeSource, NodeGauges},
    relay::{
        self, RelayContext,
        pump::{PipePool, PumpStats},
        sources::SourceCaps,
    },
    stats::{BackendStats, Passive, StatsRegistry},
    table::RoutingTable,
    takeover::{FrontendOffer, Inherited, InheritedSockets, TakeoverStep},
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
    /// A UDP session whose backend has not answered yet ends after this long without a datagram.
    pub udp_unanswered_timeout: Duration,
    /// Most UDP sessions per frontend.
    pub udp_max_sessions: usize,
    /// Most UDP sessions per frontend and client address.
    pub udp_max_sessions_per_source: usize,
    /// Most UDP sessions per frontend and client /24 (IPv4) or /64 (IPv6).
    pub udp_max_sessions_per_prefix: usize,
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
    /// Unix socket on which the node hands its sockets to a successor (`--takeover`).
    pub takeover: Option<PathBuf>,
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
    /// Sockets taken over from the node that ran before, until the first snapshot opens them.
    inherited: HashMap<ServiceKey, InheritedSockets>,
    /// Requests of the takeover server, when the node has one.
    successor: Option<mpsc::Receiver<TakeoverStep>>,
}

/// An open frontend: one socket per worker, each inside its worker's task, which returns once `stop`
/// fires.
struct Frontend {
    local: SocketAddr,
    stats: Arc<FrontendStats>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Copies of the workers' sockets, kept for a successor when the node has `--takeover`.
    sockets: Vec<OwnedFd>,
}

// === impl Node ===

impl Node {
    /// A node with no frontends yet, its worker threads started and its access log open. Its counters
    /// are series of `metrics`.
    pub fn new(config: NodeConfig, metrics: &DataMetrics) -> Result<Self, DataplaneError> {
        let access_log = match &config.access_log {
            Some(target) => Some(
                AccessLog::open(target, metrics.access_log_dropped.clone())
                    .map_err(|source| DataplaneError::AccessLog { target: target.to_string(), source })?,
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
            // Never longer than the idle timeout: an answer only ever lengthens a session.
            udp_unanswered_timeout: config.udp_unanswered_timeout.min(config.udp_idle_timeout),
            udp_max_sessions: config.udp_max_sessions,
            udp_max_sessions_per_source: config.udp_max_sessions_per_source,
            udp_max_sessions_per_prefix: config.udp_max_sessions_per_prefix,
            pipes: PipePool::new(config.splice_pipes, config.pipe_size, Arc::clone(&client_fds)),
            client_fds,
            max_connections_per_service: config.max_connections_per_service,
            queue_timeout: config.queue_timeout,
            first_byte_timeout: config.first_byte_timeout,
            connections: TaskTracker::new(),
            access_log,
            handed_over: CancellationToken::new(),
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
            inherited: HashMap::new(),
            successor: None,
        })
    }

    /// The channel on which the node's takeover server asks for its sockets and releases it.
    pub fn takeover_link(&mut self) -> mpsc::Sender<TakeoverStep> {
        let (steps, requests) = mpsc::channel(1);
        self.successor = Some(requests);
        steps
    }

    /// Serves the routing state taken over from the node that ran before on its sockets (a service
    /// without them is bound as usual), then releases that node; returns the state, which
    /// [`run`](Node::run) follows the controller from.
    pub async fn inherit(&mut self, inherited: Inherited) -> RoutingSnapshot {
        let Inherited { snapshot, frontends, predecessor, .. } = inherited;
        self.inherited = frontends;
        let statuses = self.apply(&snapshot).await;
        let failed = statuses.iter().filter(|status| status.result.is_err()).count();
        info!(node = %self.config.node_id, version = snapshot.version, frontends = statuses.len(), failed, "serving on the sockets taken over");
        // Sockets of services the snapshot does not list close here; the old node still holds its own.
        self.inherited.clear();
        if let Err(error) = predecessor.release().await {
            warn!(node = %self.config.node_id, %error, "the old node did not confirm that it stopped accepting");
        }
        snapshot
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
        let mut successor = self.successor.take();
        let mut changed = true;
        loop {
            if changed {
                let snapshot = Arc::clone(&snapshots.borrow_and_update());
                let span = tracing::info_span!("apply", node = %self.config.node_id, version = snapshot.version);
                let frontends = self.apply(&snapshot).instrument(span).await;
                if reports.send(NodeReport::Applied { version: snapshot.version, frontends }).is_err() {
                    break;
                }
            }
            changed = true;
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { break },
                _ = shutdown.wait_for(|stop| *stop) => break,
                Some(step) = next_step(&mut successor) => match step {
                    TakeoverStep::Offer(reply) => {
                        let _ = reply.send(self.offer());
                        changed = false;
                    }
                    TakeoverStep::Release(reply) => {
                        self.ctx.handed_over.cancel();
                        let _ = reply.send(());
                        break;
                    }
                },
            }
        }
        reporter.abort();
        self.stop().await;
    }

    /// Copies of every frontend's sockets, with the routing state they serve, for a successor. All or
    /// nothing: a socket left out would keep the connections the kernel queues on it once this node stops.
    fn offer(&self) -> std::io::Result<FrontendOffer> {
        let frontends = self
            .frontends
            .iter()
            .map(|(&service, frontend)| {
                let copies = frontend.sockets.iter().map(OwnedFd::try_clone).collect::<std::io::Result<_>>()?;
                Ok((service, copies))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(FrontendOffer { snapshot: Arc::clone(&self.state.borrow().snapshot), frontends })
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
                frontend.close(&self.config.node_id, service, false).await;
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
        let count = self.workers.len();
        let bind_error = |source| FrontendError::Bind { addr, source };
        let inherited = self.inherited.remove(&service);
        let keep = self.config.takeover.is_some();
        let (ctx, workers) = (&self.ctx, &self.workers);
        let stats = self.metrics.frontend(service);
        let opened = match service.protocol {
            Protocol::Tcp => {
                let inherited = match inherited {
                    Some(InheritedSockets::Tcp(sockets)) => reuse(sockets, addr, count, listener::join_tcp),
                    _ => None,
                };
                inherited.unwrap_or_else(|| listener::bind_tcp(addr, count)).and_then(|sockets| {
                    let local = sockets[0].local_addr().map_err(bind_error)?;
                    let kept = copies(&sockets, keep).map_err(bind_error)?;
                    // Lives as long as the frontend: the service's connections across workers and snapshots.
                    let slots = Limit::new("TCP connections of one service", ctx.max_connections_per_service);
                    // A TCP frontend also stops accepting when a successor accepts on the same sockets.
                    let stop = ctx.handed_over.child_token();
                    let serve = |socket| {
                        let (ctx, stats, slots) = (Arc::clone(ctx), Arc::clone(&stats), Arc::clone(&slots));
                        relay::tcp::serve(socket, service, ctx, stats, slots, stop.clone())
                    };
                    Ok((local, workers.spawn_each(sockets, serve), stop, kept))
                })
            }
            Protocol::Udp => {
                let inherited = match inherited {
                    Some(InheritedSockets::Udp(sockets)) => reuse(sockets, addr, count, listener::join_udp),
                    _ => None,
                };
                inherited.unwrap_or_else(|| listener::bind_udp(addr, count)).and_then(|sockets| {
                    let local = sockets[0].local_addr().map_err(bind_error)?;
                    let kept = copies(&sockets, keep).map_err(bind_error)?;
                    let slots = Limit::new("UDP sessions of one frontend", ctx.udp_max_sessions);
                    let sources = SourceCaps::new(ctx.udp_max_sessions_per_source, ctx.udp_max_sessions_per_prefix);
                    let stop = CancellationToken::new();
                    let serve = |socket| {
                        let (ctx, stats) = (Arc::clone(ctx), Arc::clone(&stats));
                        let bounds = relay::udp::Bounds { slots: Arc::clone(&slots), sources: Arc::clone(&sources) };
                        relay::udp::serve(socket, service, ctx, stats, bounds, stop.clone())
                    };
                    Ok((local, workers.spawn_each(sockets, serve), stop, kept))
                })
            }
        };
        match opened {
            Ok((local, tasks, stop, sockets)) => {
                info!(node = %self.config.node_id, %service, addr = %local, workers = count, "port opened");
                self.failures.remove(&service);
                self.frontends.insert(service, Frontend { local, stats, stop, tasks, sockets });
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

    /// Stops accepting, then gives open connections the drain timeout to finish before closing them. After
    /// a takeover, UDP frontends first carry their sessions' replies until the sessions are idle, within
    /// the same time.
    async fn stop(mut self) {
        let grace = self.config.drain_timeout;
        let deadline = tokio::time::Instant::now() + grace;
        let handed_over = self.ctx.handed_over.is_cancelled();
        if handed_over {
            for frontend in self.frontends.values_mut() {
                let _ = tokio::time::timeout_at(deadline, frontend.finished()).await;
            }
        }
        for (service, frontend) in self.frontends.drain() {
            frontend.close(&self.config.node_id, service, handed_over).await;
        }
        self.drains.shutdown().await;
        let connections = &self.ctx.connections;
        connections.close();
        if !connections.is_empty() {
            info!(node = %self.config.node_id, open = connections.len(), ?grace, "waiting for open connections");
            if tokio::time::timeout_at(deadline, connections.wait()).await.is_err() {
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
    /// Stops accepting and releases the port before returning (after a takeover, only this process's
    /// copies: the successor serves the port).
    async fn close(mut self, node: &str, service: ServiceKey, handed_over: bool) {
        self.stop.cancel();
        // Waiting for the tasks is what guarantees the sockets are closed by the time the node acknowledges
        // the snapshot.
        self.finished().await;
        match handed_over {
            true => info!(node, %service, addr = %self.local, "port handed over"),
            false => info!(node, %service, addr = %self.local, "port closed"),
        }
    }

    /// Waits for the frontend's tasks to return.
    async fn finished(&mut self) {
        while let Some(task) = self.tasks.last_mut() {
            let _ = task.await;
            self.tasks.pop();
        }
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

impl GaugeSource for NodeHandle {
    fn gauges(&self) -> NodeGauges {
        let (state, relay, (client_fds, client_fds_max)) = (self.state(), self.pump_stats(), self.client_fds());
        NodeGauges {
            snapshot_version: state.snapshot.version,
            frontends: state.frontends.iter().filter(|f| f.result.is_ok()).count() as u64,
            workers: self.workers as u64,
            pipes_in_use: relay.pipes_in_use as u64,
            pipes: relay.pipes as u64,
            client_fds: client_fds as u64,
            client_fds_max: client_fds_max as u64,
            spliced_bytes: relay.spliced_bytes,
            copied_bytes: relay.copied_bytes,
            pipe_pool_empty: relay.pipe_pool_empty,
        }
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

/// The next request of the takeover server; never, for a node without one.
async fn next_step(successor: &mut Option<mpsc::Receiver<TakeoverStep>>) -> Option<TakeoverStep> {
    match successor {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// Sockets taken over for a frontend, when they are bound where this node binds it (another
/// `--frontend-address` binds anew), one more per worker if this node has more workers than the old one.
fn reuse<S: AsFd>(
    mut sockets: Vec<S>,
    addr: SocketAddr,
    workers: usize,
    join: fn(SocketAddr, usize) -> std::io::Result<Vec<S>>,
) -> Option<Result<Vec<S>, FrontendError>> {
    let local = SockRef::from(sockets.first()?).local_addr().ok()?.as_socket()?;
    if local != addr {
        return None;
    }
    if sockets.len() < workers {
        match join(local, workers - sockets.len()) {
            Ok(more) => sockets.extend(more),
            Err(source) => return Some(Err(FrontendError::Bind { addr, source })),
        }
    }
    Some(Ok(sockets))
}

/// Copies of a frontend's sockets, for a successor; none when the node hands nothing over.
fn copies<S: AsFd>(sockets: &[S], keep: bool) -> std::io::Result<Vec<OwnedFd>> {
    if !keep {
        return Ok(Vec::new());
    }
    sockets.iter().map(|socket| socket.as_fd().try_clone_to_owned()).collect()
}
