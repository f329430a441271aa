//! The rate of a cumulative counter, smoothed exponentially in time: rows
//! arriving at a replica (the adaptive batcher's load) and time some thread
//! stalled for a core (CPU pressure).

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SmoothedRate {
    tau_s: f64,
    /// Shorter spans are not taken: they say more about scheduling than
    /// about the rate, and the sample they would use may cost to take.
    min_span: Duration,
    /// Cap of one span's rate (a share cannot exceed 1).
    cap: f64,
    last: Option<(Instant, f64)>,
    rate: f64,
}

impl SmoothedRate {
    pub fn new(tau_s: f64, min_span: Duration) -> Self {
        Self {
            tau_s,
            min_span,
            cap: f64::INFINITY,
            last: None,
            rate: 0.0,
        }
    }

    pub fn capped(mut self, cap: f64) -> Self {
        self.cap = cap;
        self
    }

    /// Whether a sample taken at `now` would be used.
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|(at, _)| now.saturating_duration_since(at) >= self.min_span)
    }

    /// Takes the counter's `total` at `now` (ignored when not `due`); the
    /// first sample only sets the start.
    pub fn update(&mut self, now: Instant, total: f64) -> f64 {
        if !self.due(now) {
            return self.rate;
        }
        if let Some((at, before)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            let inst = ((total - before).max(0.0) / dt).min(self.cap);
            let alpha = 1.0 - (-dt / self.tau_s).exp();
            self.rate += alpha * (inst - self.rate);
        }
        self.last = Some((now, total));
        self.rate
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_counter_and_skips_short_spans() {
        let mut r = SmoothedRate::new(0.1, Duration::from_millis(1));
        let t = Instant::now();
        assert_eq!(r.update(t, 0.0), 0.0);
        // 1000 per second for a second, sampled every 10 ms.
        let mut rate = 0.0;
        for i in 1..=100u32 {
            rate = r.update(
                t + Duration::from_millis(10 * u64::from(i)),
                10.0 * f64::from(i),
            );
        }
        assert!((rate - 1000.0).abs() < 1.0, "{rate}");
        // A span under min_span is not taken.
        let soon = t + Duration::from_micros(1_000_500);
        assert!(!r.due(soon));
        assert_eq!(r.update(soon, 1e9), rate);
        // A cap bounds one span's rate; a counter going back reads as 0.
        let mut c = SmoothedRate::new(0.1, Duration::ZERO).capped(1.0);
        c.update(t, 5.0);
        let one = c.update(t + Duration::from_secs(10), 1e6);
        assert!((one - 1.0).abs() < 1e-9, "{one}");
        let back = c.update(t + Duration::from_secs(20), 0.0);
        assert!(back.abs() < 1e-9, "{back}");
    }
}
