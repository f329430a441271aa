//! The controller alone, on a simulated replica with a known cost
//! (2 ms + 0.1 ms per row) and synthetic arrivals, driven by tokio's paused
//! clock: time only moves when every task waits, so the runs are exact and
//! repeatable, never timing-flaky.

use super::*;
use std::collections::VecDeque;
use tokio::time::{self, Instant as TInstant};

const MAX: usize = 64;
const OBJECTIVE: Duration = Duration::from_millis(20);

fn cost(rows: usize) -> Duration {
    Duration::from_micros(2000 + 100 * rows as u64)
}

/// Rows per second at the largest batch: the replica's capacity.
fn capacity() -> f64 {
    MAX as f64 / cost(MAX).as_secs_f64()
}

/// The batch size at which a replica that runs whatever queued keeps up
/// with `rate`: n = rate·t(n), so n = rate·a / (1 − rate·b).
fn fixed_point(rate: f64) -> f64 {
    rate * 0.002 / (1.0 - rate * 0.0001)
}

/// The batch a wait aims at: busy halfway from `rate·b` to fully busy,
/// twice the fixed point.
fn half_busy(rate: f64) -> f64 {
    fixed_point(rate) / WAIT_BUSY_SHARE
}

fn policy() -> AdaptiveBatching {
    AdaptiveBatching::new("sim".into(), MAX, OBJECTIVE, true)
}

#[derive(Default, Debug)]
struct Outcome {
    /// (start of the batch, rows), seconds since the start.
    batches: Vec<(f64, usize)>,
    /// (arrival, queue + compute), seconds.
    served: Vec<(f64, f64)>,
    /// Arrival of each shed request, seconds.
    shed: Vec<f64>,
}

impl Outcome {
    fn served_in(&self, from: f64, to: f64) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .served
            .iter()
            .filter(|(a, _)| (from..to).contains(a))
            .map(|&(_, l)| l)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    fn quantile(&self, from: f64, to: f64, q: f64) -> f64 {
        let v = self.served_in(from, to);
        assert!(!v.is_empty(), "nothing served in [{from}, {to})");
        v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
    }

    fn mean_batch(&self, from: f64, to: f64) -> f64 {
        let b: Vec<usize> = self
            .batches
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|&(_, n)| n)
            .collect();
        b.iter().sum::<usize>() as f64 / b.len().max(1) as f64
    }

    fn shed_in(&self, from: f64, to: f64) -> usize {
        self.shed.iter().filter(|a| (from..to).contains(*a)).count()
    }
}

/// Evenly spaced arrivals: (rate per second, duration in seconds) phases.
fn steady(phases: &[(f64, f64)]) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut start = 0.0;
    for &(rate, secs) in phases {
        let mut t = start;
        while t < start + secs {
            out.push(Duration::from_secs_f64(t));
            t += 1.0 / rate;
        }
        start += secs;
    }
    out
}

/// Poisson arrivals at `rate` for `secs`, from a fixed seed.
fn poisson(rate: f64, secs: f64, mut seed: u64) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        // xorshift64*: enough randomness for exponential gaps.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        let u = (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        t += -(1.0 - u).ln() / rate;
        if t >= secs {
            return out;
        }
        out.push(Duration::from_secs_f64(t));
    }
}

/// Runs a replica with `policy` over `arrivals` (one row each): a
/// discrete-event loop on tokio's paused clock, which it moves exactly
/// (`time::advance`) to the next arrival, the end of a batch (`cost(rows)`)
/// or the end of a wait.
async fn simulate(policy: &mut AdaptiveBatching, arrivals: Vec<Duration>) -> Outcome {
    let start = TInstant::now();
    let at = |i: usize| start + arrivals[i];
    let secs = |t: TInstant| t.duration_since(start).as_secs_f64();
    let mut queue: VecDeque<TInstant> = VecDeque::new();
    let mut next = 0;
    let mut out = Outcome::default();
    loop {
        let now = TInstant::now();
        while next < arrivals.len() && at(next) <= now {
            queue.push_back(at(next));
            next += 1;
        }
        if queue.is_empty() {
            if next == arrivals.len() {
                break;
            }
            time::advance(at(next) - now).await;
            continue;
        }
        let rows = vec![1; queue.len()];
        let waits: Vec<Duration> = queue.iter().map(|&a| now - a).collect();
        let slack = vec![None; rows.len()];
        let view = QueueView {
            now: now.into_std(),
            rows: &rows,
            waits: &waits,
            slack: &slack,
            oldest_wait: waits[0],
            more_incompatible: false,
            arrived_rows: next as u64,
        };
        match policy.decide(view) {
            Decision::Dispatch(n) => {
                assert!(n >= 1 && n <= rows.len());
                out.batches.push((secs(now), n));
                let batch: Vec<TInstant> = queue.drain(..n).collect();
                time::advance(cost(n)).await;
                let done = TInstant::now();
                policy.observe(n, cost(n), done.into_std());
                for a in batch {
                    policy.observe_latency(done - a);
                    out.served.push((secs(a), (done - a).as_secs_f64()));
                }
            }
            Decision::Wait(d) => {
                assert!(d > Duration::ZERO);
                // Woken early by the arrival that brings the queue to the
                // policy's wake-up size (any arrival when it names none).
                let wake_rows = policy.wake_rows().unwrap_or(0).max(queue.len() + 1);
                let filler = next + (wake_rows - queue.len()) - 1;
                let until = match filler < arrivals.len() && at(filler) < now + d {
                    true => at(filler),
                    false => now + d,
                };
                time::advance(until - now).await;
            }
            Decision::Shed(idx) => {
                for &i in idx.iter().rev() {
                    let a = queue.remove(i).unwrap();
                    out.shed.push(secs(a));
                }
            }
        }
    }
    out
}

#[test]
fn cost_model_fits_the_line_and_follows_a_change() {
    let mut m = CostModel::new(MAX);
    let t0 = Instant::now();
    for (i, n) in [1, 8, 32, 64, 16, 4].iter().cycle().take(60).enumerate() {
        m.observe(*n, cost(*n), t0 + Duration::from_millis(i as u64));
    }
    let (a, b) = m.coefficients().unwrap();
    assert!(
        (a - 0.002).abs() < 1e-6 && (b - 0.0001).abs() < 1e-8,
        "{a} {b}"
    );
    // Another process takes the cores: every batch now costs twice as much.
    let t1 = t0 + Duration::from_secs(1);
    for (i, n) in [1, 8, 32, 64, 16, 4].iter().cycle().take(60).enumerate() {
        m.observe(*n, 2 * cost(*n), t1 + Duration::from_millis(50 * i as u64));
    }
    let p = m.predict(32).unwrap();
    let want = 2.0 * cost(32).as_secs_f64();
    assert!((p / want - 1.0).abs() < 0.05, "{p} vs {want}");
}

#[test]
fn a_preempted_batch_barely_moves_the_curve() {
    let mut m = CostModel::new(MAX);
    let t0 = Instant::now();
    for (i, n) in [1, 64].iter().cycle().take(20).enumerate() {
        m.observe(*n, cost(*n), t0 + Duration::from_millis(i as u64));
    }
    m.observe(64, 100 * cost(64), t0 + Duration::from_millis(21));
    let p = m.predict(64).unwrap();
    assert!(p < 2.0 * cost(64).as_secs_f64(), "{p}");
}

#[test]
fn one_size_seen_is_read_pessimistically() {
    let mut m = CostModel::new(MAX);
    assert_eq!(m.predict(1), None);
    m.observe(4, Duration::from_millis(4), Instant::now());
    // A smaller batch is assumed no cheaper, a larger one proportionally dearer.
    assert_eq!(m.predict(1), Some(0.004));
    assert!((m.predict(8).unwrap() - 0.008).abs() < 1e-12);
}

#[tokio::test(start_paused = true)]
async fn low_load_runs_every_request_at_once() {
    let mut p = policy();
    let out = simulate(&mut p, steady(&[(0.01 * capacity(), 3.0)])).await;
    assert!(
        out.batches.iter().all(|&(_, n)| n == 1),
        "{:?}",
        out.batches
    );
    assert!(out.shed.is_empty());
    // No wait at all: latency is the cost of one row, as without batching.
    let one = cost(1).as_secs_f64();
    assert!(out.served.iter().all(|&(_, l)| (l - one).abs() < 1e-6));
}

#[tokio::test(start_paused = true)]
async fn converges_to_the_batch_size_theory_predicts() {
    let rate = 5000.0;
    let mut p = policy();
    let out = simulate(&mut p, steady(&[(rate, 3.0)])).await;
    let n = out.mean_batch(1.0, 3.0);
    // The half-busy batch that a wait aims at, not the fixed point that a
    // replica running back to back would settle at (an arrival during the
    // wake-up can add a row).
    let lo = 0.95 * half_busy(rate);
    let hi = half_busy(rate).ceil() + 1.0;
    assert!(n >= lo && n <= hi, "mean batch {n}, theory {lo:.1}..{hi}");
    assert!(out.quantile(1.0, 3.0, 0.99) <= OBJECTIVE.as_secs_f64());
    assert!(out.shed.is_empty());
    let s = p.status().snapshot();
    assert!((s.cost_fixed - 0.002).abs() < 1e-4 && (s.cost_per_row - 1e-4).abs() < 1e-5);
}

/// A CPU pressure source that reads `share` of the (simulated) time since
/// it was made as stalled.
fn constant_pressure(share: f64) -> CpuPressure {
    let start = TInstant::now();
    CpuPressure::from_fn(move || Some(TInstant::now().duration_since(start).mul_f64(share)))
}

#[tokio::test(start_paused = true)]
async fn cpu_pressure_grows_batches_once_load_needs_them() {
    let mut p = policy().with_pressure(constant_pressure(0.5));
    // Low load (batches of one keep up): no wait, pressure or not.
    let out = simulate(&mut p, steady(&[(300.0, 1.0)])).await;
    let one = cost(1).as_secs_f64();
    assert!(out.served.iter().all(|&(_, l)| (l - one).abs() < 1e-6));
    // At 5000 rows/s the half-busy batch is 40 rows; under pressure 0.5 the
    // target is 8 times the fixed point, so batches grow to what the
    // objective allows (about 60 rows), and still meet it.
    let rate = 5000.0;
    let mut p = policy().with_pressure(constant_pressure(0.5));
    let out = simulate(&mut p, steady(&[(rate, 3.0)])).await;
    let n = out.mean_batch(1.0, 3.0);
    assert!(
        n >= 1.3 * half_busy(rate) && n <= MAX as f64,
        "mean batch {n}"
    );
    assert!(out.quantile(1.0, 3.0, 0.99) <= OBJECTIVE.as_secs_f64());
    assert!(out.shed.is_empty());
    assert!((p.status().snapshot().cpu_pressure - 0.5).abs() < 0.01);
}

#[tokio::test(start_paused = true)]
async fn converges_under_poisson_arrivals() {
    let rate = 5000.0;
    let mut p = policy();
    let out = simulate(&mut p, poisson(rate, 4.0, 7)).await;
    let n = out.mean_batch(1.0, 4.0);
    let lo = fixed_point(rate);
    assert!(
        n >= 0.9 * lo && n <= 1.1 * half_busy(rate),
        "mean batch {n}"
    );
    assert!(out.quantile(1.0, 4.0, 0.99) <= OBJECTIVE.as_secs_f64());
    assert!(out.shed.is_empty(), "{} shed", out.shed.len());
}

#[tokio::test(start_paused = true)]
async fn follows_a_load_step_from_10_to_90_percent_and_back() {
    let (low, high) = (0.1 * capacity(), 0.9 * capacity());
    let mut p = policy();
    let out = simulate(&mut p, steady(&[(low, 1.0), (high, 2.0), (low, 1.0)])).await;
    let objective = OBJECTIVE.as_secs_f64();
    // The objective holds through both steps, transitions included.
    for (from, to) in [(0.0, 1.0), (1.0, 3.0), (3.0, 4.0)] {
        let p99 = out.quantile(from, to, 0.99);
        assert!(p99 <= objective, "p99 {p99} in [{from}, {to})");
        assert_eq!(out.shed_in(from, to), 0);
    }
    // Batches grow with the load, no further than the half-busy size, and
    // shrink back.
    let small = half_busy(low).ceil();
    assert!(
        out.mean_batch(0.2, 1.0) <= small,
        "{}",
        out.mean_batch(0.2, 1.0)
    );
    let n = out.mean_batch(1.3, 3.0);
    assert!(n >= fixed_point(high) && n <= MAX as f64, "{n}");
    // Half a second (five time constants of the rate estimate) after.
    assert!(
        out.mean_batch(3.5, 4.0) <= small,
        "{}",
        out.mean_batch(3.5, 4.0)
    );
    // All served: nothing lost.
    assert_eq!(
        out.served.len(),
        steady(&[(low, 1.0), (high, 2.0), (low, 1.0)]).len()
    );
}

#[tokio::test(start_paused = true)]
async fn overload_keeps_throughput_at_capacity_and_sheds_only_the_excess() {
    let rate = 1.5 * capacity();
    let mut p = policy();
    let out = simulate(&mut p, steady(&[(rate, 3.0)])).await;
    assert!(out.batches.iter().all(|&(_, n)| n <= MAX));
    // Throughput stays at (nearly) the maximum: what is shed is the excess.
    let served = out.served_in(1.0, 3.0).len() as f64 / 2.0;
    assert!(
        served >= 0.9 * capacity(),
        "served {served}/s of {}",
        capacity()
    );
    let shed = out.shed_in(1.0, 3.0) as f64 / 2.0;
    assert!(shed <= rate - 0.9 * capacity(), "shed {shed}/s");
    assert!(shed >= rate - capacity() - 0.05 * rate, "shed {shed}/s");
    // What is served still meets the objective.
    assert!(out.quantile(1.0, 3.0, 0.99) <= OBJECTIVE.as_secs_f64());
}

#[tokio::test(start_paused = true)]
async fn an_objective_below_one_row_sheds_nothing() {
    // t(1) = 2.1 ms > 1 ms: no request can ever meet it. Shedding would
    // reject everything, so it sheds nothing and runs for throughput.
    let mut p = AdaptiveBatching::new("sim".into(), MAX, Duration::from_millis(1), true);
    let out = simulate(&mut p, steady(&[(0.9 * capacity(), 2.0)])).await;
    assert!(out.shed.is_empty());
    assert!(out.batches.iter().all(|&(_, n)| n <= MAX));
    assert_eq!(out.served.len(), steady(&[(0.9 * capacity(), 2.0)]).len());
}

/// A warmed policy: it has seen the cost at sizes 1 and 64.
fn warmed() -> (AdaptiveBatching, Instant) {
    let mut p = policy();
    let t = Instant::now();
    for i in 0..8 {
        let n = if i % 2 == 0 { 1 } else { MAX };
        p.observe(n, cost(n), t);
    }
    (p, t)
}

fn view<'a>(
    now: Instant,
    rows: &'a [usize],
    waits: &'a [Duration],
    slack: &'a [Option<Duration>],
    arrived: u64,
) -> QueueView<'a> {
    QueueView {
        now,
        rows,
        waits,
        slack,
        oldest_wait: waits[0],
        more_incompatible: false,
        arrived_rows: arrived,
    }
}

#[test]
fn waits_only_when_the_rate_fills_the_batch_in_time() {
    let (mut p, t) = warmed();
    let ms = Duration::from_millis;
    // Teach it 5000 rows/s.
    let (rows, waits, slack) = ([1], [Duration::ZERO], [None]);
    p.decide(view(t, &rows, &waits, &slack, 0));
    p.decide(view(t + ms(500), &rows, &waits, &slack, 2500));
    // 2 queued; at this rate the batch that keeps up is 20 rows (n = rate·t(n))
    // and the half-busy one 40: it fills in ~7.6 ms, and 1 + 7.6 + t(40) =
    // 14.6 ms fits the 20 ms objective: wait for it.
    let (rows, waits, slack) = ([1, 1], [ms(1), Duration::ZERO], [None, None]);
    let d = p.decide(view(t + ms(501), &rows, &waits, &slack, 2505));
    assert!(
        matches!(d, Decision::Wait(w) if w > ms(7) && w < ms(8)),
        "{d:?}"
    );
    assert_eq!(p.wake_rows(), Some(40));
    // The head has waited 8 ms: 40 rows no longer fit (8 + 7.6 + 6 > 20);
    // the largest that does is 34 (8 + 6.4 + 5.4 = 19.8), more than the 20
    // that keep up: wait for those.
    let waits = [ms(8), Duration::ZERO];
    let d = p.decide(view(t + ms(502), &rows, &waits, &slack, 2510));
    assert!(
        matches!(d, Decision::Wait(w) if w > ms(6) && w < ms(7)),
        "{d:?}"
    );
    assert_eq!(p.wake_rows(), Some(34));
    // The head has already waited 14 ms: only 14 rows would fit, fewer
    // than keep up, run now.
    let waits = [ms(14), Duration::ZERO];
    let d = p.decide(view(t + ms(503), &rows, &waits, &slack, 2515));
    assert_eq!(d, Decision::Dispatch(2));
}

#[test]
fn the_batch_is_the_largest_the_head_can_afford() {
    let (mut p, t) = warmed();
    // 40 rows queued, the head waited 16 ms: t(n) <= 4 ms gives n = 20.
    let rows = [1; 40];
    let slack = [None; 40];
    let mut waits = [Duration::ZERO; 40];
    waits[0] = Duration::from_millis(16);
    assert_eq!(
        p.decide(view(t, &rows, &waits, &slack, 0)),
        Decision::Dispatch(20)
    );
}

#[test]
fn sheds_what_cannot_make_the_objective_or_its_deadline() {
    let (mut p, t) = warmed();
    let ms = Duration::from_millis;
    let rows = [1, 1, 1];
    // Waited 19 ms: 19 + 2.1 > 20. Own deadline in 1 ms < t(1).
    let waits = [ms(19), ms(1), ms(1)];
    let slack = [None, Some(ms(1)), Some(ms(50))];
    assert_eq!(
        p.decide(view(t, &rows, &waits, &slack, 0)),
        Decision::Shed(vec![0, 1])
    );
    // Without shed_late the objective sheds nothing; own deadlines still do.
    let mut q = AdaptiveBatching::new("sim".into(), MAX, OBJECTIVE, false);
    q.observe(1, cost(1), t);
    assert_eq!(
        q.decide(view(t, &rows, &waits, &slack, 0)),
        Decision::Shed(vec![1])
    );
}

#[test]
fn p99_correction_tightens_then_relaxes() {
    let mut p = policy();
    for _ in 0..P99_EVERY * 4 {
        p.observe_latency(Duration::from_millis(25));
    }
    let tight = p.status().snapshot().margin;
    assert!(tight < 0.8, "{tight}");
    assert!(tight >= MIN_MARGIN);
    for _ in 0..P99_EVERY * 40 {
        p.observe_latency(Duration::from_millis(5));
    }
    assert_eq!(p.status().snapshot().margin, 1.0);
}
