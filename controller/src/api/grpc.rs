//! The gRPC API: `switchboard.v1.Registry` (the gRPC twin of the JSON channel), `switchboard.v1.Dataplane`
//! (nodes' sync streams, in [`super::sync`]), `switchboard.v1.Admin`, the standard health service and
//! server reflection (so `grpcurl` works without .proto files).
//!
//! Wire types are converted to domain types here and nowhere else.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use dataplane::{Algorithm, BackendSpec, ServiceKey};
use switchboard_proto::v1::{
    self, DeregisterRequest, DeregisterResponse, Hello, RegisterAck, RegisterRequest, RegisterResponse,
    Registration as RegistrationMsg,
    admin_server::AdminServer,
    dataplane_server::DataplaneServer,
    register_request, register_response,
    registry_server::{Registry, RegistryServer},
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::admin::AdminApi;
use crate::{
    error::{ControllerError, StoreError},
    probe::{Probe, ProbeAction, ProbeSettings},
    store::{Origin, Registration, Store},
};

/// Serves every gRPC service on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    probe: ProbeSettings,
    bind_ack_timeout: Duration,
    cluster_counts: bool,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ControllerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RegistryServer<RegistryApi>>().await;
    health.set_serving::<AdminServer<AdminApi>>().await;
    health.set_serving::<DataplaneServer<super::sync::DataplaneApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| ControllerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| ControllerError::Reflection(e.to_string()))?;

    let registry = RegistryApi { store: Arc::clone(&store), probe, bind_ack_timeout, shutdown: shutdown.clone() };
    let dataplane = super::sync::DataplaneApi { store: Arc::clone(&store), shutdown: shutdown.clone(), cluster_counts };
    tonic::transport::Server::builder()
        // Notices dead peers (a node or agent host gone without a FIN) instead of keeping their streams.
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(RegistryServer::new(registry))
        .add_service(DataplaneServer::new(dataplane))
        .add_service(AdminServer::new(AdminApi { store, shutdown: shutdown.clone() }))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            async move { crate::stopped(&mut shutdown).await },
        )
        .await?;
    Ok(())
}

/// `switchboard.v1.Registry`.
#[derive(Debug)]
pub struct RegistryApi {
    store: Arc<Store>,
    probe: ProbeSettings,
    bind_ack_timeout: Duration,
    /// Ends every `Register` stream, so a graceful server shutdown does not wait on them forever.
    shutdown: watch::Receiver<bool>,
}

type ResponseTx = mpsc::Sender<Result<RegisterResponse, Status>>;

// === impl RegistryApi ===

#[tonic::async_trait]
impl Registry for RegistryApi {
    type RegisterStream = ReceiverStream<Result<RegisterResponse, Status>>;

    async fn register(
        &self,
        request: Request<Streaming<RegisterRequest>>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let peer = request.remote_addr().ok_or_else(|| Status::internal("the peer address is unknown"))?;
        let mut inbound = request.into_inner();
        let first =
            inbound.message().await?.ok_or_else(|| Status::invalid_argument("stream ended before `register`"))?;
        let Some(register_request::Msg::Register(first)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be `register`"));
        };
        let (service, backend, algorithm, probe) = registration(&first, peer.ip(), self.probe)?;

        let registration = self.store.open_registration(Origin::grpc(peer));
        registration.set_healthy(first.healthy.unwrap_or(true));
        let (tx, rx) = mpsc::channel(16);
        let ack = register_ack(&registration, service, backend, algorithm, self.bind_ack_timeout).await;
        let success = ack.success;
        tx.send(Ok(response(register_response::Msg::Ack(ack)))).await.map_err(|_| Status::cancelled("client left"))?;
        if success {
            let session = Session {
                registration,
                inbound,
                tx,
                peer,
                bind_ack_timeout: self.bind_ack_timeout,
                shutdown: self.shutdown.clone(),
            };
            tokio::spawn(session.run(probe));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn deregister(&self, request: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        let peer = request.remote_addr().ok_or_else(|| Status::internal("the peer address is unknown"))?;
        let request = request.into_inner();
        let service = service_key(request.service.as_ref())?;
        let ip = backend_ip(&request.backend_address, peer.ip())?;
        let port = backend_port(request.backend_port, service.port)?;
        let version = self.store.unregister(service, SocketAddr::new(ip, port), "deregistered over gRPC")?;
        Ok(Response::new(DeregisterResponse { version }))
    }
}

/// A live `Register` stream after its first ack: answers hellos, accepts further `register` messages.
struct Session {
    registration: Registration,
    inbound: Streaming<RegisterRequest>,
    tx: ResponseTx,
    peer: SocketAddr,
    bind_ack_timeout: Duration,
    shutdown: watch::Receiver<bool>,
}

impl Session {
    async fn run(mut self, settings: ProbeSettings) {
        let mut probe = Probe::new(settings, Instant::now());
        let reason = loop {
            tokio::select! {
                message = self.inbound.message() => match message {
                    Ok(Some(RegisterRequest { msg: Some(register_request::Msg::HelloAck(ack)) })) => {
                        probe.on_answer();
                        self.registration.set_healthy(ack.healthy.unwrap_or(true));
                    }
                    Ok(Some(RegisterRequest { msg: Some(register_request::Msg::Register(more)) })) => {
                        let ack = match registration(&more, self.peer.ip(), settings) {
                            Ok((service, backend, algorithm, _)) => {
                                register_ack(&self.registration, service, backend, algorithm, self.bind_ack_timeout).await
                            }
                            Err(status) => RegisterAck { success: false, message: status.message().to_owned(), backend: String::new() },
                        };
                        if self.tx.send(Ok(response(register_response::Msg::Ack(ack)))).await.is_err() {
                            break "stream closed by the client".to_owned();
                        }
                    }
                    Ok(Some(RegisterRequest { msg: None })) => {}
                    Ok(None) => break "stream ended".to_owned(),
                    Err(status) => break format!("stream failed: {}", status.message()),
                },
                () = tokio::time::sleep_until(probe.deadline()) => match probe.on_timer(Instant::now()) {
                    ProbeAction::Wait => {}
                    ProbeAction::SendHello(seq) => {
                        debug!(peer = %self.peer, seq, "hello");
                        if self.tx.send(Ok(response(register_response::Msg::Hello(Hello { seq })))).await.is_err() {
                            break "stream closed by the client".to_owned();
                        }
                    }
                    ProbeAction::Expired { misses } => {
                        warn!(peer = %self.peer, misses, "registration stopped answering hellos");
                        let _ = self.tx.send(Err(Status::deadline_exceeded(format!("no answer to {misses} hellos in a row")))).await;
                        break format!("no answer to {misses} hellos in a row");
                    }
                },
                () = self.tx.closed() => break "stream closed by the client".to_owned(),
                () = crate::stopped(&mut self.shutdown) => break "controller shutting down".to_owned(),
            }
        };
        self.registration.close(reason);
    }
}

async fn register_ack(
    registration: &Registration,
    service: ServiceKey,
    backend: BackendSpec,
    algorithm: Option<Algorithm>,
    bind_ack_timeout: Duration,
) -> RegisterAck {
    match registration.register(service, backend, algorithm, bind_ack_timeout).await {
        Ok(reply) => RegisterAck {
            success: reply.success,
            message: reply.message.unwrap_or_default(),
            backend: reply.backend.to_string(),
        },
        Err(error) => RegisterAck { success: false, message: error.to_string(), backend: backend.addr.to_string() },
    }
}

fn response(msg: register_response::Msg) -> RegisterResponse {
    RegisterResponse { msg: Some(msg) }
}

/// Validates a `Registration` message: the service, the backend (defaulting to the peer's address and the
/// service port), the algorithm asked for, and its probe settings (defaulting to the controller's).
fn registration(
    msg: &RegistrationMsg,
    peer: IpAddr,
    defaults: ProbeSettings,
) -> Result<(ServiceKey, BackendSpec, Option<Algorithm>, ProbeSettings), Status> {
    let service = service_key(msg.service.as_ref())?;
    let ip = backend_ip(&msg.backend_address, peer)?;
    let port = backend_port(msg.backend_port, service.port)?;
    let weight = if msg.weight == 0 { 1 } else { msg.weight };
    if weight > 10_000 {
        return Err(Status::invalid_argument("weight must be in 1..=10000"));
    }
    let mut probe = defaults;
    if let Some(h) = &msg.health {
        if h.interval_ms > 0 {
            probe.interval = Duration::from_millis(h.interval_ms.into());
        }
        if h.timeout_ms > 0 {
            probe.timeout = Duration::from_millis(h.timeout_ms.into());
        }
        if h.failures > 0 {
            probe.failures = h.failures;
        }
    }
    let algorithm = match msg.algorithm.as_str() {
        "" => None,
        name => Some(algorithm(name)?),
    };
    Ok((service, BackendSpec { addr: SocketAddr::new(ip, port), weight }, algorithm, probe))
}

/// An algorithm by name, or `InvalidArgument` listing the known ones.
pub(super) fn algorithm(name: &str) -> Result<Algorithm, Status> {
    name.parse().map_err(|_| {
        let known: Vec<&str> = Algorithm::ALL.iter().map(|a| a.as_str()).collect();
        Status::invalid_argument(format!("unknown algorithm {name:?} (expected one of {})", known.join(", ")))
    })
}

/// The service of a request, or `InvalidArgument`.
pub(super) fn service_key(key: Option<&v1::ServiceKey>) -> Result<ServiceKey, Status> {
    ServiceKey::try_from(key).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn backend_ip(address: &str, peer: IpAddr) -> Result<IpAddr, Status> {
    if address.is_empty() {
        return Ok(peer);
    }
    address.parse().map_err(|_| Status::invalid_argument(format!("backend_address {address:?} is not an IP address")))
}

fn backend_port(port: u32, service_port: u16) -> Result<u16, Status> {
    match port {
        0 => Ok(service_port),
        p => u16::try_from(p).map_err(|_| Status::invalid_argument(format!("backend_port {p} is not in 1..=65535"))),
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { .. } | StoreError::NoService { .. } => Status::not_found(error.to_string()),
            StoreError::AlgorithmConflict { .. } => Status::failed_precondition(error.to_string()),
            StoreError::InvalidWeight { .. } => Status::invalid_argument(error.to_string()),
            StoreError::PortNotAllowed { .. } | StoreError::ReservedPort { .. } => {
                Status::failed_precondition(error.to_string())
            }
        }
    }
}
