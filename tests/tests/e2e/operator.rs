//! What a new operator meets first: a mistyped address flag, a port another process holds, the embedded
//! node in `/api/state`, and the README's toy server across a controller restart.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use switchboard_tests::harness::{
    Controller, DataplaneNode, Host, Net, free_port, run_to_exit, spawn_quiet, tcp_roundtrip,
};
use tokio::time::{Instant, sleep};

#[tokio::test]
async fn an_address_flag_without_its_ip_is_told_how_to_write_it() {
    let (code, stderr) = run_to_exit("controller", &["--json-listen", "8080", "--check"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    let expected = r#"invalid address "8080": expected IP:PORT, e.g. 0.0.0.0:8080 or [::1]:8080"#;
    assert!(stderr.contains(expected), "{stderr}");
    // The same parser on every binary's address flags.
    let cases: [(&str, &[&str], &str); 4] = [
        ("dataplane", &["--admin-listen", "9902"], r#"invalid address "9902": expected IP:PORT, e.g. 0.0.0.0:9902"#),
        (
            "controller",
            &["--frontend-address", "0.0.0.0:80", "--check"],
            r#"invalid IP address "0.0.0.0:80": expected an IP address, without a port, e.g. 0.0.0.0"#,
        ),
        (
            "agent",
            &["--service", "tcp:80", "--backend-address", "localhost"],
            "host names are not looked up, e.g. 127.0.0.1",
        ),
        (
            "loadgen",
            &["tcp", "--target", "localhost:8000"],
            r#"invalid address "localhost:8000": expected IP:PORT, host names are not looked up, e.g. 127.0.0.1:8000"#,
        ),
    ];
    for (binary, args, message) in cases {
        let (code, stderr) = run_to_exit(binary, args).await;
        assert_eq!(code, Some(2), "{binary} {args:?}: {stderr}");
        assert!(stderr.contains(message), "{binary} {args:?}: expected {message:?} in {stderr}");
    }
    // Address-like values checked after parsing show an example too.
    let (code, stderr) = run_to_exit("controller", &["--json-allow", "10.0.0.1", "--check"]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("e.g. 10.0.0.1/32"), "{stderr}");
    let (code, stderr) = run_to_exit("controller", &["--allowed-ports", "80-", "--check"]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("e.g. 80,8000-8999"), "{stderr}");
    let (code, stderr) = run_to_exit("dataplane", &["--controller", "127.0.0.1:50051"]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("e.g. http://127.0.0.1:50051"), "{stderr}");
}

#[tokio::test]
async fn a_taken_port_is_named_once_with_what_to_do() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let taken = ctl.json_addr().to_string();
    let any = SocketAddr::new(net.host(254), 0).to_string();
    let (code, stderr) =
        run_to_exit("controller", &["--json-listen", &taken, "--grpc-listen", &any, "--admin-listen", &any]).await;
    assert_eq!(code, Some(1), "{stderr}");
    let os_error = std::io::Error::from_raw_os_error(nix::libc::EADDRINUSE).to_string();
    let hint = "is another controller running? Use --json-listen to pick another address.";
    assert_eq!(stderr.matches(&os_error).count(), 1, "the OS error once: {stderr}");
    assert_eq!(stderr.matches(hint).count(), 1, "the hint once: {stderr}");
    let line = format!("controller: cannot listen on {taken} (JSON control channel): {os_error}; {hint}");
    assert!(stderr.lines().any(|l| l == line), "expected {line:?} in {stderr}");

    let node = DataplaneNode::spawn(Host::Root, &ctl, "first", net.host(9), net.host(9), &[]).await;
    let taken = node.process.addr("admin").to_string();
    let (code, stderr) = run_to_exit("dataplane", &["--admin-listen", &taken, "--controller", &ctl.grpc_url()]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.matches(&os_error).count(), 1, "the OS error once: {stderr}");
    let line = format!(
        "dataplane: cannot listen on {taken} (admin HTTP): {os_error}; is another dataplane running? Use --admin-listen to pick another address."
    );
    assert!(stderr.lines().any(|l| l == line), "expected {line:?} in {stderr}");
}

#[tokio::test]
async fn the_embedded_node_is_marked_and_never_looks_stale_while_it_runs() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--resync-grace", "0s"]).await;
    let node = DataplaneNode::spawn(Host::Root, &ctl, "remote", net.host(9), net.host(9), &[]).await;
    ctl.wait_synced(&["embedded", "remote"]).await;
    // Nothing changes from here on, so no node reports anything: the embedded node still shows as seen
    // now, for longer than any report interval.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(1_500) {
        let state = ctl.state().await;
        let embedded = Controller::node(&state, "embedded").expect("the embedded node");
        assert_eq!(embedded["connected"], true, "{state:#}");
        assert_eq!(embedded["embedded"], true, "{state:#}");
        assert_eq!(embedded["last_seen_ms_ago"], 0, "after {:?} of quiet: {state:#}", quiet.elapsed());
        let remote = Controller::node(&state, "remote").expect("the remote node");
        assert_eq!(remote["embedded"], false, "{state:#}");
        assert!(remote["last_seen_ms_ago"].is_u64(), "{state:#}");
        sleep(Duration::from_millis(100)).await;
    }
    drop(node);
}

#[tokio::test]
async fn the_readme_toy_server_registers_again_after_a_controller_restart() {
    let net = Net::new();
    let mut ctl = Controller::spawn(net, &[]).await;
    let port = free_port(net.host(2));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/toy_server.py");
    let json = ctl.json_addr().to_string();
    let _toy = spawn_quiet("python3", [script, &net.host(2).to_string(), &port.to_string(), &json]);
    let registered = |s: &Value| Controller::backends(s, "tcp", port).len() == 1;
    ctl.wait_state("the toy server registered", registered).await;
    let greeting = format!("hello from {}:{port}", net.host(2));
    let answer = tcp_roundtrip(ctl.frontend(port), b"hi\n").await.unwrap();
    assert!(String::from_utf8_lossy(&answer).contains(&greeting), "{answer:?}");

    // A crash and a start on the same addresses: the toy server notices its channel closed, connects
    // again (with its backoff) and registers with the new controller.
    ctl.restart().await;
    ctl.wait_state("the toy server registered again", registered).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match tcp_roundtrip(ctl.frontend(port), b"hi\n").await {
            Ok(answer) if String::from_utf8_lossy(&answer).contains(&greeting) => break,
            other => assert!(Instant::now() < deadline, "no answer through the new controller: {other:?}"),
        }
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_agent_that_gives_up_names_the_failure_that_ran_out_its_time() {
    let args =
        ["--service", "tcp:80", "--check", "none", "--controller", "http://127.0.0.1:1", "--startup-timeout", "1s"];
    let (code, stderr) = run_to_exit("agent", &args).await;
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("agent: cannot reach")).unwrap_or_else(|| panic!("{stderr}"));
    // Every attempt failed to connect; an attempt cut short by the deadline is not the news.
    assert!(line.ends_with("(gave up after 1s): cannot connect: transport error"), "{line}");
}
