//! Local health checks of the server beside the agent, and the rise/fall rule that turns check results
//! into a verdict (HAProxy's `rise`/`fall`): one failed check does not take a server out of rotation, and
//! one good check does not put it back.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    process::Command,
    time::timeout,
};

/// How the agent decides whether its server is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A TCP connection to the backend port succeeds.
    Tcp,
    /// This payload sent over UDP gets any reply.
    Udp(Vec<u8>),
    /// `GET PATH` answers 2xx or 3xx.
    Http(String),
    /// `sh -c COMMAND` exits 0.
    Exec(String),
    /// Always healthy.
    None,
}

/// Rise/fall state of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    healthy: bool,
    /// Results in a row that disagree with `healthy`.
    streak: u32,
    rise: u32,
    fall: u32,
}

// === impl Check ===

impl Check {
    /// Runs the check against `target` within `limit`.
    pub async fn run(&self, target: SocketAddr, limit: Duration) -> Result<(), String> {
        match timeout(limit, self.probe(target)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    async fn probe(&self, target: SocketAddr) -> Result<(), String> {
        match self {
            Check::None => Ok(()),
            Check::Tcp => TcpStream::connect(target).await.map(drop).map_err(|e| format!("connect {target}: {e}")),
            Check::Udp(payload) => {
                let local = match target.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                let socket = UdpSocket::bind((local, 0)).await.map_err(|e| format!("udp socket: {e}"))?;
                socket.connect(target).await.map_err(|e| format!("udp {target}: {e}"))?;
                socket.send(payload).await.map_err(|e| format!("udp send to {target}: {e}"))?;
                let mut buf = [0u8; 2048];
                socket.recv(&mut buf).await.map(drop).map_err(|e| format!("udp reply from {target}: {e}"))
            }
            Check::Http(path) => {
                let mut stream = TcpStream::connect(target).await.map_err(|e| format!("connect {target}: {e}"))?;
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: switchboard-agent\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).await.map_err(|e| format!("http {target}: {e}"))?;
                let mut head = Vec::with_capacity(256);
                let mut buf = [0u8; 256];
                while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
                    let n = stream.read(&mut buf).await.map_err(|e| format!("http {target}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let line = String::from_utf8_lossy(&head);
                let status = line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
                match status {
                    Some(code) if (200..400).contains(&code) => Ok(()),
                    Some(code) => Err(format!("GET {path}: status {code}")),
                    None => Err(format!("GET {path}: not an HTTP response")),
                }
            }
            Check::Exec(command) => {
                let status = Command::new("sh")
                    .args(["-c", command])
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|e| format!("exec {command:?}: {e}"))?;
                if status.success() { Ok(()) } else { Err(format!("exec {command:?}: {status}")) }
            }
        }
    }
}

impl FromStr for Check {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, arg) = s.split_once(':').map_or((s, None), |(k, a)| (k, Some(a)));
        match (kind, arg) {
            ("tcp", None) => Ok(Check::Tcp),
            ("none", None) => Ok(Check::None),
            ("udp", Some(payload)) if !payload.is_empty() => Ok(Check::Udp(payload.as_bytes().to_vec())),
            ("udp", _) => Err("a UDP check needs a payload to send, e.g. udp:ping".to_owned()),
            ("http", Some(path)) if path.starts_with('/') => Ok(Check::Http(path.to_owned())),
            ("http", _) => Err("an HTTP check needs a path, e.g. http:/health".to_owned()),
            ("exec", Some(command)) if !command.trim().is_empty() => Ok(Check::Exec(command.to_owned())),
            ("exec", _) => Err("an exec check needs a command, e.g. exec:pg_isready".to_owned()),
            _ => Err(format!("{s:?} is not tcp, udp:PAYLOAD, http:/PATH, exec:COMMAND or none")),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Tcp => f.write_str("tcp"),
            Check::Udp(payload) => write!(f, "udp:{}", String::from_utf8_lossy(payload)),
            Check::Http(path) => write!(f, "http:{path}"),
            Check::Exec(command) => write!(f, "exec:{command}"),
            Check::None => f.write_str("none"),
        }
    }
}

// === impl Health ===

impl Health {
    /// Starts at the first check's verdict: a server that is down when the agent starts is registered out
    /// of rotation rather than sent traffic it cannot take.
    pub fn new(healthy: bool, rise: u32, fall: u32) -> Self {
        Health { healthy, streak: 0, rise, fall }
    }

    /// The current verdict.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check result; returns the new verdict when it changes.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { self.rise } else { self.fall };
        if self.streak < needed {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_specs_parse_or_say_why() {
        assert_eq!("tcp".parse(), Ok(Check::Tcp));
        assert_eq!("none".parse(), Ok(Check::None));
        assert_eq!("udp:ping".parse(), Ok(Check::Udp(b"ping".to_vec())));
        assert_eq!("http:/healthz".parse(), Ok(Check::Http("/healthz".into())));
        assert_eq!("exec:true".parse(), Ok(Check::Exec("true".into())));
        for bad in ["http:", "http:healthz", "udp:", "exec: ", "ping", "tcp:80"] {
            assert!(bad.parse::<Check>().is_err(), "{bad}");
        }
        assert_eq!("http:".parse::<Check>().unwrap_err(), "an HTTP check needs a path, e.g. http:/health");
    }

    #[test]
    fn rise_and_fall_need_results_in_a_row() {
        let mut h = Health::new(true, 2, 3);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None, "a good result resets the count");
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false), "third failure in a row");
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true), "second success in a row");
        assert!(h.healthy());
    }

    #[tokio::test]
    async fn checks_against_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 503 Service Unavailable\r\n\r\n").await;
            }
        });
        let limit = Duration::from_secs(2);
        assert_eq!(Check::Tcp.run(addr, limit).await, Ok(()));
        assert_eq!(Check::Http("/".into()).run(addr, limit).await, Err("GET /: status 503".into()));
        assert_eq!(Check::Exec("exit 0".into()).run(addr, limit).await, Ok(()));
        assert!(Check::Exec("exit 3".into()).run(addr, limit).await.is_err());
        drop(TcpStream::connect(addr).await);

        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(Check::Tcp.run(closed, limit).await.is_err());
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], peer).await;
            }
        });
        assert_eq!(Check::Udp(b"ping".to_vec()).run(udp_addr, limit).await, Ok(()));
        assert!(Check::Udp(b"ping".to_vec()).run(closed, Duration::from_millis(300)).await.is_err());
    }
}
