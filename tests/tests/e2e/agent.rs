//! The agent beside real servers: registration, local checks with rise/fall, controller restarts,
//! SIGTERM, bad input.

use std::time::Duration;

use switchboard_tests::harness::{
    Controller, Net, UdpEcho, free_port, http_get_status, http_server, run_to_exit, spawn_agent, udp_roundtrip,
};
use tokio::{net::UdpSocket, time::Instant};

fn backend_healthy(state: &serde_json::Value, port: u16) -> Option<bool> {
    Controller::backends(state, "tcp", port).first().and_then(|b| b["healthy"].as_bool())
}

#[tokio::test]
async fn a_failing_http_server_leaves_rotation_while_its_agent_stays_and_comes_back() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let port = free_port(net.host(2));
    let server_addr = std::net::SocketAddr::new(net.host(2), port);
    let server = http_server(server_addr).await;
    let backend = net.host(2).to_string();
    let port_arg = port.to_string();
    let _agent = spawn_agent(
        &ctl,
        &[
            "--protocol",
            "tcp",
            "--port",
            &port_arg,
            "--backend-address",
            &backend,
            "--check",
            "http:/",
            "--check-interval",
            "200ms",
            "--rise",
            "2",
            "--fall",
            "2",
        ],
    )
    .await;
    assert_eq!(http_get_status(ctl.frontend(port)).await.unwrap(), 200, "through the frontend");

    // interval x fall = 400 ms; the margin covers a busy machine.
    drop(server);
    let stopped = Instant::now();
    let state = ctl.wait_state("out of rotation", |s| backend_healthy(s, port) == Some(false)).await;
    assert!(stopped.elapsed() < Duration::from_millis(400 + 2_000), "took {:?}", stopped.elapsed());
    assert_eq!(Controller::backends(&state, "tcp", port).len(), 1, "still registered");

    let _server = http_server(server_addr).await;
    let started = Instant::now();
    ctl.wait_state("back in rotation", |s| backend_healthy(s, port) == Some(true)).await;
    assert!(started.elapsed() < Duration::from_millis(400 + 2_000), "took {:?}", started.elapsed());
    assert_eq!(http_get_status(ctl.frontend(port)).await.unwrap(), 200);
}

#[tokio::test]
async fn with_two_servers_clients_never_see_an_error_while_one_goes_down() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let port = free_port(net.host(2));
    let port_arg = port.to_string();
    let mut servers = Vec::new();
    let mut agents = Vec::new();
    for host in [2, 3] {
        servers.push(Some(http_server(std::net::SocketAddr::new(net.host(host), port)).await));
        let backend = net.host(host).to_string();
        let args = [
            "--protocol",
            "tcp",
            "--port",
            &port_arg,
            "--backend-address",
            &backend,
            "--check",
            "http:/",
            "--check-interval",
            "200ms",
            "--fall",
            "2",
        ];
        agents.push(spawn_agent(&ctl, &args).await);
    }
    ctl.wait_state("both in rotation", |s| Controller::backends(s, "tcp", port).len() == 2).await;

    for i in 0..60 {
        if i == 10 {
            // The server on host 2 dies (and is gone before the next request); its agent lives on.
            let mut dead = servers[0].take().unwrap();
            dead.kill().await.unwrap();
        }
        assert_eq!(http_get_status(ctl.frontend(port)).await.expect("a client saw an error"), 200, "request {i}");
    }
    ctl.wait_state("host 2 out of rotation", |s| {
        Controller::backends(s, "tcp", port).iter().any(|b| b["healthy"] == false)
    })
    .await;
    assert_eq!(agents.len(), 2);
}

#[tokio::test]
async fn a_udp_agent_checks_its_server_with_a_datagram() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let echo = UdpEcho::start(net.host(2), 0, "echo").await;
    let (port, backend) = (echo.addr.port().to_string(), net.host(2).to_string());
    let mut agent = spawn_agent(
        &ctl,
        &[
            "--protocol",
            "udp",
            "--port",
            &port,
            "--backend-address",
            &backend,
            "--check",
            "udp:ping",
            "--check-interval",
            "200ms",
        ],
    )
    .await;
    assert_eq!(agent.ready.get("services").map(String::as_str), Some(format!("udp:{port}={}", echo.addr).as_str()));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(udp_roundtrip(&client, ctl.frontend(echo.addr.port()), b"hi").await, b"echo:hi");
    let state = ctl.state().await;
    assert_eq!(Controller::backends(&state, "udp", echo.addr.port())[0]["healthy"], true);
    assert!(agent.is_running());
}

#[tokio::test]
async fn the_agent_re_registers_by_itself_after_a_controller_restart_and_deregisters_on_sigterm() {
    let net = Net::new();
    let mut ctl = Controller::spawn(net, &[]).await;
    let port = free_port(net.host(2));
    let _server = http_server(std::net::SocketAddr::new(net.host(2), port)).await;
    let (port_arg, backend) = (port.to_string(), net.host(2).to_string());
    let mut agent = spawn_agent(&ctl, &["--protocol", "tcp", "--port", &port_arg, "--backend-address", &backend]).await;
    assert_eq!(http_get_status(ctl.frontend(port)).await.unwrap(), 200);

    ctl.restart().await;
    ctl.wait_state("re-registered", |s| Controller::backends(s, "tcp", port).len() == 1).await;
    // The agent knows it too (it logs each registration) before it is stopped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.stderr_text().matches("register: registered").count() < 2 {
        assert!(Instant::now() < deadline, "the agent never logged its second registration");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http_get_status(ctl.frontend(port)).await.unwrap(), 200, "traffic flows again");
    assert!(agent.is_running());

    agent.terminate();
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).await, Some(0));
    ctl.wait_state("deregistered", |s| Controller::backends(s, "tcp", port).is_empty()).await;
    assert!(tokio::net::TcpStream::connect(ctl.frontend(port)).await.is_err(), "the last backend took the port");
    assert!(agent.stderr_text().contains("deregistered"), "{}", agent.stderr_text());
}

#[tokio::test]
async fn bad_input_gets_a_one_line_error_and_a_non_zero_exit() {
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--protocol", "tcp", "--port", "80", "--frobnicate"], 2, "--frobnicate"),
        (&["--protocol", "tcp", "--port", "0"], 64, "agent: invalid --port: must be a port in 1..=65535"),
        (
            &["--protocol", "tcp", "--port", "80", "--check", "http:"],
            64,
            "agent: invalid --check: an HTTP check needs a path",
        ),
        (
            &[
                "--protocol",
                "tcp",
                "--port",
                "80",
                "--check",
                "none",
                "--controller",
                "http://127.0.0.1:1",
                "--startup-timeout",
                "1s",
            ],
            1,
            "agent: cannot reach the controller at http://127.0.0.1:1",
        ),
    ];
    for (args, code, message) in cases {
        let started = Instant::now();
        let (exit, stderr) = run_to_exit("agent", args).await;
        // --startup-timeout 1s bounds the wait for an unreachable controller (margin for a busy machine).
        assert!(started.elapsed() < Duration::from_secs(4), "{args:?} took {:?}", started.elapsed());
        assert_eq!(exit, Some(*code), "{args:?}: {stderr}");
        assert!(stderr.lines().any(|l| l.contains(message)), "{args:?}: expected {message:?} in {stderr}");
    }
}

#[tokio::test]
async fn a_server_down_when_its_agent_starts_is_never_in_rotation() {
    use contract::v1::{EventKind, WatchEventsRequest, admin_client::AdminClient};
    use switchboard_tests::harness::JsonClient;

    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let mut admin = AdminClient::connect(ctl.grpc_url()).await.unwrap();
    let mut events = admin.watch_events(WatchEventsRequest { with_state: false }).await.unwrap().into_inner();
    // Nothing listens at the backend address: the first check fails.
    let port = free_port(net.host(2));
    let (port_arg, backend) = (port.to_string(), net.host(2).to_string());
    let _agent = spawn_agent(&ctl, &["--protocol", "tcp", "--port", &port_arg, "--backend-address", &backend]).await;
    let state = ctl.state().await;
    assert_eq!(backend_healthy(&state, port), Some(false), "registered out of rotation");

    // A marker change after the agent's registration: every event of the agent came before it.
    let marker = UdpEcho::start(net.host(3), 0, "m").await;
    let mut server = JsonClient::connect(&ctl, net.host(3)).await;
    assert_eq!(server.register("udp", marker.addr.port()).await["ack"], "successful");
    let mut kinds = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap().unwrap();
        if event.backend == marker.addr.to_string() {
            break;
        }
        kinds.push(EventKind::try_from(event.kind).unwrap());
    }
    assert!(kinds.contains(&EventKind::BackendRegistered), "{kinds:?}");
    assert!(!kinds.contains(&EventKind::BackendUnhealthy), "it was never in rotation to leave it: {kinds:?}");
}
