//! Outside programs the tests drive as real peers (Python's Prometheus parser, Chromium), and the rule for
//! a missing one: the test fails naming what to install, unless `SWITCHBOARD_SKIP_MISSING_TOOLS=1` turns
//! that into a skip. Every skip goes through [`skip`], which prints it and writes it to the skip log that
//! `scripts/test.sh` counts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
};

use serde_json::Value;

/// The opt-out: set to `1`, a test whose tool is missing is skipped (and says so) instead of failing.
pub const SKIP_MISSING: &str = "SWITCHBOARD_SKIP_MISSING_TOOLS";

/// Where skips are written: the file named by this variable (`scripts/test.sh` sets it, and empties the
/// file first), else `test-skips.log` in the target directory of the running test.
pub const SKIP_LOG: &str = "SWITCHBOARD_SKIP_LOG";

/// The skip log (see [`SKIP_LOG`]).
pub fn skip_log() -> PathBuf {
    if let Some(path) = std::env::var_os(SKIP_LOG) {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/e2e-HASH -> target, as harness::bin finds it.
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe.ancestors().nth(3).expect("target directory");
    target.join("test-skips.log")
}

/// Skips the running test: prints `SKIPPED: <test>: <reason>` on stderr and appends the same line to the
/// [`skip_log`], because cargo shows no stderr of a test that passes. The caller then returns.
pub fn skip(reason: &str) {
    skip_to(&skip_log(), reason);
}

/// [`skip`], written to `log`. The test's name is its thread's, which is how the test harness names it.
pub fn skip_to(log: &Path, reason: &str) {
    let thread = std::thread::current();
    let line = format!("SKIPPED: {}: {reason}", thread.name().unwrap_or("a test"));
    eprintln!("{line}");
    let written =
        std::fs::OpenOptions::new().create(true).append(true).open(log).and_then(|mut file| writeln!(file, "{line}"));
    if let Err(e) = written {
        panic!("cannot record the skip in {}: {e}", log.display());
    }
}

/// True when `probe` (a program and its arguments) runs and succeeds. Otherwise the test fails naming
/// `what` and `install`, or, with [`SKIP_MISSING`] set, prints that it is skipped and returns false.
pub fn require(what: &str, probe: &[&str], install: &str) -> bool {
    let ok = std::process::Command::new(probe[0])
        .args(&probe[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    let why = format!("{what} is missing: {install} (scripts/test.sh installs it)");
    assert!(std::env::var(SKIP_MISSING).is_ok_and(|v| v == "1"), "{why}; or set {SKIP_MISSING}=1 to skip");
    skip(&why);
    false
}

/// True when Python's `prometheus_client` can be imported (see [`require`]).
pub fn require_prometheus_parser() -> bool {
    require(
        "Python's prometheus_client",
        &["python3", "-c", "import prometheus_client.parser"],
        "apt-get install python3-prometheus-client",
    )
}

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (`..._total`, `..._bucket`, ...).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A scrape parsed by Python's `prometheus_client` (the Prometheus text format parser), so the text is
/// checked by a parser that is not ours. Fails the test when it does not parse.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    parsed
        .into_iter()
        .map(|s| Sample {
            name: s["name"].as_str().unwrap().to_owned(),
            labels: s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect()
}

/// The value of the sample `name` whose labels include every pair of `labels`, if there is one.
pub fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_appended_to_the_log_with_the_test_name_and_reason() {
        let log = std::env::temp_dir().join(format!("switchboard-skips-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        skip_to(&log, "first reason");
        skip_to(&log, "second reason");
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_file(&log).unwrap();
        let name = "tools::tests::a_skip_is_appended_to_the_log_with_the_test_name_and_reason";
        assert_eq!(text, format!("SKIPPED: {name}: first reason\nSKIPPED: {name}: second reason\n"));
    }
}
