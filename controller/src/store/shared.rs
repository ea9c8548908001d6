//! Backends shared between controllers run as replicas: the ones this controller's own registrations
//! hold (which it publishes), and the ones other controllers hold (which it imports, each under a
//! registration of origin [`OriginKind::Replica`] that lives exactly as long as the other controller's
//! key). A backend a local registration holds is never overwritten by an imported one. Also the
//! operators' choices made on any controller, and the snapshots made from the shared store. Where these
//! are read and written is the replica's (`crate::replica`): the store names no etcd type.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use contract::model::{Algorithm, Event, EventKind, ProxyProtocol, RoutingSnapshot, ServiceKey, Weight};
use tracing::info;

use super::{
    Store,
    registration::{Origin, OriginKind, RegistrationId},
    registry::Backend,
};

/// One backend as controllers share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBackend {
    /// Its service.
    pub service: ServiceKey,
    /// Where it listens.
    pub address: SocketAddr,
    /// Its weight.
    pub weight: Weight,
    /// Its registration's verdict.
    pub healthy: bool,
    /// Drained by an operator.
    pub draining: bool,
    /// The service's algorithm where it was registered.
    pub algorithm: Algorithm,
    /// The service's PROXY protocol where it was registered.
    pub proxy: ProxyProtocol,
}

// === impl Store ===

impl Store {
    /// Every backend this controller's own registrations hold (none of the imported ones), sorted.
    pub fn own_backends(&self) -> Vec<SharedBackend> {
        let state = self.lock();
        let registry = &state.registry;
        let mut own = Vec::new();
        for (&service, s) in &registry.services {
            for (&address, b) in &s.backends {
                let Some(owner) = registry.registrations.get(&b.owner) else { continue };
                if owner.origin.kind == OriginKind::Replica {
                    continue;
                }
                own.push(SharedBackend {
                    service,
                    address,
                    weight: b.weight,
                    healthy: owner.healthy,
                    draining: b.draining,
                    algorithm: s.algorithm,
                    proxy: s.proxy,
                });
            }
        }
        own
    }

    /// Makes the imported backends exactly `shared` (the other controllers' backends), in one version when
    /// anything changes. Of two controllers holding the same backend, the first listed wins.
    pub fn import_shared(&self, shared: &[SharedBackend]) {
        let mut state = self.lock();
        let mut draft = state.registry.clone();
        let imported: BTreeMap<(ServiceKey, SocketAddr), RegistrationId> = draft
            .registrations
            .iter()
            .filter(|(_, r)| r.origin.kind == OriginKind::Replica)
            .flat_map(|(&id, r)| r.backends.iter().map(move |&key| (key, id)))
            .collect();
        let mut wanted: BTreeMap<(ServiceKey, SocketAddr), &SharedBackend> = BTreeMap::new();
        for backend in shared {
            wanted.entry((backend.service, backend.address)).or_insert(backend);
        }
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for (&(service, address), &id) in &imported {
            if !wanted.contains_key(&(service, address)) {
                draft.registrations.remove(&id);
                draft.remove_backend(service, address, id);
                removed.push((service, address));
            }
        }
        for (&(service, address), &backend) in &wanted {
            let held = draft.services.get(&service).and_then(|s| s.backends.get(&address)).map(|b| b.owner);
            let local = held.is_some_and(|owner| {
                draft.registrations.get(&owner).is_some_and(|r| r.origin.kind != OriginKind::Replica)
            });
            if local {
                continue;
            }
            let id = match imported.get(&(service, address)) {
                Some(&id) => id,
                None => {
                    added.push((service, address));
                    draft.new_registration(Origin { kind: OriginKind::Replica, peer: address }, backend.healthy)
                }
            };
            if let Some(record) = draft.registrations.get_mut(&id) {
                record.healthy = backend.healthy;
                record.backends.insert((service, address));
            }
            draft.retired.remove(&service);
            let entry = draft.services.entry(service).or_default();
            if entry.backends.is_empty() || !entry.algorithm_set_by_operator {
                entry.algorithm = backend.algorithm;
            }
            if entry.backends.is_empty() {
                entry.proxy = backend.proxy;
            }
            entry.backends.insert(address, Backend { weight: backend.weight, owner: id, draining: backend.draining });
        }
        if draft.services == state.registry.services
            && draft.registrations.len() == state.registry.registrations.len()
            && draft
                .registrations
                .iter()
                .all(|(id, r)| state.registry.registrations.get(id).is_some_and(|old| old.healthy == r.healthy))
        {
            return;
        }
        let Ok(version) = self.commit(&mut state, draft) else { return };
        for (service, address) in added {
            info!(%service, backend = %address, version, "backend of another controller imported");
            self.emit(Event::backend(EventKind::BackendRegistered, version, service, address, "another controller"));
        }
        for (service, address) in removed {
            self.removed(&state, service, address, "gone from the shared store", version);
        }
        self.print(&state);
    }
}

/// An operator's change made on this controller, to be shared with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorChange {
    /// `DrainBackend`.
    Drain {
        /// Its service.
        service: ServiceKey,
        /// The backend.
        backend: SocketAddr,
    },
    /// `SetWeight`.
    Weight {
        /// Its service.
        service: ServiceKey,
        /// The backend.
        backend: SocketAddr,
        /// The new weight.
        weight: Weight,
    },
    /// `SetAlgorithm`.
    Algorithm {
        /// The service.
        service: ServiceKey,
        /// The new algorithm.
        algorithm: Algorithm,
    },
}

/// What operators chose on any controller, as the shared store holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperatorChoices {
    /// Algorithms set by an operator.
    pub algorithms: BTreeMap<ServiceKey, Algorithm>,
    /// Per backend: a weight set by an operator, and whether one drained it.
    pub backends: BTreeMap<(ServiceKey, SocketAddr), (Option<Weight>, bool)>,
    /// Algorithms chosen by the first registration of a service (on whichever controller): what the
    /// service's snapshot uses when no operator chose.
    pub first: BTreeMap<ServiceKey, Algorithm>,
}

impl Store {
    /// An operator changed something here: the port shares it (with replicas).
    pub(super) fn operator_changed(&self, change: OperatorChange) {
        self.replication.operator_changed(change);
    }

    /// Applies what operators chose on any controller, in one version when anything changes here.
    /// Unknown services and backends are left for when they come.
    pub fn apply_operator(&self, choices: &OperatorChoices) {
        let mut state = self.lock();
        let mut draft = state.registry.clone();
        let mut events = Vec::new();
        for (&service, &algorithm) in &choices.algorithms {
            if let Some(entry) = draft.services.get_mut(&service)
                && (entry.algorithm != algorithm || !entry.algorithm_set_by_operator)
            {
                let old = std::mem::replace(&mut entry.algorithm, algorithm);
                entry.algorithm_set_by_operator = true;
                if old != algorithm {
                    events.push(Event::service(
                        EventKind::AlgorithmChanged,
                        0,
                        service,
                        &format!("{old} -> {algorithm}"),
                    ));
                }
            }
        }
        for (&(service, address), &(weight, draining)) in &choices.backends {
            let Some(backend) = draft.services.get_mut(&service).and_then(|s| s.backends.get_mut(&address)) else {
                continue;
            };
            if let Some(weight) = weight
                && backend.weight != weight
            {
                let old = std::mem::replace(&mut backend.weight, weight);
                events.push(Event::backend(
                    EventKind::WeightChanged,
                    0,
                    service,
                    address,
                    &format!("{old} -> {weight}"),
                ));
            }
            if draining && !backend.draining {
                backend.draining = true;
                events.push(Event::backend(EventKind::BackendDraining, 0, service, address, "drained by an operator"));
            }
        }
        if events.is_empty() {
            let _ = Self::keep(&mut state, draft);
            return;
        }
        let Ok(version) = self.commit(&mut state, draft) else { return };
        for mut event in events {
            event.version = version;
            info!(kind = ?event.kind, service = ?event.service, backend = ?event.backend, version, "operator's change made on another controller");
            self.emit(event);
        }
        self.print(&state);
    }
}

impl Store {
    /// Publishes `snapshot`, made from the shared store at its revision, to every node following this
    /// controller, unless it is not newer than the one published.
    pub fn publish(&self, snapshot: RoutingSnapshot) {
        let version = snapshot.version;
        let newer = self.snapshots.send_if_modified(|current| {
            if version <= current.version {
                return false;
            }
            *current = Arc::new(snapshot);
            true
        });
        if newer {
            let mut state = self.lock();
            if state.published.len() == super::PUBLISHED_KEPT {
                state.published.pop_front();
            }
            state.published.push_back((version, std::time::Instant::now()));
            drop(state);
            self.node_updates.send_modify(|n| *n += 1);
        }
    }
}
