//! The port the store publishes through. A commit hands its snapshot to a [`Replication`]: alone
//! ([`InMemory`]), it goes to the nodes at once; with replicas (`crate::replica`), commits are shared
//! through etcd first and the snapshot nodes get is made from the shared store and handed back through
//! [`Store::publish`](super::Store::publish). The store asks the port, never which one it has.

use std::{fmt, future::Future, net::SocketAddr, pin::Pin, time::Duration};

use contract::model::{RoutingSnapshot, ServiceKey};

use super::shared::OperatorChange;
use crate::error::StoreError;

/// A future of the port, boxed so that the store can hold any port.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How the store's commits reach nodes, and what a shared store asks of changes.
pub trait Replication: Send + Sync + fmt::Debug + 'static {
    /// A commit made the registry whose snapshot `build` makes: the snapshot nodes get now, or `None`
    /// when they get the snapshots made from the shared store instead.
    fn committed(&self, build: &dyn Fn() -> RoutingSnapshot) -> Option<RoutingSnapshot>;

    /// This controller's nodes changed: one joined, left or acked.
    fn nodes_changed(&self);

    /// `Ok` when changes can be made now; refused while a shared store cannot be reached (what is
    /// registered stays served, and a registration that ends is still removed).
    fn check(&self) -> Result<(), StoreError>;

    /// A registration put `backend` of `service` into the registry at `version`: the version whose bind
    /// results decide its reply, once nodes can get it, waiting at most `timeout` (`None`: not in time).
    fn confirmed(
        &self,
        service: ServiceKey,
        backend: SocketAddr,
        version: u64,
        timeout: Duration,
    ) -> Pending<'_, Option<u64>>;

    /// A node says it already applied a version: `true` when this controller's versions continue above
    /// it (alone, after a restart), `false` when versions are another's (a shared store's revisions).
    fn follows_node_versions(&self) -> bool;

    /// An operator changed something on this controller.
    fn operator_changed(&self, change: OperatorChange);
}

/// One controller alone: every commit's snapshot goes to the nodes at once, as the commit's version.
#[derive(Debug, Default, Clone, Copy)]
pub struct InMemory;

// === impl InMemory ===

impl Replication for InMemory {
    fn committed(&self, build: &dyn Fn() -> RoutingSnapshot) -> Option<RoutingSnapshot> {
        Some(build())
    }

    fn nodes_changed(&self) {}

    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn confirmed(&self, _: ServiceKey, _: SocketAddr, version: u64, _: Duration) -> Pending<'_, Option<u64>> {
        Box::pin(std::future::ready(Some(version)))
    }

    fn follows_node_versions(&self) -> bool {
        true
    }

    fn operator_changed(&self, _: OperatorChange) {}
}
