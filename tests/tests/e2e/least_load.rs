//! `least_load`: agents report their servers' load with each hello answer (`--report-load`), and new
//! connections go to the least loaded server; when the loads swap, so do the connections; a server whose
//! reports stop is judged by its connections again once its last report ages out.

use std::{net::SocketAddr, path::Path};

use serde_json::Value;
use switchboard_tests::harness::{Controller, DEADLINE, Net, TcpEcho, TempDir, free_port, spawn_agent, tcp_roundtrip};
use tokio::time::Instant;

fn reported(state: &Value, port: u16, backend: SocketAddr) -> Option<f64> {
    Controller::backends(state, "tcp", port)
        .into_iter()
        .find(|b| b["address"] == backend.to_string())
        .and_then(|b| b["reported_load"].as_f64())
}

/// Which of `echoes` each of `n` new connections reached.
async fn picks(ctl: &Controller, port: u16, echoes: &[&TcpEcho], n: usize) -> Vec<usize> {
    let mut picks = Vec::new();
    for i in 0..n {
        let before: Vec<usize> = echoes.iter().map(|e| e.accepted()).collect();
        let payload = [i as u8; 4];
        assert_eq!(tcp_roundtrip(ctl.frontend(port), &payload).await.unwrap(), payload);
        picks.push(echoes.iter().zip(&before).position(|(e, b)| e.accepted() > *b).unwrap());
    }
    picks
}

/// Makes rounds of 4 connections until one round satisfies `settled` (a node learns reports about 100 ms
/// after the controller), then returns the next `n` picks.
async fn settle(
    ctl: &Controller,
    port: u16,
    echoes: &[&TcpEcho],
    settled: impl Fn(&[usize]) -> bool,
    n: usize,
) -> Vec<usize> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let round = picks(ctl, port, echoes, 4).await;
        if settled(&round) {
            break;
        }
        assert!(Instant::now() < deadline, "never settled; last round {round:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    picks(ctl, port, echoes, n).await
}

fn all(want: usize) -> impl Fn(&[usize]) -> bool {
    move |round| round.iter().all(|&p| p == want)
}

/// An agent for the server on `host`, reporting the load the file at `load` holds.
async fn agent(
    ctl: &Controller,
    port: u16,
    host: std::net::IpAddr,
    load: &Path,
) -> switchboard_tests::harness::Process {
    let (port, host, command) = (port.to_string(), host.to_string(), format!("cat {}", load.display()));
    #[rustfmt::skip]
    let args = [
        "--protocol", "tcp", "--port", &port, "--backend-address", &host, "--algorithm", "least_load",
        "--check", "none", "--check-interval", "100ms", "--report-load", "--load-command", &command,
    ];
    spawn_agent(ctl, &args).await
}

#[tokio::test]
async fn least_load_follows_the_servers_reports_and_falls_back_when_they_stop() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &["--load-report-max-age", "1500ms"]).await;
    let port = free_port(net.host(2));
    let (a, b) = (TcpEcho::start(net.host(2), port).await, TcpEcho::start(net.host(3), port).await);
    let loads = TempDir::new(&net, "load");
    let (load_a, load_b) = (loads.write("a", "0.9"), loads.write("b", "0.1"));
    let _agent_a = agent(&ctl, port, net.host(2), &load_a).await;
    let _agent_b = agent(&ctl, port, net.host(3), &load_b).await;
    ctl.wait_state("both loads reported", |s| {
        reported(s, port, a.addr) == Some(0.9) && reported(s, port, b.addr) == Some(0.1)
    })
    .await;
    let echoes = [&a, &b];
    assert_eq!(settle(&ctl, port, &echoes, all(1), 10).await, vec![1; 10], "every new connection to the idle server");

    // The loads swap: so do the connections.
    loads.write("a", "0.05");
    loads.write("b", "0.95");
    ctl.wait_state("swapped loads", |s| reported(s, port, b.addr) == Some(0.95)).await;
    assert_eq!(settle(&ctl, port, &echoes, all(0), 10).await, vec![0; 10]);

    // b's reports stop (its command fails): once its last one ages out it counts as average, so
    // connections reach it again, taken by turns.
    std::fs::remove_file(&load_b).unwrap();
    ctl.wait_state("b's report aged out", |s| {
        reported(s, port, b.addr).is_none() && reported(s, port, a.addr).is_some()
    })
    .await;
    let both = |round: &[usize]| round.contains(&0) && round.contains(&1);
    let spread = settle(&ctl, port, &echoes, both, 10).await;
    assert!(spread.contains(&0) && spread.contains(&1), "judged by connections again: {spread:?}");
}
