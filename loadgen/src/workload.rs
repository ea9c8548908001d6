//! What one request is, per workload, and the lane that performs requests one after another on its own
//! connection (or UDP socket). Buffers live in the lane, so the request path allocates nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use crate::error::ErrorKind;

/// A request/response workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Send `size` bytes, read them back; a new connection per request unless `keepalive`.
    Tcp {
        /// Reuse the connection.
        keepalive: bool,
        /// Payload size.
        size: usize,
    },
    /// HTTP/1.1 `GET path`; `Connection: close` unless `keepalive`.
    Http {
        /// Reuse the connection.
        keepalive: bool,
        /// Request path.
        path: String,
    },
    /// One datagram of `size` bytes, one reply expected.
    Udp {
        /// Payload size (at least 8: the sequence number).
        size: usize,
    },
}

/// One connection's worth of requests.
#[derive(Debug)]
pub struct Lane {
    target: SocketAddr,
    workload: Workload,
    conn: Option<TcpStream>,
    udp: Option<UdpSocket>,
    request: Vec<u8>,
    buf: Vec<u8>,
    seq: u64,
}

impl Lane {
    /// A lane towards `target`; it connects on its first request.
    pub fn new(target: SocketAddr, workload: Workload) -> Self {
        let request = match &workload {
            Workload::Tcp { size, .. } | Workload::Udp { size } => vec![b'x'; (*size).max(8)],
            Workload::Http { keepalive, path } => {
                let connection = if *keepalive { "keep-alive" } else { "close" };
                format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: switchboard-loadgen\r\nConnection: {connection}\r\n\r\n")
                    .into_bytes()
            }
        };
        Lane { target, workload, conn: None, udp: None, request, buf: Vec::with_capacity(16 * 1024), seq: 0 }
    }

    /// Forgets the connection (after a timeout its state is unknown).
    pub fn reset(&mut self) {
        self.conn = None;
        self.udp = None;
    }

    /// Performs one request; returns the bytes received.
    pub async fn request(&mut self) -> Result<u64, ErrorKind> {
        let result = match self.workload.clone() {
            Workload::Tcp { keepalive, .. } => self.echo(keepalive).await,
            Workload::Http { keepalive, .. } => self.http(keepalive).await,
            Workload::Udp { .. } => self.datagram().await,
        };
        if result.is_err() {
            self.reset();
        }
        result
    }

    async fn echo(&mut self, keepalive: bool) -> Result<u64, ErrorKind> {
        // Fields are borrowed, never moved out: a timeout drops this future midway, and the lane must keep
        // its request intact for the next one.
        let Lane { target, conn, request, buf, .. } = self;
        let stream = connection(conn, *target).await?;
        stream.write_all(request).await.map_err(|e| ErrorKind::of(&e))?;
        buf.resize(request.len(), 0);
        stream.read_exact(buf).await.map_err(|e| ErrorKind::of(&e))?;
        if buf != request {
            return Err(ErrorKind::Protocol);
        }
        if !keepalive {
            *conn = None;
        }
        Ok(request.len() as u64)
    }

    async fn http(&mut self, keepalive: bool) -> Result<u64, ErrorKind> {
        let Lane { target, conn, request, buf, .. } = self;
        let stream = connection(conn, *target).await?;
        stream.write_all(request).await.map_err(|e| ErrorKind::of(&e))?;
        let (status, bytes, reusable) = read_http_response(stream, buf).await?;
        if !keepalive || !reusable {
            *conn = None;
        }
        if (200..400).contains(&status) { Ok(bytes) } else { Err(ErrorKind::Status) }
    }

    async fn datagram(&mut self) -> Result<u64, ErrorKind> {
        if self.udp.is_none() {
            let local = match self.target.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let socket = UdpSocket::bind((local, 0)).await.map_err(|e| ErrorKind::of(&e))?;
            socket.connect(self.target).await.map_err(|e| ErrorKind::of(&e))?;
            self.udp = Some(socket);
        }
        let Some(socket) = self.udp.as_ref() else { return Err(ErrorKind::Connect) };
        self.seq += 1;
        self.request[..8].copy_from_slice(&self.seq.to_be_bytes());
        socket.send(&self.request).await.map_err(|e| ErrorKind::of(&e))?;
        self.buf.resize(65_536, 0);
        loop {
            let n = socket.recv(&mut self.buf).await.map_err(|e| ErrorKind::of(&e))?;
            // A late reply to an earlier (timed-out) request is skipped; ours ends with our sequence number
            // somewhere in it (echo servers may add a prefix).
            let seq = self.seq.to_be_bytes();
            if self.buf[..n].windows(8).any(|w| w == seq) {
                return Ok(n as u64);
            }
        }
    }
}

/// The lane's connection, made on first use.
async fn connection(conn: &mut Option<TcpStream>, target: SocketAddr) -> Result<&mut TcpStream, ErrorKind> {
    if conn.is_none() {
        let stream = TcpStream::connect(target).await.map_err(|e| ErrorKind::of(&e))?;
        let _ = stream.set_nodelay(true);
        *conn = Some(stream);
    }
    conn.as_mut().ok_or(ErrorKind::Connect)
}

/// Reads one HTTP/1.x response: (status, bytes, connection reusable).
async fn read_http_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, u64, bool), ErrorKind> {
    buf.clear();
    let header_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(ErrorKind::Protocol);
        }
        let n = stream.read_buf(buf).await.map_err(|e| ErrorKind::of(&e))?;
        if n == 0 {
            return Err(ErrorKind::Closed);
        }
    };
    let head = std::str::from_utf8(&buf[..header_end]).map_err(|_| ErrorKind::Protocol)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(ErrorKind::Protocol)?;
    let mut length = None;
    let mut close = status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let mut have = buf.len() - header_end;
    match length {
        Some(length) => {
            while have < length {
                buf.clear();
                let n = stream.read_buf(buf).await.map_err(|e| ErrorKind::of(&e))?;
                if n == 0 {
                    return Err(ErrorKind::Closed);
                }
                have += n;
            }
            Ok((status, (header_end + length) as u64, !close))
        }
        // No length: the body ends with the connection.
        None => {
            loop {
                buf.clear();
                let n = stream.read_buf(buf).await.map_err(|e| ErrorKind::of(&e))?;
                if n == 0 {
                    break;
                }
                have += n;
            }
            Ok((status, (header_end + have) as u64, false))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_request_cut_short_by_a_timeout_leaves_the_lane_intact() {
        // The first connection stalls; later ones echo.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((mut stream, _)) = listener.accept().await {
                let stall = std::mem::replace(&mut first, false);
                tokio::spawn(async move {
                    if stall {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let mut lane = Lane::new(target, Workload::Tcp { keepalive: true, size: 64 });
        let cut = tokio::time::timeout(Duration::from_millis(100), lane.request()).await;
        assert!(cut.is_err(), "the stalled request times out");
        lane.reset();
        assert_eq!(lane.request().await, Ok(64), "the next request sends and checks all 64 bytes");
        assert_eq!(lane.request().await, Ok(64));
    }
}
