//! `loadgen control-plane`: the controller at scale, measured from the outside.
//!
//! One process plays a whole cluster. Each simulated node holds a real `Dataplane.Sync` stream and speaks
//! as a `dataplane` does: `hello`, then for every snapshot an `ack` that reports every service of the
//! snapshot as listening (on `127.0.0.1:PORT`; nothing is bound: the controller only reads the report).
//! Backends are registered over `Registry` as an agent registers them, with their check's verdict, each
//! from its own loopback source address (`--backend-address` + `b`) so the controller sees the backend's
//! own host and no foreign-backend permission is needed. Nothing listens on the backends: the controller
//! probes a `Register` stream with hellos on the stream itself, which these streams answer.
//!
//! The run, in order:
//! 1. the nodes connect and ack the current snapshot;
//! 2. the first backend of every service registers, one registration at a time: each answer comes once
//!    every node acked the version (register → frontend open);
//! 3. the other backends register, every `Register` stream at once (each stream is serial);
//! 4. `--changes` health flips of one backend, which has its own `Register` stream: a `hello_ack` with the
//!    new verdict, as an agent pushes it; each is timed until every simulated node acked the next version
//!    (nothing else commits meanwhile, so the next version is the one that holds the change).
//!
//! Registrations live as long as their streams, so every stream stays open until the report is out
//! (`--hold`: until stdin closes too).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use contract::{
    auth::{Bearer, Token},
    client::{self, StreamError},
    v1::{
        self, ControllerMessage, FrontendResult, HelloAck, NodeHello, NodeMessage, RegisterAck, RegisterRequest,
        RegisterResponse, Registration, SnapshotAck, controller_message, dataplane_client::DataplaneClient,
        frontend_result, node_message, register_request, register_response, registry_client::RegistryClient,
    },
};
use prost::Message as _;
use serde::Serialize;
use tokio::{
    sync::{Mutex, mpsc, watch},
    task::{JoinHandle, JoinSet},
    time::{Instant, timeout},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};
use tracing::{info, warn};

use crate::{cli::ControlPlaneArgs, error::LoadError, target};

/// Why a control-plane run failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A connection or stream to the controller failed.
    #[error("{what}: {source}")]
    Controller {
        /// Who was talking to the controller.
        what: String,
        /// What went wrong.
        #[source]
        source: StreamError,
    },
    /// The controller refused a registration.
    #[error("the controller refused backend {backend} of tcp:{port}: {message}")]
    Refused {
        /// Service port.
        port: u16,
        /// The backend.
        backend: SocketAddr,
        /// The controller's reason.
        message: String,
    },
    /// A step did not finish within `--timeout`.
    #[error("{what}: no answer within {after:?}")]
    Timeout {
        /// The step.
        what: String,
        /// `--timeout`.
        after: Duration,
    },
    /// A stream ended before the run did.
    #[error("{what} ended: {why}")]
    Ended {
        /// The stream.
        what: String,
        /// Why, as far as known.
        why: String,
    },
    /// The figures do not describe the cluster asked for: a broken set-up, not a measurement.
    #[error("inconsistent run: {0}")]
    Inconsistent(String),
    /// The whole run took longer than `--time-limit`.
    #[error("the run did not finish within --time-limit {0:?}")]
    TimeLimit(Duration),
}

/// Percentiles of one timed step, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// The last snapshot the nodes acked.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SnapshotFigures {
    /// Its version.
    pub version: u64,
    /// Services in it.
    pub services: usize,
    /// Backends in rotation in it.
    pub backends: usize,
    /// Size on the wire (protobuf) of the last message that brought it: a whole snapshot or a delta.
    pub bytes: usize,
}

/// The result of a control-plane run (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct ControlPlaneReport {
    /// `control-plane`.
    pub scenario: String,
    /// The controller's URL.
    pub controller: String,
    /// Services registered.
    pub services: usize,
    /// Backends per service.
    pub backends: usize,
    /// Simulated nodes.
    pub nodes: usize,
    /// `Register` streams held.
    pub register_streams: usize,
    /// What each timed change is.
    pub change: String,
    /// Seconds until every node followed the controller.
    pub nodes_connect_s: f64,
    /// First registration of each service, one at a time: sent until answered (every node acked).
    pub register_first: Option<Timing>,
    /// Wall time of that phase, in seconds.
    pub register_first_s: f64,
    /// The other backends, every stream at once: sent until answered.
    pub register_more: Option<Timing>,
    /// Wall time of that phase, in seconds.
    pub register_more_s: f64,
    /// Successful answers that carried a note (e.g. a node without a bind result in time).
    pub answers_with_note: usize,
    /// One of those notes.
    pub note_example: Option<String>,
    /// Change sent until the last simulated node acked its version.
    pub change_last_ack: Option<Timing>,
    /// Change sent until the first simulated node acked its version.
    pub change_first_ack: Option<Timing>,
    /// The last snapshot, as node 0 received it.
    pub final_snapshot: SnapshotFigures,
    /// Snapshots each node received, on average (fewer than versions: a watch coalesces bursts).
    pub snapshots_per_node: f64,
    /// Wall time of the whole run, in seconds.
    pub elapsed_s: f64,
}

/// Runs the scenario, writes the report (and holds the cluster with `--hold`); returns the report.
pub async fn run(args: ControlPlaneArgs) -> Result<ControlPlaneReport, LoadError> {
    let plan = Plan::from_args(&args)?;
    let limit = args.time_limit;
    let (report, fleet) = timeout(limit, bench(&plan)).await.map_err(|_| ControlPlaneError::TimeLimit(limit))??;
    eprint!("{}", report.summary());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if path.as_os_str() == "-" {
            println!("{text}");
        } else {
            std::fs::write(path, text)
                .map_err(|source| LoadError::Output { path: path.display().to_string(), source })?;
        }
    }
    if args.hold {
        // Bounded: a script that forgets to close stdin does not keep the cluster forever.
        let stdin = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new()));
        let _ = timeout(args.timeout, stdin).await;
    }
    drop(fleet);
    Ok(report)
}

/// What to register, from where, and how long any step may take.
#[derive(Debug, Clone)]
struct Plan {
    controller: String,
    services: usize,
    backends: usize,
    nodes: usize,
    changes: usize,
    base_port: u16,
    backend_address: Ipv4Addr,
    per_stream: usize,
    registry_token: Option<Token>,
    node_token: Option<Token>,
    step: Duration,
}

// === impl Plan ===

impl Plan {
    fn from_args(args: &ControlPlaneArgs) -> Result<Plan, LoadError> {
        let config = |why: String| LoadError::Config(why);
        let url = client::controller_url(args.controller.clone(), None).map_err(|e| config(e.to_string()))?;
        if !args.allow_any_target {
            let authority = url.trim_start_matches("http://").trim_end_matches('/');
            let at: SocketAddr = authority
                .parse()
                .map_err(|_| config(format!("--controller {url:?}: give an IP:port (or pass --allow-any-target)")))?;
            target::check_targets(&[at], false)?;
        }
        let ports = usize::from(u16::MAX - args.base_port) + 1;
        if args.services == 0 || args.services > ports {
            return Err(config(format!("--services must be 1..={ports} from --base-port {}", args.base_port)));
        }
        if args.base_port == 0 {
            return Err(config("--base-port must be at least 1".into()));
        }
        if !args.backend_address.is_loopback() {
            return Err(config("--backend-address must be a loopback address (127.0.0.0/8)".into()));
        }
        let addresses = 256 - usize::from(args.backend_address.octets()[3]);
        if args.backends == 0 || args.backends > addresses {
            return Err(config(format!(
                "--backends must be 1..={addresses} from --backend-address {}",
                args.backend_address
            )));
        }
        if args.nodes == 0 || args.nodes > 10_000 {
            return Err(config("--nodes must be 1..=10000".into()));
        }
        if args.changes > 100_000 {
            return Err(config("--changes must be at most 100000".into()));
        }
        if args.backends_per_stream == 0 {
            return Err(config("--backends-per-stream must be at least 1".into()));
        }
        if args.timeout.is_zero() || args.time_limit.is_zero() || args.time_limit > Duration::from_secs(24 * 3600) {
            return Err(config("--timeout and --time-limit must be more than 0 (--time-limit at most 24h)".into()));
        }
        let token = |flag: &str, value: &Option<String>| {
            value.as_deref().map(Token::new).transpose().map_err(|why| config(format!("--{flag}: {why}")))
        };
        Ok(Plan {
            controller: url,
            services: args.services,
            backends: args.backends,
            nodes: args.nodes,
            changes: args.changes,
            base_port: args.base_port,
            backend_address: args.backend_address,
            per_stream: args.backends_per_stream,
            registry_token: token("auth-token", &args.auth_token)?,
            node_token: token("node-token", &args.node_token)?,
            step: args.timeout,
        })
    }

    /// Streams per backend address (the flipped backend's stream aside).
    fn chunks(&self) -> usize {
        self.services.div_ceil(self.per_stream)
    }

    /// The stream whose health the changes flip; it holds one backend: the last backend of service 0.
    fn flip_stream(&self) -> usize {
        self.backends * self.chunks()
    }

    fn streams(&self) -> usize {
        self.flip_stream() + 1
    }

    /// The `Register` stream that registers backend `b` of service `s`.
    fn stream_of(&self, s: usize, b: usize) -> usize {
        if (s, b) == (0, self.backends - 1) { self.flip_stream() } else { b * self.chunks() + s / self.per_stream }
    }

    /// The backend address (its source address) of stream `index`.
    fn source_of(&self, index: usize) -> usize {
        if index == self.flip_stream() { self.backends - 1 } else { index / self.chunks() }
    }

    fn address(&self, b: usize) -> Ipv4Addr {
        // In range: `from_args` checked that the last backend stays in the /24.
        Ipv4Addr::from(u32::from(self.backend_address) + b as u32)
    }

    fn port(&self, s: usize) -> u16 {
        // In range: `from_args` checked that the last service's port is at most 65535.
        self.base_port + s as u16
    }

    fn backend(&self, s: usize, b: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.address(b)), self.port(s))
    }

    /// Backend `b` of service `s` as an agent registers it: its own address, healthy by its check.
    fn registration(&self, s: usize, b: usize) -> Registration {
        Registration {
            service: Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: self.port(s).into() }),
            backend_address: self.address(b).to_string(),
            backend_port: 0,
            weight: 1,
            health: None,
            healthy: Some(true),
            algorithm: String::new(),
            proxy_protocol: String::new(),
            accept_proxy: None,
        }
    }
}

/// Everything that keeps the simulated cluster alive: dropping it ends every stream.
struct Fleet {
    nodes: Vec<SimNode>,
    streams: Vec<Option<RegisterStream>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.task.abort();
        }
    }
}

async fn bench(plan: &Plan) -> Result<(ControlPlaneReport, Fleet), ControlPlaneError> {
    let started = Instant::now();
    let mut fleet = Fleet { nodes: Vec::with_capacity(plan.nodes), streams: Vec::new() };
    fleet.streams.resize_with(plan.streams(), || None);

    // 1. The nodes.
    for i in 0..plan.nodes {
        fleet.nodes.push(SimNode::spawn(format!("sim-{i:04}"), plan, i == 0));
    }
    for node in &mut fleet.nodes {
        node.wait_acked(0, plan.step).await?;
    }
    let nodes_connect_s = started.elapsed().as_secs_f64();
    info!(nodes = plan.nodes, seconds = nodes_connect_s, "every node follows the controller");

    // One channel per backend address: registrations from `b` come from `b`'s own address.
    let mut channels = Vec::with_capacity(plan.backends);
    for b in 0..plan.backends {
        let source = IpAddr::V4(plan.address(b));
        let channel = client::connect(&plan.controller, Some(source), None).await.map_err(|source| {
            ControlPlaneError::Controller { what: format!("registrations from {}", plan.address(b)), source }
        })?;
        channels.push(channel);
    }
    let mut notes = Notes::default();

    // 2. The first backend of every service, one at a time.
    let phase = Instant::now();
    let mut first = Vec::with_capacity(plan.services);
    for s in 0..plan.services {
        let index = plan.stream_of(s, 0);
        let channel = &channels[plan.source_of(index)];
        let (ack, took) = register(&mut fleet.streams[index], channel, plan, s, 0).await?;
        notes.record(&ack);
        first.push(took);
    }
    let register_first_s = phase.elapsed().as_secs_f64();
    info!(services = plan.services, seconds = register_first_s, "every service has a backend");

    // 3. The other backends, every stream at once.
    let phase = Instant::now();
    let mut work: Vec<Vec<(usize, usize)>> = vec![Vec::new(); plan.streams()];
    for b in 1..plan.backends {
        for s in 0..plan.services {
            work[plan.stream_of(s, b)].push((s, b));
        }
    }
    let mut tasks = JoinSet::new();
    for (index, pairs) in work.into_iter().enumerate().filter(|(_, pairs)| !pairs.is_empty()) {
        let mut stream = fleet.streams[index].take();
        let channel = channels[plan.source_of(index)].clone();
        let plan = plan.clone();
        tasks.spawn(async move {
            let mut answers = Vec::with_capacity(pairs.len());
            for (s, b) in pairs {
                answers.push(register(&mut stream, &channel, &plan, s, b).await?);
            }
            Ok::<_, ControlPlaneError>((index, stream, answers))
        });
    }
    let mut more = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (index, stream, answers) = joined
            .map_err(|e| ControlPlaneError::Ended { what: "a registration task".into(), why: e.to_string() })??;
        fleet.streams[index] = stream;
        for (ack, took) in answers {
            notes.record(&ack);
            more.push(took);
        }
    }
    let register_more_s = phase.elapsed().as_secs_f64();
    info!(backends = more.len(), seconds = register_more_s, "every backend is registered");

    // Every registration was answered once every node acked its version or later, and nothing else
    // commits: the newest version any node acked is the last one, and every node has it.
    let settled = current_version(&fleet.nodes);
    for node in &mut fleet.nodes {
        node.wait_acked(settled, plan.step).await?;
    }
    let registered = fleet.nodes[0].acked().unwrap_or_default();
    if registered.services != plan.services || registered.backends != plan.services * plan.backends {
        return Err(ControlPlaneError::Inconsistent(format!(
            "version {} holds {} services and {} backends, not {} and {}",
            registered.version,
            registered.services,
            registered.backends,
            plan.services,
            plan.services * plan.backends
        )));
    }

    // 4. Health flips.
    let flipped = plan.backend(0, plan.backends - 1);
    let mut last_acks = Vec::with_capacity(plan.changes);
    let mut first_acks = Vec::with_capacity(plan.changes);
    // An odd count ends with one more flip (untimed), so the cluster ends as registered.
    for k in 0..plan.changes + plan.changes % 2 {
        let before = current_version(&fleet.nodes);
        let flip = fleet.streams[plan.flip_stream()].as_ref().ok_or_else(|| ControlPlaneError::Ended {
            what: format!("the registration of {flipped}"),
            why: "it was never opened".into(),
        })?;
        let sent = Instant::now();
        flip.set_healthy(k % 2 == 1).await?;
        let mut earliest: Option<Instant> = None;
        let mut latest = sent;
        for node in &mut fleet.nodes {
            let at = node.wait_acked(before + 1, plan.step).await?;
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
            latest = latest.max(at);
        }
        if k < plan.changes {
            last_acks.push(latest - sent);
            first_acks.push(earliest.unwrap_or(sent) - sent);
        }
    }

    let final_snapshot = fleet.nodes[0].acked().unwrap_or_default();
    let snapshots_per_node =
        fleet.nodes.iter().map(|n| n.progress.borrow().received as f64).sum::<f64>() / plan.nodes as f64;
    let report = ControlPlaneReport {
        scenario: "control-plane".into(),
        controller: plan.controller.clone(),
        services: plan.services,
        backends: plan.backends,
        nodes: plan.nodes,
        register_streams: fleet.streams.iter().filter(|s| s.is_some()).count(),
        change: format!(
            "health flip of backend {flipped} (its own Register stream): a hello_ack with the new verdict, \
             alternately unhealthy and healthy"
        ),
        nodes_connect_s,
        register_first: Timing::of(first),
        register_first_s,
        register_more: Timing::of(more),
        register_more_s,
        answers_with_note: notes.count,
        note_example: notes.example,
        change_last_ack: Timing::of(last_acks),
        change_first_ack: Timing::of(first_acks),
        final_snapshot,
        snapshots_per_node,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    Ok((report, fleet))
}

/// Registers backend `b` of service `s` on `stream`, opening it first if needed; the answer and how long
/// it took.
async fn register(
    stream: &mut Option<RegisterStream>,
    channel: &Channel,
    plan: &Plan,
    s: usize,
    b: usize,
) -> Result<(RegisterAck, Duration), ControlPlaneError> {
    let registration = plan.registration(s, b);
    let (ack, took) = match stream {
        Some(stream) => stream.register(registration, plan.step).await?,
        None => {
            let (opened, ack, took) =
                RegisterStream::open(channel.clone(), plan.registry_token.as_ref(), registration, plan.step).await?;
            *stream = Some(opened);
            (ack, took)
        }
    };
    if !ack.success {
        return Err(ControlPlaneError::Refused {
            port: plan.port(s),
            backend: plan.backend(s, b),
            message: ack.message,
        });
    }
    Ok((ack, took))
}

/// Notes on successful answers.
#[derive(Debug, Default)]
struct Notes {
    count: usize,
    example: Option<String>,
}

impl Notes {
    fn record(&mut self, ack: &RegisterAck) {
        if !ack.message.is_empty() {
            self.count += 1;
            self.example.get_or_insert_with(|| ack.message.clone());
        }
    }
}

/// The newest version any node acked.
fn current_version(nodes: &[SimNode]) -> u64 {
    nodes.iter().filter_map(SimNode::acked).map(|a| a.version).max().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// Simulated nodes

/// What a simulated node has done so far.
#[derive(Debug, Clone, Default)]
struct NodeProgress {
    /// The last snapshot it acked, and when.
    acked: Option<(SnapshotFigures, Instant)>,
    /// Snapshots received.
    received: u64,
    /// Why its stream ended, once it has.
    ended: Option<String>,
}

/// One simulated node: a `Dataplane.Sync` stream that acks every snapshot as fully bound.
struct SimNode {
    id: String,
    progress: watch::Receiver<NodeProgress>,
    task: JoinHandle<()>,
}

// === impl SimNode ===

impl SimNode {
    fn spawn(id: String, plan: &Plan, measure_bytes: bool) -> SimNode {
        let (tx, progress) = watch::channel(NodeProgress::default());
        let (url, token, node) = (plan.controller.clone(), plan.node_token.clone(), id.clone());
        let task = tokio::spawn(async move {
            let error = follow(&node, &url, token.as_ref(), &tx, measure_bytes).await;
            tx.send_modify(|p| p.ended = Some(error.to_string()));
        });
        SimNode { id, progress, task }
    }

    fn acked(&self) -> Option<SnapshotFigures> {
        self.progress.borrow().acked.map(|(figures, _)| figures)
    }

    /// Waits until the node acked `version` or later; when it first acked one (exact when it received
    /// no later version in between).
    async fn wait_acked(&mut self, version: u64, step: Duration) -> Result<Instant, ControlPlaneError> {
        let reached = |p: &NodeProgress| p.ended.is_some() || p.acked.is_some_and(|(a, _)| a.version >= version);
        let what = format!("node {}", self.id);
        let progress = match timeout(step, self.progress.wait_for(reached)).await {
            Ok(Ok(progress)) => progress.clone(),
            Ok(Err(_)) => return Err(ControlPlaneError::Ended { what, why: "its task ended".into() }),
            Err(_) => {
                return Err(ControlPlaneError::Timeout {
                    what: format!("{what} acking version {version}"),
                    after: step,
                });
            }
        };
        match (progress.acked, progress.ended) {
            (Some((acked, at)), _) if acked.version >= version => Ok(at),
            (_, why) => Err(ControlPlaneError::Ended { what, why: why.unwrap_or_default() }),
        }
    }
}

/// Follows the controller as node `id` until the stream ends; returns why it ended.
async fn follow(
    id: &str,
    url: &str,
    token: Option<&Token>,
    progress: &watch::Sender<NodeProgress>,
    measure_bytes: bool,
) -> ControlPlaneError {
    let failed = |source: StreamError| ControlPlaneError::Controller { what: format!("node {id}"), source };
    let channel = match client::connect(url, None, None).await {
        Ok(channel) => channel,
        Err(error) => return failed(error),
    };
    let (tx, rx) = mpsc::channel::<NodeMessage>(64);
    let hello = NodeHello { node_id: id.to_owned(), known_version: 0, accepts_deltas: true, ..Default::default() };
    // The receiver is alive: this cannot fail.
    let _ = tx.send(NodeMessage { msg: Some(node_message::Msg::Hello(hello)) }).await;
    let mut client = DataplaneClient::with_interceptor(channel, Bearer::new(token));
    let (mut inbound, partial) = match client.sync(ReceiverStream::new(rx)).await {
        Ok(response) => {
            // As a real node: acks list only what changed when the controller takes that.
            let partial = response.metadata().get("x-switchboard-partial-acks").is_some_and(|v| v == "1");
            (response.into_inner(), partial)
        }
        Err(status) => return failed(status.into()),
    };
    // The services of the last ack.
    let mut acked: BTreeMap<(i32, u32), v1::ServiceKey> = BTreeMap::new();
    // The services this node holds, as a real node rebuilds them from a whole snapshot and the deltas
    // after it: (protocol, port) → (key, backends).
    let mut held: BTreeMap<(i32, u32), (v1::ServiceKey, usize)> = BTreeMap::new();
    let hold = |held: &mut BTreeMap<_, _>, spec: &v1::ServiceSpec| {
        if let Some(key) = spec.service {
            held.insert((key.protocol, key.port), (key, spec.backends.len()));
        }
    };
    loop {
        let (version, bytes) = match inbound.message().await {
            Ok(Some(ControllerMessage { msg: Some(controller_message::Msg::Snapshot(snapshot)) })) => {
                held.clear();
                snapshot.services.iter().for_each(|spec| hold(&mut held, spec));
                (snapshot.version, if measure_bytes { snapshot.encoded_len() } else { 0 })
            }
            Ok(Some(ControllerMessage { msg: Some(controller_message::Msg::Delta(delta)) })) => {
                for key in &delta.removed {
                    held.remove(&(key.protocol, key.port));
                }
                delta.services.iter().for_each(|spec| hold(&mut held, spec));
                (delta.version, if measure_bytes { delta.encoded_len() } else { 0 })
            }
            Ok(Some(_)) => continue,
            Ok(None) => {
                return ControlPlaneError::Ended { what: format!("node {id}"), why: "the controller ended it".into() };
            }
            Err(status) => return failed(status.into()),
        };
        let figures =
            SnapshotFigures { version, services: held.len(), backends: held.values().map(|(_, n)| n).sum(), bytes };
        // What a node that bound every frontend reports: every frontend, or those bound since the last
        // ack and those closed.
        let listening = |service: v1::ServiceKey| FrontendResult {
            service: Some(service),
            result: Some(frontend_result::Result::Listening(format!("127.0.0.1:{}", service.port))),
        };
        let ack = if partial {
            let frontends =
                held.iter().filter(|(key, _)| !acked.contains_key(key)).map(|(_, &(service, _))| listening(service));
            let closed = acked.iter().filter(|(key, _)| !held.contains_key(key)).map(|(_, &service)| service);
            SnapshotAck { version, frontends: frontends.collect(), partial: true, closed: closed.collect() }
        } else {
            let frontends = held.values().map(|&(service, _)| listening(service)).collect();
            SnapshotAck { version, frontends, partial: false, closed: Vec::new() }
        };
        acked = held.iter().map(|(&key, &(service, _))| (key, service)).collect();
        if tx.send(NodeMessage { msg: Some(node_message::Msg::Ack(ack)) }).await.is_err() {
            return failed(StreamError::Closed);
        }
        let at = Instant::now();
        progress.send_modify(|p| {
            p.acked = Some((figures, at));
            p.received += 1;
        });
    }
}

// ---------------------------------------------------------------------------------------------------------
// Registrations

/// One `Register` stream, held open: its backends stay registered until it is dropped.
struct RegisterStream {
    /// The backend's verdict, locked while a message carrying it is queued, so a hello answered at the
    /// same time as a flip cannot overtake the flip with the old verdict.
    out: Arc<Mutex<Outbound>>,
    acks: mpsc::Receiver<RegisterAck>,
    reader: JoinHandle<()>,
}

/// The sending half of a `Register` stream, with the verdict it reports.
struct Outbound {
    tx: mpsc::Sender<RegisterRequest>,
    healthy: bool,
    /// The last hello's sequence number.
    seq: u64,
}

// === impl RegisterStream ===

impl RegisterStream {
    /// Opens a stream with its first registration; the stream, its answer, and how long that took.
    async fn open(
        channel: Channel,
        token: Option<&Token>,
        first: Registration,
        step: Duration,
    ) -> Result<(RegisterStream, RegisterAck, Duration), ControlPlaneError> {
        let what = format!("registration of {}:{}", first.backend_address, first.service.map_or(0, |s| s.port));
        let failed = |source: StreamError| ControlPlaneError::Controller { what: what.clone(), source };
        let late = || ControlPlaneError::Timeout { what: what.clone(), after: step };
        let (tx, rx) = mpsc::channel(16);
        let sent = Instant::now();
        // The receiver is alive: this cannot fail.
        let _ = tx.send(register_message(first)).await;
        let mut client = RegistryClient::with_interceptor(channel, Bearer::new(token));
        let call = client.register(ReceiverStream::new(rx));
        let mut inbound = timeout(step, call).await.map_err(|_| late())?.map_err(|s| failed(s.into()))?.into_inner();
        let ack = match timeout(step, inbound.message()).await.map_err(|_| late())? {
            Ok(Some(RegisterResponse { msg: Some(register_response::Msg::Ack(ack)) })) => ack,
            Ok(_) => return Err(ControlPlaneError::Ended { what, why: "no ack to the first registration".into() }),
            Err(status) => return Err(failed(status.into())),
        };
        let took = sent.elapsed();
        let out = Arc::new(Mutex::new(Outbound { tx, healthy: true, seq: 0 }));
        let (acks_tx, acks) = mpsc::channel(16);
        let reader = tokio::spawn(read_register_stream(inbound, Arc::clone(&out), acks_tx));
        Ok((RegisterStream { out, acks, reader }, ack, took))
    }

    /// Adds a backend to the registration; its answer and how long it took.
    async fn register(
        &mut self,
        registration: Registration,
        step: Duration,
    ) -> Result<(RegisterAck, Duration), ControlPlaneError> {
        let what =
            format!("registration of {}:{}", registration.backend_address, registration.service.map_or(0, |s| s.port));
        let ended = || ControlPlaneError::Ended { what: what.clone(), why: "the stream closed".into() };
        let sent = Instant::now();
        self.out.lock().await.tx.send(register_message(registration)).await.map_err(|_| ended())?;
        match timeout(step, self.acks.recv()).await {
            Ok(Some(ack)) => Ok((ack, sent.elapsed())),
            Ok(None) => Err(ended()),
            Err(_) => Err(ControlPlaneError::Timeout { what, after: step }),
        }
    }

    /// Reports a new verdict at once, as an agent does when its check changes its mind.
    async fn set_healthy(&self, healthy: bool) -> Result<(), ControlPlaneError> {
        let mut out = self.out.lock().await;
        out.healthy = healthy;
        let ack = HelloAck { seq: out.seq, healthy: Some(healthy), load_permille: None };
        out.tx.send(RegisterRequest { msg: Some(register_request::Msg::HelloAck(ack)) }).await.map_err(|_| {
            ControlPlaneError::Ended { what: "the flipped registration".into(), why: "the stream closed".into() }
        })
    }
}

impl Drop for RegisterStream {
    fn drop(&mut self) {
        // The reader holds a sender too: stopping it ends the request stream, and so the registration.
        self.reader.abort();
    }
}

/// Answers hellos with the current verdict and hands acks to the stream's owner, until the stream ends.
async fn read_register_stream(
    mut inbound: Streaming<RegisterResponse>,
    out: Arc<Mutex<Outbound>>,
    acks: mpsc::Sender<RegisterAck>,
) {
    while let Ok(Some(message)) = inbound.message().await {
        let delivered = match message.msg {
            Some(register_response::Msg::Hello(hello)) => {
                let mut out = out.lock().await;
                out.seq = hello.seq;
                let ack = HelloAck { seq: hello.seq, healthy: Some(out.healthy), load_permille: None };
                out.tx.send(RegisterRequest { msg: Some(register_request::Msg::HelloAck(ack)) }).await.is_ok()
            }
            Some(register_response::Msg::Ack(ack)) => acks.send(ack).await.is_ok(),
            None => true,
        };
        if !delivered {
            return;
        }
    }
    warn!("a Register stream ended");
}

fn register_message(registration: Registration) -> RegisterRequest {
    RegisterRequest { msg: Some(register_request::Msg::Register(registration)) }
}

// ---------------------------------------------------------------------------------------------------------
// Reporting

// === impl Timing ===

impl Timing {
    /// Percentiles of `samples`; none without any.
    pub fn of(mut samples: Vec<Duration>) -> Option<Timing> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let rank = |p: f64| samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
        Some(Timing {
            count: samples.len(),
            p50_ms: ms(rank(0.5)),
            p99_ms: ms(rank(0.99)),
            max_ms: ms(samples[samples.len() - 1]),
            mean_ms: samples.iter().map(|&d| ms(d)).sum::<f64>() / samples.len() as f64,
        })
    }
}

// === impl ControlPlaneReport ===

impl ControlPlaneReport {
    /// A few lines for a human.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let line = |t: &Option<Timing>| match t {
            Some(t) => {
                format!("p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)", t.p50_ms, t.p99_ms, t.max_ms, t.count)
            }
            None => "no samples".to_owned(),
        };
        let _ = writeln!(
            out,
            "{} services x {} backends, {} nodes, {} Register streams (nodes connected in {:.2} s)",
            self.services, self.backends, self.nodes, self.register_streams, self.nodes_connect_s
        );
        let _ = writeln!(
            out,
            "register -> frontend open, first backend of each service, one at a time: {} in {:.1} s",
            line(&self.register_first),
            self.register_first_s
        );
        let _ = writeln!(
            out,
            "register, other backends, all streams at once:  {} in {:.1} s",
            line(&self.register_more),
            self.register_more_s
        );
        if self.answers_with_note > 0 {
            let _ = writeln!(
                out,
                "answers with a note: {} (e.g. {:?})",
                self.answers_with_note,
                self.note_example.as_deref().unwrap_or_default()
            );
        }
        let _ = writeln!(out, "change -> every node acked: {}", line(&self.change_last_ack));
        let _ = writeln!(out, "change -> first node acked: {}", line(&self.change_first_ack));
        let s = &self.final_snapshot;
        let _ = writeln!(
            out,
            "last snapshot: version {}, {} services, {} backends, last message {} bytes; {:.1} snapshots per node; {:.1} s in all",
            s.version, s.services, s.backends, s.bytes, self.snapshots_per_node, self.elapsed_s
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(services: usize, backends: usize, per_stream: usize) -> Plan {
        Plan {
            controller: "http://127.0.0.1:1".into(),
            services,
            backends,
            nodes: 1,
            changes: 0,
            base_port: 20000,
            backend_address: Ipv4Addr::new(127, 0, 0, 101),
            per_stream,
            registry_token: None,
            node_token: None,
            step: Duration::from_secs(1),
        }
    }

    #[test]
    fn every_stream_holds_at_most_its_share_and_comes_from_its_backend() {
        for (services, backends, per_stream) in [(1000, 10, 250), (200, 10, 250), (7, 1, 3), (5, 2, 1)] {
            let plan = plan(services, backends, per_stream);
            let mut held = vec![0; plan.streams()];
            for s in 0..services {
                for b in 0..backends {
                    let index = plan.stream_of(s, b);
                    held[index] += 1;
                    assert_eq!(plan.source_of(index), b, "{s}/{b}");
                }
            }
            assert!(held.iter().all(|&n| n <= per_stream));
            assert_eq!(held[plan.flip_stream()], 1);
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let t = Timing::of(samples).unwrap();
        assert_eq!((t.count, t.p50_ms, t.p99_ms, t.max_ms), (100, 50.0, 99.0, 100.0));
        assert!(Timing::of(Vec::new()).is_none());
        let one = Timing::of(vec![Duration::from_millis(3)]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms), (3.0, 3.0));
    }

    #[test]
    fn the_controller_must_be_a_test_address() {
        let cli = |url: &str| {
            use clap::Parser as _;
            match crate::cli::Cli::parse_from(["loadgen", "control-plane", "--controller", url]).command {
                crate::cli::Command::ControlPlane(args) => args,
                _ => unreachable!(),
            }
        };
        assert!(Plan::from_args(&cli("http://127.0.0.40:50051")).is_ok());
        assert!(Plan::from_args(&cli("http://8.8.8.8:50051")).is_err());
        assert!(Plan::from_args(&cli("127.0.0.40:50051")).is_err());
    }
}
