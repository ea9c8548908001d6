//! Controllers as replicas on etcd: the link to real etcd members, in process (a mirror of the prefix
//! followed through compactions and outages; owned keys kept under a lease, granted anew when it is lost).

use std::{sync::Arc, time::Duration};

use controller::etcd::{EtcdConfig, Mirror, OwnedKeys, follow};
use etcd_wire::{Client, CompactionOptions, GetOptions};
use switchboard_tests::{etcd::EtcdCluster, harness::DEADLINE};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

fn config(cluster: &EtcdCluster, ttl: Duration) -> EtcdConfig {
    EtcdConfig { endpoints: cluster.endpoints(), prefix: "/switchboard-test".into(), lease_ttl: ttl }
}

/// A follower into a fresh channel starting from `start`, and the record of every state it published.
struct Follower {
    rx: watch::Receiver<Arc<Mirror>>,
    task: JoinHandle<()>,
    recorder: JoinHandle<Vec<Arc<Mirror>>>,
}

impl Follower {
    /// Stops following; every state published meanwhile.
    async fn stop(self) -> Vec<Arc<Mirror>> {
        self.task.abort();
        drop(self.rx);
        self.recorder.await.unwrap()
    }
}

fn spawn_follower(config: &EtcdConfig, start: Mirror) -> Follower {
    let (tx, rx) = watch::channel(Arc::new(start));
    let task = tokio::spawn(follow(config.clone(), tx, watch::Sender::new(None)));
    let mut seen = rx.clone();
    let recorder = tokio::spawn(async move {
        let mut states = vec![Arc::clone(&seen.borrow_and_update())];
        while seen.changed().await.is_ok() {
            states.push(Arc::clone(&seen.borrow_and_update()));
            if states.len() > 10_000 {
                break;
            }
        }
        states
    });
    Follower { rx, task, recorder }
}

async fn wait_mirror(rx: &mut watch::Receiver<Arc<Mirror>>, what: &str, pred: impl Fn(&Mirror) -> bool) -> Arc<Mirror> {
    let found = match tokio::time::timeout(DEADLINE, rx.wait_for(|m| pred(m))).await {
        Ok(Ok(mirror)) => Some(Arc::clone(&mirror)),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("the mirror never showed {what}: {:#?}", rx.borrow()))
}

fn value(mirror: &Mirror, key: &str) -> Option<String> {
    mirror.entries.get(key).map(|e| String::from_utf8_lossy(&e.value).into_owned())
}

#[tokio::test]
async fn after_a_compaction_the_mirror_lists_again_without_a_spurious_removal() {
    if !EtcdCluster::available() {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let config = config(&cluster, Duration::from_secs(3));
    let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
    client.put("/switchboard-test/a", "1", None).await.unwrap();
    client.put("/switchboard-test/b", "2", None).await.unwrap();
    client.put("/elsewhere/x", "not ours", None).await.unwrap();

    let mut first = spawn_follower(&config, Mirror::default());
    let held = wait_mirror(&mut first.rx, "a and b", |m| m.entries.len() == 2).await;
    first.stop().await;

    // While nobody follows: changes, then the history they are in is compacted away.
    client.put("/switchboard-test/c", "3", None).await.unwrap();
    client.delete("/switchboard-test/b").await.unwrap();
    let latest = client.put("/switchboard-test/a", "1 again", None).await.unwrap();
    let revision = latest.revision();
    client.compact(revision, Some(CompactionOptions::new().with_physical())).await.unwrap();

    // Resuming from the held state: the watch's history is gone, so it lists again and diffs.
    let mut resumed = spawn_follower(&config, Mirror::clone(&held));
    let now = wait_mirror(&mut resumed.rx, "the state after the compaction", |m| m.revision >= revision).await;
    assert_eq!(value(&now, "a").as_deref(), Some("1 again"));
    assert_eq!(value(&now, "c").as_deref(), Some("3"));
    assert_eq!(value(&now, "b"), None);
    assert!(!now.entries.keys().any(|k| k.contains("elsewhere")), "only the prefix is mirrored");
    let states = resumed.stop().await;
    for pair in states.windows(2) {
        assert!(pair[1].revision >= pair[0].revision, "the revision went back");
    }
    assert!(states.iter().all(|s| s.entries.contains_key("a")), "a key that never left was removed on the way");
}

#[tokio::test]
async fn owned_keys_come_back_under_a_new_lease_and_vanish_after_the_ttl_once_released() {
    if !EtcdCluster::available() {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let ttl = Duration::from_secs(2);
    let config = config(&cluster, ttl);
    let owned = OwnedKeys::new(config.clone());
    let keeper = tokio::spawn(Arc::clone(&owned).keep());
    let mut client = config.connect().await.unwrap();
    owned.put(&mut client, "owned/x", b"here".to_vec()).await.unwrap();
    let lease_of = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            let got = client.get("/switchboard-test/owned/x", None).await.unwrap();
            got.kvs.first().map(|kv| kv.lease)
        }
    };
    let first = lease_of(&mut client).await.expect("the owned key");
    assert_eq!(first, owned.lease());

    // The lease is lost (revoked behind the controller's back): the key goes, then comes back.
    client.lease_revoke(first).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(lease) = lease_of(&mut client).await
            && lease != first
        {
            break;
        }
        assert!(Instant::now() < deadline, "the owned key was never written again under a new lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Released (the controller is gone): no more keep-alives, and the key expires with its lease.
    drop(owned);
    keeper.abort();
    let released = Instant::now();
    while lease_of(&mut client).await.is_some() {
        assert!(released.elapsed() < ttl + Duration::from_secs(2), "the key outlived its lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_lease_lost_while_its_member_was_down_is_granted_anew_when_the_member_returns() {
    if !EtcdCluster::available() {
        return;
    }
    // The owner reaches member 0 only; the test, members 1 and 2 (a quorum without member 0).
    let mut cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints();
    let config = EtcdConfig { endpoints: vec![endpoints[0].clone()], ..config(&cluster, Duration::from_secs(3)) };
    let owned = OwnedKeys::new(config.clone());
    let keeper = tokio::spawn(Arc::clone(&owned).keep());
    owned.put(&mut config.connect().await.unwrap(), "owned/x", b"here".to_vec()).await.unwrap();
    let mut client = Client::connect(&endpoints[1..], None).await.unwrap();
    let lease_of = |client: &mut Client| {
        let mut client = client.clone();
        async move { client.get("/switchboard-test/owned/x", None).await.unwrap().kvs.first().map(|kv| kv.lease) }
    };
    let first = lease_of(&mut client).await.expect("the owned key");

    // Member 0 dies, breaking the keep-alive stream; the lease is lost meanwhile (revoked through the
    // others), so the owner meets a lease etcd no longer has when member 0 returns.
    cluster.kill(0).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        // Member 0 may have led: requests time out until the others elect a leader. A revocation that
        // timed out but went through says "lease not found" when asked again.
        match client.lease_revoke(first).await {
            Ok(_) => break,
            Err(error) if error.to_string().contains("lease not found") => break,
            Err(error) => assert!(Instant::now() < deadline, "the lease was never revoked: {error}"),
        }
    }
    assert_eq!(lease_of(&mut client).await, None, "the key went with its lease");
    cluster.restart(0).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(lease) = lease_of(&mut client).await {
            assert_ne!(lease, first);
            assert_eq!(lease, owned.lease(), "the key is under the owner's new lease");
            break;
        }
        assert!(Instant::now() < deadline, "the owned key was never written again under a new lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    keeper.abort();
}

#[tokio::test]
async fn the_mirror_survives_a_lost_member_and_a_whole_outage_without_losing_state() {
    if !EtcdCluster::available() {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let config = config(&cluster, Duration::from_secs(3));
    let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
    client.put("/switchboard-test/kept", "1", None).await.unwrap();
    let mut follower = spawn_follower(&config, Mirror::default());
    let rx = &mut follower.rx;
    wait_mirror(rx, "the first key", |m| m.entries.contains_key("kept")).await;

    // One member dies: writes and the mirror go on.
    cluster.kill(0).await;
    let mut put = None;
    let deadline = Instant::now() + DEADLINE;
    while put.is_none() {
        put = client.put("/switchboard-test/during", "2", None).await.ok();
        assert!(Instant::now() < deadline, "no write succeeded with one member of three down");
    }
    wait_mirror(rx, "a write made with one member down", |m| m.entries.contains_key("during")).await;

    // Every member stops: the mirror keeps what it had (nothing published empty), then catches up.
    cluster.kill(1).await;
    cluster.kill(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.borrow().entries.len(), 2, "the mirror lost state while etcd was down");
    cluster.restart_all().await;
    let mut client = Client::connect(cluster.endpoints(), None).await.unwrap();
    client.put("/switchboard-test/after", "3", None).await.unwrap();
    let now = wait_mirror(rx, "a write after the outage", |m| m.entries.contains_key("after")).await;
    assert_eq!(now.entries.len(), 3);
    let all = client.get("/switchboard-test/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(all.kvs.len(), 3);
    let states = follower.stop().await;
    assert!(states.iter().skip(1).all(|s| s.entries.contains_key("kept")), "a kept key was removed on the way");
    for pair in states.windows(2) {
        assert!(pair[1].revision >= pair[0].revision, "the revision went back");
    }
}
