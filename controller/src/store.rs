//! The store: the controller's single source of truth.
//!
//! Every change goes through one short critical section that validates it, applies it, checks the
//! invariants, bumps the version and publishes a new immutable [`RoutingSnapshot`] on a watch channel that
//! every node (embedded or remote) follows. Nodes report back which frontends they bound and how many
//! connections each backend holds; registrations wait on those reports to learn whether their port opened.
//!
//! A registration is the live session (a JSON control connection, a gRPC `Register` stream) that announced
//! backends. Its [`Registration`] handle removes them when dropped, whichever way the session ends.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use dataplane::{
    Algorithm, BackendLoad, BackendSpec, FrontendStatus, NodeReport, Protocol, RoutingSnapshot, ServiceKey, ServiceSpec,
};
use serde::Serialize;
use tokio::{
    sync::{broadcast, watch},
    time::Instant,
};
use tracing::{info, warn};

use crate::{config::PortRanges, error::StoreError};

/// Which ports services may use.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `--allowed-ports`.
    pub allowed_ports: PortRanges,
    /// The controller's own listening ports: never a frontend.
    pub reserved_ports: Vec<u16>,
}

/// Identifies a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistrationId(u64);

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
}

/// The store. See the module documentation.
#[derive(Debug)]
pub struct Store {
    /// A std mutex, not tokio's: critical sections are short, never hold an `.await`, and are taken from
    /// both async tasks and `Drop`.
    state: Mutex<State>,
    policy: Policy,
    print_state: bool,
    snapshots: watch::Sender<Arc<RoutingSnapshot>>,
    /// Bumped on every node report, so registrations waiting for bind results wake up.
    node_updates: watch::Sender<u64>,
    /// Every state change, for `Admin.WatchEvents`.
    events: broadcast::Sender<Event>,
}

/// One state change, as `Admin.WatchEvents` streams it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// Snapshot version after the change.
    pub version: u64,
    /// The service concerned.
    pub service: Option<ServiceKey>,
    /// The backend concerned.
    pub backend: Option<SocketAddr>,
    /// The node concerned.
    pub node: Option<String>,
    /// A removal's reason, a new weight.
    pub detail: String,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A backend joined a service (or moved to a new registration).
    BackendRegistered,
    /// A backend left its service.
    BackendRemoved,
    /// Back in rotation after its registration reported it healthy.
    BackendHealthy,
    /// Out of rotation, still registered.
    BackendUnhealthy,
    /// Drained by an operator.
    BackendDraining,
    /// Its weight changed.
    WeightChanged,
    /// A service got its first backend.
    ServiceAdded,
    /// A service lost its last backend.
    ServiceRemoved,
    /// A node connected.
    NodeJoined,
    /// A node disconnected.
    NodeLeft,
    /// The warm-up window ended.
    WarmUpOver,
    /// A service's balancing algorithm changed.
    AlgorithmChanged,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    /// See [`RoutingSnapshot::warming_up`].
    warming_up: bool,
    /// Services removed while warming up, so nodes drop them even though the snapshots are partial.
    retired: BTreeSet<ServiceKey>,
    services: BTreeMap<ServiceKey, Service>,
    registrations: HashMap<RegistrationId, RegistrationState>,
    nodes: BTreeMap<String, NodeState>,
    next_registration: u64,
    next_node_session: u64,
}

#[derive(Debug, Default)]
struct Service {
    algorithm: Algorithm,
    /// Set by an operator (`SetAlgorithm`): registrations asking for another are accepted and overruled,
    /// so agents started with an older choice are not locked out when they re-register.
    algorithm_set_by_operator: bool,
    backends: BTreeMap<SocketAddr, Backend>,
}

#[derive(Debug)]
struct Backend {
    weight: u32,
    owner: RegistrationId,
    /// Drained by an operator: out of rotation until its registration ends.
    draining: bool,
}

#[derive(Debug)]
struct RegistrationState {
    origin: Origin,
    /// The registration's own verdict on its backends (agents report their local checks).
    healthy: bool,
    backends: BTreeSet<(ServiceKey, SocketAddr)>,
}

#[derive(Debug)]
struct NodeState {
    /// Which connection of the node is current: a node that reconnects before its old stream is noticed
    /// dead replaces it, and the old stream's end must not disconnect the new one.
    session: u64,
    connected: bool,
    address: Option<SocketAddr>,
    acked_version: Option<u64>,
    last_seen: Instant,
    frontends: BTreeMap<ServiceKey, Result<SocketAddr, String>>,
    load: Vec<BackendLoad>,
}

/// Result of [`Store::register`] before any node has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// First snapshot version that holds the backend.
    pub version: u64,
    /// False when the backend was already registered (then it is not rolled back on failure).
    pub created: bool,
    /// The algorithm asked for was overruled by the operator's choice.
    pub overruled: Option<(Algorithm, Algorithm)>,
}

/// Whether nodes serve a service, as far as their reports tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendVerdict {
    /// At least one connected node listens; the others' errors, if any.
    Serving(Option<String>),
    /// No node is connected; the frontend opens when one connects.
    NoNodes,
    /// No node listens: each node's error.
    Failed(String),
}

/// The answer to a registration, as the API layers phrase it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterReply {
    /// Whether the backend is registered.
    pub success: bool,
    /// The reason of a failure, or a note on a success.
    pub message: Option<String>,
    /// The backend as recorded.
    pub backend: SocketAddr,
}

/// A connected node (embedded, or a `Sync` stream). Dropping it marks the node disconnected.
#[derive(Debug)]
pub struct NodeSession {
    store: Arc<Store>,
    node: String,
    session: u64,
}

/// A live registration. Dropping it removes every backend it registered.
#[derive(Debug)]
pub struct Registration {
    store: Arc<Store>,
    id: RegistrationId,
    close_reason: Option<String>,
}

// === impl Store ===

impl Store {
    /// An empty store at version 0.
    pub fn new(policy: Policy, print_state: bool) -> Arc<Self> {
        Arc::new(Store {
            state: Mutex::default(),
            policy,
            print_state,
            snapshots: watch::Sender::new(Arc::default()),
            node_updates: watch::Sender::new(0),
            events: broadcast::Sender::new(1024),
        })
    }

    /// Follows the published snapshots (what a node consumes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<RoutingSnapshot>> {
        self.snapshots.subscribe()
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<RoutingSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// Opens a registration session; it holds no backend yet.
    pub fn open_registration(self: &Arc<Self>, origin: Origin) -> Registration {
        let mut state = self.lock();
        state.next_registration += 1;
        let id = RegistrationId(state.next_registration);
        state.registrations.insert(id, RegistrationState { origin, healthy: true, backends: BTreeSet::new() });
        Registration { store: Arc::clone(self), id, close_reason: None }
    }

    /// Adds `backend` to `service` on behalf of `registration`, creating the service if needed. A backend
    /// already registered by another registration moves to this one (a server that reconnected before its
    /// old channel was noticed dead).
    fn register(
        &self,
        registration: RegistrationId,
        service: ServiceKey,
        backend: BackendSpec,
        algorithm: Option<Algorithm>,
    ) -> Result<Registered, StoreError> {
        self.check_port(service.port)?;
        let mut state = self.lock();
        // The first registration of a service chooses its algorithm; a later one may only agree, unless an
        // operator chose since (then the operator's choice stands and the registration goes through).
        let mut overruled = None;
        if let (Some(requested), Some(existing)) = (algorithm, state.services.get(&service))
            && requested != existing.algorithm
            && !existing.backends.is_empty()
        {
            if !existing.algorithm_set_by_operator {
                return Err(StoreError::AlgorithmConflict { service, current: existing.algorithm, requested });
            }
            overruled = Some((requested, existing.algorithm));
        }
        let Some(reg) = state.registrations.get_mut(&registration) else {
            // Only a closed handle could ask, and handles close on drop: nothing to register for.
            return Ok(Registered { version: state.version, created: false, overruled: None });
        };
        let origin = reg.origin;
        reg.backends.insert((service, backend.addr));
        let entry = state.services.entry(service).or_default();
        let new_service = entry.backends.is_empty();
        let existing = entry.backends.get(&backend.addr).map(|b| (b.owner, b.weight, b.draining));
        let created = existing.is_none();
        match existing {
            Some((owner, weight, _)) if owner == registration && weight == backend.weight => {
                return Ok(Registered { version: state.version, created, overruled });
            }
            Some((owner, _, _)) if owner != registration => {
                if let Some(previous) = state.registrations.get_mut(&owner) {
                    previous.backends.remove(&(service, backend.addr));
                }
            }
            _ => {}
        }
        // A drained backend stays drained when its server registers it again.
        let draining = existing.is_some_and(|(_, _, draining)| draining);
        state.retired.remove(&service);
        let entry = state.services.entry(service).or_default();
        if let (true, Some(algorithm)) = (new_service, algorithm) {
            entry.algorithm = algorithm;
        }
        entry.backends.insert(backend.addr, Backend { weight: backend.weight, owner: registration, draining });
        let version = self.commit(&mut state);
        let verb = if created { "backend registered" } else { "backend re-registered" };
        info!(%service, backend = %backend.addr, weight = backend.weight, %origin, version, new_service, "{verb}");
        if new_service {
            self.emit(Event::service(EventKind::ServiceAdded, version, service, ""));
        }
        self.emit(Event::backend(EventKind::BackendRegistered, version, service, backend.addr, &origin.to_string()));
        self.print(&state);
        Ok(Registered { version, created, overruled })
    }

    /// Removes `backend` from `service`, whichever registration announced it (HW1 `unregister` may come
    /// from a new connection).
    pub fn unregister(&self, service: ServiceKey, backend: SocketAddr, reason: &str) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let owner = state
            .services
            .get(&service)
            .and_then(|s| s.backends.get(&backend))
            .map(|b| b.owner)
            .ok_or(StoreError::NotFound { service, backend })?;
        state.remove_backend(service, backend, owner);
        let version = self.commit(&mut state);
        self.removed(&state, service, backend, reason, version);
        self.print(&state);
        Ok(version)
    }

    /// Ends a registration: every backend it still owns is removed.
    fn close_registration(&self, registration: RegistrationId, reason: &str) {
        let mut state = self.lock();
        let Some(reg) = state.registrations.remove(&registration) else { return };
        if reg.backends.is_empty() {
            return;
        }
        for &(service, backend) in &reg.backends {
            state.remove_backend(service, backend, registration);
        }
        let version = self.commit(&mut state);
        for &(service, backend) in &reg.backends {
            self.removed(&state, service, backend, reason, version);
        }
        self.print(&state);
    }

    /// Removes one backend of a registration (a registration that failed to open its frontend).
    fn withdraw(&self, registration: RegistrationId, service: ServiceKey, backend: SocketAddr, reason: &str) {
        let mut state = self.lock();
        let owned = state.registrations.get_mut(&registration).is_some_and(|r| r.backends.remove(&(service, backend)));
        if owned {
            state.remove_backend(service, backend, registration);
            let version = self.commit(&mut state);
            self.removed(&state, service, backend, reason, version);
            self.print(&state);
        }
    }

    /// Records a registration's own health verdict; an unhealthy one stays registered, out of rotation.
    fn set_healthy(&self, registration: RegistrationId, healthy: bool) {
        let mut state = self.lock();
        let Some(reg) = state.registrations.get_mut(&registration) else { return };
        if reg.healthy == healthy {
            return;
        }
        reg.healthy = healthy;
        if reg.backends.is_empty() {
            // Nothing routed changes: the verdict applies to the backends it registers next.
            return;
        }
        let backends: Vec<_> = reg.backends.iter().copied().collect();
        let version = self.commit(&mut state);
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
    }

    /// Starts the warm-up window of a freshly started controller: until [`Store::end_warm_up`], snapshots
    /// tell nodes to keep the services they serve that this controller has not relearned yet.
    pub fn begin_warm_up(&self) {
        let mut state = self.lock();
        state.warming_up = true;
        let version = self.commit(&mut state);
        info!(version, "warming up: nodes keep their services until servers have re-registered");
    }

    /// Ends the warm-up window: from now on nodes serve exactly what the store holds.
    pub fn end_warm_up(&self) {
        let mut state = self.lock();
        if !state.warming_up {
            return;
        }
        state.warming_up = false;
        state.retired.clear();
        let version = self.commit(&mut state);
        info!(version, services = state.services.len(), "warm-up over: nodes now serve exactly this state");
        self.emit(Event {
            kind: EventKind::WarmUpOver,
            version,
            service: None,
            backend: None,
            node: None,
            detail: String::new(),
        });
        self.print(&state);
    }

    /// A node already applied `version` (from a controller that ran before this one): versions continue
    /// above it, so no node is ever sent a version it knows or an older one.
    pub fn observe_version(&self, version: u64) {
        let mut state = self.lock();
        if version >= state.version {
            state.version = version;
            let version = self.commit(&mut state);
            info!(version, "version raised above a node's");
        }
    }

    /// A node joined (or rejoined): registrations wait for its bind results from now on.
    pub fn connect_node(self: &Arc<Self>, node: &str, address: Option<SocketAddr>) -> NodeSession {
        let mut state = self.lock();
        state.next_node_session += 1;
        let session = state.next_node_session;
        let replaced = state.nodes.get(node).is_some_and(|n| n.connected);
        let version = state.version;
        state.nodes.insert(
            node.to_owned(),
            NodeState {
                session,
                connected: true,
                address,
                acked_version: None,
                last_seen: Instant::now(),
                frontends: BTreeMap::new(),
                load: Vec::new(),
            },
        );
        // Emitted under the lock, so events keep the order of the changes they describe.
        self.emit(Event::node(EventKind::NodeJoined, version, node));
        drop(state);
        match address {
            Some(address) => info!(node, %address, replaced, "node joined"),
            None => info!(node, "node joined"),
        }
        self.node_updates.send_modify(|n| *n += 1);
        NodeSession { store: Arc::clone(self), node: node.to_owned(), session }
    }

    fn node_report(&self, node: &str, session: u64, report: NodeReport) {
        let mut state = self.lock();
        let Some(status) = state.nodes.get_mut(node).filter(|n| n.session == session) else { return };
        status.last_seen = Instant::now();
        match report {
            NodeReport::Applied { version, frontends } => {
                status.acked_version = Some(version);
                status.frontends =
                    frontends.into_iter().map(|FrontendStatus { service, result }| (service, result)).collect();
            }
            NodeReport::Load(load) => status.load = load,
        }
        drop(state);
        self.node_updates.send_modify(|n| *n += 1);
    }

    /// A node left: it stays listed as disconnected, its counts leave the cluster view and its frontends no
    /// longer answer for registrations.
    fn disconnect_node(&self, node: &str, session: u64) {
        let mut state = self.lock();
        let Some(status) = state.nodes.get_mut(node).filter(|n| n.session == session && n.connected) else {
            return;
        };
        status.connected = false;
        status.load.clear();
        let version = state.version;
        self.emit(Event::node(EventKind::NodeLeft, version, node));
        drop(state);
        info!(node, "node left");
        self.node_updates.send_modify(|n| *n += 1);
    }

    /// Waits until the nodes' reports tell whether `service` is served at `version` or later, at most
    /// `timeout`.
    pub async fn await_frontend(&self, service: ServiceKey, version: u64, timeout: Duration) -> FrontendVerdict {
        let deadline = Instant::now() + timeout;
        let mut updates = self.node_updates.subscribe();
        loop {
            updates.borrow_and_update();
            if let Some(verdict) = self.lock().frontend_verdict(service, version, false) {
                return verdict;
            }
            if tokio::time::timeout_at(deadline, updates.changed()).await.is_err() {
                break;
            }
        }
        self.lock().frontend_verdict(service, version, true).unwrap_or(FrontendVerdict::NoNodes)
    }

    /// The whole state, for `/api/state` and the Admin API.
    pub fn view(&self) -> StateView {
        self.lock().view()
    }

    /// Takes a backend out of rotation for good (until its registration ends): no new connections, open
    /// ones drain.
    pub fn drain_backend(&self, service: ServiceKey, backend: SocketAddr) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let entry = state
            .services
            .get_mut(&service)
            .and_then(|s| s.backends.get_mut(&backend))
            .ok_or(StoreError::NotFound { service, backend })?;
        if entry.draining {
            return Ok(state.version);
        }
        entry.draining = true;
        let version = self.commit(&mut state);
        info!(%service, %backend, version, "backend draining: no new connections");
        self.emit(Event::backend(EventKind::BackendDraining, version, service, backend, "drained by an operator"));
        self.print(&state);
        Ok(version)
    }

    /// Changes a backend's weight.
    pub fn set_weight(&self, service: ServiceKey, backend: SocketAddr, weight: u32) -> Result<u64, StoreError> {
        if !(1..=MAX_WEIGHT).contains(&weight) {
            return Err(StoreError::InvalidWeight { weight });
        }
        let mut state = self.lock();
        let entry = state
            .services
            .get_mut(&service)
            .and_then(|s| s.backends.get_mut(&backend))
            .ok_or(StoreError::NotFound { service, backend })?;
        if entry.weight == weight {
            return Ok(state.version);
        }
        let old = std::mem::replace(&mut entry.weight, weight);
        let version = self.commit(&mut state);
        info!(%service, %backend, old, weight, version, "weight changed");
        self.emit(Event::backend(EventKind::WeightChanged, version, service, backend, &format!("{old} -> {weight}")));
        self.print(&state);
        Ok(version)
    }

    /// Changes a service's balancing algorithm.
    pub fn set_algorithm(&self, service: ServiceKey, algorithm: Algorithm) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let s = state.services.get_mut(&service).ok_or(StoreError::NoService { service })?;
        if s.algorithm == algorithm {
            s.algorithm_set_by_operator = true;
            return Ok(state.version);
        }
        s.algorithm_set_by_operator = true;
        let old = std::mem::replace(&mut s.algorithm, algorithm);
        let version = self.commit(&mut state);
        info!(%service, %old, new = %algorithm, version, "algorithm changed");
        self.emit(Event::service(EventKind::AlgorithmChanged, version, service, &format!("{old} -> {algorithm}")));
        self.print(&state);
        Ok(version)
    }

    /// The connection counts of every connected node except `node`, summed per backend: what `node` adds to
    /// its own counts for cluster-wide least connections.
    pub fn cluster_load_excluding(&self, node: &str) -> Vec<BackendLoad> {
        let state = self.lock();
        let mut sums: BTreeMap<(ServiceKey, SocketAddr), BackendLoad> = BTreeMap::new();
        for (id, status) in &state.nodes {
            if id == node || !status.connected {
                continue;
            }
            for row in &status.load {
                let sum = sums.entry((row.service, row.backend)).or_insert(BackendLoad { active: 0, total: 0, ..*row });
                sum.active += row.active;
                sum.total += row.total;
            }
        }
        sums.into_values().collect()
    }

    /// Follows every state change from now on.
    pub fn watch_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, event: Event) {
        // No subscriber is fine: events are for whoever watches now.
        let _ = self.events.send(event);
    }

    fn removed(&self, state: &State, service: ServiceKey, backend: SocketAddr, reason: &str, version: u64) {
        info!(%service, %backend, reason, version, "backend removed");
        self.emit(Event::backend(EventKind::BackendRemoved, version, service, backend, reason));
        if !state.services.contains_key(&service) {
            info!(%service, version, "service removed: no backend left, its port closes on every node");
            self.emit(Event::service(EventKind::ServiceRemoved, version, service, "no backend left"));
        }
    }

    fn check_port(&self, port: u16) -> Result<(), StoreError> {
        if self.policy.reserved_ports.contains(&port) {
            return Err(StoreError::ReservedPort { port });
        }
        if !self.policy.allowed_ports.contains(port) {
            return Err(StoreError::PortNotAllowed { port, allowed: self.policy.allowed_ports.to_string() });
        }
        Ok(())
    }

    /// Publishes the state as the next version. Called with the lock held, so versions are published in
    /// order and never twice.
    fn commit(&self, state: &mut State) -> u64 {
        if let Err(broken) = state.check_invariants() {
            // A bug, not bad input: loud in tests, logged in production, where the published state stays
            // usable because it is rebuilt from scratch.
            debug_assert!(false, "store invariant broken: {broken}");
            warn!(%broken, "store invariant broken");
        }
        state.version += 1;
        let snapshot = Arc::new(state.snapshot());
        self.snapshots.send_replace(snapshot);
        state.version
    }

    fn print(&self, state: &State) {
        if self.print_state {
            eprint!("{}", state.view());
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: mutations validate first and
        // commit last, so the state behind a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

// === impl State ===

impl State {
    fn remove_backend(&mut self, service: ServiceKey, backend: SocketAddr, owner: RegistrationId) {
        if let Some(reg) = self.registrations.get_mut(&owner) {
            reg.backends.remove(&(service, backend));
        }
        if let Some(s) = self.services.get_mut(&service) {
            s.backends.remove(&backend);
            if s.backends.is_empty() {
                self.services.remove(&service);
                if self.warming_up {
                    self.retired.insert(service);
                }
            }
        }
    }

    fn snapshot(&self) -> RoutingSnapshot {
        let services = self
            .services
            .iter()
            .map(|(&key, service)| {
                let backends = service
                    .backends
                    .iter()
                    .filter(|(_, b)| !b.draining && self.registrations.get(&b.owner).is_some_and(|r| r.healthy))
                    .map(|(&addr, b)| BackendSpec { addr, weight: b.weight })
                    .collect();
                (key, ServiceSpec { key, algorithm: service.algorithm, backends })
            })
            .collect();
        RoutingSnapshot { version: self.version, services, warming_up: self.warming_up, retired: self.retired.clone() }
    }

    /// Every service has a backend; every backend's owner exists and lists it, and the reverse.
    fn check_invariants(&self) -> Result<(), String> {
        for (service, s) in &self.services {
            if s.backends.is_empty() {
                return Err(format!("service {service} has no backend"));
            }
            for (addr, b) in &s.backends {
                if b.weight == 0 {
                    return Err(format!("backend {addr} of {service} has weight 0"));
                }
                let listed = self.registrations.get(&b.owner).is_some_and(|r| r.backends.contains(&(*service, *addr)));
                if !listed {
                    return Err(format!("backend {addr} of {service} has no owning registration"));
                }
            }
        }
        for (id, reg) in &self.registrations {
            for (service, addr) in &reg.backends {
                let owned =
                    self.services.get(service).and_then(|s| s.backends.get(addr)).is_some_and(|b| b.owner == *id);
                if !owned {
                    return Err(format!("registration {id:?} lists {service} {addr}, which it does not own"));
                }
            }
        }
        Ok(())
    }

    fn frontend_verdict(&self, service: ServiceKey, version: u64, last_call: bool) -> Option<FrontendVerdict> {
        let connected = || self.nodes.iter().filter(|(_, n)| n.connected);
        if connected().next().is_none() {
            return Some(FrontendVerdict::NoNodes);
        }
        // Every connected node is heard (or the time is up), so a success can still name the nodes that failed.
        let mut serving = false;
        let mut errors = Vec::new();
        let mut pending = Vec::new();
        for (id, node) in connected() {
            match node.acked_version {
                Some(acked) if acked >= version => match node.frontends.get(&service) {
                    Some(Ok(_)) => serving = true,
                    Some(Err(error)) => errors.push(format!("node {id}: {error}")),
                    None => errors.push(format!("node {id}: service no longer in its snapshot")),
                },
                _ => pending.push(id),
            }
        }
        if !pending.is_empty() && !last_call {
            return None;
        }
        errors.extend(pending.into_iter().map(|id| format!("node {id}: no bind result in time")));
        let errors = errors.join("; ");
        Some(match (serving, errors.is_empty()) {
            (true, true) => FrontendVerdict::Serving(None),
            (true, false) => FrontendVerdict::Serving(Some(errors)),
            (false, _) => FrontendVerdict::Failed(errors),
        })
    }

    fn view(&self) -> StateView {
        let mut counts: HashMap<(ServiceKey, SocketAddr), (u64, u64)> = HashMap::new();
        for node in self.nodes.values() {
            for row in &node.load {
                let c = counts.entry((row.service, row.backend)).or_default();
                c.0 += row.active;
                c.1 += row.total;
            }
        }
        let services = self
            .services
            .iter()
            .map(|(&key, service)| {
                let backends: Vec<BackendView> = service
                    .backends
                    .iter()
                    .map(|(&addr, b)| {
                        let (active, total) = counts.get(&(key, addr)).copied().unwrap_or_default();
                        let reg = self.registrations.get(&b.owner);
                        BackendView {
                            address: addr,
                            weight: b.weight,
                            healthy: reg.is_some_and(|r| r.healthy),
                            draining: b.draining,
                            active_connections: active,
                            total_connections: total,
                            registration: reg.map(|r| r.origin.to_string()).unwrap_or_default(),
                        }
                    })
                    .collect();
                ServiceView {
                    protocol: key.protocol,
                    port: key.port,
                    algorithm: service.algorithm,
                    active_connections: backends.iter().map(|b| b.active_connections).sum(),
                    backends,
                }
            })
            .collect();
        let nodes = self
            .nodes
            .iter()
            .map(|(id, node)| NodeView {
                id: id.clone(),
                connected: node.connected,
                address: node.address,
                acked_version: node.acked_version,
                last_seen_ms_ago: u64::try_from(node.last_seen.elapsed().as_millis()).unwrap_or(u64::MAX),
                frontends: node
                    .frontends
                    .iter()
                    .map(|(&key, result)| FrontendView {
                        protocol: key.protocol,
                        port: key.port,
                        listening: result.as_ref().ok().copied(),
                        error: result.as_ref().err().cloned(),
                    })
                    .collect(),
            })
            .collect();
        StateView { version: self.version, warming_up: self.warming_up, services, nodes }
    }
}

/// Largest weight a backend may have.
pub const MAX_WEIGHT: u32 = 10_000;

// === impl Event ===

impl Event {
    fn backend(kind: EventKind, version: u64, service: ServiceKey, backend: SocketAddr, detail: &str) -> Self {
        Event { kind, version, service: Some(service), backend: Some(backend), node: None, detail: detail.to_owned() }
    }

    fn service(kind: EventKind, version: u64, service: ServiceKey, detail: &str) -> Self {
        Event { kind, version, service: Some(service), backend: None, node: None, detail: detail.to_owned() }
    }

    fn node(kind: EventKind, version: u64, node: &str) -> Self {
        Event { kind, version, service: None, backend: None, node: Some(node.to_owned()), detail: String::new() }
    }
}

// === impl NodeSession ===

impl NodeSession {
    /// Records one report of the node.
    pub fn report(&self, report: NodeReport) {
        self.store.node_report(&self.node, self.session, report);
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }
}

impl Drop for NodeSession {
    fn drop(&mut self) {
        self.store.disconnect_node(&self.node, self.session);
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
        algorithm: Option<Algorithm>,
        ack_timeout: Duration,
    ) -> Result<RegisterReply, StoreError> {
        let registered = self.store.register(self.id, service, backend, algorithm)?;
        let reply = |success: bool, message: Option<String>| RegisterReply { success, message, backend: backend.addr };
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
                    self.store.withdraw(self.id, service, backend.addr, "no node could open the frontend");
                }
                reply(false, Some(why))
            }
        })
    }

    /// Records the registration's own health verdict.
    pub fn set_healthy(&self, healthy: bool) {
        self.store.set_healthy(self.id, healthy);
    }

    /// True while the registration holds at least one backend (then it is probed).
    pub fn has_backends(&self) -> bool {
        self.store.lock().registrations.get(&self.id).is_some_and(|r| !r.backends.is_empty())
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
        let kind = match self.kind {
            OriginKind::Json => "json",
            OriginKind::Grpc => "grpc",
        };
        write!(f, "{kind} {}", self.peer)
    }
}

/// The controller's state as operators see it (`/api/state`, `Admin.ListServices`).
#[derive(Debug, Clone, Serialize)]
pub struct StateView {
    /// Version of the snapshot in force.
    pub version: u64,
    /// The controller is in its warm-up window (see `--resync-grace`).
    pub warming_up: bool,
    /// Every service.
    pub services: Vec<ServiceView>,
    /// Every connected node.
    pub nodes: Vec<NodeView>,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Public port.
    pub port: u16,
    /// Balancing algorithm.
    pub algorithm: Algorithm,
    /// Sum over its backends.
    pub active_connections: u64,
    /// Every registered backend, in rotation or not.
    pub backends: Vec<BackendView>,
}

/// One backend.
#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    /// Where it listens.
    pub address: SocketAddr,
    /// Relative weight.
    pub weight: u32,
    /// Its registration reports it healthy.
    pub healthy: bool,
    /// Drained by an operator.
    pub draining: bool,
    /// Open connections (UDP: sessions) over all nodes.
    pub active_connections: u64,
    /// Connections ever opened over all nodes.
    pub total_connections: u64,
    /// The registration that announced it.
    pub registration: String,
}

/// One connected node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Its name.
    pub id: String,
    /// False once its stream ended.
    pub connected: bool,
    /// Where its sync stream comes from (none for the embedded node).
    pub address: Option<SocketAddr>,
    /// Last snapshot version it applied.
    pub acked_version: Option<u64>,
    /// Time since its last report.
    pub last_seen_ms_ago: u64,
    /// Its frontends at that version.
    pub frontends: Vec<FrontendView>,
}

/// One frontend of one node.
#[derive(Debug, Clone, Serialize)]
pub struct FrontendView {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Public port.
    pub port: u16,
    /// The bound address, when bound.
    pub listening: Option<SocketAddr>,
    /// Why it is not bound.
    pub error: Option<String>,
}

impl fmt::Display for StateView {
    /// The table `--print-state` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let warm = if self.warming_up { " (warming up)" } else { "" };
        writeln!(f, "=== routing state v{}{warm}: {} service(s) ===", self.version, self.services.len())?;
        for s in &self.services {
            writeln!(f, "{}:{} {} ({} backend(s))", s.protocol, s.port, s.algorithm, s.backends.len())?;
            for b in &s.backends {
                let health = match (b.healthy, b.draining) {
                    (_, true) => "draining",
                    (true, false) => "in rotation",
                    (false, false) => "out of rotation",
                };
                writeln!(
                    f,
                    "    {} weight={} {health} active={} total={} via {}",
                    b.address, b.weight, b.active_connections, b.total_connections, b.registration
                )?;
            }
        }
        for n in &self.nodes {
            let acked = n.acked_version.map_or_else(|| "none".to_owned(), |v| v.to_string());
            let link = if n.connected { "connected" } else { "disconnected" };
            writeln!(f, "node {} {link}, acked v{acked}, {} frontend(s)", n.id, n.frontends.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<Store> {
        Store::new(Policy { allowed_ports: "1-9000".parse().unwrap(), reserved_ports: vec![8080] }, false)
    }

    fn origin(ip: &str) -> Origin {
        Origin::json(format!("{ip}:40000").parse().unwrap())
    }

    fn backend(addr: &str) -> BackendSpec {
        BackendSpec { addr: addr.parse().unwrap(), weight: 1 }
    }

    #[test]
    fn every_change_bumps_the_version_and_publishes_a_snapshot() {
        let store = store();
        let rx = store.subscribe();
        let a = store.open_registration(origin("127.0.0.2"));
        let r1 = store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), None).unwrap();
        assert_eq!(r1, Registered { version: 1, created: true, overruled: None });
        // The same registration again changes nothing: no new version.
        assert_eq!(store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), None).unwrap().version, 1);
        let b = store.open_registration(origin("127.0.0.3"));
        assert_eq!(store.register(b.id, ServiceKey::tcp(80), backend("127.0.0.3:80"), None).unwrap().version, 2);
        let snapshot = rx.borrow().clone();
        assert_eq!(snapshot.version, 2);
        assert_eq!(snapshot.services[&ServiceKey::tcp(80)].backends.len(), 2);

        drop(a);
        assert_eq!(store.snapshot().version, 3);
        assert_eq!(store.snapshot().services[&ServiceKey::tcp(80)].backends, vec![backend("127.0.0.3:80")]);
        drop(b);
        assert_eq!(store.snapshot().version, 4);
        assert!(store.snapshot().services.is_empty(), "the last backend takes its service along");
    }

    #[test]
    fn ports_outside_the_policy_are_refused_without_a_new_version() {
        let store = store();
        let a = store.open_registration(origin("127.0.0.2"));
        let err = store.register(a.id, ServiceKey::tcp(9001), backend("127.0.0.2:9001"), None).unwrap_err();
        assert_eq!(err.to_string(), "port 9001 is outside the allowed ports 1-9000");
        let err = store.register(a.id, ServiceKey::udp(8080), backend("127.0.0.2:8080"), None).unwrap_err();
        assert_eq!(err, StoreError::ReservedPort { port: 8080 });
        assert_eq!(store.snapshot().version, 0);
        assert!(!a.has_backends());
    }

    #[test]
    fn unregister_works_from_any_registration_and_reports_unknown_backends() {
        let store = store();
        let a = store.open_registration(origin("127.0.0.2"));
        store.register(a.id, ServiceKey::udp(53), backend("127.0.0.2:53"), None).unwrap();
        let addr = "127.0.0.2:53".parse().unwrap();
        assert!(matches!(store.unregister(ServiceKey::udp(53), addr, "test"), Ok(2)));
        assert!(!a.has_backends());
        assert_eq!(
            store.unregister(ServiceKey::udp(53), addr, "test"),
            Err(StoreError::NotFound { service: ServiceKey::udp(53), backend: addr })
        );
        drop(a);
        assert_eq!(store.snapshot().version, 2, "an empty registration closes without a new version");
    }

    #[test]
    fn a_backend_registered_again_moves_to_the_new_registration() {
        let store = store();
        let old = store.open_registration(origin("127.0.0.2"));
        let new = store.open_registration(origin("127.0.0.2"));
        store.register(old.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), None).unwrap();
        let again = store.register(new.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), None).unwrap();
        assert!(!again.created);
        drop(old);
        assert_eq!(store.snapshot().services[&ServiceKey::tcp(80)].backends.len(), 1, "the old channel owns nothing");
        drop(new);
        assert!(store.snapshot().services.is_empty());
    }

    #[test]
    fn unhealthy_backends_stay_registered_out_of_rotation() {
        let store = store();
        let a = store.open_registration(origin("127.0.0.2"));
        store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), None).unwrap();
        a.set_healthy(false);
        let snapshot = store.snapshot();
        assert!(snapshot.services[&ServiceKey::tcp(80)].backends.is_empty(), "the frontend stays, empty");
        assert!(!store.view().services[0].backends[0].healthy);
        a.set_healthy(true);
        assert_eq!(store.snapshot().services[&ServiceKey::tcp(80)].backends.len(), 1);
        assert_eq!(store.snapshot().version, 3);
    }

    #[test]
    fn warm_up_snapshots_retire_removed_services_and_versions_jump_above_known_ones() {
        let store = store();
        store.begin_warm_up();
        assert!(store.snapshot().warming_up);
        let a = store.open_registration(origin("127.0.0.2"));
        store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), None).unwrap();
        drop(a);
        assert_eq!(store.snapshot().retired, [ServiceKey::tcp(80)].into());
        let b = store.open_registration(origin("127.0.0.2"));
        store.register(b.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), None).unwrap();
        assert!(store.snapshot().retired.is_empty(), "re-registered: no longer retired");

        store.observe_version(500);
        assert_eq!(store.snapshot().version, 501);
        store.observe_version(20);
        assert_eq!(store.snapshot().version, 501, "an older version changes nothing");
        store.end_warm_up();
        let last = store.snapshot();
        assert_eq!((last.version, last.warming_up), (502, false));
        assert_eq!(last.services.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn register_waits_for_bind_results_and_rolls_back_when_every_node_failed() {
        let store = store();
        let reg = store.open_registration(origin("127.0.0.2"));
        // No node at all: success with a note.
        let reply =
            reg.register(ServiceKey::tcp(80), backend("127.0.0.2:80"), None, Duration::from_secs(2)).await.unwrap();
        assert!(reply.success && reply.message.unwrap().contains("no data-plane node"));

        let node_a = Arc::new(store.connect_node("a", None));
        let node_b = Arc::new(store.connect_node("b", None));
        let report = |store: Arc<Store>, node: Arc<NodeSession>, result: Result<SocketAddr, String>| async move {
            let mut rx = store.subscribe();
            let version = rx.wait_for(|s| s.services.contains_key(&ServiceKey::tcp(81))).await.unwrap().version;
            node.report(NodeReport::Applied {
                version,
                frontends: vec![FrontendStatus { service: ServiceKey::tcp(81), result }],
            });
        };
        let a = tokio::spawn(report(
            Arc::clone(&store),
            Arc::clone(&node_a),
            Err("bind 0.0.0.0:81: Address in use".into()),
        ));
        let b = tokio::spawn(report(
            Arc::clone(&store),
            Arc::clone(&node_b),
            Err("bind 0.0.0.0:81: Permission denied".into()),
        ));
        let reply =
            reg.register(ServiceKey::tcp(81), backend("127.0.0.2:81"), None, Duration::from_secs(2)).await.unwrap();
        a.await.unwrap();
        b.await.unwrap();
        assert!(!reply.success);
        let why = reply.message.unwrap();
        assert!(why.contains("node a: bind 0.0.0.0:81: Address in use"), "{why}");
        assert!(why.contains("node b: bind 0.0.0.0:81: Permission denied"), "{why}");
        assert!(!store.snapshot().services.contains_key(&ServiceKey::tcp(81)), "rolled back");

        // One node that never answers: failure after the timeout, naming it. Node b left: it is listed as
        // disconnected and no longer asked.
        drop(node_b);
        assert!(!store.view().nodes[1].connected);
        let reply =
            reg.register(ServiceKey::tcp(82), backend("127.0.0.2:82"), None, Duration::from_secs(2)).await.unwrap();
        assert_eq!(reply.message.as_deref(), Some("node a: no bind result in time"));

        // One node listens, another fails: success, naming the failing node.
        let node_c = Arc::new(store.connect_node("c", None));
        let a = tokio::spawn(report(Arc::clone(&store), Arc::clone(&node_a), Ok("0.0.0.0:81".parse().unwrap())));
        let c = tokio::spawn(report(Arc::clone(&store), Arc::clone(&node_c), Err("bind 0.0.0.0:81: in use".into())));
        let reply =
            reg.register(ServiceKey::tcp(81), backend("127.0.0.2:81"), None, Duration::from_secs(2)).await.unwrap();
        a.await.unwrap();
        c.await.unwrap();
        assert!(reply.success);
        assert_eq!(reply.message.as_deref(), Some("node c: bind 0.0.0.0:81: in use"));
        drop(node_a);
    }

    #[test]
    fn drain_and_weight_changes_are_versioned_events() {
        let store = store();
        let mut events = store.watch_events();
        let a = store.open_registration(origin("127.0.0.2"));
        let addr: SocketAddr = "127.0.0.2:80".parse().unwrap();
        store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), None).unwrap();
        assert_eq!(events.try_recv().unwrap().kind, EventKind::ServiceAdded);
        assert_eq!(events.try_recv().unwrap().kind, EventKind::BackendRegistered);

        assert_eq!(store.set_weight(ServiceKey::tcp(80), addr, 0), Err(StoreError::InvalidWeight { weight: 0 }));
        let v = store.set_weight(ServiceKey::tcp(80), addr, 5).unwrap();
        assert_eq!(store.snapshot().services[&ServiceKey::tcp(80)].backends[0].weight, 5);
        let event = events.try_recv().unwrap();
        assert_eq!((event.kind, event.version, event.detail.as_str()), (EventKind::WeightChanged, v, "1 -> 5"));

        store.drain_backend(ServiceKey::tcp(80), addr).unwrap();
        assert!(store.snapshot().services[&ServiceKey::tcp(80)].backends.is_empty(), "out of rotation");
        assert!(store.view().services[0].backends[0].draining, "still listed");
        assert_eq!(events.try_recv().unwrap().kind, EventKind::BackendDraining);
        let missing = store.drain_backend(ServiceKey::tcp(81), addr).unwrap_err();
        assert!(matches!(missing, StoreError::NotFound { .. }));

        drop(a);
        assert_eq!(events.try_recv().unwrap().kind, EventKind::BackendRemoved);
        assert_eq!(events.try_recv().unwrap().kind, EventKind::ServiceRemoved);
    }

    #[test]
    fn the_first_registration_chooses_the_algorithm_until_an_operator_does() {
        let store = store();
        let a = store.open_registration(origin("127.0.0.2"));
        let b = store.open_registration(origin("127.0.0.3"));
        let key = ServiceKey::tcp(80);
        store.register(a.id, key, backend("127.0.0.2:80"), Some(Algorithm::LeastConnections)).unwrap();
        assert_eq!(store.snapshot().services[&key].algorithm, Algorithm::LeastConnections);
        let refused = store.register(b.id, key, backend("127.0.0.3:80"), Some(Algorithm::Random)).unwrap_err();
        assert!(refused.to_string().contains("uses least_connections"), "{refused}");
        // Agreeing, or not asking, is fine.
        store.register(b.id, key, backend("127.0.0.3:80"), None).unwrap();
        // After the operator's choice, a registration asking for the old one is let in, overruled.
        store.set_algorithm(key, Algorithm::PowerOfTwo).unwrap();
        let c = store.open_registration(origin("127.0.0.4"));
        let again = store.register(c.id, key, backend("127.0.0.4:80"), Some(Algorithm::LeastConnections)).unwrap();
        assert_eq!(again.overruled, Some((Algorithm::LeastConnections, Algorithm::PowerOfTwo)));
        assert_eq!(store.snapshot().services[&key].algorithm, Algorithm::PowerOfTwo);
    }

    #[test]
    fn a_reconnecting_node_replaces_its_old_session() {
        let store = store();
        let old = store.connect_node("n1", None);
        let new = store.connect_node("n1", None);
        old.report(NodeReport::Applied { version: 9, frontends: Vec::new() });
        assert_eq!(store.view().nodes[0].acked_version, None, "reports of a replaced session are ignored");
        drop(old);
        assert!(store.view().nodes[0].connected, "the old stream's end does not disconnect the new one");
        new.report(NodeReport::Load(vec![BackendLoad {
            service: ServiceKey::tcp(80),
            backend: "127.0.0.2:80".parse().unwrap(),
            active: 3,
            total: 4,
        }]));
        drop(new);
        let view = store.view();
        assert!(!view.nodes[0].connected);
        assert!(view.services.is_empty());
    }
}
