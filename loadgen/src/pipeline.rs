//! One experiment through Crayfish's pipeline: producer → input topic →
//! processor (`mp` tasks, each scoring its partition's events in order) →
//! output topic → sink, which stamps each event's end time.

use crate::event::{Event, Outcome, Output};
use crate::schedule::Schedule;
use crate::scorer::Scorer;
use crate::transport::{topic, Message, SendError, Stamp, TopicSender};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the producer sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    /// Open loop: sends at the schedule's times, whatever the system does.
    Open(Schedule),
    /// One event in flight at a time, for latency at low load.
    Closed,
}

#[derive(Debug, Clone)]
pub struct Experiment {
    pub load: Load,
    pub duration: Duration,
    /// Processor parallelism (and input partitions).
    pub mp: usize,
    /// Data points per event (`bsz`).
    pub rows: u32,
    /// f32 values per data point (the product of `isz`).
    pub point_len: usize,
    /// Key space for keyed workloads; `None`: keyless.
    pub keys: Option<u64>,
    /// Zipf exponent of the key distribution; uniform when absent.
    pub zipf: Option<f64>,
    pub seed: u64,
    /// Input partition buffer; a full one rejects (counted), never blocks.
    pub partition_capacity: usize,
    /// Event payloads to cycle through (from a `.npy` file); seeded
    /// synthetic data when absent.
    pub data: Option<Arc<Vec<Bytes>>>,
}

/// One event's fate: when it was scheduled, its latency, its outcome.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub scheduled_ns: u64,
    pub latency_ns: u64,
    pub outcome: Outcome,
}

/// Where an event's end time came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndTime {
    /// The broker's LogAppendTime of the output message.
    LogAppendTime,
    /// The sink's clock when it received the output message.
    SinkReceive,
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub produced: u64,
    /// Events the producer could not hand to the input topic.
    pub input_rejected: u64,
    /// Events the input topic accepted locally but the broker refused.
    pub input_lost: u64,
    /// Scored events whose output the broker refused.
    pub output_lost: u64,
    /// Events a processor could not decode.
    pub malformed: u64,
    pub end_time: EndTime,
    /// Every event that reached the sink.
    pub records: Vec<Record>,
    pub duration: Duration,
    /// The offered rate, events/s (for open loop).
    pub offered_rate: f64,
}

impl RunResult {
    /// A run that produced nothing.
    pub fn empty() -> Self {
        Self {
            produced: 0,
            input_rejected: 0,
            input_lost: 0,
            output_lost: 0,
            malformed: 0,
            end_time: EndTime::SinkReceive,
            records: Vec::new(),
            duration: Duration::from_secs(1),
            offered_rate: 0.0,
        }
    }
}

/// xorshift64*: seeded and allocation-free.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Draws keys `0..n`, uniformly or Zipf-distributed (key 0 the hottest).
#[derive(Debug, Clone)]
pub struct KeySampler {
    n: u64,
    /// Cumulative probabilities, for Zipf.
    cdf: Option<Vec<f64>>,
}

impl KeySampler {
    pub fn new(n: u64, zipf: Option<f64>) -> Self {
        let n = n.max(1);
        let cdf = zipf.map(|s| {
            let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
            let total: f64 = weights.iter().sum();
            let mut acc = 0.0;
            weights
                .iter()
                .map(|w| {
                    acc += w / total;
                    acc
                })
                .collect()
        });
        Self { n, cdf }
    }

    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match &self.cdf {
            None => rng.next_u64() % self.n,
            Some(cdf) => {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (cdf.partition_point(|&c| c < u) as u64).min(self.n - 1)
            }
        }
    }
}

/// A pool of distinct seeded payloads the producer cycles through.
fn payloads(exp: &Experiment) -> Vec<Bytes> {
    if let Some(d) = exp.data.as_ref().filter(|d| !d.is_empty()) {
        return d.as_ref().clone();
    }
    synthetic_payloads(exp.seed, 16, exp.rows as usize * exp.point_len)
}

/// `count` seeded payloads of `len` f32 values in [0, 1).
pub fn synthetic_payloads(seed: u64, count: usize, len: usize) -> Vec<Bytes> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let v: Vec<f32> = (0..len)
                .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
                .collect();
            Bytes::copy_from_slice(bytemuck::cast_slice(&v))
        })
        .collect()
}

/// Where the topics live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// In-memory channels: nothing else needed.
    Memory,
    /// A Kafka-protocol broker, e.g. `127.0.0.1:9092`.
    Kafka { brokers: String },
}

pub(crate) enum InputSide {
    Memory(TopicSender),
    Kafka(crate::kafka::SyncSender),
}

impl InputSide {
    fn partitions(&self) -> usize {
        match self {
            InputSide::Memory(t) => t.partitions(),
            InputSide::Kafka(k) => k.partitions(),
        }
    }
    pub(crate) fn try_send(&self, m: Message, partition: Option<usize>) -> Result<(), SendError> {
        match (self, partition) {
            (InputSide::Memory(t), None) => t.try_send(m),
            (InputSide::Memory(t), Some(p)) => t.try_send_to(p, m),
            (InputSide::Kafka(k), p) => k.try_send(m, p),
        }
    }
    /// Waits until queued messages are with the broker.
    pub(crate) fn flush(&self) {
        if let InputSide::Kafka(k) = self {
            k.flush();
        }
    }

    /// Messages accepted locally that never reached the broker.
    fn finish(&self) -> u64 {
        match self {
            InputSide::Memory(_) => 0,
            InputSide::Kafka(k) => {
                k.flush();
                k.failed.load(Relaxed)
            }
        }
    }
}

enum PartitionRx {
    Memory(tokio::sync::mpsc::Receiver<Message>),
    Kafka(crate::kafka::Receiver),
}

impl PartitionRx {
    async fn recv(&mut self) -> Option<(Message, Option<i64>)> {
        match self {
            PartitionRx::Memory(r) => r.recv().await.map(|m| (m, None)),
            PartitionRx::Kafka(r) => r.recv().await,
        }
    }
}

#[derive(Clone)]
enum OutputSide {
    Memory(TopicSender),
    Kafka(Arc<crate::kafka::AsyncSender>),
}

impl OutputSide {
    async fn send(&self, m: Message) -> Result<(), SendError> {
        match self {
            OutputSide::Memory(t) => t.send(m).await,
            OutputSide::Kafka(k) => k.send(m).await,
        }
    }
}

/// A one-byte payload marks the warm-up message (events and outputs are
/// longer).
fn ready() -> Message {
    Message {
        key: None,
        payload: Bytes::from_static(&[0xff]),
        stamp: None,
    }
}

/// Sends a marker through every input partition, forwards it to the output
/// topic and reads it back, so that every consumer is assigned and fetching.
async fn warm_up(
    input: &InputSide,
    partitions: &mut [PartitionRx],
    output: &OutputSide,
    sink: &mut PartitionRx,
) -> Result<(), RunError> {
    let timeout = Duration::from_secs(30);
    let stuck = |what: &str| RunError::WarmUp(format!("{what} did not arrive within {timeout:?}"));
    for p in 0..partitions.len() {
        input
            .try_send(ready(), Some(p))
            .map_err(|e| RunError::WarmUp(format!("{e:?}")))?;
    }
    input.flush();
    for rx in partitions.iter_mut() {
        tokio::time::timeout(timeout, rx.recv())
            .await
            .map_err(|_| stuck("an input marker"))?;
        output
            .send(ready())
            .await
            .map_err(|e| RunError::WarmUp(format!("{e:?}")))?;
    }
    for _ in 0..partitions.len() {
        tokio::time::timeout(timeout, sink.recv())
            .await
            .map_err(|_| stuck("an output marker"))?;
    }
    Ok(())
}

/// An empty payload marks the end of a partition's stream: events and
/// outputs are never empty. Kafka topics do not close, so the producer ends
/// every partition with one, each processor forwards one, and the sink
/// stops after one per processor.
fn eos() -> Message {
    Message {
        key: None,
        payload: Bytes::new(),
        stamp: None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaSetupError),
    #[error("topics did not come up: {0}")]
    WarmUp(String),
    #[error("kafka-native mode needs a broker (--brokers)")]
    NeedsBroker,
}

/// Runs the experiment on in-memory topics.
pub async fn run(exp: &Experiment, scorer: Scorer) -> RunResult {
    run_on(exp, scorer, &Transport::Memory)
        .await
        .expect("in-memory topics cannot fail to set up")
}

/// Runs the experiment to the end: every produced event is scored, fails
/// with a reason, or is counted as failed at the input.
pub async fn run_on(
    exp: &Experiment,
    scorer: Scorer,
    transport: &Transport,
) -> Result<RunResult, RunError> {
    run_live(exp, scorer, transport, None).await
}

/// Like [`run_on`], keeping `live` figures up to date for a progress bar.
pub async fn run_live(
    exp: &Experiment,
    mut scorer: Scorer,
    transport: &Transport,
    live: Option<Arc<crate::progress::Live>>,
) -> Result<RunResult, RunError> {
    if let Scorer::KafkaNative(target) = &scorer {
        return match transport {
            Transport::Kafka { brokers } => crate::native::run(exp, target, brokers, live).await,
            Transport::Memory => Err(RunError::NeedsBroker),
        };
    }
    let mp = exp.mp.max(1);
    let sink_live = live.clone();
    let (input, partitions, output, sink_rx, kafka_topics) = match transport {
        Transport::Memory => {
            let (input, partitions) = topic(mp, exp.partition_capacity);
            let (output, mut outputs) = topic(1, 1 << 16);
            let sink_rx = PartitionRx::Memory(outputs.pop().expect("one partition"));
            let partitions: Vec<PartitionRx> =
                partitions.into_iter().map(PartitionRx::Memory).collect();
            (
                InputSide::Memory(input),
                partitions,
                OutputSide::Memory(output),
                sink_rx,
                None,
            )
        }
        Transport::Kafka { brokers } => {
            static RUN: AtomicU64 = AtomicU64::new(0);
            let tag = format!(
                "{}-{}-{}",
                std::process::id(),
                exp.seed,
                RUN.fetch_add(1, Relaxed)
            );
            let t = crate::kafka::Topics::create(brokers, mp, &tag).await?;
            let partitions = (0..mp)
                .map(|p| t.receiver(&t.input, p).map(PartitionRx::Kafka))
                .collect::<Result<Vec<_>, _>>()?;
            let sink_rx = PartitionRx::Kafka(t.receiver(&t.output, 0)?);
            let output = OutputSide::Kafka(Arc::new(t.output_sender()?));
            (
                InputSide::Kafka(t.input_sender()?),
                partitions,
                output,
                sink_rx,
                Some(t),
            )
        }
    };
    let (mut partitions, mut sink_rx) = (partitions, sink_rx);
    if kafka_topics.is_some() {
        // Fresh topics: consumers join, get assigned and make their first
        // fetch lazily, which takes about a second. Push one marker through
        // every partition and the output before the clock starts, so that
        // start-up is not measured as latency.
        warm_up(&input, &mut partitions, &output, &mut sink_rx).await?;
    }
    let clock = Clock::start();
    scorer.clock_starts(clock.t0);

    // Closed loop: the sink tells the producer when an event is done.
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<u64>();
    let mut tally = Tally::new(
        clock,
        sink_live,
        (exp.load == Load::Closed).then_some(ack_tx),
    );
    let sink = tokio::spawn(async move {
        let mut ended = 0;
        while let Some((m, log_append_ms)) = sink_rx.recv().await {
            let end = Instant::now();
            if m.payload.is_empty() {
                ended += 1;
                if ended == mp {
                    break;
                }
                continue;
            }
            let Ok(o) = Output::decode(m.payload) else {
                continue;
            };
            tally.add(o.seq, o.scheduled_ns, o.outcome, log_append_ms, end);
        }
        tally
    });

    let malformed = Arc::new(AtomicU64::new(0));
    let mut processors = Vec::new();
    for mut rx in partitions {
        let output = output.clone();
        let mut scorer = scorer.clone();
        let malformed = malformed.clone();
        processors.push(tokio::spawn(async move {
            while let Some((m, _)) = rx.recv().await {
                if m.payload.is_empty() {
                    break;
                }
                let Ok(e) = Event::decode(m.payload) else {
                    malformed.fetch_add(1, Relaxed);
                    continue;
                };
                let outcome = scorer.score(&e).await;
                let out = Output {
                    seq: e.seq,
                    scheduled_ns: e.scheduled_ns,
                    outcome,
                };
                if output
                    .send(Message {
                        key: e.key,
                        payload: out.encode(),
                        stamp: None,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = output.send(eos()).await;
        }));
    }
    let output_failures = match &output {
        OutputSide::Kafka(k) => Some(k.clone()),
        OutputSide::Memory(_) => None,
    };
    drop(output);

    let produced = produce(exp, input, clock.t0, live, ack_rx, Encoding::Event).await;
    for p in processors {
        let _ = p.await;
    }
    let tally = sink.await.expect("sink task");
    let output_lost = output_failures.map_or(0, |k| {
        k.flush();
        k.failed.load(Relaxed)
    });
    if let Some(t) = kafka_topics {
        t.delete().await;
    }
    Ok(tally.result(exp, produced, output_lost, malformed.load(Relaxed)))
}

/// The run's start, 10 ms after it is taken, on the monotonic clock and
/// the wall clock (for the broker's LogAppendTime).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    pub t0: Instant,
    t0_wall_ns: i128,
}

impl Clock {
    pub(crate) fn start() -> Self {
        let lead = Duration::from_millis(10);
        Self {
            t0: Instant::now() + lead,
            t0_wall_ns: (std::time::SystemTime::now() + lead)
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0),
        }
    }
}

/// What the producer did: events produced, refused at the input topic,
/// and taken there but then refused by the broker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Produced {
    pub produced: u64,
    pub rejected: u64,
    pub lost: u64,
}

/// Runs the producer to its end (see [`spawn_producer`]).
pub(crate) async fn produce(
    exp: &Experiment,
    input: InputSide,
    t0: Instant,
    live: Option<Arc<crate::progress::Live>>,
    ack_rx: std::sync::mpsc::Receiver<u64>,
    encoding: Encoding,
) -> Produced {
    let rejected = Arc::new(AtomicU64::new(0));
    let producer = spawn_producer(exp, input, t0, live, ack_rx, rejected.clone(), encoding);
    let (produced, lost) =
        tokio::task::spawn_blocking(move || producer.join().expect("producer thread"))
            .await
            .expect("join");
    Produced {
        produced,
        rejected: rejected.load(Relaxed),
        lost,
    }
}

/// The sink's books: each event that came back, with its latency from its
/// scheduled time.
pub(crate) struct Tally {
    clock: Clock,
    records: Vec<Record>,
    log_append_used: bool,
    live: Option<Arc<crate::progress::Live>>,
    /// Closed loop: tells the producer an event is done.
    ack: Option<std::sync::mpsc::Sender<u64>>,
}

impl Tally {
    pub(crate) fn new(
        clock: Clock,
        live: Option<Arc<crate::progress::Live>>,
        ack: Option<std::sync::mpsc::Sender<u64>>,
    ) -> Self {
        Self {
            clock,
            records: Vec::new(),
            log_append_used: false,
            live,
            ack,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Books event `seq`, received at `end` (or appended to the output
    /// topic at `log_append_ms`, when the broker really gives that time).
    pub(crate) fn add(
        &mut self,
        seq: u64,
        scheduled_ns: u64,
        outcome: Outcome,
        log_append_ms: Option<i64>,
        end: Instant,
    ) {
        let c = &self.clock;
        let latency_ns = match log_append_ms {
            Some(ms) => {
                self.log_append_used = true;
                (ms as i128 * 1_000_000 - (c.t0_wall_ns + scheduled_ns as i128)).max(0) as u64
            }
            None => end
                .saturating_duration_since(c.t0 + Duration::from_nanos(scheduled_ns))
                .as_nanos() as u64,
        };
        self.records.push(Record {
            scheduled_ns,
            latency_ns,
            outcome,
        });
        if let Some(l) = &self.live {
            l.done(latency_ns);
        }
        if let Some(ack) = &self.ack {
            let _ = ack.send(seq);
        }
    }

    /// The run's result.
    pub(crate) fn result(
        self,
        exp: &Experiment,
        p: Produced,
        output_lost: u64,
        malformed: u64,
    ) -> RunResult {
        let offered_rate = match &exp.load {
            Load::Open(_) => p.produced as f64 / exp.duration.as_secs_f64(),
            Load::Closed => self.records.len() as f64 / exp.duration.as_secs_f64(),
        };
        RunResult {
            produced: p.produced,
            input_rejected: p.rejected,
            input_lost: p.lost,
            output_lost,
            malformed,
            records: self.records,
            duration: exp.duration,
            offered_rate,
            end_time: if self.log_append_used {
                EndTime::LogAppendTime
            } else {
                EndTime::SinkReceive
            },
        }
    }
}

/// How the producer writes an event to the input topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// loadgen's own event encoding, each partition ended by a marker, for
    /// loadgen's processors.
    Event,
    /// The raw tensor bytes, the event's identity in headers and no end
    /// markers, for a server that consumes the topic itself.
    Raw,
}

/// Starts the producer on an OS thread of its own, so it keeps its schedule
/// whatever the runtime is doing. It returns the events it produced and
/// those the broker refused after taking them.
fn spawn_producer(
    exp: &Experiment,
    input: InputSide,
    t0: Instant,
    live: Option<Arc<crate::progress::Live>>,
    ack_rx: std::sync::mpsc::Receiver<u64>,
    rej: Arc<AtomicU64>,
    encoding: Encoding,
) -> std::thread::JoinHandle<(u64, u64)> {
    let exp2 = exp.clone();
    std::thread::spawn(move || {
        let pool = payloads(&exp2);
        let mut rng = Rng::new(exp2.seed ^ 0x5eed);
        let offsets = match &exp2.load {
            Load::Open(s) => s.offsets(exp2.duration),
            Load::Closed => Vec::new(),
        };
        let mut seq = 0u64;
        let sampler = exp2.keys.map(|n| KeySampler::new(n, exp2.zipf));
        let mut send = |scheduled: Duration, seq: u64| {
            let key = sampler
                .as_ref()
                .map(|k| format!("key-{}", k.sample(&mut rng)));
            let payload = pool[seq as usize % pool.len()].clone();
            let scheduled_ns = scheduled.as_nanos() as u64;
            let m = match encoding {
                Encoding::Event => Message {
                    payload: Event {
                        seq,
                        scheduled_ns,
                        key: key.clone(),
                        rows: exp2.rows,
                        payload,
                    }
                    .encode(),
                    key,
                    stamp: None,
                },
                Encoding::Raw => Message {
                    key,
                    payload,
                    stamp: Some(Stamp { seq, scheduled_ns }),
                },
            };
            match input.try_send(m, None) {
                Ok(()) => {
                    if let Some(l) = &live {
                        l.sent();
                    }
                    true
                }
                Err(SendError::Full) | Err(SendError::Closed) => {
                    rej.fetch_add(1, Relaxed);
                    false
                }
            }
        };
        match &exp2.load {
            Load::Open(_) => {
                for off in offsets {
                    let at = t0 + off;
                    let now = Instant::now();
                    if at > now + Duration::from_micros(50) {
                        std::thread::sleep(at - now);
                    }
                    send(off, seq);
                    seq += 1;
                }
            }
            Load::Closed => {
                while t0.elapsed() < exp2.duration {
                    let off = Instant::now().saturating_duration_since(t0);
                    if send(off, seq) && ack_rx.recv_timeout(Duration::from_secs(30)).is_err() {
                        break;
                    }
                    seq += 1;
                }
            }
        }
        if encoding == Encoding::Event {
            // End every partition's stream; these markers wait for room.
            for p in 0..input.partitions() {
                while let Err(SendError::Full) = input.try_send(eos(), Some(p)) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let lost = input.finish();
        (seq, lost)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_keys_follow_their_law() {
        let n = 100;
        let k = KeySampler::new(n, Some(1.0));
        let mut rng = Rng::new(1);
        let draws = 200_000;
        let mut counts = vec![0u64; n as usize];
        for _ in 0..draws {
            counts[k.sample(&mut rng) as usize] += 1;
        }
        let h: f64 = (1..=n).map(|i| 1.0 / i as f64).sum();
        for (i, &c) in counts.iter().enumerate().take(5) {
            let want = draws as f64 / ((i + 1) as f64 * h);
            assert!(
                (c as f64 / want - 1.0).abs() < 0.05,
                "key {i}: {c} vs {want}"
            );
        }
        let uniform = KeySampler::new(n, None);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5_000 {
            seen.insert(uniform.sample(&mut rng));
        }
        assert_eq!(seen.len(), n as usize);
    }
}
