//! Clients: the JSON control channel, gRPC registrations, TCP/UDP round trips and a bounded load of them.

#[allow(clippy::wildcard_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------------
// JSON control channel client

/// A server's control connection. Its reader task answers hellos at once (unless told not to) and passes
/// every message on; dropping the client closes the connection.
pub struct JsonClient {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    messages: mpsc::UnboundedReceiver<Value>,
    answer_hellos: Arc<AtomicBool>,
    hellos: Arc<AtomicUsize>,
    reader: JoinHandle<()>,
}

impl JsonClient {
    /// Connects to `ctl` from `source` on the machine (the controller sees `source` as the backend's
    /// address).
    pub async fn connect(ctl: &Controller, source: IpAddr) -> JsonClient {
        JsonClient::connect_from(&Host::Root, ctl.json_addr(), Some(source)).await
    }

    /// Connects to the JSON channel at `json` from `host` (and `source` on it, if given).
    pub async fn connect_from(host: &Host, json: SocketAddr, source: Option<IpAddr>) -> JsonClient {
        let stream = host.tcp_connect(json, source).await.expect("control channel connect");
        let (read, writer) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let (tx, messages) = mpsc::unbounded_channel();
        let answer_hellos = Arc::new(AtomicBool::new(true));
        let hellos = Arc::new(AtomicUsize::new(0));
        let (answer, count, ack_writer) = (Arc::clone(&answer_hellos), Arc::clone(&hellos), Arc::clone(&writer));
        let mut lines = BufReader::new(read).lines();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"));
                if value == json!({"cmd": "hello"}) {
                    count.fetch_add(1, Ordering::SeqCst);
                    if answer.load(Ordering::SeqCst) {
                        let _ = ack_writer.lock().await.write_all(b"{\"ack\":\"hello\"}\n").await;
                    }
                }
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        JsonClient { writer, messages, answer_hellos, hellos, reader }
    }

    /// Stops answering hellos (a server that hangs but keeps its connection).
    pub fn stop_answering(&self) {
        self.answer_hellos.store(false, Ordering::SeqCst);
    }

    /// Hellos received so far.
    pub fn hellos(&self) -> usize {
        self.hellos.load(Ordering::SeqCst)
    }

    /// Writes raw bytes in one write.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.lock().await.write_all(bytes).await.expect("control channel write");
    }

    /// Writes raw bytes, and says whether the controller took them all (it may close a connection that
    /// sends it garbage before the write ends).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.lock().await.write_all(bytes).await
    }

    /// Writes one JSON object and a newline.
    pub async fn send(&mut self, value: &Value) {
        let mut line = value.to_string();
        line.push('\n');
        self.send_raw(line.as_bytes()).await;
    }

    /// The next message, hellos included; `None` once the controller closed the connection.
    pub async fn next_message(&mut self) -> Option<Value> {
        timeout(DEADLINE, self.messages.recv()).await.expect("timed out waiting for a message")
    }

    /// The next message that is not a hello.
    pub async fn recv(&mut self) -> Value {
        loop {
            let message = self.next_message().await.expect("control channel closed before a reply");
            if message != json!({"cmd": "hello"}) {
                return message;
            }
        }
    }

    /// Sends `register` and returns the reply.
    pub async fn register(&mut self, protocol: &str, port: u16) -> Value {
        self.send(&json!({"cmd": "register", "protocol": protocol, "port": port})).await;
        self.recv().await
    }

    /// Waits until the controller closes the connection, returning how many messages came meanwhile.
    pub async fn wait_closed(&mut self) -> usize {
        let mut seen = 0;
        while self.next_message().await.is_some() {
            seen += 1;
        }
        seen
    }
}

impl Drop for JsonClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Clients

/// Connects to `addr`, sends `payload`, half-closes, and returns everything read back.
pub async fn tcp_roundtrip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    tcp_roundtrip_from(&Host::Root, addr, payload).await
}

/// [`tcp_roundtrip`] from `host`.
pub async fn tcp_roundtrip_from(host: &Host, addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    timeout(DEADLINE, async {
        let mut stream = host.tcp_connect(addr, None).await?;
        stream.write_all(payload).await?;
        stream.shutdown().await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        Ok(back)
    })
    .await
    .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "round trip timed out")))
}

/// Sends one datagram from `socket` to `addr` and waits for the answer.
pub async fn udp_roundtrip(socket: &UdpSocket, addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    socket.send_to(payload, addr).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, from) = timeout(DEADLINE, socket.recv_from(&mut buf)).await.expect("UDP answer timed out").unwrap();
    assert_eq!(from, addr, "the answer must come from the frontend address");
    buf.truncate(n);
    buf
}

// ---------------------------------------------------------------------------------------------------------
// gRPC registrations

/// A live `Registry.Register` stream that answers every hello as healthy; dropping it ends the stream.
pub struct GrpcRegistration {
    /// The controller's answer to the registration.
    pub ack: contract::v1::RegisterAck,
    task: JoinHandle<()>,
}

impl GrpcRegistration {
    /// Registers `backend` for TCP `port` over `channel`.
    pub async fn tcp(
        channel: tonic::transport::Channel,
        port: u16,
        backend: SocketAddr,
    ) -> Result<GrpcRegistration, tonic::Status> {
        GrpcRegistration::tcp_with_token(channel, None, port, backend).await
    }

    /// Registers `backend` for TCP `port` over `channel`, presenting `token` as a bearer token.
    pub async fn tcp_with_token(
        channel: tonic::transport::Channel,
        token: Option<&str>,
        port: u16,
        backend: SocketAddr,
    ) -> Result<GrpcRegistration, tonic::Status> {
        use contract::auth::{Bearer, Token};
        use contract::v1::{
            self, HelloAck, RegisterRequest, Registration, register_request::Msg as Out, register_response::Msg as In,
            registry_client::RegistryClient,
        };
        let (tx, rx) = mpsc::channel(4);
        let registration = Registration {
            service: Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: port.into() }),
            backend_address: backend.ip().to_string(),
            backend_port: backend.port().into(),
            ..Default::default()
        };
        tx.send(RegisterRequest { msg: Some(Out::Register(registration)) }).await.unwrap();
        let mut inbound =
            RegistryClient::with_interceptor(channel, Bearer::new(token.and_then(|t| Token::new(t).ok()).as_ref()))
                .register(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
        let ack = match inbound.message().await?.and_then(|m| m.msg) {
            Some(In::Ack(ack)) => ack,
            other => return Err(tonic::Status::internal(format!("expected an ack, got {other:?}"))),
        };
        let task = tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(In::Hello(hello)) = message.msg {
                    let answer = HelloAck { seq: hello.seq, healthy: Some(true), load_permille: None };
                    if tx.send(RegisterRequest { msg: Some(Out::HelloAck(answer)) }).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(GrpcRegistration { ack, task })
    }
}

impl Drop for GrpcRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET /` over a new connection to `addr`: the status code.
pub async fn http_get_status(addr: SocketAddr) -> std::io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: switchboard\r\n\r\n").await?;
    let mut response = Vec::new();
    timeout(DEADLINE, stream.read_to_end(&mut response)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))
}

/// A client making TCP round trips to one frontend, one after the other every 5 ms, bounded in count
/// and time, counting the ones that failed.
pub struct RoundTrips {
    done: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RoundTrips {
    /// Starts round trips to `addr`: at most `max`, for at most `limit`.
    pub fn start(addr: SocketAddr, max: usize, limit: Duration) -> RoundTrips {
        let (done, sent, failed) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::default());
        let task = tokio::spawn({
            let (done, sent, failed): (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
                (Arc::clone(&done), Arc::clone(&sent), Arc::clone(&failed));
            async move {
                let until = Instant::now() + limit;
                while !done.load(Ordering::Relaxed) && Instant::now() < until && sent.load(Ordering::Relaxed) < max {
                    if tcp_roundtrip(addr, b"round trip").await.ok().as_deref() != Some(b"round trip".as_slice()) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        RoundTrips { done, sent, failed, task }
    }

    /// Waits until `more` round trips past the ones made so far are done (so some happen after whatever
    /// the test just did).
    pub async fn wait_more(&self, more: usize) {
        let target = self.sent.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + DEADLINE;
        while self.sent.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the round trips stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops; returns how many round trips were made and how many failed.
    pub async fn stop(self) -> (usize, usize) {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (self.sent.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}
