//! Upgrades that drop nothing (`--takeover PATH`): a successor takes the running node's listening sockets
//! over a Unix socket, accepts on them and tells the old node to stop; the old one drains and exits.

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use serde_json::{Value, json};
use switchboard_tests::harness::{
    Controller, DataplaneNode, Host, JsonClient, Net, TcpEcho, TempDir, UdpEcho, run_to_exit, spawn_agent,
    tcp_roundtrip,
};
use tokio::time::Instant;

/// How long each poll below may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// Node `n1` with `--takeover path`, its frontends on `net`'s .1.
async fn node(ctl: &Controller, path: &Path, extra: &[&str]) -> DataplaneNode {
    let mut args = vec!["--takeover", path.to_str().unwrap()];
    args.extend(extra);
    DataplaneNode::spawn(Host::Root, ctl, "n1", ctl.net.host(1), ctl.net.host(254), &args).await
}

/// Connections (TCP) or sessions (UDP) `node` opened to backends so far.
async fn opened(node: &DataplaneNode) -> u64 {
    let state = node.state().await;
    state["backends"].as_array().map_or(0, |rows| rows.iter().filter_map(|r| r["total_connections"].as_u64()).sum())
}

/// Polls until `node` has opened at least `count` connections or sessions.
async fn wait_opened(node: &DataplaneNode, count: u64) {
    let deadline = Instant::now() + DEADLINE;
    while opened(node).await < count {
        assert!(
            Instant::now() < deadline,
            "the node never opened {count} connections:\n{}",
            node.process.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `addr` echoes.
async fn wait_echo(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    while tcp_roundtrip(addr, b"ping").await.ok().as_deref() != Some(b"ping".as_slice()) {
        assert!(Instant::now() < deadline, "{addr} never echoed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `loadgen` with `args` plus a JSON report in `dir`, as a task; its report once it exits.
fn load(dir: &TempDir, name: &str, args: &[&str]) -> tokio::task::JoinHandle<Value> {
    let report = dir.path().join(format!("{name}.json"));
    let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    all.extend(["--quiet".to_owned(), "--json".to_owned(), report.display().to_string()]);
    tokio::spawn(async move {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        let (code, stderr) = run_to_exit("loadgen", &args).await;
        assert_eq!(code, Some(0), "{stderr}");
        eprintln!("{stderr}");
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
    })
}

#[tokio::test]
async fn three_upgrades_under_load_refuse_and_reset_nothing() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let dir = TempDir::new(&net, "takeover");
    let path = dir.path().join("node.sock");
    // Longer than the run: the keep-alive connections end with it, never by a timeout.
    // The successors have more workers (sockets join the group), then fewer (several on a worker).
    let workers = ["2", "3", "1", "2"];
    let args = |n: usize| ["--drain-timeout", "60s", "--workers", workers[n]];
    let mut nodes = vec![node(&ctl, &path, &args(0)).await];
    ctl.wait_synced(&["n1"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    let front = nodes[0].frontend(port);
    wait_echo(front).await;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "only the user may take over");

    let target = front.to_string();
    let common = ["tcp", "--target", &target, "--connections", "4", "--duration", "6s", "--timeout", "5s"];
    let fresh = load(&dir, "fresh", &common);
    let keepalive = load(&dir, "keepalive", &[&common[..], &["--keepalive"]].concat());
    wait_opened(&nodes[0], 200).await;
    for upgrade in 1..=3 {
        // READY means: it accepts on the old node's sockets, and the old node has stopped accepting.
        let next = node(&ctl, &path, &args(upgrade)).await;
        let log = next.process.stderr_text();
        assert!(log.contains("took over the listening sockets"), "upgrade {upgrade}:\n{log}");
        // Every socket of the group goes on to the next node: none is left behind with its queue.
        let sockets = if upgrade == 1 { "sockets=2" } else { "sockets=3" };
        assert!(log.contains(sockets), "upgrade {upgrade}: {sockets}\n{log}");
        let old = nodes.last().unwrap();
        old.process.wait_stderr("the successor accepts now", 1).await;
        // New connections go to the successor from here on.
        wait_opened(&next, 200).await;
        nodes.push(next);
    }
    for (name, run) in [("a new connection per request", fresh), ("keep-alive", keepalive)] {
        let report = run.await.unwrap();
        assert_eq!(report["errors"], json!({}), "{name}: nothing refused, reset or timed out: {report:#}");
        assert!(report["ok"].as_u64().unwrap() > 1000, "{name}: {report:#}");
        eprintln!(
            "{name}: {} requests, {} errors, longest gap {} ms",
            report["ok"], report["errors"], report["longest_gap_ms"]
        );
    }
    // The old nodes exit by themselves once their last connections (the keep-alive ones) have finished.
    let last = nodes.pop().unwrap();
    for (n, old) in nodes.iter_mut().enumerate() {
        assert_eq!(old.process.wait_exit(DEADLINE).await, Some(0), "node {n}");
        let log = old.process.stderr_text();
        assert!(log.contains("port handed over") && !log.contains("grace over"), "node {n}:\n{log}");
    }
    assert_eq!(tcp_roundtrip(last.frontend(port), b"still").await.unwrap(), b"still");
    // The last node leaves no socket file behind.
    last.process.terminate();
    let mut last = last;
    assert_eq!(last.process.wait_exit(DEADLINE).await, Some(0));
    assert!(!path.exists(), "the socket file is removed on a normal stop");
}

#[tokio::test]
async fn udp_frontends_hand_over_and_every_datagram_is_answered() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let dir = TempDir::new(&net, "takeover-udp");
    let path = dir.path().join("node.sock");
    let args = ["--udp-idle-timeout", "1s", "--drain-timeout", "60s"];
    let mut n1 = node(&ctl, &path, &args).await;
    ctl.wait_synced(&["n1"]).await;
    let backend = UdpEcho::start(net.host(2), 0, "b").await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("udp", port).await, json!({"ack": "successful"}));
    let deadline = Instant::now() + DEADLINE;
    while !n1.state().await["frontends"].to_string().contains("udp") {
        assert!(Instant::now() < deadline, "the UDP frontend never opened:\n{}", n1.process.stderr_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let target = n1.frontend(port).to_string();
    let run = load(&dir, "udp", &["udp", "--target", &target, "--connections", "4", "--duration", "4s"]);
    wait_opened(&n1, 4).await;
    let n2 = node(&ctl, &path, &args).await;
    // The successor reads the sockets now: the clients' flows become its sessions.
    wait_opened(&n2, 4).await;
    // The old node's sessions hear no more from their clients: idle after 1 s, and the node exits while
    // the load goes on.
    assert_eq!(n1.process.wait_exit(DEADLINE).await, Some(0));
    let report = run.await.unwrap();
    assert_eq!(report["errors"], json!({}), "every datagram answered: {report:#}");
    assert!(report["ok"].as_u64().unwrap() > 1000, "{report:#}");
}

#[tokio::test]
async fn the_takeover_socket_refuses_strangers_and_survives_a_crash() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let dir = TempDir::new(&net, "takeover-refusals");

    // A file that is not a socket is never replaced.
    let file = dir.write("not-a-socket", "someone's notes\n");
    let (code, stderr) = run_to_exit(
        "dataplane",
        &["--controller", &ctl.grpc_url(), "--admin-listen", "127.0.0.1:0", "--takeover", file.to_str().unwrap()],
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "someone's notes\n");

    // A peer that does not speak the exchange gets nothing, and the node serves on.
    let path = dir.path().join("node.sock");
    let mut n1 = node(&ctl, &path, &[]).await;
    ctl.wait_synced(&["n1"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", port).await, json!({"ack": "successful"}));
    {
        use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, send, socket};
        use std::os::fd::AsRawFd;
        let stranger = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).unwrap();
        connect(stranger.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        send(stranger.as_raw_fd(), b"H{\"version\":99}", MsgFlags::empty()).unwrap();
        n1.process.wait_stderr("takeover failed; this node serves on", 1).await;
    }
    assert_eq!(tcp_roundtrip(n1.frontend(port), b"ping").await.unwrap(), b"ping");

    // A node that crashed leaves its socket file; the next one starts afresh over it.
    n1.process.kill().await;
    assert!(path.exists());
    let n2 = node(&ctl, &path, &[]).await;
    assert!(!n2.process.stderr_text().contains("took over"));
    wait_echo(n2.frontend(port)).await;
}

/// Polls until `backend` has accepted `count` connections in all.
async fn wait_accepted(backend: &TcpEcho, count: usize) {
    let deadline = Instant::now() + DEADLINE;
    while backend.accepted() < count {
        assert!(Instant::now() < deadline, "the backend never accepted {count} connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_controller_upgraded_three_times_under_load_keeps_its_embedded_node_serving() {
    let net = Net::new();
    let dir = TempDir::new(&net, "takeover-controller");
    let path = dir.path().join("controller.sock");
    let mut ctl = Controller::spawn(net, &["--takeover", path.to_str().unwrap(), "--drain-timeout", "60s"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let (port, address) = (backend.addr.port().to_string(), backend.addr.ip().to_string());
    // The agent registers again with each successor (its stream ends when the old controller stops).
    let _agent = spawn_agent(&ctl, &["--protocol", "tcp", "--port", &port, "--backend-address", &address]).await;
    let front = ctl.frontend(backend.addr.port());
    assert_eq!(tcp_roundtrip(front, b"ping").await.unwrap(), b"ping");

    let target = front.to_string();
    let common = ["tcp", "--target", &target, "--connections", "4", "--duration", "6s", "--timeout", "5s"];
    let fresh = load(&dir, "fresh", &common);
    let keepalive = load(&dir, "keepalive", &[&common[..], &["--keepalive"]].concat());
    wait_accepted(&backend, 200).await;
    let mut olds = Vec::new();
    for upgrade in 1..=3 {
        let old = ctl.upgrade().await;
        let log = ctl.process.stderr_text();
        assert!(log.contains("took over the listening sockets"), "upgrade {upgrade}:\n{log}");
        old.wait_stderr("the successor accepts now", 1).await;
        // Connections keep coming through the successor's embedded node.
        wait_accepted(&backend, backend.accepted() + 200).await;
        olds.push(old);
    }
    // Its listeners are the old ones, and the agent has registered with it.
    ctl.wait_state("the backend registered again", |s| Controller::backends(s, "tcp", backend.addr.port()).len() == 1)
        .await;
    for (name, run) in [("a new connection per request", fresh), ("keep-alive", keepalive)] {
        let report = run.await.unwrap();
        assert_eq!(report["errors"], json!({}), "{name}: nothing refused, reset or timed out: {report:#}");
        eprintln!("{name}: {} requests, longest gap {} ms", report["ok"], report["longest_gap_ms"]);
    }
    for (n, old) in olds.iter_mut().enumerate() {
        assert_eq!(old.wait_exit(DEADLINE).await, Some(0), "controller {n}");
    }
}
