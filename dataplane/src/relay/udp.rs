//! UDP relay: one session per client address, pinned to one backend through its own connected upstream
//! socket; replies leave from the frontend socket so the client sees the address it wrote to.
//!
//! The session table is owned by the frontend's receive task alone, so the per-datagram path takes no
//! lock: session tasks report their end over a channel instead of touching the table.
//!
//! Each worker has its own socket on the frontend's port (the kernel sends a client always to the same one)
//! and receives in batches: one recvmmsg(2) takes every datagram waiting, up to [`BATCH_SIZE`], into the
//! worker's buffers, and each goes on to its session's upstream socket without an `.await`.
//!
//! Memory follows the sessions open, not the sessions ever opened: a session holds no buffer while it
//! waits (replies are copied through a buffer borrowed from the worker thread), and the table gives its
//! room back when it empties.
//!
//! A flood of new client addresses (spoofed, most often) meets the frontend's bound and the caps per client
//! address and per prefix ([`super::sources`]), which keep one network from taking the table. A session
//! whose backend has not answered yet ends after `--udp-unanswered-timeout`, long before the idle timeout.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use contract::{
    limit::{Limit, Permit, Throttle, WARN_EVERY},
    model::ServiceKey,
};
use socket2::SockRef;
use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::mpsc,
    task::{AbortHandle, JoinSet},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

use super::{
    RelayContext,
    batch::{Batch, MAX_DATAGRAM},
    sources::{SourceCaps, SourceSlot},
};
use crate::proxy;
use crate::{
    access_log::{AccessLog, AccessRecord},
    metrics::{Dropped, FrontendStats},
    stats::{BackendStats, ConnectionGuard},
    table::RoutingTable,
};

pub use super::batch::BATCH_SIZE;

thread_local! {
    /// One reply buffer per worker thread, borrowed for a synchronous receive-and-send, never across an
    /// `.await`: idle sessions hold none.
    static REPLY: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
    /// One receive batch per worker thread, used the same way.
    static BATCH: RefCell<Batch> = RefCell::new(Batch::new());
}

struct Session {
    id: u64,
    backend: SocketAddr,
    upstream: Arc<UdpSocket>,
    /// The backend's counters.
    stats: Arc<BackendStats>,
    /// What the frontend and the session's task both update.
    shared: Arc<SessionShared>,
    /// Table version at which `backend` was last seen in rotation.
    checked_version: u64,
    /// The PROXY v2 header sent before each datagram, when the service asks for one.
    header: Option<Box<[u8]>>,
    task: AbortHandle,
    /// The session's place in the frontend's bound.
    _slot: Permit,
    /// Its place under its client address's and prefix's caps.
    _source: SourceSlot,
}

/// What bounds the sessions of one frontend, across all its workers.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// The whole table (`--udp-max-sessions`).
    pub slots: Arc<Limit>,
    /// Per client address and per prefix.
    pub sources: Arc<SourceCaps>,
}

/// What a session's two halves (the frontend's receive path and the session's task) share.
#[derive(Debug, Default)]
struct SessionShared {
    /// Milliseconds since the frontend started, of the last datagram either way.
    last_active: AtomicU64,
    /// Datagrams and bytes from the client passed to the backend.
    datagrams_in: AtomicU64,
    bytes_in: AtomicU64,
}

/// Everything a session task needs besides its own upstream socket. Dropping it (the session ended, or
/// was aborted) writes its access-log record.
struct SessionTask {
    id: u64,
    service: ServiceKey,
    peer: SocketAddr,
    backend: SocketAddr,
    frontend: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    shared: Arc<SessionShared>,
    epoch: Instant,
    idle: Duration,
    /// How long the session may wait for its backend's first reply (`--udp-unanswered-timeout`).
    unanswered: Duration,
    /// The backend has replied at least once: the idle timeout applies from then on.
    answered: bool,
    guard: ConnectionGuard,
    /// The upstream socket's descriptor, from the node's client share.
    _fd: Permit,
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    /// Replies passed to the client: datagrams and bytes.
    datagrams_out: u64,
    bytes_out: u64,
    opened: Instant,
    /// How the session ended, for its access-log record: unless the task says otherwise, the node closed
    /// it (its backend left rotation, a send failed, or the frontend closed).
    end: &'static str,
    access_log: Option<(AccessLog, Option<SocketAddr>)>,
}

/// Relays datagrams of `service` arriving on one worker's socket until `stop` fires (the frontend closes).
/// Every session of this socket ends with it, and is waited for, so the port is really released when this
/// returns. `bounds` bound the frontend's sessions across all its workers.
pub async fn serve(
    socket: std::net::UdpSocket,
    service: ServiceKey,
    ctx: Arc<RelayContext>,
    stats: Arc<FrontendStats>,
    bounds: Bounds,
    stop: CancellationToken,
) {
    let local = socket.local_addr().ok();
    let frontend = match UdpSocket::from_std(socket) {
        Ok(socket) => Arc::new(socket),
        Err(error) => {
            warn!(%service, %error, "frontend socket unusable on this worker");
            return;
        }
    };
    let (ended, mut ended_rx) = mpsc::unbounded_channel();
    let mut relay = FrontendSocket {
        service,
        ctx,
        stats,
        bounds,
        frontend,
        local,
        epoch: Instant::now(),
        sessions: HashMap::new(),
        tasks: JoinSet::new(),
        ended,
        next_id: 0,
        full: Throttle::new(WARN_EVERY),
        handed_over: false,
    };
    let handed_over = relay.ctx.handed_over.clone();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                relay.tasks.shutdown().await;
                return;
            }
            // A successor reads the socket now: new datagrams are its; the sessions here only carry their
            // backends' replies, until they are idle.
            () = handed_over.cancelled(), if !relay.handed_over => {
                relay.handed_over = true;
            }
            Some((peer, id)) = ended_rx.recv() => relay.ended(peer, id),
            ready = relay.frontend.readable(), if !relay.handed_over => match ready {
                Ok(()) => relay.receive_batch(),
                Err(error) => debug!(%service, %error, "frontend socket failed"),
            },
        }
        if relay.handed_over && relay.sessions.is_empty() {
            return;
        }
    }
}

/// One worker's socket of a UDP frontend, with the sessions of the clients the kernel sends it.
struct FrontendSocket {
    service: ServiceKey,
    ctx: Arc<RelayContext>,
    stats: Arc<FrontendStats>,
    bounds: Bounds,
    frontend: Arc<UdpSocket>,
    /// The frontend's address, for access-log records.
    local: Option<SocketAddr>,
    epoch: Instant,
    sessions: HashMap<SocketAddr, Session>,
    tasks: JoinSet<()>,
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
    next_id: u64,
    full: Throttle,
    /// A successor reads the socket now (`--takeover`).
    handed_over: bool,
}

impl FrontendSocket {
    /// Receives every datagram waiting on the socket (up to one batch, in one call) and passes each on.
    fn receive_batch(&mut self) {
        BATCH.with_borrow_mut(|batch| {
            let fd = self.frontend.as_raw_fd();
            match self.frontend.try_io(Interest::READABLE, || batch.receive(fd)) {
                Ok(truncated) => {
                    for _ in 0..truncated {
                        self.stats.dropped(Dropped::Truncated);
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    debug!(service = %self.service, %error, "receive failed");
                    return;
                }
            }
            // One table read per batch.
            let table = self.ctx.table.load();
            let now = elapsed_ms(self.epoch);
            for &(index, len, peer) in &batch.received {
                self.forward(&batch.buffers[index][..len], peer, &table, now);
            }
        });
    }

    fn forward(&mut self, datagram: &[u8], peer: SocketAddr, table: &RoutingTable, now: u64) {
        let service = self.service;
        // A session whose backend left rotation ends here, so its next datagram is re-balanced.
        if let Some(session) = self.sessions.get_mut(&peer)
            && session.checked_version != table.version
        {
            if table.contains(&service, session.backend) {
                session.checked_version = table.version;
            } else if let Some(gone) = self.sessions.remove(&peer) {
                gone.task.abort();
            }
        }
        if !self.sessions.contains_key(&peer) {
            let Some(session) = self.open_session(peer, table, now) else { return };
            self.sessions.insert(peer, session);
        }
        let Some(session) = self.sessions.get(&peer) else { return };
        session.shared.last_active.store(now, Ordering::Relaxed);
        // Straight to the socket: a UDP send never waits, and the runtime's readiness of a socket this new
        // would refuse it before trying.
        let sent = match &session.header {
            // One datagram, header first, without copying the payload.
            Some(header) => SockRef::from(&*session.upstream)
                .send_vectored(&[io::IoSlice::new(header), io::IoSlice::new(datagram)])
                .map(|sent| sent.saturating_sub(header.len())),
            None => SockRef::from(&*session.upstream).send(datagram),
        };
        match sent {
            Ok(sent) => {
                session.stats.datagram_in(sent);
                // The session's own counts are for its access-log record only.
                if self.ctx.access_log.is_some() {
                    session.shared.datagrams_in.fetch_add(1, Ordering::Relaxed);
                    session.shared.bytes_in.fetch_add(sent as u64, Ordering::Relaxed);
                }
            }
            // The upstream socket's send buffer is full: like any full queue on the way, the datagram is lost.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.stats.dropped(Dropped::UpstreamBusy);
                debug!(%service, client = %peer, backend = %session.backend, "upstream busy; datagram dropped");
            }
            Err(error) => {
                self.stats.dropped(Dropped::SendFailed);
                debug!(%service, client = %peer, backend = %session.backend, %error, "send to backend failed; session ends");
                if let Some(gone) = self.sessions.remove(&peer) {
                    gone.task.abort();
                }
            }
        }
    }

    /// A session ended by itself (idle, or its backend unreachable).
    fn ended(&mut self, peer: SocketAddr, id: u64) {
        if self.sessions.get(&peer).is_some_and(|s| s.id == id) {
            self.sessions.remove(&peer);
            // After a burst the table gives its room back, and so does the allocator.
            if self.sessions.capacity() > 64 && self.sessions.len() < self.sessions.capacity() / 4 {
                self.sessions.shrink_to(self.sessions.len() * 2);
                crate::sys::release_free_memory();
            }
        }
        while self.tasks.try_join_next().is_some() {}
    }

    fn open_session(&mut self, peer: SocketAddr, table: &RoutingTable, now: u64) -> Option<Session> {
        let service = self.service;
        let Some(slot) = self.bounds.slots.try_take(1) else {
            self.stats.dropped(Dropped::SessionLimit);
            if let Some(held_back) = self.full.admit(Instant::now()) {
                warn!(%service, max = self.bounds.slots.max(), dropped_since_last_warning = held_back + 1, "session table full: datagrams of new clients are dropped");
            }
            return None;
        };
        // Taken after the table's slot, so a full table costs no lock; refused, the slot goes back.
        let source = match self.bounds.sources.try_take(peer.ip(), Instant::now()) {
            Ok(source) => source,
            Err(reached) => {
                self.stats.dropped(reached.cap.dropped());
                if let Some(held_back) = reached.warn {
                    warn!(%service, client = %peer, cap = %reached.cap, dropped_since_last_warning = held_back + 1, "session cap reached: datagrams of new clients from there are dropped");
                }
                return None;
            }
        };
        let route = table.route(&service);
        let picked = route
            .as_ref()
            .and_then(|route| route.candidates(peer.ip()).next().map(|b| (b.address, Arc::clone(&b.stats))));
        let header = route.filter(|r| r.proxy.send_v2).map(|_| {
            let to =
                self.local.unwrap_or_else(|| SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), service.port));
            proxy::encode_v2(proxy::Transport::Dgram, peer, to).into_boxed_slice()
        });
        let Some((address, stats)) = picked else {
            self.stats.dropped(Dropped::NoBackend);
            return None;
        };
        let Some(fd) = self.ctx.client_fds.try_take(1) else {
            self.ctx.client_fds.refused();
            self.stats.dropped(Dropped::FdLimit);
            return None;
        };
        let upstream = match connect_upstream(address) {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                self.stats.dropped(Dropped::UpstreamSocket);
                debug!(%service, backend = %address, %error, "cannot open an upstream socket");
                return None;
            }
        };
        self.next_id += 1;
        let id = self.next_id;
        let shared = Arc::new(SessionShared { last_active: AtomicU64::new(now), ..SessionShared::default() });
        let task = SessionTask {
            id,
            service,
            peer,
            backend: address,
            frontend: Arc::clone(&self.frontend),
            upstream: Arc::clone(&upstream),
            shared: Arc::clone(&shared),
            epoch: self.epoch,
            idle: self.ctx.udp_idle_timeout,
            unanswered: self.ctx.udp_unanswered_timeout,
            answered: false,
            guard: stats.open(),
            _fd: fd,
            ended: self.ended.clone(),
            datagrams_out: 0,
            bytes_out: 0,
            opened: Instant::now(),
            end: "closed",
            access_log: self.ctx.access_log.clone().map(|log| (log, self.local)),
        };
        debug!(%service, client = %peer, backend = %address, "session opened");
        // Sessions aborted since (backend out of rotation, send failure) are reaped here, not left to pile up.
        while self.tasks.try_join_next().is_some() {}
        let span = debug_span!("session", %service, client = %peer, backend = %address);
        let task = self.tasks.spawn(task.run().instrument(span));
        Some(Session {
            id,
            backend: address,
            upstream,
            stats,
            shared,
            checked_version: table.version,
            header,
            task,
            _slot: slot,
            _source: source,
        })
    }
}

/// A socket of its own toward `backend`, connected so only the backend's replies reach it.
fn connect_upstream(backend: SocketAddr) -> io::Result<UdpSocket> {
    let unspecified = match backend.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = std::net::UdpSocket::bind((unspecified, 0))?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

// === impl SessionTask ===

impl SessionTask {
    /// Carries replies back to the client until the session is idle (or, before the backend's first
    /// reply, unanswered for `unanswered`) or the backend is unreachable.
    async fn run(mut self) {
        loop {
            let last = self.shared.last_active.load(Ordering::Relaxed);
            let idle = if self.answered { self.idle } else { self.unanswered };
            let idle_at = self.epoch + Duration::from_millis(last) + idle;
            let readable = tokio::select! {
                readable = tokio::time::timeout_at(idle_at, self.upstream.readable()) => readable,
                () = self.guard.evicted() => {
                    debug!(client = %self.peer, "session closed: drain time is over");
                    self.end = "drained";
                    break;
                }
            };
            let passed = match readable {
                Ok(Ok(())) => self.pass_replies(),
                Ok(Err(error)) => Err(error),
                // Timed out: idle only if nothing arrived from the client meanwhile either.
                Err(_) if self.shared.last_active.load(Ordering::Relaxed) == last => {
                    self.end = if self.answered { "idle" } else { "unanswered" };
                    break;
                }
                Err(_) => continue,
            };
            match passed {
                // Readiness without a datagram: wait again.
                Ok(Replies { count: 0, .. }) => {}
                Ok(Replies { count, bytes, pending }) => {
                    self.answered = true;
                    self.guard.stats().datagrams_out(count, bytes);
                    self.datagrams_out += count;
                    self.bytes_out += bytes;
                    self.shared.last_active.store(elapsed_ms(self.epoch), Ordering::Relaxed);
                    // The client's socket buffer was full: this one reply waits its turn.
                    if let Some(datagram) = pending
                        && let Err(error) = self.frontend.send_to(&datagram, self.peer).await
                    {
                        debug!(client = %self.peer, %error, "reply to client failed");
                    }
                }
                Err(error) => {
                    // ICMP port unreachable surfaces here as ECONNREFUSED: the next datagram re-balances.
                    debug!(client = %self.peer, %error, "backend unreachable; session ends");
                    self.end = "backend_unreachable";
                    break;
                }
            }
        }
        debug!(client = %self.peer, end = self.end, "session ended");
        let _ = self.ended.send((self.peer, self.id));
    }

    /// Passes the replies waiting, up to a batch; the last one is returned as a copy when the client's
    /// socket could not take it at once.
    fn pass_replies(&self) -> io::Result<Replies> {
        let mut replies = Replies { count: 0, bytes: 0, pending: None };
        while replies.count < BATCH_SIZE as u64 {
            match self.pass_reply() {
                Ok((len, pending)) => {
                    replies.count += 1;
                    replies.bytes += len as u64;
                    if pending.is_some() {
                        replies.pending = pending;
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        Ok(replies)
    }

    /// Receives one reply from the backend and sends it to the client, through the thread's buffer. `Ok`
    /// carries its length and a copy of the reply when the client's socket could not take it at once.
    fn pass_reply(&self) -> io::Result<(usize, Option<Vec<u8>>)> {
        REPLY.with_borrow_mut(|buf| {
            let n = self.upstream.try_recv(buf)?;
            let reply = &buf[..n];
            Ok((
                n,
                match self.frontend.try_send_to(reply, self.peer) {
                    Ok(_) => None,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => Some(reply.to_vec()),
                    Err(error) => {
                        debug!(client = %self.peer, %error, "reply to client failed");
                        None
                    }
                },
            ))
        })
    }
}

impl Drop for SessionTask {
    fn drop(&mut self) {
        if let Some((log, frontend)) = &self.access_log {
            log.record(AccessRecord {
                ended: std::time::SystemTime::now(),
                service: self.service,
                client: self.peer,
                frontend: *frontend,
                backend: Some(self.backend),
                bytes_in: self.shared.bytes_in.load(Ordering::Relaxed),
                bytes_out: self.bytes_out,
                datagrams: Some((self.shared.datagrams_in.load(Ordering::Relaxed), self.datagrams_out)),
                duration: self.opened.elapsed(),
                end: self.end,
            });
        }
    }
}

/// Replies one wake-up passed to a client.
struct Replies {
    count: u64,
    bytes: u64,
    /// The last one, when the client's socket had no room for it.
    pending: Option<Vec<u8>>,
}

fn elapsed_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}
