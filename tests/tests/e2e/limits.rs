//! Bounds on what clients can make the balancer hold, each with a clear refusal; and the control plane
//! answering while clients exhaust their share of file descriptors.

use std::time::Duration;

use contract::v1::{ListServicesRequest, admin_client::AdminClient};
use serde_json::json;
use switchboard_tests::harness::{
    Controller, DEADLINE, JsonClient, Net, TcpEcho, UdpEcho, tcp_roundtrip, udp_roundtrip,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::{Instant, timeout},
};

/// Connects and proves the connection is relayed (an echo comes back), or says why not.
async fn relayed(addr: std::net::SocketAddr) -> Result<TcpStream, String> {
    let mut stream = timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    // A connection closed unread is reset: that is the balancer's refusal too.
    let closed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => "closed by the balancer".to_owned(),
        _ => e.to_string(),
    };
    stream.write_all(b"x").await.map_err(closed)?;
    let mut byte = [0u8; 1];
    match timeout(Duration::from_secs(2), stream.read(&mut byte)).await {
        Ok(Ok(1)) => Ok(stream),
        Ok(Ok(_)) => Err("closed by the balancer".to_owned()),
        Ok(Err(e)) => Err(closed(e)),
        Err(_) => Err("no echo in time".to_owned()),
    }
}

#[tokio::test]
async fn clients_exhausting_the_descriptors_never_lock_out_the_control_plane() {
    // This test holds about two descriptors per flood connection itself.
    contract::process::raise_fd_limit().unwrap();
    let net = Net::new();
    let ctl = Controller::spawn_with_fd_limit(net, 1024, &[]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));

    // More clients than the limit allows: the first ones are relayed, the rest are closed at once.
    let mut flood = Vec::new();
    let mut refused = 0;
    for _ in 0..1200 {
        match timeout(Duration::from_secs(2), TcpStream::connect(ctl.frontend(port))).await {
            Ok(Ok(stream)) => flood.push(stream),
            _ => refused += 1,
        }
    }
    let mut relayed_now = 0;
    for stream in &mut flood {
        let mut byte = [0u8; 1];
        if stream.write_all(b"x").await.is_ok()
            && matches!(timeout(Duration::from_millis(500), stream.read(&mut byte)).await, Ok(Ok(1)))
        {
            relayed_now += 1;
        }
    }
    assert!(relayed_now > 100 && relayed_now < 1200 - refused, "relayed {relayed_now} of {}", flood.len());
    let stderr = ctl.process.stderr_text();
    assert!(stderr.contains("limit reached: refusing") && stderr.contains("client file descriptors"), "{stderr}");
    assert!(!stderr.contains("Too many open files"), "the process itself never ran out:\n{stderr}");

    // Meanwhile the control plane answers: a registration over the JSON channel, gRPC, admin HTTP.
    let other = TcpEcho::start(net.host(3), 0).await;
    let mut newcomer = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(newcomer.register("tcp", other.addr.port()).await, json!({"ack": "successful"}));
    let channel = tonic::transport::Endpoint::from_shared(ctl.grpc_url()).unwrap().connect().await.unwrap();
    let services = AdminClient::new(channel).list_services(ListServicesRequest {}).await.unwrap();
    assert_eq!(services.get_ref().services.len(), 2);
    assert_eq!(ctl.state().await["services"].as_array().map(Vec::len), Some(2));

    // The flood ends: clients are served again.
    drop(flood);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match relayed(ctl.frontend(port)).await {
            Ok(_) => break,
            Err(why) => assert!(Instant::now() < deadline, "no recovery after the flood: {why}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_service_holds_at_most_its_connections_and_queues_the_rest_when_asked() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--max-connections-per-service", "2"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    let first = relayed(ctl.frontend(port)).await.unwrap();
    let _second = relayed(ctl.frontend(port)).await.unwrap();
    assert_eq!(relayed(ctl.frontend(port)).await.unwrap_err(), "closed by the balancer");
    drop(first);
    let deadline = Instant::now() + DEADLINE;
    while let Err(why) = relayed(ctl.frontend(port)).await {
        assert!(Instant::now() < deadline, "a freed slot is not taken again: {why}");
    }

    // With a queue, the client past the bound waits for a slot instead.
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--max-connections-per-service", "1", "--queue-timeout", "10s"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    let holder = relayed(ctl.frontend(port)).await.unwrap();
    let queued = tokio::spawn(tcp_roundtrip(ctl.frontend(port), b"queued"));
    drop(holder);
    let answer = timeout(DEADLINE, queued).await.expect("the queued client is served").unwrap().unwrap();
    assert_eq!(answer, b"queued");
}

#[tokio::test]
async fn a_full_udp_table_drops_new_clients_and_says_so() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--udp-max-sessions", "1"]).await;
    let echo = UdpEcho::start(net.host(2), 0, "a").await;
    let port = echo.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("udp", port).await, json!({"ack": "successful"}));
    let first = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(udp_roundtrip(&first, ctl.frontend(port), b"one").await, b"a:one");
    let second = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    second.send_to(b"two", ctl.frontend(port)).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(timeout(Duration::from_millis(500), second.recv_from(&mut buf)).await.is_err(), "no session for it");
    let deadline = Instant::now() + DEADLINE;
    while !ctl.process.stderr_text().contains("session table full") {
        assert!(Instant::now() < deadline, "no warning:\n{}", ctl.process.stderr_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(udp_roundtrip(&first, ctl.frontend(port), b"again").await, b"a:again", "the first goes on");
}

#[tokio::test]
async fn a_silent_json_connection_that_registered_nothing_is_closed() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--json-idle-timeout", "300ms"]).await;
    let mut silent = JsonClient::connect(&ctl, net.host(2)).await;
    let reply = silent.recv().await;
    assert_eq!(reply["ack"], "failed");
    assert!(reply["msg"].as_str().unwrap().contains("--json-idle-timeout"), "{reply}");
    assert_eq!(silent.wait_closed().await, 0);
    // Stray bytes are not requests: a connection that dribbles whitespace is closed all the same, while it
    // is still dribbling.
    let dribbler = TcpStream::connect(ctl.json_addr()).await.unwrap();
    let (mut read, mut write) = dribbler.into_split();
    let dribbling = tokio::spawn(async move {
        for _ in 0..20 {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut reply = String::new();
    timeout(Duration::from_millis(1500), read.read_to_string(&mut reply)).await.expect("closed while dribbling").ok();
    assert!(reply.contains("--json-idle-timeout"), "{reply}");
    dribbling.abort();
    // A registered server is kept by its hellos, however long it stays quiet otherwise.
    let backend = TcpEcho::start(net.host(3), 0).await;
    let mut server = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(server.register("tcp", backend.addr.port()).await, json!({"ack": "successful"}));
    let hellos = server.hellos();
    let deadline = Instant::now() + DEADLINE;
    while server.hellos() < hellos + 2 {
        assert!(Instant::now() < deadline, "no hellos");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(Controller::backends(&ctl.state().await, "tcp", backend.addr.port()).len(), 1);
}

#[tokio::test]
async fn registrations_per_source_backends_and_services_are_bounded() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--max-registrations-per-source", "2", "--max-services", "1"]).await;
    let a = TcpEcho::start(net.host(2), 0).await;
    let b = TcpEcho::start(net.host(2), 0).await;
    let mut first = JsonClient::connect(&ctl, net.host(2)).await;
    let mut second = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(first.register("tcp", a.addr.port()).await, json!({"ack": "successful"}));
    let mut third = JsonClient::connect(&ctl, net.host(2)).await;
    let msg = format!("source {} holds 2 registrations already (--max-registrations-per-source)", net.host(2));
    assert_eq!(third.recv().await, json!({"ack": "failed", "msg": msg}));
    assert_eq!(third.wait_closed().await, 0);
    let msg = "the balancer serves 1 services already (--max-services)";
    assert_eq!(second.register("tcp", b.addr.port()).await, json!({"ack": "failed", "msg": msg}));
    // Another source has its own count.
    let mut elsewhere = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(elsewhere.register("tcp", a.addr.port()).await["ack"], "successful");
}

#[tokio::test]
async fn a_client_that_never_speaks_is_closed_before_any_backend_sees_it() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--client-first-byte-timeout", "300ms"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    let mut silent = TcpStream::connect(ctl.frontend(port)).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = timeout(DEADLINE, silent.read(&mut byte)).await.expect("closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_eq!(backend.accepted(), 0, "no backend was bothered");
    assert_eq!(tcp_roundtrip(ctl.frontend(port), b"hi").await.unwrap(), b"hi", "a client that speaks is relayed");
    assert_eq!(backend.accepted(), 1);
}
