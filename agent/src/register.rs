//! One service's registration: a loop of `Register` streams. Each stream registers the server with the
//! local verdict, answers the controller's hellos with the current verdict, and pushes a verdict change at
//! once (an unsolicited `hello_ack`) instead of waiting for the next hello. A lost controller is retried
//! with capped, jittered backoff, and the server re-registered when it is back. On shutdown the agent
//! deregisters and waits (bounded) for the controller to confirm.
//!
//! Checks run in a task of their own, so a slow check never delays a hello answer or a shutdown.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use contract::{
    auth::Bearer,
    backoff::Backoff,
    client::{self, Rotation, StreamError},
    model::{BackendTarget, Deregistration, HelloAnswer, ProbeOverrides, RegisterReply, RegistrationRequest},
    process::stopped,
    v1::{
        RegisterRequest, RegisterResponse, register_request::Msg as Out, register_response::Msg as In,
        registry_client::RegistryClient,
    },
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, service::interceptor::InterceptedService, transport::Channel};
use tracing::{info, warn};

use crate::{
    check::{self, Check, Health},
    cli::{AgentConfig, AgentService},
    error::AgentError,
};

/// The agent of one service.
pub struct ServiceAgent {
    config: Arc<AgentConfig>,
    service: AgentService,
    check: Check,
    /// Where local checks go.
    target: SocketAddr,
    /// The server's latest load, in thousandths, with `--report-load`.
    load: watch::Receiver<Option<u32>>,
}

/// A registration the controller acknowledged.
struct Live {
    channel: Channel,
    tx: mpsc::Sender<RegisterRequest>,
    inbound: Streaming<RegisterResponse>,
    /// The backend as the controller recorded it.
    backend: SocketAddr,
}

enum StreamEnd {
    Shutdown,
    Lost(String),
    /// An operator ended the registration: it is not made again (that would undo their decision).
    Ended(String),
}

// === impl ServiceAgent ===

impl ServiceAgent {
    /// The agent of `service`; checks go to the backend address, or 127.0.0.1 when the controller picks it.
    pub fn new(config: Arc<AgentConfig>, service: AgentService, load: watch::Receiver<Option<u32>>) -> Self {
        let ip = config.backend_address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let check = config.check_for(&service);
        ServiceAgent { target: SocketAddr::new(ip, service.backend_port), check, config, service, load }
    }

    /// Registers and keeps the registration alive until `shutdown`; `registered` learns the backend
    /// address the controller recorded, the first time.
    pub async fn run(
        self,
        registered: oneshot::Sender<String>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let first = self.check.run(self.target, self.config.check_timeout).await;
        if let Err(why) = &first {
            warn!(service = %self.service, check = %self.check, %why, "server failing its check: registering it out of rotation");
        }
        let (verdict_tx, mut verdict) = watch::channel(first.is_ok());
        let checker = tokio::spawn(check::follow(
            self.check.clone(),
            self.target,
            self.config.schedule(),
            Health::new(first.is_ok(), self.config.rise, self.config.fall),
            verdict_tx,
            self.service,
        ));
        let result = self.keep_registered(registered, &mut verdict, &mut shutdown).await;
        checker.abort();
        result
    }

    async fn keep_registered(
        &self,
        registered: oneshot::Sender<String>,
        verdict: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let mut backoff =
            Backoff::new(Duration::from_millis(100).min(self.config.backoff_max), self.config.backoff_max);
        // Until the first registration the controller may be unreachable only for --startup-timeout.
        let deadline = Instant::now() + self.config.startup_timeout;
        let mut registered = Some(registered);
        let mut rotation = Rotation::new(self.config.controllers.clone());
        loop {
            let starting = registered.is_some();
            let controller = rotation.current().to_owned();
            let attempt = self.register(&controller, *verdict.borrow());
            let attempt = async {
                if starting {
                    tokio::time::timeout_at(deadline, attempt).await.unwrap_or(Err(StreamError::Closed))
                } else {
                    attempt.await
                }
            };
            tokio::pin!(attempt);
            let outcome = tokio::select! {
                outcome = &mut attempt => outcome,
                () = stopped(shutdown) => {
                    // The controller may already hold the registration: let the attempt finish (bounded)
                    // and deregister it properly, rather than leave it to the stream's end.
                    if let Ok(Ok(live)) = tokio::time::timeout(self.config.deregister_timeout, &mut attempt).await {
                        self.deregister(live.channel, live.backend).await;
                    }
                    return Ok(());
                }
            };
            let lost = match outcome {
                Ok(live) => {
                    if let Some(registered) = registered.take() {
                        let _ = registered.send(format!("{}={}", self.service, live.backend));
                    }
                    backoff.reset();
                    rotation.held();
                    match self.serve(live, verdict, shutdown).await {
                        StreamEnd::Shutdown => return Ok(()),
                        StreamEnd::Ended(why) => {
                            warn!(service = %self.service, %why, "the controller ended this registration: not registering it again until the agent restarts");
                            return Ok(());
                        }
                        StreamEnd::Lost(why) => why,
                    }
                }
                // Refused at startup: retrying changes nothing (a port the controller does not allow, a
                // token it does not take, a backend address this agent may not name).
                Err(StreamError::Refused(why)) if starting => {
                    return Err(AgentError::Refused { service: self.service.to_string(), why });
                }
                Err(StreamError::Stream(status))
                    if starting && matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied) =>
                {
                    let why = status.message().to_owned();
                    return Err(AgentError::Refused { service: self.service.to_string(), why });
                }
                Err(error) => error.to_string(),
            };
            let now = Instant::now();
            if starting && now >= deadline {
                return Err(AgentError::Unreachable {
                    controller: rotation.all().join(","),
                    waited: self.config.startup_timeout,
                    last: lost,
                });
            }
            // The next controller at once; a pause only after every one failed in a row.
            let mut delay = if rotation.failed() { backoff.next_delay() } else { Duration::ZERO };
            if starting {
                delay = delay.min(deadline - now);
            }
            let next = rotation.current();
            warn!(service = %self.service, %controller, why = %lost, %next, retry_in = ?delay, "not registered");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(shutdown) => return Ok(()),
            }
            // No attempt starts at the deadline only to be cut at once: the failure that ran out the time
            // is the one to report, not "the stream closed".
            if starting && Instant::now() >= deadline {
                return Err(AgentError::Unreachable {
                    controller: rotation.all().join(","),
                    waited: self.config.startup_timeout,
                    last: lost,
                });
            }
        }
    }

    /// Connects, registers with `healthy` as the initial verdict, and waits for the ack.
    async fn register(&self, controller: &str, healthy: bool) -> Result<Live, StreamError> {
        let channel = client::connect(controller, self.config.backend_address, self.config.tls.as_ref()).await?;
        let (tx, rx) = mpsc::channel(16);
        let registration = RegistrationRequest {
            service: self.service.key,
            backend: BackendTarget { ip: self.config.backend_address, port: Some(self.service.backend_port) },
            weight: self.config.weight,
            ask: self.config.ask,
            probe: ProbeOverrides::default(),
            healthy: Some(healthy),
        };
        let message = RegisterRequest { msg: Some(Out::Register((&registration).into())) };
        tx.send(message).await.map_err(|_| StreamError::Closed)?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert(client::CLIENT_KIND, tonic::metadata::AsciiMetadataValue::from_static(client::AGENT));
        let mut inbound = self.client(channel.clone()).register(request).await?.into_inner();
        let Some(In::Ack(ack)) = inbound.message().await?.and_then(|m| m.msg) else { return Err(StreamError::Closed) };
        let reply = RegisterReply::try_from(&ack)?;
        let note = reply.message.unwrap_or_default();
        match reply.backend {
            Some(backend) if reply.success => {
                info!(service = %self.service, %backend, healthy, %note, "registered");
                Ok(Live { channel, tx, inbound, backend })
            }
            _ => Err(StreamError::Refused(note)),
        }
    }

    /// The `Registry` client over `channel`, presenting the agent's token.
    fn client(&self, channel: Channel) -> RegistryClient<InterceptedService<Channel, Bearer>> {
        RegistryClient::with_interceptor(channel, Bearer::new(self.config.token.as_ref()))
    }

    /// Answers hellos and reports verdict changes until the stream is lost or the agent stops.
    async fn serve(
        &self,
        mut live: Live,
        verdict: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> StreamEnd {
        verdict.mark_unchanged();
        loop {
            let answer = tokio::select! {
                message = live.inbound.message() => match message {
                    Ok(Some(RegisterResponse { msg: Some(In::Hello(hello)) })) => {
                        answer(hello.seq, *verdict.borrow(), *self.load.borrow())
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return StreamEnd::Lost("the controller ended the stream".into()),
                    Err(status) if status.code() == Code::Aborted => {
                        return StreamEnd::Ended(status.message().to_owned());
                    }
                    Err(status) => return StreamEnd::Lost(status.message().to_owned()),
                },
                // Tell the controller now rather than at the next hello.
                Ok(()) = verdict.changed() => answer(0, *verdict.borrow_and_update(), *self.load.borrow()),
                () = stopped(shutdown) => {
                    self.deregister(live.channel, live.backend).await;
                    return StreamEnd::Shutdown;
                }
            };
            if live.tx.send(answer).await.is_err() {
                return StreamEnd::Lost("the stream closed".into());
            }
        }
    }

    /// Removes the backend and waits for the controller's word, at most `--deregister-timeout`. The stream's
    /// end would remove it too; the explicit call is what confirms it.
    async fn deregister(&self, channel: Channel, backend: SocketAddr) {
        let request = Deregistration { service: self.service.key, backend: BackendTarget::exact(backend) };
        let mut client = self.client(channel);
        let call = client.deregister(contract::v1::DeregisterRequest::from(&request));
        match tokio::time::timeout(self.config.deregister_timeout, call).await {
            Ok(Ok(reply)) => {
                info!(service = %self.service, %backend, version = reply.get_ref().version, "deregistered")
            }
            Ok(Err(status)) => {
                warn!(service = %self.service, %backend, status = %status.message(), "deregistration refused")
            }
            Err(_) => warn!(service = %self.service, %backend, "no deregistration confirmation in time"),
        }
    }
}

fn answer(seq: u64, healthy: bool, load: Option<u32>) -> RegisterRequest {
    HelloAnswer { seq, healthy, load }.into()
}
