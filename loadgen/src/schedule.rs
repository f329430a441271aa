//! When the producer sends: a constant rate, or Crayfish's periodic bursts.
//! Send times are computed in advance; latency counts from them.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// `rate` events per second.
    Constant { rate: f64 },
    /// `base` events/s, and `burst` events/s during the last `burst_len`
    /// of every `period`.
    Bursts {
        base: f64,
        burst: f64,
        burst_len: Duration,
        period: Duration,
    },
}

impl Schedule {
    /// The rate in force at `t` since the start.
    pub fn rate_at(&self, t: Duration) -> f64 {
        match *self {
            Schedule::Constant { rate } => rate,
            Schedule::Bursts {
                base,
                burst,
                burst_len,
                period,
            } => {
                let phase = t.as_secs_f64() % period.as_secs_f64();
                if phase >= (period - burst_len).as_secs_f64() {
                    burst
                } else {
                    base
                }
            }
        }
    }

    /// Send offsets of every event within `duration`, in order.
    pub fn offsets(&self, duration: Duration) -> Vec<Duration> {
        let mut out = Vec::new();
        let end = duration.as_secs_f64();
        let mut t = 0.0f64;
        while t < end {
            out.push(Duration::from_secs_f64(t));
            let rate = self.rate_at(Duration::from_secs_f64(t)).max(1e-3);
            t += 1.0 / rate;
        }
        out
    }

    /// Whether `t` falls in a burst.
    pub fn in_burst(&self, t: Duration) -> bool {
        match self {
            Schedule::Constant { .. } => false,
            Schedule::Bursts { base, burst, .. } => base != burst && self.rate_at(t) == *burst,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_rate_is_exact() {
        let o = Schedule::Constant { rate: 1000.0 }.offsets(Duration::from_secs(2));
        assert!((1999..=2001).contains(&o.len()), "{}", o.len());
    }

    #[test]
    fn bursts_run_at_their_rates_within_five_percent() {
        let s = Schedule::Bursts {
            base: 700.0,
            burst: 1100.0,
            burst_len: Duration::from_secs(1),
            period: Duration::from_secs(4),
        };
        let o = s.offsets(Duration::from_secs(12));
        let (mut in_burst, mut outside) = (0usize, 0usize);
        for t in &o {
            if s.in_burst(*t) {
                in_burst += 1;
            } else {
                outside += 1;
            }
        }
        // 3 bursts of 1 s and 9 s outside.
        let burst_rate = in_burst as f64 / 3.0;
        let base_rate = outside as f64 / 9.0;
        assert!((burst_rate / 1100.0 - 1.0).abs() < 0.05, "{burst_rate}");
        assert!((base_rate / 700.0 - 1.0).abs() < 0.05, "{base_rate}");
    }
}
