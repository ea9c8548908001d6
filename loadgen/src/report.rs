//! What a run reports: a human summary, JSON, CSV (one row per second) and an SVG chart (latency by
//! percentile; rate and p99 over time). The SVG is written by hand: lines and text need no plotting
//! library, and no font files.

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
            ok: total.ok,
            errors: total.errors.clone(),
            achieved_rps: ok_in_run as f64 / per_second,
            bytes: total.bytes,
            gbit_per_s: bytes_in_run as f64 * 8.0 / per_second / 1e9,
            latency_us: latency,
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

    /// Two panels: latency by percentile, and rate with p99 over time.
    pub fn svg(&self) -> String {
        let mut svg = Svg::new(900.0, 700.0);
        let title = format!(
            "{} {} loop: {:.0} req/s, {} errors",
            self.workload,
            self.mode,
            self.achieved_rps,
            self.errors.values().sum::<u64>()
        );
        svg.text(450.0, 24.0, &title, "middle", 16.0);
        if let Some(l) = &self.latency_us {
            // x: percentile on a "nines" scale, so the tail gets room.
            let points: Vec<(f64, f64)> = l.curve.iter().map(|&(p, us)| (nines(p), us as f64 / 1000.0)).collect();
            let labels: Vec<(f64, String)> =
                [0.0, 90.0, 99.0, 99.9, 99.99].iter().map(|&p| (nines(p), format!("{p}"))).collect();
            svg.panel(
                60.0,
                50.0,
                800.0,
                260.0,
                "percentile",
                "latency (ms)",
                &[("latency", "#1f77b4", points)],
                Some(&labels),
            );
        }
        let rate: Vec<(f64, f64)> = self.timeline.iter().map(|s| (s.second as f64 + 0.5, s.ok as f64)).collect();
        let p99: Vec<(f64, f64)> = self
            .timeline
            .iter()
            .filter_map(|s| s.p99_us.map(|us| (s.second as f64 + 0.5, us as f64 / 1000.0)))
            .collect();
        svg.panel(60.0, 380.0, 800.0, 120.0, "second", "req/s", &[("rate", "#2ca02c", rate)], None);
        svg.panel(60.0, 560.0, 800.0, 100.0, "second", "p99 (ms)", &[("p99", "#d62728", p99)], None);
        svg.finish()
    }
}

/// Percentile to a position on a log scale of nines: 0 → 0, 90 → 1, 99 → 2, 99.9 → 3, ...
fn nines(percentile: f64) -> f64 {
    let rest = (100.0 - percentile).max(0.001) / 100.0;
    -rest.log10()
}

/// (name, colour, points) of one line.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

struct Svg {
    body: String,
    width: f64,
    height: f64,
}

impl Svg {
    fn new(width: f64, height: f64) -> Self {
        Svg { body: String::new(), width, height }
    }

    fn text(&mut self, x: f64, y: f64, text: &str, anchor: &str, size: f64) {
        let text = text.replace('&', "&amp;").replace('<', "&lt;");
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-family="sans-serif" font-size="{size}">{text}</text>"#
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn panel(
        &mut self,
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        x_label: &str,
        y_label: &str,
        series: &[Series<'_>],
        x_ticks: Option<&[(f64, String)]>,
    ) {
        let all = series.iter().flat_map(|(_, _, p)| p.iter());
        let (mut x_max, mut y_max) = (0.0_f64, 0.0_f64);
        for &(px, py) in all {
            x_max = x_max.max(px);
            y_max = y_max.max(py);
        }
        let x_max = if x_max > 0.0 { x_max } else { 1.0 };
        let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
        let _ = writeln!(self.body, r##"<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##);
        for (name, color, points) in series {
            let path: Vec<String> = points
                .iter()
                .map(|&(px, py)| format!("{:.1},{:.1}", x + px / x_max * w, y + h - py / y_max * h))
                .collect();
            let _ = writeln!(
                self.body,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{name}</title></polyline>"#,
                path.join(" ")
            );
        }
        match x_ticks {
            Some(ticks) => {
                for (tx, label) in ticks {
                    self.text(x + tx / x_max * w, y + h + 16.0, label, "middle", 11.0);
                }
            }
            None => {
                self.text(x, y + h + 16.0, "0", "middle", 11.0);
                self.text(x + w, y + h + 16.0, &format!("{x_max:.0}"), "middle", 11.0);
            }
        }
        self.text(x - 6.0, y + 10.0, &format!("{y_max:.1}"), "end", 11.0);
        self.text(x - 6.0, y + h, "0", "end", 11.0);
        self.text(x + w / 2.0, y + h + 32.0, x_label, "middle", 12.0);
        self.text(x, y - 8.0, y_label, "start", 12.0);
    }

    fn finish(self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{}</svg>\n",
            self.body,
            w = self.width,
            h = self.height
        )
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
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["errors"]["timeout"], 1);
        assert_eq!(report.csv().lines().count(), 3);
        let svg = report.svg();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.trim_end().ends_with("</svg>"));
        assert!(report.summary().contains("p99"));
    }
}
