//! TCP relay: accept, pick a backend, connect (falling over to the next backend on failure), then copy
//! both directions until both sides are closed, passing half-closes through.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use contract::{
    limit::{AcceptErrors, Limit},
    model::ServiceKey,
};
use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{RelayContext, pump};
use crate::{stats::ConnectionGuard, table::ServiceRoute};

/// Accepts clients of `service` on one worker's listener until `stop` fires (the frontend closes).
/// Connections already accepted go on, on this worker; they are tracked in the context so a shutdown can
/// wait for them. `slots` bounds the service's connections across all its workers (and snapshots).
pub async fn serve(
    listener: std::net::TcpListener,
    service: ServiceKey,
    ctx: Arc<RelayContext>,
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
        // The client's descriptor, from the node's share, or no connection: clients never take the
        // descriptors the control plane needs.
        let Some(client_fd) = ctx.client_fds.try_take(1) else {
            ctx.client_fds.refused();
            continue;
        };
        // One table read per connection; the connection keeps the route it started with.
        let route = ctx.table.load().route(&service);
        let (slots, shared) = (Arc::clone(&slots), Arc::clone(&ctx));
        ctx.connections.spawn(async move {
            let ctx = shared;
            let Some(route) = route else { return };
            if let Some(wait) = ctx.first_byte_timeout
                && !spoke_within(&client, wait).await
            {
                debug!(%service, client = %peer, ?wait, "client sent nothing in time; closed");
                return;
            }
            // Past the service's bound: wait in the queue up to --queue-timeout, else close.
            let Some(slot) = slots.take_within(1, ctx.queue_timeout).await else {
                slots.refused();
                return;
            };
            // The backend's descriptor only once the service has room: a queued client holds one, not two.
            let Some(backend_fd) = ctx.client_fds.try_take(1) else {
                ctx.client_fds.refused();
                return;
            };
            relay(client, peer, service, route, &ctx).await;
            drop((slot, client_fd, backend_fd));
        });
    }
}

/// True when the client sent a byte within `wait` (it stays unread, for the backend).
async fn spoke_within(client: &TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(timeout(wait, client.peek(&mut byte)).await, Ok(Ok(1..)))
}

async fn relay(client: TcpStream, peer: SocketAddr, service: ServiceKey, route: Arc<ServiceRoute>, ctx: &RelayContext) {
    let Some((upstream, backend, mut guard)) = connect(&route, service, peer, ctx.connect_timeout).await else {
        warn!(%service, client = %peer, backends = route.backends.len(), "no backend accepted the connection");
        return;
    };
    // The connection keeps its backend's counters through the guard, not the whole route.
    drop(route);
    let _ = client.set_nodelay(true);
    tokio::select! {
        moved = pump::both_ways(&client, &upstream, &ctx.pipes) => match moved {
            Ok((up, down)) => debug!(%service, client = %peer, %backend, up, down, "connection closed"),
            Err(error) => debug!(%service, client = %peer, %backend, %error, "connection ended with an error"),
        },
        () = guard.evicted() => debug!(%service, client = %peer, %backend, "connection closed: drain time is over"),
    }
}

/// Tries the balancer's pick, then every other backend once.
async fn connect(
    route: &ServiceRoute,
    service: ServiceKey,
    client: SocketAddr,
    connect_timeout: Duration,
) -> Option<(TcpStream, SocketAddr, ConnectionGuard)> {
    for backend in route.candidates(client.ip()) {
        // Counted from the pick on: a burst of accepts during one connect must not all see the same
        // least-loaded backend, and a drain that starts meanwhile must cover this connection.
        let guard = backend.stats.attempt();
        match timeout(connect_timeout, TcpStream::connect(backend.address)).await {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                guard.established();
                return Some((upstream, backend.address, guard));
            }
            Ok(Err(error)) => debug!(%service, backend = %backend.address, %error, "backend refused; trying the next"),
            Err(_) => debug!(%service, backend = %backend.address, "connect timed out; trying the next"),
        }
    }
    None
}
