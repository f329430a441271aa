//! Pictures of a run (SVG): latency over time, throughput over time with
//! the input rate overlaid, and the latency CDF.

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

fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[(&str, &Series, RGBColor)],
) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let x_max = lines
        .iter()
        .flat_map(|(_, s, _)| s.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let y_max = max_y(&lines.iter().map(|(_, s, _)| *s).collect::<Vec<_>>());
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(path, e))?;
    for (name, s, color) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))
}

/// Writes `latency.svg`, `throughput.svg` and `cdf.svg` into `dir`.
pub fn write_plots(
    dir: &Path,
    r: &RunResult,
    schedule: Option<&Schedule>,
) -> Result<Vec<PathBuf>, PlotError> {
    let (p50, p99) = latency_series(r);
    let latency = dir.join("latency.svg");
    line_chart(
        &latency,
        "latency over time (by scheduled send time)",
        "time (s)",
        "latency (ms)",
        &[("p50", &p50, BLUE), ("p99", &p99, RED)],
    )?;
    let throughput = dir.join("throughput.svg");
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
    line_chart(
        &throughput,
        "throughput over time (by end time)",
        "time (s)",
        "events/s",
        &lines,
    )?;
    let cdf = dir.join("cdf.svg");
    line_chart(
        &cdf,
        "latency CDF",
        "latency (ms)",
        "fraction of events",
        &[("scored", &cdf_series(r), BLUE)],
    )?;
    Ok(vec![latency, throughput, cdf])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Record;

    #[test]
    fn draws_three_svgs() {
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
        let files = write_plots(dir.path(), &r, Some(&s)).unwrap();
        assert_eq!(files.len(), 3);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(text.starts_with("<svg"), "{}", f.display());
            assert!(text.contains("<polyline"), "{} has no line", f.display());
        }
    }
}
