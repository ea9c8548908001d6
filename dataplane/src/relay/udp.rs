//! UDP relay: one session per client address, pinned to one backend through its own connected upstream
//! socket; replies leave from the frontend socket so the client sees the address it wrote to.
//!
//! The session table is owned by the frontend's receive task alone, so the per-datagram path takes no
//! lock: session tasks report their end over a channel instead of touching the table.
//!
//! Memory follows the sessions open, not the sessions ever opened: a session holds no buffer while it
//! waits (replies are copied through a buffer borrowed from the worker thread), and the table gives its
//! room back when it empties.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use contract::{
    limit::{Permit, Throttle, WARN_EVERY},
    model::ServiceKey,
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
    task::{AbortHandle, JoinSet},
    time::{Duration, Instant},
};
use tracing::{debug, warn};

use super::RelayContext;
use crate::stats::ConnectionGuard;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

thread_local! {
    /// One reply buffer per worker thread, borrowed for a synchronous receive-and-send, never across an
    /// `.await`: idle sessions hold none.
    static REPLY: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

struct Session {
    id: u64,
    backend: SocketAddr,
    upstream: Arc<UdpSocket>,
    /// Milliseconds since the frontend started, of the last datagram either way.
    last_active: Arc<AtomicU64>,
    /// Table version at which `backend` was last seen in rotation.
    checked_version: u64,
    task: AbortHandle,
}

/// Everything a session task needs besides its own upstream socket.
struct SessionTask {
    id: u64,
    peer: SocketAddr,
    frontend: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    last_active: Arc<AtomicU64>,
    epoch: Instant,
    idle: Duration,
    guard: ConnectionGuard,
    /// The upstream socket's descriptor, from the node's client share.
    _fd: Permit,
    ended: mpsc::UnboundedSender<(SocketAddr, u64)>,
}

/// Relays datagrams of `service` until `stop` fires (the frontend closes). Every session ends with it, and
/// is waited for, so the port is really released when this returns.
pub async fn serve(socket: UdpSocket, service: ServiceKey, ctx: Arc<RelayContext>, mut stop: oneshot::Receiver<()>) {
    let frontend = Arc::new(socket);
    let epoch = Instant::now();
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut tasks = JoinSet::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let mut next_id = 0u64;
    let mut buf = Vec::with_capacity(MAX_DATAGRAM);
    let mut full = Throttle::new(WARN_EVERY);

    loop {
        buf.clear();
        tokio::select! {
            biased;
            _ = &mut stop => {
                tasks.shutdown().await;
                return;
            }
            Some((peer, id)) = ended_rx.recv() => {
                if sessions.get(&peer).is_some_and(|s: &Session| s.id == id) {
                    sessions.remove(&peer);
                    // After a burst the table gives its room back, and so does the allocator.
                    if sessions.capacity() > 64 && sessions.len() < sessions.capacity() / 4 {
                        sessions.shrink_to(sessions.len() * 2);
                        crate::sys::release_free_memory();
                    }
                }
                while tasks.try_join_next().is_some() {}
            }
            received = frontend.recv_buf_from(&mut buf) => {
                let peer = match received {
                    Ok((_, peer)) => peer,
                    Err(error) => {
                        debug!(%service, %error, "receive failed");
                        continue;
                    }
                };
                let now = elapsed_ms(epoch);
                let table_version = ctx.table.load().version;
                // A session whose backend left rotation ends here, so its next datagram is re-balanced.
                if let Some(session) = sessions.get_mut(&peer)
                    && session.checked_version != table_version
                {
                    let in_rotation = ctx.table.load().route(&service).is_some_and(|r| r.contains(session.backend));
                    if in_rotation {
                        session.checked_version = table_version;
                    } else if let Some(gone) = sessions.remove(&peer) {
                        gone.task.abort();
                    }
                }
                if !sessions.contains_key(&peer) {
                    if sessions.len() >= ctx.udp_max_sessions {
                        if let Some(held_back) = full.admit(Instant::now()) {
                            warn!(%service, max = ctx.udp_max_sessions, dropped_since_last_warning = held_back + 1, "session table full: datagrams of new clients are dropped");
                        }
                        continue;
                    }
                    next_id += 1;
                    let Some(session) = open_session(&ctx, service, peer, next_id, now, &frontend, epoch, &ended_tx, &mut tasks).await else {
                        continue;
                    };
                    sessions.insert(peer, session);
                }
                let Some(session) = sessions.get(&peer) else { continue };
                session.last_active.store(now, Ordering::Relaxed);
                if let Err(error) = session.upstream.send(&buf).await {
                    debug!(%service, client = %peer, backend = %session.backend, %error, "send to backend failed; session ends");
                    if let Some(gone) = sessions.remove(&peer) {
                        gone.task.abort();
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn open_session(
    ctx: &RelayContext,
    service: ServiceKey,
    peer: SocketAddr,
    id: u64,
    now: u64,
    frontend: &Arc<UdpSocket>,
    epoch: Instant,
    ended: &mpsc::UnboundedSender<(SocketAddr, u64)>,
    tasks: &mut JoinSet<()>,
) -> Option<Session> {
    let (table_version, route) = {
        let table = ctx.table.load();
        (table.version, table.route(&service)?)
    };
    let backend = route.candidates(peer.ip()).next()?;
    let Some(fd) = ctx.client_fds.try_take(1) else {
        ctx.client_fds.refused();
        return None;
    };
    let unspecified = match backend.address.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let upstream = match UdpSocket::bind((unspecified, 0)).await {
        Ok(socket) => socket,
        Err(error) => {
            debug!(%service, %error, "cannot open an upstream socket");
            return None;
        }
    };
    if let Err(error) = upstream.connect(backend.address).await {
        debug!(%service, backend = %backend.address, %error, "cannot reach backend");
        return None;
    }
    let upstream = Arc::new(upstream);
    let last_active = Arc::new(AtomicU64::new(now));
    let task = SessionTask {
        id,
        peer,
        frontend: Arc::clone(frontend),
        upstream: Arc::clone(&upstream),
        last_active: Arc::clone(&last_active),
        epoch,
        idle: ctx.udp_idle_timeout,
        guard: backend.stats.open(),
        _fd: fd,
        ended: ended.clone(),
    };
    debug!(%service, client = %peer, backend = %backend.address, "session opened");
    // Sessions aborted since (backend out of rotation, send failure) are reaped here, not left to pile up.
    while tasks.try_join_next().is_some() {}
    let task = tasks.spawn(task.run());
    Some(Session { id, backend: backend.address, upstream, last_active, checked_version: table_version, task })
}

// === impl SessionTask ===

impl SessionTask {
    /// Carries replies back to the client until the session is idle or the backend is unreachable.
    async fn run(mut self) {
        loop {
            let last = self.last_active.load(Ordering::Relaxed);
            let idle_at = self.epoch + Duration::from_millis(last) + self.idle;
            let readable = tokio::select! {
                readable = tokio::time::timeout_at(idle_at, self.upstream.readable()) => readable,
                () = self.guard.evicted() => {
                    debug!(client = %self.peer, "session closed: drain time is over");
                    break;
                }
            };
            let passed = match readable {
                Ok(Ok(())) => self.pass_reply(),
                Ok(Err(error)) => Err(error),
                // Timed out: idle only if nothing arrived from the client meanwhile either.
                Err(_) if self.last_active.load(Ordering::Relaxed) == last => break,
                Err(_) => continue,
            };
            match passed {
                Ok(pending) => {
                    self.last_active.store(elapsed_ms(self.epoch), Ordering::Relaxed);
                    // The client's socket buffer was full: this one reply waits its turn.
                    if let Some(datagram) = pending
                        && let Err(error) = self.frontend.send_to(&datagram, self.peer).await
                    {
                        debug!(client = %self.peer, %error, "reply to client failed");
                    }
                }
                // Readiness without a datagram: wait again.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    // ICMP port unreachable surfaces here as ECONNREFUSED: the next datagram re-balances.
                    debug!(client = %self.peer, %error, "backend unreachable; session ends");
                    break;
                }
            }
        }
        debug!(client = %self.peer, "session ended");
        let _ = self.ended.send((self.peer, self.id));
    }

    /// Receives one reply from the backend and sends it to the client, through the thread's buffer. `Ok`
    /// carries a copy of the reply when the client's socket could not take it at once.
    fn pass_reply(&self) -> io::Result<Option<Vec<u8>>> {
        REPLY.with_borrow_mut(|buf| {
            let n = self.upstream.try_recv(buf)?;
            let reply = &buf[..n];
            Ok(match self.frontend.try_send_to(reply, self.peer) {
                Ok(_) => None,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => Some(reply.to_vec()),
                Err(error) => {
                    debug!(client = %self.peer, %error, "reply to client failed");
                    None
                }
            })
        })
    }
}

fn elapsed_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}
