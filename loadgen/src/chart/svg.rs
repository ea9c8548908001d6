//! The SVG writer: text, grid, axes and polylines, by hand (no plotting library, no font files).

use std::fmt::Write as _;

use super::{Chart, Panel};

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

// === impl Chart ===

impl Chart {
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
pub(super) fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.6
}

/// `text` cut at spaces into lines of at most `width` (a single word longer than that stays whole).
pub(super) fn wrap(text: &str, size: f64, width: f64) -> Vec<String> {
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
    use std::time::Duration;

    use super::*;
    use crate::{
        chart::{
            Line,
            scale::{segments, time_axis, value_axis},
            tests::{answered, panel, report},
        },
        error::ErrorKind,
    };

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
}
