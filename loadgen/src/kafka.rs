//! Kafka topics through rdkafka against a real Kafka-protocol broker.
//!
//! Consumers set `fetch.wait.max.ms` to a few ms: tansu (the broker that
//! runs here) otherwise holds every fetch for up to half a second. Each
//! processor task is assigned its own partition, as a Kafka consumer group
//! with `mp` members over `mp` partitions would settle.

use crate::transport::{Message, SendError};
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message as _, Timestamp};
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
    pub partitions: usize,
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
            partitions: partitions.max(1),
        };
        let topics = [
            NewTopic::new(&t.input, t.partitions as i32, TopicReplication::Fixed(1)),
            NewTopic::new(&t.output, 1, TopicReplication::Fixed(1)),
        ];
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
            let _ = admin
                .delete_topics(&[&self.input, &self.output], &AdminOptions::new())
                .await;
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
        Some((Message { key, payload }, log_append))
    }
}
