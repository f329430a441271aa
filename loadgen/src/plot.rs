//! Pictures of a run, as SVG and PNG: latency over time, throughput over
//! time with the input rate overlaid, and the latency CDF. Text needs a
//! TrueType font: DejaVu Sans from Debian's fonts-dejavu-core, which
//! scripts/setup.sh installs.

use crate::event::Outcome;
use crate::pipeline::RunResult;
use crate::schedule::Schedule;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Windows the time series are drawn in.
const WINDOW: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {reason}")]
pub struct PlotError {
    path: String,
    reason: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

type Series = Vec<(f64, f64)>;

/// p50 and p99 latency (ms) per window, by scheduled time.
fn latency_series(r: &RunResult) -> (Series, Series) {
    let w = WINDOW.as_nanos() as u64;
    let n = (r.duration.as_nanos() as u64).div_ceil(w) as usize;
    let mut hs: Vec<Histogram<u64>> = (0..n)
        .map(|_| Histogram::new(3).expect("sigfig 3"))
        .collect();
    for rec in r.records.iter().filter(|x| x.outcome == Outcome::Scored) {
        if let Some(h) = hs.get_mut((rec.scheduled_ns / w) as usize) {
            let _ = h.record((rec.latency_ns / 1_000).max(1));
        }
    }
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for (i, h) in hs.iter().enumerate().filter(|(_, h)| !h.is_empty()) {
        let t = (i as f64 + 0.5) * WINDOW.as_secs_f64();
        p50.push((t, h.value_at_quantile(0.5) as f64 / 1e3));
        p99.push((t, h.value_at_quantile(0.99) as f64 / 1e3));
    }
    (p50, p99)
}

/// Scored events per second per window, by end time.
fn throughput_series(r: &RunResult) -> Series {
    let w = WINDOW.as_nanos() as u64;
    let end = r
        .records
        .iter()
        .map(|x| x.scheduled_ns + x.latency_ns)
        .max()
        .unwrap_or(0);
    let mut counts = vec![0u64; (end / w + 1) as usize];
    for rec in r.records.iter().filter(|x| x.outcome == Outcome::Scored) {
        counts[((rec.scheduled_ns + rec.latency_ns) / w) as usize] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            (
                (i as f64 + 0.5) * WINDOW.as_secs_f64(),
                c as f64 / WINDOW.as_secs_f64(),
            )
        })
        .collect()
}

fn cdf_series(r: &RunResult) -> Series {
    let mut lat: Vec<u64> = r
        .records
        .iter()
        .filter(|x| x.outcome == Outcome::Scored)
        .map(|x| x.latency_ns)
        .collect();
    lat.sort_unstable();
    let n = lat.len().max(1) as f64;
    let step = (lat.len() / 2000).max(1);
    lat.iter()
        .enumerate()
        .step_by(step)
        .map(|(i, &l)| (l as f64 / 1e6, (i + 1) as f64 / n))
        .collect()
}

fn max_y(series: &[&Series]) -> f64 {
    series
        .iter()
        .flat_map(|s| s.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.1
}

/// DejaVu Sans, where Debian puts it.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers the font once; false when it is not installed.
fn font() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| match std::fs::read(FONT) {
        // plotters keeps fonts for the process's life: leaking is the API.
        Ok(bytes) => plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .is_ok(),
        Err(_) => false,
    })
}

struct Chart<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    lines: &'a [(&'a str, &'a Series, RGBColor)],
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    c: &Chart<'_>,
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let x_max = c
        .lines
        .iter()
        .flat_map(|(_, s, _)| s.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let y_max = max_y(&c.lines.iter().map(|(_, s, _)| *s).collect::<Vec<_>>());
    let mut chart = ChartBuilder::on(&root)
        .caption(c.title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(c.x_label)
        .y_desc(c.y_label)
        .draw()
        .map_err(|x| e(&x))?;
    for (name, s, color) in c.lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// Draws one chart as `<stem>.svg` and `<stem>.png`.
fn line_chart(
    dir: &Path,
    stem: &str,
    c: &Chart<'_>,
    out: &mut Vec<PathBuf>,
) -> Result<(), PlotError> {
    let svg = dir.join(format!("{stem}.svg"));
    draw(SVGBackend::new(&svg, (900, 500)).into_drawing_area(), c).map_err(|e| err(&svg, e))?;
    out.push(svg);
    let png = dir.join(format!("{stem}.png"));
    draw(BitMapBackend::new(&png, (900, 500)).into_drawing_area(), c).map_err(|e| err(&png, e))?;
    out.push(png);
    Ok(())
}

/// Writes `latency`, `throughput` and `cdf` charts into `dir`, each as SVG
/// and PNG; returns the files written.
pub fn write_plots(
    dir: &Path,
    r: &RunResult,
    schedule: Option<&Schedule>,
) -> Result<Vec<PathBuf>, PlotError> {
    if !font() {
        return Err(err(
            Path::new(FONT),
            "font missing: install Debian's fonts-dejavu-core (scripts/setup.sh does)",
        ));
    }
    let mut out = Vec::new();
    let (p50, p99) = latency_series(r);
    let chart = Chart {
        title: "latency over time (by scheduled send time)",
        x_label: "time (s)",
        y_label: "latency (ms)",
        lines: &[("p50", &p50, BLUE), ("p99", &p99, RED)],
    };
    line_chart(dir, "latency", &chart, &mut out)?;
    let served = throughput_series(r);
    let input: Series = schedule
        .map(|s| {
            (0..(r.duration.as_secs_f64() / WINDOW.as_secs_f64()) as usize)
                .map(|i| {
                    let t = (i as f64 + 0.5) * WINDOW.as_secs_f64();
                    (t, s.rate_at(Duration::from_secs_f64(t)))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut lines = vec![("scored ev/s", &served, BLUE)];
    if !input.is_empty() {
        lines.push(("input rate ev/s", &input, RED));
    }
    let chart = Chart {
        title: "throughput over time (by end time)",
        x_label: "time (s)",
        y_label: "events/s",
        lines: &lines,
    };
    line_chart(dir, "throughput", &chart, &mut out)?;
    let cdf = cdf_series(r);
    let chart = Chart {
        title: "latency CDF",
        x_label: "latency (ms)",
        y_label: "fraction of events",
        lines: &[("scored", &cdf, BLUE)],
    };
    line_chart(dir, "cdf", &chart, &mut out)?;
    Ok(out)
}

/// The batching benchmark's timeline: the input rate, p99 of adaptive
/// against the best single static setting and no batching, and the
/// adaptive controllers' target batch size, each over time.
pub fn write_batching_plots(
    dir: &Path,
    rep: &crate::batching::BenchReport,
    cfg: &crate::batching::BenchConfig,
) -> Result<Vec<PathBuf>, PlotError> {
    if !font() {
        return Err(err(
            Path::new(FONT),
            "font missing: install fonts-dejavu-core",
        ));
    }
    let schedule = Schedule::Phased {
        phases: cfg
            .phases
            .iter()
            .map(|&(share, secs)| {
                (
                    share * rep.capacity_rows_per_s,
                    Duration::from_secs_f64(secs),
                )
            })
            .collect(),
        burst: cfg.burst,
    };
    let len = schedule.length().unwrap_or_default().as_secs_f64();
    let rate: Series = (0..(len / 0.05) as usize)
        .map(|i| {
            let t = i as f64 * 0.05;
            (t, schedule.rate_at(Duration::from_secs_f64(t)))
        })
        .collect();
    let mut out = Vec::new();
    line_chart(
        dir,
        "batching_rate",
        &Chart {
            title: &format!("{}: input rate", rep.model),
            x_label: "time (s)",
            y_label: "requests/s",
            lines: &[("input rate", &rate, BLACK)],
        },
        &mut out,
    )?;
    let empty = Vec::new();
    let adaptive = rep.adaptive().map_or(&empty, |r| &r.p99_series);
    let best = rep.best_static();
    let best_p99 = best.map_or(&empty, |r| &r.p99_series);
    let none = rep
        .results
        .iter()
        .find(|r| matches!(r.setting, crate::batching::Setting::None))
        .map_or(&empty, |r| &r.p99_series);
    let objective: Series = vec![(0.0, rep.objective_ms), (len, rep.objective_ms)];
    let best_label = format!("p99 {}", best.map_or("", |b| b.label.as_str()));
    line_chart(
        dir,
        "batching_p99",
        &Chart {
            title: &format!(
                "{}: p99 per 100 ms (shed windows at 2x objective)",
                rep.model
            ),
            x_label: "time (s)",
            y_label: "p99 (ms)",
            lines: &[
                ("p99 adaptive", adaptive, BLUE),
                (&best_label, best_p99, RED),
                ("p99 no batching", none, GREEN),
                ("objective", &objective, BLACK),
            ],
        },
        &mut out,
    )?;
    let targets = rep.adaptive().map_or(&empty, |r| &r.targets);
    line_chart(
        dir,
        "batching_target",
        &Chart {
            title: &format!("{}: adaptive target batch size", rep.model),
            x_label: "time (s)",
            y_label: "rows",
            lines: &[("target rows", targets, BLUE)],
        },
        &mut out,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Record;

    #[test]
    fn draws_three_charts_as_svg_and_png() {
        let records: Vec<Record> = (0..2000u64)
            .map(|i| Record {
                scheduled_ns: i * 1_000_000,
                latency_ns: 1_000_000 + (i % 50) * 20_000,
                outcome: Outcome::Scored,
            })
            .collect();
        let mut r = RunResult::empty();
        r.records = records;
        r.produced = 2000;
        r.duration = Duration::from_secs(2);
        let dir = tempfile::tempdir().unwrap();
        let s = Schedule::Constant { rate: 1000.0 };
        assert!(
            Path::new(FONT).exists(),
            "{FONT} is missing: run scripts/setup.sh (Debian fonts-dejavu-core)"
        );
        let files = write_plots(dir.path(), &r, Some(&s)).unwrap();
        assert_eq!(files.len(), 6, "{files:?}");
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            if f.extension().is_some_and(|e| e == "png") {
                assert!(bytes.starts_with(b"\x89PNG"), "{}", f.display());
                assert!(bytes.len() > 5_000, "{} is nearly empty", f.display());
            } else {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.starts_with("<svg"), "{}", f.display());
                assert!(text.contains("<polyline"), "{} has no line", f.display());
            }
        }
    }
}
