//! Static backends: the ones the configuration file names, which need no registration. Each is held by a
//! registration of origin [`OriginKind::Config`] of its own, so its health (the controller's own checks)
//! takes it in and out of rotation exactly as an agent's verdict does, and it may share a service with
//! registered backends. A (re)load of the file is applied by [`Store::apply_static`] as one version.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use contract::{
    client,
    model::{Algorithm, Event, EventKind, ProxyProtocol, ServiceKey, Weight},
};
use tracing::info;

use super::{
    Store,
    registration::RegistrationId,
    registration::{Origin, OriginKind},
    registry::Backend,
};
use crate::error::StoreError;

/// What the configuration file says one static service is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticSpec {
    /// Its balancing algorithm (the file is the operator's: it overrules registrations).
    pub algorithm: Algorithm,
    /// Its PROXY protocol.
    pub proxy: ProxyProtocol,
    /// Its static backends.
    pub backends: BTreeMap<SocketAddr, StaticBackend>,
}

/// One static backend as a load asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticBackend {
    /// Its weight.
    pub weight: Weight,
    /// The verdict to set (the first result of a check that starts now); `None` keeps the current one.
    pub health: Option<bool>,
}

/// What a load changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaticDiff {
    /// The version that holds it (the current one when nothing changed).
    pub version: u64,
    /// Static backends added.
    pub added: Vec<(ServiceKey, SocketAddr)>,
    /// Static backends removed.
    pub removed: Vec<(ServiceKey, SocketAddr)>,
    /// Static backends whose weight or service's algorithm changed.
    pub changed: Vec<(ServiceKey, SocketAddr)>,
}

// === impl Store ===

impl Store {
    /// Makes the static backends exactly `wanted`, in one version: new ones are added (a backend a server
    /// registered becomes static), missing ones removed, changed ones updated; a backend that is in both the
    /// running and the new load keeps its connections. Refused as a whole, with nothing changed, when any
    /// service or backend is one a registration could not make either.
    pub fn apply_static(&self, wanted: &BTreeMap<ServiceKey, StaticSpec>) -> Result<StaticDiff, StoreError> {
        self.check_shared()?;
        for key in wanted.keys() {
            self.check_port(key.port)?;
        }
        // Socket calls, so outside the lock: whether each backend's address is this host's.
        let here: HashMap<SocketAddr, bool> = wanted
            .values()
            .flat_map(|s| s.backends.keys())
            .map(|&a| (a, client::is_local(a.ip().to_canonical())))
            .collect();
        let mut state = self.lock();
        for (&key, spec) in wanted {
            for &address in spec.backends.keys() {
                self.check_not_itself(&state, key, address, here.get(&address).copied().unwrap_or(false))?;
            }
        }
        let running: BTreeMap<(ServiceKey, SocketAddr), RegistrationId> = state
            .registry
            .registrations
            .iter()
            .filter(|(_, r)| r.origin.kind == OriginKind::Config)
            .flat_map(|(&id, r)| r.backends.iter().map(move |&b| (b, id)))
            .collect();
        let new_services = wanted.keys().filter(|k| !state.registry.services.contains_key(k)).count();
        if state.registry.services.len() + new_services > self.policy.limits.services {
            return Err(StoreError::TooManyServices { max: self.policy.limits.services });
        }
        let mut draft = state.registry.clone();
        let mut diff = StaticDiff::default();
        let mut health_changed = false;
        for (&(service, address), &id) in &running {
            if !wanted.get(&service).is_some_and(|s| s.backends.contains_key(&address)) {
                draft.remove_backend(service, address, id);
                draft.registrations.remove(&id);
                diff.removed.push((service, address));
            }
        }
        for (&service, spec) in wanted {
            let entry = draft.services.entry(service).or_default();
            // A service's algorithm or PROXY settings changing changes each of its static backends' routes.
            let settings_changed =
                (entry.algorithm != spec.algorithm || entry.proxy != spec.proxy) && !entry.backends.is_empty();
            entry.algorithm = spec.algorithm;
            entry.proxy = spec.proxy;
            entry.algorithm_set_by_operator = true;
            draft.retired.remove(&service);
            for (&address, wanted_backend) in &spec.backends {
                let id = match running.get(&(service, address)) {
                    Some(&id) => id,
                    None => draft.new_registration(Origin { kind: OriginKind::Config, peer: address }, true),
                };
                let previous = draft.services.get(&service).and_then(|s| s.backends.get(&address)).cloned();
                // A backend a server registered becomes static: its registration no longer lists it.
                if let Some(previous) = previous.as_ref().filter(|b| b.owner != id)
                    && let Some(owner) = draft.registrations.get_mut(&previous.owner)
                {
                    owner.backends.remove(&(service, address));
                }
                let draining = previous.as_ref().is_some_and(|b| b.draining);
                let backend = Backend { weight: wanted_backend.weight, owner: id, draining };
                if let Some(reg) = draft.registrations.get_mut(&id) {
                    reg.backends.insert((service, address));
                    if let Some(healthy) = wanted_backend.health {
                        // A new registration starts healthy; it is in `diff.added` anyway.
                        health_changed |= reg.healthy != healthy;
                        reg.healthy = healthy;
                    }
                }
                match previous {
                    Some(p) if p.owner == id => {
                        if p.weight != backend.weight || settings_changed {
                            diff.changed.push((service, address));
                        }
                    }
                    _ => diff.added.push((service, address)),
                }
                draft.services.entry(service).or_default().backends.insert(address, backend);
            }
        }
        if diff.added.is_empty() && diff.removed.is_empty() && diff.changed.is_empty() && !health_changed {
            diff.version = state.version;
            return Ok(diff);
        }
        let version = self.commit(&mut state, draft)?;
        diff.version = version;
        let origin = |address| Origin { kind: OriginKind::Config, peer: address }.to_string();
        for &(service, address) in &diff.added {
            info!(%service, backend = %address, version, "static backend added");
            self.emit(Event::backend(EventKind::BackendRegistered, version, service, address, &origin(address)));
        }
        for &(service, address) in &diff.removed {
            self.removed(&state, service, address, "removed from the configuration file", version);
        }
        for &(service, address) in &diff.changed {
            info!(%service, backend = %address, version, "static backend changed");
        }
        self.print(&state);
        Ok(diff)
    }

    /// Records the verdict of the controller's check of a static backend.
    pub fn set_static_healthy(
        &self,
        service: ServiceKey,
        backend: SocketAddr,
        healthy: bool,
    ) -> Result<(), StoreError> {
        let id = {
            let state = self.lock();
            let owner = state.registry.services.get(&service).and_then(|s| s.backends.get(&backend)).map(|b| b.owner);
            owner.filter(|id| state.registry.registrations.get(id).is_some_and(|r| r.origin.kind == OriginKind::Config))
        };
        match id {
            Some(id) => self.set_healthy(id, healthy),
            None => Ok(()),
        }
    }
}
