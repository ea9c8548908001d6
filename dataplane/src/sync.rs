//! The node side of the `Dataplane.Sync` stream: follows the controller's snapshots and sends the node's
//! reports back.
//!
//! Static stability: the node's snapshot channel belongs to this client, not to the connection, so when
//! the controller goes away the node keeps serving the last snapshot (new connections included) while this
//! client retries with capped, jittered backoff. On reconnect the node says which version it has and the
//! controller continues above it.
//!
//! The node accepts deltas: after a stream's first, whole snapshot, the controller sends only what changed
//! since the last one. A delta that does not start from the version the node holds ends the stream; the
//! next one starts whole again.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use contract::{
    auth::{Bearer, Token},
    backoff::Backoff,
    client::{self, ClientTls, Rotation, StreamError},
    convert,
    model::{FrontendAddresses, FrontendStatus, NodeHello, NodeReport, RoutingDelta, RoutingSnapshot, ServiceKey},
    v1::{self, controller_message, dataplane_client::DataplaneClient},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{metrics::SyncMetrics, node::NodeHandle};

/// How a node reaches its controller.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// gRPC URLs of the controllers, e.g. `http://127.0.0.1:50051`; followed one at a time, in order.
    pub controllers: Vec<String>,
    /// This node's name.
    pub node_id: String,
    /// First retry delay.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Presented on every call (`--node-token`).
    pub token: Option<Token>,
    /// TLS towards an https:// controller.
    pub tls: Option<ClientTls>,
    /// Where the node's frontends listen (`--frontend-address`): told to the controller, which judges
    /// loops by it.
    pub frontend_address: IpAddr,
}

/// Whether the node currently follows a controller, for its admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// A sync stream is open.
    pub connected: bool,
    /// The controller it follows now, or tries next.
    pub controller: String,
    /// Why the last attempt or stream ended.
    pub last_error: Option<String>,
}

/// Follows a controller until `reports` closes (the node stopped). Never gives up: a lost controller is
/// followed by the next one of the list at once, and the node waits (capped, jittered backoff) only when
/// every controller failed in a row.
pub async fn run(
    config: SyncConfig,
    snapshots: watch::Sender<Arc<RoutingSnapshot>>,
    mut reports: mpsc::UnboundedReceiver<NodeReport>,
    status: watch::Sender<SyncStatus>,
    node: NodeHandle,
    metrics: SyncMetrics,
) {
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    let mut last_load: Option<NodeReport> = None;
    let link = Link { config: &config, snapshots: &snapshots, status: &status, node: &node, metrics: &metrics };
    let mut streams = 0u64;
    let mut rotation = Rotation::new(config.controllers.clone());
    loop {
        let controller = rotation.current().to_owned();
        let span = info_span!("sync", node = %config.node_id, %controller);
        let held = streams;
        let outcome = attempt(&link, &controller, &mut reports, &mut last_load, &mut backoff, &mut streams)
            .instrument(span)
            .await;
        metrics.connected.set(0);
        if streams > held {
            rotation.held();
        }
        // Without a controller there is no fresh view of the other nodes: count on our own connections only.
        node.set_remote_load(&[]);
        let error = match outcome {
            Ok(AttemptEnd::NodeStopped) => return,
            Ok(AttemptEnd::ByController) => "the controller ended the stream".to_owned(),
            Err(error) => error.to_string(),
        };
        let whole_round = rotation.failed();
        let next = rotation.current().to_owned();
        status.send_replace(SyncStatus { connected: false, controller: next.clone(), last_error: Some(error.clone()) });
        let delay = if whole_round { backoff.next_delay() } else { Duration::ZERO };
        warn!(%controller, %error, %next, retry_in = ?delay, "controller lost or unreachable; serving the last snapshot");
        // Reports keep coming while disconnected: remember the latest load, resent on reconnect.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                report = reports.recv() => match report {
                    Some(report @ NodeReport::Load(_)) => last_load = Some(report),
                    Some(NodeReport::Applied { .. } | NodeReport::AppliedChanges { .. }) => {}
                    None => return,
                },
            }
        }
    }
}

enum AttemptEnd {
    NodeStopped,
    ByController,
}

/// What every attempt of a node's link uses.
struct Link<'a> {
    config: &'a SyncConfig,
    snapshots: &'a watch::Sender<Arc<RoutingSnapshot>>,
    status: &'a watch::Sender<SyncStatus>,
    node: &'a NodeHandle,
    metrics: &'a SyncMetrics,
}

/// One sync stream, from connecting to its end.
async fn attempt(
    link: &Link<'_>,
    controller: &str,
    reports: &mut mpsc::UnboundedReceiver<NodeReport>,
    last_load: &mut Option<NodeReport>,
    backoff: &mut Backoff,
    streams: &mut u64,
) -> Result<AttemptEnd, StreamError> {
    let Link { config, snapshots, status, node, metrics } = *link;
    let channel = client::connect(controller, None, config.tls.as_ref()).await?;
    let (tx, rx) = mpsc::channel::<v1::NodeMessage>(64);
    let known_version = snapshots.borrow().version;
    let frontends_on = Some(frontends_on(config.frontend_address));
    let hello = NodeHello { node_id: config.node_id.clone(), known_version, accepts_deltas: true, frontends_on };
    tx.send((&hello).into()).await.map_err(|_| StreamError::Closed)?;
    let mut client = DataplaneClient::with_interceptor(channel, Bearer::new(config.token.as_ref()));
    let response = client.sync(ReceiverStream::new(rx)).await?;
    // A controller that says so takes acks that list only what changed since the last one.
    let mut acked = response.metadata().get(PARTIAL_ACKS).is_some_and(|v| v == "1").then(BTreeMap::new);
    let mut inbound = response.into_inner();
    info!(%controller, node = %config.node_id, known_version, "following the controller");
    status.send_replace(SyncStatus { connected: true, controller: controller.to_owned(), last_error: None });
    metrics.connected.set(1);
    if *streams > 0 {
        metrics.reconnects.inc();
    }
    *streams += 1;
    backoff.reset();
    if let Some(load) = last_load.as_ref() {
        tx.send(load.into()).await.map_err(|_| StreamError::Closed)?;
    }
    loop {
        tokio::select! {
            message = inbound.message() => {
                let Some(message) = message? else { return Ok(AttemptEnd::ByController) };
                let snapshot = match message.msg.map(|msg| received(msg, snapshots, node)).transpose() {
                    Ok(Some(Some(snapshot))) => snapshot,
                    Ok(_) => continue,
                    Err(error) => {
                        metrics.rejected.inc();
                        return Err(error);
                    }
                };
                let current = snapshots.borrow().version;
                if snapshot.version <= current && current != 0 {
                    // The controller promises increasing versions; an old one would undo newer state.
                    metrics.rejected.inc();
                    warn!(version = snapshot.version, current, "ignoring a snapshot that is not newer");
                    continue;
                }
                debug!(version = snapshot.version, services = snapshot.services.len(), "snapshot received");
                snapshots.send_replace(Arc::new(snapshot));
            }
            report = reports.recv() => {
                let Some(report) = report else { return Ok(AttemptEnd::NodeStopped) };
                if let NodeReport::Applied { frontends, .. } = &report {
                    let counter = if frontends.iter().all(|f| f.result.is_ok()) { &metrics.acks } else { &metrics.nacks };
                    counter.inc();
                }
                if matches!(report, NodeReport::Load(_)) {
                    *last_load = Some(report.clone());
                }
                let report = match (report, acked.as_mut()) {
                    (NodeReport::Applied { version, frontends }, Some(acked)) => changes_since(acked, version, frontends),
                    (report, _) => report,
                };
                tx.send((&report).into()).await.map_err(|_| StreamError::Closed)?;
            }
        }
    }
}

/// A message of the controller: the snapshot it makes (a whole one, or a delta over the one held), or
/// none (cluster counts are taken in on the way).
fn received(
    message: controller_message::Msg,
    snapshots: &watch::Sender<Arc<RoutingSnapshot>>,
    node: &NodeHandle,
) -> Result<Option<RoutingSnapshot>, StreamError> {
    Ok(Some(match message {
        controller_message::Msg::Snapshot(snapshot) => RoutingSnapshot::try_from(snapshot)?,
        // Deltas start from the last snapshot of this stream, which is the one the node holds (the
        // stream's first message is always whole).
        controller_message::Msg::Delta(delta) => {
            let delta = RoutingDelta::try_from(delta)?;
            let base = delta.base_version;
            let rebuilt = snapshots.borrow().with_delta(delta);
            rebuilt.ok_or_else(|| {
                let held = snapshots.borrow().version;
                StreamError::Protocol(format!("a delta from version {base}, but this node holds version {held}"))
            })?
        }
        controller_message::Msg::ClusterLoad(load) => {
            node.set_remote_load(&convert::cluster_load(&load));
            return Ok(None);
        }
    }))
}

/// The response header of a controller that takes partial acks.
pub const PARTIAL_ACKS: &str = "x-switchboard-partial-acks";

/// The results of `frontends` as changes since `acked` (the last ones acked on this stream), which then
/// become the acked ones.
fn changes_since(
    acked: &mut BTreeMap<ServiceKey, Result<SocketAddr, String>>,
    version: u64,
    frontends: Vec<FrontendStatus>,
) -> NodeReport {
    let now: BTreeMap<_, _> = frontends.into_iter().map(|f| (f.service, f.result)).collect();
    let closed = acked.keys().filter(|service| !now.contains_key(service)).copied().collect();
    let changed = now
        .iter()
        .filter(|(service, result)| acked.get(service) != Some(result))
        .map(|(&service, result)| FrontendStatus { service, result: result.clone() })
        .collect();
    *acked = now;
    NodeReport::AppliedChanges { version, changed, closed }
}

/// The addresses a connection reaches the frontends on: `address` itself, or every address of this host
/// when it is a wildcard (read again at each connect, so an address added since counts).
fn frontends_on(address: IpAddr) -> FrontendAddresses {
    if !address.is_unspecified() {
        return FrontendAddresses { addresses: vec![address], wildcard: false };
    }
    // A wildcard of IPv4 takes IPv4 connections only; `::` takes both (unless the host says v6-only,
    // which would only make the list longer than needed: the cautious side).
    let wanted = |ip: &IpAddr| address.is_ipv6() || ip.is_ipv4();
    let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|all| {
            all.filter_map(|interface| interface.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .filter(wanted)
                .collect()
        })
        .unwrap_or_default();
    addresses.sort_unstable();
    addresses.dedup();
    addresses.truncate(FrontendAddresses::MAX);
    FrontendAddresses { addresses, wildcard: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_lists_only_what_changed_since_the_last_one() {
        let status = |port, result: Result<&str, &str>| FrontendStatus {
            service: ServiceKey::tcp(port),
            result: result.map(|a| a.parse().unwrap()).map_err(str::to_owned),
        };
        let mut acked = BTreeMap::new();
        let first = changes_since(&mut acked, 1, vec![status(80, Ok("0.0.0.0:80")), status(81, Err("in use"))]);
        let NodeReport::AppliedChanges { changed, closed, .. } = first else { panic!() };
        assert_eq!((changed.len(), closed.len()), (2, 0), "the first ack of a stream lists everything");
        let next = vec![status(80, Ok("0.0.0.0:80")), status(81, Ok("0.0.0.0:81")), status(82, Ok("0.0.0.0:82"))];
        let second = changes_since(&mut acked, 2, next);
        assert_eq!(
            second,
            NodeReport::AppliedChanges {
                version: 2,
                changed: vec![status(81, Ok("0.0.0.0:81")), status(82, Ok("0.0.0.0:82"))],
                closed: vec![],
            }
        );
        let third = changes_since(&mut acked, 3, vec![status(82, Ok("0.0.0.0:82"))]);
        let NodeReport::AppliedChanges { changed, closed, .. } = third else { panic!() };
        assert_eq!((changed, closed), (vec![], vec![ServiceKey::tcp(80), ServiceKey::tcp(81)]));
    }
}
