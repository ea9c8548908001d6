//! The etcd key schema of replicas and the JSON values under each key, every mapping written once: what
//! a controller writes is encoded here, and what it reads back is decoded here.
//!
//! Keys, under `--etcd-prefix`:
//! - `backends/SERVICE/ADDRESS/CONTROLLER`: the backend's weight, health, drain and its service's
//!   algorithm, under the holding controller's lease. A controller that dies takes its keys with it when
//!   its lease expires, and the others drop those backends.
//! - `nodes/NODE/CONTROLLER`: the version a node following that controller applied and its bind results,
//!   under the controller's lease; a registration through any controller waits for every node's.
//! - `load/CONTROLLER`: the connections of the nodes following that controller, summed per backend, with
//!   the fresh load reports of its agents, under its lease, written at most once a second and only when
//!   they changed; every controller adds the others' to its nodes' cluster-wide counts (least
//!   connections, power of two, least load) and to its views.
//! - `services/SERVICE` (protocol, port, algorithm, whether an operator chose it) and
//!   `services/SERVICE/ADDRESS` (an operator's weight, a drain): durable, applied by every controller. The
//!   first registration of a service writes its key (if absent); an operator's change on any controller
//!   writes over it. A backend's key, and a service key no operator wrote, are deleted once no controller
//!   has held a backend of theirs for a lease's time (a drain lasts until its registration ends, as with
//!   one controller; an operator's algorithm stays).
//!
//! A value that does not decode is skipped by its reader: a key in the shared store is input like any
//! other.

use std::{collections::BTreeMap, net::SocketAddr};

use contract::{
    convert,
    model::{Algorithm, BackendLoad, ProxyProtocol, ServiceKey},
};
use serde::{Deserialize, Serialize};

use crate::store::{nodes::RemoteNode, shared::SharedBackend};

/// Where the backends controllers hold are.
pub(super) const BACKENDS: &str = "backends/";
/// Where services' and operators' durable choices are.
pub(super) const SERVICES: &str = "services/";
/// Where each controller's summed counts are.
pub(super) const LOAD: &str = "load/";
/// Where the nodes following each controller are.
pub(super) const NODES: &str = "nodes/";

/// The value of a node's key.
#[derive(Debug, Serialize, Deserialize)]
struct NodeValue {
    controller: String,
    acked_version: Option<u64>,
    /// Service (`tcp:80`) to its bound address or the bind error.
    frontends: BTreeMap<String, Result<SocketAddr, String>>,
}

/// One row of a controller's summed counts.
#[derive(Debug, Serialize, Deserialize)]
struct LoadRow {
    service: String,
    backend: SocketAddr,
    active: u64,
    total: u64,
    /// Some node of that controller holds the backend out of rotation (passive health).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    failing: bool,
    /// The load the backend's server reports to that controller (its agent follows it), in thousandths,
    /// while the report is fresh there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reported: Option<u32>,
}

/// The value of a service's key (protocol, port, algorithm) or of one of its backends' (an operator's
/// weight and drain).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct ServiceValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// The algorithm is an operator's choice (not the first registration's).
    #[serde(default)]
    pub operator: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default)]
    pub draining: bool,
}

/// The value of a backend's key.
#[derive(Debug, Serialize, Deserialize)]
struct BackendValue {
    protocol: String,
    port: u16,
    address: SocketAddr,
    weight: u32,
    healthy: bool,
    draining: bool,
    algorithm: String,
    /// The service's PROXY protocol where the backend was registered (absent: off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    send_proxy_v2: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    accept_proxy: bool,
    controller: String,
}

// === backends/ ===

/// The key of `backend` held by `controller`.
pub(super) fn backend_key(backend: &SharedBackend, controller: &str) -> String {
    format!("{BACKENDS}{}/{}/{controller}", backend.service, backend.address)
}

/// The value of `backend`'s key, held by `controller`.
pub(super) fn backend_value(backend: &SharedBackend, controller: &str) -> Vec<u8> {
    let value = BackendValue {
        protocol: backend.service.protocol.as_str().to_owned(),
        port: backend.service.port,
        address: backend.address,
        weight: backend.weight.get(),
        healthy: backend.healthy,
        draining: backend.draining,
        algorithm: backend.algorithm.as_str().to_owned(),
        send_proxy_v2: backend.proxy.send_v2,
        accept_proxy: backend.proxy.accept,
        controller: controller.to_owned(),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// A backend's key's value: the controller holding it and the backend, or why it does not decode.
pub(super) fn parse_backend(value: &[u8]) -> Result<(String, SharedBackend), String> {
    let value: BackendValue = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    let protocol = value.protocol.parse().map_err(|e| format!("{e}"))?;
    if value.port == 0 {
        return Err("port 0".into());
    }
    let backend = SharedBackend {
        service: ServiceKey { protocol, port: value.port },
        address: value.address,
        weight: convert::weight(value.weight).map_err(|e| e.to_string())?,
        healthy: value.healthy,
        draining: value.draining,
        algorithm: convert::algorithm(&value.algorithm).map_err(|e| e.to_string())?,
        proxy: ProxyProtocol { send_v2: value.send_proxy_v2, accept: value.accept_proxy },
    };
    Ok((value.controller, backend))
}

// === nodes/ ===

/// The key of `node` following `controller`.
pub(super) fn node_key(node: &str, controller: &str) -> String {
    format!("{NODES}{node}/{controller}")
}

/// The value of a node's key.
pub(super) fn node_value(controller: &str, node: &RemoteNode) -> Vec<u8> {
    let value = NodeValue {
        controller: controller.to_owned(),
        acked_version: node.acked_version,
        frontends: node.frontends.iter().map(|(service, result)| (service.to_string(), result.clone())).collect(),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// A node's key's value (frontends of services that do not parse are left out).
pub(super) fn parse_node(value: &[u8]) -> Option<RemoteNode> {
    let value = serde_json::from_slice::<NodeValue>(value).ok()?;
    let frontends =
        value.frontends.into_iter().filter_map(|(service, result)| Some((parse_service(&service)?, result))).collect();
    Some(RemoteNode { controller: value.controller, acked_version: value.acked_version, frontends })
}

// === load/ ===

/// The key of `controller`'s counts.
pub(super) fn load_key(controller: &str) -> String {
    format!("{LOAD}{controller}")
}

/// The value of a controller's counts' key.
pub(super) fn load_value(rows: &[BackendLoad]) -> Vec<u8> {
    let rows: Vec<LoadRow> = rows.iter().map(LoadRow::from).collect();
    serde_json::to_vec(&rows).unwrap_or_default()
}

/// A controller's counts' key's value (rows of services that do not parse are left out).
pub(super) fn parse_load(value: &[u8]) -> Option<Vec<BackendLoad>> {
    let rows = serde_json::from_slice::<Vec<LoadRow>>(value).ok()?;
    Some(rows.into_iter().filter_map(LoadRow::into_load).collect())
}

impl From<&BackendLoad> for LoadRow {
    fn from(load: &BackendLoad) -> Self {
        let BackendLoad { service, backend, active, total, failing, reported } = *load;
        LoadRow { service: service.to_string(), backend, active, total, failing, reported }
    }
}

impl LoadRow {
    fn into_load(self) -> Option<BackendLoad> {
        let LoadRow { service, backend, active, total, failing, reported } = self;
        Some(BackendLoad { service: parse_service(&service)?, backend, active, total, failing, reported })
    }
}

// === services/ ===

/// The key of `service`'s durable choices.
pub(super) fn service_key(service: ServiceKey) -> String {
    format!("{SERVICES}{service}")
}

/// The key of an operator's choices for `backend` of `service`.
pub(super) fn service_backend_key(service: ServiceKey, backend: SocketAddr) -> String {
    format!("{SERVICES}{service}/{backend}")
}

/// A service's or a service backend's key's value.
pub(super) fn parse_service_value(value: &[u8]) -> Option<ServiceValue> {
    serde_json::from_slice(value).ok()
}

/// The bytes of a service's or a service backend's key's value.
pub(super) fn service_value_bytes(value: &ServiceValue) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

impl ServiceValue {
    /// This value naming `service` and its `algorithm`, chosen by an operator or not.
    pub(super) fn naming(self, service: ServiceKey, algorithm: Algorithm, operator: bool) -> ServiceValue {
        ServiceValue {
            protocol: Some(service.protocol.as_str().to_owned()),
            port: Some(service.port),
            algorithm: Some(algorithm.as_str().to_owned()),
            operator,
            ..self
        }
    }
}

/// `tcp:80` as a service.
pub(super) fn parse_service(text: &str) -> Option<ServiceKey> {
    let (protocol, port) = text.split_once(':')?;
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    Some(ServiceKey { protocol: protocol.parse().ok()?, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_nodes_round_trip_and_bad_services_are_left_out() {
        let load = BackendLoad {
            service: ServiceKey::udp(53),
            backend: "127.0.0.2:5353".parse().unwrap(),
            active: 4,
            total: 9,
            failing: true,
            reported: Some(250),
        };
        assert_eq!(parse_load(&load_value(std::slice::from_ref(&load))), Some(vec![load]));
        let bad = String::from_utf8(load_value(&[load])).unwrap().replace("udp:53", "udp:0");
        assert_eq!(parse_load(bad.as_bytes()), Some(vec![]));
        assert_eq!(parse_load(b"{not json"), None);
        assert_eq!(load_key("c1"), "load/c1");

        let node = RemoteNode {
            controller: "c1".into(),
            acked_version: Some(7),
            frontends: [(ServiceKey::tcp(80), Ok("127.0.0.1:80".parse().unwrap()))].into(),
        };
        assert_eq!(parse_node(&node_value("c1", &node)), Some(node));
        assert_eq!(node_key("n1", "c1"), "nodes/n1/c1");
        assert_eq!(
            service_backend_key(ServiceKey::tcp(80), "127.0.0.2:80".parse().unwrap()),
            "services/tcp:80/127.0.0.2:80"
        );
    }
}
