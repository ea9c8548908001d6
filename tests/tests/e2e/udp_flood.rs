//! UDP sessions under a flood of new client addresses (what a spoofed flood looks like to the balancer):
//! bounded per client address and per /24, and gone soon when the backend never answers, so clients
//! elsewhere keep getting in. The caps and timeouts are their flags' defaults.

use std::{net::SocketAddr, time::Duration};

use serde_json::{Value, json};
use switchboard_tests::harness::{Controller, DEADLINE, JsonClient, Net, UdpEcho, udp_roundtrip};
use tokio::{
    net::UdpSocket,
    time::{Instant, timeout},
};

/// `--udp-max-sessions-per-source` and `--udp-max-sessions-per-prefix` by default.
const PER_SOURCE: u64 = 64;
const PER_PREFIX: u64 = 1_024;
/// The flood: this many ports on each of the 254 hosts of one /24 (more addresses than the prefix may
/// hold sessions, and more than the table below), each sending one datagram per round.
const PORTS_PER_HOST: usize = 8;
const ROUNDS: usize = 10;
/// Datagrams sent back to back.
const CHUNK: usize = 128;

/// Sessions open on the service's backends, as the node last reported them.
fn sessions(state: &Value, port: u16) -> u64 {
    Controller::backends(state, "udp", port).iter().map(|b| b["active_connections"].as_u64().unwrap_or(0)).sum()
}

/// Sessions ever opened on the service's backends.
fn opened(state: &Value, port: u16) -> u64 {
    Controller::backends(state, "udp", port).iter().map(|b| b["total_connections"].as_u64().unwrap_or(0)).sum()
}

/// Datagrams of `udp:port` dropped for `reason`, from the controller's `/metrics`.
async fn dropped(ctl: &Controller, port: u16, reason: &str) -> u64 {
    let (status, body) = ctl.http_get("/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    let (service, reason) = (format!("service=\"udp:{port}\""), format!("reason=\"{reason}\""));
    body.lines()
        .filter(|l| l.starts_with("switchboard_frontend_udp_dropped_datagrams_total{"))
        .find(|l| l.contains(&service) && l.contains(&reason))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// One datagram from `socket` answered within a second, trying three times.
async fn answered(socket: &UdpSocket, to: SocketAddr) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        socket.send_to(b"legit", to).await.ok()?;
        if let Ok(Ok((n, _))) = timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

/// Sends `ROUNDS` rounds of one datagram from every socket, within `limit`, and returns how many it sent.
fn flood(sockets: &[std::net::UdpSocket], to: SocketAddr, limit: Duration) -> usize {
    let end = std::time::Instant::now() + limit;
    let mut sent = 0;
    for _ in 0..ROUNDS {
        for chunk in sockets.chunks(CHUNK) {
            for socket in chunk {
                // A full send buffer loses the datagram, as a flood would.
                if socket.send_to(b"flood", to).is_ok() {
                    sent += 1;
                }
            }
            if std::time::Instant::now() >= end {
                return sent;
            }
            // A pause between bursts, so most datagrams reach the node instead of overflowing its socket.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    sent
}

#[tokio::test]
async fn a_flood_from_one_network_holds_its_prefix_cap_and_clients_elsewhere_get_in() {
    // This test holds one socket per flood address.
    contract::process::raise_fd_limit().unwrap();
    let (net, flood_net, one_host_net) = (Net::new(), Net::new(), Net::new());
    // A table that the flood's addresses could fill without the caps (2,032 > 1,536), but not with them.
    let ctl = Controller::spawn(net, &["--udp-max-sessions", "1536"]).await;
    let echo = UdpEcho::start(net.host(2), 0, "a").await;
    let port = echo.addr.port();
    let frontend = ctl.frontend(port);
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("udp", port).await, json!({"ack": "successful"}));

    // One address with more ports than its cap: the first 64 get sessions, the rest are dropped.
    let mut one_host = Vec::new();
    for _ in 0..PER_SOURCE + 16 {
        let socket = UdpSocket::bind(SocketAddr::new(one_host_net.host(7), 0)).await.unwrap();
        socket.send_to(b"one host", frontend).await.unwrap();
        one_host.push(socket);
    }
    ctl.wait_state("one address's sessions at its cap", |s| sessions(s, port) == PER_SOURCE).await;
    let deadline = Instant::now() + DEADLINE;
    while dropped(&ctl, port, "source_limit").await < 16 {
        assert!(Instant::now() < deadline, "the datagrams past the source's cap are not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The flood: 2,032 addresses of one /24, bounded in count and time, on a thread of its own while the
    // echo answers it here.
    let mut sockets = Vec::new();
    for host in 1..=254 {
        for _ in 0..PORTS_PER_HOST {
            let socket = std::net::UdpSocket::bind(SocketAddr::new(flood_net.host(host), 0)).unwrap();
            socket.set_nonblocking(true).unwrap();
            sockets.push(socket);
        }
    }
    let started = Instant::now();
    let flooding = tokio::task::spawn_blocking(move || {
        let sent = flood(&sockets, frontend, Duration::from_secs(5));
        (sent, sockets)
    });
    let mut most = 0;
    while !flooding.is_finished() {
        most = most.max(sessions(&ctl.state().await, port));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (sent, _flood_sockets) = flooding.await.unwrap();
    let flood_time = started.elapsed();

    // A client on another /24, while the flood's sessions are held (its backend answered them: 30 s).
    let client = UdpSocket::bind(SocketAddr::new(net.host(5), 0)).await.unwrap();
    let reply = answered(&client, frontend).await;
    let state = ctl.state().await;
    assert_eq!(reply.as_deref(), Some(&b"a:legit"[..]), "the client elsewhere gets no reply; state: {state:#}");
    let prefix_drops = dropped(&ctl, port, "prefix_limit").await;
    assert!(prefix_drops > 0, "no datagram met the prefix cap");
    // The flood's sessions: everything but the one address's and the client's.
    let state = ctl
        .wait_state("the flood's sessions at the prefix cap", |s| sessions(s, port) == PER_SOURCE + PER_PREFIX + 1)
        .await;
    most = most.max(sessions(&state, port));
    assert!(most <= PER_SOURCE + PER_PREFIX + 1, "more sessions than the caps allow: {most}");
    eprintln!(
        "flood: {sent} datagrams from {} addresses of one /24 in {flood_time:?}; its sessions: {PER_PREFIX} of 1536 \
         ({} opened in all), {prefix_drops} datagrams dropped at the prefix cap",
        254 * PORTS_PER_HOST,
        opened(&state, port),
    );
}

#[tokio::test]
async fn sessions_their_backend_never_answers_end_after_the_unanswered_timeout() {
    let (net, flood_net) = (Net::new(), Net::new());
    let ctl = Controller::spawn(net, &[]).await;
    let echo = UdpEcho::start(net.host(2), 0, "a").await;
    // A backend that reads nothing and answers nothing.
    let silent = std::net::UdpSocket::bind(SocketAddr::new(net.host(3), 0)).unwrap();
    let (answering, unanswering) = (echo.addr.port(), silent.local_addr().unwrap().port());
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("udp", answering).await, json!({"ack": "successful"}));
    let mut silent_server = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(silent_server.register("udp", unanswering).await, json!({"ack": "successful"}));

    let client = UdpSocket::bind(SocketAddr::new(net.host(5), 0)).await.unwrap();
    assert_eq!(udp_roundtrip(&client, ctl.frontend(answering), b"hi").await, b"a:hi");
    // One datagram from each of 100 addresses of another /24 (few enough that none is lost on the way),
    // then the client's own.
    let mut flood = Vec::new();
    for host in 1..=100 {
        let socket = UdpSocket::bind(SocketAddr::new(flood_net.host(host), 0)).await.unwrap();
        socket.send_to(b"anyone?", ctl.frontend(unanswering)).await.unwrap();
        flood.push(socket);
    }
    client.send_to(b"anyone?", ctl.frontend(unanswering)).await.unwrap();
    let sent = Instant::now();
    ctl.wait_state("the unanswered sessions opened", |s| opened(s, unanswering) == 101).await;
    // Gone after about 2 s without an answer, while the answered one (as silent since) stays.
    let state = ctl
        .wait_state("the unanswered sessions gone, the answered one kept", |s| {
            sessions(s, unanswering) == 0 && sessions(s, answering) == 1
        })
        .await;
    let lived = sent.elapsed();
    // The client's session is the last to end: 2 s after its datagram reached the node, just before `sent`.
    assert!(lived >= Duration::from_millis(1_900), "ended after {lived:?}, before the unanswered timeout");
    assert!(lived < Duration::from_secs(10), "ended after {lived:?}");
    // The answered session is the same one: no second session was opened for the client.
    assert_eq!(udp_roundtrip(&client, ctl.frontend(answering), b"again").await, b"a:again");
    let again = ctl.state().await;
    assert_eq!((opened(&state, answering), opened(&again, answering), sessions(&again, answering)), (1, 1, 1));
    eprintln!("101 unanswered sessions all gone {lived:?} after the last datagram");
}
