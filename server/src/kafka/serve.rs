//! The consumer thread and the tasks that finish each message.
//!
//! One thread polls the group consumer and submits every message to the
//! engine as it arrives, so submission order is offset order and the
//! engine's per-key tickets keep each key's messages in that order. The
//! wait for the answer, the produce of the result and the acknowledgement
//! run as tokio tasks, many at once (different keys batch together). The
//! rebalance callbacks run on the same thread inside `poll`, so a revoked
//! partition is drained and committed before the group moves it.

use super::codec::{self, Refusal};
use super::limit::InFlightLimit;
use super::metric;
use super::offsets::{Offsets, Taken};
use super::order::{KeyOrder, Turn};
use super::snapshot::{self, Snapshot, StateKey};
use super::{KafkaConfig, KafkaError};
use crate::engine::state::KeyState;
use crate::engine::{Engine, EngineError, InferResponse, Restored};
use crate::shm::SharedMemory;
use bytes::Bytes;
use metrics::Counter;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// How often finished prefixes are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// How often the lag gauge is refreshed.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// How long a revoke waits for its partitions' messages to finish; what
/// is still running after it is left uncommitted, for the new owner to
/// score again.
const REVOKE_WAIT: Duration = Duration::from_secs(30);
/// How long a message waits for a full model to take it before it goes
/// to the error topic as overloaded.
const OVERLOAD_WAIT: Duration = Duration::from_secs(30);
/// How long startup waits for the brokers to answer.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long a restore may take to read the state of newly assigned
/// partitions; past it serving stops rather than score without the state.
const RESTORE_WAIT: Duration = Duration::from_secs(120);

/// What the consumer thread, its callbacks and the tasks share.
struct Shared {
    cfg: KafkaConfig,
    engine: Engine,
    offsets: Offsets,
    /// Each key's answers reach the output topic in offset order.
    order: KeyOrder,
    /// Each key's results are acknowledged, and its snapshots enqueued, in
    /// offset order (`--kafka-state-topic`): a snapshot never covers a
    /// message whose answer or error record could still be lost.
    state_order: KeyOrder,
    /// Per assigned partition, what the state topic held of each key, until
    /// the key's first message past it.
    restored: parking_lot::Mutex<HashMap<i32, HashMap<StateKey, Covered>>>,
    rt: tokio::runtime::Handle,
    /// How many messages may be in flight (`--kafka-max-in-flight` at
    /// most, fewer where a model's latency objective needs it).
    limit: InFlightLimit,
    producer: FutureProducer,
    /// Stops intake; set by `stop` or by a fatal error.
    stop: AtomicBool,
    /// How long the consumer thread waits for taken messages at a stop.
    drain_ms: AtomicU64,
    /// Cancelled on an error after which offsets can no longer be
    /// committed safely (a result the broker would not take).
    fatal: CancellationToken,
    fatal_reason: parking_lot::Mutex<Option<String>>,
    /// Requests never reference shared memory from a Kafka message: an
    /// empty registry refuses any that try.
    shm: SharedMemory,
    scored: Counter,
    failed: Counter,
    error_records: Counter,
    pauses: Counter,
    snapshots: Counter,
    replays_skipped: Counter,
}

impl Shared {
    /// A result the broker would not take: nothing past it may be
    /// committed, so serving stops.
    fn not_taken(&self, what: &str, t: Taken, e: RdError) {
        self.fail(format!(
            "{what} partition {} offset {} was not taken by the broker: {e}",
            t.partition, t.offset
        ))
    }

    fn fail(&self, reason: String) {
        tracing::error!("kafka-native serving stops: {reason}");
        self.fatal_reason.lock().get_or_insert(reason);
        self.stop.store(true, Relaxed);
        self.fatal.cancel();
    }
}

/// The group's callbacks: drain and commit on revoke, fresh books on
/// assign.
struct GroupContext {
    shared: Arc<Shared>,
}

impl ClientContext for GroupContext {}

/// The partitions of `topic` in a rebalance's list.
fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect()
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let s = &self.shared;
        let parts = partitions_of(tpl, &s.cfg.input_topic);
        metrics::counter!(metric::REBALANCES, "kind" => "revoke").increment(parts.len() as u64);
        if !s.offsets.drain(Some(&parts), REVOKE_WAIT) {
            tracing::warn!(
                partitions = ?parts,
                "revoked partitions still had messages in flight after {REVOKE_WAIT:?}: they stay uncommitted and their new owner scores them again"
            );
        }
        if !s.fatal.is_cancelled() {
            commit(consumer, s, Some(&parts));
        }
        let mut restored = s.restored.lock();
        for p in &parts {
            s.offsets.revoke(*p);
            restored.remove(p);
            metrics::gauge!(metric::LAG, "partition" => p.to_string()).set(0.0);
        }
        drop(restored);
        tracing::info!(partitions = ?parts, "kafka partitions revoked");
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else {
            return;
        };
        let s = &self.shared;
        let parts = partitions_of(tpl, &s.cfg.input_topic);
        for p in &parts {
            s.offsets.assign(*p);
        }
        metrics::counter!(metric::REBALANCES, "kind" => "assign").increment(parts.len() as u64);
        tracing::info!(partitions = ?parts, "kafka partitions assigned");
        if let (Some(topic), false) = (&s.cfg.state_topic, parts.is_empty()) {
            // Before any message of these partitions is taken: the poll
            // that runs this callback returns their first one after it.
            restore(s, topic, &parts);
        }
    }
}

/// Commits what is wholly done, synchronously.
fn commit(consumer: &BaseConsumer<GroupContext>, s: &Shared, only: Option<&[i32]>) {
    let todo = s.offsets.to_commit(only);
    if todo.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for &(p, o) in &todo {
        if let Err(e) = tpl.add_partition_offset(&s.cfg.input_topic, p, Offset::Offset(o)) {
            tracing::warn!("cannot commit partition {p}: {e}");
            return;
        }
    }
    let t = Instant::now();
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            metrics::histogram!(metric::COMMIT_DURATION).record(t.elapsed().as_secs_f64());
            s.offsets.committed(&todo);
        }
        // Retried at the next tick (a rebalance in progress refuses it).
        Err(e) => tracing::debug!("offset commit failed, retried: {e}"),
    }
}

/// What the state topic held of a key when its partition was assigned.
#[derive(Debug, Clone, Copy)]
struct Covered {
    /// The input offset the key's snapshot reflects: messages up to it are
    /// replays, answered before, and skipped.
    offset: i64,
    /// Whether its state was installed, or had expired (the key idle past
    /// its model's `idle_timeout`), so that its next message starts afresh.
    installed: bool,
}

/// Installs the keyed state of newly assigned partitions from the state
/// topic and books, per key, the input offset it reflects. A key idle past
/// its model's `idle_timeout` (its snapshot's age) is expired, as in a
/// process that had held it all along, rather than brought back. A state
/// topic that cannot be read stops serving: scoring on without the state
/// would answer wrongly, silently.
fn restore(s: &Shared, topic: &str, parts: &[i32]) {
    let t = Instant::now();
    let (found, unreadable) =
        match snapshot::read(&s.cfg, topic, &s.producer, &s.rt, parts, RESTORE_WAIT) {
            Ok(f) => f,
            Err(e) => return s.fail(e.to_string()),
        };
    let (mut installed, mut expired, mut refused) = (0u64, 0u64, 0u64);
    let now = SystemTime::now();
    let mut books = s.restored.lock();
    for ((p, k), stored) in found {
        let idle_for = stored.idle_for(now);
        let Snapshot { offset, state } = stored.snapshot;
        let done = s
            .engine
            .model(&k.model, Some(&k.version))
            .and_then(|mv| mv.restore_state(&key_string(&k.key), state, idle_for));
        match done {
            Ok(outcome) => {
                let was_installed = outcome == Restored::Installed;
                if was_installed {
                    installed += 1;
                } else {
                    expired += 1;
                }
                books.entry(p).or_default().insert(
                    k,
                    Covered {
                        offset,
                        installed: was_installed,
                    },
                );
            }
            Err(e) => {
                refused += 1;
                tracing::warn!(
                    partition = p,
                    "a key's state is not restored, the key starts afresh: {e}"
                );
            }
        }
    }
    drop(books);
    let took = t.elapsed();
    metrics::histogram!(metric::RESTORE_DURATION).record(took.as_secs_f64());
    metrics::counter!(metric::RESTORED_KEYS, "outcome" => "restored").increment(installed);
    metrics::counter!(metric::RESTORED_KEYS, "outcome" => "expired").increment(expired);
    metrics::counter!(metric::RESTORED_KEYS, "outcome" => "refused").increment(refused);
    tracing::info!(
        partitions = ?parts,
        keys = installed,
        expired,
        refused,
        unreadable,
        "keyed state restored from {topic} in {took:?}"
    );
}

/// Kafka-native serving, running.
pub struct KafkaServing {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl KafkaServing {
    /// Connects (failing within a few seconds when no broker answers or a
    /// topic is missing), joins the group and starts consuming. Blocking:
    /// call from a blocking context. `rt` runs the per-message tasks.
    pub fn start(
        engine: Engine,
        cfg: KafkaConfig,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, KafkaError> {
        metric::describe();
        let broker_err = |reason: String| KafkaError::Broker {
            brokers: cfg.brokers.clone(),
            reason,
        };
        let mut producer_cfg = ClientConfig::new();
        producer_cfg
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "1");
        let mut consumer_cfg = ClientConfig::new();
        consumer_cfg
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            // tansu (and a quiet topic on any broker) holds a fetch this
            // long when no data is ready: a message's latency floor.
            .set("fetch.wait.max.ms", "5")
            .set("enable.partition.eof", "false");
        for (k, v) in &cfg.properties {
            producer_cfg.set(k, v);
            consumer_cfg.set(k, v);
        }
        let producer: FutureProducer = producer_cfg
            .create()
            .map_err(|e| broker_err(e.to_string()))?;
        let shared = Arc::new(Shared {
            engine,
            offsets: Offsets::default(),
            order: KeyOrder::default(),
            state_order: KeyOrder::default(),
            restored: Default::default(),
            rt: rt.clone(),
            limit: InFlightLimit::new(cfg.max_in_flight),
            producer,
            stop: AtomicBool::new(false),
            drain_ms: AtomicU64::new(30_000),
            fatal: CancellationToken::new(),
            fatal_reason: Default::default(),
            shm: SharedMemory::new(),
            scored: metrics::counter!(metric::MESSAGES, "outcome" => "scored"),
            failed: metrics::counter!(metric::MESSAGES, "outcome" => "failed"),
            error_records: metrics::counter!(metric::ERROR_RECORDS),
            pauses: metrics::counter!(metric::PAUSES),
            snapshots: metrics::counter!(metric::SNAPSHOTS),
            replays_skipped: metrics::counter!(metric::REPLAYS_SKIPPED),
            cfg: cfg.clone(),
        });
        let consumer: BaseConsumer<GroupContext> = consumer_cfg
            .create_with_context(GroupContext {
                shared: shared.clone(),
            })
            .map_err(|e| broker_err(e.to_string()))?;
        let mut topics = vec![cfg.input_topic.as_str(), cfg.output_topic.as_str()];
        topics.extend(cfg.error_topic.as_deref());
        topics.extend(cfg.state_topic.as_deref());
        let mut partitions = HashMap::new();
        for topic in topics {
            let md = consumer
                .fetch_metadata(Some(topic), CONNECT_WAIT)
                .map_err(|e| {
                    broker_err(format!("no broker answered within {CONNECT_WAIT:?} ({e})"))
                })?;
            let t = md.topics().iter().find(|t| t.name() == topic);
            match t.map(|t| (t.error(), t.partitions().len())) {
                Some((None, n)) if n > 0 => {
                    partitions.insert(topic, n);
                }
                Some((Some(code), _)) => {
                    let code: RDKafkaErrorCode = code.into();
                    return Err(broker_err(format!("topic {topic}: {code}")));
                }
                _ => return Err(broker_err(format!("topic {topic} does not exist"))),
            }
        }
        if let Some(state) = &cfg.state_topic {
            let (have, need) = (
                partitions[state.as_str()],
                partitions[cfg.input_topic.as_str()],
            );
            if have < need {
                return Err(KafkaError::Config(format!(
                    "--kafka-state-topic {state} has {have} partitions, fewer than the {need} of {}: input partition p keeps its keys' state in state partition p",
                    cfg.input_topic
                )));
            }
        }
        consumer
            .subscribe(&[&cfg.input_topic])
            .map_err(|e| broker_err(e.to_string()))?;
        tracing::info!(
            brokers = %cfg.brokers,
            input = %cfg.input_topic,
            output = %cfg.output_topic,
            group = %cfg.group_id,
            "kafka-native serving started"
        );
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || consume(consumer, s, rt))
            .map_err(|e| KafkaError::Fatal(format!("cannot start the consumer thread: {e}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Resolves if serving stopped on an error (its reason), never
    /// otherwise.
    pub async fn failed(&self) -> String {
        self.shared.fatal.cancelled().await;
        self.shared
            .fatal_reason
            .lock()
            .clone()
            .unwrap_or_else(|| "kafka-native serving failed".into())
    }

    /// Stops taking messages, lets those taken finish (up to `timeout`),
    /// commits them and leaves the group. Blocking.
    pub fn stop(mut self, timeout: Duration) -> Result<(), KafkaError> {
        self.shared
            .drain_ms
            .store(timeout.as_millis() as u64, Relaxed);
        self.shared.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.shared.fatal_reason.lock().clone() {
            Some(r) => Err(KafkaError::Fatal(r)),
            None => Ok(()),
        }
    }
}

/// The consumer thread: poll, submit, commit, until stopped.
fn consume(consumer: BaseConsumer<GroupContext>, s: Arc<Shared>, rt: tokio::runtime::Handle) {
    let in_flight_gauge = metrics::gauge!(metric::IN_FLIGHT);
    let limit_gauge = metrics::gauge!(metric::IN_FLIGHT_LIMIT);
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now();
    while !s.stop.load(Relaxed) {
        // Backpressure: past the limit, the thread stops polling until
        // half the messages taken have finished. Fetched messages wait in
        // librdkafka's queue (queued.max.messages.kbytes bounds it) and
        // fetching stops when it is full. Pausing the partitions instead
        // would drop that queue and fetch again from the middle of a
        // record batch, which tansu (the broker here) never answers.
        let n = s.offsets.in_flight();
        let limit = s.limit.current();
        in_flight_gauge.set(n as f64);
        limit_gauge.set(limit as f64);
        if n >= limit {
            s.pauses.increment(1);
            while !s.stop.load(Relaxed)
                && !s
                    .offsets
                    .wait_below((s.limit.current() / 2).max(1), Duration::from_millis(100))
            {
                if last_commit.elapsed() >= COMMIT_EVERY && !s.fatal.is_cancelled() {
                    commit(&consumer, &s, None);
                    last_commit = Instant::now();
                }
            }
            continue;
        }
        match consumer.poll(Duration::from_millis(20)) {
            None => {}
            // A restore that failed inside this poll stopped serving.
            Some(Ok(m)) if !s.stop.load(Relaxed) => take(&s, &m, &rt),
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::warn!("kafka consumer: {e}"),
        }
        if last_commit.elapsed() >= COMMIT_EVERY && !s.fatal.is_cancelled() {
            commit(&consumer, &s, None);
            s.order.prune();
            s.state_order.prune();
            last_commit = Instant::now();
        }
        if last_lag.elapsed() >= LAG_EVERY {
            report_lag(&consumer, &s);
            last_lag = Instant::now();
        }
    }
    // What was taken finishes and is committed before the group hears
    // that this member leaves.
    let timeout = Duration::from_millis(s.drain_ms.load(Relaxed));
    if !s.fatal.is_cancelled() && !s.offsets.drain(None, timeout) {
        tracing::warn!(
            "kafka messages still in flight after {timeout:?}: left uncommitted, to be scored again"
        );
    }
    if !s.fatal.is_cancelled() {
        commit(&consumer, &s, None);
    }
    consumer.unsubscribe();
    tracing::info!("kafka-native serving stopped");
}

fn report_lag(consumer: &BaseConsumer<GroupContext>, s: &Shared) {
    for (p, next) in s.offsets.positions() {
        if let Ok((_, high)) =
            consumer.fetch_watermarks(&s.cfg.input_topic, p, Duration::from_millis(500))
        {
            if high >= 0 {
                metrics::gauge!(metric::LAG, "partition" => p.to_string())
                    .set((high - next).max(0) as f64);
            }
        }
    }
}

/// The key as the engine takes it: the bytes when they are UTF-8, else
/// their hex (so distinct binary keys stay distinct).
fn key_string(k: &[u8]) -> String {
    match std::str::from_utf8(k) {
        Ok(s) => s.to_string(),
        Err(_) => {
            use std::fmt::Write;
            let mut s = String::with_capacity(2 + 2 * k.len());
            s.push_str("0x");
            for b in k {
                let _ = write!(s, "{b:02x}");
            }
            s
        }
    }
}

/// What a message needs once it has left the consumer.
struct Origin {
    taken: Taken,
    key: Option<Bytes>,
    value: Bytes,
    headers: Vec<(String, Bytes)>,
    /// With `--kafka-state-topic`, for a keyed message of a model whose
    /// keyed state shoal holds: where its key's state goes, and its turn.
    state: Option<(StateKey, Turn)>,
}

/// Takes one message: decode, submit (in offset order), and hand the
/// wait and the produce to a task.
fn take(s: &Arc<Shared>, m: &BorrowedMessage<'_>, rt: &tokio::runtime::Handle) {
    let key = m.key();
    let Some((taken, first_of_key)) = s.offsets.take(m.partition(), m.offset(), key) else {
        // Fetched before its partition was revoked: its new owner reads it.
        return;
    };
    let headers: Vec<(String, Bytes)> = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        Bytes::copy_from_slice(h.value.unwrap_or(&[])),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut origin = Origin {
        taken,
        key: key.map(Bytes::copy_from_slice),
        value: Bytes::copy_from_slice(m.payload().unwrap_or(&[])),
        headers,
        state: None,
    };
    let header = |name: &str| {
        origin
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::to_string)
    };
    if origin.value.len() > s.cfg.max_value_bytes {
        let r = Refusal {
            reason: "payload_too_large",
            text: format!(
                "the message value of {} bytes is over the limit of {} (--max-body-bytes)",
                origin.value.len(),
                s.cfg.max_value_bytes
            ),
        };
        rt.spawn(refuse(s.clone(), origin, r));
        return;
    }
    let (model, version) = match (header("model"), &s.cfg.model) {
        (Some(m), _) => (m, header("model-version")),
        (None, Some((m, v))) => (m.clone(), header("model-version").or(v.clone())),
        (None, None) => {
            let r = Refusal {
                reason: "invalid_argument",
                text:
                    "the message names no model (a `model` header) and shoal has no --kafka-model"
                        .into(),
            };
            rt.spawn(refuse(s.clone(), origin, r));
            return;
        }
    };
    // One lookup for what the consumer needs of the model (decoding looks
    // it up again, and refuses an unknown one).
    let mv = s.engine.model(&model, version.as_deref()).ok();
    let mut restored = false;
    if let (Some(_), Some(k)) = (&s.cfg.state_topic, &origin.key) {
        if let Some(mv) = mv.as_ref().filter(|mv| mv.config().holds_key_state()) {
            let state_key = StateKey {
                model: model.clone(),
                version: mv.core.version.to_string(),
                key: k.clone(),
            };
            let mut books = s.restored.lock();
            if let Some(keys) = books.get_mut(&origin.taken.partition) {
                if let Some(&covered) = keys.get(&state_key) {
                    if origin.taken.offset <= covered.offset {
                        // Scored and answered before the crash or move;
                        // the restored state already holds its effect.
                        drop(books);
                        s.replays_skipped.increment(1);
                        s.offsets.done(origin.taken);
                        return;
                    }
                    keys.remove(&state_key);
                    restored = covered.installed;
                }
            }
            drop(books);
            let turn = s.state_order.turn(Some(&state_key.key));
            origin.state = Some((state_key, turn));
        }
    }
    let decoded = codec::decode(
        &s.engine,
        s.cfg.input_format,
        &model,
        version,
        &origin.headers,
        origin.value.clone(),
        &s.shm,
    );
    let decoded = match decoded {
        Ok(d) => d,
        Err(r) => {
            rt.spawn(refuse(s.clone(), origin, r));
            return;
        }
    };
    let mut request = decoded.request;
    if let Some(k) = &origin.key {
        request.correlation_key = Some(key_string(k));
    }
    request.return_state = origin.state.is_some();
    let objective = mv
        .as_ref()
        .and_then(|mv| mv.config().adaptive.map(|a| a.objective));
    if first_of_key && !restored && mv.is_some_and(|mv| mv.config().is_stateful()) {
        // The key's first message since this process got its partition,
        // with no state restored: whatever state an earlier assignment
        // left here is stale.
        request.sequence_start = true;
    }
    // A full model holds the message (and so its partition) here, until
    // it has room: no message is failed for a queue that drains.
    let waited = Instant::now();
    let submitted = loop {
        let submitted = s.engine.submit(request.clone());
        let overloaded = matches!(submitted.refusal(), Some(EngineError::Overloaded(_)));
        if !overloaded || s.stop.load(Relaxed) || waited.elapsed() >= OVERLOAD_WAIT {
            break submitted;
        }
        let n = s.offsets.in_flight();
        s.offsets
            .wait_below(n.saturating_sub(2), Duration::from_millis(20));
    };
    let answer = decoded.answer;
    let mut turn = s.order.turn(origin.key.as_ref());
    let s = s.clone();
    rt.spawn(async move {
        let result = submitted.wait().await;
        turn.wait().await;
        match result {
            Ok(mut resp) => {
                let t = resp.timing;
                s.limit
                    .observe(t.queue + t.compute, objective, Instant::now());
                let (value, header_length) = answer.encode(&resp);
                let state = resp.state.take();
                deliver(&s, origin, value, header_length, &resp, state, turn).await;
            }
            Err(e) => {
                turn.release();
                refuse(s, origin, Refusal::from(e)).await
            }
        }
    });
}

/// The input's headers, less the ones shoal sets, plus shoal's.
fn carried(origin: &Origin, skip: &[&str]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(origin.headers.len() + 5);
    for (k, v) in &origin.headers {
        if skip.iter().any(|s| k.eq_ignore_ascii_case(s)) {
            continue;
        }
        h = h.insert(Header {
            key: k,
            value: Some(&v[..]),
        });
    }
    let p = origin.taken.partition.to_string();
    let o = origin.taken.offset.to_string();
    h.insert(Header {
        key: "shoal-input-partition",
        value: Some(p.as_bytes()),
    })
    .insert(Header {
        key: "shoal-input-offset",
        value: Some(o.as_bytes()),
    })
}

const SET_ON_ANSWERS: &[&str] = &[
    codec::HEADER_LENGTH,
    "shoal-input-partition",
    "shoal-input-offset",
    "shoal-queue-us",
    "shoal-compute-us",
];

/// Writes an answer; then, with a state topic, the key's state after it.
/// The offset is done once both are acknowledged.
async fn deliver(
    s: &Shared,
    mut origin: Origin,
    value: Bytes,
    header_length: Option<usize>,
    resp: &InferResponse,
    state: Option<KeyState>,
    mut turn: Turn,
) {
    let mut headers = carried(&origin, SET_ON_ANSWERS);
    let queue = resp.timing.queue.as_micros().to_string();
    let compute = resp.timing.compute.as_micros().to_string();
    headers = headers
        .insert(Header {
            key: "shoal-queue-us",
            value: Some(queue.as_bytes()),
        })
        .insert(Header {
            key: "shoal-compute-us",
            value: Some(compute.as_bytes()),
        });
    let length = header_length.map(|n| n.to_string());
    if let Some(n) = &length {
        headers = headers.insert(Header {
            key: codec::HEADER_LENGTH,
            value: Some(n.as_bytes()),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(&s.cfg.output_topic)
        .payload(&value[..])
        .headers(headers);
    if let Some(k) = &origin.key {
        record = record.key(&k[..]);
    }
    let queued = enqueue(s, record).await;
    // In the producer's queue, the answer keeps its place: the key's next
    // answer may follow.
    turn.release();
    if let Err(e) = acknowledged(queued).await {
        return s.not_taken("the answer to", origin.taken, e);
    }
    s.scored.increment(1);
    if let (Some((key, mut turn)), Some(topic)) = (origin.state.take(), &s.cfg.state_topic) {
        // After the answer is acknowledged, and after the key's earlier
        // results and snapshots: a restore skips what this one covers.
        turn.wait().await;
        if let Some(state) = state {
            let record_key = key.encode();
            let value = Snapshot {
                offset: origin.taken.offset,
                state,
            }
            .encode();
            let record = FutureRecord::<[u8], [u8]>::to(topic)
                .partition(origin.taken.partition)
                .key(&record_key[..])
                .payload(&value[..]);
            let queued = enqueue(s, record).await;
            turn.release();
            if let Err(e) = acknowledged(queued).await {
                return s.not_taken("the state after", origin.taken, e);
            }
            s.snapshots.increment(1);
        }
    }
    s.offsets.done(origin.taken);
}

/// A message that cannot be scored: to the error topic (the input's value
/// and headers, with `shoal-error` and `shoal-error-reason`), or logged.
/// Its key's later snapshots wait for it (see [`Shared::state_order`]).
async fn refuse(s: Arc<Shared>, mut origin: Origin, r: Refusal) {
    s.failed.increment(1);
    let state_turn = origin.state.take().map(|(_, turn)| turn);
    let Some(topic) = &s.cfg.error_topic else {
        tracing::warn!(
            partition = origin.taken.partition,
            offset = origin.taken.offset,
            reason = r.reason,
            "kafka message not scored (no --kafka-error-topic): {}",
            r.text
        );
        after_predecessors(state_turn).await;
        s.offsets.done(origin.taken);
        return;
    };
    let headers = carried(&origin, &["shoal-error", "shoal-error-reason"])
        .insert(Header {
            key: "shoal-error-reason",
            value: Some(r.reason.as_bytes()),
        })
        .insert(Header {
            key: "shoal-error",
            value: Some(r.text.as_bytes()),
        });
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .payload(&origin.value[..])
        .headers(headers);
    if let Some(k) = &origin.key {
        record = record.key(&k[..]);
    }
    match send(&s, record).await {
        Ok(()) => {
            s.error_records.increment(1);
            after_predecessors(state_turn).await;
            s.offsets.done(origin.taken);
        }
        Err(e) => s.not_taken("the error record of", origin.taken, e),
    }
}

/// Passes a message's state turn on once its key's earlier messages have
/// passed theirs.
async fn after_predecessors(turn: Option<Turn>) {
    if let Some(mut t) = turn {
        t.wait().await;
        t.release();
    }
}

/// Puts a record in the producer's queue, waiting while it is full.
async fn enqueue(
    s: &Shared,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, RdError> {
    loop {
        match s.producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Produces one record and waits for the broker's acknowledgement (the
/// producer is idempotent and retries on its own until
/// `message.timeout.ms`).
async fn send(s: &Shared, record: FutureRecord<'_, [u8], [u8]>) -> Result<(), RdError> {
    acknowledged(enqueue(s, record).await).await
}

/// Waits for the broker's acknowledgement of a queued record.
async fn acknowledged(queued: Result<DeliveryFuture, RdError>) -> Result<(), RdError> {
    match queued?.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(RdError::Canceled),
    }
}

impl Drop for KafkaServing {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        let _ = self.shared.producer.flush(Duration::from_secs(1));
    }
}
