//! Every change of the registry. Each one validates, applies itself to a draft of the registry, and hands
//! the draft to [`Store::commit`]; one that changes nothing returns the current version and makes none.
//! Events are emitted under the lock, so they keep the order of the changes they describe.

use std::net::{IpAddr, SocketAddr};

use contract::{
    client,
    model::{Algorithm, BackendSpec, Event, EventKind, ServiceAsk, ServiceKey, Weight},
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    State, Store,
    registration::{Credential, Origin, OriginKind, RegistrationId, Requester},
    registry::{Backend, RegistrationRecord},
    shared::OperatorChange,
};
use crate::error::StoreError;

/// Result of [`Store::register`] before any node has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Registered {
    /// First snapshot version that holds the backend.
    pub version: u64,
    /// False when the backend was already registered (then it is not rolled back on failure).
    pub created: bool,
    /// The algorithm asked for was overruled by the operator's choice: (asked, kept).
    pub overruled: Option<(Algorithm, Algorithm)>,
}

// === impl Store ===

impl Store {
    /// Opens a registration made with `credential`; it holds no backend yet, so nothing is published. The
    /// receiver learns why, when an operator ends one of its backends.
    pub(super) fn add_registration(
        &self,
        origin: Origin,
        credential: Credential,
    ) -> Result<(RegistrationId, watch::Receiver<Option<String>>), StoreError> {
        let mut state = self.lock();
        let max = self.policy.limits.registrations_per_source;
        let address = origin.peer.ip();
        let from_there =
            |r: &&RegistrationRecord| r.origin.peer.ip() == address && r.origin.kind != OriginKind::Replica;
        if state.registry.registrations.values().filter(from_there).count() >= max {
            return Err(StoreError::TooManyRegistrations { address, max });
        }
        let mut draft = state.registry.clone();
        let id = draft.new_registration(origin, true);
        let Some(record) = draft.registrations.get_mut(&id) else {
            return Err(StoreError::Invariant(format!("registration {id} vanished as it opened")));
        };
        record.credential = credential;
        let ended = record.ended_by_operator.subscribe();
        Self::keep(&mut state, draft)?;
        self.metrics.registration_opened(origin.kind.as_str());
        Ok((id, ended))
    }

    /// Records what a registration's later requests prove; nothing routed changes.
    pub(super) fn set_credential(&self, registration: RegistrationId, credential: Credential) {
        let mut state = self.lock();
        if let Some(record) = state.registry.registrations.get_mut(&registration) {
            record.credential = credential;
        }
    }

    /// The owner rule: `requester` may change or end a backend of `owner` when it speaks for that
    /// registration, is an operator, or presents the same credential from the backend's address or from
    /// the address the owner registered from (a server that reconnected before its old channel was seen
    /// dead; an agent deregistering on its way out). Another replica's backend is the server's own to
    /// take over.
    fn check_owner(
        state: &State,
        service: ServiceKey,
        backend: SocketAddr,
        owner: RegistrationId,
        requester: Requester,
    ) -> Result<(), StoreError> {
        if requester.registration == Some(owner) || requester.credential == Credential::Operator {
            return Ok(());
        }
        let peer = requester.peer.to_canonical();
        let from_backend = backend.ip().to_canonical() == peer;
        let allowed = state.registry.registrations.get(&owner).is_none_or(|record| match record.origin.kind {
            // Another replica's: its credential is not shared, and replicas share their tokens, so the
            // server itself (an agent moving over when its controller died) may take it.
            OriginKind::Replica => from_backend,
            _ => {
                record.credential == requester.credential
                    && (from_backend || record.origin.peer.ip().to_canonical() == peer)
            }
        });
        if allowed { Ok(()) } else { Err(StoreError::NotOwner { service, backend }) }
    }

    /// Adds `backend` to `service` on behalf of `registration`, creating the service if needed. A backend
    /// already registered by another registration moves to this one (a server that reconnected before its
    /// old channel was noticed dead).
    pub(super) fn register(
        &self,
        registration: RegistrationId,
        service: ServiceKey,
        backend: BackendSpec,
        ask: ServiceAsk,
    ) -> Result<Registered, StoreError> {
        let ServiceAsk { algorithm, proxy } = ask;
        self.check_shared()?;
        self.check_port(service.port)?;
        // A socket call, so outside the lock: whether the backend's address is this host's.
        let here = client::is_local(backend.address.ip().to_canonical());
        let mut state = self.lock();
        self.check_not_itself(&state, service, backend.address, here)?;
        // The first registration of a service chooses its algorithm; a later one may only agree, unless an
        // operator chose since (then the operator's choice stands and the registration goes through).
        let mut overruled = None;
        if let (Some(requested), Some(existing)) = (algorithm, state.registry.services.get(&service))
            && requested != existing.algorithm
            && !existing.backends.is_empty()
        {
            if !existing.algorithm_set_by_operator {
                return Err(StoreError::AlgorithmConflict { service, current: existing.algorithm, requested });
            }
            overruled = Some((requested, existing.algorithm));
        }
        // The PROXY protocol is the first registration's (or the file's); a later one may only agree.
        if let (Some(requested), Some(existing)) = (proxy, state.registry.services.get(&service))
            && requested != existing.proxy
            && !existing.backends.is_empty()
        {
            return Err(StoreError::ProxyConflict { service, current: existing.proxy, requested });
        }
        let Some((origin, credential)) =
            state.registry.registrations.get(&registration).map(|r| (r.origin, r.credential))
        else {
            // Only a closed handle could ask, and handles close on drop: nothing to register for.
            return Ok(Registered { version: state.version, created: false, overruled: None });
        };
        // With a registration token set, the settings every backend of a service lives with are chosen by
        // those who proved who they are, not by any host that reaches the door.
        if self.policy.settings_need_authority && credential == Credential::Anonymous {
            let asked = [(algorithm.is_some(), "algorithm"), (proxy.is_some(), "proxy_protocol/accept_proxy")];
            if let Some((_, setting)) = asked.into_iter().find(|(asked, _)| *asked) {
                return Err(StoreError::NeedsAuthority { service, setting });
            }
        }
        let existing = state.registry.services.get(&service).and_then(|s| s.backends.get(&backend.address));
        let existing = existing.map(|b| (b.owner, b.weight, b.draining));
        if let Some((owner, _, _)) = existing {
            let requester = Requester { registration: Some(registration), credential, peer: origin.peer.ip() };
            Self::check_owner(&state, service, backend.address, owner, requester)?;
        }
        let created = existing.is_none();
        if existing.is_some_and(|(owner, weight, _)| owner == registration && weight == backend.weight) {
            return Ok(Registered { version: state.version, created, overruled });
        }
        let limits = self.policy.limits;
        let held = state.registry.registrations.get(&registration).map_or(0, |r| r.backends.len());
        if existing.is_none() && held >= limits.backends_per_registration {
            return Err(StoreError::TooManyBackends { max: limits.backends_per_registration });
        }
        let creates_service = !state.registry.services.contains_key(&service);
        if creates_service && state.registry.services.len() >= limits.services {
            return Err(StoreError::TooManyServices { max: limits.services });
        }
        // One host cannot fill the table: the services a source created count against its own quota.
        let creator = matches!(origin.kind, OriginKind::Json | OriginKind::Grpc | OriginKind::Agent)
            .then(|| origin.peer.ip().to_canonical());
        if let Some(address) = creator.filter(|_| creates_service) {
            let created_there = state.registry.services.values().filter(|s| s.creator == Some(address)).count();
            if created_there >= limits.services_per_source {
                return Err(StoreError::TooManyServicesFromSource { address, max: limits.services_per_source });
            }
        }
        let mut draft = state.registry.clone();
        if let Some((owner, _, _)) = existing.filter(|&(owner, _, _)| owner != registration)
            && let Some(previous) = draft.registrations.get_mut(&owner)
        {
            previous.backends.remove(&(service, backend.address));
        }
        if let Some(reg) = draft.registrations.get_mut(&registration) {
            reg.backends.insert((service, backend.address));
        }
        let new_service = draft.services.get(&service).is_none_or(|s| s.backends.is_empty());
        // A drained backend stays drained when its server registers it again.
        let draining = existing.is_some_and(|(_, _, draining)| draining);
        draft.retired.remove(&service);
        let entry = draft.services.entry(service).or_default();
        if creates_service {
            entry.creator = creator;
        }
        if let (true, Some(algorithm)) = (new_service, algorithm) {
            entry.algorithm = algorithm;
        }
        if let (true, Some(proxy)) = (new_service, proxy) {
            entry.proxy = proxy;
        }
        entry.backends.insert(backend.address, Backend { weight: backend.weight, owner: registration, draining });
        let version = self.commit(&mut state, draft)?;
        let verb = if created { "backend registered" } else { "backend re-registered" };
        info!(%service, backend = %backend.address, weight = %backend.weight, %origin, version, new_service, "{verb}");
        if new_service {
            self.emit(Event::service(EventKind::ServiceAdded, version, service, ""));
        }
        self.emit(Event::backend(EventKind::BackendRegistered, version, service, backend.address, &origin.to_string()));
        self.print(&state);
        Ok(Registered { version, created, overruled })
    }

    /// Removes `backend` from `service` at the request of `requester`, under the owner rule (an HW1
    /// `unregister` may come from a new connection of the same server). An operator ending another
    /// registration's backend tells that registration why.
    pub fn unregister(
        &self,
        service: ServiceKey,
        backend: SocketAddr,
        requester: Requester,
        reason: &str,
    ) -> Result<u64, StoreError> {
        self.check_shared()?;
        let mut state = self.lock();
        let mut draft = state.registry.clone();
        let owner = draft.backend_mut(service, backend)?.owner;
        Self::check_owner(&state, service, backend, owner, requester)?;
        draft.remove_backend(service, backend, owner);
        let version = self.commit(&mut state, draft)?;
        self.removed(&state, service, backend, reason, version);
        if requester.credential == Credential::Operator
            && requester.registration != Some(owner)
            && let Some(record) = state.registry.registrations.get(&owner)
        {
            let why = format!("an operator at {} ended {service} backend {backend}: {reason}", requester.peer);
            record.ended_by_operator.send_replace(Some(why));
        }
        self.print(&state);
        Ok(version)
    }

    /// Ends a registration: every backend it still owns is removed.
    pub(super) fn close_registration(&self, registration: RegistrationId, reason: &str) {
        let mut state = self.lock();
        let mut draft = state.registry.clone();
        let Some(reg) = draft.registrations.remove(&registration) else { return };
        if reg.backends.is_empty() {
            // Nothing routed changes: no version. A refusal has been logged; the handle is gone either way.
            let _ = Self::keep(&mut state, draft);
            return;
        }
        for &(service, backend) in &reg.backends {
            draft.remove_backend(service, backend, registration);
        }
        // A refused close has been logged by the commit; the handle is gone either way.
        let Ok(version) = self.commit(&mut state, draft) else { return };
        for &(service, backend) in &reg.backends {
            self.removed(&state, service, backend, reason, version);
        }
        self.print(&state);
    }

    /// Removes one backend of a registration (a registration that failed to open its frontend).
    pub(super) fn withdraw(
        &self,
        registration: RegistrationId,
        service: ServiceKey,
        backend: SocketAddr,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let mut draft = state.registry.clone();
        let owned = draft.registrations.get_mut(&registration).is_some_and(|r| r.backends.remove(&(service, backend)));
        if !owned {
            return Ok(());
        }
        draft.remove_backend(service, backend, registration);
        let version = self.commit(&mut state, draft)?;
        self.removed(&state, service, backend, reason, version);
        self.print(&state);
        Ok(())
    }

    /// Records a registration's own health verdict; an unhealthy one stays registered, out of rotation.
    pub(super) fn set_healthy(&self, registration: RegistrationId, healthy: bool) -> Result<(), StoreError> {
        let mut state = self.lock();
        let unchanged = state.registry.registrations.get(&registration).is_none_or(|r| r.healthy == healthy);
        if unchanged {
            return Ok(());
        }
        let mut draft = state.registry.clone();
        let Some(reg) = draft.registrations.get_mut(&registration) else { return Ok(()) };
        reg.healthy = healthy;
        let backends: Vec<_> = reg.backends.iter().copied().collect();
        if backends.is_empty() {
            // Nothing routed changes, no version: the verdict applies to the backends it registers next.
            return Self::keep(&mut state, draft);
        }
        let version = self.commit(&mut state, draft)?;
        for (service, backend) in backends {
            if healthy {
                info!(%service, %backend, version, "backend healthy: back in rotation");
                self.emit(Event::backend(EventKind::BackendHealthy, version, service, backend, ""));
            } else {
                warn!(%service, %backend, version, "backend unhealthy: out of rotation");
                self.emit(Event::backend(EventKind::BackendUnhealthy, version, service, backend, ""));
            }
        }
        self.print(&state);
        Ok(())
    }

    /// Starts the warm-up window of a freshly started controller: until [`Store::end_warm_up`], snapshots
    /// tell nodes to keep the services they serve that this controller has not relearned yet.
    pub fn begin_warm_up(&self) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let mut draft = state.registry.clone();
        draft.warming_up = true;
        let version = self.commit(&mut state, draft)?;
        info!(version, "warming up: nodes keep their services until servers have re-registered");
        Ok(version)
    }

    /// Ends the warm-up window: from now on nodes serve exactly what the store holds.
    pub fn end_warm_up(&self) -> Result<u64, StoreError> {
        let mut state = self.lock();
        if !state.registry.warming_up {
            return Ok(state.version);
        }
        let mut draft = state.registry.clone();
        draft.warming_up = false;
        draft.retired.clear();
        let version = self.commit(&mut state, draft)?;
        info!(version, services = state.registry.services.len(), "warm-up over: nodes now serve exactly this state");
        self.emit(Event::controller(EventKind::WarmUpOver, version));
        self.print(&state);
        Ok(version)
    }

    /// A node already applied `version` (from a controller that ran before this one): versions continue
    /// above it, so no node is ever sent a version it knows or an older one.
    pub fn observe_version(&self, version: u64) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let current = state.version;
        // Replicated, versions are etcd's revisions: they only go up, whatever a node knew.
        if version < current || !self.replication.follows_node_versions() {
            return Ok(current);
        }
        state.version = version;
        let draft = state.registry.clone();
        let version = self.commit(&mut state, draft).inspect_err(|_| state.version = current)?;
        info!(version, "version raised above a node's");
        Ok(version)
    }

    /// Takes a backend out of rotation for good (until its registration ends): no new connections, open
    /// ones drain.
    pub fn drain_backend(&self, service: ServiceKey, backend: SocketAddr) -> Result<u64, StoreError> {
        self.check_shared()?;
        let mut state = self.lock();
        if state.registry.backend_mut(service, backend)?.draining {
            return Ok(state.version);
        }
        let mut draft = state.registry.clone();
        draft.backend_mut(service, backend)?.draining = true;
        let version = self.commit(&mut state, draft)?;
        info!(%service, %backend, version, "backend draining: no new connections");
        self.operator_changed(OperatorChange::Drain { service, backend });
        self.emit(Event::backend(EventKind::BackendDraining, version, service, backend, "drained by an operator"));
        self.print(&state);
        Ok(version)
    }

    /// Changes a backend's weight.
    pub fn set_weight(&self, service: ServiceKey, backend: SocketAddr, weight: Weight) -> Result<u64, StoreError> {
        self.check_shared()?;
        let mut state = self.lock();
        if state.registry.backend_mut(service, backend)?.weight == weight {
            return Ok(state.version);
        }
        let mut draft = state.registry.clone();
        let old = std::mem::replace(&mut draft.backend_mut(service, backend)?.weight, weight);
        let version = self.commit(&mut state, draft)?;
        info!(%service, %backend, %old, %weight, version, "weight changed");
        self.operator_changed(OperatorChange::Weight { service, backend, weight });
        self.emit(Event::backend(EventKind::WeightChanged, version, service, backend, &format!("{old} -> {weight}")));
        self.print(&state);
        Ok(version)
    }

    /// Changes a service's balancing algorithm; from then on the operator's choice overrules registrations.
    pub fn set_algorithm(&self, service: ServiceKey, algorithm: Algorithm) -> Result<u64, StoreError> {
        self.check_shared()?;
        let mut state = self.lock();
        let mut draft = state.registry.clone();
        let entry = draft.services.get_mut(&service).ok_or(StoreError::NoService { service })?;
        entry.algorithm_set_by_operator = true;
        self.operator_changed(OperatorChange::Algorithm { service, algorithm });
        if entry.algorithm == algorithm {
            // Not routed, so no version: the operator's choice only decides future conflicts.
            Self::keep(&mut state, draft)?;
            return Ok(state.version);
        }
        let old = std::mem::replace(&mut entry.algorithm, algorithm);
        let version = self.commit(&mut state, draft)?;
        info!(%service, %old, new = %algorithm, version, "algorithm changed");
        self.emit(Event::service(EventKind::AlgorithmChanged, version, service, &format!("{old} -> {algorithm}")));
        self.print(&state);
        Ok(version)
    }

    /// A backend is one host's unicast address, and not the balancer itself: one of the controller's listeners (a public frontend
    /// would relay into the admin port), or a frontend on a node, of its own service or of another of the
    /// same protocol (a loop, direct or through the other service, that eats descriptors until none are
    /// left). Addresses are compared in their canonical form (`::ffff:a.b.c.d` is `a.b.c.d`); `here` says
    /// whether the backend's address is this host's.
    pub(super) fn check_not_itself(
        &self,
        state: &State,
        service: ServiceKey,
        backend: SocketAddr,
        here: bool,
    ) -> Result<(), StoreError> {
        let ip = backend.ip().to_canonical();
        if !is_unicast_host(ip) {
            return Err(StoreError::NotAHost { backend });
        }
        let at = |listener: IpAddr| {
            let listener = listener.to_canonical();
            if listener.is_unspecified() { here } else { listener == ip }
        };
        if self.policy.own_listeners.iter().any(|l| l.port() == backend.port() && at(l.ip())) {
            return Err(StoreError::OwnListener { backend });
        }
        let frontends = state.registry.services.keys().copied().filter(|k| k.protocol == service.protocol);
        let Some(frontend) = frontends.chain([service]).find(|k| k.port == backend.port()) else { return Ok(()) };
        // Where frontends really are: the embedded node's address, and each connected node's own word.
        let embedded = self.policy.frontend_ip.is_some_and(at);
        if embedded || state.nodes.frontend_at(ip) {
            return Err(StoreError::Loop { service: frontend, backend });
        }
        Ok(())
    }

    pub(super) fn check_port(&self, port: u16) -> Result<(), StoreError> {
        if self.policy.own_listeners.iter().any(|l| l.port() == port) {
            return Err(StoreError::ReservedPort { port });
        }
        if !self.policy.allowed_ports.contains(port) {
            return Err(StoreError::PortNotAllowed { port, allowed: self.policy.allowed_ports.to_string() });
        }
        Ok(())
    }
}

/// True for an address one host answers on: not unspecified (a connect to it reaches this host), not
/// multicast or broadcast (no one server), not in 0.0.0.0/8 or the reserved 240.0.0.0/4.
fn is_unicast_host(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || first == 0 || first >= 240)
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}
