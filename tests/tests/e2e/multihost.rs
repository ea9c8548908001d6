//! Several hosts on one machine: network namespaces on a bridge, created and removed by the test. The
//! controller, two nodes, the backends and the clients each live on their own host.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::harness::{
    Controller, DataplaneNode, GrpcRegistration, JsonClient, Net, Network, TcpEcho, grpc_channel, tcp_roundtrip_from,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

const GRACE: &str = "3s";

#[tokio::test]
async fn nodes_on_other_hosts_survive_a_node_crash_and_a_controller_restart() {
    if let Some(why) = Network::unavailable() {
        switchboard_tests::tools::skip(&why);
        return;
    }
    let lan = Network::create(&["ctl", "n1", "n2", "be", "cl"]).await.expect("test network");
    let (ctl_host, be, cl) = (lan.host("ctl"), lan.host("be"), lan.host("cl"));
    let args: Vec<String> = ["--no-embedded-dataplane", "--resync-grace", GRACE].map(String::from).to_vec();
    let mut ctl = Controller::spawn_on(ctl_host.clone(), lan.ip("ctl"), Net::new(), &args).await;
    let node = |id: &'static str| DataplaneNode::spawn(lan.host(id), &ctl, id, lan.ip(id), lan.ip(id), &[]);
    let mut n1 = node("n1").await;
    let n2 = node("n2").await;
    ctl.wait_synced(&["n1", "n2"]).await;

    // Backends on their own host: one registered over the JSON channel, one over gRPC, one that will not
    // come back after the controller restart.
    let json_echo = TcpEcho::start_on(&be, lan.ip("be"), 0).await;
    let grpc_echo = TcpEcho::start_on(&be, lan.ip("be"), 0).await;
    let gone_echo = TcpEcho::start_on(&be, lan.ip("be"), 0).await;
    let (p_json, p_grpc, p_gone) = (json_echo.addr.port(), grpc_echo.addr.port(), gone_echo.addr.port());
    let mut json_server = JsonClient::connect_from(&be, ctl.json_addr(), None).await;
    assert_eq!(json_server.register("tcp", p_json).await, json!({"ack": "successful"}));
    let mut gone_server = JsonClient::connect_from(&be, ctl.json_addr(), None).await;
    assert_eq!(gone_server.register("tcp", p_gone).await, json!({"ack": "successful"}));
    let grpc_addr = ctl.process.addr("grpc");
    let grpc = GrpcRegistration::tcp(grpc_channel(&be, grpc_addr).await, p_grpc, grpc_echo.addr).await.unwrap();
    assert!(grpc.ack.success, "{}", grpc.ack.message);

    // Clients on their own host reach each node's own address.
    let serves = |node: &DataplaneNode, port: u16| {
        let (cl, addr) = (cl.clone(), node.frontend(port));
        async move { tcp_roundtrip_from(&cl, addr, b"hi").await.map(|b| b == b"hi").unwrap_or(false) }
    };
    for port in [p_json, p_grpc, p_gone] {
        assert!(serves(&n1, port).await && serves(&n2, port).await, "port {port} through both nodes");
    }

    // A node crashes: the other keeps serving and the controller sees it leave; it comes back and resyncs.
    n1.process.kill().await;
    assert!(serves(&n2, p_json).await);
    ctl.wait_state("n1 gone", |s| Controller::node(s, "n1").is_some_and(|n| n["connected"] == false)).await;
    n1 = node("n1").await;
    ctl.wait_synced(&["n1"]).await;
    assert!(serves(&n1, p_json).await, "n1 resynced");

    // The controller crashes: both nodes keep serving existing and new connections.
    let mut long_lived = cl.tcp_connect(n2.frontend(p_json), None).await.unwrap();
    ctl.process.kill().await;
    assert_eq!(json_server.wait_closed().await, 0, "the JSON server's channel died with the controller");
    drop(gone_server);
    drop(grpc);
    for port in [p_json, p_grpc, p_gone] {
        assert!(serves(&n1, port).await && serves(&n2, port).await, "port {port} without a controller");
    }
    long_lived.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    long_lived.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still");
    let n1_state = n1.state().await;
    assert_eq!(n1_state["connected"], false, "{n1_state}");

    // It restarts knowing nothing: nodes resync and keep every frontend through the warm-up window.
    ctl.restart().await;
    let restarted = Instant::now();
    let state = ctl.wait_synced(&["n1", "n2"]).await;
    assert_eq!(state["warming_up"], true);
    assert!(state["services"].as_array().unwrap().is_empty(), "a restarted controller starts empty");
    for port in [p_json, p_grpc, p_gone] {
        assert!(serves(&n1, port).await && serves(&n2, port).await, "port {port} closed during warm-up");
    }

    // Servers re-register: the JSON server reconnects, the gRPC client retries until it gets through.
    let mut json_server = JsonClient::connect_from(&be, ctl.json_addr(), None).await;
    assert_eq!(json_server.register("tcp", p_json).await, json!({"ack": "successful"}));
    let grpc = loop {
        match GrpcRegistration::tcp(grpc_channel(&be, grpc_addr).await, p_grpc, grpc_echo.addr).await {
            Ok(registration) if registration.ack.success => break registration,
            other => {
                assert!(restarted.elapsed() < Duration::from_secs(10), "gRPC re-registration: {:?}", other.err());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let state = ctl
        .wait_state("warm-up over", |s| s["warming_up"] == false && Controller::backends(s, "tcp", p_json).len() == 1)
        .await;
    assert!(restarted.elapsed() >= Duration::from_millis(2_500), "warm-up ended early");
    assert_eq!(Controller::backends(&state, "tcp", p_grpc).len(), 1);
    assert!(Controller::backends(&state, "tcp", p_gone).is_empty());
    for node in [&n1, &n2] {
        assert!(serves(node, p_json).await && serves(node, p_grpc).await, "re-registered services on {}", node.id);
        let refused = cl.tcp_connect(node.frontend(p_gone), None).await;
        assert!(refused.is_err(), "the service nobody re-registered closes after warm-up on {}", node.id);
    }
    drop(grpc);
}
