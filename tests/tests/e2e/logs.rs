//! Log flags, the same on every binary: `--log-format json` gives one JSON object per line, `--log` filters
//! like `RUST_LOG` (and wins over it), and a filter that does not parse is a flag error.

use serde_json::Value;
use switchboard_tests::harness::{Controller, JsonClient, Net, TcpEcho, run_to_exit};
use tokio::time::{Duration, Instant, sleep};

#[tokio::test]
async fn json_lines_carry_level_target_and_fields_and_the_filter_applies() {
    let net = Net::new();
    // The harness sets RUST_LOG to info and debug; --log overrides it.
    let ctl = Controller::spawn(net, &["--log-format", "json", "--log", "info,dataplane=warn"]).await;
    let backend = TcpEcho::start(net.host(2), 0).await;
    let mut server = JsonClient::connect(&ctl, net.host(2)).await;
    assert_eq!(server.register("tcp", backend.addr.port()).await["ack"], "successful");

    // The registration is logged (by the controller, at info) as JSON; the node's "port opened" (info) is not.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = ctl.process.stderr_text();
        if text.contains("backend registered") {
            break text;
        }
        assert!(Instant::now() < deadline, "no registration logged:\n{text}");
        sleep(Duration::from_millis(20)).await;
    };
    let mut registered = None;
    for line in lines.lines() {
        let object: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(object["level"].is_string() && object["target"].is_string(), "{line}");
        assert_ne!(object["target"], "dataplane::node", "filtered out by --log: {line}");
        if object["fields"]["message"] == "backend registered" {
            registered = Some(object);
        }
    }
    let registered = registered.expect("the registration line");
    assert_eq!(registered["level"], "INFO");
    assert_eq!(registered["fields"]["service"], format!("tcp:{}", backend.addr.port()));
}

#[tokio::test]
async fn a_log_filter_that_does_not_parse_is_a_flag_error_on_every_binary() {
    // Each with flags that are otherwise valid, so the filter is what is refused.
    for (binary, rest) in [("controller", &[][..]), ("dataplane", &[]), ("agent", &["--service", "tcp:8000"])] {
        let args: Vec<&str> = ["--log", "info,x=loud"].iter().chain(rest).copied().collect();
        let (code, stderr) = run_to_exit(binary, &args).await;
        assert_eq!(code, Some(64), "{binary}: {stderr}");
        assert!(stderr.starts_with(&format!("{binary}: invalid --log: ")), "{binary}: {stderr}");
    }
    let (code, stderr) = run_to_exit("loadgen", &["--log", "info,x=loud", "serve", "tcp-echo"]).await;
    assert_eq!(code, Some(64), "loadgen: {stderr}");
    let (code, stderr) = run_to_exit("controller", &["--log-format", "xml", "--check"]).await;
    assert_eq!(code, Some(2), "clap refuses an unknown format: {stderr}");
}
