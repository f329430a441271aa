//! Adaptive batching: a model-based controller, one per replica, that keeps
//! each request's queue + compute time under the model's latency objective
//! at the highest throughput the replica can give.
//!
//! Why a model rather than AIMD (Clipper): AIMD finds the batch size by
//! overshooting the objective and backing off 10%, so p99 rides a sawtooth
//! and every change of load starts a new search. A batch's cost on a
//! replica is close to affine in its rows, t(n) = a + b·n (a fixed launch
//! cost, b per row; BentoML's dispatcher fits the same line), and the
//! arrival rate is observable, so the controller can compute the right
//! batch at every dispatch instead of searching for it:
//! - the largest batch the most urgent request can still afford;
//! - a wait only when the arrival rate fills the batch that the load needs
//!   before that request's time runs out; otherwise run at once, so at low
//!   load latency is that of no batching;
//! - under overload, the requests that can no longer make the objective (or
//!   their own deadline) are shed before they cost compute, as Clockwork
//!   and Nexus drop early, and the rest run in the largest batches.
//!
//! The line is refit after every batch with weights that fade in time, so
//! it follows another process taking the cores or a model reload. What the
//! line cannot see (backend noise, time outside the batch) an outer loop
//! corrects: it tightens the objective the controller plans with when the
//! measured p99 overshoots, and relaxes it when there is room.

use super::batcher::{BatchPolicy, Decision, QueueView};
use super::metrics::ControllerMetrics;
use super::pressure::CpuPressure;
use super::smoothed_rate::SmoothedRate;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Evidence about one batch size halves in this time: old enough points
/// fade, so the fit follows changes, yet sizes not seen for a moment still
/// anchor the slope.
const HALF_LIFE_S: f64 = 1.0;
/// A size's evidence is capped so that a constant batch size cannot drown
/// the other sizes that give the line its slope.
const WEIGHT_CAP: f64 = 16.0;
/// A new time is taken as at most this factor away from its size's mean.
const OUTLIER: f64 = 2.0;
/// Smoothing of repeated measurements of one size.
const SIZE_EWMA: f64 = 0.25;
/// Time constant of the arrival-rate estimate.
const RATE_TAU_S: f64 = 0.1;
/// Arrival spans shorter than this say more about scheduling than load.
const RATE_MIN_SPAN: Duration = Duration::from_micros(200);
/// Capacity over the arrival rate the smallest batch run must have: a batch
/// that only just keeps up lets the queue grow on the first slow execution.
const HEADROOM: f64 = 1.1;
/// Waits aim at the batch that leaves the replica busy this share of the
/// way from the least any batch size can give (`rate · b`, all per-row
/// work) to fully busy: halfway, so twice the batch that just keeps up.
/// A replica shares the cores with the request path (the threads that
/// receive, decode and answer); run back to back in batches that only just
/// keep up, it takes the cores they need, and on a host with more runnable
/// threads than cores the scheduler then preempts it for whole time slices,
/// which is what makes requests late. Measured with the FFNN at 120% of the
/// open-loop capacity on 2 cores: aiming at the batch that just keeps up,
/// 8 runs of 12 collapsed (shedding 5 to 17%); at half-busy, 1 of 5. Where
/// batching saves nothing (`a` near 0, as for ResNet50 on CPU) this is
/// still one row, and at low load it is one row, so no wait is added.
const WAIT_BUSY_SHARE: f64 = 0.5;
/// Under CPU pressure `p` (the share of time some thread waits for a core)
/// the busy share shrinks by `(1 - p)²`: what the replica's own clock
/// cannot see, every batch's fixed cost is then paid again by a thread
/// that waited, so batches grow, up to what the objective allows. Squared
/// so that the mild pressure of a lightly loaded host (5 to 15% measured
/// with the FFNN at 10% load on 2 cores) barely moves the batch, while the
/// 50 to 65% of an overloaded one multiplies it by 8 or more.
const MIN_BUSY_SHARE: f64 = 1.0 / 64.0;
/// A shorter wait costs more than it gains: it is below what waking the
/// replica again costs. Waits end early when the rows they wait for arrive.
const MIN_WAIT_S: f64 = 20e-6;
/// The p99 correction looks at this many recent answers.
const P99_WINDOW: usize = 512;
const P99_EVERY: usize = 128;
/// The planning margin never goes below this share of the objective.
const MIN_MARGIN: f64 = 0.5;

/// The learned cost of a batch: `t(n) = a + b·n` fit over the sizes
/// actually run, or, while only one size has been seen, that point scaled
/// pessimistically (a smaller batch is assumed no cheaper, a larger one
/// proportionally dearer) until the replica has tried others.
#[derive(Debug, Clone)]
pub struct CostModel {
    max_rows: usize,
    /// Per size (index `rows - 1`): mean seconds, evidence, when updated.
    sizes: Vec<SizeStat>,
    /// Sizes with any evidence, so a refit does not scan all of them.
    seen: Vec<usize>,
    fit: Option<Fit>,
}

#[derive(Debug, Clone, Copy, Default)]
struct SizeStat {
    mean: f64,
    weight: f64,
    at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fit {
    Line { a: f64, b: f64 },
    Point { rows: f64, secs: f64 },
}

impl CostModel {
    pub fn new(max_rows: usize) -> Self {
        Self {
            max_rows: max_rows.max(1),
            sizes: vec![SizeStat::default(); max_rows.max(1)],
            seen: Vec::new(),
            fit: None,
        }
    }

    pub fn observe(&mut self, rows: usize, exec: Duration, now: Instant) {
        let rows = rows.clamp(1, self.max_rows);
        let s = &mut self.sizes[rows - 1];
        let w = faded(s, now);
        // A thread preempted mid-batch reports a time many times the usual;
        // one such sample must not swing the curve. Bounded steps still
        // follow a real change within a few batches.
        let x = match w >= 4.0 {
            true => exec.as_secs_f64().clamp(s.mean / OUTLIER, s.mean * OUTLIER),
            false => exec.as_secs_f64(),
        };
        if s.at.is_none() {
            self.seen.push(rows);
        }
        s.mean = if w < 1e-6 {
            x
        } else {
            // Average the first few exactly, then track changes.
            s.mean + (1.0 / (w + 1.0)).max(SIZE_EWMA) * (x - s.mean)
        };
        s.weight = (w + 1.0).min(WEIGHT_CAP);
        s.at = Some(now);
        self.refit(now);
    }

    fn refit(&mut self, now: Instant) {
        let (mut sw, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut distinct = 0;
        for &n in &self.seen {
            let s = &self.sizes[n - 1];
            let w = faded(s, now);
            if w < 1e-3 {
                continue;
            }
            let x = n as f64;
            distinct += 1;
            sw += w;
            sx += w * x;
            sy += w * s.mean;
            sxx += w * x * x;
            sxy += w * x * s.mean;
        }
        if sw == 0.0 {
            // Everything faded: keep the last fit rather than forget.
            return;
        }
        let (xm, ym) = (sx / sw, sy / sw);
        let var = sxx / sw - xm * xm;
        self.fit = Some(if distinct < 2 || var < 1e-9 {
            Fit::Point { rows: xm, secs: ym }
        } else {
            let b = (sxy / sw - xm * ym) / var;
            let a = ym - b * xm;
            if b <= 0.0 {
                // Larger batches measured no dearer: rows are free.
                Fit::Line { a: ym, b: 0.0 }
            } else if a < 0.0 {
                Fit::Line {
                    a: 0.0,
                    b: sxy / sxx,
                }
            } else {
                Fit::Line { a, b }
            }
        });
    }

    /// Predicted seconds for a batch of `rows`; `None` before any batch ran.
    pub fn predict(&self, rows: usize) -> Option<f64> {
        let n = rows as f64;
        self.fit.map(|f| match f {
            Fit::Line { a, b } => a + b * n,
            Fit::Point { rows, secs } => secs * (n / rows).max(1.0),
        })
    }

    /// `(a, b)` of the line, the point read as a line through the origin.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        self.fit.map(|f| match f {
            Fit::Line { a, b } => (a, b),
            Fit::Point { rows, secs } => (0.0, secs / rows),
        })
    }
}

fn faded(s: &SizeStat, now: Instant) -> f64 {
    match s.at {
        None => 0.0,
        Some(at) => {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            s.weight * 0.5f64.powf(dt / HALF_LIFE_S)
        }
    }
}

/// The outer loop: the share of the objective the controller plans with,
/// corrected from the p99 of recent answers.
#[derive(Debug, Clone)]
struct P99Tuner {
    samples: Vec<f64>,
    next: usize,
    since: usize,
    margin: f64,
}

impl P99Tuner {
    fn new() -> Self {
        Self {
            samples: Vec::with_capacity(P99_WINDOW),
            next: 0,
            since: 0,
            margin: 1.0,
        }
    }

    fn record(&mut self, secs: f64, objective: f64) {
        if self.samples.len() < P99_WINDOW {
            self.samples.push(secs);
        } else {
            self.samples[self.next] = secs;
            self.next = (self.next + 1) % P99_WINDOW;
        }
        self.since += 1;
        if self.since < P99_EVERY || self.samples.len() < P99_EVERY {
            return;
        }
        self.since = 0;
        let mut v = self.samples.clone();
        let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
        let (_, p99, _) = v.select_nth_unstable_by(i, f64::total_cmp);
        if *p99 > objective {
            self.margin = (self.margin * 0.9).max(MIN_MARGIN);
        } else if *p99 < 0.8 * objective {
            self.margin = (self.margin * 1.02).min(1.0);
        }
    }
}

/// What the controller is doing, for the log and the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Regime {
    /// No batch has run yet: take what is there.
    Learning = 0,
    /// Load is low: every request runs at once.
    Immediate = 1,
    /// Load needs batches; they form from what queued, with no wait.
    Batching = 2,
    /// Waiting for a batch that the arrival rate fills in time.
    Filling = 3,
    /// The objective bounds the batch below what queued.
    Limited = 4,
    /// The objective cannot be met: largest batches, maximum throughput.
    Saturated = 5,
    /// Rejecting requests that can no longer meet the objective.
    Shedding = 6,
}

impl Regime {
    pub fn as_str(self) -> &'static str {
        match self {
            Regime::Learning => "learning",
            Regime::Immediate => "immediate",
            Regime::Batching => "batching",
            Regime::Filling => "filling",
            Regime::Limited => "limited",
            Regime::Saturated => "saturated",
            Regime::Shedding => "shedding",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Regime::Immediate,
            2 => Regime::Batching,
            3 => Regime::Filling,
            4 => Regime::Limited,
            5 => Regime::Saturated,
            6 => Regime::Shedding,
            _ => Regime::Learning,
        }
    }
}

/// A replica controller's latest state, readable from other threads (the
/// load generator samples it; the metrics mirror it).
#[derive(Debug, Default)]
pub struct ControllerStatus {
    target_rows: AtomicU64,
    wait_ns: AtomicU64,
    fixed_s: AtomicU64,
    per_row_s: AtomicU64,
    margin: AtomicU64,
    rate: AtomicU64,
    pressure: AtomicU64,
    regime: AtomicU8,
}

/// A copy of [`ControllerStatus`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControllerSnapshot {
    pub target_rows: u64,
    pub wait: Duration,
    /// Learned cost `a + b·rows`, seconds.
    pub cost_fixed: f64,
    pub cost_per_row: f64,
    pub margin: f64,
    /// Arrival rate, rows per second.
    pub rate: f64,
    /// CPU pressure: share of recent time some thread waited for a core.
    pub cpu_pressure: f64,
    pub regime: Regime,
}

impl ControllerStatus {
    pub fn snapshot(&self) -> ControllerSnapshot {
        let f = |a: &AtomicU64| f64::from_bits(a.load(Relaxed));
        ControllerSnapshot {
            target_rows: self.target_rows.load(Relaxed),
            wait: Duration::from_nanos(self.wait_ns.load(Relaxed)),
            cost_fixed: f(&self.fixed_s),
            cost_per_row: f(&self.per_row_s),
            margin: f(&self.margin),
            rate: f(&self.rate),
            cpu_pressure: f(&self.pressure),
            regime: Regime::from_u8(self.regime.load(Relaxed)),
        }
    }
}

/// Logs the regime that dominated the last half second when it differs
/// from the one logged before: a controller that alternates between two
/// regimes at every dispatch must not flood the log, nor hide a change.
#[derive(Debug)]
struct RegimeLog {
    logged: Regime,
    counts: [u32; 7],
    since: Option<Instant>,
}

const REGIME_WINDOW: Duration = Duration::from_millis(500);

/// The adaptive batching policy of one replica.
pub struct AdaptiveBatching {
    label: String,
    max_rows: usize,
    objective: f64,
    shed_late: bool,
    cost: CostModel,
    /// Rows per second arriving at the replica.
    rate: SmoothedRate,
    tuner: P99Tuner,
    /// While filling: wake when this many rows are queued.
    fill: Option<usize>,
    pressure: CpuPressure,
    status: Arc<ControllerStatus>,
    metrics: Option<ControllerMetrics>,
    regime: RegimeLog,
}

impl AdaptiveBatching {
    /// `label` names the replica in logs; `max_rows` is the model's
    /// `max_batch_size` (1 for a model without a batch dimension).
    pub fn new(label: String, max_rows: usize, objective: Duration, shed_late: bool) -> Self {
        let status = Arc::new(ControllerStatus::default());
        status.margin.store(1f64.to_bits(), Relaxed);
        Self {
            label,
            max_rows: max_rows.max(1),
            objective: objective.as_secs_f64(),
            shed_late,
            cost: CostModel::new(max_rows),
            rate: SmoothedRate::new(RATE_TAU_S, RATE_MIN_SPAN),
            tuner: P99Tuner::new(),
            fill: None,
            pressure: CpuPressure::none(),
            status,
            metrics: None,
            regime: RegimeLog {
                logged: Regime::Learning,
                counts: [0; 7],
                since: None,
            },
        }
    }

    pub fn with_metrics(mut self, m: ControllerMetrics) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Grow batches with this CPU pressure (none by default, so tests and
    /// simulations see only what they drive).
    pub fn with_pressure(mut self, p: CpuPressure) -> Self {
        self.pressure = p;
        self
    }

    pub fn status(&self) -> Arc<ControllerStatus> {
        self.status.clone()
    }

    pub fn cost(&self) -> &CostModel {
        &self.cost
    }

    /// The batch size, continuous, whose throughput n / t(n) is exactly
    /// `rate · headroom`; infinite when no batch keeps up, 1 before any
    /// batch ran. Closed form, since it runs at every decision.
    fn keep_up(&self, rate: f64, headroom: f64) -> f64 {
        let w = rate * headroom;
        match self.cost.fit {
            None => 1.0,
            Some(Fit::Line { a, b }) if w * b < 1.0 => w * a / (1.0 - w * b),
            Some(Fit::Line { .. }) => f64::INFINITY,
            // t(n) = secs for n <= rows: n >= w·secs, if that is <= rows;
            // beyond rows the throughput stays rows/secs, too low then.
            Some(Fit::Point { rows, secs }) if w * secs <= rows => w * secs,
            Some(Fit::Point { .. }) => f64::INFINITY,
        }
    }

    /// A continuous size as whole rows within `1..=max_rows`, with a
    /// tolerance: a batch that keeps up to the last 0.1% still does.
    fn whole_rows(&self, n: f64) -> usize {
        if !n.is_finite() {
            return self.max_rows;
        }
        ((n - 1e-3).ceil().max(1.0) as usize).min(self.max_rows)
    }

    /// Smallest batch whose throughput keeps up with `rate` rows/s (with
    /// headroom); `max_rows` when none does.
    fn needed_rows(&self, rate: f64, headroom: f64) -> usize {
        self.whole_rows(self.keep_up(rate, headroom))
    }

    /// The batch to wait for: the smallest whose busy share `rate·t(n)/n`
    /// is at most `share` of the way from `rate·b` to 1, which is the batch
    /// that just keeps up divided by `share`; `share` is `WAIT_BUSY_SHARE`
    /// shrunk by CPU `pressure`.
    fn wait_rows(&self, rate: f64, pressure: f64) -> usize {
        let share = (WAIT_BUSY_SHARE * (1.0 - pressure).powi(2)).max(MIN_BUSY_SHARE);
        match self.cost.fit {
            Some(Fit::Line { .. }) => self.whole_rows(self.keep_up(rate, 1.0) / share),
            // Only one size seen: no slope, nothing to wait for.
            _ => 1,
        }
    }

    fn publish(&mut self, now: Instant, regime: Regime, target: usize, wait: f64) {
        let s = &self.status;
        s.target_rows.store(target as u64, Relaxed);
        s.wait_ns.store((wait * 1e9) as u64, Relaxed);
        s.regime.store(regime as u8, Relaxed);
        if let Some(m) = &self.metrics {
            m.target.set(target as f64);
            m.wait.set(wait);
        }
        let log = &mut self.regime;
        log.counts[regime as usize] += 1;
        let since = *log.since.get_or_insert(now);
        if now.saturating_duration_since(since) < REGIME_WINDOW {
            return;
        }
        let (top, _) = log
            .counts
            .iter()
            .enumerate()
            .max_by_key(|&(_, c)| *c)
            .expect("seven regimes");
        let dominant = Regime::from_u8(top as u8);
        log.counts = [0; 7];
        log.since = Some(now);
        if dominant != log.logged {
            tracing::info!(
                replica = %self.label,
                from = log.logged.as_str(),
                to = dominant.as_str(),
                target_rows = target,
                rate = format!("{:.0}/s", self.rate.rate()),
                "adaptive batcher changed regime"
            );
            log.logged = dominant;
        }
    }
}

/// The longest prefix of `rows` that fits `max` rows: (requests, rows).
fn prefix_fit(rows: &[usize], max: usize) -> (usize, usize) {
    let mut total = 0;
    let mut k = 0;
    for &r in rows {
        if total + r > max {
            break;
        }
        total += r;
        k += 1;
    }
    // The head alone always runs (validation bounds its rows anyway).
    if k == 0 {
        (1, rows.first().copied().unwrap_or(1))
    } else {
        (k, total)
    }
}

impl BatchPolicy for AdaptiveBatching {
    fn decide(&mut self, v: QueueView<'_>) -> Decision {
        self.fill = None;
        let rate = self.rate.update(v.now, v.arrived_rows as f64);
        self.status.rate.store(rate.to_bits(), Relaxed);
        let pressure = self.pressure.sample(v.now);
        self.status.pressure.store(pressure.to_bits(), Relaxed);
        if let Some(m) = &self.metrics {
            m.cpu_pressure.set(pressure);
        }
        let (fit, fit_rows) = prefix_fit(v.rows, self.max_rows);
        if self.cost.predict(1).is_none() {
            self.publish(v.now, Regime::Learning, fit_rows, 0.0);
            return Decision::Dispatch(fit);
        }
        let t = |n: usize| self.cost.predict(n).unwrap_or(0.0);
        let wait = |i: usize| v.waits.get(i).map_or(0.0, Duration::as_secs_f64);
        let slack = |i: usize| v.slack.get(i).copied().flatten().map(|d| d.as_secs_f64());

        // Shed only what must go. A request must go when it would miss even
        // if it ran alone now, or, once load needs batches of `target` rows
        // to keep up, when it cannot afford such a batch: running it in a
        // smaller one would cut throughput below the arrival rate and make
        // more requests late. When even an idle replica cannot meet the
        // objective (t(1) above it), shedding for it would reject
        // everything, so then only own deadlines shed.
        // The batch the load needs, once the cost curve has a slope: with
        // one size seen, the pessimistic extrapolation knows nothing of
        // what batching gains, so it must not drive waits or sheds.
        let informed = matches!(self.cost.fit, Some(Fit::Line { .. }));
        let need = if informed {
            self.needed_rows(rate, HEADROOM)
        } else {
            1
        };
        let target = need.min(fit_rows);
        let by_objective = self.shed_late && t(1) <= self.objective;
        // The batch the load needs is what a request will really run in
        // only when a backlog beyond one batch is there to prove the load;
        // otherwise (a stall, a noisy estimate) it could still run alone.
        let backlog = v.rows.len() > fit;
        let runs_in = if backlog { t(target) } else { 0.0 };
        let shed: Vec<usize> = (0..v.rows.len())
            .filter(|&i| {
                let alone = t(v.rows[i]);
                let late = wait(i) + alone.max(runs_in) > self.objective;
                (by_objective && late) || slack(i).is_some_and(|s| alone > s)
            })
            .collect();
        if !shed.is_empty() {
            self.publish(v.now, Regime::Shedding, target, 0.0);
            return Decision::Shed(shed);
        }

        // The largest prefix that the head (the most urgent request) can
        // afford: it finishes with the batch, so every member does.
        let plan = self.objective * self.tuner.margin;
        // What the head has left of `objective`, or of its own deadline.
        let head_budget =
            |objective: f64| slack(0).map_or(objective - wait(0), |s| s.min(objective - wait(0)));
        let largest_within = |objective: f64| {
            let budget = head_budget(objective);
            let (mut k, mut rows, mut total) = (0, 0, 0);
            for &r in &v.rows[..fit] {
                total += r;
                if t(total) > budget {
                    break;
                }
                k += 1;
                rows = total;
            }
            (k, rows)
        };
        let (mut k, mut rows) = largest_within(plan);
        if k == 0 {
            (k, rows) = largest_within(self.objective);
        }
        // Never below what keeps up with the load: a smaller batch would let
        // the queue grow and make every later request late. Shedding above
        // has removed those that cannot afford it.
        let (mut k_need, mut rows_need) = (0, 0);
        while k_need < fit && rows_need < target {
            rows_need += v.rows[k_need];
            k_need += 1;
        }
        if k == 0 && k_need <= 1 {
            // Late whatever we do: finish as much work as possible.
            self.publish(v.now, Regime::Saturated, fit_rows, 0.0);
            return Decision::Dispatch(fit);
        }
        if k_need > k {
            (k, rows) = (k_need, rows_need);
        }
        if k < fit {
            self.publish(v.now, Regime::Limited, rows, 0.0);
            return Decision::Dispatch(k);
        }

        // Everything compatible fits: is a larger batch worth waiting for?
        let regime = if need > 1 {
            Regime::Batching
        } else {
            Regime::Immediate
        };
        // Waiting pays only when a batch that keeps up exists and is not yet
        // here; when even the largest cannot keep up (overload) the backlog
        // forms batches by itself and a wait would only idle the replica.
        let sustainable = need < self.max_rows;
        // Once load needs batches, aim at the batch that leaves the cores
        // room (`WAIT_BUSY_SHARE`) whenever fewer rows are here, not only
        // when fewer than keep up are: a replica that runs back to back
        // finds about `need` rows queued each time it finishes, so a wait
        // that began only below `need` would never begin, and the replica
        // would stay at the fixed point, busy all the time. At low load
        // (`need` 1) nothing waits, as without batching.
        let roomy = match need > 1 {
            true => self.wait_rows(rate, pressure).max(need),
            false => need,
        };
        if rows >= roomy || !sustainable || v.more_incompatible || rate <= 0.0 {
            self.publish(v.now, regime, rows, 0.0);
            return Decision::Dispatch(k);
        }
        // Wait for that batch, or for the largest below it that fills and
        // runs before the head's time is up, if that still keeps up: with
        // `m` rows at `rate`, n fits when (n - m)/rate + a + b·n <= budget.
        let budget = head_budget(plan);
        let (a, b) = self.cost.coefficients().unwrap_or((0.0, 0.0));
        let fits = ((budget - a) * rate + rows as f64) / (1.0 + b * rate);
        let n = match fits >= 1.0 {
            true => roomy.min(fits.floor() as usize),
            false => 0,
        };
        let fill_in = n.saturating_sub(rows) as f64 / rate;
        let just = self.needed_rows(rate, 1.0);
        if n <= rows || n < just || fill_in < MIN_WAIT_S {
            self.publish(v.now, regime, rows, 0.0);
            return Decision::Dispatch(k);
        }
        self.fill = Some(n);
        self.publish(v.now, Regime::Filling, n, fill_in);
        Decision::Wait(Duration::from_secs_f64(fill_in).max(Duration::from_micros(1)))
    }

    fn wake_rows(&self) -> Option<usize> {
        self.fill
    }

    fn observe(&mut self, rows: usize, exec: Duration, now: Instant) {
        self.cost.observe(rows, exec, now);
        if let Some((a, b)) = self.cost.coefficients() {
            self.status.fixed_s.store(a.to_bits(), Relaxed);
            self.status.per_row_s.store(b.to_bits(), Relaxed);
            if let Some(m) = &self.metrics {
                m.cost_fixed.set(a);
                m.cost_per_row.set(b);
            }
        }
    }

    fn observe_latency(&mut self, latency: Duration) {
        self.tuner.record(latency.as_secs_f64(), self.objective);
        self.status
            .margin
            .store(self.tuner.margin.to_bits(), Relaxed);
        if let Some(m) = &self.metrics {
            m.margin.set(self.tuner.margin);
        }
    }

    fn deadline_order(&self) -> Option<Duration> {
        Some(Duration::from_secs_f64(self.objective))
    }
}

#[cfg(test)]
#[path = "adaptive_tests.rs"]
mod tests;
