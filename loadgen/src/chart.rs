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

use std::fmt::Write as _;

use crate::report::{Report, SecondReport};

/// Ticks an axis aims for.
const TICKS: usize = 5;
/// Width of the whole chart.
const WIDTH: f64 = 900.0;
/// Left of the plots: room for the y tick labels and the y axis title.
const LEFT: f64 = 88.0;
/// Right of the plots: room for the last x tick label.
const RIGHT: f64 = 28.0;
/// Least room left and right of a centred line of text.
const MARGIN: f64 = 12.0;
/// Above a plot: the panel's title and legend.
const HEAD: f64 = 30.0;
/// Below a plot: the x tick labels and the x axis title.
const FOOT: f64 = 44.0;
/// Between panels.
const GAP: f64 = 10.0;
/// Lines with at most this many points get a dot on each, so single seconds can be told apart.
const DOTS_UP_TO: usize = 60;

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

    /// Draws the chart.
    pub fn svg(&self) -> String {
        let mut svg = Svg { body: String::new() };
        let mut y = 4.0;
        for (text, size, style) in
            [(&self.title, 15.0, "bold"), (&self.totals, 12.5, ""), (&self.subtitle, 11.0, "#555")]
        {
            for line in wrap(text, size, WIDTH - 2.0 * MARGIN) {
                y += size + 4.0;
                svg.text(WIDTH / 2.0, y, &line, "middle", size, style);
            }
        }
        let mut top = y + 8.0;
        for panel in &self.panels {
            svg.panel(panel, top + HEAD);
            top += HEAD + panel.height + FOOT + GAP;
        }
        let height = top;
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} \
             {height}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{}</svg>\n",
            svg.body
        )
    }
}

/// About how wide `text` is in a sans-serif font of `size` (generous: most glyphs are narrower).
fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.6
}

/// `text` cut at spaces into lines of at most `width` (a single word longer than that stays whole).
fn wrap(text: &str, size: f64, width: f64) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(line) if text_width(&format!("{line} {word}"), size) <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
}

/// Percentile to a position on a log scale of nines: 0 → 0, 90 → 1, 99 → 2, 99.9 → 3, ... 100 → 5.
fn nines(percentile: f64) -> f64 {
    let rest = (100.0 - percentile).max(0.001) / 100.0;
    -rest.log10()
}

/// Ticks at a "nice" step (1, 2 or 5 times a power of ten) giving about `about` intervals, from the last
/// multiple of the step at or below `lo` to the first at or above `hi`, so they cover the range.
pub fn nice_ticks(lo: f64, hi: f64, about: usize) -> Vec<f64> {
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo, lo + 1.0) };
    let step = nice_step(lo, hi, about);
    let (first, last) = covering(lo, hi, step);
    (first..=last).map(|k| k as f64 * step).collect()
}

/// The 1, 2 or 5 times a power of ten whose covering ticks make the number of intervals nearest to
/// `about` (the larger step on a tie).
fn nice_step(lo: f64, hi: f64, about: usize) -> f64 {
    let about = about.max(1) as i64;
    let magnitude = 10_f64.powf(((hi - lo) / about as f64).log10().floor());
    let mut best = (i64::MAX, magnitude);
    for step in [1.0, 2.0, 5.0, 10.0].map(|n| n * magnitude) {
        let (first, last) = covering(lo, hi, step);
        let miss = (last - first - about).abs();
        if miss <= best.0 {
            best = (miss, step);
        }
    }
    best.1
}

/// The multiples of `step` at or below `lo` and at or above `hi`, with a hair of slack, so that
/// 0.3 / 0.1 = 2.9999999999999996 is not a tick short and 7.000000000000001 not one too many.
fn covering(lo: f64, hi: f64, step: f64) -> (i64, i64) {
    ((lo / step + 1e-9).floor() as i64, (hi / step - 1e-9).ceil() as i64)
}

/// A tick's label: as many decimals as the step needs, thousands as `k`, millions as `M`.
fn tick_label(value: f64, step: f64) -> String {
    if value.abs() < step * 1e-6 {
        return "0".to_owned();
    }
    for (scale, suffix) in [(1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if step >= scale {
            return format!("{}{suffix}", fixed(value / scale, step / scale));
        }
    }
    fixed(value, step)
}

fn fixed(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10() - 1e-9).ceil() as usize };
    format!("{value:.decimals$}")
}

/// A number to three significant digits (all of its whole part), without trailing zeros.
fn significant(value: f64) -> String {
    let decimals = if value.abs() < 1e-9 { 0 } else { (2 - value.abs().log10().floor() as i64).clamp(0, 6) as usize };
    trim_zeros(&format!("{value:.decimals$}"))
}

/// A number with no trailing zeros, to three decimals at most.
fn trim(value: f64) -> String {
    trim_zeros(&format!("{value:.3}"))
}

/// `12.500` → `12.5`, `3.000` → `3`, `100` → `100`.
fn trim_zeros(text: &str) -> String {
    if !text.contains('.') {
        return text.to_owned();
    }
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The time axis of `seconds` whole seconds: 0 to `seconds`, ticks at whole seconds within it.
fn time_axis(seconds: usize) -> Axis {
    let hi = seconds.max(1) as f64;
    let step = nice_step(0.0, hi, TICKS).max(1.0);
    let ticks =
        (0..).map(|k| k as f64 * step).take_while(|&t| t <= hi + 1e-9).map(|t| (t, tick_label(t, step))).collect();
    Axis { title: "time since start (s)".to_owned(), lo: 0.0, hi, ticks }
}

/// A value axis from 0 to a nice value at or above the largest point of `lines` (at least `least`).
fn value_axis(title: &str, lines: &[Line], least: f64) -> Axis {
    let max = lines.iter().flat_map(|l| l.segments.iter().flatten()).map(|&(_, y)| y).fold(least, f64::max);
    let ticks = nice_ticks(0.0, max, TICKS);
    let step = ticks.get(1).copied().unwrap_or(1.0) - ticks[0];
    Axis {
        title: title.to_owned(),
        lo: ticks[0],
        hi: ticks[ticks.len() - 1],
        ticks: ticks.iter().map(|&t| (t, tick_label(t, step))).collect(),
    }
}

/// Runs of consecutive points with a value; `None` ends a run.
fn segments(points: impl Iterator<Item = (f64, Option<f64>)>) -> Vec<Vec<(f64, f64)>> {
    let mut all = Vec::new();
    let mut run = Vec::new();
    for (x, y) in points {
        match y {
            Some(y) if y.is_finite() => run.push((x, y)),
            _ if run.is_empty() => {}
            _ => all.push(std::mem::take(&mut run)),
        }
    }
    if !run.is_empty() {
        all.push(run);
    }
    all
}

struct Svg {
    body: String,
}

impl Svg {
    fn text(&mut self, x: f64, y: f64, text: &str, anchor: &str, size: f64, style: &str) {
        let text = text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let style = match style {
            "bold" => r#" font-weight="bold""#.to_owned(),
            "" => String::new(),
            colour => format!(r#" fill="{colour}""#),
        };
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}"{style}>{text}</text>"#
        );
    }

    /// Draws `panel` with its plot's top edge at `top`.
    fn panel(&mut self, panel: &Panel, top: f64) {
        let (left, width, height) = (LEFT, WIDTH - LEFT - RIGHT, panel.height);
        let bottom = top + height;
        let px = |x: f64| left + (x - panel.x.lo) / (panel.x.hi - panel.x.lo) * width;
        let py = |y: f64| bottom - (y - panel.y.lo) / (panel.y.hi - panel.y.lo) * height;

        self.text(left, top - 10.0, &panel.title, "start", 13.0, "bold");
        let mut right = left + width;
        for line in panel.lines.iter().rev().filter(|_| panel.lines.len() > 1) {
            // Legend, right to left: a short stroke, then the name.
            self.text(right, top - 10.0, &line.name, "end", 11.0, "");
            right -= text_width(&line.name, 11.0) + 6.0;
            let _ = writeln!(
                self.body,
                r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2.5"/>"#,
                right - 18.0,
                right,
                line.colour,
                y = top - 14.0
            );
            right -= 30.0;
        }

        for (y, _) in &panel.y.ticks {
            let y = py(*y);
            let _ = writeln!(
                self.body,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/>"##,
                left + width
            );
        }
        for (x, _) in &panel.x.ticks {
            let x = px(*x);
            let _ = writeln!(
                self.body,
                r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#e4e4e4"/>"##
            );
        }
        let _ = writeln!(
            self.body,
            r##"<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>"##
        );
        for (y, label) in &panel.y.ticks {
            self.text(left - 6.0, py(*y) + 4.0, label, "end", 11.0, "#333");
        }
        for (x, label) in &panel.x.ticks {
            self.text(px(*x), bottom + 15.0, label, "middle", 11.0, "#333");
        }
        self.text(left + width / 2.0, bottom + 34.0, &panel.x.title, "middle", 12.0, "");
        let (title_x, title_y) = (18.0, top + height / 2.0);
        let title = panel.y.title.replace('&', "&amp;").replace('<', "&lt;");
        let _ = writeln!(
            self.body,
            r#"<text x="{title_x}" y="{title_y:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 {title_x} {title_y:.1})">{title}</text>"#
        );
        if let Some(note) = &panel.note {
            self.text(left + 8.0, top + 16.0, note, "start", 11.0, "#555");
        }

        for line in &panel.lines {
            let dots = line.segments.iter().map(Vec::len).sum::<usize>() <= DOTS_UP_TO;
            for segment in &line.segments {
                if segment.len() > 1 {
                    let points: Vec<String> =
                        segment.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
                    let _ = writeln!(
                        self.body,
                        r#"<polyline fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round" points="{}"><title>{}</title></polyline>"#,
                        line.colour,
                        points.join(" "),
                        line.name
                    );
                }
                if dots || segment.len() == 1 {
                    for &(x, y) in segment {
                        let _ = writeln!(
                            self.body,
                            r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"#,
                            px(x),
                            py(y),
                            line.colour
                        );
                    }
                }
            }
        }
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
    fn report(duration: Duration, records: &[(u64, Result<u64, ErrorKind>)]) -> Report {
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
    fn answered(second: u64, n: u64, us: u64) -> Vec<(u64, Result<u64, ErrorKind>)> {
        (0..n).map(|i| (second * 1000 + i * 1000 / n, Ok(us))).collect()
    }

    fn panel<'a>(chart: &'a Chart, title: &str) -> &'a Panel {
        chart.panels.iter().find(|p| p.title.starts_with(title)).unwrap_or_else(|| panic!("no {title} panel"))
    }

    #[test]
    fn ticks_take_nice_steps_and_cover_the_range() {
        for (lo, hi) in [(0.0, 1.0), (0.0, 7.3), (0.0, 100.0), (0.0, 0.037), (0.0, 123_456.0), (3.2, 9.9), (0.0, 1e-3)]
        {
            let ticks = nice_ticks(lo, hi, 5);
            assert!((4..=8).contains(&ticks.len()), "{lo}..{hi}: {ticks:?}");
            let step = ticks[1] - ticks[0];
            let fraction = step / 10_f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0, 10.0].iter().any(|n| (fraction - n).abs() < 1e-6),
                "{lo}..{hi}: step {step} is not 1, 2 or 5 times a power of ten"
            );
            for pair in ticks.windows(2) {
                assert!(((pair[1] - pair[0]) - step).abs() < step * 1e-6, "{lo}..{hi}: uneven {ticks:?}");
            }
            let slack = step * 1e-6;
            assert!(ticks[0] <= lo + slack && ticks[0] > lo - step, "{lo}..{hi}: {ticks:?} start");
            let last = ticks[ticks.len() - 1];
            assert!(last >= hi - slack && last < hi + step, "{lo}..{hi}: {ticks:?} end");
        }
        assert_eq!(nice_ticks(0.0, 100.0, 5), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(nice_ticks(0.0, 7.3, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        // A flat series still gets an axis.
        assert!(nice_ticks(0.0, 0.0, 5).len() >= 2);
    }

    #[test]
    fn tick_labels_have_the_decimals_the_step_needs() {
        let labels = |lo, hi| {
            let ticks = nice_ticks(lo, hi, 5);
            let step = ticks[1] - ticks[0];
            ticks.iter().map(|&t| tick_label(t, step)).collect::<Vec<_>>()
        };
        assert_eq!(labels(0.0, 1.0), ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(labels(0.0, 0.037), ["0", "0.01", "0.02", "0.03", "0.04"]);
        assert_eq!(labels(0.0, 23_000.0), ["0", "5k", "10k", "15k", "20k", "25k"]);
        assert_eq!(labels(0.0, 2_400.0), ["0", "500", "1000", "1500", "2000", "2500"]);
    }

    #[test]
    fn summary_numbers_keep_three_significant_digits() {
        let all: Vec<String> =
            [16.383, 0.4125, 100.0, 1234.6, 25.0, 0.0, 3.0].iter().map(|&v| significant(v)).collect();
        assert_eq!(all, ["16.4", "0.412", "100", "1235", "25", "0", "3"]);
        assert_eq!([0.0, 50.0, 99.9, 99.99, 100.0].map(trim), ["0", "50", "99.9", "99.99", "100"]);
    }

    #[test]
    fn a_gap_in_the_data_makes_two_polylines() {
        let cut =
            segments([(0.5, Some(1.0)), (1.5, Some(2.0)), (2.5, None), (3.5, Some(3.0)), (4.5, Some(4.0))].into_iter());
        assert_eq!(cut, vec![vec![(0.5, 1.0), (1.5, 2.0)], vec![(3.5, 3.0), (4.5, 4.0)]]);
        let line = Line { name: "p99".to_owned(), colour: "#000", segments: cut };
        let time = time_axis(5);
        let chart = Chart {
            title: String::new(),
            totals: String::new(),
            subtitle: String::new(),
            panels: vec![Panel {
                title: "t".to_owned(),
                height: 100.0,
                y: value_axis("y", std::slice::from_ref(&line), 1.0),
                x: time,
                lines: vec![line],
                time: true,
                note: None,
            }],
        };
        assert_eq!(chart.svg().matches("<polyline").count(), 2);
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
    fn every_axis_has_labelled_ticks_a_grid_and_a_title_with_its_unit() {
        let mut records = answered(0, 500, 300);
        records.extend(answered(1, 500, 2_000));
        records.extend(answered(2, 500, 400));
        let chart = Chart::of(&report(Duration::from_secs(3), &records));
        assert_eq!(chart.panels.len(), 4);
        let svg = chart.svg();
        for panel in &chart.panels {
            for axis in [&panel.x, &panel.y] {
                assert!(axis.ticks.len() >= 2, "{}: {:?}", panel.title, axis);
                assert!(axis.title.contains('('), "{}: no unit in {}", panel.title, axis.title);
                assert!(axis.ticks.iter().all(|&(v, _)| v >= axis.lo - 1e-9 && v <= axis.hi + 1e-9));
                for (_, label) in &axis.ticks {
                    assert!(svg.contains(&format!(">{label}</text>")), "{}: no label {label}", panel.title);
                }
            }
        }
        let ticks: usize = chart.panels.iter().map(|p| p.x.ticks.len() + p.y.ticks.len()).sum();
        assert_eq!(svg.matches(r##"stroke="#e4e4e4""##).count(), ticks, "a grid line per tick");
        // The largest latency is 2 ms, so the latency axes are in ms.
        assert_eq!(panel(&chart, "Latency by percentile").y.title, "latency (ms)");
        assert_texts_fit(&svg);
    }

    /// Every text, at its estimated width, lies inside the picture (rotated ones by their anchor).
    fn assert_texts_fit(svg: &str) {
        let number = |text: &str, name: &str| -> f64 {
            let value = text.split(&format!("{name}=\"")).nth(1).and_then(|s| s.split('"').next());
            value.unwrap_or_else(|| panic!("no {name} in {text}")).parse().unwrap()
        };
        let height = number(svg, "height");
        for text in svg.split("<text").skip(1) {
            let (x, y, size) = (number(text, " x"), number(text, " y"), number(text, "font-size"));
            let content = text.split('>').nth(1).and_then(|s| s.split('<').next()).unwrap();
            let width = if text.contains("rotate(") { 0.0 } else { text_width(content, size) };
            let (left, right) = match text.split("text-anchor=\"").nth(1).and_then(|s| s.split('"').next()) {
                Some("middle") => (x - width / 2.0, x + width / 2.0),
                Some("end") => (x - width, x),
                _ => (x, x + width),
            };
            assert!(left >= 0.0 && right <= WIDTH, "too wide: {content} ({left:.0}..{right:.0})");
            assert!(y - size >= 0.0 && y <= height, "outside: {content} at {y}");
        }
    }

    #[test]
    fn long_header_lines_wrap_inside_the_picture() {
        let mut records = answered(0, 100, 500);
        records.extend(answered(1, 100, 500));
        records.extend((0..40).map(|i| (2000 + i * 10, Ok(500))));
        records.extend([(2600, Ok(500)), (3100, Err(ErrorKind::Timeout))]);
        let chart = Chart::of(&report(Duration::from_millis(2400), &records));
        assert!(text_width(&chart.subtitle, 11.0) > WIDTH, "the case is a line too long for one row");
        let svg = chart.svg();
        assert_texts_fit(&svg);
        let wrapped = wrap(&chart.subtitle, 11.0, WIDTH - 2.0 * MARGIN);
        assert!(wrapped.len() >= 2);
        assert_eq!(wrapped.join(" "), chart.subtitle, "nothing lost");
        for line in &wrapped {
            assert!(svg.contains(&format!(">{line}</text>")), "{line}");
        }
    }

    #[test]
    fn a_run_shorter_than_a_second_has_no_time_panels() {
        let chart = Chart::of(&report(Duration::from_millis(500), &answered(0, 10, 100)));
        assert!(chart.panels.iter().all(|p| !p.time));
        assert!(chart.subtitle.contains("shorter than a second"));
        assert!(chart.svg().trim_end().ends_with("</svg>"));
    }
}
