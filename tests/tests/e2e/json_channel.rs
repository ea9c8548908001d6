//! The HW1 JSON control channel: framing, bad input, hellos, removal and port closing.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_tests::harness::{Controller, EchoPair, JsonClient, Net, TcpEcho, UdpEcho, tcp_roundtrip};

fn register(protocol: &str, port: u16) -> String {
    json!({"cmd": "register", "protocol": protocol, "port": port}).to_string()
}

#[tokio::test]
async fn framing_ndjson_glued_and_split_objects() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let tcp = TcpEcho::start(net.host(2), 0).await;
    let udp = UdpEcho::start(net.host(2), 0, "u").await;
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;

    // Two newline-delimited objects in one write: two replies, in order.
    server
        .send_raw(format!("{}\n{}\n", register("tcp", tcp.addr.port()), register("udp", udp.addr.port())).as_bytes())
        .await;
    assert_eq!(server.recv().await, json!({"ack": "successful"}));
    assert_eq!(server.recv().await, json!({"ack": "successful"}));

    // An object glued to an unsolicited heartbeat: one reply (the heartbeat has none).
    server.send_raw(format!("{}{{\"ack\":\"hello\"}}", json!({"cmd": "hello"})).as_bytes()).await;
    assert_eq!(server.recv().await, json!({"ack": "hello"}));

    // One object split across two writes.
    let unregister = json!({"cmd": "unregister", "protocol": "udp", "port": udp.addr.port()}).to_string();
    let (head, tail) = unregister.split_at(unregister.len() / 2);
    server.send_raw(head.as_bytes()).await;
    // The controller must not answer half an object: prove it by a round trip through the state API.
    ctl.wait_state("udp still registered", |s| Controller::backends(s, "udp", udp.addr.port()).len() == 1).await;
    server.send_raw(tail.as_bytes()).await;
    assert_eq!(server.recv().await, json!({"ack": "successful"}));
    ctl.wait_state("udp service gone", |s| Controller::backends(s, "udp", udp.addr.port()).is_empty()).await;
}

#[tokio::test]
async fn every_bad_input_gets_a_reason_and_the_connection_stays_usable() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--allowed-ports", "1000-65535"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    let own_port = ctl.json_addr().port();

    let cases: Vec<(String, &str)> = vec![
        ("this is not json\n".into(), "invalid JSON"),
        ("{\"cmd\": register}\n".into(), "invalid JSON"),
        ("[1, 2]\n".into(), "expected a JSON object"),
        (json!({"protocol": "tcp", "port": port}).to_string(), "missing field \"cmd\""),
        (json!({"cmd": 5}).to_string(), "\"cmd\" must be a string"),
        (json!({"cmd": "dance"}).to_string(), "unknown cmd \"dance\""),
        (json!({"cmd": "register", "port": port}).to_string(), "missing field \"protocol\""),
        (json!({"cmd": "register", "protocol": "sctp", "port": port}).to_string(), "unknown protocol \"sctp\""),
        (json!({"cmd": "register", "protocol": "tcp"}).to_string(), "missing field \"port\""),
        (
            json!({"cmd": "register", "protocol": "tcp", "port": "80"}).to_string(),
            "\"port\" must be an integer in 1..=65535",
        ),
        (
            json!({"cmd": "register", "protocol": "tcp", "port": 0}).to_string(),
            "\"port\" must be an integer in 1..=65535",
        ),
        (
            json!({"cmd": "register", "protocol": "tcp", "port": 70000}).to_string(),
            "\"port\" must be an integer in 1..=65535",
        ),
        (
            json!({"cmd": "register", "protocol": "tcp", "port": 999}).to_string(),
            "port 999 is outside the allowed ports 1000-65535",
        ),
        (json!({"cmd": "register", "protocol": "tcp", "port": own_port}).to_string(), "is the controller's own port"),
        (json!({"cmd": "unregister", "protocol": "tcp", "port": port}).to_string(), "no backend"),
        (json!({"ack": "nope"}).to_string(), "unexpected ack"),
    ];
    for (input, reason) in &cases {
        server.send_raw(format!("{input}\n").as_bytes()).await;
        let reply = server.recv().await;
        assert_eq!(reply["ack"], "failed", "{input} -> {reply}");
        let msg = reply["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(reason), "{input}: expected {reason:?} in {msg:?}");
    }
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}), "the same connection still works");
    assert_eq!(tcp_roundtrip(ctl.frontend(port), b"ok").await.unwrap(), b"ok");
}

#[tokio::test]
async fn oversized_input_gets_a_reply_then_the_connection_closes_and_nothing_panics() {
    let net = Net::new();
    let mut ctl = Controller::spawn(net, &[]).await;
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    let mut huge = b"{\"cmd\":\"register\",\"pad\":\"".to_vec();
    huge.resize(70 * 1024, b'x');
    server.send_raw(&huge).await;
    let reply = server.recv().await;
    assert_eq!(reply["ack"], "failed");
    assert!(reply["msg"].as_str().unwrap().contains("larger than 65536 bytes"), "{reply}");
    server.wait_closed().await;

    // Hostile bytes on fresh connections: binary garbage, deep nesting, a NUL flood.
    for garbage in [vec![0xff_u8; 4096], "[".repeat(100_000).into_bytes(), vec![0u8; 10_000]] {
        let mut client = JsonClient::connect(&ctl, net.host(3)).await;
        // The controller may close the connection before all of it is written: that is an answer too.
        if client.try_send_raw(&garbage).await.is_ok() {
            let _ = client.try_send_raw(b"\n").await;
        }
        drop(client);
    }
    assert!(ctl.process.is_running(), "the controller survived");
    let mut fresh = JsonClient::connect(&ctl, net.host(2)).await;
    fresh.send(&json!({"cmd": "HELLO"})).await;
    assert_eq!(fresh.recv().await, json!({"ack": "hello"}));
    assert!(ctl.process.is_running());
}

#[tokio::test]
async fn hello_probes_arrive_and_a_silent_server_is_removed_in_time() {
    let net = Net::new();
    // interval 200ms x 3 failures (+ one 200ms answer window): removal due at 800ms.
    let ctl = Controller::spawn(net, &["--hello-interval", "200ms", "--hello-timeout", "200ms"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut healthy = JsonClient::connect(&ctl, net.host(3)).await;
    let other = TcpEcho::start(net.host(3), port).await;
    assert_eq!(healthy.register("tcp", other.addr.port()).await["ack"], "successful");
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await["ack"], "successful");

    // Probes arrive and, answered, keep the server registered.
    while server.hellos() < 3 {
        assert_eq!(server.next_message().await, Some(json!({"cmd": "hello"})));
    }
    assert_eq!(Controller::backends(&ctl.state().await, "tcp", port).len(), 2);

    server.stop_answering();
    let silent_since = Instant::now();
    let messages = server.wait_closed().await;
    let removed_after = silent_since.elapsed();
    assert!(messages >= 3, "hellos kept coming while unanswered ({messages})");
    // interval x failures plus a margin (the answer window and scheduling on a busy machine).
    assert!(removed_after < Duration::from_millis(200 * 3 + 1500), "removed after {removed_after:?}");
    let state = ctl.wait_state("silent server removed", |s| Controller::backends(s, "tcp", port).len() == 1).await;
    assert_eq!(Controller::backends(&state, "tcp", port)[0]["address"], other.addr.to_string());
    // The answering server stays.
    assert!(healthy.hellos() >= 1);
    assert_eq!(tcp_roundtrip(ctl.frontend(port), b"still served").await.unwrap(), b"still served");
}

#[tokio::test]
async fn closing_the_channel_removes_its_backends_and_the_last_one_closes_the_port() {
    let ctl = Controller::spawn(Net::new(), &["--print-state"]).await;
    let EchoPair { a: _a, b: _b, port, server_a, server_b } = EchoPair::registered(&ctl).await;

    drop(server_a);
    ctl.wait_state("a removed", |s| Controller::backends(s, "tcp", port).len() == 1).await;
    assert_eq!(tcp_roundtrip(ctl.frontend(port), b"b serves").await.unwrap(), b"b serves");

    drop(server_b);
    let state = ctl.wait_state("service gone", |s| Controller::backends(s, "tcp", port).is_empty()).await;
    assert!(state["nodes"][0]["frontends"].as_array().unwrap().is_empty());
    let refused = tokio::net::TcpStream::connect(ctl.frontend(port)).await;
    assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused, "the port is closed");

    // --print-state printed the table after the changes.
    let stderr = ctl.process.stderr_text();
    assert!(stderr.contains("=== routing state v"), "{stderr}");
    assert!(stderr.contains("backend removed"), "{stderr}");
    assert!(stderr.contains("port closed"), "{stderr}");
}

#[tokio::test]
async fn unregister_from_a_new_connection_of_the_same_host_works() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut first = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(first.register("tcp", port).await["ack"], "successful");

    let mut second = JsonClient::connect(&ctl, net.host(2)).await;
    second.send(&json!({"cmd": "Unregister", "protocol": "TCP", "port": port})).await;
    assert_eq!(second.recv().await, json!({"ack": "successful"}));
    ctl.wait_state("service gone", |s| Controller::backends(s, "tcp", port).is_empty()).await;
    assert!(tokio::net::TcpStream::connect(ctl.frontend(port)).await.is_err(), "the port is closed");

    // Another host cannot unregister it: it is matched by the source address.
    assert_eq!(first.register("tcp", port).await["ack"], "successful");
    let mut stranger = JsonClient::connect(&ctl, net.host(9)).await;
    stranger.send(&json!({"cmd": "unregister", "protocol": "tcp", "port": port})).await;
    let reply: Value = stranger.recv().await;
    assert_eq!(reply["ack"], "failed");
}

#[tokio::test]
async fn a_port_the_node_cannot_bind_fails_with_the_os_error_and_is_not_kept() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    // Something else already listens on the frontend address at that port.
    let squatter = tokio::net::TcpListener::bind(ctl.frontend(port)).await.unwrap();

    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    let reply = server.register("tcp", port).await;
    assert_eq!(reply["ack"], "failed");
    let msg = reply["msg"].as_str().unwrap();
    let expected = format!("node embedded: bind {}: Address already in use", ctl.frontend(port));
    assert!(msg.contains(&expected), "{msg}");
    ctl.wait_state("nothing registered", |s| s["services"].as_array().unwrap().is_empty()).await;

    // Once the port is free the same connection registers fine.
    drop(squatter);
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    assert_eq!(tcp_roundtrip(ctl.frontend(port), b"bound").await.unwrap(), b"bound");
}
