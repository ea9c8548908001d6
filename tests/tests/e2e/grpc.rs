//! The gRPC API: Registry.Register / Deregister, Admin.ListServices, health and reflection.

use contract::v1::{
    self, DeregisterRequest, HelloAck, ListServicesRequest, RegisterRequest, Registration, admin_client::AdminClient,
    register_request, register_response, registry_client::RegistryClient,
};
use switchboard_tests::harness::{Controller, Net, TcpEcho, tcp_roundtrip};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn registration(ip: std::net::IpAddr, port: u16) -> RegisterRequest {
    RegisterRequest {
        msg: Some(register_request::Msg::Register(Registration {
            service: Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: port.into() }),
            backend_address: ip.to_string(),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn register_stream_carries_traffic_answers_hellos_and_its_end_deregisters() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--hello-interval", "200ms"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    // A server registers itself: it connects from its own address.
    let mut registry = RegistryClient::new(ctl.grpc_channel_from(net.host(2)).await);

    let (tx, rx) = mpsc::channel(4);
    tx.send(registration(net.host(2), port)).await.unwrap();
    let mut inbound = registry.register(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let Some(register_response::Msg::Ack(ack)) = inbound.message().await.unwrap().unwrap().msg else {
        panic!("the first answer must be an ack");
    };
    assert!(ack.success, "{}", ack.message);
    assert_eq!(ack.backend, backend.addr.to_string());
    assert_eq!(tcp_roundtrip(ctl.frontend(port), b"via grpc").await.unwrap(), b"via grpc");

    // Hellos come and are answered; a backend reporting itself unhealthy leaves rotation but stays listed.
    for healthy in [true, false] {
        let Some(register_response::Msg::Hello(hello)) = inbound.message().await.unwrap().unwrap().msg else {
            panic!("expected a hello");
        };
        let answer = HelloAck { seq: hello.seq, healthy: Some(healthy), load_permille: None };
        tx.send(RegisterRequest { msg: Some(register_request::Msg::HelloAck(answer)) }).await.unwrap();
    }
    ctl.wait_state("backend out of rotation", |s| {
        Controller::backends(s, "tcp", port).first().is_some_and(|b| b["healthy"] == false)
    })
    .await;

    let mut admin = AdminClient::connect(ctl.grpc_url()).await.unwrap();
    let services = admin.list_services(ListServicesRequest {}).await.unwrap().into_inner();
    assert_eq!(services.services.len(), 1);
    let service = &services.services[0];
    assert_eq!(service.algorithm, "round_robin");
    assert_eq!(service.backends[0].address, backend.addr.to_string());
    assert!(!service.backends[0].healthy);
    assert!(service.backends[0].registration.starts_with("grpc "));
    assert_eq!(service.backends[0].total_connections, 1);

    // Ending the stream deregisters, and the last backend takes the port along.
    drop(tx);
    drop(inbound);
    ctl.wait_state("service gone", |s| Controller::backends(s, "tcp", port).is_empty()).await;
    assert!(tokio::net::TcpStream::connect(ctl.frontend(port)).await.is_err());
}

#[tokio::test]
async fn deregister_removes_a_backend_and_unknown_ones_are_not_found() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let port = backend.addr.port();
    // A server registers itself: it connects from its own address.
    let mut registry = RegistryClient::new(ctl.grpc_channel_from(net.host(2)).await);
    let (tx, rx) = mpsc::channel(4);
    tx.send(registration(net.host(2), port)).await.unwrap();
    let mut inbound = registry.register(ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(matches!(inbound.message().await.unwrap().unwrap().msg, Some(register_response::Msg::Ack(a)) if a.success));

    let request = DeregisterRequest {
        service: Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: port.into() }),
        backend_address: net.host(2).to_string(),
        backend_port: 0,
    };
    registry.deregister(request.clone()).await.unwrap();
    ctl.wait_state("service gone", |s| Controller::backends(s, "tcp", port).is_empty()).await;
    let status = registry.deregister(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");

    // A bad first message is refused with InvalidArgument.
    let (tx, rx) = mpsc::channel(1);
    tx.send(RegisterRequest { msg: Some(register_request::Msg::HelloAck(HelloAck::default())) }).await.unwrap();
    let status = registry.register(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn health_serves_and_reflection_lists_the_services() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request,
        server_reflection_response,
    };

    let ctl = Controller::spawn(Net::new(), &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(ctl.grpc_url()).unwrap().connect().await.unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "switchboard.v1.Registry", "switchboard.v1.Admin"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(server_reflection_response::MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["switchboard.v1.Registry", "switchboard.v1.Admin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}
