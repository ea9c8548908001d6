//! The read model: the state as operators see it (`/api/state`, `Admin.ListServices`, `Admin.ListNodes`,
//! `--print-state`), built under the lock from the registry and the nodes' reports.

use std::collections::HashMap;

use contract::model::{BackendView, FrontendStatus, FrontendView, NodeView, ServiceView, StateView};

use super::{EMBEDDED_NODE, OriginKind, State, Store, load::sum_load};
use crate::metrics::StoreReadout;

// === impl Store ===

impl Store {
    /// The whole state.
    pub fn view(&self) -> StateView {
        let state = self.lock();
        let mut view = state.view(self.policy.load_report_max_age);
        // The version nodes get: the commit's alone (a commit publishes under the lock), the shared
        // store's revision with replicas, not this controller's commit count.
        view.version = self.snapshot().version;
        view
    }
}

impl StoreReadout for Store {
    fn view(&self) -> StateView {
        Store::view(self)
    }

    fn registrations_by_origin(&self) -> Vec<(&'static str, usize)> {
        let counts = Store::registrations_by_origin(self);
        counts.into_iter().map(|(kind, count): (OriginKind, usize)| (kind.as_str(), count)).collect()
    }
}

// === impl State ===

impl State {
    /// The read model; reports older than `load_report_max_age` are not shown.
    pub(super) fn view(&self, load_report_max_age: std::time::Duration) -> StateView {
        let registry = &self.registry;
        let remote = self.nodes.remote_load.values().map(|rows| rows.as_slice());
        let nodes = self.nodes.nodes.values().map(|n| n.load.as_slice()).chain(remote);
        let counts: HashMap<_, _> = sum_load(nodes).into_iter().map(|row| ((row.service, row.backend), row)).collect();
        let (reports, _) = super::load::fresh_reports(self, load_report_max_age);
        // Which nodes hold each backend out of rotation after failed connects (passive health).
        let mut failing: HashMap<_, Vec<String>> = HashMap::new();
        let own = self.nodes.nodes.iter().filter(|(_, n)| n.connected).map(|(id, n)| (id.clone(), n.load.as_slice()));
        // Another controller reports its nodes summed.
        let others = self.nodes.remote_load.iter().map(|(id, rows)| (format!("nodes of {id}"), rows.as_slice()));
        for (id, rows) in own.chain(others) {
            for row in rows.iter().filter(|r| r.failing) {
                failing.entry((row.service, row.backend)).or_default().push(id.clone());
            }
        }
        let services = registry
            .services
            .iter()
            .map(|(&key, service)| {
                let backends: Vec<BackendView> = service
                    .backends
                    .iter()
                    .map(|(&address, b)| {
                        let load = counts.get(&(key, address));
                        let reg = registry.registrations.get(&b.owner);
                        BackendView {
                            address,
                            weight: b.weight,
                            healthy: reg.is_some_and(|r| r.healthy),
                            draining: b.draining,
                            active_connections: load.map_or(0, |l| l.active),
                            total_connections: load.map_or(0, |l| l.total),
                            registration: reg.map(|r| r.origin.to_string()).unwrap_or_default(),
                            failing_nodes: failing.get(&(key, address)).cloned().unwrap_or_default(),
                            reported_load: reports.get(&(key, address)).map(|&load| f64::from(load) / 1000.0),
                        }
                    })
                    .collect();
                ServiceView {
                    service: key,
                    algorithm: service.algorithm,
                    proxy_protocol: service.proxy,
                    active_connections: backends.iter().map(|b| b.active_connections).sum(),
                    backends,
                }
            })
            .collect();
        let nodes = self
            .nodes
            .nodes
            .iter()
            .map(|(id, node)| NodeView {
                id: id.clone(),
                connected: node.connected,
                address: node.address,
                embedded: id == EMBEDDED_NODE,
                acked_version: node.acked_version,
                // The embedded node has no link to go quiet: while it is connected, its task runs in this
                // process. It reports only when something changes, so the age of its last report would make
                // an idle balancer look like a stalled node.
                last_seen_ms_ago: if id == EMBEDDED_NODE && node.connected {
                    0
                } else {
                    u64::try_from(node.last_seen.elapsed().as_millis()).unwrap_or(u64::MAX)
                },
                frontends: node
                    .frontends
                    .iter()
                    .map(|(&service, result)| FrontendView::from(&FrontendStatus { service, result: result.clone() }))
                    .collect(),
                controller: None,
            })
            .chain(self.nodes.remote_nodes.iter().map(|(id, node)| {
                NodeView {
                    id: id.clone(),
                    connected: true,
                    address: None,
                    embedded: false,
                    acked_version: node.acked_version,
                    last_seen_ms_ago: 0,
                    frontends: node
                        .frontends
                        .iter()
                        .map(|(&service, result)| {
                            FrontendView::from(&FrontendStatus { service, result: result.clone() })
                        })
                        .collect(),
                    controller: Some(node.controller.clone()),
                }
            }))
            .collect();
        StateView { version: self.version, warming_up: registry.warming_up, services, nodes }
    }
}
