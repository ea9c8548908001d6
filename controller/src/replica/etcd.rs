//! The etcd side of a replica: one loop that publishes this controller's keys (its backends, its nodes,
//! its counts) under its lease, follows every key of the prefix in a mirror, and feeds the store what it
//! derives from it (the other controllers' backends, nodes and counts, the operators' choices, and the
//! snapshot of each revision); plus the writes of services' first algorithms and operators' changes, and
//! the forgetting of keys no controller holds.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use contract::{model::ServiceKey, process::stopped};
use etcd_wire::Client;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    Etcd, ReplicaConfig,
    codec::{self, BACKENDS, SERVICES, ServiceValue},
    mirror,
};
use crate::{
    etcd::{EtcdConfig, EtcdError, Mirror, OwnedKeys, follow},
    store::{
        Store,
        shared::{OperatorChange, SharedBackend},
    },
};

/// Publishes and imports until `shutdown` turns true, then deletes this controller's keys (a graceful
/// stop need not wait for the lease to expire).
pub async fn run(config: ReplicaConfig, store: Arc<Store>, port: Arc<Etcd>, mut shutdown: watch::Receiver<bool>) {
    let owned = OwnedKeys::new(config.etcd.clone());
    let keeper = tokio::spawn(Arc::clone(&owned).keep());
    let (mirror_tx, mut mirror) = watch::channel(Arc::new(Mirror::default()));
    // Down until the first list: a controller that never reached etcd takes no registration.
    let (down_tx, mut down) = watch::channel(Some("not reached yet".to_owned()));
    let follower = tokio::spawn(follow(config.etcd.clone(), mirror_tx, down_tx));
    let mut local_changes = port.watch_local_changes();
    let mut operator = port.operator_changes();
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
            backends.iter().map(|b| (codec::backend_key(b, &config.id), codec::backend_value(b, &config.id))).collect();
        for (node, state) in store.own_nodes() {
            own.insert(codec::node_key(&node, &config.id), codec::node_value(&config.id, &state));
        }
        if load.as_ref().is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(1)) {
            load = Some((Instant::now(), codec::load_value(&store.shared_load())));
        }
        if let Some((_, rows)) = &load {
            own.insert(codec::load_key(&config.id), rows.clone());
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
        port.set_down(down.borrow_and_update().clone());
        let seen = Arc::clone(&mirror.borrow_and_update());
        // A service etcd has no key for yet: its first backend here writes it (once per service).
        let mut new_services: BTreeMap<ServiceKey, &SharedBackend> = BTreeMap::new();
        for b in backends.iter().filter(|b| !seen.entries.contains_key(&codec::service_key(b.service))) {
            new_services.entry(b.service).or_insert(b);
        }
        for backend in new_services.into_values() {
            if let Err(error) = create_service(&config.etcd, &mut client, backend).await {
                client = None;
                debug!(%error, "cannot write a new service's key; retrying");
            }
        }
        store.import_shared(&mirror::imported(&seen, &config.id));
        store.set_remote_load(mirror::loads(&seen, &config.id));
        store.set_remote_nodes(mirror::nodes(&seen, &config.id));
        let operator_choices = mirror::choices(&seen);
        store.apply_operator(&operator_choices);
        if seen.revision > 0 {
            // Per own backend written: the revision at which etcd holds that write (0: not yet).
            let own_revisions = backends
                .iter()
                .filter_map(|b| {
                    let key = codec::backend_key(b, &config.id);
                    let value = written.get(&key)?;
                    let entry = seen.entries.get(&key).filter(|e| e.value == *value);
                    Some(((b.service, b.address), entry.map_or(0, |e| u64::try_from(e.mod_revision).unwrap_or(0))))
                })
                .collect();
            store.publish(mirror::snapshot(&seen, &operator_choices));
            port.set_revisions(own_revisions);
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

/// Writes a service's key unless one exists: its first registration, on whichever controller, chooses its
/// algorithm.
async fn create_service(
    etcd: &EtcdConfig,
    client: &mut Option<Client>,
    backend: &SharedBackend,
) -> Result<(), EtcdError> {
    let key = format!("{}/{}", etcd.prefix, codec::service_key(backend.service));
    let value = ServiceValue::default().naming(backend.service, backend.algorithm, false);
    connected(etcd, client).await?.put_if_absent(key, codec::service_value_bytes(&value)).await?;
    Ok(())
}

/// Writes an operator's change into its durable key, over what the key held.
async fn share_operator(
    etcd: &EtcdConfig,
    client: &mut Option<Client>,
    mirror: &Mirror,
    change: OperatorChange,
) -> Result<(), EtcdError> {
    let key = match change {
        OperatorChange::Algorithm { service, .. } => codec::service_key(service),
        OperatorChange::Drain { service, backend } | OperatorChange::Weight { service, backend, .. } => {
            codec::service_backend_key(service, backend)
        }
    };
    let held = mirror.entries.get(&key).and_then(|e| codec::parse_service_value(&e.value));
    let mut value = held.unwrap_or_default();
    match change {
        OperatorChange::Algorithm { service, algorithm } => value = value.naming(service, algorithm, true),
        OperatorChange::Drain { .. } => value.draining = true,
        OperatorChange::Weight { weight, .. } => value.weight = Some(weight.get()),
    }
    let bytes = codec::service_value_bytes(&value);
    connected(etcd, client).await?.put(format!("{}/{key}", etcd.prefix), bytes, None).await?;
    Ok(())
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
                rest.contains('/') || codec::parse_service_value(&entry.value).is_some_and(|value| !value.operator)
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
