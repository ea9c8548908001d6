//! Upgrades that drop nothing (`--takeover PATH`). A node started with the flag listens on that Unix
//! socket for its successor. A successor started with the same flag finds it there and receives, over the
//! socket (`SCM_RIGHTS`), the very listening sockets of its frontends (every worker's, TCP and UDP), the
//! routing state they serve, and the process's other listeners. It accepts on them at once and then tells
//! the old node to stop: nothing is closed or bound again, so no client ever meets a closed port. The old
//! node stops accepting, leaves its controller (the successor may take its node id), lets its connections
//! finish within the drain timeout and exits; its UDP frontends stop reading and carry their sessions'
//! replies until the sessions are idle, while new datagrams go to the successor.
//!
//! The exchange is one `SOCK_SEQPACKET` message per step, a kind byte then its body:
//!
//! | from      | kind | body                                                             |
//! |-----------|------|------------------------------------------------------------------|
//! | successor | `H`  | `{"version":1}`                                                  |
//! | node      | `S`  | a chunk of the routing snapshot (protobuf `Snapshot`), as many as needed |
//! | node      | `F`  | `{"protocol":"tcp","port":80}`, with up to 32 of its sockets      |
//! | node      | `L`  | `{"name":"admin"}`, with that listener                           |
//! | node      | `E`  | nothing: the offer is complete                                   |
//! | successor | `A`  | `{"listeners":["admin"]}`: accepting now, on these listeners too |
//! | node      | `D`  | nothing: stopped accepting, link to the controller closed        |
//!
//! Only a process of the same user (or root) may take over: the socket file is created mode 0600 and each
//! side checks the other's credentials (`SO_PEERCRED`). Every step has a timeout, the successor checks
//! each socket it receives (type, listening state, port) and bounds what it takes, and a successor that
//! fails half way leaves the old node serving as before.
//!
//! # Life of an upgrade
//!
//! A node started with `--takeover PATH` listens there (`EmbeddedNode::listen_for_successor`, a
//! `TakeoverListener`: `SOCK_SEQPACKET`, mode 0600, peer credentials checked). Its successor, started with
//! the same flags:
//!
//! 1. **Take over.** `take_over` connects and says hello; the old node's run loop answers a `TakeoverStep::Offer`
//!    between two snapshots with copies of every frontend's sockets (kept since `Node::open`) and the
//!    snapshot they serve; the process adds its listeners (admin; for a controller also JSON and gRPC). They
//!    cross with `SCM_RIGHTS`, 32 per message, and are owned where they are received
//!    (`sys::recv_with_descriptors`: no raw descriptor number leaves `sys.rs`); the successor checks each
//!    socket's type, state and port.
//! 2. **Accept.** `Node::inherit` applies the inherited snapshot with those sockets (`open` takes them
//!    instead of binding; a successor with more workers adds sockets to the `SO_REUSEPORT` group). Both
//!    processes now accept on the same sockets.
//! 3. **Release.** `Predecessor::release` sends `A`; the old node's `TakeoverStep::Release` cancels
//!    `RelayContext::handed_over`: TCP frontends stop accepting (their stop tokens are its children), UDP
//!    frontends stop reading and keep only their sessions' replies. The old process leaves its controller
//!    (the node id is free), stops the listeners the successor took, and answers `D`.
//! 4. **Serve.** The successor binds `PATH` (aside, then renamed over the old file), prints READY and
//!    follows the controller from the inherited version. The old node drains as at SIGTERM (`Node::stop`,
//!    UDP sessions until idle) and exits; it never removes the file. A controller's successor serves the
//!    inherited state through its warm-up while servers register again on the inherited listeners.

use std::{
    collections::HashMap,
    io::{self, IoSlice},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd, RawFd},
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use contract::{
    model::{Protocol, RoutingSnapshot, ServiceKey},
    v1,
};
use nix::sys::socket::{self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sockopt};
use prost::Message;
use serde::{Deserialize, Serialize};
use socket2::{SockRef, Socket, Type};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use crate::error::TakeoverError;
use crate::sys;

/// Version of the exchange; a successor of another version is refused.
const VERSION: u32 = 1;
/// Longest wait for the other side at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message either side reads.
const MAX_MESSAGE: usize = 64 * 1024;
/// Most descriptors in one message.
const FDS_PER_MESSAGE: usize = 32;
/// Largest routing snapshot a successor takes.
const MAX_SNAPSHOT: usize = 64 << 20;
/// Most frontend sockets a successor takes (ports × workers).
const MAX_SOCKETS: usize = 1 << 16;

/// What a node hands its successor: duplicates of its frontends' sockets and the routing state they
/// serve. The node keeps its own descriptors until it is released.
#[derive(Debug)]
pub struct FrontendOffer {
    /// The routing state in force.
    pub snapshot: Arc<RoutingSnapshot>,
    /// Every open frontend, with each worker's socket.
    pub frontends: Vec<(ServiceKey, Vec<OwnedFd>)>,
}

/// A request of the takeover server to its node.
#[derive(Debug)]
pub enum TakeoverStep {
    /// The node's frontends and routing state, between two snapshots (an error when the node cannot copy
    /// its sockets, e.g. out of descriptors).
    Offer(oneshot::Sender<io::Result<FrontendOffer>>),
    /// The successor accepts now: stop accepting and drain; answered once the node has stopped accepting.
    Release(oneshot::Sender<()>),
}

/// Sockets of one inherited frontend, one per worker of the old node.
#[derive(Debug)]
pub enum InheritedSockets {
    /// Listening TCP sockets.
    Tcp(Vec<std::net::TcpListener>),
    /// Bound UDP sockets.
    Udp(Vec<std::net::UdpSocket>),
}

/// What a successor received from the node it takes over.
#[derive(Debug)]
pub struct Inherited {
    /// The routing state the old node served.
    pub(crate) snapshot: RoutingSnapshot,
    /// The old node's frontends.
    pub(crate) frontends: HashMap<ServiceKey, InheritedSockets>,
    /// The old process's other listeners, by name (`admin`; the controller's `json`, `grpc`).
    pub(crate) listeners: HashMap<String, std::net::TcpListener>,
    /// The link to the old node, to release it.
    pub(crate) predecessor: Predecessor,
}

/// The successor's link to the node it takes over.
#[derive(Debug)]
pub struct Predecessor {
    link: Link,
    /// Names of the listeners taken, which the old process stops serving.
    taken: Vec<String>,
}

/// The Unix socket a node listens on for its successor. Dropped without a takeover, it removes its path
/// (unless another process has replaced the file meanwhile).
#[derive(Debug)]
pub struct TakeoverListener {
    link: Link,
    /// The socket file's device and inode, to remove only our own.
    file: (u64, u64),
    handed_over: bool,
}

/// One end of a takeover socket.
#[derive(Debug)]
struct Link {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct FrontendHeader {
    protocol: String,
    port: u16,
}

#[derive(Serialize, Deserialize)]
struct ListenerHeader {
    name: String,
}

#[derive(Serialize, Deserialize)]
struct Accepting {
    listeners: Vec<String>,
}

/// One received message.
struct Received {
    kind: u8,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

// === successor ===

/// Takes over the node listening at `path`: none when nobody listens there (no file, or a stale one),
/// else everything it hands over. The old node keeps accepting until the successor serves
/// ([`EmbeddedNode::inherit`](crate::EmbeddedNode::inherit) releases it).
pub async fn take_over(path: &Path) -> Result<Option<Inherited>, TakeoverError> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TakeoverError::Io { path: path.to_owned(), what: "stat", source }),
        Ok(meta) if !meta.file_type().is_socket() => return Err(TakeoverError::NotASocket(path.to_owned())),
        Ok(_) => {}
    }
    let fd = seqpacket().map_err(io_error(path, "socket"))?;
    let addr = UnixAddr::new(path).map_err(|e| io_error(path, "address")(e.into()))?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        // A socket file nobody listens on (left by a node that did not stop cleanly), or one removed
        // meanwhile by a node that stopped.
        Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT) => return Ok(None),
        Err(errno) => return Err(io_error(path, "connect")(errno.into())),
    }
    let link = Link::new(fd, path)?;
    link.check_peer()?;
    link.send(b'H', &json(&Hello { version: VERSION }), &[]).await?;
    let mut snapshot = Vec::new();
    let mut frontends: HashMap<ServiceKey, InheritedSockets> = HashMap::new();
    let mut listeners = HashMap::new();
    let mut sockets = 0usize;
    loop {
        let message = link.recv().await?;
        match message.kind {
            b'S' if snapshot.len() + message.body.len() <= MAX_SNAPSHOT => snapshot.extend_from_slice(&message.body),
            b'S' => return Err(exchange("the routing snapshot is too large")),
            b'F' => {
                let header: FrontendHeader = parse(&message.body)?;
                let protocol: Protocol =
                    header.protocol.parse().map_err(|_| exchange("a frontend of no known protocol"))?;
                sockets += message.fds.len();
                if sockets > MAX_SOCKETS || message.fds.is_empty() {
                    return Err(exchange("too many frontend sockets, or a frontend without one"));
                }
                let service = ServiceKey { protocol, port: header.port };
                let entry = frontends.entry(service).or_insert_with(|| match protocol {
                    Protocol::Tcp => InheritedSockets::Tcp(Vec::new()),
                    Protocol::Udp => InheritedSockets::Udp(Vec::new()),
                });
                for fd in message.fds {
                    let socket = checked(Socket::from(fd), service)?;
                    match entry {
                        InheritedSockets::Tcp(sockets) => sockets.push(socket.into()),
                        InheritedSockets::Udp(sockets) => sockets.push(socket.into()),
                    }
                }
            }
            b'L' => {
                let header: ListenerHeader = parse(&message.body)?;
                let [fd] = <[OwnedFd; 1]>::try_from(message.fds)
                    .map_err(|_| exchange("a listener message carries one socket"))?;
                let socket = Socket::from(fd);
                if socket.r#type().ok() != Some(Type::STREAM) || !socket.is_listener().unwrap_or(false) {
                    return Err(exchange(format!("listener {:?} is not a listening TCP socket", header.name)));
                }
                if listeners.len() >= 8 {
                    return Err(exchange("too many listeners"));
                }
                listeners.insert(header.name, socket.into());
            }
            b'E' => break,
            kind => return Err(exchange(format!("unexpected message {:?} in the offer", char::from(kind)))),
        }
    }
    let snapshot = v1::Snapshot::decode(snapshot.as_slice()).map_err(|e| exchange(format!("routing snapshot: {e}")))?;
    let snapshot = RoutingSnapshot::try_from(snapshot).map_err(|e| exchange(format!("routing snapshot: {e}")))?;
    info!(path = %path.display(), version = snapshot.version, frontends = frontends.len(), sockets, "took over the listening sockets of the running node");
    Ok(Some(Inherited { snapshot, frontends, listeners, predecessor: Predecessor { link, taken: Vec::new() } }))
}

/// A received frontend socket, checked to be what its header says: a listening TCP socket or a UDP
/// socket, bound to the service's port.
fn checked(socket: Socket, service: ServiceKey) -> Result<Socket, TakeoverError> {
    let wanted = match service.protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let port = socket.local_addr().ok().and_then(|addr| addr.as_socket()).map(|addr| addr.port());
    let listening = socket.is_listener().unwrap_or(false);
    if socket.r#type().ok() != Some(wanted) || port != Some(service.port) || listening != (wanted == Type::STREAM) {
        return Err(exchange(format!("a socket offered for {service} is not one")));
    }
    socket.set_nonblocking(true).map_err(|e| exchange(format!("socket of {service}: {e}")))?;
    Ok(socket)
}

impl Inherited {
    /// The old process's listener `name`, when it listens on `addr` (the one this process would bind);
    /// the old process stops serving it once released.
    pub fn listener(&mut self, name: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let listener = self.listeners.remove(name).filter(|l| l.local_addr().ok() == Some(addr))?;
        listener.set_nonblocking(true).ok()?;
        self.predecessor.taken.push(name.to_owned());
        Some(listener)
    }
}

impl Predecessor {
    /// Tells the old node that this one accepts now (also on the listeners taken), and waits until the old
    /// one has stopped accepting and left its controller. An old node that is gone counts as done.
    pub async fn release(self) -> Result<(), TakeoverError> {
        self.link.send(b'A', &json(&Accepting { listeners: self.taken }), &[]).await?;
        match self.link.recv().await {
            Ok(Received { kind: b'D', .. }) => Ok(()),
            Ok(other) => Err(exchange(format!("unexpected message {:?} after accepting", char::from(other.kind)))),
            Err(TakeoverError::Exchange(why)) if why == CLOSED => Ok(()),
            Err(error) => Err(error),
        }
    }
}

// === the running node ===

impl TakeoverListener {
    /// Listens on `path` (mode 0600), replacing whatever socket file is there in one rename, so the path
    /// never goes missing while a node runs.
    pub fn bind(path: &Path) -> Result<Self, TakeoverError> {
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && !meta.file_type().is_socket()
        {
            return Err(TakeoverError::NotASocket(path.to_owned()));
        }
        let name = path.file_name().ok_or_else(|| io_error(path, "path")(io::Error::other("no file name")))?;
        let aside = path.with_file_name(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
        let _ = std::fs::remove_file(&aside);
        let fd = seqpacket().map_err(io_error(path, "socket"))?;
        let addr = UnixAddr::new(&aside).map_err(|e| io_error(path, "address")(e.into()))?;
        let bound = socket::bind(fd.as_raw_fd(), &addr)
            .map_err(io::Error::from)
            .and_then(|()| std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o600)))
            .and_then(|()| socket::listen(&fd, Backlog::new(4).map_err(io::Error::from)?).map_err(io::Error::from))
            .and_then(|()| std::fs::rename(&aside, path))
            .and_then(|()| std::fs::symlink_metadata(path));
        let meta = bound.inspect_err(|_| {
            let _ = std::fs::remove_file(&aside);
        });
        let meta = meta.map_err(io_error(path, "bind"))?;
        info!(path = %path.display(), "listening for a successor (--takeover)");
        Ok(TakeoverListener { link: Link::new(fd, path)?, file: (meta.dev(), meta.ino()), handed_over: false })
    }

    /// Serves successors one at a time until one takes over: offers `listeners` and what `node` answers,
    /// and once the successor accepts, releases the node and calls `released` with the listeners the
    /// successor took (the caller stops serving those and leaves its controller) before confirming. A
    /// successor that fails leaves everything as it was.
    pub async fn serve(
        mut self,
        node: mpsc::Sender<TakeoverStep>,
        listeners: Vec<(&'static str, OwnedFd)>,
        released: impl FnOnce(&[String]),
    ) {
        let path = self.link.path.clone();
        loop {
            let successor = match self.accept().await {
                Ok(successor) => successor,
                Err(error) => {
                    warn!(%error, "takeover socket: a successor could not connect");
                    // A failing accept (descriptors exhausted) must not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match tokio::time::timeout(STEP_TIMEOUT * 3, offer(&successor, &node, &listeners)).await {
                Ok(Ok(accepting)) => {
                    let (reply, done) = oneshot::channel();
                    if node.send(TakeoverStep::Release(reply)).await.is_err() || done.await.is_err() {
                        return;
                    }
                    released(&accepting.listeners);
                    self.handed_over = true;
                    let _ = successor.send(b'D', &[], &[]).await;
                    info!(path = %path.display(), listeners = ?accepting.listeners, "the successor accepts now: stopped accepting, draining");
                    return;
                }
                Ok(Err(error)) => warn!(%error, "takeover failed; this node serves on"),
                Err(_) => warn!("takeover timed out; this node serves on"),
            }
        }
    }

    /// The next successor, checked to run as this process's user.
    async fn accept(&self) -> Result<Link, TakeoverError> {
        let path = &self.link.path;
        let fd = loop {
            let mut ready = self.link.fd.readable().await.map_err(|source| self.link.io("accept", source))?;
            // socket2's accept is accept4 with close-on-exec, and hands back an owned socket.
            let accepted = ready.try_io(|fd| SockRef::from(fd.get_ref()).accept().map(|(socket, _)| socket));
            match accepted {
                Ok(result) => break result.map_err(|source| self.link.io("accept", source))?,
                Err(_would_block) => continue,
            }
        };
        let link = Link::new(fd.into(), path)?;
        link.check_peer()?;
        Ok(link)
    }
}

/// One successor's exchange up to its `A`.
async fn offer(
    successor: &Link,
    node: &mpsc::Sender<TakeoverStep>,
    listeners: &[(&'static str, OwnedFd)],
) -> Result<Accepting, TakeoverError> {
    let hello = successor.recv().await?;
    let version = (hello.kind == b'H').then(|| parse::<Hello>(&hello.body)).transpose()?.map(|h| h.version);
    if version != Some(VERSION) {
        return Err(exchange(format!("the successor speaks version {version:?}, this node {VERSION}")));
    }
    let (reply, offered) = oneshot::channel();
    node.send(TakeoverStep::Offer(reply)).await.map_err(|_| exchange("the node has stopped"))?;
    let offered = offered.await.map_err(|_| exchange("the node has stopped"))?;
    let offered = offered.map_err(|e| exchange(format!("copying the frontends' sockets: {e}")))?;
    let snapshot = v1::Snapshot::from(offered.snapshot.as_ref()).encode_to_vec();
    for chunk in snapshot.chunks(MAX_MESSAGE - 1) {
        successor.send(b'S', chunk, &[]).await?;
    }
    for (service, fds) in &offered.frontends {
        let header = json(&FrontendHeader { protocol: service.protocol.as_str().to_owned(), port: service.port });
        for group in fds.chunks(FDS_PER_MESSAGE) {
            let raw: Vec<RawFd> = group.iter().map(AsRawFd::as_raw_fd).collect();
            successor.send(b'F', &header, &raw).await?;
        }
    }
    for (name, fd) in listeners {
        successor.send(b'L', &json(&ListenerHeader { name: (*name).to_owned() }), &[fd.as_raw_fd()]).await?;
    }
    successor.send(b'E', &[], &[]).await?;
    let accepting = successor.recv().await?;
    if accepting.kind != b'A' {
        return Err(exchange(format!("expected the successor to accept, got {:?}", char::from(accepting.kind))));
    }
    parse(&accepting.body)
}

impl Drop for TakeoverListener {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        // Only our own file: a successor may have replaced it meanwhile.
        if let Ok(meta) = std::fs::symlink_metadata(&self.link.path)
            && (meta.dev(), meta.ino()) == self.file
        {
            let _ = std::fs::remove_file(&self.link.path);
        }
    }
}

// === both sides ===

const CLOSED: &str = "the other side closed the takeover socket";

impl Link {
    fn new(fd: OwnedFd, path: &Path) -> Result<Self, TakeoverError> {
        SockRef::from(&fd).set_nonblocking(true).map_err(io_error(path, "register"))?;
        Ok(Link { fd: sys::async_fd(fd).map_err(io_error(path, "register"))?, path: path.to_owned() })
    }

    fn io(&self, what: &'static str, source: io::Error) -> TakeoverError {
        io_error(&self.path, what)(source)
    }

    /// Refuses a peer of another user (root may take over anyone's node, as it may read its memory).
    fn check_peer(&self) -> Result<(), TakeoverError> {
        let peer = socket::getsockopt(self.fd.get_ref(), sockopt::PeerCredentials)
            .map_err(|e| self.io("peer credentials", e.into()))?;
        let own = nix::unistd::geteuid().as_raw();
        if peer.uid() != own && peer.uid() != 0 {
            return Err(TakeoverError::Foreign { path: self.path.clone(), uid: peer.uid() });
        }
        Ok(())
    }

    /// Sends one message, with `fds` attached, within the step timeout.
    async fn send(&self, kind: u8, body: &[u8], fds: &[RawFd]) -> Result<(), TakeoverError> {
        let send = async {
            loop {
                let mut ready = self.fd.writable().await?;
                let sent = ready.try_io(|fd| {
                    let kind = [kind];
                    let iov = [IoSlice::new(&kind), IoSlice::new(body)];
                    let rights = [ControlMessage::ScmRights(fds)];
                    let cmsgs = if fds.is_empty() { &rights[..0] } else { &rights[..] };
                    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                        .map_err(io::Error::from)
                });
                if let Ok(result) = sent {
                    return result.map(drop);
                }
            }
        };
        match tokio::time::timeout(STEP_TIMEOUT, send).await {
            Ok(result) => result.map_err(|source| self.io("send", source)),
            Err(_) => Err(exchange("timed out sending")),
        }
    }

    /// Receives one message within the step timeout; its descriptors are this process's from here on.
    async fn recv(&self) -> Result<Received, TakeoverError> {
        let recv = async {
            let mut body = vec![0u8; MAX_MESSAGE];
            let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
            loop {
                let mut ready = self.fd.readable().await?;
                let got = ready.try_io(|fd| sys::recv_with_descriptors(fd.get_ref().as_fd(), &mut body, &mut space));
                if let Ok(result) = got {
                    let sys::ReceivedMessage { len, truncated, fds } = result?;
                    body.truncate(len);
                    return Ok::<_, io::Error>((body, truncated, fds));
                }
            }
        };
        let (body, truncated, fds) = match tokio::time::timeout(STEP_TIMEOUT, recv).await {
            Ok(result) => result.map_err(|source| self.io("receive", source))?,
            Err(_) => return Err(exchange("timed out waiting for the other side")),
        };
        let Some((&kind, rest)) = body.split_first() else { return Err(exchange(CLOSED)) };
        if truncated {
            return Err(exchange("a message longer than allowed"));
        }
        Ok(Received { kind, body: rest.to_vec(), fds })
    }
}

/// A non-blocking, close-on-exec `SOCK_SEQPACKET` Unix socket: message boundaries are kept, and the
/// descriptors of a message arrive with that message.
fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

fn json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, TakeoverError> {
    serde_json::from_slice(body).map_err(|e| exchange(format!("bad message: {e}")))
}

/// What the OS said while `what` was being done on the takeover socket at `path`.
fn io_error<'a>(path: &'a Path, what: &'static str) -> impl Fn(io::Error) -> TakeoverError + 'a {
    move |source| TakeoverError::Io { path: path.to_owned(), what, source }
}

fn exchange(why: impl Into<String>) -> TakeoverError {
    TakeoverError::Exchange(why.into())
}
