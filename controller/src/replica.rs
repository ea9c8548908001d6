//! A controller as one of several replicas on etcd (`--store etcd://`): it publishes the backends its own
//! registrations hold, one key each under its lease, and imports every other controller's, so every node,
//! whichever controller it follows, serves every service.
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
//! The snapshot nodes get is a function of the mirror alone, at its revision: every backend any
//! controller holds (in rotation when healthy and not drained), the operators' choices applied, and the
//! etcd revision as its version. So every controller sends the same version for the same state, and a
//! node that moves to another controller never gets an older one. A registration's reply waits until its
//! key is in etcd, then for every node's bind results at that revision, whichever controller it follows.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use contract::{
    convert,
    model::{Algorithm, BackendSpec, ProxyProtocol, RoutingSnapshot, ServiceKey, ServiceSpec, Weight},
    process::stopped,
};
use etcd_wire::Client;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    etcd::{EtcdConfig, EtcdError, Mirror, OwnedKeys, follow},
    store::{
        Store,
        nodes::RemoteNode,
        shared::{OperatorChange, OperatorChoices, SharedBackend},
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

const BACKENDS: &str = "backends/";
const SERVICES: &str = "services/";
const LOAD: &str = "load/";
const NODES: &str = "nodes/";

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
struct ServiceValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    algorithm: Option<String>,
    /// The algorithm is an operator's choice (not the first registration's).
    #[serde(default)]
    operator: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(default)]
    draining: bool,
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

/// Publishes and imports until `shutdown` turns true, then deletes this controller's keys (a graceful
/// stop need not wait for the lease to expire).
pub async fn run(config: ReplicaConfig, store: Arc<Store>, mut shutdown: watch::Receiver<bool>) {
    let owned = OwnedKeys::new(config.etcd.clone());
    let keeper = tokio::spawn(Arc::clone(&owned).keep());
    let (mirror_tx, mut mirror) = watch::channel(Arc::new(Mirror::default()));
    // Down until the first list: a controller that never reached etcd takes no registration.
    let (down_tx, mut down) = watch::channel(Some("not reached yet".to_owned()));
    let follower = tokio::spawn(follow(config.etcd.clone(), mirror_tx, down_tx));
    let mut local_changes = store.watch_local_changes();
    let mut operator = store.operator_changes();
    let mut unheld: HashMap<String, Instant> = HashMap::new();
    let mut written: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // One connection for the writes, made again only after an error.
    let mut client: Option<Client> = None;
    // This controller's counts, refreshed at most once a second (then written only when they changed).
    let mut load: Option<(Instant, Vec<u8>)> = None;
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    info!(controller = %config.id, endpoints = ?config.etcd.endpoints, prefix = %config.etcd.prefix, "sharing the registry through etcd");
    loop {
        let backends = store.own_backends();
        let mut own: BTreeMap<String, Vec<u8>> =
            backends.iter().map(|b| (key(b, &config.id), value(b, &config.id))).collect();
        for (node, state) in store.own_nodes() {
            own.insert(format!("{NODES}{node}/{}", config.id), node_value(&config.id, &state));
        }
        if load.as_ref().is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(1)) {
            load = Some((Instant::now(), load_value(&store)));
        }
        if let Some((_, rows)) = &load {
            own.insert(format!("{LOAD}{}", config.id), rows.clone());
        }
        if own != written {
            match publish(&config.etcd, &mut client, &owned, &written, &own).await {
                Ok(()) => written = own,
                Err(error) => {
                    client = None;
                    warn!(%error, "cannot publish this controller's keys to etcd; retrying");
                }
            }
        }
        store.set_shared_down(down.borrow_and_update().clone());
        let seen = Arc::clone(&mirror.borrow_and_update());
        // A service etcd has no key for yet: its first backend here writes it (once per service).
        let mut new_services: BTreeMap<ServiceKey, &SharedBackend> = BTreeMap::new();
        for b in backends.iter().filter(|b| !seen.entries.contains_key(&format!("{SERVICES}{}", b.service))) {
            new_services.entry(b.service).or_insert(b);
        }
        for backend in new_services.into_values() {
            if let Err(error) = create_service(&config.etcd, &mut client, backend).await {
                client = None;
                debug!(%error, "cannot write a new service's key; retrying");
            }
        }
        store.import_shared(&imported(&seen, &config.id));
        store.set_remote_load(loads(&seen, &config.id));
        store.set_remote_nodes(nodes(&seen, &config.id));
        let operator_choices = choices(&seen);
        store.apply_operator(&operator_choices);
        if seen.revision > 0 {
            // Per own backend written: the revision at which etcd holds that write (0: not yet).
            let own_revisions = backends
                .iter()
                .filter_map(|b| {
                    let key = key(b, &config.id);
                    let value = written.get(&key)?;
                    let entry = seen.entries.get(&key).filter(|e| e.value == *value);
                    Some(((b.service, b.address), entry.map_or(0, |e| u64::try_from(e.mod_revision).unwrap_or(0))))
                })
                .collect();
            store.publish_shared(snapshot(&seen, &operator_choices), own_revisions);
        }
        if let Err(error) = forget_unheld(&config.etcd, &mut client, &seen, &mut unheld).await {
            client = None;
            debug!(%error, "cannot forget keys no controller holds; retrying");
        }
        tokio::select! {
            changed = local_changes.changed() => if changed.is_err() { break },
            changed = mirror.changed() => if changed.is_err() { break },
            changed = down.changed() => if changed.is_err() { break },
            Some(change) = operator.recv() => {
                let held = Arc::clone(&mirror.borrow());
                if let Err(error) = share_operator(&config.etcd, &mut client, &held, change).await {
                    client = None;
                    warn!(%error, "cannot share an operator's change through etcd");
                }
            }
            _ = retry.tick() => {}
            () = stopped(&mut shutdown) => break,
        }
    }
    follower.abort();
    if let Ok(client) = connected(&config.etcd, &mut client).await {
        for key in written.keys() {
            let _ = owned.delete(client, key).await;
        }
    }
    keeper.abort();
}

/// The connection for writes, made now if there is none.
async fn connected<'a>(etcd: &EtcdConfig, client: &'a mut Option<Client>) -> Result<&'a mut Client, EtcdError> {
    Ok(match client {
        Some(client) => client,
        None => client.insert(etcd.connect().await?),
    })
}

/// The value of a node's key.
fn node_value(controller: &str, node: &RemoteNode) -> Vec<u8> {
    let value = NodeValue {
        controller: controller.to_owned(),
        acked_version: node.acked_version,
        frontends: node.frontends.iter().map(|(service, result)| (service.to_string(), result.clone())).collect(),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The value of this controller's counts' key.
fn load_value(store: &Store) -> Vec<u8> {
    let rows: Vec<LoadRow> = store
        .shared_load()
        .into_iter()
        .map(|r| LoadRow {
            service: r.service.to_string(),
            backend: r.backend,
            active: r.active,
            total: r.total,
            failing: r.failing,
            reported: r.reported,
        })
        .collect();
    serde_json::to_vec(&rows).unwrap_or_default()
}

/// Writes what changed between `written` and `own`.
async fn publish(
    etcd: &EtcdConfig,
    client: &mut Option<Client>,
    owned: &OwnedKeys,
    written: &BTreeMap<String, Vec<u8>>,
    own: &BTreeMap<String, Vec<u8>>,
) -> Result<(), EtcdError> {
    let client = connected(etcd, client).await?;
    for (key, value) in own {
        if written.get(key) != Some(value) {
            owned.put(client, key, value.clone()).await?;
        }
    }
    for key in written.keys().filter(|key| !own.contains_key(*key)) {
        owned.delete(client, key).await?;
    }
    Ok(())
}

/// The routing state at the mirror's revision, the same on every controller: every backend any controller
/// holds (of two holding one, the newer key), in rotation when healthy and not drained, with the
/// operators' choices applied; a service's algorithm is an operator's if one chose, else the one its
/// service key holds (its first registration's), else that of its oldest backend key.
fn snapshot(mirror: &Mirror, operator: &OperatorChoices) -> RoutingSnapshot {
    let mut held: BTreeMap<ServiceKey, BTreeMap<SocketAddr, (i64, SharedBackend)>> = BTreeMap::new();
    for (key, entry) in mirror.entries.range(BACKENDS.to_owned()..) {
        if !key.starts_with(BACKENDS) {
            break;
        }
        let Ok((_, backend)) = parse(&entry.value) else { continue };
        let slot = held.entry(backend.service).or_default().entry(backend.address);
        match slot {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((entry.mod_revision, backend));
            }
            std::collections::btree_map::Entry::Occupied(mut o) if o.get().0 < entry.mod_revision => {
                o.insert((entry.mod_revision, backend));
            }
            std::collections::btree_map::Entry::Occupied(_) => {}
        }
    }
    let services = held
        .into_iter()
        .map(|(key, backends)| {
            let oldest_backend = backends.values().min_by_key(|(revision, _)| *revision).map(|(_, b)| b);
            let oldest = oldest_backend.map(|b| b.algorithm);
            // The PROXY protocol is its first backend's, as the first registration chooses it.
            let proxy = oldest_backend.map(|b| b.proxy).unwrap_or_default();
            let chosen = operator.algorithms.get(&key).or(operator.first.get(&key)).copied();
            let algorithm = chosen.or(oldest).unwrap_or_default();
            let backends = backends
                .into_values()
                .filter_map(|(_, b)| {
                    let (weight, drained) = operator.backends.get(&(key, b.address)).copied().unwrap_or((None, false));
                    (b.healthy && !b.draining && !drained)
                        .then(|| BackendSpec { address: b.address, weight: weight.unwrap_or(b.weight) })
                })
                .collect();
            (key, ServiceSpec { key, algorithm, proxy, backends })
        })
        .collect();
    let version = u64::try_from(routing_revision(mirror)).unwrap_or(0);
    RoutingSnapshot { version, services, warming_up: false, retired: Default::default() }
}

/// The revision of the latest change that can change routing: a backend's or an operator's key written,
/// or any key removed. Counts (`load/`) are written every second and do not make new versions.
fn routing_revision(mirror: &Mirror) -> i64 {
    let routing = mirror.entries.iter().filter(|(key, _)| key.starts_with(BACKENDS) || key.starts_with(SERVICES));
    routing.map(|(_, entry)| entry.mod_revision).max().unwrap_or(0).max(mirror.last_removal)
}

/// Writes a service's key unless one exists: its first registration, on whichever controller, chooses its
/// algorithm.
async fn create_service(
    etcd: &EtcdConfig,
    client: &mut Option<Client>,
    backend: &SharedBackend,
) -> Result<(), EtcdError> {
    let key = format!("{}/{SERVICES}{}", etcd.prefix, backend.service);
    let value = service_value(ServiceValue::default(), backend.service, backend.algorithm, false);
    connected(etcd, client).await?.put_if_absent(key, serde_json::to_vec(&value).unwrap_or_default()).await?;
    Ok(())
}

/// `value` naming `service` and its `algorithm`, chosen by an operator or not.
fn service_value(value: ServiceValue, service: ServiceKey, algorithm: Algorithm, operator: bool) -> ServiceValue {
    ServiceValue {
        protocol: Some(service.protocol.as_str().to_owned()),
        port: Some(service.port),
        algorithm: Some(algorithm.as_str().to_owned()),
        operator,
        ..value
    }
}

/// Writes an operator's change into its durable key, over what the key held.
async fn share_operator(
    etcd: &EtcdConfig,
    client: &mut Option<Client>,
    mirror: &Mirror,
    change: OperatorChange,
) -> Result<(), EtcdError> {
    let key = match change {
        OperatorChange::Algorithm { service, .. } => format!("{SERVICES}{service}"),
        OperatorChange::Drain { service, backend } | OperatorChange::Weight { service, backend, .. } => {
            format!("{SERVICES}{service}/{backend}")
        }
    };
    let held = mirror.entries.get(&key).and_then(|e| serde_json::from_slice::<ServiceValue>(&e.value).ok());
    let mut value = held.unwrap_or_default();
    match change {
        OperatorChange::Algorithm { service, algorithm } => value = service_value(value, service, algorithm, true),
        OperatorChange::Drain { .. } => value.draining = true,
        OperatorChange::Weight { weight, .. } => value.weight = Some(weight.get()),
    }
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    connected(etcd, client).await?.put(format!("{}/{key}", etcd.prefix), bytes, None).await?;
    Ok(())
}

/// Every operator's choice in `mirror`; keys that do not parse are skipped.
fn choices(mirror: &Mirror) -> OperatorChoices {
    let mut choices = OperatorChoices::default();
    for (key, entry) in mirror.entries.range(SERVICES.to_owned()..) {
        let Some(rest) = key.strip_prefix(SERVICES) else { break };
        let Ok(value) = serde_json::from_slice::<ServiceValue>(&entry.value) else { continue };
        let mut parts = rest.splitn(2, '/');
        let Some(service) = parts.next().and_then(service_key) else { continue };
        match parts.next() {
            None => {
                let algorithm = value.algorithm.as_deref().and_then(|a| convert::algorithm(a).ok());
                if let Some(algorithm) = algorithm {
                    if value.operator {
                        choices.algorithms.insert(service, algorithm);
                    } else {
                        choices.first.insert(service, algorithm);
                    }
                }
            }
            Some(backend) => {
                let Ok(backend) = backend.parse::<SocketAddr>() else { continue };
                let weight = value.weight.and_then(|w| Weight::new(u64::from(w)).ok());
                choices.backends.insert((service, backend), (weight, value.draining));
            }
        }
    }
    choices
}

/// The nodes following other controllers in `mirror` (of two keys for one node, moving between
/// controllers, the newer).
fn nodes(mirror: &Mirror, me: &str) -> BTreeMap<String, RemoteNode> {
    let mut found: BTreeMap<String, (i64, RemoteNode)> = BTreeMap::new();
    for (key, entry) in mirror.entries.range(NODES.to_owned()..) {
        let Some(rest) = key.strip_prefix(NODES) else { break };
        let Some((node, controller)) = rest.rsplit_once('/') else { continue };
        if controller == me {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<NodeValue>(&entry.value) else { continue };
        let frontends = value
            .frontends
            .into_iter()
            .filter_map(|(service, result)| Some((service_key(&service)?, result)))
            .collect();
        let remote = RemoteNode { controller: value.controller, acked_version: value.acked_version, frontends };
        if found.get(node).is_none_or(|(revision, _)| *revision < entry.mod_revision) {
            found.insert(node.to_owned(), (entry.mod_revision, remote));
        }
    }
    found.into_iter().map(|(node, (_, remote))| (node, remote)).collect()
}

/// The other controllers' summed counts in `mirror`.
fn loads(mirror: &Mirror, me: &str) -> BTreeMap<String, Vec<contract::model::BackendLoad>> {
    let mut loads = BTreeMap::new();
    for (key, entry) in mirror.entries.range(LOAD.to_owned()..) {
        let Some(controller) = key.strip_prefix(LOAD) else { break };
        if controller == me {
            continue;
        }
        let Ok(rows) = serde_json::from_slice::<Vec<LoadRow>>(&entry.value) else { continue };
        let rows = rows
            .into_iter()
            .filter_map(|r| {
                let service = service_key(&r.service)?;
                Some(contract::model::BackendLoad {
                    service,
                    backend: r.backend,
                    active: r.active,
                    total: r.total,
                    failing: r.failing,
                    reported: r.reported,
                })
            })
            .collect();
        loads.insert(controller.to_owned(), rows);
    }
    loads
}

/// `tcp:80` as a service.
fn service_key(text: &str) -> Option<ServiceKey> {
    let (protocol, port) = text.split_once(':')?;
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    Some(ServiceKey { protocol: protocol.parse().ok()?, port })
}

/// Deletes the operator's choices for backends no controller has held for a lease's time.
async fn forget_unheld(
    etcd: &EtcdConfig,
    client: &mut Option<Client>,
    mirror: &Mirror,
    unheld: &mut HashMap<String, Instant>,
) -> Result<(), EtcdError> {
    // Held: every SERVICE/ADDRESS and every SERVICE some controller's backend key names.
    let mut held: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for rest in mirror.entries.keys().filter_map(|k| k.strip_prefix(BACKENDS)) {
        if let Some((service_and_backend, _)) = rest.rsplit_once('/') {
            held.insert(service_and_backend);
            if let Some((service, _)) = service_and_backend.split_once('/') {
                held.insert(service);
            }
        }
    }
    // Forgettable: the backends' choices, and the service keys no operator wrote.
    let forgettable: Vec<&String> = mirror
        .entries
        .iter()
        .filter(|(k, entry)| {
            k.strip_prefix(SERVICES).is_some_and(|rest| {
                rest.contains('/')
                    || serde_json::from_slice::<ServiceValue>(&entry.value).is_ok_and(|value| !value.operator)
            })
        })
        .map(|(k, _)| k)
        .collect();
    unheld.retain(|key, _| forgettable.contains(&key));
    let now = Instant::now();
    let mut stale = Vec::new();
    for key in forgettable {
        let Some(rest) = key.strip_prefix(SERVICES) else { continue };
        if held.contains(rest) {
            unheld.remove(key);
            continue;
        }
        let since = *unheld.entry(key.clone()).or_insert(now);
        if now.duration_since(since) >= etcd.lease_ttl {
            stale.push(key.clone());
        }
    }
    for key in stale {
        connected(etcd, client).await?.delete(format!("{}/{key}", etcd.prefix)).await?;
        unheld.remove(&key);
        debug!(%key, "a service's or backend's key no controller holds any more: forgotten");
    }
    Ok(())
}

fn key(backend: &SharedBackend, controller: &str) -> String {
    format!("{BACKENDS}{}/{}/{controller}", backend.service, backend.address)
}

fn value(backend: &SharedBackend, controller: &str) -> Vec<u8> {
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

/// The other controllers' backends in `mirror`, newest first (so of two holding one backend, the one that
/// registered it last wins). A value that does not parse is skipped with a warning: a key in the shared
/// store is input like any other.
fn imported(mirror: &Mirror, me: &str) -> Vec<SharedBackend> {
    let mut found: Vec<(i64, SharedBackend)> = mirror
        .entries
        .iter()
        .filter(|(key, _)| key.starts_with(BACKENDS))
        .filter_map(|(key, entry)| {
            let parsed = parse(&entry.value);
            match parsed {
                Ok((controller, _)) if controller == me => None,
                Ok((_, backend)) => Some((entry.mod_revision, backend)),
                Err(why) => {
                    debug!(%key, %why, "skipping a backend key that does not parse");
                    None
                }
            }
        })
        .collect();
    found.sort_by_key(|(revision, _)| std::cmp::Reverse(*revision));
    found.into_iter().map(|(_, backend)| backend).collect()
}

fn parse(value: &[u8]) -> Result<(String, SharedBackend), String> {
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

#[cfg(test)]
mod tests {
    use contract::model::{Algorithm, Weight};

    use super::*;
    use crate::etcd::Entry;

    #[test]
    fn a_backend_key_round_trips_and_bad_values_are_skipped() {
        let backend = SharedBackend {
            service: ServiceKey::tcp(8080),
            address: "127.0.0.2:9000".parse().unwrap(),
            weight: Weight::new(3).unwrap(),
            healthy: true,
            draining: false,
            algorithm: Algorithm::LeastConnections,
            proxy: ProxyProtocol { send_v2: true, accept: false },
        };
        assert_eq!(key(&backend, "c1"), "backends/tcp:8080/127.0.0.2:9000/c1");
        let entry = |value: Vec<u8>, mod_revision| Entry { value, mod_revision, lease: 1 };
        let mut mirror = Mirror::default();
        mirror.entries.insert(key(&backend, "c1"), entry(value(&backend, "c1"), 5));
        mirror.entries.insert(key(&backend, "c2"), entry(value(&backend, "c2"), 7));
        mirror.entries.insert("backends/garbage".into(), entry(b"{not json".to_vec(), 8));
        let bad_weight = String::from_utf8(value(&backend, "c3")).unwrap().replace("\"weight\":3", "\"weight\":0");
        mirror.entries.insert("backends/x/y/c3".into(), entry(bad_weight.into_bytes(), 9));
        // Counts written later make no new version; a removal does.
        let routing = routing_revision(&mirror);
        mirror.entries.insert("load/c2".into(), entry(b"[]".to_vec(), 20));
        mirror.revision = 20;
        assert_eq!(snapshot(&mirror, &OperatorChoices::default()).version, u64::try_from(routing).unwrap());
        mirror.last_removal = 21;
        assert_eq!(routing_revision(&mirror), 21);
        let seen_by_c1 = imported(&mirror, "c1");
        assert_eq!(seen_by_c1, vec![backend.clone()], "only the other controller's, and no bad one");
        assert_eq!(imported(&mirror, "c9").len(), 2);
    }
}
