//! The registry: which services exist, which backends each has, and which registration owns each backend.
//! Plain data with the invariants it must keep and the snapshot it makes; the changes are in
//! [`super::changes`], the lock and the commit in [`super::Store`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use contract::model::{Algorithm, BackendSpec, ProxyProtocol, RoutingSnapshot, ServiceKey, ServiceSpec, Weight};

use tokio::sync::watch;

use super::registration::{Credential, Origin, RegistrationId};
use crate::error::StoreError;

/// Services, backends and registrations. Cloned into a draft for every change, so a change that fails the
/// invariants leaves it untouched.
#[derive(Debug, Clone, Default)]
pub(super) struct Registry {
    /// See [`RoutingSnapshot::warming_up`].
    pub warming_up: bool,
    /// Services removed while warming up, so nodes drop them even though the snapshots are partial.
    pub retired: BTreeSet<ServiceKey>,
    pub services: BTreeMap<ServiceKey, Service>,
    pub registrations: HashMap<RegistrationId, RegistrationRecord>,
    pub next_registration: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Service {
    pub algorithm: Algorithm,
    /// Set by an operator (`SetAlgorithm`): registrations asking for another are accepted and overruled,
    /// so agents started with an older choice are not locked out when they re-register.
    pub algorithm_set_by_operator: bool,
    /// The PROXY protocol on both sides, set by the first registration (or the configuration file).
    pub proxy: ProxyProtocol,
    pub backends: BTreeMap<SocketAddr, Backend>,
    /// The source address of the registration that created it (none for the file's and replicas'), for
    /// the quota of services per source.
    pub creator: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Backend {
    pub weight: Weight,
    pub owner: RegistrationId,
    /// Drained by an operator: out of rotation until its registration ends.
    pub draining: bool,
}

#[derive(Debug, Clone)]
pub(super) struct RegistrationRecord {
    pub origin: Origin,
    /// The registration's own verdict on its backends (agents report their local checks).
    pub healthy: bool,
    pub backends: BTreeSet<(ServiceKey, SocketAddr)>,
    /// What its maker proved: who else may change what it registered.
    pub credential: Credential,
    /// Told why, when an operator ends one of its backends (the registration's channel says so).
    pub ended_by_operator: Arc<watch::Sender<Option<String>>>,
}

// === impl Registry ===

impl Registry {
    /// Adds a registration from `origin` holding no backend yet, with `healthy` as its verdict.
    pub fn new_registration(&mut self, origin: Origin, healthy: bool) -> RegistrationId {
        self.next_registration += 1;
        let id = RegistrationId(self.next_registration);
        let record = RegistrationRecord {
            origin,
            healthy,
            backends: BTreeSet::new(),
            credential: Credential::of(origin.kind),
            ended_by_operator: Arc::new(watch::Sender::new(None)),
        };
        self.registrations.insert(id, record);
        id
    }

    /// The record of `backend` in `service`.
    pub fn backend_mut(&mut self, service: ServiceKey, backend: SocketAddr) -> Result<&mut Backend, StoreError> {
        self.services
            .get_mut(&service)
            .and_then(|s| s.backends.get_mut(&backend))
            .ok_or(StoreError::NotFound { service, backend })
    }

    /// Removes `backend` from `service` and from its owner's list; a service left without a backend goes too
    /// (and is retired while warming up).
    pub fn remove_backend(&mut self, service: ServiceKey, backend: SocketAddr, owner: RegistrationId) {
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

    /// The routing state at `version`: every service, with the backends in rotation (neither drained nor
    /// of an unhealthy registration).
    pub fn snapshot(&self, version: u64) -> RoutingSnapshot {
        let services = self
            .services
            .iter()
            .map(|(&key, service)| {
                let backends = service
                    .backends
                    .iter()
                    .filter(|(_, b)| !b.draining && self.registrations.get(&b.owner).is_some_and(|r| r.healthy))
                    .map(|(&address, b)| BackendSpec { address, weight: b.weight })
                    .collect();
                (key, ServiceSpec { key, algorithm: service.algorithm, proxy: service.proxy, backends })
            })
            .collect();
        RoutingSnapshot { version, services, warming_up: self.warming_up, retired: self.retired.clone() }
    }

    /// Every service has a backend; every backend's owner exists and lists it, and the reverse.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (service, s) in &self.services {
            if s.backends.is_empty() {
                return Err(format!("service {service} has no backend"));
            }
            for (addr, b) in &s.backends {
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
        if let Some(service) = self.retired.iter().find(|s| self.services.contains_key(s)) {
            return Err(format!("service {service} is both served and retired"));
        }
        Ok(())
    }
}
