//! `loadgen` against the demo backends: bounded runs whose counts add up, errors by kind, every output
//! format, open-loop latency that includes queueing, and demo backends that register themselves.

use serde_json::Value;
use switchboard_tests::harness::{Controller, Host, Net, Process, http_get_status, run_to_exit};

async fn serve(kind: &str, args: &[&str]) -> Process {
    let mut all = vec!["serve".to_owned(), kind.to_owned()];
    all.extend(args.iter().map(|s| (*s).to_owned()));
    Process::spawn(&Host::Root, "loadgen", &all).await
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("switchboard-loadgen-{}-{name}", std::process::id()))
}

#[tokio::test]
async fn an_open_loop_run_reports_counts_that_add_up_in_every_format() {
    let net = Net::new();
    let echo = serve("tcp-echo", &["--listen", &format!("{}:0", net.host(2))]).await;
    let target = echo.addr("listen").to_string();
    let (json, csv, svg) = (temp("run.json"), temp("run.csv"), temp("run.svg"));
    let (code, stderr) = run_to_exit(
        "loadgen",
        &[
            "tcp",
            "--target",
            &target,
            "--rate",
            "400",
            "--duration",
            "1s",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("latency us: p50"), "a human summary: {stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["mode"], "open");
    assert_eq!(report["ok"], 400, "{report:#}");
    assert_eq!(report["errors"], serde_json::json!({}));
    let timeline: u64 = report["timeline"].as_array().unwrap().iter().map(|s| s["ok"].as_u64().unwrap()).sum();
    assert_eq!(timeline, 400, "the timeline adds up to the total");
    assert_eq!(report["targets"][0]["ok"], 400);
    let latency = &report["latency_us"];
    assert!(latency["p50"].as_u64() <= latency["p99"].as_u64() && latency["p99"].as_u64() <= latency["max"].as_u64());
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert!(csv.starts_with("second,ok,errors,bytes,p50_us,p99_us\n"), "{csv}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.trim_end().ends_with("</svg>"));
    for file in [json, temp("run.csv"), temp("run.svg")] {
        let _ = std::fs::remove_file(file);
    }
}

#[tokio::test]
async fn errors_are_counted_by_kind_and_shares_follow_the_split() {
    let net = Net::new();
    let http = serve("http", &["--listen", &format!("{}:0", net.host(2))]).await;
    // Nothing listens here: every request is refused.
    let refused = format!("{}:9", net.host(3));
    // Accepts connections and never answers: every request times out.
    let silent = std::net::TcpListener::bind((net.host(4), 0)).unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let good = http.addr("listen").to_string();
    let (code, out) = run_json(&[
        "http",
        "--target",
        &good,
        "--target",
        &refused,
        "--target",
        &silent_addr,
        "--split",
        "2,1,1",
        "--rate",
        "200",
        "--duration",
        "1s",
        "--timeout",
        "300ms",
        "--max-errors",
        "50",
        "--quiet",
        "--json",
        "-",
    ])
    .await;
    assert_eq!(code, Some(0), "half the requests failed, which --max-errors 50 allows");
    assert_eq!(out["targets"][0]["ok"], 100, "half of 200 to the good target: {out:#}");
    assert_eq!(out["errors"]["connect"], 50, "{out:#}");
    assert_eq!(out["errors"]["timeout"], 50, "{out:#}");
    drop(silent);
}

#[tokio::test]
async fn against_a_closed_port_loadgen_fails_and_says_why() {
    let net = Net::new();
    let closed = format!("{}:9", net.host(3));
    let args = ["http", "--target", &closed, "--rate", "50", "--duration", "500ms", "--quiet", "--json", "-"];
    let output =
        tokio::process::Command::new(switchboard_tests::harness::bin("loadgen")).args(args).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1), "every request failed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("more than --max-errors 0 %"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes in redirected output: {stderr:?}");
    let report: Value = serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
    assert_eq!(report["ok"], 0, "the report is still written");
}

/// Runs loadgen with `--json -` and parses the JSON it prints.
async fn run_json(args: &[&str]) -> (Option<i32>, Value) {
    let output =
        tokio::process::Command::new(switchboard_tests::harness::bin("loadgen")).args(args).output().await.unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    (output.status.code(), serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}")))
}

#[tokio::test]
async fn open_loop_latency_includes_queueing_behind_a_slow_target() {
    let net = Net::new();
    // 50 ms per request on one connection: at most 20 requests/s get through.
    let slow = serve("http", &["--listen", &format!("{}:0", net.host(2)), "--sleep-ms", "50"]).await;
    let target = slow.addr("listen").to_string();
    let common = [
        "http",
        "--target",
        &target,
        "--connections",
        "1",
        "--duration",
        "2s",
        "--timeout",
        "5s",
        "--quiet",
        "--json",
        "-",
    ];
    let (_, closed) = run_json(&common).await;
    let mut open_args = common.to_vec();
    open_args.extend(["--rate", "40"]);
    let (_, open) = run_json(&open_args).await;
    let closed_p99 = closed["latency_us"]["p99"].as_u64().unwrap();
    let open_p99 = open["latency_us"]["p99"].as_u64().unwrap();
    // Closed loop only sees the service time; open loop at twice the capacity sees the queue grow.
    assert!(closed_p99 < 200_000, "closed loop p99 {closed_p99} us");
    assert!(open_p99 > 800_000, "open loop p99 {open_p99} us must include the queueing");
    assert!(open["achieved_rps"].as_f64().unwrap() < 30.0, "{open:#}");
}

#[tokio::test]
async fn demo_backends_register_themselves_and_count_their_connections() {
    let net = Net::new();
    let ctl = Controller::spawn(net, &[]).await;
    let json = ctl.json_addr().to_string();
    let stats_addr = format!("{}:0", net.host(2));
    let backend =
        serve("http", &["--listen", &format!("{}:0", net.host(2)), "--register", &json, "--stats-listen", &stats_addr])
            .await;
    let port = backend.addr("listen").port();
    for _ in 0..10 {
        assert_eq!(http_get_status(ctl.frontend(port)).await.unwrap(), 200);
    }
    let stats_url = backend.addr("stats");
    let mut stream = tokio::net::TcpStream::connect(stats_url).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /stats HTTP/1.0\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["total"], 10, "{body}");
    assert_eq!(body["active"], 0, "{body}");

    // A port the controller refuses: the backend says why and exits non-zero instead of hanging.
    let (code, stderr) = run_to_exit(
        "loadgen",
        &[
            "serve",
            "tcp-echo",
            "--listen",
            &format!("{}:0", net.host(3)),
            "--register",
            &json,
            "--public-port",
            &ctl.json_addr().port().to_string(),
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("registration refused: port"), "{stderr}");
}
