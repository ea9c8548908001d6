//! What a run reports: a human summary, JSON and CSV (one row per second). The SVG chart of a report
//! (`Report::svg`: latency by percentile; rate, latency and failures over time) is the chart module's,
//! which reads this one.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use serde::Serialize;

use crate::{driver::Outcome, error::ErrorKind};

/// The machine-readable result of a run (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `tcp`, `tcp-keepalive`, `http`, `http-close`, `udp`, `bulk`.
    pub workload: String,
    /// `open` or `closed`.
    pub mode: String,
    /// Requests per second asked for (open loop).
    pub target_rate: Option<f64>,
    /// Connections, UDP flows or streams.
    pub connections: usize,
    /// Wall time of the run, in seconds.
    pub elapsed_s: f64,
    /// The run's `--duration`, in seconds: requests start within it (their answers may come later).
    pub duration_s: f64,
    /// Requests answered correctly.
    pub ok: u64,
    /// Failed requests by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Requests answered within `--duration`, per second of it.
    pub achieved_rps: f64,
    /// Bytes received (request workloads) or sent (bulk).
    pub bytes: u64,
    /// `bytes` as Gbit/s over the run.
    pub gbit_per_s: f64,
    /// Latency of successful requests (absent for bulk).
    pub latency_us: Option<Latency>,
    /// Longest time in which no request was answered, between the first answer and the last, in
    /// milliseconds (absent for bulk): how long clients saw nothing at all, e.g. during an upgrade.
    pub longest_gap_ms: Option<f64>,
    /// Per target.
    pub targets: Vec<TargetReport>,
    /// One entry per second.
    pub timeline: Vec<SecondReport>,
}

/// Latency summary, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Smallest.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// (percentile, latency) points for a percentile chart.
    pub curve: Vec<(f64, u64)>,
}

/// One target's share.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// The target.
    pub target: SocketAddr,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SecondReport {
    /// Seconds since the start.
    pub second: usize,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
    /// Bytes.
    pub bytes: u64,
    /// Median latency in that second.
    pub p50_us: Option<u64>,
    /// 99th percentile latency in that second.
    pub p99_us: Option<u64>,
}

// === impl Report ===

impl Report {
    /// Builds the report of `outcome`.
    pub fn new(
        workload: &str,
        target_rate: Option<f64>,
        connections: usize,
        targets: &[SocketAddr],
        outcome: &Outcome,
    ) -> Self {
        let total = &outcome.total;
        let elapsed = outcome.elapsed.as_secs_f64().max(1e-9);
        // Rates count what completed within the run, per second of it: answers straggling in after the
        // end (up to one timeout) neither dilute the rate nor inflate it.
        let per_second = outcome.duration.as_secs_f64().max(1e-9);
        let in_run = usize::try_from(outcome.duration.as_secs_f64().ceil() as u64).unwrap_or(usize::MAX);
        let ok_in_run: u64 = total.seconds.iter().take(in_run).map(|s| s.ok).sum();
        let bytes_in_run: u64 = total.seconds.iter().take(in_run).map(|s| s.bytes).sum();
        let h = &total.latency;
        let latency = (total.ok > 0 && !h.is_empty()).then(|| Latency {
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            curve: [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0]
                .iter()
                .map(|&q| (q * 100.0, h.value_at_quantile(q)))
                .collect(),
        });
        Report {
            workload: workload.to_owned(),
            mode: if target_rate.is_some() { "open" } else { "closed" }.to_owned(),
            target_rate,
            connections,
            elapsed_s: elapsed,
            duration_s: outcome.duration.as_secs_f64(),
            ok: total.ok,
            errors: total.errors.clone(),
            achieved_rps: ok_in_run as f64 / per_second,
            bytes: total.bytes,
            gbit_per_s: bytes_in_run as f64 * 8.0 / per_second / 1e9,
            latency_us: latency,
            longest_gap_ms: outcome.longest_gap.map(|gap| gap.as_secs_f64() * 1000.0),
            targets: targets
                .iter()
                .zip(&outcome.per_target)
                .map(|(&target, r)| TargetReport { target, ok: r.ok, errors: r.error_count() })
                .collect(),
            timeline: total
                .seconds
                .iter()
                .enumerate()
                .map(|(second, s)| SecondReport {
                    second,
                    ok: s.ok,
                    errors: s.errors,
                    bytes: s.bytes,
                    p50_us: s.latency.as_ref().map(|h| h.value_at_quantile(0.5)),
                    p99_us: s.latency.as_ref().map(|h| h.value_at_quantile(0.99)),
                })
                .collect(),
        }
    }

    /// Fails when more than `max` percent of the requests failed.
    pub fn check_errors(&self, max: f64) -> Result<(), crate::error::LoadError> {
        let failed: u64 = self.errors.values().sum();
        let requests = self.ok + failed;
        let rate = if requests == 0 { 0.0 } else { failed as f64 * 100.0 / requests as f64 };
        if rate > max {
            return Err(crate::error::LoadError::TooManyErrors { failed, requests, rate, max });
        }
        Ok(())
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let rate = self.target_rate.map(|r| format!(" at {r:.0}/s")).unwrap_or_default();
        let _ = writeln!(
            out,
            "{} {} loop{rate}, {} connection(s), {:.2} s",
            self.workload, self.mode, self.connections, self.elapsed_s
        );
        let errors: u64 = self.errors.values().sum();
        let _ = writeln!(
            out,
            "  ok {}  errors {}  rate {:.0}/s  {:.3} Gbit/s",
            self.ok, errors, self.achieved_rps, self.gbit_per_s
        );
        for (kind, n) in &self.errors {
            let _ = writeln!(out, "    {kind:?}: {n}");
        }
        if let Some(l) = &self.latency_us {
            let _ = writeln!(
                out,
                "  latency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.0})",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            );
        }
        if let Some(gap) = self.longest_gap_ms {
            let _ = writeln!(out, "  longest gap between answers: {gap:.1} ms");
        }
        if self.targets.len() > 1 {
            for t in &self.targets {
                let _ = writeln!(out, "  {}: ok {} errors {}", t.target, t.ok, t.errors);
            }
        }
        out
    }

    /// One row per second: `second,ok,errors,bytes,p50_us,p99_us`.
    pub fn csv(&self) -> String {
        let mut out = String::from("second,ok,errors,bytes,p50_us,p99_us\n");
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        for s in &self.timeline {
            let _ = writeln!(out, "{},{},{},{},{},{}", s.second, s.ok, s.errors, s.bytes, opt(s.p50_us), opt(s.p99_us));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::driver::Recorder;

    #[test]
    fn counts_add_up_and_every_output_is_produced() {
        let mut a = Recorder::default();
        for i in 0..1000u64 {
            a.record(Duration::from_millis(i), Duration::from_micros(100 + i), Ok(10));
        }
        a.record(Duration::from_millis(1500), Duration::ZERO, Err(ErrorKind::Timeout));
        let mut b = Recorder::default();
        b.record(Duration::from_millis(10), Duration::from_micros(50), Err(ErrorKind::Connect));
        let mut total = Recorder::default();
        total.merge(&a);
        total.merge(&b);
        let targets: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.2:1".parse().unwrap()];
        let outcome = Outcome {
            total,
            per_target: vec![a, b],
            elapsed: Duration::from_millis(2300),
            duration: Duration::from_secs(2),
            longest_gap: Some(Duration::from_millis(250)),
        };
        let report = Report::new("tcp", Some(500.0), 4, &targets, &outcome);
        assert_eq!(report.ok, 1000);
        assert_eq!(report.errors[&ErrorKind::Timeout], 1);
        assert_eq!(report.errors[&ErrorKind::Connect], 1);
        assert_eq!(report.targets[0].ok + report.targets[1].ok, report.ok);
        assert_eq!(report.timeline.iter().map(|s| s.ok).sum::<u64>(), 1000);
        assert_eq!(report.timeline.len(), 2);
        let l = report.latency_us.as_ref().unwrap();
        assert!(l.p50 >= 590 && l.p50 <= 610, "{}", l.p50);
        assert!(l.max >= 1099);
        assert!((report.achieved_rps - 500.0).abs() < 1e-9);
        assert_eq!(report.longest_gap_ms, Some(250.0));
        assert!(report.summary().contains("longest gap between answers: 250.0 ms"), "{}", report.summary());
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["errors"]["timeout"], 1);
        assert_eq!(report.csv().lines().count(), 3);
        let svg = report.svg();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.trim_end().ends_with("</svg>"));
        assert!(report.summary().contains("p99"));
    }
}
