//! The sustainable-throughput search: the highest constant input rate the
//! processor serves in full with a bounded backlog and stable latency.
//!
//! Doubling from a low rate until a run is not sustainable brackets the
//! capacity; bisection then narrows the bracket to `tolerance`. Each probe
//! is a full open-loop run of `probe` duration, judged by
//! [`Summary::sustainable`].

use crate::analyze::{summarize, Summary};
use crate::pipeline::{run_on, Experiment, Load, RunError, Transport};
use crate::schedule::Schedule;
use crate::scorer::Scorer;

#[derive(Debug, Clone)]
pub struct Search {
    pub start_rate: f64,
    pub max_rate: f64,
    /// Stop when the bracket is narrower than this fraction of its top.
    pub tolerance: f64,
    pub warmup_fraction: f64,
}

impl Default for Search {
    fn default() -> Self {
        Self {
            start_rate: 100.0,
            max_rate: 2_000_000.0,
            tolerance: 0.05,
            warmup_fraction: 0.25,
        }
    }
}

/// The search's answer and the probes that led to it.
#[derive(Debug, Clone)]
pub struct Found {
    pub rate: f64,
    /// The summary of the run at `rate`.
    pub at_rate: Option<Summary>,
    /// That run's events, for its report and plots.
    pub run: Option<crate::pipeline::RunResult>,
    pub probes: Vec<(f64, bool)>,
}

pub async fn search(base: &Experiment, scorer: &Scorer, s: &Search) -> Found {
    search_on(base, scorer, s, &Transport::Memory)
        .await
        .expect("in-memory topics cannot fail to set up")
}

pub async fn search_on(
    base: &Experiment,
    scorer: &Scorer,
    s: &Search,
    transport: &Transport,
) -> Result<Found, RunError> {
    let mut probes = Vec::new();
    let probe = |rate: f64| {
        let mut exp = base.clone();
        exp.load = Load::Open(Schedule::Constant { rate });
        let scorer = scorer.clone();
        let warm = s.warmup_fraction;
        async move {
            let r = run_on(&exp, scorer, transport).await?;
            Ok::<_, RunError>((summarize(&r, warm), r))
        }
    };
    let mut lo: Option<(f64, Summary, crate::pipeline::RunResult)> = None;
    let mut hi = None;
    let mut rate = s.start_rate;
    while rate <= s.max_rate {
        let (sum, r) = probe(rate).await?;
        let ok = sum.sustainable();
        probes.push((rate, ok));
        if !ok {
            hi = Some(rate);
            break;
        }
        lo = Some((rate, sum, r));
        rate *= 2.0;
    }
    let Some(mut hi) = hi else {
        let (rate, sum, r) = lo.expect("at least one probe");
        return Ok(Found {
            rate,
            at_rate: Some(sum),
            run: Some(r),
            probes,
        });
    };
    let empty = crate::pipeline::RunResult::empty();
    let mut lo = lo.unwrap_or_else(|| (0.0, summarize(&empty, 0.0), empty));
    while hi - lo.0 > s.tolerance * hi {
        let mid = (lo.0 + hi) / 2.0;
        let (sum, r) = probe(mid).await?;
        let ok = sum.sustainable();
        probes.push((mid, ok));
        if ok {
            lo = (mid, sum, r);
        } else {
            hi = mid;
        }
    }
    let found = lo.0 > 0.0;
    Ok(Found {
        rate: lo.0,
        at_rate: found.then_some(lo.1),
        run: found.then_some(lo.2),
        probes,
    })
}
