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
            Ok::<_, RunError>(summarize(&r, warm))
        }
    };
    let mut lo: Option<(f64, Summary)> = None;
    let mut hi = None;
    let mut rate = s.start_rate;
    while rate <= s.max_rate {
        let sum = probe(rate).await?;
        let ok = sum.sustainable();
        probes.push((rate, ok));
        if !ok {
            hi = Some(rate);
            break;
        }
        lo = Some((rate, sum));
        rate *= 2.0;
    }
    let Some(mut hi) = hi else {
        let (rate, sum) = lo.expect("at least one probe");
        return Ok(Found {
            rate,
            at_rate: Some(sum),
            probes,
        });
    };
    let mut lo = lo.unwrap_or((0.0, summarize(&crate::pipeline::RunResult::empty(), 0.0)));
    while hi - lo.0 > s.tolerance * hi {
        let mid = (lo.0 + hi) / 2.0;
        let sum = probe(mid).await?;
        let ok = sum.sustainable();
        probes.push((mid, ok));
        if ok {
            lo = (mid, sum);
        } else {
            hi = mid;
        }
    }
    let at_rate = (lo.0 > 0.0).then_some(lo.1);
    Ok(Found {
        rate: lo.0,
        at_rate,
        probes,
    })
}
