//! Observability: `/metrics` parsed by a real Prometheus parser, access logs, and the dashboard in a real
//! browser.

use std::{net::SocketAddr, time::Duration};

use contract::v1::{self, BackendRef, DrainBackendRequest, admin_client::AdminClient};
use serde_json::{Value, json};
use switchboard_tests::{
    browser::{Browser, CHROMIUM},
    harness::{
        Controller, DEADLINE, DataplaneNode, Host, JsonClient, Net, TcpEcho, UdpEcho, free_port, http_get,
        http_get_status, http_server, spawn_agent, tcp_roundtrip, udp_roundtrip,
    },
    tools::{self, Sample, parse_prometheus, sample},
};
use tokio::{net::UdpSocket, time::Instant};

async fn scrape(addr: SocketAddr, token: Option<&str>) -> Vec<Sample> {
    let (status, body) = http_get(&Host::Root, addr, "/metrics", token).await;
    assert_eq!(status, 200, "{body}");
    parse_prometheus(&body)
}

/// Scrapes `addr` until `pred` holds, or fails after the deadline.
async fn scrape_until(addr: SocketAddr, what: &str, pred: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let samples = scrape(addr, None).await;
        if pred(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "/metrics of {addr} never showed {what}: {samples:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_follow_tcp_and_udp_traffic_and_a_failing_health_check() {
    if !tools::require_prometheus_parser() {
        return;
    }
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let node = DataplaneNode::spawn(Host::Root, &ctl, "metrics-node", net.host(9), net.host(9), &[]).await;
    ctl.wait_synced(&["metrics-node"]).await;
    let node_admin = node.process.addr("admin");
    let ctl_admin = ctl.process.addr("admin");

    // TCP: an HTTP server under an agent whose check fails once the server is gone.
    let port = free_port(net.host(2));
    let server = http_server(SocketAddr::new(net.host(2), port)).await;
    let (port_arg, backend_ip) = (port.to_string(), net.host(2).to_string());
    let args = ["--protocol", "tcp", "--port", &port_arg, "--backend-address", &backend_ip];
    let checks = ["--check", "http:/", "--check-interval", "200ms", "--rise", "1", "--fall", "1"];
    let _agent = spawn_agent(&ctl, &[&args[..], &checks[..]].concat()).await;
    // UDP: an echo server registered over the JSON channel.
    let udp = UdpEcho::start(net.host(3), 0, "u").await;
    let mut udp_server = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(udp_server.register("udp", udp.addr.port()).await, json!({"ack": "successful"}));
    ctl.wait_state("both services", |s| {
        Controller::backends(s, "tcp", port).len() == 1 && Controller::backends(s, "udp", udp.addr.port()).len() == 1
    })
    .await;

    let (tcp_service, udp_service) = (format!("tcp:{port}"), format!("udp:{}", udp.addr.port()));
    let tcp_backend = SocketAddr::new(net.host(2), port).to_string();
    let udp_backend = udp.addr.to_string();
    let tcp = [("service", tcp_service.as_str()), ("backend", tcp_backend.as_str())];
    let udp_labels = [("service", udp_service.as_str()), ("backend", udp_backend.as_str())];
    let before = scrape(node_admin, None).await;
    let connections_before = sample(&before, "switchboard_backend_connections_total", &tcp).unwrap_or(0.0);
    let bytes_before = sample(&before, "switchboard_backend_bytes_out_total", &tcp).unwrap_or(0.0);

    for _ in 0..5 {
        assert_eq!(http_get_status(node.frontend(port)).await.unwrap(), 200);
    }
    let client = UdpSocket::bind((net.host(100), 0)).await.unwrap();
    for i in 0..3 {
        let answer = udp_roundtrip(&client, node.frontend(udp.addr.port()), format!("d{i}").as_bytes()).await;
        assert_eq!(answer, format!("u:d{i}").into_bytes());
    }

    // The node: counters moved by exactly the traffic, through handles taken at snapshot apply.
    let samples = scrape_until(node_admin, "five connections closed and three datagrams counted", |s| {
        sample(s, "switchboard_backend_current_connections", &tcp) == Some(0.0)
            && sample(s, "switchboard_backend_connections_total", &tcp) == Some(connections_before + 5.0)
            && sample(s, "switchboard_backend_udp_datagrams_in_total", &udp_labels) == Some(3.0)
            && sample(s, "switchboard_backend_udp_datagrams_out_total", &udp_labels) == Some(3.0)
    })
    .await;
    assert!(sample(&samples, "switchboard_backend_bytes_in_total", &tcp).unwrap() >= 5.0 * 16.0);
    assert!(sample(&samples, "switchboard_backend_bytes_out_total", &tcp).unwrap() > bytes_before + 5.0 * 100.0);
    assert_eq!(sample(&samples, "switchboard_backend_connect_time_seconds_count", &tcp), Some(5.0));
    let refused = [("service", tcp_service.as_str()), ("backend", tcp_backend.as_str()), ("reason", "refused")];
    assert_eq!(sample(&samples, "switchboard_backend_connect_failures_total", &refused), Some(0.0));
    assert_eq!(sample(&samples, "switchboard_backend_udp_datagrams_in_total", &udp_labels), Some(3.0));
    assert_eq!(sample(&samples, "switchboard_backend_udp_datagrams_out_total", &udp_labels), Some(3.0));
    assert_eq!(sample(&samples, "switchboard_backend_udp_sessions_total", &udp_labels), Some(1.0));
    assert_eq!(sample(&samples, "switchboard_backend_current_udp_sessions", &udp_labels), Some(1.0));
    assert_eq!(sample(&samples, "switchboard_backend_bytes_in_total", &udp_labels), Some(6.0));
    assert_eq!(sample(&samples, "switchboard_node_controller_connected", &[]), Some(1.0));
    assert!(sample(&samples, "switchboard_node_acks_total", &[]).unwrap() >= 1.0);
    assert!(sample(&samples, "switchboard_node_snapshot_version", &[]).unwrap() >= 1.0);
    assert_eq!(
        sample(&samples, "switchboard_build_info", &[("binary", "dataplane")]),
        Some(1.0),
        "switchboard_build_info"
    );
    // No client address in any label.
    let client_ip = net.host(100).to_string();
    assert!(samples.iter().all(|s| s.labels.values().all(|v| !v.contains(&client_ip))), "a client address in a label");

    // The controller: registrations by origin, nodes, health; then the check fails and the gauge follows.
    let up = [("service", tcp_service.as_str()), ("backend", tcp_backend.as_str())];
    let samples = scrape_until(ctl_admin, "a hello round trip", |s| {
        sample(s, "switchboard_hello_round_trip_seconds_count", &[]).is_some_and(|n| n >= 1.0)
    })
    .await;
    assert_eq!(sample(&samples, "switchboard_registrations", &[("origin", "agent")]), Some(1.0));
    assert_eq!(sample(&samples, "switchboard_registrations", &[("origin", "json")]), Some(1.0));
    assert_eq!(sample(&samples, "switchboard_registrations_opened_total", &[("origin", "agent")]), Some(1.0));
    assert_eq!(sample(&samples, "switchboard_connected_nodes", &[]), Some(2.0));
    assert!(sample(&samples, "switchboard_snapshot_push_seconds_count", &[]).unwrap() >= 2.0);
    assert_eq!(sample(&samples, "switchboard_backend_up", &up), Some(1.0));
    assert_eq!(sample(&samples, "switchboard_node_acked_version", &[("node", "metrics-node")]), {
        sample(&samples, "switchboard_snapshot_version", &[])
    });

    drop(server);
    scrape_until(ctl_admin, "the backend down", |s| sample(s, "switchboard_backend_up", &up) == Some(0.0)).await;
}

#[tokio::test]
async fn metrics_and_the_dashboard_data_need_the_admin_token_when_one_is_set() {
    let token = "metrics-admin-token-1234";
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--admin-token", token]).await;
    for path in ["/metrics", "/api/state", "/api/events"] {
        let (status, body) = ctl.http_get(path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _) = ctl.http_get(path, Some("wrong-token-wrong-token")).await;
        assert_eq!(status, 401, "{path}");
        let (status, _) = ctl.http_get(path, Some(token)).await;
        assert_eq!(status, 200, "{path}");
    }
    // The page itself holds no data; it asks for the token.
    let (status, page) = ctl.http_get("/", None).await;
    assert_eq!(status, 200);
    assert!(page.contains("requires an admin token"), "the page says why it shows nothing");

    let node_token = "node-admin-token-12345678";
    let node =
        DataplaneNode::spawn(Host::Root, &ctl, "guarded", net.host(9), net.host(9), &["--admin-token", node_token])
            .await;
    let admin = node.process.addr("admin");
    assert_eq!(http_get(&Host::Root, admin, "/metrics", None).await.0, 401);
    assert_eq!(http_get(&Host::Root, admin, "/metrics", Some(node_token)).await.0, 200);
}

/// The lines of an access log, once it has `n` of them.
async fn access_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(Instant::now() < deadline, "{} access-log lines, expected {n}:\n{text}", lines.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_access_log_has_one_line_per_connection_and_session_with_its_bytes() {
    let dir = std::env::temp_dir().join(format!("switchboard-access-{}-{}", std::process::id(), line!()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let net = Net::new();
    let log_arg = log.display().to_string();
    let ctl = Controller::spawn(net, &["--access-log", &log_arg, "--udp-idle-timeout", "1s"]).await;
    let echo = TcpEcho::start(net.host(2), 0).await;
    let port = echo.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    ctl.wait_state("the echo server", |s| Controller::backends(s, "tcp", port).len() == 1).await;

    const N: usize = 7;
    let mut sizes = Vec::new();
    for i in 0..N {
        let payload = vec![b'x'; 1 + i * 1000];
        assert_eq!(tcp_roundtrip(ctl.frontend(port), &payload).await.unwrap(), payload);
        sizes.push(payload.len() as u64);
    }
    let lines = access_lines(&log, N).await;
    assert_eq!(lines.len(), N, "one line per connection: {lines:#?}");
    let mut logged: Vec<u64> = lines.iter().map(|l| l["bytes_in"].as_u64().unwrap()).collect();
    logged.sort_unstable();
    assert_eq!(logged, sizes, "bytes from each client");
    for line in &lines {
        assert_eq!(line["bytes_out"], line["bytes_in"], "an echo: {line}");
        assert_eq!(line["protocol"], "tcp");
        assert_eq!(line["service"], format!("tcp:{port}"));
        assert_eq!(line["backend"], echo.addr.to_string());
        assert_eq!(line["frontend"], ctl.frontend(port).to_string());
        assert_eq!(line["end"], "closed");
        assert!(line["client"].as_str().unwrap().parse::<SocketAddr>().is_ok());
        assert!(line["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
    }

    // A UDP session: one line when it ends (idle), with datagrams and bytes each way.
    let udp = UdpEcho::start(net.host(3), 0, "u").await;
    let mut udp_server = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(udp_server.register("udp", udp.addr.port()).await, json!({"ack": "successful"}));
    ctl.wait_state("the udp server", |s| Controller::backends(s, "udp", udp.addr.port()).len() == 1).await;
    let client = UdpSocket::bind((net.host(100), 0)).await.unwrap();
    udp_roundtrip(&client, ctl.frontend(udp.addr.port()), b"hello").await;
    udp_roundtrip(&client, ctl.frontend(udp.addr.port()), b"again!").await;
    let lines = access_lines(&log, N + 1).await;
    let session = &lines[N];
    assert_eq!(session["protocol"], "udp");
    assert_eq!(session["client"], client.local_addr().unwrap().to_string());
    assert_eq!((session["datagrams_in"].as_u64(), session["datagrams_out"].as_u64()), (Some(2), Some(2)));
    assert_eq!(session["bytes_in"], 11);
    assert_eq!(session["bytes_out"], 15);
    assert_eq!(session["end"], "idle");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_dashboard_shows_a_registration_then_its_drain_without_a_reload() {
    let browser_ready = tools::require("Chromium", &[CHROMIUM, "--version"], "apt-get install chromium")
        && tools::require("chromedriver", &["chromedriver", "--version"], "apt-get install chromium-driver");
    if !browser_ready {
        return;
    }
    let token = "dashboard-admin-token-123";
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--admin-token", token]).await;
    let browser = Browser::start(1280, 900).await;
    browser.open(&format!("http://{}/", ctl.process.addr("admin"))).await;
    // Without the token the page shows nothing but why, and asks once.
    browser.wait_text("the token prompt", |t| t.contains("requires an admin token")).await;
    browser.type_into("#auth-token", token).await;
    browser.click("#auth-form button").await;
    browser.wait_text("the embedded node", |t| t.contains("embedded") && t.contains("node joined")).await;
    // A mark in the document: if the page reloaded, it would be gone.
    browser.eval("window.switchboardMark = 42; return null").await;

    let echo = TcpEcho::start(net.host(2), 0).await;
    let port = echo.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    let backend = echo.addr.to_string();
    let service = format!("tcp:{port}");
    browser
        .wait_text("the new backend in rotation", |t| {
            t.lines().any(|l| l.contains(&backend) && l.contains("in rotation")) && t.contains(&service)
        })
        .await;
    assert_eq!(tcp_roundtrip(ctl.frontend(port), b"through").await.unwrap(), b"through");

    let channel = tonic::transport::Endpoint::from_shared(ctl.grpc_url()).unwrap().connect().await.unwrap();
    let bearer = contract::auth::Bearer::new(Some(&contract::auth::Token::new(token).unwrap()));
    let mut admin = AdminClient::with_interceptor(channel, bearer);
    let target = BackendRef {
        service: Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: port.into() }),
        backend: backend.clone(),
    };
    admin.drain_backend(DrainBackendRequest { backend: Some(target) }).await.unwrap();
    let text = browser
        .wait_text("the backend draining", |t| t.lines().any(|l| l.contains(&backend) && l.contains("draining")))
        .await;
    assert!(text.contains("backend draining"), "the event list shows the drain:\n{text}");
    assert_eq!(browser.eval("return window.switchboardMark").await, json!(42), "the page was reloaded");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browser.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());
    // A phone-sized window lays the same page out in one column, nothing wider than the screen.
    browser.resize(390, 844).await;
    let layout = browser
        .eval(
            "return [getComputedStyle(document.querySelector('main')).gridTemplateColumns.split(' ').length, \
             document.documentElement.scrollWidth, window.innerWidth]",
        )
        .await;
    assert_eq!(layout[0], 1, "one column on a phone: {layout}");
    assert!(layout[1].as_u64() <= layout[2].as_u64(), "the page is wider than a phone: {layout}");
    browser.screenshot(&shot.with_file_name("dashboard-phone.png")).await;
    browser.close().await;
}
