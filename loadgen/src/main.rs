//! The `shoal-loadgen` binary.

use anyhow::Context;
use clap::Parser;
use shoal_loadgen::{analyze, experiment, report, scorer_for, sustain, Cli, Command};

// The server's allocator, so the embedded engine runs as it does in shoal.
#[global_allocator]
static GLOBAL: shoal::alloc::Mimalloc = shoal::alloc::Mimalloc;

/// Draws a progress bar on stderr (only when it is a terminal) with the
/// run's rate, backlog and recent p99, until aborted.
fn progress_bar(
    secs: f64,
    live: std::sync::Arc<shoal_loadgen::progress::Live>,
) -> tokio::task::JoinHandle<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = ProgressBar::new((secs * 10.0) as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {elapsed}/{len} {msg}") {
        bar.set_style(style.with_key(
            "len",
            move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{secs:.0}s");
            },
        ));
    }
    tokio::spawn(async move {
        let start = std::time::Instant::now();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            let elapsed = start.elapsed();
            let snap = live.snapshot(elapsed);
            bar.set_position((elapsed.as_secs_f64() * 10.0) as u64);
            bar.set_message(shoal_loadgen::progress::Live::message(&snap));
            if elapsed.as_secs_f64() > secs + 60.0 {
                break;
            }
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let ok = match cli.command {
        Command::Run(o) => {
            let load = o.load().map_err(anyhow::Error::msg)?;
            let setup = scorer_for(o.mode, &o.model).await?;
            let mut exp = experiment(&o.model, o.mp, o.duration, load);
            if let Some(path) = &o.model.npy {
                let data = shoal_loadgen::npy::payloads(path, &o.model.isz, o.model.bsz)?;
                exp.data = Some(std::sync::Arc::new(data));
            }
            eprintln!(
                "running {} for {:.0} s, mp={}, model {} ({:?} x {})",
                o.mode.as_str(),
                o.duration,
                exp.mp,
                o.model.model,
                o.model.isz,
                o.model.bsz
            );
            // Earlier repetitions only feed the spread; the last one is
            // reported in full.
            let mut summaries = Vec::new();
            for i in 1..o.repeat.max(1) {
                let r = shoal_loadgen::pipeline::run_on(
                    &exp,
                    setup.scorer.clone(),
                    &o.model.transport(),
                )
                .await?;
                let s = analyze::summarize(&r, o.model.warmup);
                println!(
                    "run {i}: throughput {:.0} ev/s, p50 {:.3} ms, p99 {:.3} ms, reconciled {}",
                    s.throughput,
                    s.p50_us / 1e3,
                    s.p99_us / 1e3,
                    s.reconciled
                );
                summaries.push(s);
            }
            let live = std::sync::Arc::new(shoal_loadgen::progress::Live::default());
            let bar = progress_bar(o.duration, live.clone());
            let result = shoal_loadgen::pipeline::run_live(
                &exp,
                setup.scorer.clone(),
                &o.model.transport(),
                Some(live),
            )
            .await?;
            bar.abort();
            let s = analyze::summarize(&result, o.model.warmup);
            summaries.push(s.clone());
            if summaries.len() > 1 {
                let col = |f: fn(&analyze::Summary) -> f64| {
                    analyze::spread(&summaries.iter().map(f).collect::<Vec<_>>())
                };
                let (t, ts) = col(|s| s.throughput);
                let (p50, p50s) = col(|s| s.p50_us / 1e3);
                let (p99, p99s) = col(|s| s.p99_us / 1e3);
                println!(
                    "over {} runs: throughput {t:.0} ± {ts:.0} ev/s, p50 {p50:.3} ± {p50s:.3} ms, p99 {p99:.3} ± {p99s:.3} ms",
                    summaries.len()
                );
            }
            println!("{}", report::summary_table(&s));
            println!(
                "end time: {}",
                match s.end_time {
                    shoal_loadgen::pipeline::EndTime::LogAppendTime => "the broker's LogAppendTime",
                    shoal_loadgen::pipeline::EndTime::SinkReceive => "the sink's receive time",
                }
            );
            println!("{}", s.reconciliation_line());
            let bursts = match &exp.load {
                shoal_loadgen::pipeline::Load::Open(schedule) => {
                    analyze::burst_recovery(&result, schedule)
                }
                _ => Vec::new(),
            };
            for b in &bursts {
                println!(
                    "burst {:.1}-{:.1} s: p99 before {:.3} ms, recovered {}",
                    b.burst_start_s,
                    b.burst_end_s,
                    b.baseline_p99_us / 1e3,
                    b.recovery_s
                        .map_or("not before the next burst".to_string(), |t| format!(
                            "{t:.1} s after it"
                        ))
                );
            }
            if let Some(dir) = &o.model.out {
                std::fs::create_dir_all(dir)?;
                let path = dir.join("report.json");
                let json = serde_json::json!({"summary": s, "bursts": bursts});
                std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
                    .with_context(|| path.display().to_string())?;
                let csv = dir.join("latencies.csv");
                let mut text = String::from("scheduled_ns,latency_ns,outcome\n");
                for r in &result.records {
                    text.push_str(&format!(
                        "{},{},{}\n",
                        r.scheduled_ns,
                        r.latency_ns,
                        r.outcome.as_str()
                    ));
                }
                std::fs::write(&csv, text).with_context(|| csv.display().to_string())?;
                let schedule = match &exp.load {
                    shoal_loadgen::pipeline::Load::Open(s) => Some(s),
                    _ => None,
                };
                match shoal_loadgen::plot::write_plots(dir, &result, schedule) {
                    Ok(plots) => eprintln!(
                        "report: {}, {} and {} plots",
                        path.display(),
                        csv.display(),
                        plots.len()
                    ),
                    // The figures and the report stand without pictures.
                    Err(e) => eprintln!(
                        "report: {} and {}; no plots: {e}",
                        path.display(),
                        csv.display()
                    ),
                }
            }
            summaries.iter().all(|s| s.reconciled)
        }
        Command::Compare(o) => {
            let mut rows = Vec::new();
            let mut reconciled = true;
            let data = match &o.model.npy {
                Some(path) => Some(std::sync::Arc::new(shoal_loadgen::npy::payloads(
                    path,
                    &o.model.isz,
                    o.model.bsz,
                )?)),
                None => None,
            };
            let models: Vec<String> = std::iter::once(o.model.model.clone())
                .chain(o.also_models.iter().cloned())
                .collect();
            let label = |mode: shoal_loadgen::Mode, model: &str| {
                if o.also_models.is_empty() {
                    mode.as_str().to_string()
                } else {
                    format!("{} {model}", mode.as_str())
                }
            };
            for (model, &mode) in models
                .iter()
                .flat_map(|m| o.modes.iter().map(move |mode| (m, mode)))
            {
                let opts = shoal_loadgen::ModelOpts {
                    model: model.clone(),
                    ..o.model.clone()
                };
                let setup = scorer_for(mode, &opts).await?;
                for &mp in &o.mp {
                    let mut base = experiment(
                        &opts,
                        mp,
                        o.probe_seconds,
                        shoal_loadgen::pipeline::Load::Closed,
                    );
                    base.data = data.clone();
                    let found = sustain::search_on(
                        &base,
                        &setup.scorer,
                        &sustain::Search::default(),
                        &opts.transport(),
                    )
                    .await?;
                    eprintln!(
                        "{} mp={mp}: sustainable {:.0} ev/s after {} probes",
                        label(mode, model),
                        found.rate,
                        found.probes.len()
                    );
                    if let Some(s) = &found.at_rate {
                        reconciled &= s.reconciled;
                    }
                    // Each configuration's run at its sustainable rate gets
                    // its own report and plots.
                    if let (Some(dir), Some(run), Some(s)) =
                        (&o.model.out, &found.run, &found.at_rate)
                    {
                        let sub =
                            dir.join(format!("{}-mp{mp}", label(mode, model).replace(' ', "-")));
                        std::fs::create_dir_all(&sub)?;
                        let json = serde_json::json!({"summary": s, "bursts": []});
                        std::fs::write(sub.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
                        let schedule =
                            shoal_loadgen::schedule::Schedule::Constant { rate: found.rate };
                        if let Err(e) = shoal_loadgen::plot::write_plots(&sub, run, Some(&schedule))
                        {
                            eprintln!("no plots for {}: {e}", sub.display());
                        }
                    }
                    rows.push(report::CompareRow {
                        mode: label(mode, model),
                        mp,
                        sustainable_rate: found.rate,
                        summary: found.at_rate,
                    });
                }
            }
            println!("{}", report::compare_table(&rows));
            if let Some(dir) = &o.model.out {
                std::fs::create_dir_all(dir)?;
                std::fs::write(dir.join("compare.json"), serde_json::to_vec_pretty(&rows)?)?;
            }
            reconciled
        }
        Command::Batching(o) => {
            let cfg = o.config().map_err(anyhow::Error::msg)?;
            let rep = shoal_loadgen::batching::bench(&cfg, |line| eprintln!("{line}")).await?;
            println!("{}", rep.markdown());
            if let Some(dir) = &o.out {
                std::fs::create_dir_all(dir)?;
                std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&rep)?)?;
                std::fs::write(dir.join("report.md"), rep.markdown())?;
                match shoal_loadgen::plot::write_batching_plots(dir, &rep, &cfg) {
                    Ok(files) => eprintln!("plots: {}", files.len()),
                    Err(e) => eprintln!("no plots: {e}"),
                }
            }
            true
        }
    };
    if !ok {
        anyhow::bail!("reconciliation failed: produced != scored + failed");
    }
    Ok(())
}
