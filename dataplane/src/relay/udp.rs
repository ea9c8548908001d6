//! UDP relay: one session per client address, pinned to one backend through its own connected upstream
//! socket; replies leave from the frontend socket so the client sees the address it wrote to.
//!
//! The session table is owned by the frontend's receive task alone, so the per-datagram path takes no
//! lock: session tasks report their end over a channel instead of touching the table.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
    task::{AbortHandle, JoinSet},
    time::{Duration, Instant},
};
use tracing::debug;

use super::RelayContext;
use contract::model::ServiceKey;

use crate::stats::ConnectionGuard;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

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
                        debug!(%service, client = %peer, max = ctx.udp_max_sessions, "session table full; datagram dropped");
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
        let mut buf = Vec::with_capacity(MAX_DATAGRAM);
        loop {
            buf.clear();
            let last = self.last_active.load(Ordering::Relaxed);
            let idle_at = self.epoch + Duration::from_millis(last) + self.idle;
            let received = tokio::select! {
                received = tokio::time::timeout_at(idle_at, self.upstream.recv_buf(&mut buf)) => received,
                () = self.guard.evicted() => {
                    debug!(client = %self.peer, "session closed: drain time is over");
                    break;
                }
            };
            match received {
                Ok(Ok(_)) => {
                    self.last_active.store(elapsed_ms(self.epoch), Ordering::Relaxed);
                    if let Err(error) = self.frontend.send_to(&buf, self.peer).await {
                        debug!(client = %self.peer, %error, "reply to client failed");
                    }
                }
                Ok(Err(error)) => {
                    // ICMP port unreachable surfaces here as ECONNREFUSED: the next datagram re-balances.
                    debug!(client = %self.peer, %error, "backend unreachable; session ends");
                    break;
                }
                // Timed out: idle only if nothing arrived from the client meanwhile either.
                Err(_) if self.last_active.load(Ordering::Relaxed) == last => break,
                Err(_) => {}
            }
        }
        debug!(client = %self.peer, "session ended");
        let _ = self.ended.send((self.peer, self.id));
    }
}

fn elapsed_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}
