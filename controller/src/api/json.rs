//! The HW1 JSON control channel (TCP, 8080 by default).
//!
//! One task per connection reads frames, answers each with exactly one JSON object per write, and probes
//! the server with `{"cmd":"hello"}` while it has backends registered. The connection is the
//! registration: when it closes, or the server stops answering hellos, its backends are removed.
//!
//! The channel is a registry door like gRPC's `Registry`: with `--auth-token` set, a `register` or
//! `unregister` carries the token in its `"token"` field, or comes from a source in `--json-allow`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use contract::{limit::AcceptErrors, model::BackendSpec, process::stopped};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedWriteHalf},
    sync::watch,
    time::Instant,
};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    auth::{Caller, Guard},
    cidr::CidrList,
    door::{Door, Full, InFlight, Slot},
    framing::{Frame, Framer},
    request::{self, Presented, Request},
};
use crate::{
    probe::{Probe, ProbeAction, ProbeSettings},
    store::{Credential, Origin, Registration, Store},
};

/// Largest unfinished request a connection may buffer before it is cut off.
pub const MAX_REQUEST: usize = 64 * 1024;

/// What every control connection shares.
#[derive(Debug)]
pub struct JsonContext {
    /// The registry.
    pub store: Arc<Store>,
    /// Hello probe timing.
    pub probe: ProbeSettings,
    /// How long a `register` waits for nodes' bind results.
    pub bind_ack_timeout: Duration,
    /// Sources that may use the channel (`None`: every source); with a registration token, the sources
    /// whose registrations need no token.
    pub allow: Option<CidrList>,
    /// The registry door's tokens: who a message's `"token"` says its sender is.
    pub guard: Guard,
    /// `--auth-token` is set.
    pub token_required: bool,
    /// Open control connections: a full door evicts one that has registered nothing for a newcomer, and
    /// refuses the newcomer when every one has.
    pub door: Arc<Door>,
    /// A connection that has registered nothing is closed after this long without a request.
    pub idle_timeout: Duration,
    /// Turns true when a successor took over (`--takeover`): every connection closes, so its server
    /// registers again with the successor, which listens on the same socket.
    pub handed_over: watch::Receiver<bool>,
}

/// Accepts control connections until `shutdown` turns true.
pub async fn serve(listener: TcpListener, ctx: Arc<JsonContext>, mut shutdown: watch::Receiver<bool>) {
    let mut accept_errors = AcceptErrors::new("the JSON control channel");
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match admit(&ctx, peer) {
                    Ok((slot, registration)) => {
                        let span = info_span!("registration", id = %registration.id(), origin = "json", %peer);
                        let connection = Connection::new(stream, peer, Arc::clone(&ctx), registration);
                        tokio::spawn(connection.run(slot).instrument(span));
                    }
                    Err(why) => {
                        tokio::spawn(refuse(stream, why));
                    }
                },
                Err(error) => accept_errors.back_off(&error).await,
            },
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// One control connection.
struct Connection {
    stream: Option<TcpStream>,
    peer: SocketAddr,
    ctx: Arc<JsonContext>,
    registration: Registration,
    /// Running while the registration holds backends.
    probe: Option<Probe>,
    /// Held with the probe: a connection with backends registered is never evicted.
    registered: Option<InFlight>,
    /// The connection's place among the open ones.
    slot: Option<Slot>,
}

// === impl Connection ===

impl Connection {
    fn new(stream: TcpStream, peer: SocketAddr, ctx: Arc<JsonContext>, registration: Registration) -> Self {
        Connection { stream: Some(stream), peer, ctx, registration, probe: None, registered: None, slot: None }
    }

    /// Serves the connection; `slot` is its place among the open control connections.
    async fn run(mut self, slot: Slot) {
        let activity = Arc::clone(slot.activity());
        self.slot = Some(slot);
        let Some(stream) = self.stream.take() else { return };
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        debug!(peer = %self.peer, "control channel opened");
        let mut framer = Framer::new(MAX_REQUEST);
        let mut buf = vec![0u8; 8192];
        let idle = self.ctx.idle_timeout;
        let mut idle_until = Instant::now() + idle;
        let first_request = self.ctx.door.timeouts().first_request;
        let first_until = activity.accepted() + first_request;
        let mut handed_over = self.ctx.handed_over.clone();
        let reason = loop {
            let probe_at = self.probe.as_ref().map(Probe::deadline);
            // Nothing registered: no hello keeps the connection honest, so silence ends it.
            let unregistered = self.probe.is_none();
            // Before its first request, --first-request-timeout when it comes first.
            let before_first = !activity.first_seen() && first_until < idle_until;
            let until = if before_first { first_until } else { idle_until };
            tokio::select! {
                read = reader.read(&mut buf) => {
                    let n = match read {
                        Ok(0) => break "control channel closed".to_owned(),
                        Ok(n) => n,
                        Err(error) => break format!("control channel error: {error}"),
                    };
                    framer.push(&buf[..n]);
                    match self.on_input(&mut framer, &mut writer).await {
                        // Only a request keeps an unregistered connection: stray bytes do not.
                        Ok(requests) if requests > 0 => idle_until = Instant::now() + idle,
                        Ok(_) => {}
                        Err(reason) => break reason,
                    }
                }
                () = sleep_until(probe_at), if probe_at.is_some() => {
                    if let Err(reason) = self.on_probe_timer(&mut writer).await {
                        break reason;
                    }
                }
                () = stopped(&mut handed_over) => break "the controller handed over to its successor".to_owned(),
                () = tokio::time::sleep_until(until), if unregistered => {
                    self.ctx.door.timed_out();
                    let why = match before_first {
                        true => format!("no request within {first_request:?} of connecting: closing (--first-request-timeout)"),
                        false => format!("no request for {idle:?} and nothing registered: closing (--json-idle-timeout)"),
                    };
                    let _ = write(&mut writer, &request::failed(&why)).await;
                    break why;
                }
                () = activity.evicted() => {
                    let why = "the control channel is full: a connection that has registered nothing makes room for a newcomer";
                    let _ = write(&mut writer, &request::failed(why)).await;
                    break why.to_owned();
                }
            }
        };
        let _ = writer.shutdown().await;
        debug!(peer = %self.peer, %reason, "control channel closed");
        self.registration.close(reason);
    }

    /// Answers every complete frame; `Err` closes the connection with that reason.
    /// Answers every complete frame and returns how many were JSON values; `Err` closes the connection.
    async fn on_input(&mut self, framer: &mut Framer, writer: &mut OwnedWriteHalf) -> Result<usize, String> {
        let mut requests = 0;
        while let Some(frame) = framer.next_frame() {
            let reply = match frame {
                Frame::Value(value) => {
                    requests += 1;
                    // In flight while it is answered (a registration waits for bind results).
                    let _request = self.slot.as_ref().map(|slot| slot.activity().enter());
                    self.on_request(&value).await
                }
                Frame::Invalid(why) => Some(request::failed(&format!("invalid JSON: {why}"))),
            };
            if let Some(reply) = reply {
                write(writer, &reply).await?;
            }
        }
        if framer.is_over_limit() {
            let why = format!("request larger than {MAX_REQUEST} bytes without a complete JSON object");
            write(writer, &request::failed(&why)).await?;
            return Err(why);
        }
        Ok(requests)
    }

    async fn on_request(&mut self, value: &Value) -> Option<Value> {
        let request = match Request::parse(value) {
            Ok(request) => request,
            Err(why) => {
                debug!(peer = %self.peer, %why, "bad request");
                return Some(request::failed(&why));
            }
        };
        let reply = match request {
            Request::HelloAck => {
                if let Some(rtt) = self.probe.as_mut().and_then(|probe| probe.on_answer(Instant::now())) {
                    self.registration.hello_answered(rtt);
                }
                return None;
            }
            Request::Hello => {
                // A server checking on the controller is alive too.
                if let Some(probe) = &mut self.probe {
                    probe.on_answer(Instant::now());
                }
                request::hello_ack()
            }
            Request::Register { service, backend_port, weight, ask, token } => {
                let credential = match self.credential(token.as_ref()) {
                    Ok(credential) => credential,
                    Err(why) => {
                        info!(peer = %self.peer, %service, %why, "registration refused");
                        return Some(request::failed(&why));
                    }
                };
                self.registration.set_credential(credential);
                let backend = BackendSpec { address: SocketAddr::new(self.peer.ip(), backend_port), weight };
                match self.registration.register(service, backend, ask, self.ctx.bind_ack_timeout).await {
                    Ok(reply) if reply.success => request::successful(reply.message.as_deref()),
                    Ok(reply) => {
                        let why = reply.message.unwrap_or_default();
                        info!(peer = %self.peer, %service, %why, "registration failed");
                        request::failed(&why)
                    }
                    Err(error) => {
                        info!(peer = %self.peer, %service, %error, "registration refused");
                        request::failed(&error.to_string())
                    }
                }
            }
            Request::Unregister { service, backend_port, token } => {
                let backend = SocketAddr::new(self.peer.ip(), backend_port);
                let ended = self.credential(token.as_ref()).and_then(|c| {
                    self.registration.unregister(service, backend, c, self.peer.ip()).map_err(|e| e.to_string())
                });
                match ended {
                    Ok(_) => request::successful(None),
                    Err(why) => {
                        info!(peer = %self.peer, %service, %backend, %why, "unregister refused");
                        request::failed(&why)
                    }
                }
            }
        };
        self.sync_probe();
        Some(reply)
    }

    /// What a message with `token` proves, or why it may not change the registry.
    fn credential(&self, token: Option<&Presented>) -> Result<Credential, String> {
        let Some(token) = token else {
            if self.ctx.token_required && self.ctx.allow.is_none() {
                return Err("this controller needs a token to register: add \"token\": \"<the --auth-token>\" to \
                            the message, or connect from a source the operator lists in --json-allow"
                    .to_owned());
            }
            return Ok(Credential::Anonymous);
        };
        // With no registration token set the door is open, and a token proves nothing (`Anyone`).
        let caller = self.ctx.guard.caller(Some(&token.as_bearer()));
        caller
            .map(Caller::credential)
            .ok_or_else(|| "wrong token: \"token\" must be the --auth-token (or the admin token)".to_owned())
    }

    /// Probing runs exactly while the connection has backends registered.
    fn sync_probe(&mut self) {
        match (self.registration.has_backends(), self.probe.is_some()) {
            (true, false) => {
                self.probe = Some(Probe::new(self.ctx.probe, Instant::now()));
                self.registered = self.slot.as_ref().map(|slot| slot.activity().enter());
            }
            (false, true) => {
                self.probe = None;
                self.registered = None;
            }
            _ => {}
        }
    }

    async fn on_probe_timer(&mut self, writer: &mut OwnedWriteHalf) -> Result<(), String> {
        // Its backends may have been unregistered from another connection since the last request here.
        self.sync_probe();
        let Some(probe) = &mut self.probe else { return Ok(()) };
        match probe.on_timer(Instant::now()) {
            ProbeAction::Wait => Ok(()),
            ProbeAction::SendHello(seq) => {
                debug!(peer = %self.peer, seq, "hello");
                write(writer, &request::hello()).await
            }
            ProbeAction::Expired { misses } => {
                warn!(peer = %self.peer, misses, "server stopped answering hellos");
                Err(format!("no answer to {misses} hellos in a row"))
            }
        }
    }
}

/// Whether `peer` may open a control connection now: its place among the open ones and its registration,
/// or why not.
fn admit(ctx: &JsonContext, peer: SocketAddr) -> Result<(Slot, Registration), String> {
    if let Some(allow) = ctx.allow.as_ref().filter(|allow| !allow.contains(peer.ip())) {
        debug!(%peer, "control connection from a source outside --json-allow");
        return Err(format!("source {} is not allowed on the control channel (--json-allow {allow})", peer.ip()));
    }
    let slot = ctx.door.admit(peer).map_err(|full| match full {
        Full::Door(max) => format!("the control channel is full ({max} connections); try again later"),
        Full::Source(max) => {
            format!("source {} holds {max} control connections with registrations already; try again later", peer.ip())
        }
        Full::Prefix(max) => format!(
            "the network of source {} holds {max} control connections with registrations already; try again later",
            peer.ip()
        ),
    })?;
    let registration =
        ctx.store.open_registration(Origin::json(peer), Credential::Anonymous).map_err(|error| error.to_string())?;
    Ok((slot, registration))
}

/// Answers a connection that may not register with one `failed` reply saying `why`, and closes it.
async fn refuse(stream: TcpStream, why: String) {
    let (_, mut writer) = stream.into_split();
    let _ = write(&mut writer, &request::failed(&why)).await;
    let _ = writer.shutdown().await;
}

/// Writes one JSON object and its newline in a single write, so an ack and a hello never share one.
async fn write(writer: &mut OwnedWriteHalf, value: &Value) -> Result<(), String> {
    let mut line = value.to_string();
    line.push('\n');
    writer.write_all(line.as_bytes()).await.map_err(|e| format!("control channel write failed: {e}"))
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}
