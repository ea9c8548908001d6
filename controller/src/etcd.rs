//! The link to etcd for controllers run as replicas (`--store etcd://HOST:PORT[,...]`): a local
//! [`Mirror`] of every key under the prefix, followed the way Kubernetes' reflectors follow theirs, and
//! the keys this controller owns, kept under its [`OwnedKeys`] lease.
//!
//! - **Following**: list the prefix, then watch from the next revision. A watch that ends, is cancelled or
//!   compacted, or a connection that drops, is followed by a new list, diffed against the mirror held; a
//!   list that fails publishes nothing, so consumers never see an empty or older state because etcd was
//!   unreachable; a list that comes back empty over a mirror that held keys is taken only when a second
//!   list agrees. A revision never goes backwards.
//! - **Owning**: keys written with the controller's lease vanish when it dies (after the TTL). Keep-alives
//!   run on their own task every third of the TTL; a lease that is lost anyway (expired during an etcd
//!   outage, revoked) is granted again and every owned key written again under the new one.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use contract::backoff::Backoff;
use etcd_wire::{
    Client, ConnectOptions, GetOptions, PutOptions, WatchOptions, WatchStream, etcdserverpb::WatchResponse,
    mvccpb::event::EventType,
};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{info, warn};

/// How a controller reaches etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// Every key of the cluster starts with this (`--etcd-prefix`), then `/`.
    pub prefix: String,
    /// Time-to-live of the controller's lease; keep-alives go every third of it.
    pub lease_ttl: Duration,
}

/// What can go wrong with etcd.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// etcd did not answer or refused.
    #[error("etcd: {0}")]
    Unavailable(#[from] etcd_wire::Error),
    /// A watch ended in a way the follower handles by listing again.
    #[error("the watch ended: {0}")]
    WatchEnded(String),
}

/// One key's value and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// The lease it lives under (0: none).
    pub lease: i64,
}

/// Every key under the prefix (without the prefix), at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirror {
    /// The etcd revision this state is at.
    pub revision: i64,
    /// Key (after the prefix and its `/`) to entry.
    pub entries: BTreeMap<String, Entry>,
    /// Revision of the latest removal of any key (a removal leaves no entry to carry its revision).
    pub last_removal: i64,
}

// === impl EtcdConfig ===

impl EtcdConfig {
    /// A client of the members, with short timeouts: a controller must notice an outage, not hang on it.
    pub async fn connect(&self) -> Result<Client, EtcdError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        Ok(Client::connect(&self.endpoints, Some(options)).await?)
    }

    fn key(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    fn strip<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(&self.prefix)?.strip_prefix('/')
    }
}

// === impl Mirror ===

impl Mirror {
    /// Applies one watch response's events (at most one revision's worth, in order).
    fn apply(&mut self, config: &EtcdConfig, response: &WatchResponse) {
        for event in &response.events {
            let Some(kv) = &event.kv else { continue };
            let Some(key) = config.strip(&kv.key) else { continue };
            match event.r#type() {
                EventType::Put => {
                    let entry = Entry { value: kv.value.clone(), mod_revision: kv.mod_revision, lease: kv.lease };
                    self.entries.insert(key.to_owned(), entry);
                }
                EventType::Delete => {
                    self.entries.remove(key);
                    self.last_removal = self.last_removal.max(kv.mod_revision);
                }
            }
        }
        self.revision = self.revision.max(response.revision());
    }
}

/// Lists the whole prefix: the state at the list's revision.
pub async fn list(client: &mut Client, config: &EtcdConfig) -> Result<Mirror, EtcdError> {
    let response = client.get(config.key(""), Some(GetOptions::new().with_prefix())).await?;
    let revision = response.revision();
    let entries = response
        .kvs
        .into_iter()
        .filter_map(|kv| {
            let key = config.strip(&kv.key)?.to_owned();
            Some((key, Entry { value: kv.value, mod_revision: kv.mod_revision, lease: kv.lease }))
        })
        .collect();
    Ok(Mirror { revision, entries, last_removal: 0 })
}

/// Follows the prefix into `mirror` until every receiver is gone, starting from the state `mirror` holds
/// (a fresh one lists first; one kept from before resumes its watch after its revision, and lists again if
/// etcd compacted that history meanwhile). Never returns on etcd errors: it retries with backoff, keeping
/// the last state published.
///
/// `down` says whether etcd can be reached now (`None`) or why not: it turns `Some` when a connection,
/// list or watch fails, and `None` again once a list or watch succeeds.
pub async fn follow(config: EtcdConfig, mirror: watch::Sender<Arc<Mirror>>, down: watch::Sender<Option<String>>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut listed = mirror.borrow().revision > 0;
    loop {
        if mirror.is_closed() {
            return;
        }
        match follow_once(&config, &mirror, &mut listed, &down).await {
            Ok(()) => return,
            Err(error) => {
                if !matches!(error, EtcdError::WatchEnded(_)) {
                    down.send_replace(Some(error.to_string()));
                }
                let delay = backoff.next_delay();
                warn!(%error, retry_in = ?delay, "following etcd: listing again after a pause");
                tokio::time::sleep(delay).await;
                listed = false;
            }
        }
        // Each new connection that worked resets the pause.
        if listed {
            backoff.reset();
        }
    }
}

async fn follow_once(
    config: &EtcdConfig,
    mirror: &watch::Sender<Arc<Mirror>>,
    listed: &mut bool,
    down: &watch::Sender<Option<String>>,
) -> Result<(), EtcdError> {
    let mut client = config.connect().await?;
    if !*listed {
        let mut fresh = list(&mut client, config).await?;
        // A list that comes back empty when the mirror held keys is taken only when a second list, a
        // moment later, agrees: a member restored from nothing, or a prefix wiped by mistake, must not
        // empty every node at once.
        if fresh.entries.is_empty() && !mirror.borrow().entries.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            fresh = list(&mut client, config).await?;
            if fresh.entries.is_empty() {
                warn!(revision = fresh.revision, "etcd lists nothing under the prefix twice: taking the empty state");
            }
        }
        // Keys gone since the state held were removed at some revision up to the list's.
        let held = mirror.borrow();
        fresh.last_removal = if held.entries.keys().any(|k| !fresh.entries.contains_key(k)) {
            fresh.revision
        } else {
            held.last_removal
        };
        drop(held);
        publish(mirror, fresh);
        *listed = true;
    }
    let reachable = |down: &watch::Sender<Option<String>>| down.send_if_modified(|d| d.take().is_some());
    let start = mirror.borrow().revision + 1;
    let options = WatchOptions::new().with_prefix().with_start_revision(start).with_progress_notify();
    let mut stream: WatchStream = client.watch(config.key(""), Some(options)).await?;
    loop {
        // A watch that breaks after a good list is no outage yet: the next list (from another member,
        // maybe) says whether etcd can be reached.
        let response = tokio::select! {
            response = stream.message() => response.map_err(|e| EtcdError::WatchEnded(e.to_string()))?,
            () = mirror.closed() => return Ok(()),
        };
        let Some(response) = response else { return Err(EtcdError::WatchEnded("the stream ended".into())) };
        if response.compact_revision > 0 {
            *listed = false;
            info!(compacted = response.compact_revision, "etcd compacted the history this watch needed: listing again");
            return Err(EtcdError::WatchEnded(format!("compacted at revision {}", response.compact_revision)));
        }
        if response.canceled {
            *listed = false;
            return Err(EtcdError::WatchEnded(format!("cancelled: {}", response.cancel_reason)));
        }
        reachable(down);
        if response.created && response.events.is_empty() {
            continue;
        }
        let mut next = Mirror::clone(&mirror.borrow());
        next.apply(config, &response);
        publish(mirror, next);
    }
}

/// Publishes `next` unless it is older than what is published (a list answered by a lagging member).
fn publish(mirror: &watch::Sender<Arc<Mirror>>, next: Mirror) {
    mirror.send_if_modified(|current| {
        if next.revision < current.revision || (next.revision == current.revision && next == **current) {
            return false;
        }
        *current = Arc::new(next);
        true
    });
}

/// The keys this controller owns, under its lease: written again whenever the lease had to be granted anew.
#[derive(Debug)]
pub struct OwnedKeys {
    config: EtcdConfig,
    keys: Mutex<BTreeMap<String, Vec<u8>>>,
    lease: watch::Sender<i64>,
}

impl OwnedKeys {
    /// No keys yet, no lease yet: [`OwnedKeys::keep`] grants it.
    pub fn new(config: EtcdConfig) -> Arc<Self> {
        Arc::new(OwnedKeys { config, keys: Mutex::default(), lease: watch::Sender::new(0) })
    }

    /// The lease now (0 before the first grant).
    pub fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// Writes `key` (after the prefix) under the lease, and remembers it for a new lease.
    pub async fn put(&self, client: &mut Client, key: &str, value: Vec<u8>) -> Result<i64, EtcdError> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_owned(), value.clone());
        let lease = self.granted().await;
        let response = client.put(self.config.key(key), value, Some(PutOptions::new().with_lease(lease))).await?;
        Ok(response.revision())
    }

    /// Deletes `key` and forgets it.
    pub async fn delete(&self, client: &mut Client, key: &str) -> Result<i64, EtcdError> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        let response = client.delete(self.config.key(key)).await?;
        Ok(response.revision())
    }

    async fn granted(&self) -> i64 {
        let mut lease = self.lease.subscribe();
        lease.wait_for(|id| *id != 0).await.map_or(0, |id| *id)
    }

    /// Holds the lease until every handle is dropped: grants it, keeps it alive every third of the TTL, and
    /// when it is lost anyway grants a new one and writes every owned key again under it.
    pub async fn keep(self: Arc<Self>) {
        let ttl = i64::try_from(self.config.lease_ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let every = self.config.lease_ttl / 3;
        let mut backoff = Backoff::new(Duration::from_millis(50), every.max(Duration::from_millis(100)));
        // The lease held, while etcd has not said it is gone: a broken keep-alive stream (a member died)
        // keeps it, and the next connection (to another member) goes on keeping it alive.
        let mut held: Option<i64> = None;
        loop {
            if Arc::strong_count(&self) == 1 {
                return;
            }
            let attempt = async {
                let mut client = self.config.connect().await?;
                let lease = match held {
                    Some(lease) => lease,
                    None => {
                        let lease = client.lease_grant(ttl).await?.id;
                        self.rewrite(&mut client, lease).await?;
                        self.lease.send_replace(lease);
                        held = Some(lease);
                        info!(lease, ?every, "etcd lease granted");
                        lease
                    }
                };
                let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
                loop {
                    keeper.keep_alive().await?;
                    match answers.message().await? {
                        Some(answer) if answer.ttl > 0 => backoff.reset(),
                        _ => {
                            held = None;
                            return Err::<(), EtcdError>(EtcdError::WatchEnded(format!("lease {lease} expired")));
                        }
                    }
                    tokio::time::sleep(every).await;
                    if Arc::strong_count(&self) == 1 {
                        return Ok(());
                    }
                }
            };
            if let Err(error) = attempt.await {
                let delay = backoff.next_delay();
                match held {
                    Some(lease) => {
                        warn!(%error, lease, retry_in = ?delay, "etcd lease keep-alive broke: keeping it alive through another connection")
                    }
                    None => {
                        warn!(%error, retry_in = ?delay, "etcd lease lost: granting a new one and writing the owned keys again")
                    }
                }
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Writes every owned key under `lease`.
    async fn rewrite(&self, client: &mut Client, lease: i64) -> Result<(), EtcdError> {
        let keys: Vec<(String, Vec<u8>)> =
            self.keys.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (key, value) in keys {
            client.put(self.config.key(&key), value, Some(PutOptions::new().with_lease(lease))).await?;
        }
        Ok(())
    }
}
