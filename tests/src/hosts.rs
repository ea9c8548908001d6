//! Hosts for end-to-end tests: the machine itself ([`Host::Root`]), or network namespaces joined by a
//! bridge ([`Network`]), so several "hosts" with their own addresses run on one machine.
//!
//! Everything a test does on a namespace host (processes, sockets) happens inside that namespace: processes
//! start under `ip netns exec`, sockets are created on a fresh thread that has entered the namespace. The
//! namespaces have no link to the machine's own network, so their traffic cannot leave them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    process::Command,
};

/// Where a process or socket of a test lives.
#[derive(Debug, Clone)]
pub enum Host {
    /// The machine's own network (tests use 127.0.0.0/8 there).
    Root,
    /// A network namespace of a [`Network`].
    Ns(Arc<Namespace>),
}

/// One namespace host.
#[derive(Debug)]
pub struct Namespace {
    /// `ip netns` name.
    pub name: String,
    /// Its address on the bridge.
    pub ip: IpAddr,
}

impl Host {
    /// A command that runs `program` on this host.
    pub fn command(&self, program: &Path) -> Command {
        match self {
            Host::Root => Command::new(program),
            Host::Ns(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &ns.name]).arg(program);
                cmd
            }
        }
    }

    /// Runs `f` on a thread inside this host's network namespace (directly for the root host).
    async fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
        let Host::Ns(ns) = self else { return f() };
        let path = format!("/run/netns/{}", ns.name);
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A thread of its own: entering a namespace is for the rest of the thread's life.
        std::thread::spawn(move || {
            let entered = File::open(&path).and_then(|f| setns(f, CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
            let _ = tx.send(entered.and_then(|()| f()));
        });
        rx.await.unwrap_or_else(|_| Err(io::Error::other("namespace thread died")))
    }

    /// Connects to `addr` from `source` (any address of the host when `None`).
    pub async fn tcp_connect(&self, addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let stream = self
            .inside(move || {
                let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
                if let Some(source) = source {
                    socket.bind(&SocketAddr::new(source, 0).into())?;
                }
                socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
                socket.set_nonblocking(true)?;
                Ok(std::net::TcpStream::from(socket))
            })
            .await?;
        TcpStream::from_std(stream)
    }

    /// Listens on `addr`.
    pub async fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let listener = self
            .inside(move || {
                let listener = std::net::TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .await?;
        TcpListener::from_std(listener)
    }

    /// A UDP socket bound to `addr`.
    pub async fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let socket = self
            .inside(move || {
                let socket = std::net::UdpSocket::bind(addr)?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })
            .await?;
        UdpSocket::from_std(socket)
    }
}

/// Network namespaces on one bridge: a small LAN of test hosts, removed when dropped.
#[derive(Debug)]
pub struct Network {
    switch: String,
    hosts: Vec<Arc<Namespace>>,
}

impl Network {
    /// Why network namespaces cannot be made here, if they cannot (not root). Tests that need them skip
    /// with this reason ([`crate::tools::skip`]); as root, a failure to create them is a test failure.
    pub fn unavailable() -> Option<String> {
        (!nix::unistd::geteuid().is_root()).then(|| "network namespaces need root".to_owned())
    }

    /// Creates one namespace per name, each with an address in a /24 of its own, all on one bridge.
    pub async fn create(names: &[&str]) -> Result<Network, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("sb{}x{n}", std::process::id() % 100_000);
        // 10.231.X.0/24, only ever inside these namespaces.
        let subnet = u8::try_from((std::process::id() + n) % 250).unwrap();
        let mut network = Network { switch: format!("{tag}-sw"), hosts: Vec::new() };
        ip(&["netns", "add", &network.switch]).await?;
        ip(&["-n", &network.switch, "link", "add", "br0", "type", "bridge"]).await?;
        ip(&["-n", &network.switch, "link", "set", "br0", "up"]).await?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{tag}-{name}");
            let address = Ipv4Addr::new(10, 231, subnet, u8::try_from(i + 1).unwrap());
            ip(&["netns", "add", &ns]).await?;
            network.hosts.push(Arc::new(Namespace { name: ns.clone(), ip: IpAddr::V4(address) }));
            let port = format!("p{i}");
            ip(&["-n", &ns, "link", "set", "lo", "up"]).await?;
            ip(&["-n", &network.switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])
                .await?;
            ip(&["-n", &network.switch, "link", "set", &port, "master", "br0"]).await?;
            ip(&["-n", &network.switch, "link", "set", &port, "up"]).await?;
            ip(&["-n", &ns, "addr", "add", &format!("{address}/24"), "dev", "eth0"]).await?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"]).await?;
        }
        Ok(network)
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Host {
        let suffix = format!("-{name}");
        let ns = self.hosts.iter().find(|h| h.name.ends_with(&suffix)).expect("no such host");
        Host::Ns(Arc::clone(ns))
    }

    /// The address of host `name`.
    pub fn ip(&self, name: &str) -> IpAddr {
        match self.host(name) {
            Host::Ns(ns) => ns.ip,
            Host::Root => unreachable!(),
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and with it the other end.
        for ns in self.hosts.iter().map(|h| h.name.as_str()).chain([self.switch.as_str()]) {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

async fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}
