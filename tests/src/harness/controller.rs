//! The controller and `dataplane` nodes as a test drives them: spawned on port-0 listeners, their state
//! polled under a deadline, gRPC channels and admin HTTP from any host.

#[allow(clippy::wildcard_imports)]
use super::*;

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
