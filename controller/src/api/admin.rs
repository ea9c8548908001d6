//! `switchboard.v1.Admin`: operators read and steer the registry with any gRPC client (grpcurl first).
//! Errors map to gRPC codes through the one `From<StoreError> for Status`.

use std::sync::Arc;

use contract::{
    convert,
    model::{BackendRef, ServiceKey},
    process::stopped,
    v1::{
        self, DrainBackendRequest, DrainBackendResponse, ListNodesRequest, ListNodesResponse, ListServicesRequest,
        ListServicesResponse, SetAlgorithmRequest, SetAlgorithmResponse, SetWeightRequest, SetWeightResponse,
        WatchEventsRequest, admin_server::Admin,
    },
};
use tokio::sync::{broadcast::error::RecvError, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;

use super::invalid_argument;
use crate::store::Store;

/// `switchboard.v1.Admin`.
#[derive(Debug)]
pub struct AdminApi {
    /// The registry.
    pub store: Arc<Store>,
    /// Ends every `WatchEvents` stream, so a graceful shutdown does not wait on watchers.
    pub shutdown: watch::Receiver<bool>,
}

// === impl AdminApi ===

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
        Ok(Response::new(self.store.view().into()))
    }

    async fn drain_backend(
        &self,
        request: Request<DrainBackendRequest>,
    ) -> Result<Response<DrainBackendResponse>, Status> {
        let target = BackendRef::try_from(request.get_ref().backend.as_ref()).map_err(invalid_argument)?;
        let version = self.store.drain_backend(target.service, target.backend)?;
        Ok(Response::new(DrainBackendResponse { version }))
    }

    async fn set_weight(&self, request: Request<SetWeightRequest>) -> Result<Response<SetWeightResponse>, Status> {
        let request = request.get_ref();
        let target = BackendRef::try_from(request.backend.as_ref()).map_err(invalid_argument)?;
        let weight = convert::weight(request.weight).map_err(invalid_argument)?;
        let version = self.store.set_weight(target.service, target.backend, weight)?;
        Ok(Response::new(SetWeightResponse { version }))
    }

    async fn set_algorithm(
        &self,
        request: Request<SetAlgorithmRequest>,
    ) -> Result<Response<SetAlgorithmResponse>, Status> {
        let request = request.get_ref();
        let service = ServiceKey::try_from(request.service.as_ref()).map_err(invalid_argument)?;
        let algorithm = convert::algorithm(&request.algorithm).map_err(invalid_argument)?;
        let version = self.store.set_algorithm(service, algorithm)?;
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
                    () = stopped(&mut shutdown) => return,
                };
                let message = match event {
                    Ok(event) => Ok(convert::event_message(event, with_state.then(|| store.view()))),
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
