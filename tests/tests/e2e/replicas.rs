//! Controllers as replicas on etcd: several controller processes on real etcd members, their nodes and
//! agents (the link itself, in process, is in `replicas_etcd`).

use std::time::Duration;

use contract::v1::{self, BackendRef, DrainBackendRequest, SetAlgorithmRequest, admin_client::AdminClient};
use etcd_wire::{Client, CompactionOptions};
use switchboard_tests::{
    etcd::EtcdCluster,
    harness::{
        Controller, DEADLINE, DataplaneNode, Host, JsonClient, Net, RoundTrips, TcpEcho, spawn_agent, tcp_roundtrip,
    },
};
use tokio::time::Instant;

/// Three controllers on `cluster`, without embedded nodes, named a, b and c.
async fn three_controllers(net: Net, cluster: &EtcdCluster, ttl: &str) -> Vec<Controller> {
    let store = cluster.store_flag();
    let mut controllers = Vec::new();
    for id in ["a", "b", "c"] {
        let args = ["--store", &store, "--controller-id", id, "--etcd-lease-ttl", ttl, "--no-embedded-dataplane"];
        controllers.push(Controller::spawn(net, &args).await);
    }
    controllers
}

/// Waits until `node` has a frontend open for each of `ports`.
async fn wait_serving(node: &DataplaneNode, ports: &[u16]) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let state = node.state().await;
        let open = |port: u16| {
            state["frontends"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["port"] == port && !f["listening"].is_null()))
        };
        if ports.iter().all(|&p| open(p)) {
            return;
        }
        assert!(Instant::now() < deadline, "node {} never served {ports:?}: {state:#}", node.id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Registers a TCP backend at `ip`:`port` over the JSON channel of `ctl`, again until the controller takes
/// it (a controller refuses registrations until it reaches etcd); the connection holds the registration.
async fn register_when_taken(ctl: &Controller, ip: std::net::IpAddr, port: u16) -> JsonClient {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut server = JsonClient::connect(ctl, ip).await;
        let reply = server.register("tcp", port).await;
        if reply["ack"] == "successful" {
            return server;
        }
        assert!(Instant::now() < deadline, "the registration was never taken: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn agent_args<'a>(controllers: &'a str, port: &'a str, ip: &'a str) -> Vec<&'a str> {
    vec!["--controller", controllers, "--protocol", "tcp", "--port", port, "--backend-address", ip, "--check", "none"]
}

#[tokio::test]
async fn three_controllers_on_etcd_every_node_serves_every_service_and_a_dead_controller_is_replaced() {
    if !EtcdCluster::available() {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let net = Net::new();
    let mut controllers = three_controllers(net, &cluster, "3s").await;
    let urls: Vec<String> = controllers.iter().map(Controller::grpc_url).collect();
    let forward = urls.join(",");
    let backward = urls.iter().rev().cloned().collect::<Vec<_>>().join(",");
    let n1 =
        DataplaneNode::spawn(Host::Root, &controllers[0], "n1", net.host(9), net.host(9), &["--controller", &forward])
            .await;
    let n2 = DataplaneNode::spawn(
        Host::Root,
        &controllers[2],
        "n2",
        net.host(10),
        net.host(10),
        &["--controller", &backward],
    )
    .await;

    // Two servers, each registered through a different controller by its agent (a first, then b).
    let echo1 = TcpEcho::start(net.host(2), 0).await;
    let echo2 = TcpEcho::start(net.host(3), 0).await;
    let (p1, p2) = (echo1.addr.port().to_string(), echo2.addr.port().to_string());
    let (ip1, ip2) = (net.host(2).to_string(), net.host(3).to_string());
    let _agent1 = spawn_agent(&controllers[0], &agent_args(&forward, &p1, &ip1)).await;
    let order_b = format!("{},{},{}", urls[1], urls[2], urls[0]);
    let _agent2 = spawn_agent(&controllers[1], &agent_args(&order_b, &p2, &ip2)).await;

    let ports = [echo1.addr.port(), echo2.addr.port()];
    for node in [&n1, &n2] {
        wait_serving(node, &ports).await;
        for port in ports {
            assert_eq!(tcp_roundtrip(node.frontend(port), b"x").await.unwrap(), b"x", "{} port {port}", node.id);
        }
    }
    for ctl in &controllers {
        ctl.wait_state("both backends", |s| ports.iter().all(|&p| Controller::backends(s, "tcp", p).len() == 1)).await;
    }

    // SIGKILL controller a, which n1 follows and agent1 registered through, while a client drives n1.
    let frontend = n1.frontend(echo1.addr.port());
    let load = RoundTrips::start(frontend, 6_000, Duration::from_secs(30));
    let mut etcd = Client::connect(cluster.endpoints(), None).await.unwrap();
    let a_key = format!("/switchboard/v1/backends/tcp:{}/{}/a", echo1.addr.port(), echo1.addr);
    assert_eq!(etcd.get(a_key.as_str(), None).await.unwrap().kvs.len(), 1, "a published its backend");
    let version_before = n1.state().await["version"].as_u64().unwrap();
    controllers[0].process.kill().await;
    let killed = Instant::now();
    let mut last = version_before;
    let moved = loop {
        let state = n1.state().await;
        let version = state["version"].as_u64().unwrap();
        assert!(version >= last, "n1's version went back from {last} to {version}");
        last = version;
        if state["connected"] == true && state["controller"] != urls[0] {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < DEADLINE, "n1 never followed another controller: {state:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(moved < Duration::from_secs(2), "n1 took {moved:?} to follow another controller");
    // a's key goes with its lease (TTL 3 s), and agent1 re-registers through b.
    while !etcd.get(a_key.as_str(), None).await.unwrap().kvs.is_empty() {
        assert!(killed.elapsed() < Duration::from_secs(3 + 1), "a's registration outlived its lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b_key = format!("/switchboard/v1/backends/tcp:{}/{}/b", echo1.addr.port(), echo1.addr);
    while etcd.get(b_key.as_str(), None).await.unwrap().kvs.is_empty() {
        assert!(killed.elapsed() < DEADLINE, "agent1 never re-registered through b");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.wait_more(50).await;
    let (sent, failed) = load.stop().await;
    assert_eq!(failed, 0, "{failed} of {sent} client round trips failed");
    assert!(n1.state().await["version"].as_u64().unwrap() >= last, "n1's version went back");
    for node in [&n1, &n2] {
        for port in ports {
            assert_eq!(tcp_roundtrip(node.frontend(port), b"y").await.unwrap(), b"y", "{} port {port}", node.id);
        }
    }

    // One etcd member of three dies: clients and registrations notice nothing.
    let mut cluster = cluster;
    cluster.kill(0).await;
    for _ in 0..50 {
        assert_eq!(tcp_roundtrip(n2.frontend(echo2.addr.port()), b"z").await.unwrap(), b"z");
    }
    // The two members left have a leader (an election, if the dead one led): registrations go on.
    cluster.wait_healthy(1).await;
    let echo3 = TcpEcho::start(net.host(4), 0).await;
    let _server = register_when_taken(&controllers[2], net.host(4), echo3.addr.port()).await;
    wait_serving(&n1, &[echo3.addr.port()]).await;
    assert_eq!(tcp_roundtrip(n1.frontend(echo3.addr.port()), b"w").await.unwrap(), b"w");
}

#[tokio::test]
async fn with_etcd_down_nodes_serve_on_and_changes_are_refused_until_it_returns() {
    if !EtcdCluster::available() {
        return;
    }
    let mut cluster = EtcdCluster::start(1).await;
    let net = Net::new();
    let controllers = three_controllers(net, &cluster, "3s").await;
    let urls: Vec<String> = controllers.iter().map(Controller::grpc_url).collect();
    let node = DataplaneNode::spawn(
        Host::Root,
        &controllers[0],
        "n1",
        net.host(9),
        net.host(9),
        &["--controller", &urls.join(",")],
    )
    .await;
    let echo = TcpEcho::start(net.host(2), 0).await;
    // Through b, which no node follows: taken (once b has reached etcd), and served by the node that
    // follows a.
    let server = register_when_taken(&controllers[1], net.host(2), echo.addr.port()).await;
    wait_serving(&node, &[echo.addr.port()]).await;

    cluster.kill(0).await;
    // Registrations are refused, saying why; what is registered stays served.
    let other = TcpEcho::start(net.host(3), 0).await;
    let mut late = JsonClient::connect(&controllers[2], net.host(3)).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = late.register("tcp", other.addr.port()).await;
        if reply["ack"] == "failed" {
            let msg = reply["msg"].as_str().unwrap_or_default();
            assert!(msg.contains("store unavailable"), "{reply}");
            break;
        }
        // Accepted before the controller noticed the outage: take it back and try again.
        assert!(Instant::now() < deadline, "registrations were still taken with etcd down: {reply}");
        late = JsonClient::connect(&controllers[2], net.host(3)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..20 {
        assert_eq!(tcp_roundtrip(node.frontend(echo.addr.port()), b"x").await.unwrap(), b"x");
    }

    // etcd returns: registrations are taken again, and every controller has what was registered before.
    cluster.restart_all().await;
    late = register_when_taken(&controllers[2], net.host(3), other.addr.port()).await;
    let ports = [echo.addr.port(), other.addr.port()];
    for ctl in &controllers {
        ctl.wait_state("both backends", |s| ports.iter().all(|&p| Controller::backends(s, "tcp", p).len() == 1)).await;
    }
    wait_serving(&node, &ports).await;
    // Versions are etcd's revisions: every controller, and the node, end on the same one.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut versions = Vec::new();
        for ctl in &controllers {
            versions.push(ctl.state().await["version"].as_u64().unwrap());
        }
        versions.push(node.state().await["version"].as_u64().unwrap());
        if versions.iter().all(|&v| v == versions[0] && v > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "the versions never converged: {versions:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((server, late));
}

/// A one-member etcd, controllers a, b and c on it (3 s leases), n1 following a and n2 following b.
struct TwoNodes {
    cluster: EtcdCluster,
    net: Net,
    controllers: Vec<Controller>,
    n1: DataplaneNode,
    n2: DataplaneNode,
}

impl TwoNodes {
    async fn start() -> TwoNodes {
        let cluster = EtcdCluster::start(1).await;
        let net = Net::new();
        let controllers = three_controllers(net, &cluster, "3s").await;
        let n1 = DataplaneNode::spawn(Host::Root, &controllers[0], "n1", net.host(9), net.host(9), &[]).await;
        let n2 = DataplaneNode::spawn(Host::Root, &controllers[1], "n2", net.host(10), net.host(10), &[]).await;
        TwoNodes { cluster, net, controllers, n1, n2 }
    }
}

/// The addresses in rotation for `port` on `node`, and its algorithm.
async fn node_rotation(node: &DataplaneNode, port: u16) -> (Vec<String>, String) {
    let state = node.state().await;
    let service = state["services"].as_array().and_then(|s| s.iter().find(|s| s["key"]["port"] == port).cloned());
    let Some(service) = service else { return (Vec::new(), String::new()) };
    let mut backends: Vec<String> =
        service["backends"].as_array().unwrap().iter().map(|b| b["addr"].as_str().unwrap().to_owned()).collect();
    backends.sort();
    (backends, service["algorithm"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn an_operator_change_made_on_one_controller_reaches_every_node() {
    if !EtcdCluster::available() {
        return;
    }
    let TwoNodes { cluster, net, controllers, n1, n2 } = TwoNodes::start().await;
    let (a, b) = (&controllers[0], &controllers[1]);
    let echo1 = TcpEcho::start(net.host(2), 0).await;
    let port = echo1.addr.port();
    let echo2 = TcpEcho::start(net.host(3), port).await;
    let _s1 = register_when_taken(a, net.host(2), port).await;
    let _s2 = register_when_taken(b, net.host(3), port).await;
    let both = {
        let mut both = vec![echo1.addr.to_string(), echo2.addr.to_string()];
        both.sort();
        both
    };
    let deadline = Instant::now() + DEADLINE;
    for node in [&n1, &n2] {
        while node_rotation(node, port).await.0 != both {
            assert!(
                Instant::now() < deadline,
                "{} never had both backends: {:?}",
                node.id,
                node_rotation(node, port).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // On b: drain the backend a holds, and change the algorithm.
    let mut admin = AdminClient::connect(b.grpc_url()).await.unwrap();
    let service = Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: port.into() });
    let target = BackendRef { service, backend: echo1.addr.to_string() };
    admin.drain_backend(DrainBackendRequest { backend: Some(target) }).await.unwrap();
    admin.set_algorithm(SetAlgorithmRequest { service, algorithm: "least_connections".into() }).await.unwrap();
    let wanted = (vec![echo2.addr.to_string()], "least_connections".to_owned());
    for node in [&n1, &n2] {
        while node_rotation(node, port).await != wanted {
            assert!(
                Instant::now() < deadline + DEADLINE,
                "{} never saw the drain: {:?}",
                node.id,
                node_rotation(node, port).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The service is a durable key, holding the operator's algorithm.
    let mut etcd = Client::connect(cluster.endpoints(), None).await.unwrap();
    let key = format!("/switchboard/v1/services/tcp:{port}");
    let got = etcd.get(key.as_str(), None).await.unwrap();
    let value: serde_json::Value = serde_json::from_slice(&got.kvs[0].value).unwrap();
    assert_eq!((value["protocol"].as_str(), value["port"].as_u64()), (Some("tcp"), Some(u64::from(port))));
    assert_eq!((value["algorithm"].as_str(), value["operator"].as_bool()), (Some("least_connections"), Some(true)));
    assert_eq!(got.kvs[0].lease, 0, "a service's key is durable");
    for ctl in &controllers {
        let state = ctl
            .wait_state("the drain", |s| Controller::backends(s, "tcp", port).iter().any(|b| b["draining"] == true))
            .await;
        let drained: Vec<_> =
            Controller::backends(&state, "tcp", port).into_iter().filter(|b| b["draining"] == true).collect();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0]["address"], echo1.addr.to_string());
    }
}

#[tokio::test]
async fn connection_counts_are_cluster_wide_across_controllers() {
    if !EtcdCluster::available() {
        return;
    }
    let TwoNodes { cluster: _cluster, net, controllers, n1, n2 } = TwoNodes::start().await;
    let (a, b) = (&controllers[0], &controllers[1]);
    let echo = TcpEcho::start(net.host(2), 0).await;
    let port = echo.addr.port();
    let _server = register_when_taken(a, net.host(2), port).await;
    wait_serving(&n1, &[port]).await;
    wait_serving(&n2, &[port]).await;

    // Three connections held open through n1, which follows a.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(n1.frontend(port)).await.unwrap());
    }
    let active = |state: &serde_json::Value| {
        Controller::backends(state, "tcp", port).first().and_then(|b| b["active_connections"].as_u64())
    };
    // b, which n1 does not follow, counts them (a's sum, through etcd) ...
    b.wait_state("a's three connections", |s| active(s) == Some(3)).await;
    // ... and so does n2's cluster view, for least connections.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let state = n2.state().await;
        let remote = state["backends"].as_array().and_then(|rows| {
            rows.iter().find(|r| r["backend"] == echo.addr.to_string()).and_then(|r| r["remote_connections"].as_u64())
        });
        if remote == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "n2 never counted n1's connections: {state:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    b.wait_state("the connections closed", |s| active(s) == Some(0)).await;
}

#[tokio::test]
async fn load_reports_reach_the_nodes_of_every_controller() {
    if !EtcdCluster::available() {
        return;
    }
    let TwoNodes { cluster: _cluster, net, controllers, n1: _n1, n2: _n2 } = TwoNodes::start().await;
    let (a, b) = (&controllers[0], &controllers[1]);
    let echo = TcpEcho::start(net.host(2), 0).await;
    let (port, ip, url) = (echo.addr.port().to_string(), net.host(2).to_string(), a.grpc_url());
    let mut args = agent_args(&url, &port, &ip);
    args.extend([
        "--algorithm",
        "least_load",
        "--report-load",
        "--load-command",
        "echo 0.7",
        "--check-interval",
        "200ms",
    ]);
    let _agent = spawn_agent(a, &args).await;
    let reported = |state: &serde_json::Value| {
        Controller::backends(state, "tcp", echo.addr.port()).first().and_then(|b| b["reported_load"].as_f64())
    };
    // b, which the agent does not follow, has a's report through etcd; its node n2 gets it with the
    // counts (the store's tests check those rows).
    b.wait_state("a's load report", |s| reported(s) == Some(0.7)).await;
}

#[tokio::test]
async fn a_registration_waits_for_the_bind_results_of_nodes_following_other_controllers() {
    if !EtcdCluster::available() {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let net = Net::new();
    let controllers = three_controllers(net, &cluster, "3s").await;
    let (a, b) = (&controllers[0], &controllers[1]);
    let _n1 = DataplaneNode::spawn(Host::Root, a, "n1", net.host(9), net.host(9), &[]).await;
    b.wait_state("n1 through etcd", |s| Controller::node(s, "n1").is_some_and(|n| n["controller"] == "a")).await;

    // Through b, which no node follows: the reply waits for n1 (following a), which opens the port.
    let echo = TcpEcho::start(net.host(2), 0).await;
    let mut server = JsonClient::connect(b, net.host(2)).await;
    assert_eq!(server.register("tcp", echo.addr.port()).await, serde_json::json!({"ack": "successful"}));

    // A port n1 cannot bind: the registration through b fails with n1's reason.
    let taken = std::net::TcpListener::bind((net.host(9), 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut server = JsonClient::connect(b, net.host(3)).await;
        let reply = server.register("tcp", port).await;
        if reply["msg"].as_str().is_some_and(|m| m.contains("store unavailable")) {
            assert!(Instant::now() < deadline, "b never reached etcd");
            continue;
        }
        assert_eq!(reply["ack"], "failed", "{reply}");
        assert!(reply["msg"].as_str().unwrap().contains("node n1"), "{reply}");
        break;
    }
}

#[tokio::test]
async fn a_compaction_past_a_controllers_watch_makes_it_list_again_and_nodes_lose_nothing() {
    if !EtcdCluster::available() {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let net = Net::new();
    let controllers = three_controllers(net, &cluster, "30s").await;
    let (a, b) = (&controllers[0], &controllers[1]);
    let n2 = DataplaneNode::spawn(Host::Root, b, "n2", net.host(10), net.host(10), &[]).await;
    let echo = TcpEcho::start(net.host(2), 0).await;
    let port = echo.addr.port();
    let _server = register_when_taken(a, net.host(2), port).await;
    wait_serving(&n2, &[port]).await;

    // b stops reading (SIGSTOP): its watch falls behind while etcd takes many writes, then compacts them.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(b.process.pid().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut etcd = Client::connect(cluster.endpoints(), None).await.unwrap();
    let noise = vec![b'x'; 8 * 1024];
    let mut last = 0;
    for i in 0..3_000 {
        let put = etcd.put(format!("/switchboard/v1/noise/{}", i % 10), noise.clone(), None).await.unwrap();
        last = put.revision();
    }
    etcd.compact(last, Some(CompactionOptions::new().with_physical())).await.unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    // b lists again; its node never lost the backend meanwhile.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (backends, _) = node_rotation(&n2, port).await;
        assert_eq!(backends, vec![echo.addr.to_string()], "n2 lost the backend");
        if b.process.stderr_text().contains("etcd compacted the history this watch needed") {
            break;
        }
        assert!(Instant::now() < deadline, "b never listed again:\n{}", b.process.stderr_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..20 {
        assert_eq!(node_rotation(&n2, port).await.0, vec![echo.addr.to_string()], "n2 lost the backend");
        assert_eq!(tcp_roundtrip(n2.frontend(port), b"x").await.unwrap(), b"x");
    }
}
