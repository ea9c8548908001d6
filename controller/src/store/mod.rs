//! The store: the controller's single source of truth, in rooms around one [`State`]:
//!
//! - [`registry`]: services, backends and registrations, with their invariants and the snapshot they make.
//! - [`changes`]: every change of the registry, each validated on a draft and committed by [`Store::commit`].
//! - [`registration`]: the handle a live registration holds; dropping it removes what it registered.
//! - [`nodes`]: connected nodes, the addresses their frontends listen on and their bind results (the
//!   verdict a registration waits for).
//! - [`load`]: the nodes' connection counts summed into each node's cluster view, and servers' load reports.
//! - [`policy`]: the ports services may use and the bounds on what registrations may hold.
//! - [`events`]: the broadcast of state changes.
//! - [`replication`]: the port commits are published through: alone, at once; with replicas, through the
//!   shared store (`crate::replica`).
//! - [`shared`]: with replicas, the backends this controller publishes and the ones it imports, the
//!   operators' choices made anywhere, and the snapshots made from the shared store.
//! - [`statics`]: the static backends of the configuration file, each (re)load one version.
//! - [`view`]: the read model operators see, and `--print-state`.
//!
//! The commit path, top to bottom: a change takes the lock, returns early when it changes nothing (no
//! version), copies the registry into a draft, applies itself to the draft, and hands the draft to
//! [`Store::commit`] (or to `Store::keep` when no snapshot shows the change). The commit checks the invariants: a draft that breaks one is refused (the caller
//! gets [`StoreError::Invariant`], nothing is published). Otherwise the draft becomes the registry, the
//! version goes up by one, and the snapshot of that version is published on a watch channel that every
//! node follows.
//!
//! # Life of a registration
//!
//! 1. **Connect.** `api/json.rs` accepts a connection within its share of descriptors and `--json-allow`
//!    (or `api/grpc.rs` a `Register` stream, past the token check of `api/auth.rs` and the listener cap of
//!    `api/listener.rs`) and opens a `Registration` handle (`store/registration.rs`,
//!    `Store::open_registration`, bounded per source address). Dropping the handle ends the registration.
//! 2. **Parse.** JSON bytes go through `api/framing.rs` (NDJSON, glued, split, 64 KiB) and `api/request.rs`
//!    (fields to `ServiceKey`, `Weight`, `Algorithm` of `contract::model`). A gRPC `register` message becomes
//!    a `RegistrationRequest` in `contract/convert/registry.rs`. The backend is the peer's IP and
//!    `backend_port` (default: the service port).
//! 3. **Change.** `Registration::register` calls `Store::register` (`store/changes.rs`): the port policy,
//!    the backend not being the balancer itself, the bounds, the algorithm rule, then the change on a draft
//!    of the registry (`store/registry.rs`). Over gRPC, `BackendRules` (`api/grpc.rs`) first refuses another
//!    host's backend unless the caller is an operator. Each registration carries the `Credential` its token
//!    proved (a JSON message's `"token"` field, gRPC's bearer token); with `--auth-token` set an anonymous one
//!    chooses no service settings, and each source creates at most `--max-services-per-source` services. A
//!    backend owned by another registration moves to this one only under the owner rule
//!    (`Store::check_owner`: same credential from the same address, or an operator); an identical
//!    re-registration returns the current version. Loops are judged by the addresses each node's hello says
//!    its frontends listen on.
//! 4. **Commit.** `Store::commit` (`store/mod.rs`) checks the draft's invariants. A draft that breaks one is
//!    refused: nothing is published and the caller gets `StoreError::Invariant`. Otherwise the draft becomes
//!    the registry, the version goes up by one, and `Registry::snapshot` (only backends neither draining nor
//!    of an unhealthy registration) is published on a `watch` channel. `store/events.rs` emits the events.
//! 5. **Publish.** The embedded node reads the watch channel; `api/sync.rs` sends each remote node the
//!    snapshot (`contract/convert/routing.rs`) on its `Sync` stream: whole first, then as a `RoutingDelta`
//!    from the last one sent, each encoded once for all the streams that need it. `dataplane/src/sync.rs`
//!    rebuilds the snapshot and feeds it into the same `Node`. A watch keeps the latest value: a node may
//!    skip versions, never state.
//! 6. **Apply.** `Node::apply` (`dataplane/src/node.rs`) swaps in a new `RoutingTable` (`table.rs`; a
//!    service whose algorithm and backends did not change keeps its route whole, the others get balancers
//!    that continue, counters in `stats.rs` are reused), schedules drains for backends that left with
//!    open connections, closes the frontends of services that left (waiting until the port is free), and
//!    opens new ones (`listener.rs`); a failed bind is retried with every later snapshot.
//! 7. **Report.** The node reports `NodeReport::Applied { version, frontends }` (one `Ok(addr)` or
//!    `Err("bind ADDR: OS error")` per service), in process for the embedded node, as a `SnapshotAck` for a
//!    remote one (only the results that changed since its last ack, `NodeReport::AppliedChanges`, when the
//!    controller's `Sync` response says it takes them). It reaches `store/nodes.rs` through the node's `NodeLink`, which wakes the waiters.
//! 8. **Verdict.** `Store::await_frontend` waits until every connected node acked the registration's
//!    version or later, at most `--bind-ack-timeout`: **Serving** (one node listens; the others' errors as a
//!    note), **Failed** (every node's error; `Store::withdraw` removes a backend this call created), or
//!    **NoNodes**. `api/json.rs` answers `successful`/`failed`; `api/grpc.rs` an ack.
//! 9. **Probe.** `probe.rs` sends hellos while the registration holds backends. Unanswered hellos, a closed
//!    connection or an ended stream drop the handle, and `Store::close_registration` removes its backends in
//!    one new version; nodes close the ports of services left with no backend.
//!
//! Operators' changes take the same path from step 3: `api/admin.rs` converts the request
//! (`contract/convert/admin.rs`) and calls `Store::drain_backend`, `set_weight` or `set_algorithm`. An
//! agent is one more gRPC `Register` client (`agent/src/register.rs`): it registers with its check's verdict,
//! answers hellos with `hello_ack{seq, healthy}` (`Registration::set_healthy`: unhealthy backends stay in the
//! store, out of the snapshot), pushes a verdict change at once, retries with `contract::backoff`, and
//! deregisters on SIGTERM.
//!
//! Static services of the `--config` file take the same path from step 3 without a connection:
//! `statics.rs` validates the `[[service]]` sections, runs the first check of each new static backend, and
//! `Store::apply_static` (`store/statics.rs`) makes the whole file one version, each static backend held by a
//! registration of origin `config`. One checker task per static backend (`contract::check::follow`, the
//! agent's checks) records verdicts with `Store::set_static_healthy`. SIGHUP (`Reload` in `lib.rs`) reads
//! the file again through `Config::reload` and applies only the difference, or logs why it refuses it.
//!
//! # Invariants
//!
//! `Registry::check_invariants` runs on every commit, and a change that breaks one is refused:
//!
//! - Every service has at least one backend; a service goes with its last backend.
//! - Every backend has exactly one owning registration, which lists it, and every (service, backend) a
//!   registration lists is owned by it.
//! - No service is both served and retired.
//! - Weights are in 1..=10000: `contract::model::Weight` cannot hold another value.
//!
//! Versions: a fresh store is at 0 with an empty snapshot. Every commit adds exactly 1 and publishes exactly
//! one snapshot, under the store's mutex, so versions are published in order and never twice. Refused
//! requests and requests that change nothing make no version; a node joining or leaving is not a commit. A
//! published snapshot is never mutated. The one jump: a node's `hello` reporting a version at or above the
//! store's makes `Store::observe_version` continue above it. A `Sync` stream sends only increasing versions,
//! and a `dataplane` ignores a snapshot that is not newer than its own. A registration's reply counts only
//! acks of its version or later. The controller's own ports are never frontends. With `--store etcd://`
//! (`Store::replicated`), commits change the registry only: the replica publishes the snapshot made from
//! etcd, whose version is the revision of the latest routing change there, the same on every controller;
//! a registration then waits for its key's revision.
//!
//! Warm-up: for `--resync-grace` after start, snapshots carry `warming_up` and the services `retired` since
//! start; a node keeps serving services it has that are neither listed nor retired
//! (`RoutingSnapshot::applied_over`), so servers can re-register after a controller restart.

mod changes;
pub mod events;
pub mod load;
pub mod nodes;
mod policy;
pub mod registration;
mod registry;
pub mod replication;
pub mod shared;
pub mod statics;
mod view;

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use contract::model::{Event, RoutingSnapshot};
use tokio::sync::{broadcast, watch};
use tracing::error;

pub use load::ClusterLoadFeed;
pub use nodes::{EMBEDDED_NODE, FrontendVerdict, NodeLink};
pub use policy::{PortRanges, RegistryLimits};
pub use registration::{Credential, Origin, OriginKind, Registration, Requester};
pub use replication::{InMemory, Replication};

use self::{nodes::NodeTable, registry::Registry};
use crate::{error::StoreError, metrics::ControllerMetrics};

/// Which ports services may use, and which backends are the balancer itself.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `--allowed-ports`.
    pub allowed_ports: PortRanges,
    /// The controller's own listeners: their ports are never a frontend, their addresses never a backend.
    pub own_listeners: Vec<SocketAddr>,
    /// Where the embedded node binds its frontends (none without an embedded node).
    pub frontend_ip: Option<IpAddr>,
    /// Bounds on what registrations may make the store hold.
    pub limits: RegistryLimits,
    /// A server's load report counts this long (`--load-report-max-age`).
    pub load_report_max_age: std::time::Duration,
    /// The registration token is set: only an authenticated registration or an operator chooses a
    /// service's algorithm and PROXY protocol.
    pub settings_need_authority: bool,
    /// A node that left is forgotten this long after (`--node-forget-after`).
    pub node_forget_after: std::time::Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_ports: PortRanges::default(),
            own_listeners: Vec::new(),
            frontend_ip: None,
            limits: RegistryLimits::default(),
            load_report_max_age: std::time::Duration::from_secs(10),
            settings_need_authority: false,
            node_forget_after: std::time::Duration::from_secs(600),
        }
    }
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
    /// The latest events, numbered, for the dashboard.
    recent: Mutex<events::Recent>,
    /// What the store counts for `/metrics`.
    metrics: ControllerMetrics,
    /// How commits reach nodes: at once, or through the shared store.
    replication: Arc<dyn Replication>,
    /// Every connected node's counts summed, computed once per change of any of them and outside the
    /// state lock; each node's view is this less its own rows.
    totals: Mutex<load::ClusterTotals>,
}

/// Everything behind the store's lock.
#[derive(Debug, Default)]
struct State {
    /// Version of the last published snapshot.
    version: u64,
    /// What the snapshots are made of.
    registry: Registry,
    /// Who follows them.
    nodes: NodeTable,
    /// When the latest versions were published, for the time nodes take to ack them.
    published: VecDeque<(u64, Instant)>,
}

/// Versions whose publication time is kept.
const PUBLISHED_KEPT: usize = 64;

// === impl Store ===

impl Store {
    /// An empty store at version 0, alone: every commit is published at once.
    pub fn new(policy: Policy, print_state: bool) -> Arc<Self> {
        Self::with_replication(policy, print_state, Arc::new(InMemory))
    }

    /// An empty store at version 0 whose commits reach nodes through `replication`. With a shared store
    /// (`--store etcd://`), commits change the registry (this controller's registrations and what it
    /// imported) but publish nothing; the replica publishes the snapshot of every etcd revision, the same
    /// on every controller.
    pub fn with_replication(policy: Policy, print_state: bool, replication: Arc<dyn Replication>) -> Arc<Self> {
        Arc::new(Store {
            state: Mutex::default(),
            policy,
            print_state,
            snapshots: watch::Sender::new(Arc::default()),
            node_updates: watch::Sender::new(0),
            events: broadcast::Sender::new(1024),
            recent: Mutex::default(),
            metrics: ControllerMetrics::default(),
            replication,
            totals: Mutex::default(),
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

    /// The gate every change passes: `draft` becomes the registry and is published as the next version,
    /// unless it breaks an invariant; then nothing changes and the caller gets the error. Called with the
    /// lock held, so versions are published in order and never twice.
    fn commit(&self, state: &mut State, draft: Registry) -> Result<u64, StoreError> {
        Self::check(state, &draft)?;
        state.version += 1;
        state.registry = draft;
        let version = state.version;
        if let Some(snapshot) = self.replication.committed(&|| state.registry.snapshot(version)) {
            self.snapshots.send_replace(Arc::new(snapshot));
        }
        if state.published.len() == PUBLISHED_KEPT {
            state.published.pop_front();
        }
        state.published.push_back((version, Instant::now()));
        Ok(version)
    }

    /// Refuses a change while the shared store cannot be reached.
    pub fn check_shared(&self) -> Result<(), StoreError> {
        self.replication.check()
    }

    /// A node of this controller joined, left or acked.
    fn node_changed(&self) {
        self.replication.nodes_changed();
    }

    /// What the store counts for `/metrics`.
    pub fn metrics(&self) -> &ControllerMetrics {
        &self.metrics
    }

    /// Live registrations per origin.
    pub fn registrations_by_origin(&self) -> [(OriginKind, usize); 5] {
        let state = self.lock();
        let count = |kind| state.registry.registrations.values().filter(|r| r.origin.kind == kind).count();
        OriginKind::ALL.map(|kind| (kind, count(kind)))
    }

    /// The same gate for a change that no snapshot shows (a registration opened or closed with nothing
    /// routed, a verdict or an operator's choice that routes nothing yet): checked, kept, not published.
    fn keep(state: &mut State, draft: Registry) -> Result<(), StoreError> {
        Self::check(state, &draft)?;
        state.registry = draft;
        Ok(())
    }

    fn check(state: &State, draft: &Registry) -> Result<(), StoreError> {
        draft.check_invariants().map_err(|broken| {
            error!(%broken, version = state.version, "change refused: it would break a store invariant");
            StoreError::Invariant(broken)
        })
    }

    fn print(&self, state: &State) {
        if self.print_state {
            eprint!("{}", state.view(self.policy.load_report_max_age));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: changes are made on a draft
        // and committed last, so the state behind a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests;
