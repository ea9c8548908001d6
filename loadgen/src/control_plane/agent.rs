//! `Register` streams held open as an agent holds its own: hellos answered with the backend's verdict,
//! a new verdict pushed at once.

use std::{sync::Arc, time::Duration};

use contract::{
    auth::{Bearer, Token},
    client::StreamError,
    v1::{
        HelloAck, RegisterAck, RegisterRequest, RegisterResponse, Registration, register_request, register_response,
        registry_client::RegistryClient,
    },
};
use tokio::{
    sync::{Mutex, mpsc},
    task::JoinHandle,
    time::{Instant, timeout},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};
use tracing::warn;

use crate::error::ControlPlaneError;

/// One `Register` stream, held open: its backends stay registered until it is dropped.
pub(super) struct RegisterStream {
    /// The backend's verdict, locked while a message carrying it is queued, so a hello answered at the
    /// same time as a flip cannot overtake the flip with the old verdict.
    out: Arc<Mutex<Outbound>>,
    acks: mpsc::Receiver<RegisterAck>,
    reader: JoinHandle<()>,
}

/// The sending half of a `Register` stream, with the verdict it reports.
struct Outbound {
    tx: mpsc::Sender<RegisterRequest>,
    healthy: bool,
    /// The last hello's sequence number.
    seq: u64,
}

// === impl RegisterStream ===

impl RegisterStream {
    /// Opens a stream with its first registration; the stream, its answer, and how long that took.
    pub(super) async fn open(
        channel: Channel,
        token: Option<&Token>,
        first: Registration,
        step: Duration,
    ) -> Result<(RegisterStream, RegisterAck, Duration), ControlPlaneError> {
        let what = format!("registration of {}:{}", first.backend_address, first.service.map_or(0, |s| s.port));
        let failed = |source: StreamError| ControlPlaneError::Controller { what: what.clone(), source };
        let late = || ControlPlaneError::Timeout { what: what.clone(), after: step };
        let (tx, rx) = mpsc::channel(16);
        let sent = Instant::now();
        // The receiver is alive: this cannot fail.
        let _ = tx.send(register_message(first)).await;
        let mut client = RegistryClient::with_interceptor(channel, Bearer::new(token));
        let call = client.register(ReceiverStream::new(rx));
        let mut inbound = timeout(step, call).await.map_err(|_| late())?.map_err(|s| failed(s.into()))?.into_inner();
        let ack = match timeout(step, inbound.message()).await.map_err(|_| late())? {
            Ok(Some(RegisterResponse { msg: Some(register_response::Msg::Ack(ack)) })) => ack,
            Ok(_) => return Err(ControlPlaneError::Ended { what, why: "no ack to the first registration".into() }),
            Err(status) => return Err(failed(status.into())),
        };
        let took = sent.elapsed();
        let out = Arc::new(Mutex::new(Outbound { tx, healthy: true, seq: 0 }));
        let (acks_tx, acks) = mpsc::channel(16);
        let reader = tokio::spawn(read_register_stream(inbound, Arc::clone(&out), acks_tx));
        Ok((RegisterStream { out, acks, reader }, ack, took))
    }

    /// Adds a backend to the registration; its answer and how long it took.
    pub(super) async fn register(
        &mut self,
        registration: Registration,
        step: Duration,
    ) -> Result<(RegisterAck, Duration), ControlPlaneError> {
        let what =
            format!("registration of {}:{}", registration.backend_address, registration.service.map_or(0, |s| s.port));
        let ended = || ControlPlaneError::Ended { what: what.clone(), why: "the stream closed".into() };
        let sent = Instant::now();
        self.out.lock().await.tx.send(register_message(registration)).await.map_err(|_| ended())?;
        match timeout(step, self.acks.recv()).await {
            Ok(Some(ack)) => Ok((ack, sent.elapsed())),
            Ok(None) => Err(ended()),
            Err(_) => Err(ControlPlaneError::Timeout { what, after: step }),
        }
    }

    /// Reports a new verdict at once, as an agent does when its check changes its mind.
    pub(super) async fn set_healthy(&self, healthy: bool) -> Result<(), ControlPlaneError> {
        let mut out = self.out.lock().await;
        out.healthy = healthy;
        let ack = HelloAck { seq: out.seq, healthy: Some(healthy), load_permille: None };
        out.tx.send(RegisterRequest { msg: Some(register_request::Msg::HelloAck(ack)) }).await.map_err(|_| {
            ControlPlaneError::Ended { what: "the flipped registration".into(), why: "the stream closed".into() }
        })
    }
}

impl Drop for RegisterStream {
    fn drop(&mut self) {
        // The reader holds a sender too: stopping it ends the request stream, and so the registration.
        self.reader.abort();
    }
}

/// Answers hellos with the current verdict and hands acks to the stream's owner, until the stream ends.
async fn read_register_stream(
    mut inbound: Streaming<RegisterResponse>,
    out: Arc<Mutex<Outbound>>,
    acks: mpsc::Sender<RegisterAck>,
) {
    while let Ok(Some(message)) = inbound.message().await {
        let delivered = match message.msg {
            Some(register_response::Msg::Hello(hello)) => {
                let mut out = out.lock().await;
                out.seq = hello.seq;
                let ack = HelloAck { seq: hello.seq, healthy: Some(out.healthy), load_permille: None };
                out.tx.send(RegisterRequest { msg: Some(register_request::Msg::HelloAck(ack)) }).await.is_ok()
            }
            Some(register_response::Msg::Ack(ack)) => acks.send(ack).await.is_ok(),
            None => true,
        };
        if !delivered {
            return;
        }
    }
    warn!("a Register stream ended");
}

fn register_message(registration: Registration) -> RegisterRequest {
    RegisterRequest { msg: Some(register_request::Msg::Register(registration)) }
}
