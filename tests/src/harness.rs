//! The harness. Every wait polls real state under a deadline; nothing sleeps for a fixed time hoping
//! state has settled.
//!
//! Binaries are resolved from the target directory of the running test (or `SWITCHBOARD_BIN_DIR`), and
//! built once per test process first, so `cargo test --workspace` never runs stale binaries.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UdpSocket, tcp::OwnedWriteHalf},
    process::Child,
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, timeout},
};

pub use crate::hosts::{Host, Network};

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------------------
// Binaries and processes

/// Path of a workspace binary, built first if needed.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // target/<profile>/deps/e2e-HASH -> target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(|d| d.parent()).expect("target directory").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--quiet", "--workspace", "--bins"]).current_dir(workspace);
        // Cargo gives this test its package's CARGO_* variables; build scripts that watch them (ring's) would
        // otherwise see a changed environment and rebuild on every run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_") && !matches!(&*key, "CARGO_HOME" | "CARGO_TARGET_DIR") {
                build.env_remove(&*key);
            }
        }
        if dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        dir
    });
    dir.join(name)
}

/// A running binary, killed when dropped. Its stderr is kept and printed if the test fails.
pub struct Process {
    name: String,
    child: Child,
    /// `key=value` pairs of its READY line.
    pub ready: HashMap<String, String>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Collects stderr until the process closes it.
    stderr_reader: Option<JoinHandle<()>>,
}

impl Process {
    /// Starts `name` with `args` on `host` and waits for its `READY` line on stdout.
    pub async fn spawn(host: &Host, name: &str, args: &[String]) -> Process {
        Process::spawn_command(host.command(&bin(name)), name, args).await
    }

    /// Starts `name` under a file-descriptor limit of `nofile` (soft and hard), with `prlimit`, as a
    /// machine with the common limit of 1,024 would.
    pub async fn spawn_with_fd_limit(name: &str, args: &[String], nofile: u32) -> Process {
        assert!(
            std::process::Command::new("prlimit").arg("--version").output().is_ok(),
            "prlimit (util-linux) is needed to run a binary under a descriptor limit"
        );
        let mut command = tokio::process::Command::new("prlimit");
        command.arg(format!("--nofile={nofile}:{nofile}")).arg("--").arg(bin(name));
        Process::spawn_command(command, name, args).await
    }

    async fn spawn_command(mut command: tokio::process::Command, name: &str, args: &[String]) -> Process {
        let mut child = command
            .args(args)
            .env("RUST_LOG", "info,dataplane=debug,controller=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = Arc::clone(&stderr);
        let stderr_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let mut out_lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut process =
            Process { name: name.to_owned(), child, ready: HashMap::new(), stderr, stderr_reader: Some(stderr_reader) };
        let ready = timeout(DEADLINE, async {
            loop {
                match out_lines.next_line().await {
                    Ok(Some(line)) if line.starts_with("READY ") => return Some(line),
                    Ok(Some(_)) => {}
                    _ => return None,
                }
            }
        })
        .await;
        let Ok(Some(line)) = ready else {
            panic!("{name} printed no READY line\n{}", process.stderr_text());
        };
        tokio::spawn(async move { while let Ok(Some(_)) = out_lines.next_line().await {} });
        process.ready = line
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        process
    }

    /// An address of the READY line.
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.ready.get(key).and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("READY has no {key}="))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it (SIGKILL: a crash, no clean-up) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("process still running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    }

    /// Sends SIGHUP (reload).
    pub fn hangup(&self) {
        let pid = self.child.id().expect("process still running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }

    /// Polls stderr until a line contains `text` (at least `count` such lines), or fails the test after
    /// [`DEADLINE`].
    pub async fn wait_stderr(&self, text: &str, count: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.stderr_text().lines().filter(|l| l.contains(text)).count() < count {
            assert!(Instant::now() < deadline, "{} never logged {text:?}:\n{}", self.name, self.stderr_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to `limit`) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let status = timeout(limit, self.child.wait()).await.expect("process did not exit in time").unwrap();
        // Everything it wrote before exiting is then in `stderr_text`.
        if let Some(reader) = self.stderr_reader.take() {
            let _ = timeout(limit, reader).await;
        }
        status.code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- stderr of {} -----\n{}\n----- end of {} -----", self.name, self.stderr_text(), self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Per-test networks

/// A loopback /24 of its own for one test: `.1` for frontends, other hosts for backends. Nothing else
/// binds these addresses, so a port picked by one backend is free on every other host of the block.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    a: u8,
    b: u8,
}

impl Net {
    /// A block no other test of this run uses (and, by the process id, unlikely any other run).
    pub fn new() -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() * 64;
        // 127.0.0.0/16 is left to everything else.
        let a = u8::try_from(n / 256 % 254).unwrap() + 1;
        let b = u8::try_from(n % 256).unwrap();
        Net { a, b }
    }

    /// Host `n` of the block.
    pub fn host(&self, n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.a, self.b, n))
    }

    /// Where frontends listen.
    pub fn frontend(&self) -> IpAddr {
        self.host(1)
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Controller

/// A running `controller` with port-0 listeners and its frontends on `net`'s frontend address.
pub struct Controller {
    /// The process.
    pub process: Process,
    /// The test network (loopback tests).
    pub net: Net,
    host: Host,
    args: Vec<String>,
}

/// Quick hellos, so tests that stop answering do not wait long.
const CONTROLLER_DEFAULTS: [&str; 6] =
    ["--hello-interval", "500ms", "--hello-timeout", "500ms", "--hello-failures", "3"];

impl Controller {
    /// Starts a controller on the machine, listening on `net`'s host .254, frontends on `net`'s .1.
    pub async fn spawn(net: Net, extra: &[&str]) -> Controller {
        let mut args = vec!["--frontend-address".to_owned(), net.frontend().to_string()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Controller::spawn_on(Host::Root, net.host(254), net, &args).await
    }

    /// Starts a controller on `host`, every listener on `ip` port 0, plus `args`.
    pub async fn spawn_on(host: Host, ip: IpAddr, net: Net, args: &[String]) -> Controller {
        let mut all: Vec<String> = CONTROLLER_DEFAULTS.iter().map(|s| (*s).to_owned()).collect();
        for flag in ["--json-listen", "--grpc-listen", "--admin-listen"] {
            all.extend([flag.to_owned(), SocketAddr::new(ip, 0).to_string()]);
        }
        all.extend(args.iter().cloned());
        let process = Process::spawn(&host, "controller", &all).await;
        note_controller_ports(&process);
        Controller { process, net, host, args: all }
    }

    /// Starts a controller like [`Controller::spawn`], under a file-descriptor limit of `nofile`.
    pub async fn spawn_with_fd_limit(net: Net, nofile: u32, extra: &[&str]) -> Controller {
        let ip = net.host(254);
        let mut all: Vec<String> = CONTROLLER_DEFAULTS.iter().map(|s| (*s).to_owned()).collect();
        for flag in ["--json-listen", "--grpc-listen", "--admin-listen"] {
            all.extend([flag.to_owned(), SocketAddr::new(ip, 0).to_string()]);
        }
        all.extend(["--frontend-address".to_owned(), net.frontend().to_string()]);
        all.extend(extra.iter().map(|s| (*s).to_owned()));
        let process = Process::spawn_with_fd_limit("controller", &all, nofile).await;
        note_controller_ports(&process);
        Controller { process, net, host: Host::Root, args: all }
    }

    /// Kills the controller (a crash) and starts it again on the same addresses, as an operator would.
    pub async fn restart(&mut self) {
        self.process.kill().await;
        self.process = Process::spawn(&self.host, "controller", &self.args_on_same_ports()).await;
    }

    /// Starts a successor on the same addresses while this one runs (both with `--takeover`), and
    /// returns the old process, which drains and exits by itself.
    pub async fn upgrade(&mut self) -> Process {
        let next = Process::spawn(&self.host, "controller", &self.args_on_same_ports()).await;
        std::mem::replace(&mut self.process, next)
    }

    /// Its arguments, with the ports it listens on now instead of port 0 (later flags win).
    fn args_on_same_ports(&self) -> Vec<String> {
        let mut args = self.args.clone();
        for (flag, key) in [("--json-listen", "json"), ("--grpc-listen", "grpc"), ("--admin-listen", "admin")] {
            args.extend([flag.to_owned(), self.process.addr(key).to_string()]);
        }
        args
    }

    /// The JSON control channel.
    pub fn json_addr(&self) -> SocketAddr {
        self.process.addr("json")
    }

    /// The gRPC endpoint, as a URL (https:// when the controller serves TLS).
    pub fn grpc_url(&self) -> String {
        let scheme = if self.args.iter().any(|a| a == "--tls-cert") { "https" } else { "http" };
        format!("{scheme}://{}", self.process.addr("grpc"))
    }

    /// A gRPC channel to the controller from `source` on the machine.
    pub async fn grpc_channel_from(&self, source: IpAddr) -> tonic::transport::Channel {
        grpc_channel_from(&Host::Root, self.process.addr("grpc"), Some(source)).await
    }

    /// The embedded node's frontend of `port`.
    pub fn frontend(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.frontend(), port)
    }

    /// `GET /api/state`, with the controller's admin token when it has one.
    pub async fn state(&self) -> Value {
        let (status, body) = self.http_get("/api/state", self.admin_token()).await;
        assert_eq!(status, 200, "GET /api/state: {body}");
        serde_json::from_str(&body).expect("JSON state")
    }

    /// `GET path` on the admin listener, presenting `token`: the status and the body.
    pub async fn http_get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        http_get(&self.host, self.process.addr("admin"), path, token).await
    }

    /// The `--admin-token` the controller was started with.
    pub fn admin_token(&self) -> Option<&str> {
        let at = self.args.iter().rposition(|a| a == "--admin-token")?;
        self.args.get(at + 1).map(String::as_str)
    }

    /// Polls the state until `pred` holds and every connected node has applied the latest version (so
    /// the nodes' sockets match the state), or fails the test after [`DEADLINE`].
    pub async fn wait_state(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let state = self.state().await;
            let version = state["version"].as_u64();
            let applied = state["nodes"].as_array().is_some_and(|nodes| {
                nodes.iter().filter(|n| n["connected"] == true).all(|n| n["acked_version"].as_u64() >= version)
            });
            if applied && pred(&state) {
                return state;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; last state: {state:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every node of `ids` is connected and has applied the latest version; returns the state.
    pub async fn wait_synced(&self, ids: &[&str]) -> Value {
        self.wait_state("nodes synced", |s| {
            ids.iter().all(|id| {
                Controller::node(s, id).is_some_and(|n| n["connected"] == true && !n["acked_version"].is_null())
            })
        })
        .await
    }

    /// The backends of a service in the state (empty when the service does not exist).
    pub fn backends(state: &Value, protocol: &str, port: u16) -> Vec<Value> {
        state["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["protocol"] == protocol && s["port"] == port)
            .and_then(|s| s["backends"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The node called `id` in the state.
    pub fn node<'a>(state: &'a Value, id: &str) -> Option<&'a Value> {
        state["nodes"].as_array()?.iter().find(|n| n["id"] == id)
    }
}

/// A running `dataplane` process.
pub struct DataplaneNode {
    /// The process.
    pub process: Process,
    /// Its node id.
    pub id: String,
    /// The address its frontends bind.
    pub frontend_ip: IpAddr,
    host: Host,
}

impl DataplaneNode {
    /// Starts a node on `host` following `ctl`, frontends on `frontend_ip`, admin on `admin_ip` port 0.
    pub async fn spawn(
        host: Host,
        ctl: &Controller,
        id: &str,
        frontend_ip: IpAddr,
        admin_ip: IpAddr,
        extra: &[&str],
    ) -> Self {
        let mut args: Vec<String> = vec![
            "--controller".into(),
            ctl.grpc_url(),
            "--node-id".into(),
            id.into(),
            "--frontend-address".into(),
            frontend_ip.to_string(),
            "--admin-listen".into(),
            SocketAddr::new(admin_ip, 0).to_string(),
            "--backoff-max".into(),
            "500ms".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let process = Process::spawn(&host, "dataplane", &args).await;
        assert_eq!(process.ready.get("node").map(String::as_str), Some(id));
        DataplaneNode { process, id: id.to_owned(), frontend_ip, host }
    }

    /// Its frontend of `port`.
    pub fn frontend(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.frontend_ip, port)
    }

    /// `GET /api/state` of the node.
    pub async fn state(&self) -> Value {
        http_get_json(&self.host, self.process.addr("admin"), "/api/state").await
    }

    /// Waits until the node's last error (why its link to the controller ended or was refused) says
    /// `text`, or fails the test after [`DEADLINE`].
    pub async fn wait_last_error(&self, text: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let state = self.state().await;
            if state["last_error"].as_str().is_some_and(|e| e.contains(text)) {
                return;
            }
            assert!(Instant::now() < deadline, "node {}: no last error saying {text:?}: {state}", self.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A gRPC channel to `addr`, connected from `host` (so a client can live in a namespace).
pub async fn grpc_channel(host: &Host, addr: SocketAddr) -> tonic::transport::Channel {
    grpc_channel_from(host, addr, None).await
}

/// A gRPC channel to `addr`, connected from `host` and, when given, from its address `source` (a server
/// that registers itself connects from its own address).
pub async fn grpc_channel_from(host: &Host, addr: SocketAddr, source: Option<IpAddr>) -> tonic::transport::Channel {
    let host = host.clone();
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let host = host.clone();
        async move { host.tcp_connect(addr, source).await.map(hyper_util::rt::TokioIo::new) }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("gRPC connect")
}

async fn http_get_json(host: &Host, addr: SocketAddr, path: &str) -> Value {
    let (_, body) = http_get(host, addr, path, None).await;
    serde_json::from_str(&body).expect("JSON state")
}

/// `GET path` over HTTP/1.0 from `host`, presenting `token` as a bearer token: the status and the body.
pub async fn http_get(host: &Host, addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = host.tcp_connect(addr, None).await.expect("admin connect");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nHost: switchboard\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("HTTP status");
    (status, body.to_owned())
}

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
// Demo backends

/// A TCP echo server that counts the connections it accepted.
pub struct TcpEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpEcho {
    /// Listens on `ip` at `port` (0 for any) on the machine.
    pub async fn start(ip: IpAddr, port: u16) -> TcpEcho {
        TcpEcho::start_on(&Host::Root, ip, port).await
    }

    /// Listens on `ip` at `port` (0 for any) on `host`.
    pub async fn start_on(host: &Host, ip: IpAddr, port: u16) -> TcpEcho {
        let mut listener = host.tcp_listen(SocketAddr::new(ip, port)).await.expect("echo bind");
        // A service may not use a controller's own port: an ephemeral port that happens to be one is no good.
        while port == 0 && is_controller_port(listener.local_addr().unwrap().port()) {
            listener = host.tcp_listen(SocketAddr::new(ip, port)).await.expect("echo bind");
        }
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        TcpEcho { addr, accepted, task }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP server that answers each datagram with `NAME:` followed by the datagram.
pub struct UdpEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl UdpEcho {
    /// Listens on `ip` at `port` (0 for any), answering with `name` as prefix.
    pub async fn start(ip: IpAddr, port: u16, name: &str) -> UdpEcho {
        let mut socket = Host::Root.udp_bind(SocketAddr::new(ip, port)).await.expect("udp echo bind");
        while port == 0 && is_controller_port(socket.local_addr().unwrap().port()) {
            socket = Host::Root.udp_bind(SocketAddr::new(ip, port)).await.expect("udp echo bind");
        }
        let addr = socket.local_addr().unwrap();
        let prefix = format!("{name}:").into_bytes();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = prefix.clone();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        UdpEcho { addr, task }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
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

// ---------------------------------------------------------------------------------------------------------
// Agents and other programs

/// Starts `agent` with `args` against `ctl` and waits for its READY line (it prints it once registered).
pub async fn spawn_agent(ctl: &Controller, args: &[&str]) -> Process {
    let mut all = vec!["--controller".to_owned(), ctl.grpc_url(), "--backoff-max".to_owned(), "300ms".to_owned()];
    all.extend(args.iter().map(|s| (*s).to_owned()));
    Process::spawn(&Host::Root, "agent", &all).await
}

/// Runs workspace binary `name` with `args` until it exits (at most [`DEADLINE`]); returns its exit code
/// and stderr.
pub async fn run_to_exit(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let output = timeout(
        DEADLINE,
        tokio::process::Command::new(bin(name)).args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .expect("the program did not exit in time")
    .expect("the program could not start");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// A directory of one test's own (named after its network block), readable by unprivileged helpers such as
/// nginx workers, removed with everything in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory for the test that owns `net`; `what` says what it holds.
    pub fn new(net: &Net, what: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("switchboard-{what}-{}-{}", std::process::id(), net.host(0)));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to the file `name`, aside first and then renamed into place, as editors and
    /// configuration managers do: a reader never sees half a file. Returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let (path, aside) = (self.0.join(name), self.0.join(format!(".{name}.new")));
        std::fs::write(&aside, text).unwrap();
        std::fs::rename(&aside, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on `ip` (bound and released: on a test's own loopback block nothing else takes it).
pub fn free_port(ip: IpAddr) -> u16 {
    loop {
        let port = std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port();
        if !is_controller_port(port) {
            return port;
        }
    }
}

/// Ports the controllers of this test binary listen on. The controller refuses them as service ports
/// (whatever the address), so test backends stay off them.
static CONTROLLER_PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());

fn note_controller_ports(process: &Process) {
    let ports = ["json", "grpc", "admin"].map(|key| process.addr(key).port());
    CONTROLLER_PORTS.lock().unwrap().extend(ports);
}

fn is_controller_port(port: u16) -> bool {
    CONTROLLER_PORTS.lock().unwrap().contains(&port)
}

/// Starts an outside program with `args`, its input and output discarded, killed when dropped.
pub fn spawn_quiet<S: AsRef<std::ffi::OsStr>>(program: &str, args: impl IntoIterator<Item = S>) -> Child {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}

/// `python3 -m http.server` on `addr`, killed when dropped; returns once it accepts connections.
pub async fn http_server(addr: SocketAddr) -> Child {
    let port = addr.port().to_string();
    let child = spawn_quiet("python3", ["-m", "http.server", &port, "--bind", &addr.ip().to_string()]);
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "http.server on {addr} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
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

/// Two TCP echo servers on hosts 2 and 3 of a controller's network, on one port, each registered over its
/// own JSON channel (kept open, answering hellos, while the pair lives).
pub struct EchoPair {
    /// The server on host 2 (first in round robin order).
    pub a: TcpEcho,
    /// The server on host 3.
    pub b: TcpEcho,
    /// The service port.
    pub port: u16,
    /// Host 2's control channel.
    pub server_a: JsonClient,
    /// Host 3's control channel.
    pub server_b: JsonClient,
}

impl EchoPair {
    /// Starts and registers the pair, and waits until every node serves both.
    pub async fn registered(ctl: &Controller) -> EchoPair {
        let net = ctl.net;
        let a = TcpEcho::start(net.host(2), 0).await;
        let port = a.addr.port();
        let b = TcpEcho::start(net.host(3), port).await;
        let mut server_a = JsonClient::connect(ctl, net.host(2)).await;
        let mut server_b = JsonClient::connect(ctl, net.host(3)).await;
        assert_eq!(server_a.register("tcp", port).await, json!({"ack": "successful"}));
        assert_eq!(server_b.register("tcp", port).await, json!({"ack": "successful"}));
        ctl.wait_state("two tcp backends", |s| Controller::backends(s, "tcp", port).len() == 2).await;
        EchoPair { a, b, port, server_a, server_b }
    }
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
