//! `switchboard.v1.Dataplane`: the controller's end of each node's `Sync` stream.
//!
//! The stream is the node's link: its snapshots go out from the store's watch channel (the current one
//! at once, then each change; a watch coalesces bursts, and every snapshot is the full state, so a node
//! that skips a version misses nothing), its acks and load reports come back into the store, and its end
//! marks the node disconnected.
//!
//! The service is served by [`DataplaneServer`], written out here instead of generated, for one reason:
//! a snapshot goes to every node, so it is encoded once per version and each stream sends the same bytes
//! ([`Outbound::Encoded`]). The wire is the generated one's: same path, same messages.

use std::{convert::Infallible, sync::Arc};

use bytes::{BufMut, Bytes};
use contract::{
    convert,
    model::{BackendLoad, NodeHello, NodeReport, RoutingSnapshot},
    process::stopped,
    v1::{ControllerMessage, NodeMessage, node_message},
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    codec::{Codec, EncodeBuf, Encoder},
    codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http},
    metadata::MetadataValue,
    server::{Grpc, NamedService, StreamingService},
};
use tonic_prost::{ProstCodec, ProstDecoder};
use tracing::{debug, warn};

use super::invalid_argument;
use crate::store::EMBEDDED_NODE;
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
    /// The latest snapshot, encoded once for every stream.
    pub messages: Arc<SnapshotMessages>,
    /// The node's hello must come within this (`--first-request-timeout`).
    pub first_message_timeout: std::time::Duration,
}

/// The latest snapshot and the latest delta as encoded bytes: with a hundred nodes, one conversion and
/// one encoding per version instead of one per node (nodes that keep up all need the same delta), and a
/// queued message costs a reference, not a copy.
#[derive(Debug, Default)]
pub struct SnapshotMessages {
    /// Keyed by (0, version) for a whole snapshot.
    whole: Cached,
    /// Keyed by (base version, version).
    delta: Cached,
}

#[derive(Debug, Default)]
struct Cached(std::sync::Mutex<Option<((u64, u64), Bytes)>>);

impl Cached {
    /// The bytes of `key`, made by `encode` unless another stream already did. A stream that lags behind
    /// does not evict the newer message the others are sending.
    fn get(&self, key: (u64, u64), encode: impl FnOnce() -> ControllerMessage) -> Bytes {
        let mut latest = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*latest {
            Some((cached, bytes)) if *cached == key => bytes.clone(),
            cached => {
                let bytes = Bytes::from(encode().encode_to_vec());
                if cached.as_ref().is_none_or(|(cached, _)| cached.1 < key.1) {
                    *latest = Some((key, bytes.clone()));
                }
                bytes
            }
        }
    }
}

impl SnapshotMessages {
    /// `snapshot` whole.
    fn whole(&self, snapshot: &RoutingSnapshot) -> Bytes {
        self.whole.get((0, snapshot.version), || convert::snapshot_message(snapshot))
    }

    /// The changes from `base` to `snapshot`.
    fn delta(&self, base: &RoutingSnapshot, snapshot: &RoutingSnapshot) -> Bytes {
        self.delta.get((base.version, snapshot.version), || convert::delta_message(&snapshot.delta_from(base)))
    }
}

/// One message of a `Sync` stream toward a node: built for this node, or already encoded for all.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A message for this stream only (the other nodes' counts).
    Message(ControllerMessage),
    /// A `ControllerMessage` encoded once and shared by every stream (a snapshot).
    Encoded(Bytes),
}

type SyncStream = ReceiverStream<Result<Outbound, Status>>;

// === impl DataplaneApi ===

impl DataplaneApi {
    /// `Dataplane.Sync`: checks the node's hello, then follows the store for it.
    async fn sync(&self, request: Request<Streaming<NodeMessage>>) -> Result<Response<SyncStream>, Status> {
        let peer = request.remote_addr();
        // The TLS handshake checked any certificate shown against --client-ca; here one must be shown, and
        // the id the node claims must be a name in it.
        let certificate_names = match request.peer_certs().as_deref().and_then(|certs| certs.first()) {
            Some(certificate) if self.nodes_need_certificates => Some(certificate_names(certificate)),
            None if self.nodes_need_certificates => {
                return Err(Status::permission_denied("a node must show a client certificate signed by --client-ca"));
            }
            _ => None,
        };
        let mut inbound = request.into_inner();
        let first = super::first_message(&mut inbound, self.first_message_timeout)
            .await?
            .ok_or_else(|| Status::invalid_argument("stream ended before `hello`"))?;
        let Some(node_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be `hello`"));
        };
        let hello = NodeHello::try_from(&hello).map_err(invalid_argument)?;
        if hello.node_id == EMBEDDED_NODE {
            return Err(Status::already_exists(format!(
                "node id {EMBEDDED_NODE:?} is reserved for the controller's own node"
            )));
        }
        if let Some(names) = certificate_names
            && !names.contains(&hello.node_id)
        {
            return Err(Status::permission_denied(format!(
                "node id {:?} is not a name in the node's certificate ({}): a node's id is the name --client-ca \
                 certified",
                hello.node_id,
                names.join(", ")
            )));
        }
        // A node connecting under its own id again replaces its older stream, which ends.
        let link = self.store.connect_node(&hello.node_id, peer, hello.frontends_on.clone())?;
        // Continue above whatever the node already applied (it may come from a controller that ran before).
        self.store.observe_version(hello.known_version)?;
        let (tx, rx) = mpsc::channel(16);
        let cluster = self.cluster_counts.then(|| link.cluster_load());
        let messages = Arc::clone(&self.messages);
        let deltas = hello.accepts_deltas;
        let snapshots = self.store.subscribe();
        tokio::spawn(follow(link, snapshots, messages, deltas, cluster, inbound, tx, self.shutdown.clone()));
        let mut response = Response::new(ReceiverStream::new(rx));
        response.metadata_mut().insert(PARTIAL_ACKS, MetadataValue::from_static("1"));
        Ok(response)
    }
}

/// The response header that tells a node this controller takes partial acks.
const PARTIAL_ACKS: &str = "x-switchboard-partial-acks";

/// Serves `switchboard.v1.Dataplane` (its one method, `Sync`) with [`SyncCodec`].
#[derive(Debug, Clone)]
pub struct DataplaneServer {
    api: Arc<DataplaneApi>,
}

impl DataplaneServer {
    /// Serves `api`.
    pub fn new(api: DataplaneApi) -> Self {
        DataplaneServer { api: Arc::new(api) }
    }
}

impl NamedService for DataplaneServer {
    const NAME: &'static str = "switchboard.v1.Dataplane";
}

impl<B> Service<http::Request<B>> for DataplaneServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != "/switchboard.v1.Dataplane/Sync" {
            return Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) });
        }
        let method = SyncMethod(Arc::clone(&self.api));
        Box::pin(async move { Ok(Grpc::new(SyncCodec).streaming(method, request).await) })
    }
}

struct SyncMethod(Arc<DataplaneApi>);

impl StreamingService<NodeMessage> for SyncMethod {
    type Response = Outbound;
    type ResponseStream = SyncStream;
    type Future = BoxFuture<Response<SyncStream>, Status>;

    fn call(&mut self, request: Request<Streaming<NodeMessage>>) -> Self::Future {
        let api = Arc::clone(&self.0);
        Box::pin(async move { api.sync(request).await })
    }
}

/// Decodes `NodeMessage`s as tonic's prost codec does; encodes [`Outbound`]s, shared bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncCodec;

impl Codec for SyncCodec {
    type Encode = Outbound;
    type Decode = NodeMessage;
    type Encoder = OutboundEncoder;
    type Decoder = ProstDecoder<NodeMessage>;

    fn encoder(&mut self) -> Self::Encoder {
        OutboundEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<ControllerMessage, NodeMessage>::default().decoder()
    }
}

/// The encoding half of [`SyncCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OutboundEncoder;

impl Encoder for OutboundEncoder {
    type Item = Outbound;
    type Error = Status;

    fn encode(&mut self, item: Outbound, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outbound::Message(message) => message.encode(buf).map_err(|e| Status::internal(e.to_string())),
            Outbound::Encoded(bytes) => {
                buf.put_slice(&bytes);
                Ok(())
            }
        }
    }
}

/// The names a certificate gives its holder: its DNS subject alternative names and its common names. None
/// when it does not parse (the handshake accepted it, so that would be a parser's limit, not a name).
fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let mut names: Vec<String> =
        certificate.subject().iter_common_name().filter_map(|name| name.as_str().ok()).map(str::to_owned).collect();
    if let Ok(Some(alternatives)) = certificate.subject_alternative_name() {
        names.extend(alternatives.value.general_names.iter().filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        }));
    }
    names.sort_unstable();
    names.dedup();
    names
}

#[allow(clippy::too_many_arguments)]
async fn follow(
    mut link: NodeLink,
    mut snapshots: watch::Receiver<Arc<RoutingSnapshot>>,
    messages: Arc<SnapshotMessages>,
    deltas: bool,
    mut cluster: Option<ClusterLoadFeed>,
    mut inbound: Streaming<NodeMessage>,
    tx: mpsc::Sender<Result<Outbound, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = link.node().to_owned();
    // The current snapshot goes out first.
    snapshots.mark_changed();
    // The last snapshot sent on this stream: what the node holds, and what a delta starts from.
    let mut sent: Option<Arc<RoutingSnapshot>> = None;
    loop {
        tokio::select! {
            load = next_cluster_load(&mut cluster) => {
                if tx.send(Ok(Outbound::Message(convert::cluster_load_message(&load)))).await.is_err() {
                    break;
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = Arc::clone(&snapshots.borrow_and_update());
                // Versions only increase on a stream; a repeat would be a bug upstream, never worth sending.
                if sent.as_ref().is_some_and(|sent| snapshot.version <= sent.version) {
                    continue;
                }
                let message = match sent.as_deref() {
                    Some(base) if deltas => Outbound::Encoded(messages.delta(base, &snapshot)),
                    _ => Outbound::Encoded(messages.whole(&snapshot)),
                };
                debug!(%node, version = snapshot.version, delta = sent.is_some() && deltas, "snapshot sent");
                sent = Some(snapshot);
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
            () = link.replaced() => {
                let why = format!("node {node} connected again on another stream: this one ends");
                let _ = tx.send(Err(Status::aborted(why))).await;
                break;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_encoded_once_per_version_and_decodes_to_its_message() {
        let messages = SnapshotMessages::default();
        let snapshot = |version| RoutingSnapshot { version, ..Default::default() };
        let two = messages.whole(&snapshot(2));
        assert_eq!(ControllerMessage::decode(two.clone()).unwrap(), convert::snapshot_message(&snapshot(2)));
        // The same buffer for every stream at that version.
        assert_eq!(messages.whole(&snapshot(2)).as_ptr(), two.as_ptr());
        // A lagging stream gets its older version without evicting the newer one.
        let one = messages.whole(&snapshot(1));
        assert_eq!(ControllerMessage::decode(one).unwrap(), convert::snapshot_message(&snapshot(1)));
        assert_eq!(messages.whole(&snapshot(2)).as_ptr(), two.as_ptr());
        // Deltas are cached by (base, version).
        let delta = messages.delta(&snapshot(1), &snapshot(2));
        let expected = convert::delta_message(&snapshot(2).delta_from(&snapshot(1)));
        assert_eq!(ControllerMessage::decode(delta.clone()).unwrap(), expected);
        assert_eq!(messages.delta(&snapshot(1), &snapshot(2)).as_ptr(), delta.as_ptr());
    }
}
