//! A controller as one of several replicas on etcd (`--store etcd://`): it publishes the backends its own
//! registrations hold, one key each under its lease, and imports every other controller's, so every node,
//! whichever controller it follows, serves every service.
//!
//! The store publishes through its port, [`Replication`]; [`Etcd`] is the port's etcd side (the store's
//! own [`InMemory`](crate::store::InMemory) serves a controller alone): a commit publishes nothing at
//! once, and the snapshot nodes get is made from the mirror of etcd at its revision, so every controller
//! sends the same version for the same state. A registration's reply waits until its key is in etcd,
//! then for every node's bind results at that revision, whichever controller it follows.
//!
//! # Layout
//! - `codec`: the key schema and the JSON value of each key, every mapping written once.
//! - `mirror`: what a controller derives from its mirror: the snapshot, the others' backends, nodes
//!   and counts, the operators' choices.
//! - `etcd`: the loop that publishes this controller's keys and feeds the store from the mirror.
//!
//! The link itself (following the prefix, keys under a lease) is [`crate::etcd`].

mod codec;
mod etcd;
mod mirror;

use std::{collections::HashMap, net::SocketAddr, sync::Mutex, time::Duration};

use contract::model::{RoutingSnapshot, ServiceKey};
pub use etcd::run;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    error::StoreError,
    etcd::EtcdConfig,
    store::{
        replication::{Pending, Replication},
        shared::OperatorChange,
    },
};

/// Where this controller's backends go, and under which name.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// The etcd cluster and prefix.
    pub etcd: EtcdConfig,
    /// This controller's name among the others.
    pub id: String,
}

/// The store's port with replicas: commits are shared through etcd by [`run`], which hands back the
/// snapshot of every revision; changes are refused while etcd cannot be reached.
#[derive(Debug)]
pub struct Etcd {
    /// Why the shared store cannot be reached now (then changes are refused).
    down: Mutex<Option<String>>,
    /// Per backend of this controller's own registrations, the etcd revision at which its key holds what
    /// was last committed (0: not there yet).
    revisions: watch::Sender<HashMap<(ServiceKey, SocketAddr), u64>>,
    /// Bumped on every commit and every change of this controller's nodes: what [`run`] publishes moves
    /// with it.
    local_changes: watch::Sender<u64>,
    /// Where this controller's operator changes go to be shared.
    operator: Mutex<Option<mpsc::UnboundedSender<OperatorChange>>>,
}

// === impl Etcd ===

impl Default for Etcd {
    fn default() -> Self {
        Etcd {
            down: Mutex::default(),
            revisions: watch::Sender::new(HashMap::new()),
            local_changes: watch::Sender::new(0),
            operator: Mutex::default(),
        }
    }
}

impl Etcd {
    /// Records whether etcd can be reached (`None`) or why not. While it cannot, registrations and
    /// operator changes are refused with [`StoreError::Unavailable`]; what is registered stays served, and
    /// a registration that ends is still removed.
    fn set_down(&self, why: Option<String>) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match (&*down, &why) {
            (None, Some(why)) => warn!(%why, "shared store unavailable: refusing changes, serving what is registered"),
            (Some(_), None) => info!("shared store reachable again: taking changes"),
            _ => {}
        }
        *down = why;
    }

    /// Per own backend, the revision at which etcd holds its last write.
    fn set_revisions(&self, own: HashMap<(ServiceKey, SocketAddr), u64>) {
        self.revisions.send_if_modified(|held| {
            let changed = *held != own;
            *held = own;
            changed
        });
    }

    /// Moves on every commit and every change of this controller's nodes.
    fn watch_local_changes(&self) -> watch::Receiver<u64> {
        self.local_changes.subscribe()
    }

    /// The operator changes made on this controller from now on (one reader: [`run`]).
    fn operator_changes(&self) -> mpsc::UnboundedReceiver<OperatorChange> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.operator.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }
}

impl Replication for Etcd {
    fn committed(&self, _: &dyn Fn() -> RoutingSnapshot) -> Option<RoutingSnapshot> {
        self.local_changes.send_modify(|n| *n += 1);
        None
    }

    fn nodes_changed(&self) {
        self.local_changes.send_modify(|n| *n += 1);
    }

    fn check(&self) -> Result<(), StoreError> {
        match &*self.down.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(StoreError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }

    /// The revision at which etcd holds what this controller last committed for `backend` of `service`.
    fn confirmed(
        &self,
        service: ServiceKey,
        backend: SocketAddr,
        _: u64,
        timeout: Duration,
    ) -> Pending<'_, Option<u64>> {
        let mut seen = self.revisions.subscribe();
        Box::pin(async move {
            let found =
                tokio::time::timeout(timeout, seen.wait_for(|r| r.get(&(service, backend)).is_some_and(|&v| v > 0)));
            let revisions = found.await.ok()?.ok()?;
            revisions.get(&(service, backend)).copied()
        })
    }

    fn follows_node_versions(&self) -> bool {
        false
    }

    fn operator_changed(&self, change: OperatorChange) {
        if let Some(tx) = &*self.operator.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(change);
        }
    }
}
