//! SVG charts of a run's results (`loadgen --charts DIR`), for the reader
//! who would rather look than read the table.
//!
//! Three charts, each drawn from the [`Row`]s of one scenario and written
//! only when that scenario ran:
//!
//! * `latency.svg`: scenario (a), fan-out latency p50, p99 and max;
//! * `deliveries.svg`: scenario (b), deliveries/s beside the server's CPU
//!   per delivery;
//! * `memory.svg`: scenario (c), the server's RSS per idle client beside
//!   what the kernel holds for it (stacks, page tables and slab, stacked).
//!
//! Each relay is a category along the x axis, in the order the rows give
//! them: the charts know no relay by name, so a run against any relay (a
//! reference server included) is drawn the same way. Rows of the same
//! scenario and relay are rounds (`--rounds`): a bar stands at their
//! median, a whisker spans their minimum to their maximum, and a dot marks
//! each round.
//!
//! The drawing is plotters' SVG backend alone. It loads no font: the SVG
//! names a generic family (`sans-serif`) and the viewer draws the text, so
//! nothing here needs a font file or a C library. (Plotters only estimates
//! the width of a text, to lay out the axes.)

use std::fmt;
use std::path::{Path, PathBuf};

use std::ops::Range;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;

use super::report::Row;

/// Width and height of a chart in pixels: about what GitHub shows of an
/// image in a markdown page without scaling it down.
const SIZE: (u32, u32) = (800, 400);

/// The font the viewer should draw every text in.
const FONT: &str = "sans-serif";

/// A chart that could not be drawn or written.
#[derive(Debug)]
pub(crate) enum ChartError {
    /// Plotters refused to draw (a bug here, not in the results).
    Draw(String),
    /// The folder or the file could not be written: check the path given
    /// to `--charts`.
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for ChartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChartError::Draw(why) => write!(f, "drawing a chart: {why}"),
            ChartError::Write { path, .. } => write!(f, "writing {}", path.display()),
        }
    }
}

impl std::error::Error for ChartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChartError::Draw(_) => None,
            ChartError::Write { source, .. } => Some(source),
        }
    }
}

/// Plotters' errors carry the backend's error type; here they are only
/// reported.
impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for ChartError {
    fn from(error: DrawingAreaErrorKind<E>) -> ChartError {
        ChartError::Draw(error.to_string())
    }
}

/// Writes into `dir` (made if missing) the charts of the scenarios among
/// `rows`, and returns the paths written. A scenario that did not run has
/// no chart; no rows, no files.
pub(crate) fn write_all<'a>(
    rows: impl IntoIterator<Item = &'a Row>,
    dir: &Path,
) -> Result<Vec<PathBuf>, ChartError> {
    let rows: Vec<&Row> = rows.into_iter().collect();
    let rows: &[&Row] = &rows;
    let figures = [
        ("latency.svg", latency(rows)),
        ("deliveries.svg", deliveries(rows)),
        ("memory.svg", memory(rows)),
    ];
    let mut written = Vec::new();
    for (name, figure) in figures {
        let Some(figure) = figure else { continue };
        let path = dir.join(name);
        let svg = figure.render()?;
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, svg))
            .map_err(|source| ChartError::Write {
                path: path.clone(),
                source,
            })?;
        written.push(path);
    }
    Ok(written)
}

/// Scenario (a): fan-out latency p50, p99 and max per relay, or `None`
/// when (a) did not run.
pub(crate) fn latency(rows: &[&Row]) -> Option<Figure> {
    const P50: Part = Part::new("p50", INK_BLUE);
    const P99: Part = Part::new("p99", INK_ORANGE);
    const MAX: Part = Part::new("max", INK_VERMILION);
    let panel = Panel::from_rows(
        rows,
        "a",
        "latency (ms)",
        vec![
            Measure::single(P50, |row| row.latency.map(|(p50, _, _)| p50)),
            Measure::single(P99, |row| row.latency.map(|(_, p99, _)| p99)),
            Measure::single(MAX, |row| row.latency.map(|(_, _, max)| max)),
        ],
    )?;
    Some(Figure {
        title: format!(
            "(a) Fan-out latency: {} clients in a room, one sender at 10 messages/s",
            clients(rows, "a")
        ),
        panels: vec![panel],
    })
}

/// Scenario (b): deliveries per second, and the server's CPU time per
/// delivery, per relay; `None` when (b) did not run.
pub(crate) fn deliveries(rows: &[&Row]) -> Option<Figure> {
    const RATE: Part = Part::new("deliveries/s", INK_GREEN);
    const CPU: Part = Part::new("server CPU per delivery", INK_PINK);
    let rate = Panel::from_rows(
        rows,
        "b",
        "million deliveries per second",
        vec![Measure::single(RATE, |row| {
            row.deliveries_per_s.map(|d| d / 1e6)
        })],
    )?;
    let cpu = Panel::from_rows(
        rows,
        "b",
        "server CPU per delivery (µs)",
        vec![Measure::single(CPU, Row::cpu_per_delivery_us)],
    );
    Some(Figure {
        title: format!(
            "(b) Throughput: {} clients, {} sending as fast as all receive",
            clients(rows, "b"),
            senders(rows, "b")
        ),
        panels: [Some(rate), cpu].into_iter().flatten().collect(),
    })
}

/// Scenario (c): memory per idle client, the server's RSS beside the
/// kernel's part (stacks, page tables and slab, stacked); `None` when (c)
/// did not run.
pub(crate) fn memory(rows: &[&Row]) -> Option<Figure> {
    const RSS: Part = Part::new("server RSS", INK_BLUE);
    const KERNEL: [Part; 3] = [
        Part::new("kernel stacks", GREY_DARK),
        Part::new("page tables", GREY_MID),
        Part::new("slab", GREY_LIGHT),
    ];
    let panel = Panel::from_rows(
        rows,
        "c",
        "KiB per idle client",
        vec![
            Measure::single(RSS, |row| row.rss_per_client_kib),
            Measure {
                parts: KERNEL.to_vec(),
                value: Box::new(|row| {
                    let (stacks, tables, slab) = row.kernel_per_client_kib?;
                    Some(vec![stacks, tables, slab])
                }),
            },
        ],
    )?;
    Some(Figure {
        title: format!(
            "(c) Memory per idle connection: {} idle clients",
            clients(rows, "c")
        ),
        panels: vec![panel],
    })
}

/// The clients of `scenario`'s first row (the same in every round), for a
/// title.
fn clients(rows: &[&Row], scenario: &str) -> String {
    let first = rows.iter().find(|row| row.scenario == scenario);
    thousands(first.map_or(0, |row| row.clients))
}

/// The senders of `scenario`'s first row, for a title.
fn senders(rows: &[&Row], scenario: &str) -> usize {
    let first = rows.iter().find(|row| row.scenario == scenario);
    first.map_or(0, |row| row.senders)
}

/// `5000` as `5,000`, as the docs write it.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

// The Okabe–Ito palette, told apart with any colour vision, and greys for
// the kernel's parts (they are one thing, the kernel's, in three pieces).
const INK_BLUE: RGBColor = RGBColor(0, 114, 178);
const INK_ORANGE: RGBColor = RGBColor(230, 159, 0);
const INK_VERMILION: RGBColor = RGBColor(213, 94, 0);
const INK_GREEN: RGBColor = RGBColor(0, 158, 115);
const INK_PINK: RGBColor = RGBColor(204, 121, 167);
const GREY_DARK: RGBColor = RGBColor(90, 90, 90);
const GREY_MID: RGBColor = RGBColor(150, 150, 150);
const GREY_LIGHT: RGBColor = RGBColor(200, 200, 200);

/// One piece of a bar, as the legend names it.
#[derive(Clone, Copy)]
pub(crate) struct Part {
    label: &'static str,
    color: RGBColor,
}

impl Part {
    const fn new(label: &'static str, color: RGBColor) -> Part {
        Part { label, color }
    }
}

/// What one bar of each relay's group shows: its parts, stacked from the
/// bottom (most bars have one), and how to read their values from a row.
pub(crate) struct Measure {
    parts: Vec<Part>,
    value: Reading,
}

/// Reads a measure's values from a row: one per part, or `None` when the
/// row does not measure it.
type Reading = Box<dyn Fn(&Row) -> Option<Vec<f64>>>;

impl Measure {
    /// A bar of one part.
    fn single(part: Part, value: impl Fn(&Row) -> Option<f64> + 'static) -> Measure {
        Measure {
            parts: vec![part],
            value: Box::new(move |row| value(row).map(|v| vec![v])),
        }
    }
}

/// A title over one or more panels side by side.
pub(crate) struct Figure {
    title: String,
    panels: Vec<Panel>,
}

/// One plot: a group of bars for each relay, a bar for each measure.
pub(crate) struct Panel {
    /// What the y axis counts, with its unit.
    y_desc: &'static str,
    /// The parts of each measure's bar, in the measures' order.
    parts: Vec<Vec<Part>>,
    groups: Vec<Group>,
}

/// One relay's bars, one per measure.
struct Group {
    relay: String,
    bars: Vec<Bar>,
}

/// One bar: for each round, a value per part. No rounds: the relay does
/// not measure this, and the bar is left out.
struct Bar {
    rounds: Vec<Vec<f64>>,
}

impl Panel {
    /// The panel of `measures` over the rows of `scenario`, one group per
    /// relay in the order of the rows; `None` when no row of the scenario
    /// has any of the measures.
    fn from_rows(
        rows: &[&Row],
        scenario: &str,
        y_desc: &'static str,
        measures: Vec<Measure>,
    ) -> Option<Panel> {
        let rows: Vec<&Row> = rows
            .iter()
            .copied()
            .filter(|row| row.scenario == scenario)
            .collect();
        let mut relays: Vec<String> = Vec::new();
        for row in &rows {
            let relay = category(row);
            if !relays.contains(&relay) {
                relays.push(relay);
            }
        }
        let groups: Vec<Group> = relays
            .into_iter()
            .map(|relay| {
                let bars = measures
                    .iter()
                    .map(|measure| Bar {
                        rounds: rows
                            .iter()
                            .filter(|row| category(row) == relay)
                            .filter_map(|row| (measure.value)(row))
                            .filter(|values| values.iter().all(|v| v.is_finite()))
                            .collect(),
                    })
                    .collect();
                Group { relay, bars }
            })
            .filter(|group: &Group| group.bars.iter().any(|bar| !bar.rounds.is_empty()))
            .collect();
        (!groups.is_empty()).then(|| Panel {
            y_desc,
            parts: measures.into_iter().map(|measure| measure.parts).collect(),
            groups,
        })
    }

    /// The top of the y axis: the highest whisker, with room above it for
    /// the value written over each bar.
    fn top(&self) -> f64 {
        let highest = self
            .groups
            .iter()
            .flat_map(|group| &group.bars)
            .filter_map(Bar::spread)
            .map(|(_, max)| max)
            .fold(0.0, f64::max);
        if highest > 0.0 { highest * 1.15 } else { 1.0 }
    }

    /// Draws the legend (a line above the plot), then the plot, into
    /// `area`.
    fn draw(&self, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), ChartError> {
        const LEGEND_HEIGHT: u32 = 28;
        const MARGIN_LEFT: u32 = 12;
        const Y_LABELS_WIDTH: u32 = 70;
        let (legend, plot) = area.split_vertically(LEGEND_HEIGHT);
        self.draw_legend(&legend, (MARGIN_LEFT + Y_LABELS_WIDTH) as i32)?;

        let categories = self.groups.len();
        let top = self.top();
        let x_range = RelayAxis {
            relays: self
                .groups
                .iter()
                .map(|group| group.relay.clone())
                .collect(),
        };
        let mut chart = ChartBuilder::on(&plot)
            .margin_left(MARGIN_LEFT)
            .margin_right(15)
            .margin_bottom(5)
            .x_label_area_size(45)
            .y_label_area_size(Y_LABELS_WIDTH)
            .build_cartesian_2d(x_range, 0.0..top)?;
        let y_label = |y: &f64| tick(*y);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(TRANSPARENT)
            .x_labels(categories)
            .y_label_formatter(&y_label)
            .x_label_style((FONT, self.relay_font(plot.dim_in_pixel().0)))
            .y_label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .x_desc("relay")
            .y_desc(self.y_desc)
            .draw()?;

        // Each group takes 80% of its category's width, split evenly among
        // its bars, with a little space between them.
        let slot = 0.8 / self.parts.len() as f64;
        for (g, group) in self.groups.iter().enumerate() {
            for (b, (bar, parts)) in group.bars.iter().zip(&self.parts).enumerate() {
                let left = g as f64 - 0.4 + b as f64 * slot + slot * 0.08;
                bar.draw(&mut chart, parts, left..left + slot * 0.84, top)?;
            }
        }
        Ok(())
    }

    /// The size of the relays' names: smaller when the longest would not
    /// fit in its category at the usual size (about 8 pixels a character),
    /// in a plot `width` pixels wide.
    fn relay_font(&self, width: u32) -> u32 {
        let longest = self.groups.iter().map(|group| group.relay.chars().count());
        let category = width.saturating_sub(100) / self.groups.len() as u32;
        if longest.max().unwrap_or(0) as u32 * 8 > category {
            12
        } else {
            15
        }
    }

    /// A line of coloured squares and what they stand for, from `left`.
    fn draw_legend(
        &self,
        area: &DrawingArea<SVGBackend<'_>, Shift>,
        left: i32,
    ) -> Result<(), ChartError> {
        let style = TextStyle::from((FONT, 14))
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        let (mut x, y) = (left, 14);
        for part in self.parts.iter().flatten() {
            area.draw(&Rectangle::new(
                [(x, y - 6), (x + 12, y + 6)],
                part.color.filled(),
            ))?;
            area.draw(&Text::new(part.label, (x + 17, y), style.clone()))?;
            // About 7 pixels a character at this size, then a gap.
            x += 17 + 7 * part.label.chars().count() as i32 + 20;
        }
        Ok(())
    }
}

/// The x axis: relay `i` is the category from `i - 0.5` to `i + 0.5`,
/// named at its middle. (Plotters' own category axes take a fixed set of
/// values; a group of bars needs positions between them.)
struct RelayAxis {
    relays: Vec<String>,
}

impl Ranged for RelayAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, (from, to): (i32, i32)) -> i32 {
        let share = (value + 0.5) / self.relays.len() as f64;
        from + (share * f64::from(to - from)).round() as i32
    }

    /// A tick (and a name) in the middle of each category.
    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.relays.len()).map(|i| i as f64).collect()
    }

    fn range(&self) -> Range<f64> {
        -0.5..self.relays.len() as f64 - 0.5
    }
}

impl ValueFormatter<f64> for RelayAxis {
    fn format_ext(&self, value: &f64) -> String {
        let i = value.round();
        let relay = (i >= 0.0).then(|| self.relays.get(i as usize)).flatten();
        relay.cloned().unwrap_or_default()
    }
}

/// A panel's plot: relays along x, values up y.
type Plot<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RelayAxis, RangedCoordf64>>;

impl Bar {
    /// Draws the bar between `x.start` and `x.end`: its parts stacked at
    /// their medians, with more than one round a whisker from the least
    /// total to the greatest and a dot for each, and the value on top
    /// (`top` is the y axis's top, for a small gap above).
    fn draw(
        &self,
        plot: &mut Plot<'_, '_>,
        parts: &[Part],
        x: Range<f64>,
        top: f64,
    ) -> Result<(), ChartError> {
        let Some((min, max)) = self.spread() else {
            return Ok(());
        };
        let middle = (x.start + x.end) / 2.0;
        let mut bottom = 0.0;
        for (part, height) in parts.iter().zip(self.heights()) {
            plot.draw_series([Rectangle::new(
                [(x.start, bottom), (x.end, bottom + height)],
                part.color.filled(),
            )])?;
            bottom += height;
        }
        if self.rounds.len() > 1 {
            let cap = (x.end - x.start) * 0.18;
            let ink = BLACK.stroke_width(1);
            plot.draw_series([
                PathElement::new([(middle, min), (middle, max)], ink),
                PathElement::new([(middle - cap, min), (middle + cap, min)], ink),
                PathElement::new([(middle - cap, max), (middle + cap, max)], ink),
            ])?;
            let dots = self.totals();
            plot.draw_series(dots.map(|total| Circle::new((middle, total), 2, BLACK.filled())))?;
        }
        let label = TextStyle::from((FONT, 13))
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        plot.draw_series([Text::new(
            number(bottom),
            (middle, max.max(bottom) + top * 0.01),
            label,
        )])?;
        Ok(())
    }

    /// Each part's median over the rounds: the heights drawn, bottom up.
    fn heights(&self) -> Vec<f64> {
        let parts = self.rounds.first().map_or(0, Vec::len);
        (0..parts)
            .map(|part| median(self.rounds.iter().map(|round| round[part]).collect()))
            .collect()
    }

    /// Each round's total (the parts added up).
    fn totals(&self) -> impl Iterator<Item = f64> + '_ {
        self.rounds.iter().map(|round| round.iter().sum::<f64>())
    }

    /// The least and the greatest total over the rounds, or `None` for no
    /// rounds.
    fn spread(&self) -> Option<(f64, f64)> {
        let mut totals = self.totals();
        let first = totals.next()?;
        Some(totals.fold((first, first), |(lo, hi), t| (lo.min(t), hi.max(t))))
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A relay's name on the x axis, marked when its clients spoke TLS (`--tls
/// both` gives each relay a plain and a TLS group).
fn category(row: &Row) -> String {
    if row.transport == "wss" {
        format!("{} (wss)", row.relay)
    } else {
        row.relay.clone()
    }
}

/// A value written over its bar, to two or three significant digits: no
/// decimal from 100, one from 1, two below.
fn number(value: f64) -> String {
    match value.abs() {
        v if v >= 100.0 => format!("{value:.0}"),
        v if v >= 1.0 => format!("{value:.1}"),
        _ => format!("{value:.2}"),
    }
}

/// A tick's value on the y axis: at most two decimals, and no trailing
/// zeros (`0.25`, `0.5`, `1`, `100`).
fn tick(value: f64) -> String {
    let fixed = format!("{value:.2}");
    fixed.trim_end_matches('0').trim_end_matches('.').to_owned()
}

impl Figure {
    /// The figure as an SVG document.
    pub(crate) fn render(&self) -> Result<String, ChartError> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE)?;
            let body = root.margin(8, 0, 0, 0).titled(&self.title, (FONT, 19))?;
            let areas = body.split_evenly((1, self.panels.len()));
            for (panel, area) in self.panels.iter().zip(&areas) {
                panel.draw(area)?;
            }
            root.present()?;
        }
        Ok(svg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::report::Cpu;

    /// The rows of `rounds` rounds of scenarios a, b and c with each relay,
    /// the figures varying a little from round to round.
    fn rows(relays: &[&str], rounds: usize) -> Vec<Row> {
        let mut rows = Vec::new();
        for round in 0..rounds {
            let wobble = 1.0 + 0.1 * round as f64;
            for (i, relay) in relays.iter().enumerate() {
                let base = 1.0 + i as f64;
                let row = |scenario: &str| Row {
                    scenario: scenario.into(),
                    relay: (*relay).into(),
                    transport: "ws",
                    ..Row::default()
                };
                rows.push(Row {
                    clients: 1000,
                    senders: 1,
                    latency: Some((6.0 * base * wobble, 11.0 * base, 30.0 * base)),
                    ..row("a")
                });
                rows.push(Row {
                    clients: 100,
                    senders: 10,
                    deliveries_per_s: Some(1.5e6 / base * wobble),
                    cpu: Some(Cpu {
                        server: 90.0 * base,
                        redis: vec![11.0],
                        load: 60.0,
                    }),
                    ..row("b")
                });
                rows.push(Row {
                    clients: 5000,
                    rss_per_client_kib: Some(28.0 * base * wobble),
                    kernel_per_client_kib: Some((32.0, 1.3, 25.0 * wobble)),
                    ..row("c")
                });
            }
        }
        rows
    }

    /// A folder of its own for one test, emptied first.
    fn folder(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("loadgen-chart-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Parses `path` as XML and returns its text (every `<text>`'s), after
    /// checking that the root is an `<svg>`.
    fn svg_text(path: &Path) -> (String, usize) {
        let svg = std::fs::read_to_string(path).unwrap();
        let document = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(document.root_element().tag_name().name(), "svg");
        let text: Vec<&str> = document
            .descendants()
            .filter(|node| node.has_tag_name("text"))
            .filter_map(|node| node.text())
            .map(str::trim)
            .collect();
        let dots = document
            .descendants()
            .filter(|node| node.has_tag_name("circle"))
            .count();
        (text.join("\n"), dots)
    }

    /// One round of each scenario gives the three charts, every relay named
    /// (whatever the relay is called), with no dots for rounds.
    #[test]
    fn one_round_writes_three_charts_naming_every_relay() {
        let dir = folder("one-round");
        let relays = ["redis", "redis-shared", "memory", "async"];
        let written = write_all(&rows(&relays, 1), &dir).unwrap();
        let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["latency.svg", "deliveries.svg", "memory.svg"]);
        for path in &written {
            let (text, dots) = svg_text(path);
            for relay in relays {
                assert!(
                    text.lines().any(|line| line == relay),
                    "{relay} in {path:?}"
                );
            }
            assert_eq!(dots, 0, "one round has no range to show");
        }
        let (latency, _) = svg_text(&written[0]);
        assert!(latency.contains("latency (ms)"));
        assert!(latency.contains("1,000 clients"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Three rounds draw a range: a dot per round on every bar.
    #[test]
    fn three_rounds_draw_a_dot_per_round() {
        let dir = folder("three-rounds");
        let relays = ["redis", "async"];
        let written = write_all(&rows(&relays, 3), &dir).unwrap();
        // Per relay: three bars in (a), one in each panel of (b), two in (c).
        let bars = [3, 2, 2];
        for (path, bars) in written.iter().zip(bars) {
            let (_, dots) = svg_text(path);
            assert_eq!(dots, 3 * bars * relays.len(), "{path:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A scenario that did not run has no chart, and no rows write nothing.
    #[test]
    fn missing_scenarios_are_skipped() {
        let dir = folder("missing");
        let only_b: Vec<Row> = rows(&["redis"], 1)
            .into_iter()
            .filter(|row| row.scenario == "b")
            .collect();
        let written = write_all(&only_b, &dir).unwrap();
        assert_eq!(written, [dir.join("deliveries.svg")]);
        std::fs::remove_dir_all(&dir).unwrap();

        assert!(write_all(&[], &dir).unwrap().is_empty());
        assert!(!dir.exists(), "no chart, no folder");
    }

    #[test]
    fn numbers_as_the_docs_write_them() {
        assert_eq!(thousands(5000), "5,000");
        assert_eq!(thousands(100), "100");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(100.0), "100");
        assert_eq!(tick(0.30000000000000004), "0.3");
        assert_eq!(tick(0.0), "0");
        assert_eq!(number(0.734), "0.73");
        assert_eq!(number(13.24), "13.2");
        assert_eq!(number(187.6), "188");
    }
}
