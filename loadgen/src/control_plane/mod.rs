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
//!
//! # Layout
//! - `plan`: what to register, from where, and how long any step may take.
//! - `node`: the simulated nodes, each a `Dataplane.Sync` stream.
//! - `agent`: the `Register` streams, held open as an agent holds its own.
//! - `report`: the figures of a run, its summary and its JSON.

mod agent;
mod node;
mod plan;
mod report;

use std::{io::Read as _, net::IpAddr, time::Duration};

use contract::{client, v1::RegisterAck};
use tokio::{
    task::JoinSet,
    time::{Instant, timeout},
};
use tonic::transport::Channel;
use tracing::info;

pub use self::report::{ControlPlaneReport, SnapshotFigures, Timing};
use self::{
    agent::RegisterStream,
    node::{SimNode, current_version},
    plan::Plan,
};
pub use crate::error::ControlPlaneError;
use crate::{cli::ControlPlaneArgs, error::LoadError};

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

/// Everything that keeps the simulated cluster alive: dropping it ends every stream (each node's and
/// each registration's handle ends its own when dropped).
struct Fleet {
    nodes: Vec<SimNode>,
    streams: Vec<Option<RegisterStream>>,
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
