//! Balancing across nodes: cluster-wide least connections against per-node counts, source hash through
//! either node, and the algorithm chosen at registration.

use std::{net::SocketAddr, time::Duration};

use contract::v1::{self, SetAlgorithmRequest, admin_client::AdminClient};
use serde_json::{Value, json};
use switchboard_tests::harness::{Controller, DataplaneNode, Host, JsonClient, Net, Process};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::Instant,
};

const BACKENDS: u8 = 4;

/// A kept-alive HTTP connection through a node, and the backend that answered it.
struct Held {
    /// Kept open: the connection is what the backends count.
    _stream: TcpStream,
    backend: String,
}

/// Opens a connection to `frontend` (from `source`, if given), sends one request and keeps the connection.
async fn hold(frontend: SocketAddr, source: Option<std::net::IpAddr>) -> Held {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0)).unwrap();
    }
    let mut stream = socket.connect(frontend).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: switchboard\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let mut got = 0;
    let backend = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf[got..])).await.unwrap().unwrap();
        assert!(n > 0, "connection closed before the answer");
        got += n;
        let text = String::from_utf8_lossy(&buf[..got]);
        if let Some(line) = text.lines().find(|l| l.starts_with("hello from ")) {
            break line.trim_start_matches("hello from ").to_owned();
        }
    };
    Held { _stream: stream, backend }
}

async fn backends(ctl: &Controller, net: Net, port: u16) -> Vec<Process> {
    let mut servers = Vec::new();
    for i in 0..BACKENDS {
        let args: Vec<String> = [
            "serve",
            "http",
            "--listen",
            &format!("{}:{port}", net.host(20 + i)),
            "--register",
            &ctl.json_addr().to_string(),
            "--stats-listen",
            &format!("{}:0", net.host(20 + i)),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        servers.push(Process::spawn(&Host::Root, "loadgen", &args).await);
    }
    ctl.wait_state("four more backends", |s| Controller::backends(s, "tcp", port).len() >= usize::from(BACKENDS)).await;
    servers
}

/// Connections each backend holds, by its own count.
async fn active(servers: &[Process]) -> Vec<u64> {
    let mut counts = Vec::new();
    for server in servers {
        let mut stream = TcpStream::connect(server.addr("stats")).await.unwrap();
        stream.write_all(b"GET /stats HTTP/1.0\r\n\r\n").await.unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        counts.push(body["active"].as_u64().unwrap());
    }
    counts
}

/// Waits until `node` sees `open` connections in all (its own plus the other nodes' as reported).
async fn node_sees(node: &DataplaneNode, open: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let state = node.state().await;
        let seen: u64 = state["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["active_connections"].as_u64().unwrap() + b["remote_connections"].as_u64().unwrap())
            .sum();
        if seen == open {
            return;
        }
        assert!(Instant::now() < deadline, "{} sees {seen} connections, not {open}: {state:#}", node.id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Node B loads backends 2 and 3 with long-lived connections; then 80 % of new arrivals come to node A.
/// Returns the connections each backend holds at the end.
async fn skewed_least_connections(shared: bool) -> Vec<u64> {
    let net = Net::new();
    let mut args = vec!["--no-embedded-dataplane"];
    if !shared {
        args.push("--no-cluster-counts");
    }
    let ctl = Controller::spawn(net, &args).await;
    let fast = ["--load-report-interval", "20ms"];
    let a = DataplaneNode::spawn(Host::Root, &ctl, "a", net.host(1), net.host(254), &fast).await;
    let b = DataplaneNode::spawn(Host::Root, &ctl, "b", net.host(11), net.host(254), &fast).await;
    ctl.wait_synced(&["a", "b"]).await;
    let port = switchboard_tests::harness::free_port(net.host(20));
    let servers = backends(&ctl, net, port).await;
    let mut admin = AdminClient::connect(ctl.grpc_url()).await.unwrap();
    let service = Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: port.into() });
    admin.set_algorithm(SetAlgorithmRequest { service, algorithm: "least_connections".into() }).await.unwrap();
    ctl.wait_state("least_connections", |s| s["services"][0]["algorithm"] == "least_connections").await;

    // Node B spreads 40 connections evenly, then the clients on backends 0 and 1 leave.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(hold(b.frontend(port), None).await);
    }
    let loaded = [format!("{}:{port}", net.host(22)), format!("{}:{port}", net.host(23))];
    held.retain(|h| loaded.contains(&h.backend));
    assert_eq!(held.len(), 20, "node B balanced its own connections");
    if shared {
        node_sees(&a, 20).await;
    }

    // New arrivals, 80 % at node A.
    for i in 0..40 {
        let node = if i % 5 == 4 { &b } else { &a };
        held.push(hold(node.frontend(port), None).await);
        if shared {
            let open = held.len() as u64;
            node_sees(&a, open).await;
            node_sees(&b, open).await;
        }
    }
    let counts = active(&servers).await;
    assert_eq!(counts.iter().sum::<u64>(), 60, "{counts:?}");
    drop(held);
    counts
}

#[tokio::test]
async fn cluster_wide_least_connections_balances_what_per_node_counts_cannot() {
    let shared = skewed_least_connections(true).await;
    let (busiest, least) = (*shared.iter().max().unwrap(), *shared.iter().min().unwrap());
    assert!(busiest as f64 <= least as f64 * 1.10, "shared counts: {shared:?}");

    let local = skewed_least_connections(false).await;
    let (busiest, least) = (*local.iter().max().unwrap(), *local.iter().min().unwrap());
    assert!(busiest as f64 >= least as f64 * 1.3, "without shared counts node A cannot see B's load: {local:?}");
}

#[tokio::test]
async fn source_hash_sends_a_client_to_the_same_backend_through_either_node() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let a = DataplaneNode::spawn(Host::Root, &ctl, "a", net.host(1), net.host(254), &[]).await;
    let b = DataplaneNode::spawn(Host::Root, &ctl, "b", net.host(11), net.host(254), &[]).await;
    ctl.wait_synced(&["a", "b"]).await;
    let port = switchboard_tests::harness::free_port(net.host(20));
    // The first registration sets the algorithm; a later one asking for another is refused.
    let mut first = JsonClient::connect(&ctl, net.host(30)).await;
    let _first_backend = tokio::net::TcpListener::bind((net.host(30), port)).await.unwrap();
    let register = json!({"cmd": "register", "protocol": "tcp", "port": port, "algorithm": "source_hash"});
    first.send(&register).await;
    assert_eq!(first.recv().await["ack"], "successful");
    let mut other = JsonClient::connect(&ctl, net.host(31)).await;
    other.send(&json!({"cmd": "register", "protocol": "tcp", "port": port, "algorithm": "random"})).await;
    let refused = other.recv().await;
    assert_eq!(refused["ack"], "failed");
    assert!(refused["msg"].as_str().unwrap().contains("uses source_hash"), "{refused}");
    let _servers = backends(&ctl, net, port).await;
    // The first registration leaves; the service keeps its algorithm with the four HTTP backends.
    drop(first);
    let state =
        ctl.wait_state("four backends", |s| Controller::backends(s, "tcp", port).len() == usize::from(BACKENDS)).await;
    assert_eq!(state["services"][0]["algorithm"], "source_hash");

    let mut chosen = std::collections::BTreeSet::new();
    for client in 100..120u8 {
        let ip = net.host(client);
        let via_a = hold(a.frontend(port), Some(ip)).await.backend;
        let via_b = hold(b.frontend(port), Some(ip)).await.backend;
        let again = hold(a.frontend(port), Some(ip)).await.backend;
        assert_eq!(via_a, via_b, "client {ip} through both nodes");
        assert_eq!(via_a, again, "client {ip} twice");
        chosen.insert(via_a);
    }
    assert!(chosen.len() >= 3, "20 clients spread over the backends: {chosen:?}");
}
