use std::{net::SocketAddr, time::Duration};

use contract::model::{
    Algorithm, BackendLoad, BackendSpec, EventKind, FrontendAddresses, FrontendStatus, InvalidWeight, NodeReport,
    ServiceAsk, ServiceKey, Weight,
};

use super::{changes::Registered, registry::Registry, *};

mod owners;

fn store() -> Arc<Store> {
    let policy = Policy {
        allowed_ports: "1-9000".parse().unwrap(),
        own_listeners: vec!["127.0.0.1:8080".parse().unwrap()],
        frontend_ip: Some("127.0.0.1".parse().unwrap()),
        limits: RegistryLimits::default(),
        load_report_max_age: Duration::from_secs(10),
        settings_need_authority: false,
        node_forget_after: Duration::from_secs(600),
    };
    Store::new(policy, false)
}

fn requester(registration: Option<&Registration>, credential: Credential, peer: &str) -> Requester {
    Requester { registration: registration.map(|r| r.id), credential, peer: peer.parse().unwrap() }
}

fn origin(ip: &str) -> Origin {
    Origin::json(format!("{ip}:40000").parse().unwrap())
}

fn backend(addr: &str) -> BackendSpec {
    BackendSpec { address: addr.parse().unwrap(), weight: Weight::MIN }
}

#[test]
fn every_change_bumps_the_version_and_publishes_a_snapshot() {
    let store = store();
    let rx = store.subscribe();
    let a = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let r1 = store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    assert_eq!(r1, Registered { version: 1, created: true, overruled: None });
    // The same registration again changes nothing: no new version.
    assert_eq!(
        store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap().version,
        1
    );
    let b = store.open_registration(origin("127.0.0.3"), Credential::Anonymous).unwrap();
    assert_eq!(
        store.register(b.id, ServiceKey::tcp(80), backend("127.0.0.3:80"), ServiceAsk::default()).unwrap().version,
        2
    );
    let snapshot = rx.borrow().clone();
    assert_eq!(snapshot.version, 2);
    assert_eq!(snapshot.services[&ServiceKey::tcp(80)].backends.len(), 2);

    drop(a);
    assert_eq!(store.snapshot().version, 3);
    assert_eq!(store.snapshot().services[&ServiceKey::tcp(80)].backends, vec![backend("127.0.0.3:80")]);
    drop(b);
    assert_eq!(store.snapshot().version, 4);
    assert!(store.snapshot().services.is_empty(), "the last backend takes its service along");
}

#[test]
fn ports_outside_the_policy_are_refused_without_a_new_version() {
    let store = store();
    let a = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let err =
        store.register(a.id, ServiceKey::tcp(9001), backend("127.0.0.2:9001"), ServiceAsk::default()).unwrap_err();
    assert_eq!(err.to_string(), "port 9001 is outside the allowed ports 1-9000");
    let err =
        store.register(a.id, ServiceKey::udp(8080), backend("127.0.0.2:8080"), ServiceAsk::default()).unwrap_err();
    assert_eq!(err, StoreError::ReservedPort { port: 8080 });
    assert_eq!(store.snapshot().version, 0);
    assert!(!a.has_backends());
}

#[test]
fn a_backend_registered_again_moves_to_the_new_registration() {
    let store = store();
    let old = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let new = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    store.register(old.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    let again = store.register(new.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    assert!(!again.created);
    drop(old);
    assert_eq!(store.snapshot().services[&ServiceKey::tcp(80)].backends.len(), 1, "the old channel owns nothing");
    drop(new);
    assert!(store.snapshot().services.is_empty());
}

#[test]
fn unhealthy_backends_stay_registered_out_of_rotation() {
    let store = store();
    let a = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    a.set_healthy(false).unwrap();
    let snapshot = store.snapshot();
    assert!(snapshot.services[&ServiceKey::tcp(80)].backends.is_empty(), "the frontend stays, empty");
    assert!(!store.view().services[0].backends[0].healthy);
    a.set_healthy(true).unwrap();
    assert_eq!(store.snapshot().services[&ServiceKey::tcp(80)].backends.len(), 1);
    assert_eq!(store.snapshot().version, 3);
}

#[test]
fn warm_up_snapshots_retire_removed_services_and_versions_jump_above_known_ones() {
    let store = store();
    store.begin_warm_up().unwrap();
    assert!(store.snapshot().warming_up);
    let a = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    drop(a);
    assert_eq!(store.snapshot().retired, [ServiceKey::tcp(80)].into());
    let b = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    store.register(b.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    assert!(store.snapshot().retired.is_empty(), "re-registered: no longer retired");

    store.observe_version(500).unwrap();
    assert_eq!(store.snapshot().version, 501);
    store.observe_version(20).unwrap();
    assert_eq!(store.snapshot().version, 501, "an older version changes nothing");
    store.end_warm_up().unwrap();
    let last = store.snapshot();
    assert_eq!((last.version, last.warming_up), (502, false));
    assert_eq!(last.services.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn register_waits_for_bind_results_and_rolls_back_when_every_node_failed() {
    let store = store();
    let reg = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    // No node at all: success with a note.
    let reply = reg
        .register(ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default(), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(reply.success && reply.message.unwrap().contains("no data-plane node"));

    let node_a = Arc::new(store.connect_node("a", None, None).unwrap());
    let node_b = Arc::new(store.connect_node("b", None, None).unwrap());
    let report = |store: Arc<Store>, node: Arc<NodeLink>, result: Result<SocketAddr, String>| async move {
        let mut rx = store.subscribe();
        let version = rx.wait_for(|s| s.services.contains_key(&ServiceKey::tcp(81))).await.unwrap().version;
        node.report(NodeReport::Applied {
            version,
            frontends: vec![FrontendStatus { service: ServiceKey::tcp(81), result }],
        });
    };
    let a =
        tokio::spawn(report(Arc::clone(&store), Arc::clone(&node_a), Err("bind 0.0.0.0:81: Address in use".into())));
    let b =
        tokio::spawn(report(Arc::clone(&store), Arc::clone(&node_b), Err("bind 0.0.0.0:81: Permission denied".into())));
    let reply = reg
        .register(ServiceKey::tcp(81), backend("127.0.0.2:81"), ServiceAsk::default(), Duration::from_secs(2))
        .await
        .unwrap();
    a.await.unwrap();
    b.await.unwrap();
    assert!(!reply.success);
    let why = reply.message.unwrap();
    assert!(why.contains("node a: bind 0.0.0.0:81: Address in use"), "{why}");
    assert!(why.contains("node b: bind 0.0.0.0:81: Permission denied"), "{why}");
    assert!(!store.snapshot().services.contains_key(&ServiceKey::tcp(81)), "rolled back");

    // One node that never answers: failure after the timeout, naming it. Node b left: it is listed as
    // disconnected and no longer asked.
    drop(node_b);
    assert!(!store.view().nodes[1].connected);
    let reply = reg
        .register(ServiceKey::tcp(82), backend("127.0.0.2:82"), ServiceAsk::default(), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(reply.message.as_deref(), Some("node a: no bind result in time"));

    // One node listens, another fails: success, naming the failing node.
    let node_c = Arc::new(store.connect_node("c", None, None).unwrap());
    let a = tokio::spawn(report(Arc::clone(&store), Arc::clone(&node_a), Ok("0.0.0.0:81".parse().unwrap())));
    let c = tokio::spawn(report(Arc::clone(&store), Arc::clone(&node_c), Err("bind 0.0.0.0:81: in use".into())));
    let reply = reg
        .register(ServiceKey::tcp(81), backend("127.0.0.2:81"), ServiceAsk::default(), Duration::from_secs(2))
        .await
        .unwrap();
    a.await.unwrap();
    c.await.unwrap();
    assert!(reply.success);
    assert_eq!(reply.message.as_deref(), Some("node c: bind 0.0.0.0:81: in use"));
    drop(node_a);
}

#[test]
fn drain_and_weight_changes_are_versioned_events() {
    let store = store();
    let mut events = store.watch_events();
    let a = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let addr: SocketAddr = "127.0.0.2:80".parse().unwrap();
    store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    assert_eq!(events.try_recv().unwrap().kind, EventKind::ServiceAdded);
    assert_eq!(events.try_recv().unwrap().kind, EventKind::BackendRegistered);

    // A weight of 0 cannot even be asked for: the type refuses it.
    assert_eq!(Weight::new(0), Err(InvalidWeight(0)));
    let v = store.set_weight(ServiceKey::tcp(80), addr, Weight::new(5).unwrap()).unwrap();
    assert_eq!(store.snapshot().services[&ServiceKey::tcp(80)].backends[0].weight.get(), 5);
    let event = events.try_recv().unwrap();
    assert_eq!((event.kind, event.version, event.detail.as_str()), (EventKind::WeightChanged, v, "1 -> 5"));

    store.drain_backend(ServiceKey::tcp(80), addr).unwrap();
    assert!(store.snapshot().services[&ServiceKey::tcp(80)].backends.is_empty(), "out of rotation");
    assert!(store.view().services[0].backends[0].draining, "still listed");
    assert_eq!(events.try_recv().unwrap().kind, EventKind::BackendDraining);
    let missing = store.drain_backend(ServiceKey::tcp(81), addr).unwrap_err();
    assert!(matches!(missing, StoreError::NotFound { .. }));

    drop(a);
    assert_eq!(events.try_recv().unwrap().kind, EventKind::BackendRemoved);
    assert_eq!(events.try_recv().unwrap().kind, EventKind::ServiceRemoved);
}

#[test]
fn the_first_registration_chooses_the_algorithm_until_an_operator_does() {
    let store = store();
    let a = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let b = store.open_registration(origin("127.0.0.3"), Credential::Anonymous).unwrap();
    let key = ServiceKey::tcp(80);
    store.register(a.id, key, backend("127.0.0.2:80"), ServiceAsk::algorithm(Algorithm::LeastConnections)).unwrap();
    assert_eq!(store.snapshot().services[&key].algorithm, Algorithm::LeastConnections);
    let refused =
        store.register(b.id, key, backend("127.0.0.3:80"), ServiceAsk::algorithm(Algorithm::Random)).unwrap_err();
    assert!(refused.to_string().contains("uses least_connections"), "{refused}");
    // Agreeing, or not asking, is fine.
    store.register(b.id, key, backend("127.0.0.3:80"), ServiceAsk::default()).unwrap();
    // After the operator's choice, a registration asking for the old one is let in, overruled.
    store.set_algorithm(key, Algorithm::PowerOfTwo).unwrap();
    let c = store.open_registration(origin("127.0.0.4"), Credential::Anonymous).unwrap();
    let again =
        store.register(c.id, key, backend("127.0.0.4:80"), ServiceAsk::algorithm(Algorithm::LeastConnections)).unwrap();
    assert_eq!(again.overruled, Some((Algorithm::LeastConnections, Algorithm::PowerOfTwo)));
    assert_eq!(store.snapshot().services[&key].algorithm, Algorithm::PowerOfTwo);
}

#[tokio::test]
async fn a_node_connecting_again_replaces_its_older_link() {
    let store = store();
    let mut first = store.connect_node("n1", None, None).unwrap();
    first.report(NodeReport::Applied { version: 9, frontends: Vec::new() });
    assert_eq!(store.view().nodes[0].acked_version, Some(9));
    let second = store.connect_node("n1", None, None).unwrap();
    tokio::time::timeout(Duration::from_secs(1), first.replaced()).await.expect("the older link is told");
    first.report(NodeReport::Applied { version: 10, frontends: Vec::new() });
    assert_eq!(store.view().nodes[0].acked_version, None, "the older link no longer reports");
    drop(first);
    assert!(store.view().nodes[0].connected, "the older link's end does not disconnect the newer one");
    drop(second);
    assert!(!store.view().nodes[0].connected);
    let new = store.connect_node("n1", None, None).unwrap();
    assert_eq!(store.view().nodes[0].acked_version, None, "a new link starts with no ack");
    new.report(NodeReport::Load(vec![BackendLoad {
        service: ServiceKey::tcp(80),
        backend: "127.0.0.2:80".parse().unwrap(),
        active: 3,
        total: 4,
        failing: false,
        reported: None,
    }]));
    drop(new);
    let view = store.view();
    assert!(!view.nodes[0].connected);
    assert!(view.services.is_empty());
}

#[test]
fn a_change_that_breaks_an_invariant_is_refused_and_never_published() {
    let store = store();
    let mut snapshots = store.subscribe();
    let a = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    snapshots.borrow_and_update();
    let before = store.snapshot();

    // A change with a bug in it: it drops the backend but leaves its service behind, empty.
    let mut state = store.lock();
    let mut draft: Registry = state.registry.clone();
    draft.services.get_mut(&ServiceKey::tcp(80)).unwrap().backends.clear();
    let refused = store.commit(&mut state, draft).unwrap_err();
    drop(state);
    assert_eq!(refused, StoreError::Invariant("service tcp:80 has no backend".into()));
    assert_eq!(
        refused.to_string(),
        "internal error: the change would break a store invariant (service tcp:80 has no backend); nothing changed"
    );
    assert!(!snapshots.has_changed().unwrap(), "nothing published");
    assert_eq!(store.snapshot(), before);
    assert_eq!(store.view().services[0].backends.len(), 1, "the registry is as it was");

    // A backend owned by no registration is refused the same way, and the store goes on working.
    let mut state = store.lock();
    let mut draft: Registry = state.registry.clone();
    draft.registrations.clear();
    assert!(
        matches!(store.commit(&mut state, draft), Err(StoreError::Invariant(why)) if why.contains("no owning registration"))
    );
    drop(state);
    assert_eq!(store.drain_backend(ServiceKey::tcp(80), "127.0.0.2:80".parse().unwrap()), Ok(before.version + 1));
}

#[test]
fn a_backend_may_not_be_the_balancer_itself() {
    let store = store();
    let a = store.open_registration(origin("127.0.0.1"), Credential::Anonymous).unwrap();
    // The controller's own JSON listener behind a public frontend would relay into the control plane.
    let own = store.register(a.id, ServiceKey::tcp(81), backend("127.0.0.1:8080"), ServiceAsk::default()).unwrap_err();
    assert_eq!(own.to_string(), "backend 127.0.0.1:8080 is one of the balancer's own listeners");
    // The embedded node's frontend of the same service: every connection would come back to itself.
    let looped = store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.1:80"), ServiceAsk::default()).unwrap_err();
    assert_eq!(looped, StoreError::Loop { service: ServiceKey::tcp(80), backend: "127.0.0.1:80".parse().unwrap() });
    // A remote node that says nothing of its frontends is judged by the address its link comes from.
    let _node = store.connect_node("n1", Some("127.0.0.9:40000".parse().unwrap()), None).unwrap();
    let looped = store.register(a.id, ServiceKey::udp(53), backend("127.0.0.9:53"), ServiceAsk::default()).unwrap_err();
    assert!(matches!(looped, StoreError::Loop { .. }), "{looped}");
    // One that says where its frontends listen is judged by that, not by its link's address.
    let on = |ip: &str| Some(FrontendAddresses { addresses: vec![ip.parse().unwrap()], wildcard: false });
    let _n2 = store.connect_node("n2", Some("127.0.0.1:40001".parse().unwrap()), on("127.0.0.12")).unwrap();
    let looped = store.register(a.id, ServiceKey::udp(53), backend("127.0.0.12:53"), ServiceAsk::default());
    assert!(matches!(looped, Err(StoreError::Loop { .. })), "{looped:?}");
    // A wildcard node: its host's addresses and every loopback address reach it.
    let wildcard = Some(FrontendAddresses { addresses: vec!["10.1.2.3".parse().unwrap()], wildcard: true });
    let n3 = store.connect_node("n3", Some("127.0.0.13:40001".parse().unwrap()), wildcard).unwrap();
    for looped in ["10.1.2.3:53", "127.0.0.77:53"] {
        let refused = store.register(a.id, ServiceKey::udp(53), backend(looped), ServiceAsk::default());
        assert!(matches!(refused, Err(StoreError::Loop { .. })), "{looped}: {refused:?}");
    }
    assert_eq!(store.snapshot().version, 0, "nothing was registered");
    store.register(a.id, ServiceKey::udp(53), backend("10.1.2.4:53"), ServiceAsk::default()).unwrap();
    drop(n3);
    // Another address on the same host, or the same address on a port no frontend uses, is a backend like
    // any other.
    store.register(a.id, ServiceKey::tcp(80), backend("127.0.0.2:80"), ServiceAsk::default()).unwrap();
    store.register(a.id, ServiceKey::tcp(82), backend("127.0.0.1:85"), ServiceAsk::default()).unwrap();
}

#[test]
fn the_loop_check_sees_through_other_spellings_and_other_services() {
    let store = store();
    let a = store.open_registration(origin("127.0.0.1"), Credential::Anonymous).unwrap();
    let refused = |service: ServiceKey, backend: &str| {
        store.register(a.id, service, self::backend(backend), ServiceAsk::default()).is_err()
    };
    assert!(refused(ServiceKey::tcp(81), "0.0.0.0:8080"), "0.0.0.0 reaches this host");
    assert!(refused(ServiceKey::tcp(81), "[::ffff:127.0.0.1]:8080"), "a mapped address is the same address");
    assert!(refused(ServiceKey::tcp(81), "224.0.0.1:81"), "multicast is no one host");
    assert!(refused(ServiceKey::tcp(81), "255.255.255.255:81"), "nor is broadcast");
    assert!(refused(ServiceKey::tcp(81), "0.1.2.3:81"), "nor this network");
    assert!(refused(ServiceKey::tcp(81), "240.0.0.1:81"), "nor the reserved block");
    assert!(refused(ServiceKey::tcp(81), "[ff02::1]:81"), "nor IPv6 multicast");
    store.register(a.id, ServiceKey::tcp(90), backend("127.0.0.2:90"), ServiceAsk::default()).unwrap();
    // tcp:91 -> the frontend of tcp:90 -> ... would chain into the balancer.
    let chained =
        store.register(a.id, ServiceKey::tcp(91), backend("127.0.0.1:90"), ServiceAsk::default()).unwrap_err();
    assert_eq!(chained, StoreError::Loop { service: ServiceKey::tcp(90), backend: "127.0.0.1:90".parse().unwrap() });
    // Another protocol's port is another socket.
    store.register(a.id, ServiceKey::udp(92), backend("127.0.0.1:90"), ServiceAsk::default()).unwrap();
}

#[test]
fn each_node_sees_the_others_counts_summed_and_a_node_that_leaves_drops_out() {
    let store = store();
    let row = |backend: &str, active| BackendLoad {
        service: ServiceKey::tcp(80),
        backend: backend.parse().unwrap(),
        active,
        total: active * 10,
        failing: false,
        reported: None,
    };
    let a = store.connect_node("a", None, None).unwrap();
    let b = store.connect_node("b", None, None).unwrap();
    let c = store.connect_node("c", None, None).unwrap();
    a.report(NodeReport::Load(vec![row("127.0.0.2:80", 1), row("127.0.0.9:80", 5)]));
    b.report(NodeReport::Load(vec![row("127.0.0.2:80", 2)]));
    // A row with nothing open elsewhere is not listed: no row means no connection.
    c.report(NodeReport::Load(vec![row("127.0.0.2:80", 4), row("127.0.0.3:80", 8), row("127.0.0.4:80", 0)]));

    // A row only `a` reports is not in its own view; shared rows are the others' sum.
    assert_eq!(store.cluster_load_excluding("a"), vec![row("127.0.0.2:80", 6), row("127.0.0.3:80", 8)]);
    assert_eq!(
        store.cluster_load_excluding("b"),
        vec![row("127.0.0.2:80", 5), row("127.0.0.3:80", 8), row("127.0.0.9:80", 5)]
    );
    let generation = store.load_generation();
    assert_eq!(store.load_generation(), generation, "reading views changes nothing");

    drop(c);
    assert_ne!(store.load_generation(), generation, "a node leaving moves the generation");
    assert_eq!(store.cluster_load_excluding("a"), vec![row("127.0.0.2:80", 2)]);
    b.report(NodeReport::Load(vec![row("127.0.0.2:80", 3)]));
    assert_eq!(store.cluster_load_excluding("a"), vec![row("127.0.0.2:80", 3)]);
    assert_eq!(store.cluster_load_excluding("b"), vec![row("127.0.0.2:80", 1), row("127.0.0.9:80", 5)]);
}

#[test]
fn a_load_of_static_backends_is_one_version_and_a_reload_is_the_diff() {
    use std::collections::BTreeMap;

    use statics::{StaticBackend, StaticSpec};

    let spec = |algorithm, backends: &[(&str, u64, Option<bool>)]| StaticSpec {
        algorithm,
        proxy: contract::model::ProxyProtocol::default(),
        backends: backends
            .iter()
            .map(|&(a, w, health)| (a.parse().unwrap(), StaticBackend { weight: Weight::new(w).unwrap(), health }))
            .collect(),
    };
    let store = store();
    let web = ServiceKey::tcp(443);
    let dns = ServiceKey::udp(53);
    let first = BTreeMap::from([
        (
            web,
            spec(Algorithm::LeastConnections, &[("127.0.0.2:8443", 1, Some(true)), ("127.0.0.3:8443", 2, Some(false))]),
        ),
        (dns, spec(Algorithm::SourceHash, &[("127.0.0.2:5353", 1, Some(true))])),
    ]);
    let diff = store.apply_static(&first).unwrap();
    assert_eq!((diff.version, diff.added.len(), diff.removed.len()), (1, 3, 0));
    let snapshot = store.snapshot();
    assert_eq!(snapshot.version, 1, "three backends in two services, one version");
    assert_eq!(snapshot.services[&web].algorithm, Algorithm::LeastConnections);
    assert_eq!(snapshot.services[&web].backends, vec![backend("127.0.0.2:8443")], "a failing first check is out");
    assert_eq!(store.apply_static(&first).unwrap(), statics::StaticDiff { version: 1, ..Default::default() });

    // A server registers to the static service beside them; the controller's check brings one back.
    let a = store.open_registration(origin("127.0.0.4"), Credential::Anonymous).unwrap();
    store.register(a.id, web, backend("127.0.0.4:8443"), ServiceAsk::default()).unwrap();
    store.set_static_healthy(web, "127.0.0.3:8443".parse().unwrap(), true).unwrap();
    assert_eq!(store.snapshot().services[&web].backends.len(), 3);
    let version = store.snapshot().version;

    // Reload: one backend goes, one comes, one changes weight; the UDP service goes; the registered one stays.
    let second = BTreeMap::from([(
        web,
        spec(Algorithm::LeastConnections, &[("127.0.0.3:8443", 5, None), ("127.0.0.5:8443", 1, Some(true))]),
    )]);
    let diff = store.apply_static(&second).unwrap();
    assert_eq!(diff.version, version + 1, "the whole diff is one version");
    assert_eq!(diff.added, vec![(web, "127.0.0.5:8443".parse().unwrap())]);
    assert_eq!(diff.changed, vec![(web, "127.0.0.3:8443".parse().unwrap())]);
    assert_eq!(diff.removed.len(), 2);
    let snapshot = store.snapshot();
    assert!(!snapshot.services.contains_key(&dns));
    let addresses: Vec<String> = snapshot.services[&web].backends.iter().map(|b| b.address.to_string()).collect();
    assert_eq!(addresses, ["127.0.0.3:8443", "127.0.0.4:8443", "127.0.0.5:8443"]);
    assert_eq!(snapshot.services[&web].backends[0].weight.get(), 5, "kept its verdict, took its new weight");

    // A load the policy refuses changes nothing.
    let refused = BTreeMap::from([(ServiceKey::tcp(9999), spec(Algorithm::RoundRobin, &[("127.0.0.2:1", 1, None)]))]);
    assert!(store.apply_static(&refused).is_err());
    assert_eq!(store.snapshot().version, version + 1);
    // The registration's backend is untouched by loads, and the file's are not the registration's.
    drop(a);
    assert_eq!(store.snapshot().services[&web].backends.len(), 2);
}

#[tokio::test]
async fn load_reports_reach_nodes_with_the_counts_and_age_out() {
    let policy = Policy {
        allowed_ports: "1-9000".parse().unwrap(),
        limits: RegistryLimits::default(),
        load_report_max_age: Duration::from_millis(200),
        ..Policy::default()
    };
    let store = Store::new(policy, false);
    let reg = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    let key = ServiceKey::tcp(80);
    store.register(reg.id, key, backend("127.0.0.2:80"), ServiceAsk::algorithm(Algorithm::LeastLoad)).unwrap();
    let link = store.connect_node("n1", None, None).unwrap();
    assert!(store.cluster_load_excluding("n1").is_empty(), "nothing reported, nothing sent");
    let version = store.snapshot().version;
    reg.report_load(900);
    let rows = store.cluster_load_excluding("n1");
    assert_eq!((rows.len(), rows[0].reported, rows[0].active), (1, Some(900), 0));
    assert_eq!(store.view().services[0].backends[0].reported_load, Some(0.9));
    assert_eq!(store.snapshot().version, version, "a report is no version");
    let mut feed = link.cluster_load();
    assert_eq!(feed.changed().await[0].reported, Some(900));
    // Reports stop: the row goes once the last one is older than the max age.
    assert!(tokio::time::timeout(Duration::from_secs(5), feed.changed()).await.unwrap().is_empty());
    assert_eq!(store.view().services[0].backends[0].reported_load, None);
}

#[test]
fn another_controllers_load_reports_reach_this_ones_nodes_and_are_never_shared_back() {
    let store = store();
    let key = ServiceKey::tcp(80);
    let (mine, theirs) = (backend("127.0.0.2:80"), backend("127.0.0.3:80"));
    let reg = store.open_registration(origin("127.0.0.2"), Credential::Anonymous).unwrap();
    store.register(reg.id, key, mine, ServiceAsk::algorithm(Algorithm::LeastLoad)).unwrap();
    let other = store.open_registration(origin("127.0.0.3"), Credential::Anonymous).unwrap();
    store.register(other.id, key, theirs, ServiceAsk::algorithm(Algorithm::LeastLoad)).unwrap();
    let _link = store.connect_node("n1", None, None).unwrap();
    reg.report_load(300);
    // Controller c2 holds the agent of the other backend: its report comes with its counts.
    let row = |address: SocketAddr, reported| BackendLoad {
        service: key,
        backend: address,
        active: 0,
        total: 0,
        failing: false,
        reported,
    };
    store.set_remote_load(std::collections::BTreeMap::from([("c2".to_owned(), vec![row(theirs.address, Some(800))])]));
    let reported: Vec<_> = store.cluster_load_excluding("n1").iter().map(|r| (r.backend, r.reported)).collect();
    assert_eq!(reported, [(mine.address, Some(300)), (theirs.address, Some(800))]);
    let view: Vec<_> = store.view().services[0].backends.iter().map(|b| b.reported_load).collect();
    assert_eq!(view, [Some(0.3), Some(0.8)]);
    // What this controller shares is its own report only: c2's would come back to it as if fresh.
    let shared: Vec<_> = store.shared_load().iter().map(|r| (r.backend, r.reported)).collect();
    assert_eq!(shared, [(mine.address, Some(300))]);
    // c2's report stops (aged out there, or c2 gone): it is gone here too.
    store.set_remote_load(std::collections::BTreeMap::from([("c2".to_owned(), vec![row(theirs.address, None)])]));
    let reported: Vec<_> = store.cluster_load_excluding("n1").iter().map(|r| (r.backend, r.reported)).collect();
    assert_eq!(reported, [(mine.address, Some(300))]);
}
