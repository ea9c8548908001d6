//! The figures of a control-plane run: percentiles of each timed step, the last snapshot, the summary.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

/// Percentiles of one timed step, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// The last snapshot the nodes acked.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SnapshotFigures {
    /// Its version.
    pub version: u64,
    /// Services in it.
    pub services: usize,
    /// Backends in rotation in it.
    pub backends: usize,
    /// Size on the wire (protobuf) of the last message that brought it: a whole snapshot or a delta.
    pub bytes: usize,
}

/// The result of a control-plane run (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct ControlPlaneReport {
    /// `control-plane`.
    pub scenario: String,
    /// The controller's URL.
    pub controller: String,
    /// Services registered.
    pub services: usize,
    /// Backends per service.
    pub backends: usize,
    /// Simulated nodes.
    pub nodes: usize,
    /// `Register` streams held.
    pub register_streams: usize,
    /// What each timed change is.
    pub change: String,
    /// Seconds until every node followed the controller.
    pub nodes_connect_s: f64,
    /// First registration of each service, one at a time: sent until answered (every node acked).
    pub register_first: Option<Timing>,
    /// Wall time of that phase, in seconds.
    pub register_first_s: f64,
    /// The other backends, every stream at once: sent until answered.
    pub register_more: Option<Timing>,
    /// Wall time of that phase, in seconds.
    pub register_more_s: f64,
    /// Successful answers that carried a note (e.g. a node without a bind result in time).
    pub answers_with_note: usize,
    /// One of those notes.
    pub note_example: Option<String>,
    /// Change sent until the last simulated node acked its version.
    pub change_last_ack: Option<Timing>,
    /// Change sent until the first simulated node acked its version.
    pub change_first_ack: Option<Timing>,
    /// The last snapshot, as node 0 received it.
    pub final_snapshot: SnapshotFigures,
    /// Snapshots each node received, on average (fewer than versions: a watch coalesces bursts).
    pub snapshots_per_node: f64,
    /// Wall time of the whole run, in seconds.
    pub elapsed_s: f64,
}

// === impl Timing ===

impl Timing {
    /// Percentiles of `samples`; none without any.
    pub fn of(mut samples: Vec<Duration>) -> Option<Timing> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let rank = |p: f64| samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
        Some(Timing {
            count: samples.len(),
            p50_ms: ms(rank(0.5)),
            p99_ms: ms(rank(0.99)),
            max_ms: ms(samples[samples.len() - 1]),
            mean_ms: samples.iter().map(|&d| ms(d)).sum::<f64>() / samples.len() as f64,
        })
    }
}

// === impl ControlPlaneReport ===

impl ControlPlaneReport {
    /// A few lines for a human.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let line = |t: &Option<Timing>| match t {
            Some(t) => {
                format!("p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)", t.p50_ms, t.p99_ms, t.max_ms, t.count)
            }
            None => "no samples".to_owned(),
        };
        let _ = writeln!(
            out,
            "{} services x {} backends, {} nodes, {} Register streams (nodes connected in {:.2} s)",
            self.services, self.backends, self.nodes, self.register_streams, self.nodes_connect_s
        );
        let _ = writeln!(
            out,
            "register -> frontend open, first backend of each service, one at a time: {} in {:.1} s",
            line(&self.register_first),
            self.register_first_s
        );
        let _ = writeln!(
            out,
            "register, other backends, all streams at once:  {} in {:.1} s",
            line(&self.register_more),
            self.register_more_s
        );
        if self.answers_with_note > 0 {
            let _ = writeln!(
                out,
                "answers with a note: {} (e.g. {:?})",
                self.answers_with_note,
                self.note_example.as_deref().unwrap_or_default()
            );
        }
        let _ = writeln!(out, "change -> every node acked: {}", line(&self.change_last_ack));
        let _ = writeln!(out, "change -> first node acked: {}", line(&self.change_first_ack));
        let s = &self.final_snapshot;
        let _ = writeln!(
            out,
            "last snapshot: version {}, {} services, {} backends, last message {} bytes; {:.1} snapshots per node; {:.1} s in all",
            s.version, s.services, s.backends, s.bytes, self.snapshots_per_node, self.elapsed_s
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let t = Timing::of(samples).unwrap();
        assert_eq!((t.count, t.p50_ms, t.p99_ms, t.max_ms), (100, 50.0, 99.0, 100.0));
        assert!(Timing::of(Vec::new()).is_none());
        let one = Timing::of(vec![Duration::from_millis(3)]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms), (3.0, 3.0));
    }
}
