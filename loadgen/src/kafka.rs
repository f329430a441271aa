//! Kafka topics through rdkafka against a real Kafka-protocol broker.
//!
//! Consumers set `fetch.wait.max.ms` to a few ms: tansu (the broker that
//! runs here) otherwise holds every fetch for up to half a second. Each
//! processor task is assigned its own partition, as a Kafka consumer group
//! with `mp` members over `mp` partitions would settle.

use crate::transport::{Message, SendError, Stamp};
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders, Timestamp};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer,
    ProducerContext,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka at {brokers}: {source}")]
    Client { brokers: String, source: KafkaError },
    #[error("cannot create topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
}

/// A run's input and output topics on a broker.
#[derive(Debug, Clone)]
pub struct Topics {
    pub brokers: String,
    pub input: String,
    pub output: String,
    /// Where a server that consumes the input itself writes what it could
    /// not score (kafka-native mode).
    pub errors: Option<String>,
    /// Where it keeps each key's state (kafka-native mode with
    /// `--kafka-state`): as many partitions as the input.
    pub state: Option<String>,
    pub partitions: usize,
}

/// The topics beside input and output that a run needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Beside {
    /// A one-partition error topic.
    pub errors: bool,
    /// A state topic with the input's partitions.
    pub state: bool,
}

/// The headers that carry a [`Stamp`] (decimal text, so they read well in
/// any Kafka tool).
const SEQ_HEADER: &str = "loadgen-seq";
const SCHEDULED_HEADER: &str = "loadgen-scheduled-ns";
/// The header shoal puts on error records.
const REASON_HEADER: &str = "shoal-error-reason";

/// What the sink needs of an output message in kafka-native mode.
#[derive(Debug, Clone)]
pub struct Stamped {
    pub stamp: Option<Stamp>,
    /// shoal's reason, on error records.
    pub reason: Option<String>,
    /// The broker's LogAppendTime, ms since the epoch, when it gives one.
    pub log_append_ms: Option<i64>,
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

impl Topics {
    /// Creates fresh topics for one run: `partitions` input partitions and
    /// one output partition.
    pub async fn create(
        brokers: &str,
        partitions: usize,
        tag: &str,
    ) -> Result<Self, KafkaSetupError> {
        Self::create_with(brokers, partitions, tag, Beside::default()).await
    }

    /// [`Topics::create`], with the topics `beside` asks for.
    pub async fn create_with(
        brokers: &str,
        partitions: usize,
        tag: &str,
        beside: Beside,
    ) -> Result<Self, KafkaSetupError> {
        let admin: AdminClient<DefaultClientContext> =
            client(brokers)
                .create()
                .map_err(|source| KafkaSetupError::Client {
                    brokers: brokers.into(),
                    source,
                })?;
        let t = Self {
            brokers: brokers.into(),
            input: format!("shoal-in-{tag}"),
            output: format!("shoal-out-{tag}"),
            errors: beside.errors.then(|| format!("shoal-err-{tag}")),
            state: beside.state.then(|| format!("shoal-state-{tag}")),
            partitions: partitions.max(1),
        };
        let mut topics = vec![
            NewTopic::new(&t.input, t.partitions as i32, TopicReplication::Fixed(1)),
            NewTopic::new(&t.output, 1, TopicReplication::Fixed(1)),
        ];
        if let Some(e) = &t.errors {
            topics.push(NewTopic::new(e, 1, TopicReplication::Fixed(1)));
        }
        if let Some(st) = &t.state {
            topics.push(
                NewTopic::new(st, t.partitions as i32, TopicReplication::Fixed(1))
                    .set("cleanup.policy", "compact"),
            );
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&topics, &opts)
            .await
            .map_err(|source| KafkaSetupError::Client {
                brokers: brokers.into(),
                source,
            })?;
        for r in results {
            if let Err((topic, code)) = r {
                if code != RDKafkaErrorCode::TopicAlreadyExists {
                    return Err(KafkaSetupError::Topic {
                        topic,
                        reason: code.to_string(),
                    });
                }
            }
        }
        Ok(t)
    }

    pub async fn delete(&self) {
        if let Ok(admin) = client(&self.brokers).create::<AdminClient<DefaultClientContext>>() {
            let mut names = vec![self.input.as_str(), self.output.as_str()];
            names.extend(self.errors.as_deref());
            names.extend(self.state.as_deref());
            let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
        }
    }

    /// The producer's side of the input topic: never blocks.
    pub fn input_sender(&self) -> Result<SyncSender, KafkaSetupError> {
        let ctx = Counting::default();
        let failed = ctx.failed.clone();
        let producer: BaseProducer<Counting> = client(&self.brokers)
            .set("linger.ms", "1")
            .set("queue.buffering.max.messages", "1000000")
            .set("enable.idempotence", "true")
            .create_with_context(ctx)
            .map_err(|source| KafkaSetupError::Client {
                brokers: self.brokers.clone(),
                source,
            })?;
        Ok(SyncSender {
            producer,
            topic: self.input.clone(),
            partitions: self.partitions,
            next: Default::default(),
            failed,
        })
    }

    /// A processor's side of the output topic.
    pub fn output_sender(&self) -> Result<AsyncSender, KafkaSetupError> {
        let producer: FutureProducer = client(&self.brokers)
            .set("linger.ms", "1")
            .create()
            .map_err(|source| KafkaSetupError::Client {
                brokers: self.brokers.clone(),
                source,
            })?;
        Ok(AsyncSender {
            producer,
            topic: self.output.clone(),
            failed: Default::default(),
        })
    }

    /// A consumer of one partition of `topic`, from its beginning.
    pub fn receiver(&self, topic: &str, partition: usize) -> Result<Receiver, KafkaSetupError> {
        let consumer: StreamConsumer = client(&self.brokers)
            .set("group.id", format!("{topic}-reader-{partition}"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|source| KafkaSetupError::Client {
                brokers: self.brokers.clone(),
                source,
            })?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Beginning)
            .map_err(|source| KafkaSetupError::Client {
                brokers: self.brokers.clone(),
                source,
            })?;
        consumer
            .assign(&tpl)
            .map_err(|source| KafkaSetupError::Client {
                brokers: self.brokers.clone(),
                source,
            })?;
        Ok(Receiver { consumer })
    }
}

/// Counts messages the broker did not take (delivery failures).
#[derive(Default)]
struct Counting {
    failed: Arc<AtomicU64>,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Relaxed);
        }
    }
}

pub struct SyncSender {
    producer: BaseProducer<Counting>,
    topic: String,
    partitions: usize,
    next: std::sync::atomic::AtomicUsize,
    /// Messages accepted locally that the broker then refused.
    pub failed: Arc<AtomicU64>,
}

impl SyncSender {
    pub fn partitions(&self) -> usize {
        self.partitions
    }

    pub fn try_send(&self, m: Message, partition: Option<usize>) -> Result<(), SendError> {
        let mut r: BaseRecord<'_, str, [u8]> = BaseRecord::to(&self.topic).payload(&m.payload[..]);
        if let Some(s) = m.stamp {
            let (seq, at) = (s.seq.to_string(), s.scheduled_ns.to_string());
            r = r.headers(
                OwnedHeaders::new_with_capacity(2)
                    .insert(Header {
                        key: SEQ_HEADER,
                        value: Some(seq.as_bytes()),
                    })
                    .insert(Header {
                        key: SCHEDULED_HEADER,
                        value: Some(at.as_bytes()),
                    }),
            );
        }
        if let Some(k) = m.key.as_deref() {
            r = r.key(k);
        }
        if let Some(p) = partition {
            r = r.partition(p as i32);
        } else if m.key.is_none() {
            // Keyless: spread like the in-memory topic does.
            r = r.partition((self.next.fetch_add(1, Relaxed) % self.partitions) as i32);
        }
        let sent = self.producer.send(r).map_err(|(e, _)| match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => SendError::Full,
            _ => SendError::Closed,
        });
        self.producer.poll(Duration::ZERO);
        sent
    }

    /// Waits until every accepted message is delivered or failed.
    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(30));
    }
}

pub struct AsyncSender {
    producer: FutureProducer,
    topic: String,
    /// Outputs the broker refused after they were queued.
    pub failed: Arc<AtomicU64>,
}

impl AsyncSender {
    /// Queues a message without waiting for the broker's acknowledgement
    /// (a processor that waited for each would be bound by the round
    /// trip); a refused delivery is counted.
    pub async fn send(&self, m: Message) -> Result<(), SendError> {
        loop {
            let mut r: FutureRecord<'_, str, [u8]> =
                FutureRecord::to(&self.topic).payload(&m.payload[..]);
            if let Some(k) = m.key.as_deref() {
                r = r.key(k);
            }
            match self.producer.send_result(r) {
                Ok(delivery) => {
                    let failed = self.failed.clone();
                    tokio::spawn(async move {
                        if !matches!(delivery.await, Ok(Ok(_))) {
                            failed.fetch_add(1, Relaxed);
                        }
                    });
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(_) => return Err(SendError::Closed),
            }
        }
    }

    /// Waits until every queued output is delivered or failed.
    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(30));
    }
}

pub struct Receiver {
    consumer: StreamConsumer,
}

impl Receiver {
    /// The next message, with the broker's LogAppendTime (ms since the
    /// epoch) when the broker really provides one.
    pub async fn recv(&mut self) -> Option<(Message, Option<i64>)> {
        let m = self.consumer.recv().await.ok()?;
        let log_append = match m.timestamp() {
            Timestamp::LogAppendTime(ms) => Some(ms),
            _ => None,
        };
        let key = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_string);
        let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
        let stamp = stamp_of(&m);
        Some((
            Message {
                key,
                payload,
                stamp,
            },
            log_append,
        ))
    }

    /// The next message's stamp and error reason, without its payload.
    pub async fn recv_stamped(&mut self) -> Option<Stamped> {
        let m = self.consumer.recv().await.ok()?;
        let log_append_ms = match m.timestamp() {
            Timestamp::LogAppendTime(ms) => Some(ms),
            _ => None,
        };
        let reason = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == REASON_HEADER)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        Some(Stamped {
            stamp: stamp_of(&m),
            reason,
            log_append_ms,
        })
    }
}

/// The [`Stamp`] in a message's headers, if it has a whole one.
fn stamp_of(m: &impl rdkafka::message::Message) -> Option<Stamp> {
    let h = m.headers()?;
    let num = |key: &str| {
        h.iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Stamp {
        seq: num(SEQ_HEADER)?,
        scheduled_ns: num(SCHEDULED_HEADER)?,
    })
}
