//! The SVG chart of a run (`--svg`), written by hand: lines and text need no plotting library, and no
//! font files.
//!
//! [`Chart::of`] lays a report out as data (panels, axes with their ticks, lines cut into segments) and
//! [`Chart::svg`] draws that; the tests read the layout, not the drawing.
//!
//! Panels, top to bottom: latency by percentile over the whole run, then three on one time axis (the
//! same range and ticks, in seconds since the start): requests answered per second (Gbit/s for bulk),
//! p50 and p99 latency per second, and the share of requests that failed per second (failures per
//! second for bulk, where nothing else is counted per second).
//!
//! # Which seconds the time panels show
//! The timeline files each request under the second it *ended* in ([`crate::driver::Recorder::record`]).
//! Requests start only within `--duration`, but answers and timeouts keep arriving for up to one
//! `--timeout` after it. A second that reaches past the end of `--duration` therefore holds part of a
//! second of starts plus that drain: its count is no rate, and dividing it by the part that lies within
//! `--duration` would still count the drain. Such seconds are left out of the time panels (drawn, they
//! read as a collapse at the end of every run); the totals under the title count every request, and the
//! line below them says how many ended in seconds that are not drawn.
//!
//! A second in which no request was answered has no latency: the latency lines break there instead of
//! falling to zero, and so does the failure share of a second in which no request ended at all.
//!
//! # Layout
//! - this module: the layout, from a [`Report`] to a [`Chart`].
//! - `scale`: axes and their ticks, number labels, lines cut where there is no data.
//! - `svg`: the SVG writer, from a [`Chart`] to text.

mod scale;
mod svg;

use std::fmt::Write as _;

pub use self::scale::nice_ticks;
use self::scale::{nines, segments, significant, time_axis, trim, value_axis};
use crate::report::{Report, SecondReport};

const BLUE: &str = "#1f77b4";
const GREEN: &str = "#2ca02c";
const RED: &str = "#d62728";
const ORANGE: &str = "#ff7f0e";

/// A chart laid out, not yet drawn.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The run: workload, mode, connections, duration.
    pub title: String,
    /// What it achieved: rate, failures, latency.
    pub totals: String,
    /// What the time panels show and leave out.
    pub subtitle: String,
    /// Top to bottom.
    pub panels: Vec<Panel>,
}

/// One plot with its axes.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Above the plot.
    pub title: String,
    /// Of the plot area, in pixels.
    pub height: f64,
    /// Horizontal axis.
    pub x: Axis,
    /// Vertical axis.
    pub y: Axis,
    /// What is drawn.
    pub lines: Vec<Line>,
    /// Whether `x` is the time axis shared by every time panel.
    pub time: bool,
    /// Written in the plot's corner, e.g. that nothing failed.
    pub note: Option<String>,
}

/// An axis: its range, ticks (each with a grid line) and title with unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// Title, with the unit.
    pub title: String,
    /// Value at the start of the axis.
    pub lo: f64,
    /// Value at the end of the axis.
    pub hi: f64,
    /// (value, label) of each tick, in order, all within `lo..=hi`.
    pub ticks: Vec<(f64, String)>,
}

/// One line, cut where there is no data.
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend and hover text.
    pub name: String,
    /// Stroke colour.
    pub colour: &'static str,
    /// Runs of consecutive points; a gap in the data starts a new one.
    pub segments: Vec<Vec<(f64, f64)>>,
}

/// A latency unit fit for the largest value shown.
#[derive(Debug, Clone, Copy)]
struct Unit {
    name: &'static str,
    micros: f64,
}

impl Unit {
    fn for_max(max_us: u64) -> Self {
        match max_us {
            0..1_000 => Unit { name: "µs", micros: 1.0 },
            1_000..10_000_000 => Unit { name: "ms", micros: 1e3 },
            _ => Unit { name: "s", micros: 1e6 },
        }
    }

    fn of(self, us: u64) -> f64 {
        us as f64 / self.micros
    }
}

// === impl Chart ===

impl Chart {
    /// Lays out `report`'s chart.
    pub fn of(report: &Report) -> Self {
        let bulk = report.workload == "bulk";
        let failed: u64 = report.errors.values().sum();
        let requests = report.ok + failed;
        let share = if requests == 0 { 0.0 } else { failed as f64 * 100.0 / requests as f64 };
        let rate = report.target_rate.map(|r| format!(" at {r:.0}/s")).unwrap_or_default();
        let chart_title = format!(
            "{} {} loop{rate}, {} connections, {} s",
            report.workload,
            report.mode,
            report.connections,
            significant(report.duration_s)
        );
        let mut totals = if bulk {
            format!("{:.2} Gbit/s", report.gbit_per_s)
        } else {
            format!("{:.0} requests/s answered", report.achieved_rps)
        };
        let _ = write!(totals, " · {failed} failed ({} %)", significant(share));
        if let Some(l) = &report.latency_us {
            let unit = Unit::for_max(l.p99);
            for (name, us) in [("p50", l.p50), ("p99", l.p99), ("max", l.max)] {
                let _ = write!(totals, " · {name} {} {}", significant(unit.of(us)), unit.name);
            }
        }

        // Only the seconds wholly within --duration (see the module's doc).
        let seconds = (report.duration_s.max(0.0).floor() as usize).min(86_400);
        let later: u64 = report.timeline.iter().skip(seconds).map(|s| s.ok + s.errors).sum();
        let mut subtitle = match seconds {
            0 => "The run was shorter than a second: no per-second panels.".to_owned(),
            1 => "Time panels: the 1 complete second of --duration".to_owned(),
            n => format!("Time panels: the {n} complete seconds of --duration"),
        };
        if seconds > 0 {
            subtitle.push_str(if bulk { "." } else { ", each request in the second it ended." });
        }
        if later > 0 {
            let _ = write!(
                subtitle,
                " {later} that ended later (in a last part-second or after the end) count in the totals only."
            );
        }

        let mut panels = Vec::new();
        let max_us = report
            .latency_us
            .as_ref()
            .map(|l| l.max)
            .into_iter()
            .chain(report.timeline.iter().take(seconds).filter_map(|s| s.p99_us))
            .max()
            .unwrap_or(0);
        let unit = Unit::for_max(max_us);
        if let Some(l) = &report.latency_us {
            let points: Vec<(f64, f64)> = l.curve.iter().map(|&(p, us)| (nines(p), unit.of(us))).collect();
            let x = Axis {
                title: "percentile (%), spaced by nines".to_owned(),
                lo: 0.0,
                hi: nines(100.0),
                ticks: [0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0].iter().map(|&p| (nines(p), trim(p))).collect(),
            };
            let lines = vec![Line { name: "latency".to_owned(), colour: BLUE, segments: vec![points] }];
            panels.push(Panel {
                title: "Latency by percentile, whole run".to_owned(),
                height: 200.0,
                x,
                y: value_axis(&format!("latency ({})", unit.name), &lines, 1.0),
                lines,
                time: false,
                note: None,
            });
        }
        if seconds == 0 {
            return Chart { title: chart_title, totals, subtitle, panels };
        }

        let time = time_axis(seconds);
        let timeline: Vec<Option<&SecondReport>> = (0..seconds).map(|i| report.timeline.get(i)).collect();
        // Each second's value drawn at the middle of its second.
        let series = |value: &dyn Fn(Option<&SecondReport>) -> Option<f64>| {
            segments(timeline.iter().enumerate().map(|(i, &s)| (i as f64 + 0.5, value(s))))
        };
        let time_panel = |title: &str, y_title: &str, height: f64, lines: Vec<Line>, note: Option<&str>, least| Panel {
            title: title.to_owned(),
            height,
            x: time.clone(),
            y: value_axis(y_title, &lines, least),
            lines,
            time: true,
            note: note.map(str::to_owned),
        };

        let (title, y_title, line) = if bulk {
            let gbit = series(&|s| Some(s.map_or(0.0, |s| s.bytes as f64 * 8.0 / 1e9)));
            ("Throughput", "throughput (Gbit/s)", Line { name: "Gbit/s".to_owned(), colour: GREEN, segments: gbit })
        } else {
            let answered = series(&|s| Some(s.map_or(0.0, |s| s.ok as f64)));
            let line = Line { name: "answered".to_owned(), colour: GREEN, segments: answered };
            ("Requests answered per second", "answered (requests/s)", line)
        };
        panels.push(time_panel(title, y_title, 130.0, vec![line], None, 1.0));

        if !bulk {
            let latency = |name: &str, colour, at: fn(&SecondReport) -> Option<u64>| Line {
                name: name.to_owned(),
                colour,
                segments: series(&|s| s.and_then(at).map(|us| unit.of(us))),
            };
            let lines = vec![latency("p50", BLUE, |s| s.p50_us), latency("p99", RED, |s| s.p99_us)];
            let note = lines.iter().all(|l| l.segments.is_empty()).then_some("no request was answered");
            let y_title = format!("latency ({})", unit.name);
            panels.push(time_panel(
                "Latency per second (breaks where nothing was answered)",
                &y_title,
                130.0,
                lines,
                note,
                1.0,
            ));
        }

        let none_failed = timeline.iter().flatten().all(|s| s.errors == 0);
        let note = none_failed.then_some(if failed == 0 { "none failed" } else { "none failed in these seconds" });
        let (title, y_title, values) = if bulk {
            ("Failures per second", "failures (per s)", series(&|s| Some(s.map_or(0.0, |s| s.errors as f64))))
        } else {
            // The share of the requests that ended in that second; none ended, no share.
            let share = series(&|s| {
                let s = s?;
                let ended = s.ok + s.errors;
                (ended > 0).then(|| s.errors as f64 * 100.0 / ended as f64)
            });
            ("Failed requests, % of those ending each second", "failed (%)", share)
        };
        let line = Line { name: "failed".to_owned(), colour: ORANGE, segments: values };
        // Whole failures for bulk; a share for the rest, where 1 % is a fine least scale.
        panels.push(time_panel(title, y_title, 110.0, vec![line], note, if bulk { 5.0 } else { 1.0 }));
        Chart { title: chart_title, totals, subtitle, panels }
    }
}

// === impl Report ===

impl Report {
    /// The chart: latency by percentile, then rate, latency and failures per second on one time axis
    /// (see the module's doc for which seconds it shows).
    pub fn svg(&self) -> String {
        Chart::of(self).svg()
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use super::*;
    use crate::{
        driver::{Outcome, Recorder},
        error::ErrorKind,
    };

    /// A report of `duration` from (milliseconds since the start, latency in µs or an error) records.
    pub(super) fn report(duration: Duration, records: &[(u64, Result<u64, ErrorKind>)]) -> Report {
        let mut total = Recorder::default();
        for &(at, result) in records {
            let latency = Duration::from_micros(*result.as_ref().unwrap_or(&0));
            total.record(Duration::from_millis(at), latency, result.map(|_| 10));
        }
        let targets: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap()];
        let outcome =
            Outcome { total: total.clone(), per_target: vec![total], elapsed: duration, duration, longest_gap: None };
        Report::new("http", None, 4, &targets, &outcome)
    }

    /// `n` answered requests spread over second `second`, each taking `us`.
    pub(super) fn answered(second: u64, n: u64, us: u64) -> Vec<(u64, Result<u64, ErrorKind>)> {
        (0..n).map(|i| (second * 1000 + i * 1000 / n, Ok(us))).collect()
    }

    pub(super) fn panel<'a>(chart: &'a Chart, title: &str) -> &'a Panel {
        chart.panels.iter().find(|p| p.title.starts_with(title)).unwrap_or_else(|| panic!("no {title} panel"))
    }

    #[test]
    fn a_second_with_nothing_answered_breaks_the_latency_lines() {
        let mut records = answered(0, 100, 500);
        // Second 1: the backend is down, every request is refused.
        records.extend((0..50).map(|i| (1000 + i * 20, Err(ErrorKind::Connect))));
        records.extend(answered(2, 100, 700));
        let chart = Chart::of(&report(Duration::from_secs(3), &records));
        let latency = panel(&chart, "Latency per second");
        for line in &latency.lines {
            assert_eq!(line.segments.len(), 2, "{}: {:?}", line.name, line.segments);
            assert!(line.segments.iter().flatten().all(|&(_, y)| y > 0.0), "no point at 0: {:?}", line.segments);
        }
        // The rate truly was 0 then: that line goes on through it.
        let rate = panel(&chart, "Requests answered");
        assert_eq!(rate.lines[0].segments, vec![vec![(0.5, 100.0), (1.5, 0.0), (2.5, 100.0)]]);
    }

    #[test]
    fn the_partial_last_second_and_the_drain_are_not_drawn() {
        let mut records = answered(0, 100, 500);
        records.extend(answered(1, 100, 500));
        // The run ends at 2.4 s: 40 answers in its last 0.4 s, and 2 stragglers after the end.
        records.extend((0..40).map(|i| (2000 + i * 10, Ok(500))));
        records.extend([(2600, Ok(500)), (3100, Err(ErrorKind::Timeout))]);
        let report = report(Duration::from_millis(2400), &records);
        assert_eq!(report.timeline.len(), 4);
        let chart = Chart::of(&report);
        for panel in chart.panels.iter().filter(|p| p.time) {
            assert_eq!(panel.x.hi, 2.0, "{}", panel.title);
            for line in &panel.lines {
                assert!(line.segments.iter().flatten().all(|&(x, _)| x < 2.0), "{}: {:?}", panel.title, line.segments);
            }
        }
        let rate = panel(&chart, "Requests answered");
        assert_eq!(rate.lines[0].segments, vec![vec![(0.5, 100.0), (1.5, 100.0)]], "no drop at the end");
        assert!(chart.subtitle.contains("42 that ended later"), "{}", chart.subtitle);
        assert!(chart.totals.contains(" 1 failed"), "{}", chart.totals);
    }

    #[test]
    fn the_error_panel_shows_the_share_that_failed_each_second() {
        let mut records = answered(0, 100, 500);
        records.extend(answered(1, 75, 500));
        records.extend((0..25).map(|i| (1000 + i * 40, Err(ErrorKind::Timeout))));
        let chart = Chart::of(&report(Duration::from_secs(2), &records));
        let errors = panel(&chart, "Failed requests");
        assert!(errors.y.title.contains('%'), "{}", errors.y.title);
        assert_eq!(errors.lines[0].segments, vec![vec![(0.5, 0.0), (1.5, 25.0)]]);
        assert!(errors.note.is_none());
        let svg = chart.svg();
        assert!(svg.contains("Failed requests, % of those ending each second"));

        let clean = Chart::of(&report(Duration::from_secs(2), &answered(0, 10, 500)));
        assert_eq!(panel(&clean, "Failed requests").note.as_deref(), Some("none failed"));
    }

    #[test]
    fn every_time_panel_shares_one_time_axis() {
        let mut records = answered(0, 10, 200);
        records.extend(answered(5, 3_000, 90_000));
        records.extend((0..7).map(|i| (8000 + i, Err(ErrorKind::Connect))));
        let chart = Chart::of(&report(Duration::from_secs(12), &records));
        let time: Vec<&Panel> = chart.panels.iter().filter(|p| p.time).collect();
        assert_eq!(time.len(), 3, "rate, latency, errors");
        for p in &time {
            assert_eq!(p.x, time[0].x, "{} and {}", p.title, time[0].title);
        }
        let x = &time[0].x;
        assert_eq!((x.lo, x.hi), (0.0, 12.0));
        let at: Vec<f64> = x.ticks.iter().map(|t| t.0).collect();
        assert_eq!(at, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
        assert!(x.title.contains("(s)"));
    }

    #[test]
    fn a_run_shorter_than_a_second_has_no_time_panels() {
        let chart = Chart::of(&report(Duration::from_millis(500), &answered(0, 10, 100)));
        assert!(chart.panels.iter().all(|p| !p.time));
        assert!(chart.subtitle.contains("shorter than a second"));
        assert!(chart.svg().trim_end().ends_with("</svg>"));
    }
}
