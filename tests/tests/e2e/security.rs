//! Who may steer the balancer: bearer tokens at each door, the registration rules (sources, foreign
//! backends, loops into the balancer, node ids).

use std::net::SocketAddr;

use contract::{
    auth::{Bearer, Token},
    v1::{self, DeregisterRequest, ListServicesRequest, admin_client::AdminClient, registry_client::RegistryClient},
};
use serde_json::json;
use switchboard_tests::harness::{
    Controller, DataplaneNode, GrpcRegistration, JsonClient, Net, TcpEcho, free_port, run_to_exit, spawn_agent,
};
use switchboard_tests::hosts::Host;
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

const AUTH: &str = "registration-token-0001";
const NODE: &str = "node-token-000000000001";
const ADMIN: &str = "admin-token-00000000001";

fn bearer(token: Option<&str>) -> Bearer {
    Bearer::new(token.map(|t| Token::new(t).unwrap()).as_ref())
}

fn registry(channel: Channel, token: Option<&str>) -> RegistryClient<InterceptedService<Channel, Bearer>> {
    RegistryClient::with_interceptor(channel, bearer(token))
}

/// Opens a `Register` stream for TCP `port` naming `backend` (kept open for the test), presenting `token`;
/// the first answer, or the refusal.
async fn register(
    channel: Channel,
    token: Option<&str>,
    port: u16,
    backend: SocketAddr,
) -> Result<v1::RegisterAck, tonic::Status> {
    let registration = GrpcRegistration::tcp_with_token(channel, token, port, backend).await?;
    let ack = registration.ack.clone();
    // The stream, and so the registration, lives as long as the test.
    std::mem::forget(registration);
    Ok(ack)
}

#[tokio::test]
async fn each_door_opens_for_its_own_token_only() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--auth-token", AUTH, "--node-token", NODE, "--admin-token", ADMIN]).await;
    let channel = tonic::transport::Endpoint::from_shared(ctl.grpc_url()).unwrap().connect().await.unwrap();

    // Admin, over gRPC and HTTP: only the admin token. An agent's token cannot drain or read.
    for token in [None, Some("wrong-token-0000000000"), Some(AUTH), Some(NODE)] {
        let mut admin = AdminClient::with_interceptor(channel.clone(), bearer(token));
        let status = admin.list_services(ListServicesRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}: {status}");
        let (code, body) = ctl.http_get("/api/state", token).await;
        assert_eq!(code, 401, "{token:?}: {body}");
        assert!(body.contains("bearer token"), "{body}");
    }
    let mut admin = AdminClient::with_interceptor(channel.clone(), bearer(Some(ADMIN)));
    admin.list_services(ListServicesRequest {}).await.unwrap();
    assert_eq!(ctl.http_get("/api/state", Some(ADMIN)).await.0, 200);

    // Registry: the registration token (an agent with it registers; one without is refused at once).
    let backend = TcpEcho::start(net.host(2), 0).await;
    let status = register(channel.clone(), None, backend.addr.port(), backend.addr).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    let port = backend.addr.port().to_string();
    let ip = net.host(2).to_string();
    let agent = ["--protocol", "tcp", "--port", &port, "--backend-address", &ip, "--check", "none"];
    let _agent = spawn_agent(&ctl, &[&agent[..], &["--auth-token", AUTH]].concat()).await;
    ctl.wait_state("registered by the agent", |s| Controller::backends(s, "tcp", backend.addr.port()).len() == 1).await;
    let grpc = ctl.grpc_url();
    let wrong = [&agent[..], &["--controller", &grpc, "--auth-token", "wrong-token-0000000000"]].concat();
    let (exit, stderr) = run_to_exit("agent", &wrong).await;
    assert_eq!(exit, Some(1), "{stderr}");
    assert!(stderr.contains("agent: the controller refused tcp:") && stderr.contains("bearer token"), "{stderr}");

    // Dataplane.Sync: the node token. A node without it is refused and says why on its own admin API.
    let good =
        DataplaneNode::spawn(Host::Root, &ctl, "good", net.host(11), net.host(254), &["--node-token", NODE]).await;
    let bad = DataplaneNode::spawn(Host::Root, &ctl, "bad", net.host(12), net.host(254), &[]).await;
    ctl.wait_synced(&["good"]).await;
    bad.wait_last_error("bearer token").await;
    assert!(Controller::node(&ctl.state().await, "bad").is_none(), "a refused node is never listed");
    drop((good, bad));
}

#[tokio::test]
async fn tokens_come_from_files_and_open_doors_are_warned_about() {
    let net = Net::new();
    let dir = std::env::temp_dir().join(format!("switchboard-token-{}-{}", std::process::id(), net.host(1)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("admin-token");
    std::fs::write(&file, format!("{ADMIN}\n")).unwrap();
    let ctl = Controller::spawn(net, &["--admin-token-file", file.to_str().unwrap()]).await;
    assert_eq!(ctl.http_get("/api/state", None).await.0, 401);
    assert_eq!(ctl.http_get("/api/state", Some(ADMIN)).await.0, 200);
    let stderr = ctl.process.stderr_text();
    assert!(stderr.contains("no --auth-token: anyone who reaches the gRPC port"), "{stderr}");
    assert!(stderr.contains("no --node-token"), "{stderr}");
    assert!(!stderr.contains("no --admin-token"), "{stderr}");
    assert!(!stderr.contains(ADMIN), "the token is never logged");
    std::fs::remove_dir_all(&dir).unwrap();

    // A token too short to be one is a configuration error, named.
    let (exit, stderr) = run_to_exit("controller", &["--auth-token", "short"]).await;
    assert_eq!(exit, Some(64), "{stderr}");
    assert!(stderr.contains("controller: invalid --auth-token: a token must have at least 16 characters"), "{stderr}");
}

#[tokio::test]
async fn only_an_operator_may_register_another_hosts_backend() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--admin-token", ADMIN]).await;
    let victim = TcpEcho::start(net.host(2), 0).await;
    // A client on .5 names the backend on .2: it could take it over, and remove it by leaving.
    let from_elsewhere = ctl.grpc_channel_from(net.host(5)).await;
    let status = register(from_elsewhere.clone(), None, victim.addr.port(), victim.addr).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("needs the admin token or --allow-foreign-backends"), "{status}");
    let deregister = DeregisterRequest {
        service: Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: victim.addr.port().into() }),
        backend_address: net.host(2).to_string(),
        backend_port: 0,
    };
    let status = registry(from_elsewhere.clone(), None).deregister(deregister.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");

    // The operator may (a registration service that announces others' servers).
    let ack = register(from_elsewhere.clone(), Some(ADMIN), victim.addr.port(), victim.addr).await.unwrap();
    assert!(ack.success, "{}", ack.message);
    registry(from_elsewhere, Some(ADMIN)).deregister(deregister).await.unwrap();

    // So may anyone, when the operator says so.
    let open = Controller::spawn(Net::new(), &["--allow-foreign-backends"]).await;
    let other = TcpEcho::start(open.net.host(2), 0).await;
    let channel = open.grpc_channel_from(open.net.host(5)).await;
    assert!(register(channel, None, other.addr.port(), other.addr).await.unwrap().success);
}

#[tokio::test]
async fn a_backend_is_never_the_balancer_itself() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--admin-token", ADMIN]).await;
    // A public frontend relaying into the admin port.
    let channel = ctl.grpc_channel_from(net.host(5)).await;
    let admin = ctl.process.addr("admin");
    let port = free_port(net.frontend());
    let ack = register(channel, Some(ADMIN), port, admin).await.unwrap();
    assert!(!ack.success);
    assert_eq!(ack.message, format!("backend {admin} is one of the balancer's own listeners"));

    // A server on the frontend's own address registering its port: every connection would loop.
    let mut looped = JsonClient::connect(&ctl, net.frontend()).await;
    let port = TcpEcho::start(net.host(2), 0).await.addr.port();
    let reply = looped.register("tcp", port).await;
    let frontend = SocketAddr::new(net.frontend(), port);
    assert_eq!(
        reply,
        json!({"ack": "failed", "msg": format!("backend {frontend} is the frontend of tcp:{port}: traffic would loop")})
    );
    assert!(Controller::backends(&ctl.state().await, "tcp", port).is_empty());
}

#[tokio::test]
async fn the_json_channel_takes_only_allowed_sources() {
    let net = Net::new();
    let allowed = format!("{}/32", net.host(2));
    let ctl = Controller::spawn(net, &["--json-allow", &allowed]).await;
    let mut refused = JsonClient::connect(&ctl, net.host(3)).await;
    let msg = format!("source {} is not allowed on the control channel (--json-allow {allowed})", net.host(3));
    assert_eq!(refused.recv().await, json!({"ack": "failed", "msg": msg}));
    assert_eq!(refused.wait_closed().await, 0, "and disconnected");
    let backend = TcpEcho::start(net.host(2), 0).await;
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", backend.addr.port()).await, json!({"ack": "successful"}));
}

#[tokio::test]
async fn the_embedded_node_id_is_reserved() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let impostor = DataplaneNode::spawn(Host::Root, &ctl, "embedded", net.host(13), net.host(254), &[]).await;
    impostor.wait_last_error("reserved").await;
    let state = ctl.state().await;
    let node = Controller::node(&state, "embedded").unwrap();
    assert_eq!(node["connected"], true);
    assert!(node["address"].is_null(), "the embedded node is still the controller's own");
    // Registrations still reach the real embedded node.
    let backend = TcpEcho::start(net.host(2), 0).await;
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", backend.addr.port()).await, json!({"ack": "successful"}));
}

/// A certificate authority and the certificates it signs, written as PEM files into a directory of the
/// test's own.
struct Pki {
    dir: std::path::PathBuf,
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
}

impl Pki {
    fn new(dir: &std::path::Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Pki { dir: dir.to_owned(), key, params }
    }

    /// The authority's certificate file.
    fn ca(&self, name: &str) -> String {
        self.dir.join(format!("{name}.pem")).to_string_lossy().into_owned()
    }

    /// A certificate for `ip`, signed by this authority: (certificate file, key file).
    fn issue(&self, name: &str, ip: std::net::IpAddr) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::IpAddress(ip)];
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (cert_file, key_file) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file.to_string_lossy().into_owned(), key_file.to_string_lossy().into_owned())
    }
}

#[tokio::test]
async fn grpc_over_tls_with_the_right_authority_and_nodes_with_certificates_only() {
    let net = Net::new();
    let dir = std::env::temp_dir().join(format!("switchboard-pki-{}-{}", std::process::id(), net.host(1)));
    let servers = Pki::new(&dir, "servers-ca");
    let nodes = Pki::new(&dir, "nodes-ca");
    let strangers = Pki::new(&dir, "strangers-ca");
    let (cert, key) = servers.issue("controller", net.host(254));
    let ctl =
        Controller::spawn(net, &["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &nodes.ca("nodes-ca")]).await;
    assert!(ctl.grpc_url().starts_with("https://"));

    // An agent that trusts the servers' authority registers over TLS; one that trusts another does not.
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port().to_string();
    let ip = net.host(2).to_string();
    let agent = ["--protocol", "tcp", "--port", &port, "--backend-address", &ip, "--check", "none"];
    let servers_ca = servers.ca("servers-ca");
    let _agent = spawn_agent(&ctl, &[&agent[..], &["--ca", &servers_ca]].concat()).await;
    ctl.wait_state("registered over TLS", |s| Controller::backends(s, "tcp", backend.addr.port()).len() == 1).await;
    let grpc = ctl.grpc_url();
    let strangers_ca = strangers.ca("strangers-ca");
    let wrong = [&agent[..], &["--controller", &grpc, "--ca", &strangers_ca, "--startup-timeout", "1s"]].concat();
    let (exit, stderr) = run_to_exit("agent", &wrong).await;
    assert_eq!(exit, Some(1), "{stderr}");
    assert!(stderr.contains("agent: cannot reach the controller"), "{stderr}");
    // Plaintext to a TLS port gets nowhere either.
    let plain = format!("http://{}", ctl.process.addr("grpc"));
    let (exit, _) =
        run_to_exit("agent", &[&agent[..], &["--controller", &plain, "--startup-timeout", "1s"]].concat()).await;
    assert_eq!(exit, Some(1));

    // A node with a certificate of the nodes' authority follows; one without is refused, and says why.
    let (node_cert, node_key) = nodes.issue("n1", net.host(11));
    let tls = ["--ca", &servers_ca, "--tls-cert", &node_cert, "--tls-key", &node_key];
    let good = DataplaneNode::spawn(Host::Root, &ctl, "n1", net.host(11), net.host(254), &tls).await;
    ctl.wait_synced(&["n1"]).await;
    let bare = DataplaneNode::spawn(Host::Root, &ctl, "n2", net.host(12), net.host(254), &["--ca", &servers_ca]).await;
    bare.wait_last_error("client certificate").await;
    assert!(Controller::node(&ctl.state().await, "n2").is_none());
    // A certified node claiming another id than its certificate's name is refused.
    let (other_cert, other_key) = nodes.issue("node-a", net.host(13));
    let tls = ["--ca", &servers_ca, "--tls-cert", &other_cert, "--tls-key", &other_key];
    let liar = DataplaneNode::spawn(Host::Root, &ctl, "x1", net.host(13), net.host(254), &tls).await;
    liar.wait_last_error("is not a name in the node's certificate").await;
    assert!(Controller::node(&ctl.state().await, "x1").is_none());
    drop((good, bare, liar));
    std::fs::remove_dir_all(&dir).unwrap();
}
