//! kafka-native mode: shoal itself consumes the input topic and writes the
//! output topic (its `--kafka-*` flags), so the pipeline has no processor
//! of its own: producer → input topic → shoal → output topic (or error
//! topic) → sink. The producer sends raw tensors with the event's identity
//! in headers, which shoal carries over to its answer.

use crate::event::Outcome;
use crate::kafka::{Beside, Stamped, Topics};
use crate::pipeline::{
    produce, Clock, Encoding, Experiment, InputSide, Load, RunError, RunResult, Tally,
};
use crate::transport::{Message, Stamp};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The shoal that serves a kafka-native run: started per run, since each
/// run has fresh topics.
#[derive(Debug, Clone)]
pub struct Target {
    pub bin: PathBuf,
    pub repository: PathBuf,
    pub model: String,
    /// Give shoal a state topic (`--kafka-state-topic`): a snapshot of
    /// each key's state per scored event of a stateful model.
    pub state_topic: bool,
}

/// The sequence number of warm-up events (real events never reach it).
const WARM_UP_SEQ: u64 = u64::MAX;

/// How long the sink waits for the rest once the producer is done and
/// nothing arrives: what is still missing then is counted lost.
const STALL: Duration = Duration::from_secs(30);

/// A `shoal` consuming the run's topics; SIGTERM (drain and commit), then
/// kill, when dropped.
struct Consuming(shoal::launch::Launched);

impl Drop for Consuming {
    fn drop(&mut self) {
        self.0.sigterm();
        let _ = self.0.wait_exit(Duration::from_secs(10));
    }
}

/// What an output or error record says became of its event.
fn outcome(s: &Stamped) -> Outcome {
    match s.reason.as_deref() {
        None => Outcome::Scored,
        Some("deadline_exceeded") => Outcome::TimedOut,
        Some(_) => Outcome::Rejected,
    }
}

/// Runs `exp` through a shoal that consumes the topics itself.
pub async fn run(
    exp: &Experiment,
    target: &Target,
    brokers: &str,
    live: Option<Arc<crate::progress::Live>>,
) -> Result<RunResult, RunError> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let mp = exp.mp.max(1);
    let tag = format!(
        "{}-{}-n{}",
        std::process::id(),
        exp.seed,
        RUN.fetch_add(1, Relaxed)
    );
    let beside = Beside {
        errors: true,
        state: target.state_topic,
    };
    let topics = Topics::create_with(brokers, mp, &tag, beside).await?;
    let result = run_on(exp, target, &topics, &tag, live).await;
    topics.delete().await;
    result
}

async fn run_on(
    exp: &Experiment,
    target: &Target,
    t: &Topics,
    tag: &str,
    live: Option<Arc<crate::progress::Live>>,
) -> Result<RunResult, RunError> {
    let mp = t.partitions;
    let errors = t.errors.clone().expect("created with an error topic");
    let mut args: Vec<String> = vec![
        "--kafka-brokers".into(),
        t.brokers.clone(),
        "--kafka-input-topic".into(),
        t.input.clone(),
        "--kafka-output-topic".into(),
        t.output.clone(),
        "--kafka-error-topic".into(),
        errors.clone(),
        "--kafka-model".into(),
        target.model.clone(),
        "--kafka-input-format".into(),
        "raw".into(),
        "--kafka-group-id".into(),
        format!("loadgen-{tag}"),
    ];
    if let Some(st) = &t.state {
        args.extend(["--kafka-state-topic".into(), st.clone()]);
    }
    let (bin, repo) = (target.bin.clone(), target.repository.clone());
    let server = tokio::task::spawn_blocking(move || {
        let log = std::env::var("SHOAL_LOG").unwrap_or_else(|_| "warn".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        shoal::launch::Launched::start(&bin, &repo, &args, &log)
    })
    .await
    .expect("launcher thread")
    .map_err(|e| RunError::WarmUp(format!("cannot start shoal: {e}")))?;
    let server = Consuming(server);

    let mut answers = t.receiver(&t.output, 0)?;
    let mut refusals = t.receiver(&errors, 0)?;
    let input = InputSide::Kafka(t.input_sender()?);

    // shoal joins its group and takes its partitions in the background:
    // one real event per partition, answered, before the clock starts
    // (keyed: a stateful model takes no keyless event).
    let pool = crate::pipeline::synthetic_payloads(exp.seed, 1, exp.rows as usize * exp.point_len);
    for p in 0..mp {
        let m = Message {
            key: Some(format!("loadgen-warm-up-{p}")),
            payload: pool[0].clone(),
            stamp: Some(Stamp {
                seq: WARM_UP_SEQ,
                scheduled_ns: 0,
            }),
        };
        input
            .try_send(m, Some(p))
            .map_err(|e| RunError::WarmUp(format!("{e:?}")))?;
    }
    input.flush();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut warmed = 0;
    while warmed < mp {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = tokio::time::timeout(left, async {
            tokio::select! {
                s = answers.recv_stamped() => s,
                s = refusals.recv_stamped() => s,
            }
        })
        .await
        .map_err(|_| {
            RunError::WarmUp(format!(
                "shoal answered {warmed} of {mp} warm-up events within 60 s"
            ))
        })?;
        match got {
            Some(s) if s.reason.is_some() => {
                return Err(RunError::WarmUp(format!(
                    "shoal refused a warm-up event: {}",
                    s.reason.unwrap_or_default()
                )))
            }
            Some(_) => warmed += 1,
            None => return Err(RunError::WarmUp("the output topic closed".into())),
        }
    }

    let clock = Clock::start();
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<u64>();
    let mut tally = Tally::new(
        clock,
        live.clone(),
        (exp.load == Load::Closed).then_some(ack_tx),
    );
    // The producer's final count, once known: the sink stops when it has
    // that many (Kafka topics do not end, and shoal writes no end markers).
    let (expect_tx, mut expect_rx) = tokio::sync::watch::channel(None::<u64>);
    let sink = tokio::spawn(async move {
        loop {
            let expected = *expect_rx.borrow();
            if expected.is_some_and(|n| tally.len() as u64 >= n) {
                break;
            }
            let got = tokio::select! {
                s = answers.recv_stamped() => s,
                s = refusals.recv_stamped() => s,
                changed = expect_rx.changed(), if expected.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
                _ = tokio::time::sleep(STALL), if expected.is_some() => break,
            };
            let end = Instant::now();
            let Some(s) = got else { break };
            if let Some(stamp) = s.stamp.filter(|s| s.seq != WARM_UP_SEQ) {
                tally.add(
                    stamp.seq,
                    stamp.scheduled_ns,
                    outcome(&s),
                    s.log_append_ms,
                    end,
                );
            }
        }
        tally
    });

    let p = produce(exp, input, clock.t0, live, ack_rx, Encoding::Raw).await;
    let sent = p.produced - p.rejected - p.lost;
    let _ = expect_tx.send(Some(sent));
    let tally = sink.await.expect("sink task");
    drop(server);
    // Sent and never answered nor refused within the stall timeout.
    let lost = sent.saturating_sub(tally.len() as u64);
    Ok(tally.result(exp, p, lost, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reasons_map_to_outcomes() {
        let s = |reason: Option<&str>| Stamped {
            stamp: None,
            reason: reason.map(str::to_string),
            log_append_ms: None,
        };
        assert_eq!(outcome(&s(None)), Outcome::Scored);
        assert_eq!(outcome(&s(Some("deadline_exceeded"))), Outcome::TimedOut);
        assert_eq!(outcome(&s(Some("overloaded"))), Outcome::Rejected);
        assert_eq!(outcome(&s(Some("invalid_argument"))), Outcome::Rejected);
    }
}
