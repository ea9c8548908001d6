//! Several controllers: a node and an agent given `--controller A,B` move to B when A is lost, and
//! clients of the node never notice.

use std::time::Duration;

use switchboard_tests::harness::{
    Controller, DataplaneNode, Host, Net, RoundTrips, TcpEcho, spawn_agent, tcp_roundtrip,
};
use tokio::time::Instant;

#[tokio::test]
async fn a_node_and_an_agent_move_to_the_next_controller_and_clients_see_nothing() {
    let net = Net::new();
    let mut a = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let b = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let both = format!("{},{}", a.grpc_url(), b.grpc_url());
    let node = DataplaneNode::spawn(Host::Root, &a, "mover", net.host(9), net.host(9), &["--controller", &both]).await;
    a.wait_synced(&["mover"]).await;

    let echo = TcpEcho::start(net.host(2), 0).await;
    let port = echo.addr.port().to_string();
    let backend = net.host(2).to_string();
    let args = ["--controller", &both, "--protocol", "tcp", "--port", &port, "--backend-address", &backend];
    let _agent = spawn_agent(&a, &[&args[..], &["--check", "none"]].concat()).await;
    a.wait_state("the backend", |s| Controller::backends(s, "tcp", echo.addr.port()).len() == 1).await;
    assert_eq!(node.state().await["controller"], a.grpc_url());
    let frontend = node.frontend(echo.addr.port());
    assert_eq!(tcp_roundtrip(frontend, b"before").await.unwrap(), b"before");

    // Clients keep connecting through the node the whole time (bounded: 20 s or 4,000 round trips).
    let load = RoundTrips::start(frontend, 4_000, Duration::from_secs(20));

    let version_before = node.state().await["version"].as_u64().unwrap();
    a.process.kill().await;
    let killed = Instant::now();
    let mut last_version = version_before;
    let deadline = killed + Duration::from_secs(15);
    let moved = loop {
        let state = node.state().await;
        let version = state["version"].as_u64().unwrap();
        assert!(version >= last_version, "the node's version went back from {last_version} to {version}");
        last_version = version;
        if state["connected"] == true && state["controller"] == b.grpc_url() {
            break killed.elapsed();
        }
        assert!(Instant::now() < deadline, "the node never followed B: {state:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(moved < Duration::from_secs(2), "the node took {moved:?} to follow the next controller");

    // The agent re-registers through B, and B's snapshot (past its warm-up) serves the backend.
    b.wait_state("the backend re-registered through B", |s| {
        Controller::backends(s, "tcp", echo.addr.port()).len() == 1
    })
    .await;
    load.wait_more(50).await;
    let (sent, failed) = load.stop().await;
    let version = node.state().await["version"].as_u64().unwrap();
    assert!(version >= last_version, "the node's version went back");
    assert_eq!(failed, 0, "{failed} of {sent} client round trips failed");
    assert_eq!(tcp_roundtrip(frontend, b"after").await.unwrap(), b"after");
}
