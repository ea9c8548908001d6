//! Demo backends: TCP and UDP echo servers, Python's HTTP server, and a registered pair of echoes.

#[allow(clippy::wildcard_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------------
// Demo backends

/// A TCP echo server that counts the connections it accepted.
pub struct TcpEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpEcho {
    /// Listens on `ip` at `port` (0 for any) on the machine.
    pub async fn start(ip: IpAddr, port: u16) -> TcpEcho {
        TcpEcho::start_on(&Host::Root, ip, port).await
    }

    /// Listens on `ip` at `port` (0 for any) on `host`.
    pub async fn start_on(host: &Host, ip: IpAddr, port: u16) -> TcpEcho {
        let mut listener = host.tcp_listen(SocketAddr::new(ip, port)).await.expect("echo bind");
        // A service may not use a controller's own port: an ephemeral port that happens to be one is no good.
        while port == 0 && is_controller_port(listener.local_addr().unwrap().port()) {
            listener = host.tcp_listen(SocketAddr::new(ip, port)).await.expect("echo bind");
        }
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        TcpEcho { addr, accepted, task }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP server that answers each datagram with `NAME:` followed by the datagram.
pub struct UdpEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl UdpEcho {
    /// Listens on `ip` at `port` (0 for any), answering with `name` as prefix.
    pub async fn start(ip: IpAddr, port: u16, name: &str) -> UdpEcho {
        let mut socket = Host::Root.udp_bind(SocketAddr::new(ip, port)).await.expect("udp echo bind");
        while port == 0 && is_controller_port(socket.local_addr().unwrap().port()) {
            socket = Host::Root.udp_bind(SocketAddr::new(ip, port)).await.expect("udp echo bind");
        }
        let addr = socket.local_addr().unwrap();
        let prefix = format!("{name}:").into_bytes();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = prefix.clone();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        UdpEcho { addr, task }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `python3 -m http.server` on `addr`, killed when dropped; returns once it accepts connections.
pub async fn http_server(addr: SocketAddr) -> Child {
    let port = addr.port().to_string();
    let child = spawn_quiet("python3", ["-m", "http.server", &port, "--bind", &addr.ip().to_string()]);
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "http.server on {addr} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

/// Two TCP echo servers on hosts 2 and 3 of a controller's network, on one port, each registered over its
/// own JSON channel (kept open, answering hellos, while the pair lives).
pub struct EchoPair {
    /// The server on host 2 (first in round robin order).
    pub a: TcpEcho,
    /// The server on host 3.
    pub b: TcpEcho,
    /// The service port.
    pub port: u16,
    /// Host 2's control channel.
    pub server_a: JsonClient,
    /// Host 3's control channel.
    pub server_b: JsonClient,
}

impl EchoPair {
    /// Starts and registers the pair, and waits until every node serves both.
    pub async fn registered(ctl: &Controller) -> EchoPair {
        let net = ctl.net;
        let a = TcpEcho::start(net.host(2), 0).await;
        let port = a.addr.port();
        let b = TcpEcho::start(net.host(3), port).await;
        let mut server_a = JsonClient::connect(ctl, net.host(2)).await;
        let mut server_b = JsonClient::connect(ctl, net.host(3)).await;
        assert_eq!(server_a.register("tcp", port).await, json!({"ack": "successful"}));
        assert_eq!(server_b.register("tcp", port).await, json!({"ack": "successful"}));
        ctl.wait_state("two tcp backends", |s| Controller::backends(s, "tcp", port).len() == 2).await;
        EchoPair { a, b, port, server_a, server_b }
    }
}
