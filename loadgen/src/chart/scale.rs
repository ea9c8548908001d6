//! Scales: axes with "nice" ticks, their labels, numbers for the header, and lines cut into runs where
//! there is no data.

use super::{Axis, Line};

/// Ticks an axis aims for.
const TICKS: usize = 5;

/// Percentile to a position on a log scale of nines: 0 → 0, 90 → 1, 99 → 2, 99.9 → 3, ... 100 → 5.
pub(super) fn nines(percentile: f64) -> f64 {
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
pub(super) fn nice_step(lo: f64, hi: f64, about: usize) -> f64 {
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
pub(super) fn covering(lo: f64, hi: f64, step: f64) -> (i64, i64) {
    ((lo / step + 1e-9).floor() as i64, (hi / step - 1e-9).ceil() as i64)
}

/// A tick's label: as many decimals as the step needs, thousands as `k`, millions as `M`.
pub(super) fn tick_label(value: f64, step: f64) -> String {
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
pub(super) fn significant(value: f64) -> String {
    let decimals = if value.abs() < 1e-9 { 0 } else { (2 - value.abs().log10().floor() as i64).clamp(0, 6) as usize };
    trim_zeros(&format!("{value:.decimals$}"))
}

/// A number with no trailing zeros, to three decimals at most.
pub(super) fn trim(value: f64) -> String {
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
pub(super) fn time_axis(seconds: usize) -> Axis {
    let hi = seconds.max(1) as f64;
    let step = nice_step(0.0, hi, TICKS).max(1.0);
    let ticks =
        (0..).map(|k| k as f64 * step).take_while(|&t| t <= hi + 1e-9).map(|t| (t, tick_label(t, step))).collect();
    Axis { title: "time since start (s)".to_owned(), lo: 0.0, hi, ticks }
}

/// A value axis from 0 to a nice value at or above the largest point of `lines` (at least `least`).
pub(super) fn value_axis(title: &str, lines: &[Line], least: f64) -> Axis {
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
pub(super) fn segments(points: impl Iterator<Item = (f64, Option<f64>)>) -> Vec<Vec<(f64, f64)>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
