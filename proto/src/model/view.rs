//! The read model: the controller's state as operators see it (`/api/state`, `Admin.ListServices`,
//! `Admin.ListNodes`, `--print-state`). Its JSON keys are a contract: scripts read them.

use std::{fmt, net::SocketAddr};

use serde::Serialize;

use super::{Algorithm, FrontendStatus, ProxyProtocol, ServiceKey, Weight};

/// The controller's whole state.
#[derive(Debug, Clone, Serialize)]
pub struct StateView {
    /// Version of the snapshot in force.
    pub version: u64,
    /// The controller is in its warm-up window (see `--resync-grace`).
    pub warming_up: bool,
    /// Every service.
    pub services: Vec<ServiceView>,
    /// Every node that ever connected.
    pub nodes: Vec<NodeView>,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    /// Protocol and port (flattened: `protocol`, `port`).
    #[serde(flatten)]
    pub service: ServiceKey,
    /// Balancing algorithm.
    pub algorithm: Algorithm,
    /// PROXY protocol: `send_v2` to backends, `accept` from clients.
    pub proxy_protocol: ProxyProtocol,
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
    pub weight: Weight,
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
    /// The load its server last reported (1.0: fully loaded), while the report is fresh.
    pub reported_load: Option<f64>,
    /// Nodes whose connects to it failed in a row, so they took it out of their rotation (passive health)
    /// until one gets through again. Empty when every node reaches it.
    pub failing_nodes: Vec<String>,
}

/// One node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Its name.
    pub id: String,
    /// False once its stream ended.
    pub connected: bool,
    /// Where its sync stream comes from (none for the embedded node).
    pub address: Option<SocketAddr>,
    /// True for the node that runs inside the controller's own process.
    pub embedded: bool,
    /// Last snapshot version it applied.
    pub acked_version: Option<u64>,
    /// Time since the controller last heard from it: a remote node's last report (an ack, or a change of
    /// its counts, so it grows while nothing changes); 0 for the embedded node while it runs, which is in
    /// the process that answers.
    pub last_seen_ms_ago: u64,
    /// Its frontends at that version.
    pub frontends: Vec<FrontendView>,
    /// With replicas: the other controller it follows (none: this one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
}

/// One frontend of one node, as the controller's and a node's `/api/state` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrontendView {
    /// Protocol and port (flattened: `protocol`, `port`).
    #[serde(flatten)]
    pub service: ServiceKey,
    /// The bound address, when bound.
    pub listening: Option<SocketAddr>,
    /// Why it is not bound.
    pub error: Option<String>,
}

// === impl FrontendView ===

impl From<&FrontendStatus> for FrontendView {
    fn from(status: &FrontendStatus) -> Self {
        FrontendView {
            service: status.service,
            listening: status.result.as_ref().ok().copied(),
            error: status.result.as_ref().err().cloned(),
        }
    }
}

impl From<&FrontendView> for FrontendStatus {
    fn from(view: &FrontendView) -> Self {
        let result = view.listening.ok_or_else(|| view.error.clone().unwrap_or_default());
        FrontendStatus { service: view.service, result }
    }
}

// === impl StateView ===

impl fmt::Display for StateView {
    /// The table `--print-state` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let warm = if self.warming_up { " (warming up)" } else { "" };
        writeln!(f, "=== routing state v{}{warm}: {} service(s) ===", self.version, self.services.len())?;
        for s in &self.services {
            writeln!(f, "{} {} ({} backend(s))", s.service, s.algorithm, s.backends.len())?;
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

    #[test]
    fn json_keys_stay_flat() {
        let view = FrontendView { service: ServiceKey::udp(53), listening: None, error: Some("bind: denied".into()) };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"protocol": "udp", "port": 53, "listening": null, "error": "bind: denied"})
        );
    }
}
