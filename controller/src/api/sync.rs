//! `switchboard.v1.Dataplane`: the controller's end of each node's `Sync` stream.
//!
//! The stream is the node's link: its snapshots go out from the store's watch channel (the current one
//! at once, then each change; a watch coalesces bursts, and every snapshot is the full state, so a node
//! that skips a version misses nothing), its acks and load reports come back into the store, and its end
//! marks the node disconnected.

use std::sync::Arc;

use contract::{
    convert,
    model::{BackendLoad, NodeHello, NodeReport, RoutingSnapshot},
    process::stopped,
    v1::{ControllerMessage, NodeMessage, dataplane_server::Dataplane, node_message},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::invalid_argument;
use crate::config::EMBEDDED_NODE;
use crate::store::{ClusterLoadFeed, NodeLink, Store};

/// `switchboard.v1.Dataplane`.
#[derive(Debug)]
pub struct DataplaneApi {
    /// The registry the nodes follow.
    pub store: Arc<Store>,
    /// Ends every sync stream, so a graceful server shutdown does not wait on them forever.
    pub shutdown: watch::Receiver<bool>,
    /// Send each node the other nodes' connection counts (`--no-cluster-counts` turns it off).
    pub cluster_counts: bool,
    /// Mutual TLS: a node must show a certificate of `--client-ca`.
    pub nodes_need_certificates: bool,
    /// The wire form of the latest snapshot, made once for every stream.
    pub messages: Arc<SnapshotMessages>,
}

/// The latest snapshot in its wire form: with a hundred nodes, one conversion per version instead of one
/// per node (each stream still gets its own copy to encode).
#[derive(Debug, Default)]
pub struct SnapshotMessages {
    latest: std::sync::Mutex<Option<(u64, Arc<ControllerMessage>)>>,
}

impl SnapshotMessages {
    /// The message of `snapshot`, converted unless another stream already did.
    fn get(&self, snapshot: &RoutingSnapshot) -> Arc<ControllerMessage> {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        match &*latest {
            Some((version, message)) if *version == snapshot.version => Arc::clone(message),
            cached => {
                let message = Arc::new(convert::snapshot_message(snapshot));
                // A stream that lags behind does not evict the newer version the others are sending.
                if cached.as_ref().is_none_or(|(version, _)| *version < snapshot.version) {
                    *latest = Some((snapshot.version, Arc::clone(&message)));
                }
                message
            }
        }
    }
}

#[tonic::async_trait]
impl Dataplane for DataplaneApi {
    type SyncStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn sync(&self, request: Request<Streaming<NodeMessage>>) -> Result<Response<Self::SyncStream>, Status> {
        let peer = request.remote_addr();
        // The TLS handshake checked any certificate shown against --client-ca; here one must be shown.
        if self.nodes_need_certificates && request.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Status::permission_denied("a node must show a client certificate signed by --client-ca"));
        }
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("stream ended before `hello`"))?;
        let Some(node_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be `hello`"));
        };
        let hello = NodeHello::try_from(&hello).map_err(invalid_argument)?;
        if hello.node_id == EMBEDDED_NODE {
            return Err(Status::already_exists(format!(
                "node id {EMBEDDED_NODE:?} is reserved for the controller's own node"
            )));
        }
        // A taken id is refused before anything else changes.
        let link = self.store.connect_node(&hello.node_id, peer)?;
        // Continue above whatever the node already applied (it may come from a controller that ran before).
        self.store.observe_version(hello.known_version)?;
        let (tx, rx) = mpsc::channel(16);
        let cluster = self.cluster_counts.then(|| link.cluster_load());
        let messages = Arc::clone(&self.messages);
        tokio::spawn(follow(link, self.store.subscribe(), messages, cluster, inbound, tx, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn follow(
    link: NodeLink,
    mut snapshots: watch::Receiver<Arc<RoutingSnapshot>>,
    messages: Arc<SnapshotMessages>,
    mut cluster: Option<ClusterLoadFeed>,
    mut inbound: Streaming<NodeMessage>,
    tx: mpsc::Sender<Result<ControllerMessage, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = link.node().to_owned();
    // The current snapshot goes out first.
    snapshots.mark_changed();
    let mut sent = 0u64;
    loop {
        tokio::select! {
            load = next_cluster_load(&mut cluster) => {
                if tx.send(Ok(convert::cluster_load_message(&load))).await.is_err() {
                    break;
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = Arc::clone(&snapshots.borrow_and_update());
                // Versions only increase on a stream; a repeat would be a bug upstream, never worth sending.
                if snapshot.version <= sent && sent != 0 {
                    continue;
                }
                sent = snapshot.version;
                let message = ControllerMessage::clone(&messages.get(&snapshot));
                debug!(%node, version = sent, "snapshot sent");
                if tx.send(Ok(message)).await.is_err() {
                    break;
                }
            }
            message = inbound.message() => {
                let report = match message {
                    Ok(Some(NodeMessage { msg: Some(node_message::Msg::Ack(ack)) })) => NodeReport::try_from(ack),
                    Ok(Some(NodeMessage { msg: Some(node_message::Msg::Load(load)) })) => NodeReport::try_from(load),
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(%node, %status, "sync stream failed");
                        break;
                    }
                };
                match report {
                    Ok(report) => link.report(report),
                    Err(error) => warn!(%node, %error, "ignoring an invalid report"),
                }
            }
            () = tx.closed() => break,
            () = stopped(&mut shutdown) => break,
        }
    }
    // Dropping the link marks the node disconnected.
}

/// The next change of the other nodes' counts; never, with `--no-cluster-counts`.
async fn next_cluster_load(feed: &mut Option<ClusterLoadFeed>) -> Vec<BackendLoad> {
    match feed {
        Some(feed) => feed.changed().await,
        None => std::future::pending().await,
    }
}
