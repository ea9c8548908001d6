//! Simulated nodes: each holds a `Dataplane.Sync` stream and acks every snapshot as a node that bound
//! every frontend would.

use std::{collections::BTreeMap, time::Duration};

use contract::{
    auth::{Bearer, Token},
    client::{self, StreamError},
    v1::{
        self, ControllerMessage, FrontendResult, NodeHello, NodeMessage, SnapshotAck, controller_message,
        dataplane_client::DataplaneClient, frontend_result, node_message,
    },
};
use prost::Message as _;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, timeout},
};
use tokio_stream::wrappers::ReceiverStream;

use super::{plan::Plan, report::SnapshotFigures};
use crate::error::ControlPlaneError;

/// What a simulated node has done so far.
#[derive(Debug, Clone, Default)]
pub(super) struct NodeProgress {
    /// The last snapshot it acked, and when.
    acked: Option<(SnapshotFigures, Instant)>,
    /// Snapshots received.
    pub(super) received: u64,
    /// Why its stream ended, once it has.
    ended: Option<String>,
}

/// One simulated node: a `Dataplane.Sync` stream that acks every snapshot as fully bound.
pub(super) struct SimNode {
    id: String,
    pub(super) progress: watch::Receiver<NodeProgress>,
    task: JoinHandle<()>,
}

// === impl SimNode ===

impl SimNode {
    pub(super) fn spawn(id: String, plan: &Plan, measure_bytes: bool) -> SimNode {
        let (tx, progress) = watch::channel(NodeProgress::default());
        let (url, token, node) = (plan.controller.clone(), plan.node_token.clone(), id.clone());
        let task = tokio::spawn(async move {
            let error = follow(&node, &url, token.as_ref(), &tx, measure_bytes).await;
            tx.send_modify(|p| p.ended = Some(error.to_string()));
        });
        SimNode { id, progress, task }
    }

    pub(super) fn acked(&self) -> Option<SnapshotFigures> {
        self.progress.borrow().acked.map(|(figures, _)| figures)
    }

    /// Waits until the node acked `version` or later; when it first acked one (exact when it received
    /// no later version in between).
    pub(super) async fn wait_acked(&mut self, version: u64, step: Duration) -> Result<Instant, ControlPlaneError> {
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

impl Drop for SimNode {
    fn drop(&mut self) {
        // Ends the node's stream: the controller sees the node leave.
        self.task.abort();
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

/// The newest version any node acked.
pub(super) fn current_version(nodes: &[SimNode]) -> u64 {
    nodes.iter().filter_map(SimNode::acked).map(|a| a.version).max().unwrap_or(0)
}
