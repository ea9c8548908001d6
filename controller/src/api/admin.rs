//! `switchboard.v1.Admin`: operators read and steer the registry with any gRPC client (grpcurl first).
//! Errors map to gRPC codes through the one `From<StoreError> for Status`.

use std::{net::SocketAddr, sync::Arc};

use dataplane::{FrontendStatus, ServiceKey};
use switchboard_proto::v1::{
    self, DrainBackendRequest, DrainBackendResponse, ListNodesRequest, ListNodesResponse, ListServicesRequest,
    ListServicesResponse, SetAlgorithmRequest, SetAlgorithmResponse, SetWeightRequest, SetWeightResponse,
    WatchEventsRequest, admin_server::Admin,
};
use tokio::sync::{broadcast::error::RecvError, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

use super::grpc::{algorithm, service_key};
use crate::store::{Event, EventKind, StateView, Store};

/// `switchboard.v1.Admin`.
#[derive(Debug)]
pub struct AdminApi {
    /// The registry.
    pub store: Arc<Store>,
    /// Ends every `WatchEvents` stream, so a graceful shutdown does not wait on watchers.
    pub shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Admin for AdminApi {
    type WatchEventsStream = ReceiverStream<Result<v1::Event, Status>>;

    async fn list_services(
        &self,
        _request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Ok(Response::new(self.store.view().into()))
    }

    async fn list_nodes(&self, _request: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let view = self.store.view();
        let nodes = view
            .nodes
            .into_iter()
            .map(|n| v1::NodeInfo {
                id: n.id,
                connected: n.connected,
                acked_version: n.acked_version,
                last_seen_ms_ago: n.last_seen_ms_ago,
                address: n.address.map(|a| a.to_string()).unwrap_or_default(),
                frontends: n
                    .frontends
                    .iter()
                    .map(|f| {
                        let service = ServiceKey { protocol: f.protocol, port: f.port };
                        let result = f.listening.ok_or_else(|| f.error.clone().unwrap_or_default());
                        (&FrontendStatus { service, result }).into()
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListNodesResponse { version: view.version, nodes }))
    }

    async fn drain_backend(
        &self,
        request: Request<DrainBackendRequest>,
    ) -> Result<Response<DrainBackendResponse>, Status> {
        let (service, backend) = backend_ref(request.into_inner().backend.as_ref())?;
        let version = self.store.drain_backend(service, backend)?;
        Ok(Response::new(DrainBackendResponse { version }))
    }

    async fn set_weight(&self, request: Request<SetWeightRequest>) -> Result<Response<SetWeightResponse>, Status> {
        let request = request.into_inner();
        let (service, backend) = backend_ref(request.backend.as_ref())?;
        let version = self.store.set_weight(service, backend, request.weight)?;
        Ok(Response::new(SetWeightResponse { version }))
    }

    async fn set_algorithm(
        &self,
        request: Request<SetAlgorithmRequest>,
    ) -> Result<Response<SetAlgorithmResponse>, Status> {
        let request = request.into_inner();
        let service = service_key(request.service.as_ref())?;
        let version = self.store.set_algorithm(service, algorithm(&request.algorithm)?)?;
        Ok(Response::new(SetAlgorithmResponse { version }))
    }

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let with_state = request.into_inner().with_state;
        let mut events = self.store.watch_events();
        let (tx, rx) = mpsc::channel(64);
        let store = Arc::clone(&self.store);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    () = tx.closed() => return,
                    () = crate::stopped(&mut shutdown) => return,
                };
                let message = match event {
                    Ok(event) => Ok(to_wire(event, with_state.then(|| store.view().into()))),
                    Err(RecvError::Lagged(missed)) => {
                        warn!(missed, "an event watcher fell behind; ending its stream");
                        Err(Status::data_loss(format!("{missed} events missed: the watcher was too slow")))
                    }
                    Err(RecvError::Closed) => return,
                };
                let last = message.is_err();
                if tx.send(message).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The (service, backend) of a `BackendRef`, or `InvalidArgument`.
fn backend_ref(reference: Option<&v1::BackendRef>) -> Result<(ServiceKey, SocketAddr), Status> {
    let reference = reference.ok_or_else(|| Status::invalid_argument("missing backend"))?;
    let service = service_key(reference.service.as_ref())?;
    let backend = reference
        .backend
        .parse()
        .map_err(|_| Status::invalid_argument(format!("backend {:?} is not ip:port", reference.backend)))?;
    Ok((service, backend))
}

fn to_wire(event: Event, state: Option<ListServicesResponse>) -> v1::Event {
    let kind = match event.kind {
        EventKind::BackendRegistered => v1::EventKind::BackendRegistered,
        EventKind::BackendRemoved => v1::EventKind::BackendRemoved,
        EventKind::BackendHealthy => v1::EventKind::BackendHealthy,
        EventKind::BackendUnhealthy => v1::EventKind::BackendUnhealthy,
        EventKind::BackendDraining => v1::EventKind::BackendDraining,
        EventKind::WeightChanged => v1::EventKind::WeightChanged,
        EventKind::ServiceAdded => v1::EventKind::ServiceAdded,
        EventKind::ServiceRemoved => v1::EventKind::ServiceRemoved,
        EventKind::NodeJoined => v1::EventKind::NodeJoined,
        EventKind::NodeLeft => v1::EventKind::NodeLeft,
        EventKind::WarmUpOver => v1::EventKind::WarmUpOver,
        EventKind::AlgorithmChanged => v1::EventKind::AlgorithmChanged,
    };
    v1::Event {
        kind: kind.into(),
        version: event.version,
        service: event.service.map(Into::into),
        backend: event.backend.map(|b| b.to_string()).unwrap_or_default(),
        node: event.node.unwrap_or_default(),
        detail: event.detail,
        state,
    }
}

impl From<StateView> for ListServicesResponse {
    fn from(view: StateView) -> Self {
        let services = view
            .services
            .into_iter()
            .map(|s| v1::ServiceInfo {
                service: Some(ServiceKey { protocol: s.protocol, port: s.port }.into()),
                algorithm: s.algorithm.to_string(),
                active_connections: s.active_connections,
                backends: s
                    .backends
                    .into_iter()
                    .map(|b| v1::BackendInfo {
                        address: b.address.to_string(),
                        weight: b.weight,
                        healthy: b.healthy,
                        draining: b.draining,
                        active_connections: b.active_connections,
                        total_connections: b.total_connections,
                        registration: b.registration,
                    })
                    .collect(),
            })
            .collect();
        ListServicesResponse { version: view.version, services }
    }
}
