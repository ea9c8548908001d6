//! Churn soak: servers register, unregister, die and come back (and, in the long form, hang) at random
//! while load runs through two nodes. The short form runs in CI; `bench/soak.py` runs the long one
//! (`SWITCHBOARD_SOAK_SECS`, `SWITCHBOARD_SOAK_SERVERS`, `SWITCHBOARD_SOAK_HANGS=1`) and reads the figures
//! it prints.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use switchboard_tests::{
    harness::{Controller, DataplaneNode, JsonClient, Net, free_port},
    hosts::Host,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
    time::{Instant, timeout},
};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// An echo server that can hang: it then keeps accepted connections without ever answering.
struct Server {
    listener: JoinHandle<()>,
    control: JsonClient,
    hung: Arc<AtomicBool>,
}

impl Server {
    async fn start(ctl: &Controller, addr: SocketAddr) -> Server {
        let listener = TcpListener::bind(addr).await.expect("server bind");
        let hung = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&hung);
        let listener = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let flag = Arc::clone(&flag);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        if flag.load(Ordering::Relaxed) {
                            // Hung: hold the connection, answer nothing, for as long as the test runs.
                            std::future::pending::<()>().await;
                        }
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut control = JsonClient::connect(ctl, addr.ip()).await;
        assert_eq!(control.register("tcp", addr.port()).await, json!({"ack": "successful"}));
        Server { listener, control, hung }
    }

    fn hang(&self) {
        self.hung.store(true, Ordering::Relaxed);
        self.control.stop_answering();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Descriptors and resident memory of process `pid`.
fn footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

#[tokio::test]
async fn servers_churning_under_load_cost_no_request_while_a_healthy_backend_answers() {
    let secs = env_or("SWITCHBOARD_SOAK_SECS", 6);
    let servers_n = env_or("SWITCHBOARD_SOAK_SERVERS", 12).clamp(2, 200) as u8;
    let hangs = env_or("SWITCHBOARD_SOAK_HANGS", 0) == 1;
    let net = Net::new();
    // A short drain: connections to a hung backend that left rotation are closed 3 s later.
    let mut ctl = Controller::spawn(net, &["--resync-grace", "0s", "--drain-timeout", "3s"]).await;
    let mut node =
        DataplaneNode::spawn(Host::Root, &ctl, "n1", net.host(250), net.host(254), &["--drain-timeout", "3s"]).await;
    ctl.wait_synced(&["n1"]).await;
    let port = free_port(net.host(2));
    let addr = |i: u8| SocketAddr::new(net.host(2 + i), port);
    let mut servers: Vec<Option<Server>> = Vec::new();
    for i in 0..servers_n {
        servers.push(Some(Server::start(&ctl, addr(i)).await));
    }
    ctl.wait_state("every server registered", |s| Controller::backends(s, "tcp", port).len() == usize::from(servers_n))
        .await;
    let frontends = [ctl.frontend(port), node.frontend(port)];
    let (ctl_pid, node_pid) = (ctl.process.pid().unwrap(), node.process.pid().unwrap());
    let start = (footprint(ctl_pid), footprint(node_pid));

    // Load: a few clients, each one request at a time, through both nodes, bounded by the run time.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for c in 0..4usize {
        let (stop, sent, failed) = (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failed));
        clients.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let frontend = frontends[(c + n) % 2];
                let ok = timeout(Duration::from_secs(2), async {
                    let mut stream = TcpStream::connect(frontend).await?;
                    stream.write_all(b"ping").await?;
                    let mut buf = [0u8; 4];
                    stream.read_exact(&mut buf).await?;
                    std::io::Result::Ok(buf == *b"ping")
                })
                .await;
                sent.fetch_add(1, Ordering::Relaxed);
                if !matches!(ok, Ok(Ok(true))) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Churn: server 0 stays healthy throughout; the others leave, die, come back (and hang) at random.
    let mut seed = u64::from(std::process::id()) | 1;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut churned, mut hung, mut crashes) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let i = 1 + random(u64::from(servers_n) - 1) as usize;
        match (servers[i].take(), random(4)) {
            // Gone: it comes back.
            (None, _) => servers[i] = Some(Server::start(&ctl, addr(i as u8)).await),
            // Hung earlier: the controller has closed its channel by now, or will; it is restarted.
            (Some(server), _) if server.hung.load(Ordering::Relaxed) => drop(server),
            // Unregisters and registers again on the same connection.
            (Some(mut server), 0) => {
                server.control.send(&json!({"cmd": "unregister", "protocol": "tcp", "port": port})).await;
                let reply = server.control.recv().await;
                assert_eq!(reply["ack"], "successful", "{reply}");
                assert_eq!(server.control.register("tcp", port).await["ack"], "successful");
                servers[i] = Some(server);
            }
            // Hangs: still connected, answers nothing (long form only).
            (Some(server), 1) if hangs => {
                server.hang();
                hung += 1;
                servers[i] = Some(server);
            }
            // Leaves cleanly: unregisters, then stops.
            (Some(mut server), 2) => {
                server.control.send(&json!({"cmd": "unregister", "protocol": "tcp", "port": port})).await;
                assert_eq!(server.control.recv().await["ack"], "successful");
                drop(server);
            }
            // Crashes: its control connection and its listener go at once, and with them the requests it
            // was holding (at most one per client).
            (Some(server), _) => {
                drop(server);
                crashes += 1;
            }
        }
        churned += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    drop(servers);
    ctl.wait_state("every server gone", |s| Controller::backends(s, "tcp", port).is_empty()).await;
    // Connections still held by hung backends end with their drain; then nothing may be left over.
    let settled = Instant::now() + Duration::from_secs(10);
    let mut end = (footprint(ctl_pid), footprint(node_pid));
    while (end.0.0 > start.0.0 + 4 || end.1.0 > start.1.0 + 4) && Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(100)).await;
        end = (footprint(ctl_pid), footprint(node_pid));
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "SOAK {}",
        json!({
            "seconds": secs, "servers": servers_n, "churn_events": churned, "hangs": hung, "crashes": crashes,
            "requests": sent, "failed": failed,
            "controller": {"fds_start": start.0.0, "fds_end": end.0.0, "rss_kb_start": start.0.1, "rss_kb_end": end.0.1},
            "node": {"fds_start": start.1.0, "fds_end": end.1.0, "rss_kb_start": start.1.1, "rss_kb_end": end.1.1},
        })
    );
    assert!(sent > 100, "the load ran: {sent} requests");
    if !hangs {
        // A healthy backend answered throughout: the only requests that may fail are those a crashing server
        // held at the moment it died, at most one per client and crash. Dead, leaving and unregistered
        // servers are never tried again.
        assert!(failed <= 4 * crashes, "{failed} of {sent} requests failed, with {crashes} crashes");
    }
    // Nothing leaked: the descriptors held at the end are those held at the start, give or take the
    // connections still closing.
    assert!(end.0.0 <= start.0.0 + 4, "controller fds {} -> {}", start.0.0, end.0.0);
    assert!(end.1.0 <= start.1.0 + 4, "node fds {} -> {}", start.1.0, end.1.0);
    assert!(ctl.process.is_running() && node.process.is_running(), "no restart");
}
