//! When the producer sends: a constant rate, Crayfish's periodic bursts, or
//! a load schedule of phases (with bursts on top), evenly spaced or as a
//! Poisson process. Send times are computed in advance; latency counts
//! from them.

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
    /// Phases of (rate, duration) one after the other; during the last
    /// `burst_len` of every `burst_period` the rate is `burst_factor` times
    /// the phase's (Crayfish's bursts, relative to the phase).
    Phased {
        phases: Vec<(f64, Duration)>,
        burst: Option<Burst>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub factor: f64,
    pub len: Duration,
    pub period: Duration,
}

impl Burst {
    fn on(&self, t: Duration) -> bool {
        let phase = t.as_secs_f64() % self.period.as_secs_f64();
        phase >= (self.period.saturating_sub(self.len)).as_secs_f64()
    }
}

impl Schedule {
    /// The rate in force at `t` since the start.
    pub fn rate_at(&self, t: Duration) -> f64 {
        match *self {
            Schedule::Constant { rate } => rate,
            Schedule::Phased {
                ref phases,
                ref burst,
            } => {
                let Some(i) = self.phase_at(t) else {
                    return phases.last().map_or(0.0, |p| p.0);
                };
                let base = phases[i].0;
                match burst {
                    Some(b) if b.on(t) => base * b.factor,
                    _ => base,
                }
            }
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

    /// The index of the phase `t` falls in (`None` past the last, or for
    /// schedules without phases).
    pub fn phase_at(&self, t: Duration) -> Option<usize> {
        let Schedule::Phased { phases, .. } = self else {
            return None;
        };
        let mut end = Duration::ZERO;
        for (i, &(_, d)) in phases.iter().enumerate() {
            end += d;
            if t < end {
                return Some(i);
            }
        }
        None
    }

    /// Where each phase starts and ends, seconds.
    pub fn phase_bounds(&self) -> Vec<(f64, f64)> {
        let Schedule::Phased { phases, .. } = self else {
            return Vec::new();
        };
        let mut start = 0.0;
        phases
            .iter()
            .map(|&(_, d)| {
                let b = (start, start + d.as_secs_f64());
                start = b.1;
                b
            })
            .collect()
    }

    /// The schedule's own length, when it has one (the sum of its phases).
    pub fn length(&self) -> Option<Duration> {
        match self {
            Schedule::Phased { phases, .. } => Some(phases.iter().map(|p| p.1).sum()),
            _ => None,
        }
    }

    /// Send offsets as a Poisson process whose rate follows the schedule:
    /// exponential gaps drawn at the rate in force, from `seed`.
    pub fn poisson_offsets(&self, duration: Duration, seed: u64) -> Vec<Duration> {
        let mut rng = crate::pipeline::Rng::new(seed);
        let mut out = Vec::new();
        let end = duration.as_secs_f64();
        let mut t = 0.0f64;
        loop {
            let rate = self.rate_at(Duration::from_secs_f64(t)).max(1e-3);
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            t += -(1.0 - u).ln() / rate;
            if t >= end {
                return out;
            }
            out.push(Duration::from_secs_f64(t));
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
            Schedule::Phased { burst, .. } => burst.is_some_and(|b| b.factor != 1.0 && b.on(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phased() -> Schedule {
        Schedule::Phased {
            phases: vec![
                (100.0, Duration::from_secs(2)),
                (1000.0, Duration::from_secs(2)),
                (100.0, Duration::from_secs(2)),
            ],
            burst: Some(Burst {
                factor: 2.0,
                len: Duration::from_millis(500),
                period: Duration::from_secs(2),
            }),
        }
    }

    #[test]
    fn phases_follow_each_other_with_bursts_on_top() {
        let s = phased();
        assert_eq!(s.length(), Some(Duration::from_secs(6)));
        assert_eq!(s.rate_at(Duration::from_millis(100)), 100.0);
        assert_eq!(s.rate_at(Duration::from_millis(1700)), 200.0);
        assert_eq!(s.rate_at(Duration::from_millis(2100)), 1000.0);
        assert_eq!(s.phase_at(Duration::from_millis(4100)), Some(2));
        assert_eq!(s.phase_at(Duration::from_secs(6)), None);
        assert_eq!(s.phase_bounds(), vec![(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]);
        // Per phase: 1.5 s at the base rate, 0.5 s at twice it.
        let o = s.offsets(Duration::from_secs(6));
        let count = |a: f64, b: f64| {
            o.iter()
                .filter(|t| (a..b).contains(&t.as_secs_f64()))
                .count() as f64
        };
        assert!((count(2.0, 4.0) / 2500.0 - 1.0).abs() < 0.01);
        assert!((count(0.0, 2.0) / 250.0 - 1.0).abs() < 0.02);
    }

    #[test]
    fn poisson_arrivals_keep_the_rate_and_vary_the_gaps() {
        let s = phased();
        let o = s.poisson_offsets(Duration::from_secs(6), 3);
        let in_high = o
            .iter()
            .filter(|t| (2.0..4.0).contains(&t.as_secs_f64()))
            .count() as f64;
        assert!((in_high / 2500.0 - 1.0).abs() < 0.1, "{in_high}");
        let gaps: Vec<f64> = o.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        let (min, max) = gaps
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &g| (a.min(g), b.max(g)));
        assert!(max > 5.0 * min, "gaps look regular: {min} {max}");
        assert_eq!(o, s.poisson_offsets(Duration::from_secs(6), 3));
    }

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
