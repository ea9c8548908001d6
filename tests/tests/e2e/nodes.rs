//! Data-plane nodes as separate processes: one registration served by every node, NACKs, drains and
//! SIGTERM.

use std::time::Duration;

use contract::v1::{ListNodesRequest, admin_client::AdminClient, frontend_result};
use serde_json::json;
use switchboard_tests::harness::{
    Controller, DataplaneNode, GrpcRegistration, Host, JsonClient, Net, TcpEcho, tcp_roundtrip,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

async fn two_nodes(net: Net, extra: &[&str]) -> (Controller, DataplaneNode, DataplaneNode) {
    let ctl = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let n1 = DataplaneNode::spawn(Host::Root, &ctl, "n1", net.host(1), net.host(254), extra).await;
    let n2 = DataplaneNode::spawn(Host::Root, &ctl, "n2", net.host(11), net.host(254), extra).await;
    ctl.wait_synced(&["n1", "n2"]).await;
    (ctl, n1, n2)
}

/// A controller without embedded node, node n1 with `--drain-timeout drain`, one echo backend registered,
/// and one connection through n1 that has already echoed once.
struct OneConnection {
    ctl: Controller,
    n1: DataplaneNode,
    port: u16,
    open: TcpStream,
    _backend: TcpEcho,
    _server: JsonClient,
}

async fn one_open_connection(drain: &str) -> OneConnection {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let n1 =
        DataplaneNode::spawn(Host::Root, &ctl, "n1", net.host(1), net.host(254), &["--drain-timeout", drain]).await;
    ctl.wait_synced(&["n1"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    let mut open = TcpStream::connect(n1.frontend(port)).await.unwrap();
    assert_eq!(echo_line(&mut open, b"one").await.unwrap(), b"one");
    OneConnection { ctl, n1, port, open, _backend: backend, _server: server }
}

async fn echo_line(stream: &mut TcpStream, line: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(line).await?;
    let mut back = vec![0u8; line.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}

#[tokio::test]
async fn a_service_registered_once_is_served_by_every_node_and_unregistering_closes_it_on_all() {
    let net = Net::new();
    let (ctl, n1, n2) = two_nodes(net, &[]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));

    for node in [&n1, &n2] {
        assert_eq!(tcp_roundtrip(node.frontend(port), b"through a node").await.unwrap(), b"through a node");
        let state = node.state().await;
        assert_eq!(state["connected"], true);
        assert_eq!(state["frontends"][0]["listening"], node.frontend(port).to_string());
    }

    // The controller's node bookkeeping, as operators see it over gRPC.
    let mut admin = AdminClient::connect(ctl.grpc_url()).await.unwrap();
    let nodes = admin.list_nodes(ListNodesRequest {}).await.unwrap().into_inner();
    assert_eq!(nodes.nodes.len(), 2);
    for node in &nodes.nodes {
        assert!(node.connected, "{node:?}");
        assert_eq!(node.acked_version, Some(nodes.version), "{node:?}");
        assert!(matches!(node.frontends[0].result, Some(frontend_result::Result::Listening(_))), "{node:?}");
        assert!(node.address.starts_with("127."), "{node:?}");
    }

    server.send(&json!({"cmd": "unregister", "protocol": "tcp", "port": port})).await;
    assert_eq!(server.recv().await["ack"], "successful");
    ctl.wait_state("closed on both nodes", |s| Controller::backends(s, "tcp", port).is_empty()).await;
    for node in [&n1, &n2] {
        assert!(TcpStream::connect(node.frontend(port)).await.is_err(), "{} still listens", node.id);
    }
}

#[tokio::test]
async fn a_node_follows_every_change_through_deltas_and_holds_the_controllers_state() {
    let net = Net::new();
    let (ctl, n1, n2) = two_nodes(net, &[]).await;
    let a = TcpEcho::start(net.host(2), 0).await;
    let b = TcpEcho::start(net.host(3), 0).await;
    let c = TcpEcho::start(net.host(4), a.addr.port()).await;
    let mut server_a = JsonClient::connect(&ctl, net.host(2)).await;
    let mut server_b = JsonClient::connect(&ctl, net.host(3)).await;
    let mut server_c = JsonClient::connect(&ctl, net.host(4)).await;
    assert_eq!(server_a.register("tcp", a.addr.port()).await["ack"], "successful");
    assert_eq!(server_b.register("tcp", b.addr.port()).await["ack"], "successful");
    assert_eq!(server_c.register("tcp", a.addr.port()).await["ack"], "successful");
    server_b.send(&json!({"cmd": "unregister", "protocol": "tcp", "port": b.addr.port()})).await;
    assert_eq!(server_b.recv().await["ack"], "successful");

    // Both nodes rebuilt the controller's state from one whole snapshot and deltas after it.
    let state = ctl
        .wait_state("both nodes at the latest version", |s| {
            ["n1", "n2"].iter().all(|id| Controller::node(s, id).is_some_and(|n| n["acked_version"] == s["version"]))
        })
        .await;
    let version = state["version"].as_u64().unwrap();
    for node in [&n1, &n2] {
        let held = node.state().await;
        assert_eq!(held["version"], version, "{}", node.id);
        let services = held["services"].as_array().unwrap();
        assert_eq!(services.len(), 1, "{}: {held}", node.id);
        let mut backends: Vec<_> = services[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["addr"].as_str().unwrap().to_owned())
            .collect();
        backends.sort();
        assert_eq!(backends, [a.addr.to_string(), c.addr.to_string()], "{}", node.id);
        assert!(TcpStream::connect(node.frontend(b.addr.port())).await.is_err(), "{} still listens", node.id);
        assert_eq!(tcp_roundtrip(node.frontend(a.addr.port()), b"x").await.unwrap(), b"x");
    }
    let log = ctl.process.stderr_text();
    assert!(log.contains("delta=true"), "the controller sent no delta:\n{log}");
}

#[tokio::test]
async fn a_node_that_cannot_bind_nacks_and_the_reply_names_it() {
    let net = Net::new();
    let (ctl, n1, n2) = two_nodes(net, &[]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let _squatter = tokio::net::TcpListener::bind(n2.frontend(port)).await.unwrap();

    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    let reply = server.register("tcp", port).await;
    assert_eq!(reply["ack"], "successful", "served by n1: {reply}");
    let msg = reply["msg"].as_str().unwrap();
    assert!(msg.contains(&format!("node n2: bind {}: Address already in use", n2.frontend(port))), "{msg}");
    assert_eq!(tcp_roundtrip(n1.frontend(port), b"n1 serves").await.unwrap(), b"n1 serves");

    let mut admin = AdminClient::connect(ctl.grpc_url()).await.unwrap();
    let nodes = admin.list_nodes(ListNodesRequest {}).await.unwrap().into_inner();
    let n2_info = nodes.nodes.iter().find(|n| n.id == "n2").unwrap();
    let Some(frontend_result::Result::Error(error)) = &n2_info.frontends[0].result else {
        panic!("n2 must report its bind error: {n2_info:?}");
    };
    assert!(error.contains("Address already in use"), "{error}");
}

#[tokio::test]
async fn a_removed_backends_connection_lasts_until_the_drain_timeout() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--drain-timeout", "1s"]).await;
    let a = TcpEcho::start(net.host(2), 0).await;
    let port = a.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await["ack"], "successful");

    let mut open = TcpStream::connect(ctl.frontend(port)).await.unwrap();
    assert_eq!(echo_line(&mut open, b"before").await.unwrap(), b"before");
    drop(server);
    ctl.wait_state("backend removed", |s| Controller::backends(s, "tcp", port).is_empty()).await;
    let removed = Instant::now();
    // Still relayed after its backend left (and its port closed)...
    assert_eq!(echo_line(&mut open, b"during").await.unwrap(), b"during");
    assert!(TcpStream::connect(ctl.frontend(port)).await.is_err(), "no new connections");
    // ...until the drain timeout closes it.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the drain timeout must close the connection");
    assert!(removed.elapsed() >= Duration::from_millis(800), "closed too early: {:?}", removed.elapsed());
}

#[tokio::test]
async fn sigterm_stops_accepting_and_exits_0_once_open_connections_finish() {
    // Every field stays bound: the controller, the backend and its channel live to the end of the test.
    let OneConnection { ctl, mut n1, port, mut open, _backend, _server } = one_open_connection("30s").await;
    n1.process.terminate();
    // The frontend closes at once...
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(n1.frontend(port)).await.is_ok() {
        assert!(Instant::now() < deadline, "the frontend stayed open after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...the open connection keeps working, and when it ends the node exits 0, long before its grace.
    assert_eq!(echo_line(&mut open, b"two").await.unwrap(), b"two");
    assert!(n1.process.is_running(), "it waits for the open connection");
    drop(open);
    assert_eq!(n1.process.wait_exit(Duration::from_secs(10)).await, Some(0));
    ctl.wait_state("n1 left", |s| Controller::node(s, "n1").is_some_and(|n| n["connected"] == false)).await;
}

#[tokio::test]
async fn sigterm_closes_connections_still_open_when_the_grace_ends_and_exits_0() {
    let OneConnection { ctl: _ctl, mut n1, port: _, mut open, _backend, _server } = one_open_connection("500ms").await;
    n1.process.terminate();
    assert_eq!(n1.process.wait_exit(Duration::from_secs(10)).await, Some(0));
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was closed by the node");
}

#[tokio::test]
async fn the_controller_exits_0_on_sigterm_with_nodes_and_streams_connected() {
    let net = Net::new();
    let mut ctl = Controller::spawn(net, &["--resync-grace", "60s"]).await;
    let n1 = DataplaneNode::spawn(Host::Root, &ctl, "n1", net.host(11), net.host(254), &[]).await;
    ctl.wait_synced(&["n1"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", backend.addr.port()).await["ack"], "successful");
    let other = TcpEcho::start(net.host(3), 0).await;
    let channel = ctl.grpc_channel_from(net.host(3)).await;
    let grpc = GrpcRegistration::tcp(channel, other.addr.port(), other.addr).await.unwrap();
    assert!(grpc.ack.success);

    // A sync stream, a Register stream, a JSON channel and the warm-up timer are all open: none of them
    // may hold the controller.
    ctl.process.terminate();
    assert_eq!(ctl.process.wait_exit(Duration::from_secs(10)).await, Some(0));
    drop(n1);
}
