//! Health checks of a server, and the rise/fall rule that turns check results into a verdict (HAProxy's
//! `rise`/`fall`): one failed check does not take a server out of rotation, and one good check does not put
//! it back. The agent runs them beside its server; the controller runs them on the static backends of its
//! configuration file.

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
    sync::watch,
    time::{Instant, MissedTickBehavior, timeout},
};
use tracing::{info, warn};

/// How a server is judged alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A TCP connection to the backend port succeeds.
    Tcp,
    /// This payload sent over UDP gets a reply (that starts with `expect`, when given).
    Udp {
        /// What is sent.
        send: Vec<u8>,
        /// What the reply must start with; `None`: any reply.
        expect: Option<Vec<u8>>,
    },
    /// An HTTP `GET`.
    Http(HttpCheck),
    /// `sh -c COMMAND` exits 0.
    Exec(String),
    /// Always healthy.
    None,
}

/// An HTTP `GET` check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// The path asked for, starting with `/`.
    pub path: String,
    /// Where the request goes when not to the backend itself (`http://HOST:PORT/PATH`).
    pub address: Option<SocketAddr>,
    /// The status that counts as healthy; `None`: any 2xx or 3xx.
    pub status: Option<u16>,
}

/// When checks run and how many results in a row change the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Time between two checks.
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// Good checks in a row that put an unhealthy server back in rotation.
    pub rise: u32,
    /// Failed checks in a row that take a healthy server out of rotation.
    pub fall: u32,
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

/// Longest HTTP status line and headers read before giving up on a reply.
const HTTP_HEAD_MAX: usize = 4096;

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
            Check::Udp { send, expect } => {
                let local = match target.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                let socket = UdpSocket::bind((local, 0)).await.map_err(|e| format!("udp socket: {e}"))?;
                socket.connect(target).await.map_err(|e| format!("udp {target}: {e}"))?;
                socket.send(send).await.map_err(|e| format!("udp send to {target}: {e}"))?;
                let mut buf = [0u8; 2048];
                let n = socket.recv(&mut buf).await.map_err(|e| format!("udp reply from {target}: {e}"))?;
                match expect {
                    Some(expect) if !buf[..n].starts_with(expect) => Err(format!(
                        "udp reply from {target}: {:?}, expected {:?}",
                        String::from_utf8_lossy(&buf[..n.min(64)]),
                        String::from_utf8_lossy(expect)
                    )),
                    _ => Ok(()),
                }
            }
            Check::Http(http) => http.probe(target).await,
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

    /// The check usual for a protocol: a TCP connect for TCP; none for UDP, whose servers answer nothing
    /// in general.
    pub fn default_for(protocol: crate::model::Protocol) -> Check {
        match protocol {
            crate::model::Protocol::Tcp => Check::Tcp,
            crate::model::Protocol::Udp => Check::None,
        }
    }
}

impl FromStr for Check {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("http://") {
            return HttpCheck::from_url(rest).map(Check::Http);
        }
        if s.starts_with("https:") {
            return Err(format!("{s:?}: HTTPS checks are not supported; use tcp, or exec: with a client of your own"));
        }
        let (kind, arg) = s.split_once(':').map_or((s, None), |(k, a)| (k, Some(a)));
        match (kind, arg) {
            ("tcp", None) => Ok(Check::Tcp),
            ("none", None) => Ok(Check::None),
            ("udp", Some(payload)) if !payload.is_empty() => {
                Ok(Check::Udp { send: payload.as_bytes().to_vec(), expect: None })
            }
            ("udp", _) => Err("a UDP check needs a payload to send, e.g. udp:ping".to_owned()),
            ("http", Some(path)) if path.starts_with('/') && !path.starts_with("//") => {
                Ok(Check::Http(HttpCheck { path: path.to_owned(), address: None, status: None }))
            }
            ("http", _) => {
                Err("an HTTP check needs a path, e.g. http:/health, or a whole URL, e.g. http://127.0.0.1:8080/health"
                    .to_owned())
            }
            ("exec", Some(command)) if !command.trim().is_empty() => Ok(Check::Exec(command.to_owned())),
            ("exec", _) => Err("an exec check needs a command, e.g. exec:pg_isready".to_owned()),
            _ => Err(format!("{s:?} is not tcp, udp:PAYLOAD, http:/PATH, http://IP:PORT/PATH, exec:COMMAND or none")),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Tcp => f.write_str("tcp"),
            Check::Udp { send, expect } => {
                write!(f, "udp:{}", String::from_utf8_lossy(send))?;
                match expect {
                    Some(expect) => write!(f, " (expect {:?})", String::from_utf8_lossy(expect)),
                    None => Ok(()),
                }
            }
            Check::Http(http) => {
                match http.address {
                    Some(address) => write!(f, "http://{address}{}", http.path)?,
                    None => write!(f, "http:{}", http.path)?,
                }
                match http.status {
                    Some(status) => write!(f, " (expect {status})"),
                    None => Ok(()),
                }
            }
            Check::Exec(command) => write!(f, "exec:{command}"),
            Check::None => f.write_str("none"),
        }
    }
}

// === impl HttpCheck ===

impl HttpCheck {
    /// `HOST[:PORT]/PATH` of an `http://` URL. The host must be an IP address (or `localhost`): a check
    /// that depends on name resolution would fail when DNS does, not when the server does.
    fn from_url(rest: &str) -> Result<Self, String> {
        let url = format!("http://{rest}");
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') || path.contains('#') {
            return Err(format!("{url:?}: user names and fragments have no place in a check URL"));
        }
        let with_port = |host: &str, port: Option<&str>| -> Result<SocketAddr, String> {
            let port = match port {
                Some(port) => port.parse::<u16>().map_err(|_| format!("{url:?}: {port:?} is not a port"))?,
                None => 80,
            };
            let ip = if host.eq_ignore_ascii_case("localhost") {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                host.parse::<IpAddr>().map_err(|_| {
                    format!("{url:?}: the host must be an IP address, e.g. http://127.0.0.1:8080/health (names are not resolved)")
                })?
            };
            Ok(SocketAddr::new(ip, port))
        };
        let address = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            with_port(host, after.strip_prefix(':'))?
        } else {
            match authority.split_once(':') {
                Some((host, port)) => with_port(host, Some(port))?,
                None => with_port(authority, None)?,
            }
        };
        Ok(HttpCheck { path: path.to_owned(), address: Some(address), status: None })
    }

    async fn probe(&self, backend: SocketAddr) -> Result<(), String> {
        let HttpCheck { path, address, status } = self;
        let target = address.unwrap_or(backend);
        let mut stream = TcpStream::connect(target).await.map_err(|e| format!("connect {target}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: switchboard-check\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("http {target}: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < HTTP_HEAD_MAX {
            let n = stream.read(&mut buf).await.map_err(|e| format!("http {target}: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let code =
            line.strip_prefix("HTTP/").and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse::<u16>().ok());
        match (code, status) {
            (Some(code), Some(expected)) if code == *expected => Ok(()),
            (Some(code), None) if (200..400).contains(&code) => Ok(()),
            (Some(code), Some(expected)) => Err(format!("GET {path}: status {code}, expected {expected}")),
            (Some(code), None) => Err(format!("GET {path}: status {code}")),
            (None, _) => Err(format!("GET {path}: not an HTTP response")),
        }
    }
}

// === impl Health ===

impl Health {
    /// Starts at the first check's verdict: a server that is down when checks start is out of rotation
    /// rather than sent traffic it cannot take.
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

/// Runs `check` against `target` on `schedule`, from one interval after now, and publishes the rise/fall
/// verdict on `verdict` when it changes (logged with `server` naming what is checked). Runs until the
/// receivers are gone or the task is aborted.
pub async fn follow(
    check: Check,
    target: SocketAddr,
    schedule: Schedule,
    mut health: Health,
    verdict: watch::Sender<bool>,
    server: impl fmt::Display,
) {
    let mut ticks = tokio::time::interval_at(Instant::now() + schedule.interval, schedule.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while !verdict.is_closed() {
        ticks.tick().await;
        let result = check.run(target, schedule.timeout).await;
        if let Some(healthy) = health.observe(result.is_ok()) {
            match &result {
                Ok(()) => info!(%server, %check, "server healthy again: back in rotation"),
                Err(why) => warn!(%server, %check, %why, "server failing: out of rotation"),
            }
            verdict.send_replace(healthy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_specs_parse_or_say_why() {
        assert_eq!("tcp".parse(), Ok(Check::Tcp));
        assert_eq!("none".parse(), Ok(Check::None));
        assert_eq!("udp:ping".parse(), Ok(Check::Udp { send: b"ping".to_vec(), expect: None }));
        assert_eq!(
            "http:/healthz".parse(),
            Ok(Check::Http(HttpCheck { path: "/healthz".into(), address: None, status: None }))
        );
        assert_eq!("exec:true".parse(), Ok(Check::Exec("true".into())));
        for bad in
            ["http:", "http:healthz", "udp:", "exec: ", "ping", "tcp:80", "http://example.org/", "https://127.0.0.1/"]
        {
            assert!(bad.parse::<Check>().is_err(), "{bad}");
        }
        assert!("http:".parse::<Check>().unwrap_err().starts_with("an HTTP check needs a path, e.g. http:/health"));
        // A URL names where the check goes, not a path on the backend.
        let url = |s: &str| match s.parse::<Check>() {
            Ok(Check::Http(http)) => (http.address.map(|a| a.to_string()), http.path),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(url("http://127.0.0.2/"), (Some("127.0.0.2:80".into()), "/".into()));
        assert_eq!(url("http://127.0.0.1:8080/health?x=1"), (Some("127.0.0.1:8080".into()), "/health?x=1".into()));
        assert_eq!(url("http://[::1]:81"), (Some("[::1]:81".into()), "/".into()));
        assert_eq!(url("http://localhost:9000/ok"), (Some("127.0.0.1:9000".into()), "/ok".into()));
        assert!("http://example.org/".parse::<Check>().unwrap_err().contains("must be an IP address"));
        assert!("http://127.0.0.1:99999/".parse::<Check>().unwrap_err().contains("is not a port"));
        assert_eq!(
            "http://127.0.0.1:8080/health".parse::<Check>().unwrap().to_string(),
            "http://127.0.0.1:8080/health"
        );
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
        assert_eq!(
            Check::Http(HttpCheck { path: "/".into(), address: None, status: None }).run(addr, limit).await,
            Err("GET /: status 503".into())
        );
        let expecting = |status| Check::Http(HttpCheck { path: "/".into(), address: None, status: Some(status) });
        assert_eq!(expecting(503).run(addr, limit).await, Ok(()));
        assert_eq!(expecting(200).run(addr, limit).await, Err("GET /: status 503, expected 200".into()));
        let elsewhere = Check::Http(HttpCheck { path: "/".into(), address: Some(addr), status: None });
        assert_eq!(elsewhere.run("127.0.0.1:1".parse().unwrap(), limit).await, Err("GET /: status 503".into()));
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
        assert_eq!(Check::Udp { send: b"ping".to_vec(), expect: None }.run(udp_addr, limit).await, Ok(()));
        assert!(
            Check::Udp { send: b"ping".to_vec(), expect: None }.run(closed, Duration::from_millis(300)).await.is_err()
        );
        let expect = |e: &[u8]| Check::Udp { send: b"ping".to_vec(), expect: Some(e.to_vec()) };
        assert_eq!(expect(b"pi").run(udp_addr, limit).await, Ok(()));
        assert!(expect(b"pong").run(udp_addr, limit).await.unwrap_err().contains("expected \"pong\""));
    }
}
