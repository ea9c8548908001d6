//! The PROXY protocol: a v2 header to backends (read by nginx `stream`, a parser that is not ours, and by a
//! UDP backend that parses the `DGRAM` header byte by byte here), and v1/v2 headers accepted from a
//! balancer in front, whose client then is the client in the access log and for `source_hash`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::{Value, json};
use switchboard_tests::{
    harness::{Controller, DEADLINE, JsonClient, Net, TcpEcho, TempDir, free_port, spawn_quiet},
    tools,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
    time::Instant,
};

/// Registers a backend on `host`'s `port` over the JSON channel with `extra` fields, and waits for it.
async fn register(ctl: &Controller, host: IpAddr, protocol: &str, port: u16, extra: Value) -> JsonClient {
    let mut server = JsonClient::connect(ctl, host).await;
    let mut request = json!({"cmd": "register", "protocol": protocol, "port": port});
    request.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    server.send(&request).await;
    assert_eq!(server.recv().await["ack"], "successful");
    server
}

/// A TCP connection to `to` from `from` (port 0).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test]
async fn nginx_behind_switchboard_learns_the_client_address_from_the_v2_header() {
    if !tools::require(
        "nginx with its stream module",
        &["test", "-f", "/usr/lib/nginx/modules/ngx_stream_module.so"],
        "apt-get install nginx libnginx-mod-stream",
    ) {
        return;
    }
    let net = Net::new();
    let dir = TempDir::new(&net, "proxy");
    let backend = SocketAddr::new(net.host(2), free_port(net.host(2)));
    let (conf, log) = (dir.path().join("nginx.conf"), dir.path().join("access.log"));
    std::fs::write(
        &conf,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes 1;\ndaemon off;\n\
             pid {dir}/nginx.pid;\nerror_log {dir}/error.log;\nevents {{ worker_connections 64; }}\n\
             stream {{\n  log_format client '$proxy_protocol_addr:$proxy_protocol_port $remote_addr';\n\
               server {{\n    listen {backend} proxy_protocol;\n    access_log {log} client;\n\
                 return \"$proxy_protocol_addr:$proxy_protocol_port\\n\";\n  }}\n}}\n",
            dir = dir.path().display(),
            log = log.display()
        ),
    )
    .unwrap();
    let _nginx = spawn_quiet("nginx", ["-c", conf.to_str().unwrap()]);
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(backend).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx never listened:\n{}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let ctl = Controller::spawn(net, &[]).await;
    let _server = register(&ctl, net.host(2), "tcp", backend.port(), json!({"proxy_protocol": "v2"})).await;
    let state = ctl.wait_state("the service", |s| Controller::backends(s, "tcp", backend.port()).len() == 1).await;
    let service = state["services"].as_array().unwrap().iter().find(|s| s["port"] == backend.port()).unwrap();
    assert_eq!(service["proxy_protocol"], json!({"send_v2": true, "accept": false}));

    let mut seen = Vec::new();
    for _ in 0..3 {
        let mut client = connect_from(net.host(7), ctl.frontend(backend.port())).await;
        let me = client.local_addr().unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer.trim(), me.to_string(), "nginx saw the client, not the balancer");
        seen.push(me.to_string());
    }
    // nginx logs each connection as it closes, naming the client (the readiness probe above sent no
    // header: its line is "-:- ...").
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let proxied: Vec<&str> = text.lines().filter(|l| !l.starts_with("-:-")).collect();
        if proxied.len() >= 3 {
            for (line, client) in proxied.iter().zip(&seen) {
                assert!(line.starts_with(&format!("{client} ")), "{line}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "nginx logged {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_udp_backend_gets_a_v2_dgram_header_before_each_datagram() {
    let net = Net::new();
    let backend = UdpSocket::bind(SocketAddr::new(net.host(3), 0)).await.unwrap();
    let port = backend.local_addr().unwrap().port();
    let ctl = Controller::spawn(net, &[]).await;
    let _server = register(&ctl, net.host(3), "udp", port, json!({"proxy_protocol": "v2"})).await;
    ctl.wait_state("the service", |s| Controller::backends(s, "udp", port).len() == 1).await;

    let client = UdpSocket::bind(SocketAddr::new(net.host(8), 0)).await.unwrap();
    let me = client.local_addr().unwrap();
    let IpAddr::V4(me_ip) = me.ip() else { panic!() };
    let IpAddr::V4(front_ip) = net.frontend() else { panic!() };
    for payload in [&b"first"[..], b"second datagram"] {
        client.send_to(payload, ctl.frontend(port)).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = tokio::time::timeout(DEADLINE, backend.recv_from(&mut buf)).await.unwrap().unwrap();
        let got = &buf[..n];
        // Parsed here byte by byte, from the specification, not with the balancer's own code.
        assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n", "the v2 signature");
        assert_eq!(got[12], 0x21, "version 2, command PROXY");
        assert_eq!(got[13], 0x12, "AF_INET, DGRAM");
        assert_eq!(u16::from_be_bytes([got[14], got[15]]), 12, "two IPv4 addresses and two ports");
        assert_eq!(&got[16..20], &me_ip.octets(), "source: the client");
        assert_eq!(&got[20..24], &front_ip.octets(), "destination: the frontend");
        assert_eq!(u16::from_be_bytes([got[24], got[25]]), me.port());
        assert_eq!(u16::from_be_bytes([got[26], got[27]]), port);
        assert_eq!(&got[28..], payload, "then the datagram, whole");
        // Replies go back without a header.
        backend.send_to(b"reply", from).await.unwrap();
        let (n, _) = tokio::time::timeout(DEADLINE, client.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"reply");
    }
}

/// The backend a connection reached: the echo server whose accepted count went up.
fn which(echoes: &[TcpEcho], before: &[usize]) -> usize {
    echoes.iter().zip(before).position(|(e, b)| e.accepted() > *b).expect("some backend took it")
}

#[tokio::test]
async fn a_header_from_a_front_balancer_is_the_client_in_the_access_log_and_for_source_hash() {
    let net = Net::new();
    let dir = TempDir::new(&net, "proxy");
    let log = dir.path().join("access.log");
    let ctl = Controller::spawn(net, &["--access-log", log.to_str().unwrap(), "--accept-proxy-timeout", "300ms"]).await;
    let port = free_port(net.host(2));
    let echoes = [
        TcpEcho::start(net.host(2), port).await,
        TcpEcho::start(net.host(3), port).await,
        TcpEcho::start(net.host(4), port).await,
    ];
    let ask = json!({"accept_proxy": true, "algorithm": "source_hash"});
    let _servers = [
        register(&ctl, net.host(2), "tcp", port, ask.clone()).await,
        register(&ctl, net.host(3), "tcp", port, ask.clone()).await,
        register(&ctl, net.host(4), "tcp", port, ask).await,
    ];
    ctl.wait_state("three backends", |s| Controller::backends(s, "tcp", port).len() == 3).await;
    let frontend = ctl.frontend(port);

    // Every connection comes from the same front balancer (this test, on one address); the clients it
    // names differ. v1 and v2 headers both work, and the client's bytes after the header reach the backend.
    let mut picks = Vec::new();
    for i in 0..12u8 {
        let named: SocketAddr = format!("192.0.2.{}:{}", 10 + i % 6, 40000 + u16::from(i)).parse().unwrap();
        let header = if i % 2 == 0 {
            format!("PROXY TCP4 {} {} {} {port}\r\n", named.ip(), net.frontend(), named.port()).into_bytes()
        } else {
            let IpAddr::V4(ip) = named.ip() else { panic!() };
            let IpAddr::V4(front) = net.frontend() else { panic!() };
            let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
            h.extend_from_slice(&ip.octets());
            h.extend_from_slice(&front.octets());
            h.extend_from_slice(&named.port().to_be_bytes());
            h.extend_from_slice(&port.to_be_bytes());
            h
        };
        let before: Vec<usize> = echoes.iter().map(TcpEcho::accepted).collect();
        let mut conn = connect_from(net.host(7), frontend).await;
        conn.write_all(&[header.as_slice(), b"payload"].concat()).await.unwrap();
        conn.shutdown().await.unwrap();
        let mut back = Vec::new();
        conn.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"payload", "the header is taken off, the rest relayed");
        picks.push((named.ip(), which(&echoes, &before)));
    }
    for (ip, backend) in &picks {
        assert!(
            picks.iter().filter(|(other, _)| other == ip).all(|(_, b)| b == backend),
            "one named client, one backend: {picks:?}"
        );
    }
    let used: BTreeSet<usize> = picks.iter().map(|(_, b)| *b).collect();
    assert!(used.len() >= 2, "the hash is of the named clients, not of the one front balancer: {picks:?}");

    // A bad header, and none in time, are refused: closed before any backend.
    let before: Vec<usize> = echoes.iter().map(TcpEcho::accepted).collect();
    for bad in [&b"GET / HTTP/1.1\r\n\r\n"[..], b""] {
        let mut conn = connect_from(net.host(7), frontend).await;
        conn.write_all(bad).await.unwrap();
        let mut back = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut back)).await.unwrap();
        assert!(back.is_empty());
    }
    assert_eq!(echoes.iter().map(TcpEcho::accepted).collect::<Vec<_>>(), before, "no backend saw them");

    // The access log names the clients the front balancer named, and the refusals.
    let deadline = Instant::now() + DEADLINE;
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if lines.len() >= 14 {
            break lines;
        }
        assert!(Instant::now() < deadline, "access log: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let served: Vec<&Value> = lines.iter().filter(|l| l["end"] == "closed").collect();
    assert_eq!(served.len(), 12);
    assert!(served.iter().all(|l| l["client"].as_str().unwrap().starts_with("192.0.2.")), "{served:?}");
    assert_eq!(lines.iter().filter(|l| l["end"] == "bad_proxy_header").count(), 2);
    let (_, metrics) = ctl.http_get("/metrics", None).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("switchboard_frontend_refused_connections_total{")
            && l.contains("bad_proxy_header")
            && l.ends_with(" 2")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_registration_asking_for_other_proxy_settings_is_refused() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let port = free_port(net.host(2));
    let _first = register(&ctl, net.host(2), "tcp", port, json!({"proxy_protocol": "v2"})).await;
    let mut second = JsonClient::connect(&ctl, net.host(3)).await;
    second.send(&json!({"cmd": "register", "protocol": "tcp", "port": port, "proxy_protocol": "none"})).await;
    let reply = second.recv().await;
    assert_eq!(reply["ack"], "failed");
    assert!(reply["msg"].as_str().unwrap().contains("PROXY v2 to backends"), "{reply}");
    let mut udp = JsonClient::connect(&ctl, net.host(3)).await;
    udp.send(&json!({"cmd": "register", "protocol": "udp", "port": port, "accept_proxy": true})).await;
    let reply = udp.recv().await;
    assert!(reply["msg"].as_str().unwrap().contains("for TCP services only"), "{reply}");
}
