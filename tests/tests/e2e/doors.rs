//! Doors a few hosts cannot hold: connections that send nothing, or dribble a request, from many source
//! addresses in many /24s fill each door of the controller (gRPC, admin HTTP, JSON); a newcomer still
//! gets in, because a full door evicts its connection idle the longest, while connections with requests
//! in flight (registrations) stay; and silent connections are closed after `--first-request-timeout`.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use contract::v1::{ListNodesRequest, admin_client::AdminClient};
use serde_json::json;
use switchboard_tests::harness::{Controller, DEADLINE, GrpcRegistration, JsonClient, Net, TcpEcho};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
    time::{Instant, timeout},
};
use tonic::transport::Channel;

/// `hosts` source addresses in each of `nets` loopback /24s of their own.
fn sources(nets: usize, hosts: u8) -> Vec<IpAddr> {
    let nets: Vec<Net> = (0..nets).map(|_| Net::new()).collect();
    nets.iter().flat_map(|net| (10..10 + hosts).map(|n| net.host(n))).collect()
}

/// `per_source` connections to `addr` from each of `sources`.
async fn flood(addr: SocketAddr, sources: &[IpAddr], per_source: usize) -> Vec<TcpStream> {
    let mut streams = Vec::new();
    for _ in 0..per_source {
        for &source in sources {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(source, 0)).unwrap();
            if let Ok(Ok(stream)) = timeout(Duration::from_secs(2), socket.connect(addr)).await {
                streams.push(stream);
            }
        }
    }
    streams
}

/// Writes one byte of `request` to each stream every 500 ms, for at most [`DEADLINE`] and the request's
/// length: a slow client that never finishes.
fn dribble(streams: Vec<TcpStream>, request: &'static [u8]) -> JoinHandle<Vec<TcpStream>> {
    tokio::spawn(async move {
        let mut streams = streams;
        let start = Instant::now();
        for &byte in request {
            if start.elapsed() > DEADLINE {
                break;
            }
            for stream in &mut streams {
                let _ = timeout(Duration::from_millis(50), stream.write_all(&[byte])).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        streams
    })
}

/// A gRPC channel connected from `source`, or why not.
async fn channel_from(ctl: &Controller, source: IpAddr) -> Result<Channel, String> {
    let addr = ctl.process.addr("grpc");
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| async move {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        socket.connect(addr).await.map(hyper_util::rt::TokioIo::new)
    });
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    let connect = endpoint.connect_with_connector(connector);
    timeout(Duration::from_secs(3), connect).await.map_err(|_| "timed out".to_owned())?.map_err(|e| e.to_string())
}

/// `Admin.ListNodes` on `channel`: the number of nodes, or why not.
async fn list_nodes(channel: Channel) -> Result<usize, String> {
    let mut admin = AdminClient::new(channel);
    let call = admin.list_nodes(ListNodesRequest {});
    let nodes = timeout(Duration::from_secs(3), call).await.map_err(|_| "timed out".to_owned())?;
    Ok(nodes.map_err(|e| e.to_string())?.into_inner().nodes.len())
}

/// `Admin.ListNodes` over a fresh connection from `source`: the number of nodes, or why not.
async fn list_nodes_from(ctl: &Controller, source: IpAddr) -> Result<usize, String> {
    list_nodes(channel_from(ctl, source).await?).await
}

/// `GET path` on the admin listener over a fresh connection: the status, or why not.
async fn try_get(ctl: &Controller, path: &str) -> Result<u16, String> {
    let call = async {
        let mut stream = TcpStream::connect(ctl.process.addr("admin")).await.map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: switchboard\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response);
        text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no HTTP response: {text:?}"))
    };
    timeout(Duration::from_secs(3), call).await.map_err(|_| "timed out".to_owned())?
}

/// Retries `attempt` until it succeeds, at most until [`DEADLINE`].
async fn eventually<T, F: Future<Output = Result<T, String>>>(what: &str, mut attempt: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(why) => assert!(Instant::now() < deadline, "{what}: {why}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the controller's series `name{door="door"}`.
async fn door_count(ctl: &Controller, name: &str, door: &str) -> u64 {
    let (_, body) = ctl.http_get("/metrics", None).await;
    let series = format!("{name}{{door=\"{door}\"}} ");
    body.lines()
        .find_map(|line| line.split_once(&series).map(|(_, value)| value.trim().parse::<f64>().unwrap() as u64))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

/// Waits until every stream is closed by the other end (EOF or an error), within [`DEADLINE`].
async fn all_closed(streams: &mut [TcpStream]) {
    let deadline = Instant::now() + DEADLINE;
    for stream in streams {
        let mut buf = [0u8; 512];
        loop {
            match timeout(deadline.saturating_duration_since(Instant::now()), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => panic!("a silent connection is still open after {DEADLINE:?}"),
            }
        }
    }
}

/// The controller of one test round: under nofile 1024 or on the machine's limit.
async fn controller(net: Net, nofile: Option<u32>, extra: &[&str]) -> Controller {
    match nofile {
        Some(nofile) => Controller::spawn_with_fd_limit(net, nofile, extra).await,
        None => Controller::spawn(net, extra).await,
    }
}

#[tokio::test]
async fn silent_connections_from_many_sources_cannot_hold_the_grpc_port() {
    contract::process::raise_fd_limit().unwrap();
    // Under nofile 1024 the door holds 64 connections; on the machine's 20,000, 1,250. The flood is past
    // both, from 48 addresses in 12 /24s, each within the old cap per source.
    for (nofile, per_source) in [(Some(1024), 2), (None, 28)] {
        let net = Net::new();
        let ctl = controller(net, nofile, &["--first-request-timeout", "60s"]).await;
        let backend = TcpEcho::start(net.host(2), 0).await;
        let port = backend.addr.port();
        let registration = GrpcRegistration::tcp(ctl.grpc_channel_from(net.host(2)).await, port, backend.addr);
        let registration = registration.await.unwrap();
        assert!(registration.ack.success);

        let silent = flood(ctl.process.addr("grpc"), &sources(12, 4), per_source).await;
        assert!(silent.len() >= 48 * per_source - 4, "only {} connected", silent.len());
        let nodes =
            eventually("Admin.ListNodes past the silent connections", || list_nodes_from(&ctl, net.host(3))).await;
        assert_eq!(nodes, 1);
        assert!(door_count(&ctl, "door_evicted_total", "grpc").await > 0);
        // The registration's stream is a request in flight: never evicted.
        let state = ctl.state().await;
        assert_eq!(Controller::backends(&state, "tcp", port).len(), 1, "{state:#}");
    }
}

#[tokio::test]
async fn silent_grpc_connections_are_closed_and_streams_outlive_the_idle_timeout() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--first-request-timeout", "500ms", "--idle-connection-timeout", "1s"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let registration = GrpcRegistration::tcp(ctl.grpc_channel_from(net.host(2)).await, port, backend.addr);
    let registration = registration.await.unwrap();
    assert!(registration.ack.success);
    let mut silent = flood(ctl.process.addr("grpc"), &[net.host(4), net.host(5)], 10).await;
    all_closed(&mut silent).await;
    // One unary call, then its connection is idle: closed after --idle-connection-timeout.
    let channel = channel_from(&ctl, net.host(3)).await.unwrap();
    assert_eq!(list_nodes(channel.clone()).await, Ok(1));
    let expected = silent.len() as u64 + 1;
    let deadline = Instant::now() + DEADLINE;
    while door_count(&ctl, "door_timed_out_total", "grpc").await < expected {
        assert!(Instant::now() < deadline, "the idle connection was never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The Register stream, older than both, is still up and answering hellos.
    assert_eq!(door_count(&ctl, "door_timed_out_total", "grpc").await, expected);
    let state = ctl.state().await;
    assert_eq!(Controller::backends(&state, "tcp", port).len(), 1, "{state:#}");
}

#[tokio::test]
async fn slow_admin_connections_cannot_hold_the_admin_listener() {
    contract::process::raise_fd_limit().unwrap();
    // The admin door holds 32 connections under nofile 1024 and 312 on 20,000.
    for (nofile, per_source) in [(Some(1024), 1), (None, 8)] {
        let net = Net::new();
        let ctl = controller(net, nofile, &["--first-request-timeout", "60s"]).await;
        let slow = flood(ctl.process.addr("admin"), &sources(12, 4), per_source).await;
        let slow = dribble(slow, b"GET /api/state HTTP/1.1\r\nHost: switchboard\r\nX-Slow: ");
        let status = eventually("GET /api/state past the slow connections", || try_get(&ctl, "/api/state")).await;
        assert_eq!(status, 200);
        assert!(door_count(&ctl, "door_evicted_total", "admin").await > 0);
        slow.abort();
    }
    // Without a newcomer, a slow connection is closed after --first-request-timeout.
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--first-request-timeout", "300ms"]).await;
    let slow = flood(ctl.process.addr("admin"), &[net.host(4)], 3).await;
    let mut slow = dribble(slow, b"GET /api/state HTTP/1.1\r\nHost: switchboard\r\nX-Slow: ");
    let mut streams = Vec::new();
    // The dribbling ends by itself; the streams come back to be read.
    if let Ok(Ok(back)) = timeout(DEADLINE + Duration::from_secs(5), &mut slow).await {
        streams = back;
    }
    all_closed(&mut streams).await;
    assert_eq!(door_count(&ctl, "door_timed_out_total", "admin").await, 3);
}

#[tokio::test]
async fn slow_json_connections_cannot_hold_the_control_channel() {
    contract::process::raise_fd_limit().unwrap();
    // The JSON door holds 64 connections under nofile 1024 and 1,250 on 20,000.
    for (nofile, per_source) in [(Some(1024), 2), (None, 28)] {
        let net = Net::new();
        let ctl = controller(net, nofile, &["--first-request-timeout", "60s"]).await;
        let early = TcpEcho::start(net.host(2), 0).await;
        let mut registered = JsonClient::connect(&ctl, net.host(2)).await;
        assert_eq!(registered.register("tcp", early.addr.port()).await, json!({"ack": "successful"}));

        let slow = flood(ctl.json_addr(), &sources(12, 4), per_source).await;
        let slow = dribble(slow, br#"{"cmd":"register","protocol":"tcp","port":"#);
        let backend = TcpEcho::start(net.host(3), 0).await;
        let reply = eventually("a registration past the slow connections", || async {
            let mut newcomer = JsonClient::connect(&ctl, net.host(3)).await;
            let reply = newcomer.register("tcp", backend.addr.port()).await;
            if reply["ack"] == "successful" { Ok(newcomer) } else { Err(reply.to_string()) }
        })
        .await;
        drop(reply);
        assert!(door_count(&ctl, "door_evicted_total", "json").await > 0);
        // The registered server was never evicted: its backend is still there, its hellos answered.
        let state = ctl.state().await;
        assert_eq!(Controller::backends(&state, "tcp", early.addr.port()).len(), 1, "{state:#}");
        let hellos = registered.hellos();
        let deadline = Instant::now() + DEADLINE;
        while registered.hellos() == hellos {
            assert!(Instant::now() < deadline, "no more hellos");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // An evicted connection is told why.
        let mut streams = slow.await.unwrap();
        let mut reply = String::new();
        let mut told = false;
        for stream in streams.iter_mut().take(64) {
            reply.clear();
            let _ = timeout(Duration::from_millis(200), stream.read_to_string(&mut reply)).await;
            if reply.contains("makes room for a newcomer") {
                told = true;
                break;
            }
        }
        assert!(told, "no evicted connection was told why");
    }
    // Without a newcomer, a slow connection is closed after --first-request-timeout, and told why.
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--first-request-timeout", "300ms"]).await;
    let mut slow = TcpStream::connect(ctl.json_addr()).await.unwrap();
    slow.write_all(br#"{"cmd":"#).await.unwrap();
    let mut reply = String::new();
    timeout(DEADLINE, slow.read_to_string(&mut reply)).await.expect("closed in time").unwrap();
    assert!(reply.contains("--first-request-timeout"), "{reply}");
}

#[tokio::test]
async fn a_stream_that_never_sends_its_first_message_is_ended_at_the_first_request_timeout() {
    use contract::v1::{RegisterRequest, registry_client::RegistryClient};
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--first-request-timeout", "500ms"]).await;
    let channel = channel_from(&ctl, net.host(3)).await.unwrap();
    // A Register stream whose first message never comes: a request in flight the door would never evict.
    let (_quiet, rx) = tokio::sync::mpsc::channel::<RegisterRequest>(1);
    let mut registry = RegistryClient::new(channel);
    let call = registry.register(tokio_stream::wrappers::ReceiverStream::new(rx));
    let status = timeout(DEADLINE, call).await.expect("the stream was left open").unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert!(status.message().contains("--first-request-timeout"), "{status}");
}
