//! The gRPC API: `switchboard.v1.Registry` (the gRPC twin of the JSON channel), `switchboard.v1.Dataplane`
//! (nodes' sync streams, in [`super::sync`]), `switchboard.v1.Admin` (in [`super::admin`]), the standard
//! health service and server reflection (so `grpcurl` works without .proto files).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use contract::{
    client::{AGENT, CLIENT_KIND},
    model::{BackendSpec, BackendTarget, Deregistration, HelloAnswer, RegisterReply, RegistrationRequest},
    process::stopped,
    v1::{
        DeregisterRequest, DeregisterResponse, Hello, RegisterAck, RegisterRequest, RegisterResponse,
        admin_server::AdminServer,
        register_request, register_response,
        registry_server::{Registry, RegistryServer},
    },
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming, service::interceptor::InterceptedService, transport::ServerTlsConfig,
};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    admin::AdminApi,
    auth::{Caller, Tokens},
    in_flight::InFlightLayer,
    invalid_argument,
    listener::CappedListener,
    sync::{DataplaneApi, DataplaneServer},
    tls::ServerTls,
};
use crate::{
    error::ControllerError,
    probe::{Probe, ProbeAction, ProbeSettings},
    store::{Origin, OriginKind, Registration, Requester, Store},
};

/// How the gRPC services behave.
#[derive(Debug, Clone)]
pub struct GrpcSettings {
    /// Hello probes of `Register` streams (a registration may override them).
    pub probe: ProbeSettings,
    /// How long a registration waits for nodes' bind results.
    pub bind_ack_timeout: Duration,
    /// Send each node the other nodes' counts.
    pub cluster_counts: bool,
    /// The doors' tokens.
    pub tokens: Tokens,
    /// Any registration may name another host's backend, not only an operator's.
    pub allow_foreign_backends: bool,
    /// TLS of the listener.
    pub tls: Option<ServerTls>,
    /// A `Register` or `Sync` stream must send its first message within this (`--first-request-timeout`):
    /// a stream left waiting would hold its connection as a request in flight.
    pub first_message_timeout: Duration,
}

/// Serves every gRPC service on `listener` until `shutdown` turns true. Health and reflection stay open:
/// they tell nothing but that the controller is up and what it speaks.
pub async fn serve(
    listener: CappedListener,
    store: Arc<Store>,
    settings: GrpcSettings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ControllerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RegistryServer<RegistryApi>>().await;
    health.set_serving::<AdminServer<AdminApi>>().await;
    health.set_serving::<DataplaneServer>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(contract::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| ControllerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| ControllerError::Reflection(e.to_string()))?;

    let tokens = &settings.tokens;
    let registry = RegistryApi {
        store: Arc::clone(&store),
        probe: settings.probe,
        bind_ack_timeout: settings.bind_ack_timeout,
        allow_foreign_backends: settings.allow_foreign_backends,
        first_message_timeout: settings.first_message_timeout,
        shutdown: shutdown.clone(),
    };
    let dataplane = DataplaneApi {
        store: Arc::clone(&store),
        shutdown: shutdown.clone(),
        cluster_counts: settings.cluster_counts,
        nodes_need_certificates: settings.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some()),
        messages: Arc::default(),
        first_message_timeout: settings.first_message_timeout,
    };
    let admin = AdminApi { store, shutdown: shutdown.clone() };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &settings.tls {
        // A client that opens a connection and never finishes the handshake gives its slot back.
        let mut config = ServerTlsConfig::new().identity(tls.identity.clone()).timeout(Duration::from_secs(5));
        if let Some(ca) = &tls.client_ca {
            // Agents and operators come with tokens, not certificates; Dataplane.Sync insists on one.
            config = config.client_ca_root(ca.clone()).client_auth_optional(true);
        }
        server = server.tls_config(config)?;
    }
    let in_flight = InFlightLayer::new(Arc::clone(listener.door()));
    server
        // Counts each connection's requests in flight: a connection without one is closed after its
        // door's timeouts, and is the first to make room when the door is full.
        .layer(in_flight)
        // Notices dead peers (a node or agent host gone without a FIN) instead of keeping their streams.
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(RegistryServer::with_interceptor(registry, tokens.registry()))
        .add_service(InterceptedService::new(DataplaneServer::new(dataplane), tokens.dataplane()))
        .add_service(AdminServer::with_interceptor(admin, tokens.admin()))
        .serve_with_incoming_shutdown(listener.incoming(), async move { stopped(&mut shutdown).await })
        .await?;
    Ok(())
}

/// `switchboard.v1.Registry`.
#[derive(Debug)]
pub struct RegistryApi {
    store: Arc<Store>,
    probe: ProbeSettings,
    bind_ack_timeout: Duration,
    allow_foreign_backends: bool,
    first_message_timeout: Duration,
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
        let caller = request.extensions().get::<Caller>().copied().unwrap_or(Caller::Anyone);
        let client_kind = request.metadata().get(CLIENT_KIND).cloned();
        let mut inbound = request.into_inner();
        let first = super::first_message(&mut inbound, self.first_message_timeout)
            .await?
            .ok_or_else(|| Status::invalid_argument("stream ended before `register`"))?;
        let Some(register_request::Msg::Register(first)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be `register`"));
        };
        let first = RegistrationRequest::try_from(&first).map_err(invalid_argument)?;
        let rules = BackendRules { caller, peer, allow_foreign: self.allow_foreign_backends };
        rules.check(first.backend)?;

        let origin = match client_kind {
            Some(kind) if kind == AGENT => Origin { kind: OriginKind::Agent, peer },
            _ => Origin::grpc(peer),
        };
        let origin_kind = origin.kind.as_str();
        // Not taken while the shared store is out of reach: the stream fails with UNAVAILABLE, which
        // clients retry (an ack refusing it would read as a final no).
        self.store.check_shared()?;
        let registration = self.store.open_registration(origin, caller.credential())?;
        registration.set_healthy(first.healthy.unwrap_or(true))?;
        let (tx, rx) = mpsc::channel(16);
        let ack = register_ack(&registration, &first, peer, self.bind_ack_timeout).await;
        let success = ack.success;
        tx.send(Ok(response(register_response::Msg::Ack(ack)))).await.map_err(|_| Status::cancelled("client left"))?;
        if success {
            let stream = RegisterStream {
                registration,
                inbound,
                tx,
                peer,
                rules,
                bind_ack_timeout: self.bind_ack_timeout,
                shutdown: self.shutdown.clone(),
            };
            let span = info_span!("registration", id = %stream.registration.id(), origin = origin_kind, %peer);
            tokio::spawn(stream.run(self.probe.with(first.probe)).instrument(span));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn deregister(&self, request: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        let peer = request.remote_addr().ok_or_else(|| Status::internal("the peer address is unknown"))?;
        let caller = request.extensions().get::<Caller>().copied().unwrap_or(Caller::Anyone);
        let request = Deregistration::try_from(request.get_ref()).map_err(invalid_argument)?;
        BackendRules { caller, peer, allow_foreign: self.allow_foreign_backends }.check(request.backend)?;
        let backend = request.backend.resolve(peer.ip(), request.service);
        let requester = Requester { registration: None, credential: caller.credential(), peer: peer.ip() };
        let version = self.store.unregister(request.service, backend, requester, "deregistered over gRPC")?;
        Ok(Response::new(DeregisterResponse { version }))
    }
}

/// A live `Register` stream after its first ack: answers hellos, accepts further `register` messages.
struct RegisterStream {
    registration: Registration,
    inbound: Streaming<RegisterRequest>,
    tx: ResponseTx,
    peer: SocketAddr,
    rules: BackendRules,
    bind_ack_timeout: Duration,
    shutdown: watch::Receiver<bool>,
}

// === impl RegisterStream ===

impl RegisterStream {
    async fn run(mut self, settings: ProbeSettings) {
        let mut probe = Probe::new(settings, Instant::now());
        let reason = loop {
            tokio::select! {
                message = self.inbound.message() => match message {
                    Ok(Some(RegisterRequest { msg: Some(register_request::Msg::HelloAck(ack)) })) => {
                        if let Some(rtt) = probe.on_answer(Instant::now()) {
                            self.registration.hello_answered(rtt);
                        }
                        let answer = HelloAnswer::from(&ack);
                        if let Some(load) = answer.load {
                            self.registration.report_load(load);
                        }
                        if let Err(error) = self.registration.set_healthy(answer.healthy) {
                            let _ = self.tx.send(Err(error.into())).await;
                            break "the store refused a health change".to_owned();
                        }
                    }
                    Ok(Some(RegisterRequest { msg: Some(register_request::Msg::Register(more)) })) => {
                        let more = RegistrationRequest::try_from(&more).map_err(invalid_argument);
                        let ack = match more.and_then(|more| self.rules.check(more.backend).map(|()| more)) {
                            Ok(more) => register_ack(&self.registration, &more, self.peer, self.bind_ack_timeout).await,
                            Err(status) => (&RegisterReply { success: false, message: Some(status.message().to_owned()), backend: None }).into(),
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
                why = self.registration.ended_by_operator() => {
                    // Said on the stream, so the agent logs it and leaves the backend out.
                    let _ = self.tx.send(Err(Status::aborted(format!("registration ended: {why}")))).await;
                    break why;
                }
                () = self.tx.closed() => break "stream closed by the client".to_owned(),
                () = stopped(&mut self.shutdown) => break "controller shutting down".to_owned(),
            }
        };
        self.registration.close(reason);
    }
}

/// Which backends a `Registry` call may name: its own host's, unless its caller is an operator or the
/// controller lets anyone name any (`--allow-foreign-backends`). Otherwise a client could take over, and
/// then remove, a backend that another registration announced.
#[derive(Debug, Clone, Copy)]
struct BackendRules {
    caller: Caller,
    peer: SocketAddr,
    allow_foreign: bool,
}

// === impl BackendRules ===

impl BackendRules {
    fn check(&self, backend: BackendTarget) -> Result<(), Status> {
        match backend.ip {
            Some(ip)
                if ip.to_canonical() != self.peer.ip().to_canonical()
                    && !self.allow_foreign
                    && self.caller != Caller::Operator =>
            {
                Err(Status::permission_denied(format!(
                    "backend_address {ip} is not the address this call comes from ({}); naming another host's \
                     backend needs the admin token or --allow-foreign-backends",
                    self.peer.ip()
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Registers what `request` asks for on `registration` and phrases the outcome as an ack.
async fn register_ack(
    registration: &Registration,
    request: &RegistrationRequest,
    peer: SocketAddr,
    bind_ack_timeout: Duration,
) -> RegisterAck {
    let backend = BackendSpec { address: request.backend.resolve(peer.ip(), request.service), weight: request.weight };
    let reply =
        registration.register(request.service, backend, request.ask, bind_ack_timeout).await.unwrap_or_else(|error| {
            info!(%peer, service = %request.service, %error, "registration refused");
            RegisterReply { success: false, message: Some(error.to_string()), backend: Some(backend.address) }
        });
    (&reply).into()
}

fn response(msg: register_response::Msg) -> RegisterResponse {
    RegisterResponse { msg: Some(msg) }
}
