//! How many messages may be in flight at once.
//!
//! Every message taken is submitted to the engine at once, so the messages
//! in flight are the model's queue: with `L` in flight, a message waits
//! behind about `L` others. For a model with a latency objective that
//! bound must follow the model's speed, which nobody configures: the limit
//! adapts, additive increase and multiplicative decrease on each scored
//! message's time in the engine (queue + compute) against its model's
//! objective, as TCP does with a window. It starts small and doubles each
//! round (slow start) until a message misses its objective, then grows by
//! about one message a round and shrinks by a quarter at most once per
//! objective. `--kafka-max-in-flight` caps it; messages of models without
//! an objective only ever let it grow.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// Where the limit starts.
const INITIAL: f64 = 16.0;

#[derive(Debug)]
pub struct InFlightLimit {
    max: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limit: f64,
    slow_start: bool,
    last_cut: Option<Instant>,
}

impl InFlightLimit {
    pub fn new(max: usize) -> Self {
        let max = max.max(1) as f64;
        Self {
            max,
            state: Mutex::new(State {
                limit: INITIAL.min(max),
                slow_start: true,
                last_cut: None,
            }),
        }
    }

    /// Messages that may be in flight now.
    pub fn current(&self) -> usize {
        self.state.lock().limit as usize
    }

    /// A message was scored after `latency` in the engine; `objective`:
    /// its model's latency objective, if it has one.
    pub fn observe(&self, latency: Duration, objective: Option<Duration>, now: Instant) {
        let mut s = self.state.lock();
        match objective {
            Some(o) if latency > o => {
                // The messages finishing over the objective for the next
                // objective's worth of time were admitted before this cut:
                // one cut per objective, not one per late message.
                if s.last_cut
                    .is_some_and(|t| now.saturating_duration_since(t) < o)
                {
                    return;
                }
                let factor = if s.slow_start { 0.5 } else { 0.75 };
                s.limit = (s.limit * factor).max(1.0);
                s.slow_start = false;
                s.last_cut = Some(now);
            }
            _ => {
                let step = if s.slow_start { 1.0 } else { 1.0 / s.limit };
                s.limit = (s.limit + step).min(self.max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A model that serves `rate` messages a second, fed as fast as the
    /// limit allows for `secs`: the limit it settles at, and the share of
    /// messages over the objective.
    fn run(rate: f64, objective: Duration, secs: f64) -> (usize, f64) {
        let limit = InFlightLimit::new(1024);
        let start = Instant::now();
        let (mut t, mut late, mut n) = (0.0f64, 0usize, 0usize);
        while t < secs {
            // With L in flight, a message waits for the L before it.
            let l = limit.current();
            let latency = Duration::from_secs_f64(l as f64 / rate);
            t += 1.0 / rate;
            let now = start + Duration::from_secs_f64(t);
            limit.observe(latency, Some(objective), now);
            n += 1;
            late += usize::from(latency > objective);
        }
        (limit.current(), late as f64 / n as f64)
    }

    #[test]
    fn the_limit_settles_where_the_objective_holds() {
        // 200 messages a second and 200 ms: about 40 in flight at most.
        let (settled, late) = run(200.0, 200 * MS, 30.0);
        assert!((20..=41).contains(&settled), "{settled}");
        assert!(late < 0.1, "{late}");
        // Ten times the speed: ten times the limit.
        let (fast, _) = run(2000.0, 200 * MS, 30.0);
        assert!(fast >= 8 * settled, "{fast} vs {settled}");
    }

    #[test]
    fn without_an_objective_the_limit_grows_to_the_cap() {
        let limit = InFlightLimit::new(100);
        assert_eq!(limit.current(), 16);
        let now = Instant::now();
        for _ in 0..200 {
            limit.observe(Duration::from_secs(5), None, now);
        }
        assert_eq!(limit.current(), 100);
        // A cut happens once per objective however many messages are late.
        let o = Some(100 * MS);
        for _ in 0..50 {
            limit.observe(Duration::from_secs(1), o, now);
        }
        assert_eq!(limit.current(), 50);
        limit.observe(Duration::from_secs(1), o, now + 100 * MS);
        assert_eq!(limit.current(), 37);
        assert_eq!(InFlightLimit::new(4).current(), 4);
    }
}
