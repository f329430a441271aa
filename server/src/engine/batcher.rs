//! Batching policies: given what waits in a replica's queue, decide whether
//! to run now and how many requests to take. Pure functions of a queue view
//! (time included), so the replica loop stays simple, the policy can be
//! swapped, and a policy can be driven by a simulated clock in tests.

use super::config::DynamicBatching;
use std::time::{Duration, Instant};

/// What a policy sees: the requests that could join a batch headed by the
/// most urgent waiting request, in dispatch order (arrival order, or
/// earliest deadline first when the policy asks for it).
#[derive(Debug, Clone, Copy)]
pub struct QueueView<'a> {
    pub now: Instant,
    /// Rows of each candidate.
    pub rows: &'a [usize],
    /// How long each candidate has waited.
    pub waits: &'a [Duration],
    /// Time left before each candidate's own deadline, if it has one.
    pub slack: &'a [Option<Duration>],
    /// How long the head has waited (`waits[0]`).
    pub oldest_wait: Duration,
    /// True when requests incompatible with the head also wait: the head's
    /// batch cannot grow past them in arrival order forever, so waiting
    /// for more is pointless once nothing compatible remains.
    pub more_incompatible: bool,
    /// Rows ever queued on this replica: arrival rates come from it.
    pub arrived_rows: u64,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run a batch of the first `n` candidate requests now.
    Dispatch(usize),
    /// Wait at most this long for more requests, then decide again.
    Wait(Duration),
    /// Reject these candidates (indexes into the view, ascending): they
    /// can no longer be answered in time. Then decide again.
    Shed(Vec<usize>),
}

/// A batching policy. `observe` reports each executed batch so adaptive
/// policies can learn the replica's cost; static ones ignore it.
pub trait BatchPolicy: Send + 'static {
    fn decide(&mut self, view: QueueView<'_>) -> Decision;
    /// While waiting, arrivals wake the replica only once this many rows
    /// are queued; `None`: every arrival does. Saves a context switch per
    /// request when a batch fills during the delay.
    fn wake_rows(&self) -> Option<usize> {
        None
    }
    fn observe(&mut self, _rows: usize, _exec: Duration, _now: Instant) {}
    /// One answered request's queue + compute time.
    fn observe_latency(&mut self, _latency: Duration) {}
    /// `Some(objective)`: candidates come earliest deadline first, a
    /// request without its own deadline due `objective` after it arrived.
    /// `None`: arrival order, as Triton's batcher.
    fn deadline_order(&self) -> Option<Duration> {
        None
    }
    /// A copy of this policy for batches run on the threads that submit
    /// requests, or `None`. Only for a policy that dispatches a lone
    /// request on an idle replica at once and learns nothing from
    /// executions: its copy then takes the same batches, with the same
    /// answers, as the replica thread would.
    fn inline_copy(&self) -> Option<Box<dyn BatchPolicy>> {
        None
    }
}

/// One request per execution: the model runs without dynamic batching.
#[derive(Debug, Default)]
pub struct NoBatching;

impl BatchPolicy for NoBatching {
    fn inline_copy(&self) -> Option<Box<dyn BatchPolicy>> {
        Some(Box::new(NoBatching))
    }

    fn decide(&mut self, view: QueueView<'_>) -> Decision {
        debug_assert!(!view.rows.is_empty());
        Decision::Dispatch(1)
    }
}

/// Triton's dynamic batcher: merge up to `max_batch_size` rows; run at once
/// when the batch is full or reaches the largest preferred size; otherwise
/// wait up to `max_queue_delay` after the oldest request arrived for more.
/// With a zero delay the batch is whatever queued while the replica was busy.
#[derive(Debug, Clone)]
pub struct StaticBatching {
    pub max_batch_size: usize,
    pub config: DynamicBatching,
}

impl BatchPolicy for StaticBatching {
    fn inline_copy(&self) -> Option<Box<dyn BatchPolicy>> {
        // With a delay the lone request waits for company; a largest
        // preferred size of 1 would cut it at once, but waiting is the rule.
        // Without one the policy is a pure function of the queue.
        self.config
            .max_queue_delay
            .is_zero()
            .then(|| Box::new(self.clone()) as Box<dyn BatchPolicy>)
    }

    fn wake_rows(&self) -> Option<usize> {
        let full = self.max_batch_size;
        Some(
            self.config
                .preferred_batch_sizes
                .last()
                .map_or(full, |&p| p.min(full)),
        )
    }

    fn decide(&mut self, view: QueueView<'_>) -> Decision {
        let max = self.max_batch_size;
        // The longest prefix of candidates that fits into one batch.
        let mut total = 0usize;
        let mut fit = 0usize;
        for &r in view.rows {
            if total + r > max {
                break;
            }
            total += r;
            fit += 1;
        }
        // The head alone always runs, even if it could not fit (validation
        // bounds rows by max_batch_size, so this is only defensive).
        let fit = fit.max(1);
        let overflow = fit < view.rows.len();
        if total >= max || overflow {
            return Decision::Dispatch(fit);
        }
        if let Some(&largest) = self.config.preferred_batch_sizes.last() {
            // Cut at the largest preferred size once reachable.
            let mut sum = 0;
            for (i, &r) in view.rows[..fit].iter().enumerate() {
                sum += r;
                if sum == largest {
                    return Decision::Dispatch(i + 1);
                }
            }
        }
        let delay = self.config.max_queue_delay;
        if view.oldest_wait >= delay {
            return Decision::Dispatch(fit);
        }
        Decision::Wait(delay - view.oldest_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: usize, delay_us: u64, preferred: &[usize]) -> StaticBatching {
        StaticBatching {
            max_batch_size: max,
            config: DynamicBatching {
                max_queue_delay: Duration::from_micros(delay_us),
                preferred_batch_sizes: preferred.to_vec(),
            },
        }
    }

    fn view(rows: &[usize], waited_us: u64) -> QueueView<'_> {
        QueueView {
            now: Instant::now(),
            rows,
            waits: &[],
            slack: &[],
            oldest_wait: Duration::from_micros(waited_us),
            more_incompatible: false,
            arrived_rows: 0,
        }
    }

    #[test]
    fn waits_for_the_delay_then_runs_what_is_there() {
        let mut p = policy(8, 100, &[]);
        assert_eq!(
            p.decide(view(&[1, 1], 30)),
            Decision::Wait(Duration::from_micros(70))
        );
        assert_eq!(p.decide(view(&[1, 1], 100)), Decision::Dispatch(2));
    }

    #[test]
    fn full_batch_runs_at_once_and_leaves_the_rest() {
        let mut p = policy(4, 1_000, &[]);
        assert_eq!(p.decide(view(&[2, 2], 0)), Decision::Dispatch(2));
        // 3 + 2 > 4: the second does not fit, the batch cannot grow.
        assert_eq!(p.decide(view(&[3, 2, 1], 0)), Decision::Dispatch(1));
    }

    #[test]
    fn largest_preferred_size_runs_at_once() {
        let mut p = policy(16, 1_000, &[2, 4]);
        assert_eq!(
            p.decide(view(&[1, 1], 0)),
            Decision::Wait(Duration::from_micros(1_000))
        );
        assert_eq!(p.decide(view(&[1, 1, 1, 1, 1], 0)), Decision::Dispatch(4));
        assert_eq!(
            p.decide(view(&[3, 2], 0)),
            Decision::Wait(Duration::from_micros(1_000))
        );
    }

    #[test]
    fn zero_delay_takes_what_queued() {
        let mut p = policy(8, 0, &[]);
        assert_eq!(p.decide(view(&[1, 2, 1], 0)), Decision::Dispatch(3));
    }

    #[test]
    fn no_batching_runs_one_request() {
        assert_eq!(
            NoBatching.decide(view(&[1, 1, 1], 0)),
            Decision::Dispatch(1)
        );
    }
}
