//! Charts of a run's metrics (or several runs side by side), each as PNG
//! and SVG: test accuracy, test loss, epsilon spent, traffic and round
//! time per round.
//!
//! Text is drawn with DejaVu Sans, shipped in `assets/` and registered at
//! first use, so charts render the same on machines without system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result};
use fedveil_proto::metrics::{RoundCosts, RoundMetrics};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Pixel size of every chart.
pub const CHART_SIZE: (u32, u32) = (960, 600);

/// The font family every chart uses (registered from the bundled file).
const FONT: &str = "sans-serif";

/// One run to draw: its name (legend and titles) and its rounds.
#[derive(Debug, Clone)]
pub struct Run {
    /// The run's name, in legends.
    pub name: String,
    /// Its rounds.
    pub metrics: Vec<RoundMetrics>,
}

impl Run {
    /// Reads `metrics.jsonl` and `costs.jsonl` from a results directory;
    /// the run is named after the directory. Without a costs file (runs
    /// from before it existed kept costs in `metrics.jsonl`), costs are
    /// what the metrics lines say.
    pub fn load(dir: &Path) -> Result<Self> {
        let mut metrics: Vec<RoundMetrics> = read_jsonl(&dir.join("metrics.jsonl"))?;
        let costs_path = dir.join("costs.jsonl");
        if costs_path.exists() {
            for costs in read_jsonl::<RoundCosts>(&costs_path)? {
                if let Some(m) = metrics.iter_mut().find(|m| m.round == costs.round) {
                    m.set_costs(&costs);
                }
            }
        }
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Self { name, metrics })
    }
}

/// One record per non-empty line; errors name the file and line.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (is it a results directory?)",
            path.display()
        )
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

/// A named line of (round, value) points.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// One chart: what it shows and its lines.
struct Chart {
    file: &'static str,
    title: String,
    y_label: &'static str,
    series: Vec<Series>,
    /// Where the legend stays clear of the lines (rising or falling).
    legend: SeriesLabelPosition,
    /// Quantities (bytes, seconds, epsilon) start their axis at zero, so
    /// small differences are not drawn as large ones.
    from_zero: bool,
}

/// Draws every chart that has data for `runs` into `dir`, as
/// `NAME.png` and `NAME.svg`; returns the files written.
pub fn plot_runs(dir: &Path, runs: &[Run]) -> Result<Vec<PathBuf>> {
    register_font();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let heading = runs
        .iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(" vs ");
    let mut files = Vec::new();
    for chart in charts(&heading, runs) {
        if chart.series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        let png = dir.join(format!("{}.png", chart.file));
        let svg = dir.join(format!("{}.svg", chart.file));
        draw(
            BitMapBackend::new(&png, CHART_SIZE).into_drawing_area(),
            &chart,
        )
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", png.display()))?;
        draw(
            SVGBackend::new(&svg, CHART_SIZE).into_drawing_area(),
            &chart,
        )
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", svg.display()))?;
        files.extend([png, svg]);
    }
    Ok(files)
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        )
        .unwrap_or_else(|_| panic!("the bundled DejaVu Sans is a valid font"));
    });
}

/// The charts for `runs`: one line per run, except traffic for a single
/// run, which shows up and down separately.
fn charts(heading: &str, runs: &[Run]) -> Vec<Chart> {
    let per_run = |f: &dyn Fn(&RoundMetrics) -> Option<f64>| -> Vec<Series> {
        runs.iter()
            .map(|run| Series {
                name: run.name.clone(),
                points: run
                    .metrics
                    .iter()
                    .filter_map(|m| f(m).map(|v| (m.round as f64, v)))
                    .filter(|(_, v)| v.is_finite())
                    .collect(),
            })
            .collect()
    };
    const MB: f64 = 1e6;
    let traffic = if let [run] = runs {
        let line = |name: &str, f: fn(&RoundMetrics) -> u64| Series {
            name: name.to_owned(),
            points: run
                .metrics
                .iter()
                .map(|m| (m.round as f64, f(m) as f64 / MB))
                .collect(),
        };
        vec![
            line("up (clients to server)", |m| m.bytes_up),
            line("down (server to clients)", |m| m.bytes_down),
        ]
    } else {
        per_run(&|m| Some((m.bytes_up + m.bytes_down) as f64 / MB))
    };
    // A regression (no run reports accuracy) charts its absolute error.
    let regression = runs
        .iter()
        .flat_map(|r| &r.metrics)
        .all(|m| m.accuracy.is_none() && m.mae.is_some())
        && runs.iter().any(|r| !r.metrics.is_empty());
    let score = if regression {
        Chart {
            file: "mae",
            title: format!("{heading}: test mean absolute error"),
            y_label: "MAE (target units)",
            series: per_run(&|m| m.mae.map(f64::from)),
            legend: SeriesLabelPosition::UpperRight,
            from_zero: true,
        }
    } else {
        Chart {
            file: "accuracy",
            title: format!("{heading}: test accuracy"),
            y_label: "accuracy (fraction of the test set)",
            series: per_run(&|m| m.accuracy.map(f64::from)),
            legend: SeriesLabelPosition::LowerRight,
            from_zero: false,
        }
    };
    vec![
        score,
        Chart {
            file: "loss",
            title: format!("{heading}: test loss"),
            y_label: if regression {
                "loss (mean squared error)"
            } else {
                "loss (mean cross-entropy, nats)"
            },
            series: per_run(&|m| Some(f64::from(m.loss))),
            legend: SeriesLabelPosition::UpperRight,
            from_zero: false,
        },
        Chart {
            file: "epsilon",
            title: format!("{heading}: privacy spent"),
            y_label: "epsilon (at the run's delta)",
            series: per_run(&|m| m.epsilon),
            legend: SeriesLabelPosition::LowerRight,
            from_zero: true,
        },
        Chart {
            file: "bytes",
            title: format!("{heading}: traffic per round"),
            y_label: "MB per round",
            series: traffic,
            legend: SeriesLabelPosition::UpperRight,
            from_zero: true,
        },
        Chart {
            file: "round_time",
            title: format!("{heading}: round time"),
            y_label: "seconds per round",
            series: per_run(&|m| Some(m.round_secs)),
            legend: SeriesLabelPosition::UpperRight,
            from_zero: true,
        },
    ]
}

/// `lo..hi` with a margin, never empty.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - pad)..(hi + pad)
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: &Chart,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (x_max, y_lo, y_hi) = points().fold(
        (1.0f64, f64::INFINITY, f64::NEG_INFINITY),
        |(x, lo, hi), &(px, py)| (x.max(px), lo.min(py), hi.max(py)),
    );
    let y_range = if chart.from_zero {
        0.0..padded(0.0, y_hi).end
    } else {
        padded(y_lo, y_hi)
    };
    let mut ctx = ChartBuilder::on(&root)
        .caption(&chart.title, (FONT, 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.5..x_max + 0.5, y_range)?;
    ctx.configure_mesh()
        .x_desc("round")
        .x_labels(x_max.min(12.0) as usize + 1)
        .x_label_formatter(&|x| {
            // Rounds are whole numbers.
            if x.fract() == 0.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_desc(chart.y_label)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()?;
    for (i, series) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        ctx.draw_series(LineSeries::new(
            series.points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(series.name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        ctx.draw_series(
            series
                .points
                .iter()
                .map(|&p| Circle::new(p, 3, color.filled())),
        )?;
    }
    ctx.configure_series_labels()
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(chart.legend.clone())
        .draw()?;
    root.present()
}

#[cfg(test)]
mod tests;
