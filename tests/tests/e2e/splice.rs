//! The fast TCP path: bulk transfers through splice(2) and through the copy fallback arrive byte-exact,
//! half-closes pass both ways, and a node whose pipe pool is exhausted copies instead of failing. Each test
//! reads the node's relay counters to know which path the bytes took.

use std::time::Duration;

use serde_json::Value;
use switchboard_tests::harness::{Controller, DataplaneNode, Host, JsonClient, Net, free_port};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    time::timeout,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// `len` bytes that differ from one transfer to the next (xorshift), so a misplaced chunk cannot match.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A controller without embedded node and one remote node with `extra` flags.
async fn one_node(net: Net, extra: &[&str]) -> (Controller, DataplaneNode) {
    let ctl = Controller::spawn(net, &["--no-embedded-dataplane"]).await;
    let node = DataplaneNode::spawn(Host::Root, &ctl, "n1", net.host(1), net.host(254), extra).await;
    ctl.wait_synced(&["n1"]).await;
    (ctl, node)
}

/// A listener on `net`'s host `n`, on a port no controller of this test binary listens on (the controller
/// refuses its own ports as service ports).
async fn listen(net: Net, n: u8) -> TcpListener {
    TcpListener::bind((net.host(n), free_port(net.host(n)))).await.unwrap()
}

/// Registers `port` from `net`'s host `n` over JSON; the channel holds the registration.
async fn register(ctl: &Controller, net: Net, n: u8, port: u16) -> JsonClient {
    let mut server = JsonClient::connect(ctl, net.host(n)).await;
    let reply = server.register("tcp", port).await;
    assert_eq!(reply["ack"], "successful", "{reply}");
    server
}

/// A TCP echo backend on `net`'s host `n`, registered over JSON; answers every connection in full duplex.
async fn echo_backend(ctl: &Controller, net: Net, n: u8) -> (u16, JsonClient) {
    let listener = listen(net, n).await;
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    (port, register(ctl, net, n, port).await)
}

/// Sends `payload` through `addr` to an echo backend while reading the echo, then half-closes; returns
/// what came back.
async fn echo_through(addr: std::net::SocketAddr, payload: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    timeout(DEADLINE, read.read_to_end(&mut back)).await.expect("echo timed out").unwrap();
    writer.await.unwrap();
    back
}

async fn relay_stats(node: &DataplaneNode) -> Value {
    node.state().await["relay"].clone()
}

#[tokio::test]
async fn large_transfers_arrive_byte_exact_through_splice_and_through_the_copy_path() {
    for (flags, spliced) in [(&[][..], true), (&["--splice-pipes", "0"][..], false)] {
        let net = Net::new();
        let (ctl, node) = one_node(net, flags).await;
        let (port, _server) = echo_backend(&ctl, net, 2).await;
        let payload = pattern(16 << 20, u64::from(port));
        let back = echo_through(node.frontend(port), payload.clone()).await;
        assert!(back == payload, "{flags:?}: {} bytes came back, not the {} sent", back.len(), payload.len());

        let relay = relay_stats(&node).await;
        let (spliced_bytes, copied_bytes) =
            (relay["spliced_bytes"].as_u64().unwrap(), relay["copied_bytes"].as_u64().unwrap());
        assert_eq!(spliced_bytes + copied_bytes, 2 * payload.len() as u64, "{flags:?}: {relay}");
        if spliced {
            assert!(spliced_bytes > payload.len() as u64, "most bytes should be spliced: {relay}");
            assert_eq!(relay["pipes_in_use"], 0, "every pipe is back in the pool: {relay}");
        } else {
            assert_eq!(spliced_bytes, 0, "{relay}");
            assert_eq!(relay["pipes"], 0, "{relay}");
        }
    }
}

#[tokio::test]
async fn half_closes_pass_both_ways_through_the_splice_path() {
    let net = Net::new();
    let (ctl, node) = one_node(net, &[]).await;
    let size = 4 << 20;

    // Client closes first: the backend reads to EOF, then answers with as much again and closes.
    let listener = listen(net, 2).await;
    let port = listener.local_addr().unwrap().port();
    let (counted_tx, counted_rx) = oneshot::channel();
    let backend = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        stream.write_all(&got).await.unwrap();
        stream.shutdown().await.unwrap();
        // Second connection: the backend closes first, then reads what the client still sends.
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(&pattern(size, 2)).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        let _ = counted_tx.send(got);
    });
    let _server = register(&ctl, net, 2, port).await;

    let sent = pattern(size, 1);
    let mut client = TcpStream::connect(node.frontend(port)).await.unwrap();
    client.write_all(&sent).await.unwrap();
    client.shutdown().await.unwrap();
    let mut back = Vec::new();
    timeout(DEADLINE, client.read_to_end(&mut back)).await.expect("answer timed out").unwrap();
    assert!(back == sent, "client → backend half-close: {} bytes back", back.len());

    let mut client = TcpStream::connect(node.frontend(port)).await.unwrap();
    let mut first = Vec::new();
    timeout(DEADLINE, client.read_to_end(&mut first)).await.expect("backend's bytes timed out").unwrap();
    assert!(first == pattern(size, 2), "backend → client half-close: {} bytes", first.len());
    // The client's direction still flows after the backend closed its own.
    let late = pattern(size, 3);
    client.write_all(&late).await.unwrap();
    client.shutdown().await.unwrap();
    let got = timeout(DEADLINE, counted_rx).await.expect("backend's count timed out").unwrap();
    assert!(got == late, "after the backend's half-close, {} bytes reached it", got.len());
    backend.await.unwrap();

    let relay = relay_stats(&node).await;
    assert!(relay["spliced_bytes"].as_u64().unwrap() > 2 * size as u64, "{relay}");
}

#[tokio::test]
async fn with_the_pipe_pool_exhausted_connections_copy_and_stay_byte_exact() {
    let net = Net::new();
    let (ctl, node) = one_node(net, &["--splice-pipes", "1"]).await;

    // A backend that reads nothing until told: the connection to it holds the only pipe, full.
    let listener = listen(net, 3).await;
    let slow_port = listener.local_addr().unwrap().port();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let slow = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let _ = go_rx.await;
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        got
    });
    let _slow_server = register(&ctl, net, 3, slow_port).await;
    let held = pattern(32 << 20, 7);
    let mut stuck = TcpStream::connect(node.frontend(slow_port)).await.unwrap();
    let writer = {
        let held = held.clone();
        tokio::spawn(async move {
            stuck.write_all(&held).await.unwrap();
            stuck.shutdown().await.unwrap();
        })
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let relay = relay_stats(&node).await;
        if relay["pipes_in_use"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stuck connection never held the pipe: {relay}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Meanwhile another bulk connection finds the pool empty and copies, byte-exact.
    let (port, _server) = echo_backend(&ctl, net, 2).await;
    let payload = pattern(8 << 20, 9);
    let back = echo_through(node.frontend(port), payload.clone()).await;
    assert!(back == payload, "{} bytes came back through the fallback", back.len());
    let relay = relay_stats(&node).await;
    assert!(relay["pipe_pool_empty"].as_u64().unwrap() > 0, "{relay}");
    assert!(relay["copied_bytes"].as_u64().unwrap() >= 2 * payload.len() as u64, "{relay}");
    assert_eq!(relay["pipes"], 1, "{relay}");

    // The stuck connection resumes through its pipe and delivers everything.
    go_tx.send(()).unwrap();
    writer.await.unwrap();
    let got = timeout(DEADLINE, slow).await.expect("slow backend timed out").unwrap();
    assert!(got == held, "{} bytes reached the slow backend", got.len());
}
