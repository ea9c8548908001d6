//! Traffic through the embedded node: TCP and UDP relay, round robin, failover.

use serde_json::json;
use switchboard_tests::harness::{
    Controller, EchoPair, JsonClient, Net, TcpEcho, UdpEcho, free_port, tcp_roundtrip, udp_roundtrip,
};
use tokio::net::UdpSocket;

#[tokio::test]
async fn tcp_traffic_reaches_two_servers_in_round_robin() {
    let ctl = Controller::spawn(Net::new(), &[]).await;
    // Every field stays bound: dropping a control channel would remove its backend.
    let EchoPair { a, b, port, server_a: _server_a, server_b: _server_b } = EchoPair::registered(&ctl).await;

    for i in 0..10 {
        let payload = format!("hello {i}");
        let back = tcp_roundtrip(ctl.frontend(port), payload.as_bytes()).await.unwrap();
        assert_eq!(back, payload.as_bytes());
    }
    assert_eq!((a.accepted(), b.accepted()), (5, 5), "round robin alternates between the two servers");

    // The node counted every connection and the counts reach the controller.
    let state = ctl
        .wait_state("connection totals", |s| {
            Controller::backends(s, "tcp", port)
                .iter()
                .all(|b| b["total_connections"] == 5 && b["active_connections"] == 0)
        })
        .await;
    assert_eq!(state["services"][0]["algorithm"], "round_robin");
}

/// UDP echo servers "a" and "b" on hosts 2 and 3, on one port, both registered (the second as "UDP": the
/// protocol is case-blind); the port, and what must stay alive for them to stay registered.
async fn udp_pair(ctl: &Controller, net: Net) -> (u16, (UdpEcho, UdpEcho, JsonClient, JsonClient)) {
    let a = UdpEcho::start(net.host(2), 0, "a").await;
    let port = a.addr.port();
    let b = UdpEcho::start(net.host(3), port, "b").await;
    let mut server_a = JsonClient::connect(ctl, net.host(2)).await;
    let mut server_b = JsonClient::connect(ctl, net.host(3)).await;
    assert_eq!(server_a.register("udp", port).await, json!({"ack": "successful"}));
    assert_eq!(server_b.register("UDP", port).await, json!({"ack": "successful"}));
    ctl.wait_state("two udp backends", |s| Controller::backends(s, "udp", port).len() == 2).await;
    (port, (a, b, server_a, server_b))
}

#[tokio::test]
async fn udp_traffic_reaches_two_servers_in_round_robin_and_replies_leave_from_the_frontend() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let (port, _pair) = udp_pair(&ctl, net).await;

    let mut names = Vec::new();
    for _ in 0..4 {
        // A new client address is a new session: sessions alternate between the servers.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let first = udp_roundtrip(&client, ctl.frontend(port), b"ping").await;
        // Later datagrams of the same client stay on its server.
        let second = udp_roundtrip(&client, ctl.frontend(port), b"again").await;
        let name = String::from_utf8(first).unwrap();
        assert!(name.ends_with(":ping"), "{name}");
        let server = name.split(':').next().unwrap().to_owned();
        assert_eq!(String::from_utf8(second).unwrap(), format!("{server}:again"), "session pinned");
        names.push(server);
    }
    names.sort();
    assert_eq!(names, ["a", "a", "b", "b"]);
    ctl.wait_state("four udp sessions", |s| {
        Controller::backends(s, "udp", port).iter().map(|b| b["active_connections"].as_u64().unwrap()).sum::<u64>() == 4
    })
    .await;
}

#[tokio::test]
async fn udp_sessions_opened_in_a_burst_stay_pinned_and_end_when_idle() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--udp-idle-timeout", "2s"]).await;
    let (port, _pair) = udp_pair(&ctl, net).await;

    // 40 clients each send three datagrams without waiting: they queue up and are received in batches.
    let mut clients = Vec::new();
    for _ in 0..40 {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..3 {
            client.send_to(format!("{i}").as_bytes(), ctl.frontend(port)).await.unwrap();
        }
        clients.push(client);
    }
    let mut per_server = std::collections::HashMap::new();
    for client in &clients {
        let mut answers = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let (n, from) = tokio::time::timeout(std::time::Duration::from_secs(10), client.recv_from(&mut buf))
                .await
                .expect("UDP answer timed out")
                .unwrap();
            assert_eq!(from, ctl.frontend(port), "answers leave from the frontend");
            answers.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        answers.sort();
        let server = answers[0].split(':').next().unwrap().to_owned();
        assert_eq!(answers, ["0", "1", "2"].map(|i| format!("{server}:{i}")), "a client's session stays on one server");
        *per_server.entry(server).or_insert(0) += 1;
    }
    assert_eq!(per_server, [("a".to_owned(), 20), ("b".to_owned(), 20)].into(), "round robin over sessions");
    let active = |s: &serde_json::Value| -> u64 {
        Controller::backends(s, "udp", port).iter().map(|b| b["active_connections"].as_u64().unwrap()).sum()
    };
    ctl.wait_state("40 sessions", |s| active(s) == 40).await;
    // Silent for the idle timeout, every session ends; a datagram after that opens a new one.
    ctl.wait_state("sessions idle and gone", |s| active(s) == 0).await;
    let again = udp_roundtrip(&clients[0], ctl.frontend(port), b"later").await;
    assert!(String::from_utf8(again).unwrap().ends_with(":later"));
}

#[tokio::test]
async fn a_refusing_backend_never_fails_a_client_while_another_is_up() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let live = TcpEcho::start(net.host(2), 0).await;
    let port = live.addr.port();
    // Host 3 registers the same port but nothing listens there: connections to it are refused.
    let mut server_live = JsonClient::connect(&ctl, net.host(2)).await;
    let mut server_dead = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(server_live.register("tcp", port).await["ack"], "successful");
    assert_eq!(server_dead.register("tcp", port).await["ack"], "successful");
    ctl.wait_state("two backends", |s| Controller::backends(s, "tcp", port).len() == 2).await;

    for i in 0..20 {
        let payload = format!("request {i}");
        let back = tcp_roundtrip(ctl.frontend(port), payload.as_bytes()).await.expect("client connection");
        assert_eq!(back, payload.as_bytes(), "connection {i}");
    }
    assert_eq!(live.accepted(), 20);
}

#[tokio::test]
async fn half_close_is_passed_through_and_the_other_direction_keeps_flowing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    // A backend that reads until EOF, then answers with what it read: only works if our FIN reaches it.
    let listener = tokio::net::TcpListener::bind((net.host(2), free_port(net.host(2)))).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        stream.write_all(format!("read {} bytes", got.len()).as_bytes()).await.unwrap();
    });
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await["ack"], "successful");

    let mut client = tokio::net::TcpStream::connect(ctl.frontend(port)).await.unwrap();
    client.write_all(&[7u8; 100_000]).await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "read 100000 bytes");
    backend.await.unwrap();
}

#[tokio::test]
async fn a_removed_backend_gets_no_new_connections_but_keeps_its_open_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ctl = Controller::spawn(Net::new(), &[]).await;
    let EchoPair { a, b, port, mut server_a, server_b: _server_b } = EchoPair::registered(&ctl).await;

    // Round robin starts at the first backend (host 2): this connection lands on `a`.
    let mut open = tokio::net::TcpStream::connect(ctl.frontend(port)).await.unwrap();
    open.write_all(b"first").await.unwrap();
    let mut buf = [0u8; 5];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(a.accepted(), 1);

    server_a.send(&json!({"cmd": "unregister", "protocol": "tcp", "port": port})).await;
    assert_eq!(server_a.recv().await, json!({"ack": "successful"}));
    ctl.wait_state("a removed", |s| Controller::backends(s, "tcp", port).len() == 1).await;

    for _ in 0..4 {
        tcp_roundtrip(ctl.frontend(port), b"x").await.unwrap();
    }
    assert_eq!((a.accepted(), b.accepted()), (1, 4), "no new connection for the removed backend");
    open.write_all(b"still").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still", "the open connection keeps working");
}

#[tokio::test]
async fn a_refusing_backend_is_logged_at_warn_with_its_reason() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    // Registered, but nothing listens on its port.
    let port = free_port(net.host(2));
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    ctl.wait_state("the backend", |s| Controller::backends(s, "tcp", port).len() == 1).await;
    for _ in 0..3 {
        assert!(tcp_roundtrip(ctl.frontend(port), b"x").await.unwrap_or_default().is_empty());
    }
    let deadline = tokio::time::Instant::now() + switchboard_tests::harness::DEADLINE;
    loop {
        let log = ctl.process.stderr_text();
        if let Some(line) = log.lines().find(|l| l.contains("no backend accepted the connection")) {
            assert!(line.contains("WARN") && line.contains("refused"), "{line}");
            // Three failures, one line: the rest are held back for 10 s.
            assert_eq!(log.matches("no backend accepted the connection").count(), 1, "{log}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no warning:\n{log}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Failed connects to `backend` so far, from the controller's `/metrics`.
async fn connect_failures(ctl: &Controller, backend: std::net::SocketAddr) -> u64 {
    let (_, text) = ctl.http_get("/metrics", None).await;
    text.lines()
        .filter(|l| {
            l.starts_with("switchboard_backend_connect_failures_total{") && l.contains(&format!("\"{backend}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn passive_health_takes_a_refusing_backend_out_of_rotation_until_it_answers() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--passive-failures", "2", "--passive-retry", "300ms"]).await;
    let port = free_port(net.host(2));
    // Two servers register the same port; only the second listens on it.
    let _live = TcpEcho::start(net.host(3), port).await;
    let mut dead = JsonClient::connect(&ctl, net.host(2)).await;
    let mut live = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(dead.register("tcp", port).await, json!({"ack": "successful"}));
    assert_eq!(live.register("tcp", port).await, json!({"ack": "successful"}));
    ctl.wait_state("both backends", |s| Controller::backends(s, "tcp", port).len() == 2).await;
    let refusing = std::net::SocketAddr::new(net.host(2), port);
    let failing_nodes = |s: &serde_json::Value| {
        Controller::backends(s, "tcp", port)
            .into_iter()
            .find(|b| b["address"] == refusing.to_string())
            .map(|b| b["failing_nodes"].clone())
    };

    // Every connection still gets through (the next backend takes it), and two failed connects in a row
    // take the refusing one out on the node that saw them.
    for i in 0..6u8 {
        assert_eq!(tcp_roundtrip(ctl.frontend(port), &[i]).await.unwrap(), vec![i]);
    }
    let state =
        ctl.wait_state("the refusing backend marked failing", |s| failing_nodes(s) == Some(json!(["embedded"]))).await;
    let backend = Controller::backends(&state, "tcp", port).into_iter().find(|b| b["address"] == refusing.to_string());
    assert_eq!(backend.unwrap()["healthy"], true, "its registration's own verdict is another matter");
    assert!(ctl.process.stderr_text().contains("backend out of rotation on this node"));

    // Out of rotation, it is no longer tried for every connection: at most one trial per retry.
    let before = connect_failures(&ctl, refusing).await;
    for i in 0..10u8 {
        assert_eq!(tcp_roundtrip(ctl.frontend(port), &[i]).await.unwrap(), vec![i]);
    }
    let tried = connect_failures(&ctl, refusing).await - before;
    assert!(tried <= 1, "tried {tried} times in 10 connections while out of rotation");

    // It answers again: a trial connection gets through and puts it back.
    let back = TcpEcho::start(net.host(2), port).await;
    let deadline = tokio::time::Instant::now() + switchboard_tests::harness::DEADLINE;
    while back.accepted() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never tried again");
        tcp_roundtrip(ctl.frontend(port), b"?").await.unwrap();
    }
    ctl.wait_state("back in rotation", |s| failing_nodes(s) == Some(json!([]))).await;
}
