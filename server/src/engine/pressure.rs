//! CPU pressure: the share of wall time in which some runnable thread of
//! the host (or of shoal's cgroup) waited for a core, from Linux's pressure
//! stall information. The adaptive batcher reads it to learn that the cores
//! are contended, which its own cost curve cannot show: a replica's batch
//! costs what it measures, yet every batch it runs also takes a core that
//! the request path, the stream processor beside it or another replica was
//! waiting for.

use super::smoothed_rate::SmoothedRate;
use std::time::{Duration, Instant};

/// Reading the file costs a few microseconds; more often says nothing new.
const SAMPLE_EVERY: Duration = Duration::from_millis(25);
/// Time constant of the smoothed share: a few samples, so a burst shows
/// within a quarter second and one descheduled sample does not swing it.
const TAU_S: f64 = 0.25;

/// Cumulative stall time so far; `None` when it cannot be read.
type Reader = Box<dyn FnMut() -> Option<Duration> + Send>;

/// The smoothed CPU pressure, sampled on demand.
pub struct CpuPressure {
    read: Option<Reader>,
    /// Stalled seconds per second: the share.
    share: SmoothedRate,
}

impl std::fmt::Debug for CpuPressure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPressure")
            .field("source", &self.read.is_some())
            .field("share", &self.share.rate())
            .finish()
    }
}

impl CpuPressure {
    /// No source: the pressure reads 0.
    pub fn none() -> Self {
        Self {
            read: None,
            share: Self::smoothing(),
        }
    }

    /// The cgroup's `cpu.pressure` (cgroup v2: in a container, the
    /// container's own), else the host's `/proc/pressure/cpu`; none when
    /// the kernel has no PSI (before 4.20, or `psi=0`).
    pub fn system() -> Self {
        for path in ["/sys/fs/cgroup/cpu.pressure", "/proc/pressure/cpu"] {
            if read_some_total(path).is_some() {
                return Self::from_fn(move || read_some_total(path));
            }
        }
        tracing::debug!("no CPU pressure information: batches do not grow with contention");
        Self::none()
    }

    /// A custom source of cumulative stall time (tests drive it).
    pub fn from_fn(f: impl FnMut() -> Option<Duration> + Send + 'static) -> Self {
        Self {
            read: Some(Box::new(f)),
            share: Self::smoothing(),
        }
    }

    fn smoothing() -> SmoothedRate {
        SmoothedRate::new(TAU_S, SAMPLE_EVERY).capped(1.0)
    }

    /// The share of recent wall time with a thread waiting for a core,
    /// in `0..=1`.
    pub fn sample(&mut self, now: Instant) -> f64 {
        let Some(read) = self.read.as_mut() else {
            return 0.0;
        };
        if !self.share.due(now) {
            return self.share.rate();
        }
        match read() {
            Some(total) => self.share.update(now, total.as_secs_f64()),
            None => self.share.rate(),
        }
    }
}

fn read_some_total(path: &str) -> Option<Duration> {
    parse_some_total(&std::fs::read_to_string(path).ok()?)
}

/// `some avg10=.. avg60=.. avg300=.. total=<µs>`: the `total` of the
/// `some` line.
fn parse_some_total(text: &str) -> Option<Duration> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let total = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?;
    total.parse().ok().map(Duration::from_micros)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn parses_the_some_line() {
        let text = "some avg10=1.50 avg60=0.20 avg300=0.00 total=1156760\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n";
        assert_eq!(parse_some_total(text), Some(Duration::from_micros(1156760)));
        assert_eq!(parse_some_total("full total=3\n"), None);
        assert_eq!(parse_some_total("some avg10=x total=abc\n"), None);
    }

    #[test]
    fn share_follows_the_stall_rate() {
        let stall = Arc::new(AtomicU64::new(0));
        let s = stall.clone();
        let mut p =
            CpuPressure::from_fn(move || Some(Duration::from_micros(s.load(Ordering::Relaxed))));
        let t = Instant::now();
        assert_eq!(p.sample(t), 0.0);
        // Stalled 60% of every 50 ms for 2 s: the share converges to 0.6.
        let mut share = 0.0;
        for i in 1..=40u64 {
            stall.fetch_add(30_000, Ordering::Relaxed);
            share = p.sample(t + Duration::from_millis(50 * i));
        }
        assert!((share - 0.6).abs() < 0.01, "{share}");
        // Samples closer than SAMPLE_EVERY return the last share unchanged.
        stall.fetch_add(1_000_000, Ordering::Relaxed);
        assert_eq!(p.sample(t + Duration::from_millis(2_010)), share);
        // No stall for 2 s: back near 0.
        for i in 41..=80u64 {
            share = p.sample(t + Duration::from_millis(50 * i));
        }
        assert!(share < 0.05, "{share}");
    }

    #[test]
    fn no_source_reads_zero() {
        assert_eq!(CpuPressure::none().sample(Instant::now()), 0.0);
    }
}
