//! One service's registration: a loop of `Register` streams. Each stream registers the server, answers the
//! controller's hellos with the local verdict, and pushes a verdict change at once (an unsolicited
//! `hello_ack`) instead of waiting for the next hello. A lost controller is retried with capped, jittered
//! backoff, and the server re-registered when it is back. On shutdown the agent deregisters and waits
//! (bounded) for the controller to confirm.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use switchboard_proto::{
    backoff::Backoff,
    v1::{
        self, DeregisterRequest, HelloAck, RegisterRequest, Registration, register_request::Msg as Out,
        register_response::Msg as In, registry_client::RegistryClient,
    },
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::{Instant, MissedTickBehavior},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::{
    check::{Check, Health},
    cli::{AgentConfig, Protocol, ServiceSpec},
    error::{AgentError, SessionError},
};

/// The agent of one service.
pub struct ServiceAgent {
    config: Arc<AgentConfig>,
    spec: ServiceSpec,
    check: Check,
    /// Where local checks go.
    target: SocketAddr,
    health: Health,
}

enum Ended {
    Shutdown,
    Lost(String),
}

// === impl ServiceAgent ===

impl ServiceAgent {
    /// The agent of `spec`; checks go to the backend address, or 127.0.0.1 when the controller picks it.
    pub fn new(config: Arc<AgentConfig>, spec: ServiceSpec) -> Self {
        let ip = config.backend_address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let check = config.check_for(&spec);
        let health = Health::new(true, config.rise, config.fall);
        ServiceAgent { target: SocketAddr::new(ip, spec.backend_port), check, health, config, spec }
    }

    /// Registers and keeps the registration alive until `shutdown`; `registered` learns the backend
    /// address the controller recorded, the first time.
    pub async fn run(
        mut self,
        registered: oneshot::Sender<String>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let first = self.check.run(self.target, self.config.check_timeout).await;
        if let Err(why) = &first {
            warn!(service = %self.spec, check = %self.check, %why, "server failing its check: registering it out of rotation");
        }
        self.health = Health::new(first.is_ok(), self.config.rise, self.config.fall);
        let mut backoff =
            Backoff::new(Duration::from_millis(100).min(self.config.backoff_max), self.config.backoff_max);
        let started = Instant::now();
        let mut registered = Some(registered);
        loop {
            let lost = match self.session(&mut registered, &mut backoff, &mut shutdown).await {
                Ok(Ended::Shutdown) => return Ok(()),
                Ok(Ended::Lost(why)) => why,
                // Refused at startup: nothing will change by retrying (a port the controller does not allow,
                // no node could bind it).
                Err(SessionError::Refused(why)) if registered.is_some() => {
                    return Err(AgentError::Refused { service: self.spec.to_string(), why });
                }
                Err(error) => error.to_string(),
            };
            if registered.is_some() && started.elapsed() >= self.config.startup_timeout {
                return Err(AgentError::Unreachable {
                    controller: self.config.controller.clone(),
                    waited: started.elapsed(),
                    last: lost,
                });
            }
            let delay = backoff.next_delay();
            warn!(service = %self.spec, controller = %self.config.controller, why = %lost, retry_in = ?delay, "not registered");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // Nothing is registered while the controller is away: nothing to deregister.
                () = stopped(&mut shutdown) => return Ok(()),
            }
        }
    }

    async fn session(
        &mut self,
        registered: &mut Option<oneshot::Sender<String>>,
        backoff: &mut Backoff,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ended, SessionError> {
        let channel = Endpoint::from_shared(self.config.controller.clone())
            .map_err(|e| SessionError::Url(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect()
            .await?;
        let mut client = RegistryClient::new(channel.clone());
        let (tx, rx) = mpsc::channel(16);
        tx.send(RegisterRequest { msg: Some(Out::Register(self.registration())) })
            .await
            .map_err(|_| SessionError::Closed)?;
        let mut inbound = client.register(ReceiverStream::new(rx)).await?.into_inner();
        let ack = match inbound.message().await?.and_then(|m| m.msg) {
            Some(In::Ack(ack)) if ack.success => ack,
            Some(In::Ack(ack)) => return Err(SessionError::Refused(ack.message)),
            _ => return Err(SessionError::Closed),
        };
        let backend = ack.backend.clone();
        let healthy = self.health.healthy();
        info!(service = %self.spec, %backend, healthy, note = %ack.message, "registered");
        if !healthy {
            tx.send(verdict(0, false)).await.map_err(|_| SessionError::Closed)?;
        }
        if let Some(registered) = registered.take() {
            let _ = registered.send(format!("{}={backend}", self.spec));
        }
        backoff.reset();

        let mut checks =
            tokio::time::interval_at(Instant::now() + self.config.check_interval, self.config.check_interval);
        checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(v1::RegisterResponse { msg: Some(In::Hello(hello)) })) => {
                        tx.send(verdict(hello.seq, self.health.healthy())).await.map_err(|_| SessionError::Closed)?;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(Ended::Lost("the controller ended the stream".into())),
                    Err(status) => return Ok(Ended::Lost(status.message().to_owned())),
                },
                _ = checks.tick() => {
                    let result = self.check.run(self.target, self.config.check_timeout).await;
                    if let Some(healthy) = self.health.observe(result.is_ok()) {
                        match &result {
                            Ok(()) => info!(service = %self.spec, check = %self.check, "server healthy again: back in rotation"),
                            Err(why) => warn!(service = %self.spec, check = %self.check, %why, "server failing: out of rotation"),
                        }
                        // Tell the controller now rather than at the next hello.
                        tx.send(verdict(0, healthy)).await.map_err(|_| SessionError::Closed)?;
                    }
                }
                () = stopped(shutdown) => {
                    self.deregister(channel, &backend).await;
                    return Ok(Ended::Shutdown);
                }
            }
        }
    }

    fn registration(&self) -> Registration {
        let protocol = match self.spec.protocol {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Udp => v1::Protocol::Udp,
        };
        Registration {
            service: Some(v1::ServiceKey { protocol: protocol.into(), port: self.spec.port.into() }),
            backend_address: self.config.backend_address.map(|ip| ip.to_string()).unwrap_or_default(),
            backend_port: self.spec.backend_port.into(),
            weight: self.config.weight,
            health: None,
        }
    }

    /// Removes the backend and waits for the controller's word, at most `--deregister-timeout`. The stream's
    /// end would remove it too; the explicit call is what confirms it.
    async fn deregister(&self, channel: Channel, backend: &str) {
        let Ok(addr) = backend.parse::<SocketAddr>() else { return };
        let request = DeregisterRequest {
            service: self.registration().service,
            backend_address: addr.ip().to_string(),
            backend_port: addr.port().into(),
        };
        let mut client = RegistryClient::new(channel);
        let call = client.deregister(request);
        match tokio::time::timeout(self.config.deregister_timeout, call).await {
            Ok(Ok(reply)) => info!(service = %self.spec, %backend, version = reply.get_ref().version, "deregistered"),
            Ok(Err(status)) => {
                warn!(service = %self.spec, %backend, status = %status.message(), "deregistration refused")
            }
            Err(_) => warn!(service = %self.spec, %backend, "no deregistration confirmation in time"),
        }
    }
}

/// Resolves once `shutdown` turns true, holding no borrow of the channel across the caller's awaits.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn verdict(seq: u64, healthy: bool) -> RegisterRequest {
    RegisterRequest { msg: Some(Out::HelloAck(HelloAck { seq, healthy: Some(healthy) })) }
}
