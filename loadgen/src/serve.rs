//! Demo backends for tests, benchmarks and demos: a TCP echo, a UDP echo, and an HTTP server that can burn
//! CPU (`--work-us`) or wait (`--sleep-ms`) per request, like the CPU-bound web servers and the long/short
//! tasks of the course assignments. Each can register itself over the HW1 JSON channel (and answer hellos)
//! and reports how many connections it holds now and in total, to measure how evenly load is spread.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
};
use tracing::{info, warn};

use crate::error::LoadError;

/// Connections held by a demo backend.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    /// Open now (UDP: peers heard from in the last 30 s).
    pub active: AtomicU64,
    /// Since start (UDP: datagrams).
    pub total: AtomicU64,
}

struct Held<'a>(&'a Stats);

impl Stats {
    fn hold(&self) -> Held<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        Held(self)
    }

    /// `{"active":N,"total":N}`.
    pub fn json(&self) -> String {
        format!(
            r#"{{"active":{},"total":{}}}"#,
            self.active.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed)
        )
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How the HTTP backend behaves per request.
#[derive(Debug, Clone, Copy)]
pub struct HttpBehaviour {
    /// CPU spin per request, in microseconds.
    pub work_us: u64,
    /// Wait per request, in milliseconds.
    pub sleep_ms: u64,
}

/// A TCP listener with a backlog fit for a backend behind a balancer: the default of 128 overflows when
/// a proxy opens hundreds of connections at once, and the overflow shows up as connect timeouts there.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Echoes every TCP connection back.
pub async fn tcp_echo(listener: TcpListener, stats: Arc<Stats>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // Out of file descriptors: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let _held = stats.hold();
            let _ = stream.set_nodelay(true);
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Echoes every datagram back to its sender.
pub async fn udp_echo(socket: UdpSocket, stats: Arc<Stats>) {
    let mut buf = vec![0u8; 65_536];
    let mut peers: HashMap<SocketAddr, Instant> = HashMap::new();
    let mut pruned = Instant::now();
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
        stats.total.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        peers.insert(peer, now);
        if now.duration_since(pruned) > Duration::from_secs(1) {
            peers.retain(|_, seen| now.duration_since(*seen) < Duration::from_secs(30));
            pruned = now;
        }
        stats.active.store(peers.len() as u64, Ordering::Relaxed);
        let _ = socket.send_to(&buf[..n], peer).await;
    }
}

/// A small HTTP/1.1 server: `GET /stats` answers the counters, anything else a short body after the
/// configured work. Keep-alive unless the client asks to close.
pub async fn http(listener: TcpListener, behaviour: HttpBehaviour, stats: Arc<Stats>, name: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (stats, name) = (Arc::clone(&stats), name.clone());
        tokio::spawn(async move {
            let _held = stats.hold();
            let _ = http_connection(stream, behaviour, &stats, &name).await;
        });
    }
}

async fn http_connection(
    stream: TcpStream,
    behaviour: HttpBehaviour,
    stats: &Stats,
    name: &str,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut close = line.contains("HTTP/1.0");
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("connection")
            {
                close = value.trim().eq_ignore_ascii_case("close");
            }
        }
        let body = if path == "/stats" {
            stats.json()
        } else {
            if behaviour.work_us > 0 {
                spin(Duration::from_micros(behaviour.work_us));
            }
            if behaviour.sleep_ms > 0 {
                tokio::time::sleep(Duration::from_millis(behaviour.sleep_ms)).await;
            }
            format!("hello from {name}\n")
        };
        let connection = if close { "close" } else { "keep-alive" };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        write.write_all(response.as_bytes()).await?;
        if close {
            return write.shutdown().await;
        }
    }
}

/// Burns CPU for `work`: the CPU-bound server of the assignments (it blocks its worker thread on purpose).
fn spin(work: Duration) {
    let start = Instant::now();
    while start.elapsed() < work {
        std::hint::spin_loop();
    }
}

/// Serves `{"active":N,"total":N}` over HTTP to anything that connects.
pub async fn stats_http(listener: TcpListener, stats: Arc<Stats>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let body = stats.json();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// Registers `listen` (reached on public `port`) over the HW1 JSON channel at `controller`, from the listen
/// address, and answers hellos; reconnects and registers again whenever the channel drops. `registered`
/// fires on the first success; an error is returned only when the first registration is refused.
pub async fn register(
    controller: SocketAddr,
    protocol: &'static str,
    port: u16,
    listen: SocketAddr,
    registered: tokio::sync::oneshot::Sender<()>,
) -> Result<(), LoadError> {
    let mut first = Some(registered);
    loop {
        match register_once(controller, protocol, port, listen, &mut first).await {
            Ok(()) => warn!(%controller, "control channel closed; registering again"),
            Err(RegisterError::Refused(why)) if first.is_some() => {
                return Err(LoadError::Serve(format!("registration refused: {why}")));
            }
            Err(RegisterError::Refused(why) | RegisterError::Io(why)) => {
                warn!(%controller, %why, "registration failed; retrying")
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

enum RegisterError {
    Refused(String),
    Io(String),
}

async fn register_once(
    controller: SocketAddr,
    protocol: &str,
    port: u16,
    listen: SocketAddr,
    first: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), RegisterError> {
    let io = |e: std::io::Error| RegisterError::Io(e.to_string());
    let socket = if listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(io)?;
    // The controller takes the backend's address from the source of this connection.
    if !listen.ip().is_unspecified() {
        socket.bind(SocketAddr::new(listen.ip(), 0)).map_err(io)?;
    }
    let stream = socket.connect(controller).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let request =
        serde_json::json!({"cmd": "register", "protocol": protocol, "port": port, "backend_port": listen.port()});
    write.write_all(format!("{request}\n").as_bytes()).await.map_err(io)?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await.map_err(io)? {
        let message: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if message["cmd"] == "hello" {
            write.write_all(b"{\"ack\":\"hello\"}\n").await.map_err(io)?;
        } else if message["ack"] == "successful" {
            info!(%controller, protocol, port, %listen, "registered");
            if let Some(registered) = first.take() {
                let _ = registered.send(());
            }
        } else if message["ack"] == "failed" {
            return Err(RegisterError::Refused(message["msg"].as_str().unwrap_or_default().to_owned()));
        }
    }
    Ok(())
}
