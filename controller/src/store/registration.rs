//! The live registration: the JSON control connection or gRPC `Register` stream that announced backends.
//! Its [`Registration`] handle removes them when dropped, whichever way the connection ends.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use contract::model::{BackendSpec, RegisterReply, ServiceAsk, ServiceKey};
use tokio::sync::watch;

use super::{FrontendVerdict, Store};
use crate::error::StoreError;

/// Identifies a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistrationId(pub(super) u64);

impl std::fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// Where a registration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The channel.
    pub kind: OriginKind,
    /// The peer of that channel.
    pub peer: SocketAddr,
}

/// The kinds of registration channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginKind {
    /// The HW1 JSON control channel.
    Json,
    /// A gRPC `Register` stream.
    Grpc,
    /// A gRPC `Register` stream of a Switchboard `agent`.
    Agent,
    /// A backend another controller holds, imported from the shared store (`--store etcd://`).
    Replica,
    /// A static backend of the configuration file (`--config`); the peer is the backend itself.
    Config,
}

/// What a registration, or a request to change one, proved about who makes it: the token it presented.
/// A backend belongs to the registration that announced it; only that registration, a later one of the
/// same credential from the same address, or an operator changes or ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// No token: a door without one, or a JSON source inside `--json-allow`.
    Anonymous,
    /// The registration token (`--auth-token`).
    Registrant,
    /// The admin token; also the controller's own registrations (the configuration file, other replicas).
    Operator,
}

/// Who asks to change or end a backend, for the owner rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requester {
    /// The registration it speaks for (a JSON connection, a `Register` stream), if any.
    pub registration: Option<RegistrationId>,
    /// What it proved.
    pub credential: Credential,
    /// The address it comes from.
    pub peer: IpAddr,
}

/// A live registration. Dropping it removes every backend it registered.
#[derive(Debug)]
pub struct Registration {
    store: Arc<Store>,
    pub(super) id: RegistrationId,
    close_reason: Option<String>,
    /// Why an operator ended one of its backends, once one did.
    ended_by_operator: watch::Receiver<Option<String>>,
}

// === impl Store ===

impl Store {
    /// Opens a registration made with `credential`; it holds no backend yet.
    pub fn open_registration(
        self: &Arc<Self>,
        origin: Origin,
        credential: Credential,
    ) -> Result<Registration, StoreError> {
        let (id, ended_by_operator) = self.add_registration(origin, credential)?;
        Ok(Registration { store: Arc::clone(self), id, close_reason: None, ended_by_operator })
    }
}

// === impl Registration ===

impl Registration {
    /// Registers `backend` for `service`, then waits (up to `ack_timeout`) for the nodes to say whether
    /// they listen on it. When every node failed, the backend is withdrawn again and the reply says why.
    pub async fn register(
        &self,
        service: ServiceKey,
        backend: BackendSpec,
        ask: ServiceAsk,
        ack_timeout: Duration,
    ) -> Result<RegisterReply, StoreError> {
        let mut registered = self.store.register(self.id, service, backend, ask)?;
        // With replicas, nodes see it once the shared store holds it: the version is its revision.
        let replication = &self.store.replication;
        match replication.confirmed(service, backend.address, registered.version, ack_timeout).await {
            Some(version) => registered.version = version,
            None => {
                let why = "registered; the shared store has not confirmed it yet, nodes get it when it does";
                return Ok(RegisterReply { success: true, message: Some(why.into()), backend: Some(backend.address) });
            }
        }
        let reply =
            |success: bool, message: Option<String>| RegisterReply { success, message, backend: Some(backend.address) };
        let overruled = registered.overruled.map(|(asked, kept)| {
            format!("service {service} keeps {kept}, set by an operator; the {asked} asked for is not applied")
        });
        Ok(match self.store.await_frontend(service, registered.version, ack_timeout).await {
            FrontendVerdict::Serving(note) => reply(
                true,
                match (overruled, note) {
                    (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                    (a, b) => a.or(b),
                },
            ),
            FrontendVerdict::NoNodes => {
                reply(true, Some("no data-plane node is connected; the frontend opens when one connects".to_owned()))
            }
            FrontendVerdict::Failed(why) => {
                if registered.created {
                    self.store.withdraw(self.id, service, backend.address, "no node could open the frontend")?;
                }
                reply(false, Some(why))
            }
        })
    }

    /// Removes `backend` from `service` at the request of this registration's channel, presenting
    /// `credential` (a JSON `unregister` may end a backend of an earlier connection of the same server).
    pub fn unregister(
        &self,
        service: ServiceKey,
        backend: SocketAddr,
        credential: Credential,
        peer: IpAddr,
    ) -> Result<u64, StoreError> {
        let requester = Requester { registration: Some(self.id), credential, peer };
        self.store.unregister(service, backend, requester, "unregistered by the server")
    }

    /// What later requests of this registration prove (a JSON message may carry a token the connection's
    /// first one did not).
    pub fn set_credential(&self, credential: Credential) {
        self.store.set_credential(self.id, credential);
    }

    /// Waits until an operator ends one of this registration's backends, and says why.
    pub async fn ended_by_operator(&mut self) -> String {
        let why = self.ended_by_operator.wait_for(Option::is_some).await.map(|why| why.clone().unwrap_or_default());
        match why {
            Ok(why) => why,
            // The store is gone: nothing will ever end it.
            Err(_) => std::future::pending().await,
        }
    }

    /// Its id, as spans and logs show it.
    pub fn id(&self) -> impl fmt::Display + use<> {
        self.id
    }

    /// Records the registration's own health verdict.
    pub fn set_healthy(&self, healthy: bool) -> Result<(), StoreError> {
        self.store.set_healthy(self.id, healthy)
    }

    /// The registration's server reported its load, in thousandths (agents' `--report-load`).
    pub fn report_load(&self, load: u32) {
        self.store.report_load(self.id, load);
    }

    /// The registration answered a hello after `rtt`.
    pub fn hello_answered(&self, rtt: Duration) {
        self.store.metrics().hello_rtt.observe(rtt.as_secs_f64());
    }

    /// True while the registration holds at least one backend (then it is probed).
    pub fn has_backends(&self) -> bool {
        self.store.lock().registry.registrations.get(&self.id).is_some_and(|r| !r.backends.is_empty())
    }

    /// Ends the registration, logging `reason` for each backend removed.
    pub fn close(mut self, reason: impl Into<String>) {
        self.close_reason = Some(reason.into());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let reason = self.close_reason.as_deref().unwrap_or("registration ended");
        self.store.close_registration(self.id, reason);
    }
}

// === impl Origin ===

impl Origin {
    /// A JSON control channel from `peer`.
    pub fn json(peer: SocketAddr) -> Self {
        Origin { kind: OriginKind::Json, peer }
    }

    /// A gRPC `Register` stream from `peer`.
    pub fn grpc(peer: SocketAddr) -> Self {
        Origin { kind: OriginKind::Grpc, peer }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.peer)
    }
}

// === impl Credential ===

impl Credential {
    /// The credential of the registrations the controller makes itself, and the default of the others.
    pub fn of(kind: OriginKind) -> Self {
        match kind {
            OriginKind::Config | OriginKind::Replica => Credential::Operator,
            OriginKind::Json | OriginKind::Grpc | OriginKind::Agent => Credential::Anonymous,
        }
    }
}

// === impl OriginKind ===

impl OriginKind {
    /// Every kind.
    pub const ALL: [OriginKind; 5] =
        [OriginKind::Json, OriginKind::Grpc, OriginKind::Agent, OriginKind::Replica, OriginKind::Config];

    /// Its name in views and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            OriginKind::Json => "json",
            OriginKind::Grpc => "grpc",
            OriginKind::Agent => "agent",
            OriginKind::Replica => "replica",
            OriginKind::Config => "config",
        }
    }
}
