//! One trust model for every door: the JSON channel inside the tokens, registrations owned by whoever made
//! them, service settings that need authority, quotas per source, loops judged where frontends really are,
//! node identities, refused empty reloads, forgotten nodes and loopback defaults.

use std::net::SocketAddr;

use serde_json::{Value, json};
use switchboard_tests::harness::{
    Controller, DataplaneNode, GrpcRegistration, JsonClient, Net, Process, TcpEcho, run_to_exit, spawn_agent,
    tcp_roundtrip,
};
use switchboard_tests::hosts::Host;

const AUTH: &str = "registration-token-0001";
const NODE: &str = "node-token-000000000001";
const ADMIN: &str = "admin-token-00000000001";

/// A JSON `register` with extra fields, and its reply.
async fn register(client: &mut JsonClient, port: u16, extra: Value) -> Value {
    let mut message = json!({"cmd": "register", "protocol": "tcp", "port": port});
    if let (Some(message), Value::Object(extra)) = (message.as_object_mut(), extra) {
        message.extend(extra);
    }
    client.send(&message).await;
    client.recv().await
}

/// A JSON `unregister` of `port` (backend port `backend_port`) with extra fields, and its reply.
async fn unregister(client: &mut JsonClient, port: u16, backend_port: u16, extra: Value) -> Value {
    let mut message = json!({"cmd": "unregister", "protocol": "tcp", "port": port, "backend_port": backend_port});
    if let (Some(message), Value::Object(extra)) = (message.as_object_mut(), extra) {
        message.extend(extra);
    }
    client.send(&message).await;
    client.recv().await
}

fn failed_with(reply: &Value, why: &str) -> bool {
    reply["ack"] == "failed" && reply["msg"].as_str().is_some_and(|msg| msg.contains(why))
}

#[tokio::test]
async fn the_json_channel_needs_the_token_and_registrations_belong_to_their_makers() {
    let net = Net::new();
    let tokens = ["--auth-token", AUTH, "--node-token", NODE, "--admin-token", ADMIN];
    let ctl = Controller::spawn(net, &tokens).await;
    // An agent with the registration token holds the service's one backend.
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let (port_text, ip) = (port.to_string(), net.host(2).to_string());
    let agent = ["--protocol", "tcp", "--port", &port_text, "--backend-address", &ip, "--check", "none"];
    let agent = spawn_agent(&ctl, &[&agent[..], &["--auth-token", AUTH]].concat()).await;
    ctl.wait_state("the agent's backend", |s| Controller::backends(s, "tcp", port).len() == 1).await;

    // Anonymous JSON: no registration (row 1), no unregister even from the agent's own address (row 2), no
    // service settings on a new port (row 3). The reason names both ways in.
    let mut stranger = JsonClient::connect(&ctl, net.host(3)).await;
    let joined = TcpEcho::start(net.host(3), port).await;
    let reply = register(&mut stranger, port, json!({})).await;
    assert!(failed_with(&reply, "needs a token") && failed_with(&reply, "--json-allow"), "{reply}");
    let mut same_host = JsonClient::connect(&ctl, net.host(2)).await;
    let reply = unregister(&mut same_host, port, port, json!({})).await;
    assert!(failed_with(&reply, "needs a token"), "{reply}");
    let settings = json!({"accept_proxy": true, "proxy_protocol": "v2", "algorithm": "source_hash"});
    let reply = register(&mut stranger, port + 1, settings.clone()).await;
    assert!(failed_with(&reply, "needs a token"), "{reply}");
    let reply = register(&mut stranger, port, json!({"token": "wrong-token-0000000000"})).await;
    assert!(failed_with(&reply, "wrong token"), "{reply}");
    let state = ctl.state().await;
    assert_eq!(Controller::backends(&state, "tcp", port).len(), 1, "{state:#}");
    assert!(Controller::backends(&state, "tcp", port + 1).is_empty(), "{state:#}");

    // With the token, a JSON server joins the service with its own backend...
    let reply = register(&mut stranger, port, json!({"token": AUTH})).await;
    assert_eq!(reply["ack"], "successful", "{reply}");
    ctl.wait_state("both backends", |s| Controller::backends(s, "tcp", port).len() == 2).await;
    assert_eq!(Controller::backends(&ctl.state().await, "tcp", port).len(), 2);

    // The operator may end it; the agent says so and does not undo the operator's decision.
    let channel = ctl.grpc_channel_from(net.host(5)).await;
    let deregister = contract::v1::DeregisterRequest {
        service: Some(contract::v1::ServiceKey { protocol: contract::v1::Protocol::Tcp.into(), port: port.into() }),
        backend_address: ip.clone(),
        backend_port: port.into(),
    };
    let bearer = contract::auth::Bearer::new(Some(&contract::auth::Token::new(ADMIN).unwrap()));
    let mut admin = contract::v1::registry_client::RegistryClient::with_interceptor(channel, bearer);
    admin.deregister(deregister).await.unwrap();
    agent.wait_stderr("the controller ended this registration", 1).await;
    let backend_2 = SocketAddr::new(net.host(2), port).to_string();
    let state = ctl
        .wait_state("the agent's backend gone", |s| {
            Controller::backends(s, "tcp", port).iter().all(|b| b["address"] != backend_2.as_str())
        })
        .await;
    assert_eq!(Controller::backends(&state, "tcp", port).len(), 1, "{state:#}");
    drop(joined);
}

#[tokio::test]
async fn json_allow_lets_its_sources_register_without_a_token_but_not_choose_settings() {
    let net = Net::new();
    let allow = format!("{}/32", net.host(2));
    let ctl = Controller::spawn(net, &["--auth-token", AUTH, "--json-allow", &allow]).await;
    ctl.process
        .wait_stderr(&format!("--json-allow {allow}: JSON registrations from these sources need no token"), 1)
        .await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    let reply = register(&mut server, backend.addr.port(), json!({"algorithm": "source_hash"})).await;
    assert!(failed_with(&reply, "needs the registration token"), "{reply}");
    let reply = register(&mut server, backend.addr.port(), json!({})).await;
    assert_eq!(reply["ack"], "successful", "{reply}");
    // With the token, the same source chooses settings.
    let other = TcpEcho::start(net.host(2), 0).await;
    let reply = register(&mut server, other.addr.port(), json!({"algorithm": "source_hash", "token": AUTH})).await;
    assert_eq!(reply["ack"], "successful", "{reply}");

    // An agent with the registration token holds a backend on the same host: an anonymous JSON message
    // from that host may neither end it nor take it over; a registration belongs to its maker.
    let agents = TcpEcho::start(net.host(2), 0).await;
    let port = agents.addr.port();
    let (port_text, ip) = (port.to_string(), net.host(2).to_string());
    let agent = ["--protocol", "tcp", "--port", &port_text, "--backend-address", &ip, "--check", "none"];
    let _agent = spawn_agent(&ctl, &[&agent[..], &["--auth-token", AUTH]].concat()).await;
    ctl.wait_state("the agent's backend", |s| Controller::backends(s, "tcp", port).len() == 1).await;
    let reply = unregister(&mut server, port, port, json!({})).await;
    assert!(failed_with(&reply, "belongs to another registration"), "{reply}");
    let reply = register(&mut server, port, json!({})).await;
    assert!(failed_with(&reply, "belongs to another registration"), "{reply}");
    let state = ctl.state().await;
    let holder = Controller::backends(&state, "tcp", port)[0]["registration"].as_str().unwrap_or_default().to_owned();
    assert!(holder.starts_with("agent"), "{state:#}");

    // Without any token, the JSON door is named among the open ones at start.
    let open = Controller::spawn(Net::new(), &[]).await;
    open.process.wait_stderr("no --auth-token: anyone who reaches the JSON port", 1).await;
}

#[tokio::test]
async fn one_source_cannot_fill_the_service_table() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--max-services", "6", "--max-services-per-source", "3"]).await;
    let mut greedy = JsonClient::connect(&ctl, net.host(2)).await;
    let mut greedy_too = JsonClient::connect(&ctl, net.host(2)).await;
    let mut ports = Vec::new();
    for i in 0..4 {
        let backend = TcpEcho::start(net.host(2), 0).await;
        let client = if i % 2 == 0 { &mut greedy } else { &mut greedy_too };
        ports.push((register(client, backend.addr.port(), json!({})).await, backend));
    }
    for (reply, _) in &ports[..3] {
        assert_eq!(reply["ack"], "successful", "{reply}");
    }
    let refused = &ports[3].0;
    let expected = format!("source {} created 3 services already (--max-services-per-source)", net.host(2));
    assert!(failed_with(refused, &expected), "{refused}");
    // Another host still opens services.
    let backend = TcpEcho::start(net.host(3), 0).await;
    let mut other = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(register(&mut other, backend.addr.port(), json!({})).await["ack"], "successful");
}

#[tokio::test]
async fn loops_are_judged_where_node_frontends_listen() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    // Nodes serve on .2 and .4 of the test's block; their streams come from 127.0.0.1, a third address.
    let a = DataplaneNode::spawn(Host::Root, &ctl, "a", net.host(2), net.host(254), &[]).await;
    let b = DataplaneNode::spawn(Host::Root, &ctl, "b", net.host(4), net.host(254), &[]).await;
    ctl.wait_synced(&["a", "b"]).await;

    // A backend on node a's own frontend address and port: refused (6a).
    let looped_port = TcpEcho::start(net.host(7), 0).await.addr.port();
    let mut on_a = JsonClient::connect(&ctl, net.host(2)).await;
    let reply = register(&mut on_a, looped_port, json!({})).await;
    assert!(failed_with(&reply, "traffic would loop"), "{reply}");

    // A backend at the address the nodes' streams come from is a server like any other (6b).
    let local = std::net::IpAddr::from([127, 0, 0, 1]);
    let backend = TcpEcho::start(local, 0).await;
    let mut server = JsonClient::connect(&ctl, local).await;
    let reply = register(&mut server, backend.addr.port(), json!({})).await;
    assert_eq!(reply["ack"], "successful", "{reply}");
    ctl.wait_state("served", |s| Controller::backends(s, "tcp", backend.addr.port()).len() == 1).await;
    for node in [&a, &b] {
        let echoed = tcp_roundtrip(node.frontend(backend.addr.port()), b"through the node").await.unwrap();
        assert_eq!(echoed, b"through the node");
    }
}

#[tokio::test]
async fn a_broadcast_backend_is_refused_even_when_foreign_backends_are_allowed() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--allow-foreign-backends"]).await;
    let channel = ctl.grpc_channel_from(net.host(5)).await;
    let broadcast = SocketAddr::from(([255, 255, 255, 255], 4000));
    let registration = GrpcRegistration::tcp(channel, 4000, broadcast).await.unwrap();
    assert!(!registration.ack.success);
    assert!(
        registration.ack.message.contains("is not the unicast address of one host"),
        "{}",
        registration.ack.message
    );
    assert!(Controller::backends(&ctl.state().await, "tcp", 4000).is_empty());
}

#[tokio::test]
async fn a_node_that_connects_again_replaces_its_older_stream_and_left_nodes_are_forgotten() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--node-forget-after", "1s"]).await;
    let first = DataplaneNode::spawn(Host::Root, &ctl, "n1", net.host(11), net.host(254), &[]).await;
    ctl.wait_synced(&["n1"]).await;
    // A second process under the same id is not locked out: it takes the id, and the first stream ends.
    let second = DataplaneNode::spawn(Host::Root, &ctl, "n1", net.host(12), net.host(254), &[]).await;
    first.wait_last_error("connected again").await;
    drop(first);
    drop(second);
    // Nodes that left are forgotten after --node-forget-after; the embedded node stays.
    let extra: Vec<DataplaneNode> = {
        let mut nodes = Vec::new();
        for (i, id) in ["m1", "m2", "m3"].into_iter().enumerate() {
            let ip = net.host(20 + u8::try_from(i).unwrap());
            nodes.push(DataplaneNode::spawn(Host::Root, &ctl, id, ip, net.host(254), &[]).await);
        }
        nodes
    };
    ctl.wait_synced(&["m1", "m2", "m3"]).await;
    drop(extra);
    ctl.wait_state("left nodes forgotten", |s| {
        let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 1 && nodes[0]["id"] == "embedded"
    })
    .await;
}

#[tokio::test]
async fn an_empty_configuration_is_refused_at_start_and_on_reload() {
    let net = Net::new();
    let dir = switchboard_tests::harness::TempDir::new(&net, "empty-config");
    let backend = TcpEcho::start(net.host(2), 0).await;
    let text =
        format!("[[service]]\nport = {}\nbackends = [\"{}\"]\ncheck = \"tcp\"\n", backend.addr.port(), backend.addr);
    let file = dir.write("controller.toml", &text);
    let path = file.to_str().unwrap().to_owned();
    let ctl = Controller::spawn(net, &["--config", &path]).await;
    ctl.wait_state("the static service", |s| Controller::backends(s, "tcp", backend.addr.port()).len() == 1).await;
    for empty in ["", " \n\t\n"] {
        dir.write("controller.toml", empty);
        ctl.process.hangup();
        ctl.process.wait_stderr("configuration reload refused", 1 + usize::from(!empty.is_empty())).await;
        let state = ctl.state().await;
        assert_eq!(Controller::backends(&state, "tcp", backend.addr.port()).len(), 1, "kept: {state:#}");
        let echoed = tcp_roundtrip(ctl.frontend(backend.addr.port()), b"still served").await.unwrap();
        assert_eq!(echoed, b"still served");
    }
    let (exit, stderr) = run_to_exit("controller", &["--config", &path, "--check"]).await;
    assert_eq!(exit, Some(64), "{stderr}");
    assert!(stderr.contains("holds no setting"), "{stderr}");
}

#[tokio::test]
async fn the_control_doors_listen_on_loopback_unless_told_and_say_so_when_exposed() {
    let help =
        std::process::Command::new(switchboard_tests::harness::bin("controller")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("[default: 127.0.0.1:8080]") && help.contains("[default: 127.0.0.1:50051]"), "{help}");

    // Exposed beyond loopback with no token: said at start (nothing connects to it here).
    let net = Net::new();
    let args: Vec<String> = [
        "--json-listen",
        "0.0.0.0:0",
        "--grpc-listen",
        &format!("{}:0", net.host(254)),
        "--admin-listen",
        &format!("{}:0", net.host(254)),
        "--frontend-address",
        &net.frontend().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let exposed = Process::spawn(&Host::Root, "controller", &args).await;
    exposed.wait_stderr("the json listener 0.0.0.0:", 1).await;
    let stderr = exposed.stderr_text();
    assert!(stderr.contains("reachable beyond loopback and a door on it has no token"), "{stderr}");
    assert!(!stderr.contains("the grpc listener"), "loopback listeners are not exposed: {stderr}");
}
