//! TCP relay: accept, pick a backend, connect (falling over to the next backend on failure), then copy
//! both directions until both sides are closed, passing half-closes through.

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use contract::{
    limit::{AcceptErrors, Limit},
    model::ServiceKey,
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::{RelayContext, pump};
use crate::proxy;
use crate::{
    access_log::AccessRecord,
    balance::RouteBackend,
    metrics::{ConnectFailure, FrontendStats, Refusal},
    stats::ConnectionGuard,
    table::ServiceRoute,
};

/// Accepts clients of `service` on one worker's listener until `stop` fires (the frontend closes).
/// Connections already accepted go on, on this worker; they are tracked in the context so a shutdown can
/// wait for them. `slots` bounds the service's connections across all its workers (and snapshots).
pub async fn serve(
    listener: std::net::TcpListener,
    service: ServiceKey,
    ctx: Arc<RelayContext>,
    frontend: Arc<FrontendStats>,
    slots: Arc<Limit>,
    stop: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            warn!(%service, %error, "frontend socket unusable on this worker");
            return;
        }
    };
    let mut accept_errors = AcceptErrors::new(service);
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                accept_errors.back_off(&error).await;
                continue;
            }
        };
        // Only the access log needs the time of accept.
        let started = ctx.access_log.is_some().then(Instant::now);
        // The client's descriptor, from the node's share, or no connection: clients never take the
        // descriptors the control plane needs.
        let Some(client_fd) = ctx.client_fds.try_take(1) else {
            ctx.client_fds.refused();
            frontend.refused(Refusal::FdLimit);
            continue;
        };
        // One table read per connection; the connection keeps the route it started with.
        let route = ctx.table.load().route(&service);
        let (slots, frontend, shared) = (Arc::clone(&slots), Arc::clone(&frontend), Arc::clone(&ctx));
        let span = debug_span!("connection", %service, client = %peer);
        ctx.connections.spawn(
            async move {
                let ctx = shared;
                let local = ctx.access_log.as_ref().and_then(|_| client.local_addr().ok());
                let outcome = connection(client, peer, service, route, &ctx, &frontend, &slots).await;
                drop(client_fd);
                if let (Some(log), Some(started)) = (&ctx.access_log, started) {
                    log.record(AccessRecord {
                        ended: SystemTime::now(),
                        service,
                        client: outcome.client.unwrap_or(peer),
                        frontend: local,
                        backend: outcome.backend,
                        bytes_in: outcome.bytes_in,
                        bytes_out: outcome.bytes_out,
                        datagrams: None,
                        duration: started.elapsed(),
                        end: outcome.end,
                    });
                }
            }
            .instrument(span),
        );
    }
}

/// What became of one client.
#[derive(Debug, Default)]
struct Outcome {
    /// The client a balancer in front named in its PROXY header, when the service accepts one.
    client: Option<SocketAddr>,
    backend: Option<SocketAddr>,
    bytes_in: u64,
    bytes_out: u64,
    end: &'static str,
}

impl Outcome {
    fn refused(frontend: &FrontendStats, why: Refusal) -> Self {
        frontend.refused(why);
        Outcome { end: why.as_str(), ..Outcome::default() }
    }
}

/// One client, from its first byte to the end of its relay (or its refusal).
async fn connection(
    mut client: TcpStream,
    peer: SocketAddr,
    service: ServiceKey,
    route: Option<Arc<ServiceRoute>>,
    ctx: &RelayContext,
    frontend: &FrontendStats,
    slots: &Arc<Limit>,
) -> Outcome {
    let Some(route) = route else { return Outcome::refused(frontend, Refusal::NoBackend) };
    // Behind another balancer: its header says who the client is (and what it reached), before anything
    // else is read.
    let proxied = if route.proxy.accept {
        match proxy::read(&mut client, ctx.accept_proxy_timeout).await {
            Ok(proxy::Received::Proxied { source, destination }) => Some((source, destination)),
            Ok(proxy::Received::Local) => None,
            Err(error) => {
                debug!(%error, "PROXY header refused; closed");
                return Outcome::refused(frontend, Refusal::BadProxyHeader);
            }
        }
    } else {
        None
    };
    let named = proxied.map(|(source, _)| source);
    let peer = named.unwrap_or(peer);
    let refused = |why| Outcome { client: named, ..Outcome::refused(frontend, why) };
    let send_proxy = route.proxy.send_v2;
    if let Some(wait) = ctx.first_byte_timeout
        && !spoke_within(&client, wait).await
    {
        debug!(?wait, "client sent nothing in time; closed");
        return refused(Refusal::SilentClient);
    }
    // Past the service's bound: wait in the queue up to --queue-timeout, else close.
    let Some(_slot) = slots.take_within(1, ctx.queue_timeout).await else {
        slots.refused();
        return refused(Refusal::ServiceFull);
    };
    // The backend's descriptor only once the service has room: a queued client holds one, not two.
    let Some(_backend_fd) = ctx.client_fds.try_take(1) else {
        ctx.client_fds.refused();
        return refused(Refusal::FdLimit);
    };
    let mut failures = Vec::new();
    let connected = connect(service, &route, peer, ctx, &mut failures).await;
    if !failures.is_empty()
        && let Some(held_back) = frontend.may_warn()
    {
        let why = failures.join("; ");
        match &connected {
            Some((_, backend, _)) => {
                warn!(%service, %why, used = %backend, held_back, "a backend failed; the next one took the connection")
            }
            None => warn!(%service, %why, held_back, "no backend accepted the connection"),
        }
    }
    let Some((mut upstream, backend, mut guard)) = connected else {
        return refused(Refusal::NoBackend);
    };
    if send_proxy {
        let to = proxied.map(|(_, destination)| destination).or_else(|| client.local_addr().ok()).unwrap_or(peer);
        let header = proxy::encode_v2(proxy::Transport::Stream, peer, to);
        if let Err(error) = upstream.write_all(&header).await {
            debug!(%backend, %error, "sending the PROXY header failed");
            return Outcome { client: named, backend: Some(backend), end: "error", ..Outcome::default() };
        }
    }
    // The connection keeps its backend's counters through the guard, not the whole route.
    drop(route);
    let _ = client.set_nodelay(true);
    let stats = Arc::clone(guard.stats());
    let (mut bytes_in, mut bytes_out) = (0, 0);
    let end = tokio::select! {
        moved = pump::both_ways(&client, &upstream, &ctx.pipes, [stats.bytes_in(), stats.bytes_out()], [&mut bytes_in, &mut bytes_out]) => match moved {
            Ok(()) => "closed",
            Err(error) => {
                debug!(%backend, %error, "connection ended with an error");
                "error"
            }
        },
        () = guard.evicted() => {
            debug!(%backend, "connection closed: drain time is over");
            "drained"
        }
    };
    debug!(%backend, bytes_in, bytes_out, end, "connection ended");
    Outcome { client: named, backend: Some(backend), bytes_in, bytes_out, end }
}

/// True when the client sent a byte within `wait` (it stays unread, for the backend).
async fn spoke_within(client: &TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(timeout(wait, client.peek(&mut byte)).await, Ok(Ok(1..)))
}

/// Tries the balancer's pick, then every other backend in rotation once, then (when none took it) the
/// backends passive health took out; each failure's reason goes to `failures`.
async fn connect(
    service: ServiceKey,
    route: &ServiceRoute,
    client: SocketAddr,
    ctx: &RelayContext,
    failures: &mut Vec<String>,
) -> Option<(TcpStream, SocketAddr, ConnectionGuard)> {
    let passive = ctx.passive;
    let mut held_out = Vec::new();
    for backend in route.candidates(client.ip()) {
        if !backend.stats.may_try(passive) {
            held_out.push(backend);
            continue;
        }
        if let Some(connected) = try_backend(service, backend, ctx, failures).await {
            return Some(connected);
        }
    }
    for backend in held_out {
        if let Some(connected) = try_backend(service, backend, ctx, failures).await {
            return Some(connected);
        }
    }
    None
}

/// One connect to `backend`, counted in its stats and its passive health.
async fn try_backend(
    service: ServiceKey,
    backend: &RouteBackend,
    ctx: &RelayContext,
    failures: &mut Vec<String>,
) -> Option<(TcpStream, SocketAddr, ConnectionGuard)> {
    let (passive, connect_timeout) = (ctx.passive, ctx.connect_timeout);
    // Counted from the pick on: a burst of accepts during one connect must not all see the same
    // least-loaded backend, and a drain that starts meanwhile must cover this connection.
    let guard = backend.stats.attempt();
    let started = Instant::now();
    let failure = match timeout(connect_timeout, TcpStream::connect(backend.address)).await {
        Ok(Ok(upstream)) => {
            if backend.stats.connected_in(started.elapsed(), passive) {
                info!(%service, backend = %backend.address, "backend answers again: back in rotation on this node");
            }
            let _ = upstream.set_nodelay(true);
            guard.established();
            return Some((upstream, backend.address, guard));
        }
        Ok(Err(error)) => {
            debug!(backend = %backend.address, %error, "backend refused; trying the next");
            failures.push(format!("{}: {error}", backend.address));
            match error.kind() {
                io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
                io::ErrorKind::TimedOut => ConnectFailure::Timeout,
                _ => ConnectFailure::Error,
            }
        }
        Err(_) => {
            debug!(backend = %backend.address, "connect timed out; trying the next");
            failures.push(format!("{}: no answer within {connect_timeout:?}", backend.address));
            ConnectFailure::Timeout
        }
    };
    if backend.stats.connect_failed(failure, passive) {
        warn!(
            %service,
            backend = %backend.address,
            failures = passive.failures,
            retry = ?passive.retry,
            "backend out of rotation on this node: its connects failed in a row; one connection tries it each retry"
        );
    }
    None
}
