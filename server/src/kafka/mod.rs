//! Kafka-native serving: shoal joins a consumer group on an input topic,
//! scores each message with the engine (a key's messages in offset order,
//! on the replica that holds its state), writes the answers to an output
//! topic and commits an offset only once every result before it is
//! acknowledged by the broker (at-least-once). Kafka's group protocol
//! spreads partitions, and so keys, over as many shoal processes as run.

pub mod codec;
mod limit;
pub mod offsets;
mod order;
mod serve;
pub mod snapshot;

pub use codec::InputFormat;
pub use serve::KafkaServing;

/// The `--kafka-*` flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (HOST:PORT,...): consume --kafka-input-topic
    /// in a consumer group and write each answer to --kafka-output-topic.
    #[arg(long, env = "SHOAL_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// The topic of requests (message key: the correlation key).
    #[arg(long, env = "SHOAL_KAFKA_INPUT_TOPIC")]
    pub kafka_input_topic: Option<String>,

    /// The topic answers go to, with the request's key and headers.
    #[arg(long, env = "SHOAL_KAFKA_OUTPUT_TOPIC")]
    pub kafka_output_topic: Option<String>,

    /// Messages that cannot be scored go here, with the reason in
    /// headers; without it they are logged and counted.
    #[arg(long, env = "SHOAL_KAFKA_ERROR_TOPIC")]
    pub kafka_error_topic: Option<String>,

    /// A compacted topic of keyed state, with at least as many partitions
    /// as the input topic: each key's state after each message goes there,
    /// and a process that gains a partition restores its keys from it, so
    /// a crash or a rebalance resets no key.
    #[arg(long, env = "SHOAL_KAFKA_STATE_TOPIC")]
    pub kafka_state_topic: Option<String>,

    /// Consumer group (default: shoal-<model>, or shoal without a model).
    #[arg(long, env = "SHOAL_KAFKA_GROUP_ID")]
    pub kafka_group_id: Option<String>,

    /// MODEL[:VERSION] that scores messages without a `model` header.
    #[arg(long, env = "SHOAL_KAFKA_MODEL")]
    pub kafka_model: Option<String>,

    /// kserve: REST bodies (JSON, or the binary extension with an
    /// Inference-Header-Content-Length header); raw: the bytes of a
    /// one-input model's tensor.
    #[arg(long, env = "SHOAL_KAFKA_INPUT_FORMAT", value_enum, default_value_t)]
    pub kafka_input_format: InputFormat,

    /// Messages being scored at once at most; past the limit (this, or
    /// fewer while a model's latency_objective_ms needs it) the consumer
    /// stops taking more until half have finished.
    #[arg(long, env = "SHOAL_KAFKA_MAX_IN_FLIGHT", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub kafka_max_in_flight: u64,

    /// More librdkafka properties, KEY=VALUE (repeat, or separate with
    /// `;`, since values may hold commas): security.protocol, sasl.*,
    /// fetch.wait.max.ms, ...
    #[arg(
        long = "kafka-property",
        env = "SHOAL_KAFKA_PROPERTIES",
        value_delimiter = ';'
    )]
    pub kafka_properties: Vec<String>,
}

/// Kafka-native serving, checked.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub input_topic: String,
    pub output_topic: String,
    pub error_topic: Option<String>,
    pub state_topic: Option<String>,
    pub group_id: String,
    pub model: Option<(String, Option<String>)>,
    pub input_format: InputFormat,
    pub max_in_flight: usize,
    pub properties: Vec<(String, String)>,
    /// Largest message value scored: the REST body limit
    /// (`--max-body-bytes`), so both doors take the same requests.
    pub max_value_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("{0}")]
    Config(String),
    #[error("kafka at {brokers}: {reason}")]
    Broker { brokers: String, reason: String },
    #[error("kafka: {0}")]
    Fatal(String),
}

impl KafkaArgs {
    /// `None`: Kafka-native serving is off (no --kafka-brokers).
    /// `max_value_bytes`: see [`KafkaConfig::max_value_bytes`].
    pub fn config(&self, max_value_bytes: usize) -> Result<Option<KafkaConfig>, KafkaError> {
        let Some(brokers) = self.kafka_brokers.clone().filter(|b| !b.is_empty()) else {
            let given = [
                ("--kafka-input-topic", self.kafka_input_topic.is_some()),
                ("--kafka-output-topic", self.kafka_output_topic.is_some()),
                ("--kafka-error-topic", self.kafka_error_topic.is_some()),
                ("--kafka-state-topic", self.kafka_state_topic.is_some()),
                ("--kafka-model", self.kafka_model.is_some()),
                ("--kafka-group-id", self.kafka_group_id.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                return Err(KafkaError::Config(format!(
                    "{flag} needs --kafka-brokers (SHOAL_KAFKA_BROKERS)"
                )));
            }
            return Ok(None);
        };
        let need = |v: &Option<String>, flag: &str| {
            v.clone()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| KafkaError::Config(format!("--kafka-brokers needs {flag} as well")))
        };
        let input_topic = need(&self.kafka_input_topic, "--kafka-input-topic")?;
        let output_topic = need(&self.kafka_output_topic, "--kafka-output-topic")?;
        if input_topic == output_topic {
            return Err(KafkaError::Config(format!(
                "--kafka-output-topic must differ from --kafka-input-topic ({input_topic}): answers would be read back as requests"
            )));
        }
        let state_topic = self.kafka_state_topic.clone().filter(|t| !t.is_empty());
        if let Some(t) = &state_topic {
            let others = [
                Some(&input_topic),
                Some(&output_topic),
                self.kafka_error_topic.as_ref(),
            ];
            if others.iter().flatten().any(|o| *o == t) {
                return Err(KafkaError::Config(format!(
                    "--kafka-state-topic {t} must be a topic of its own"
                )));
            }
        }
        let model = self
            .kafka_model
            .as_deref()
            .map(|m| match m.split_once(':') {
                Some((name, v)) => (name.to_string(), Some(v.to_string())),
                None => (m.to_string(), None),
            });
        let group_id = self.kafka_group_id.clone().unwrap_or_else(|| match &model {
            Some((m, _)) => format!("shoal-{m}"),
            None => "shoal".to_string(),
        });
        let properties = self
            .kafka_properties
            .iter()
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .ok_or_else(|| {
                        KafkaError::Config(format!("--kafka-property {p:?} is not KEY=VALUE"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(KafkaConfig {
            brokers,
            input_topic,
            output_topic,
            error_topic: self.kafka_error_topic.clone().filter(|t| !t.is_empty()),
            state_topic,
            group_id,
            model,
            input_format: self.kafka_input_format,
            max_in_flight: self.kafka_max_in_flight as usize,
            properties,
            max_value_bytes,
        }))
    }
}

/// Metric names of Kafka-native serving.
pub mod metric {
    pub const MESSAGES: &str = "shoal_kafka_messages_total";
    pub const ERROR_RECORDS: &str = "shoal_kafka_error_records_total";
    pub const LAG: &str = "shoal_kafka_consumer_lag";
    pub const COMMIT_DURATION: &str = "shoal_kafka_commit_seconds";
    pub const PAUSES: &str = "shoal_kafka_pauses_total";
    pub const REBALANCES: &str = "shoal_kafka_rebalances_total";
    pub const IN_FLIGHT: &str = "shoal_kafka_in_flight";
    pub const IN_FLIGHT_LIMIT: &str = "shoal_kafka_in_flight_limit";
    pub const SNAPSHOTS: &str = "shoal_kafka_state_snapshots_total";
    pub const RESTORED_KEYS: &str = "shoal_kafka_state_restored_keys_total";
    pub const RESTORE_DURATION: &str = "shoal_kafka_state_restore_seconds";
    pub const REPLAYS_SKIPPED: &str = "shoal_kafka_state_replays_skipped_total";

    pub fn describe() {
        use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(
            MESSAGES,
            "Input messages finished, by outcome (scored, failed: sent to the error topic or logged)"
        );
        describe_counter!(ERROR_RECORDS, "Records written to the error topic");
        describe_gauge!(
            LAG,
            "Messages of an assigned input partition not yet read, by partition"
        );
        describe_histogram!(
            COMMIT_DURATION,
            Unit::Seconds,
            "Time of one synchronous offset commit"
        );
        describe_counter!(
            PAUSES,
            "Times the consumer stopped taking messages because --kafka-max-in-flight were in flight"
        );
        describe_counter!(REBALANCES, "Partition assignments and revocations, by kind");
        describe_gauge!(
            IN_FLIGHT,
            "Input messages taken whose result is not yet acknowledged"
        );
        describe_gauge!(
            IN_FLIGHT_LIMIT,
            "Messages that may be in flight now: --kafka-max-in-flight, or fewer while a model's latency objective needs it"
        );
        describe_counter!(
            SNAPSHOTS,
            "Key states written to --kafka-state-topic (one per scored message of a stateful model)"
        );
        describe_counter!(
            RESTORED_KEYS,
            "Key states read from --kafka-state-topic when partitions were assigned, by outcome (restored; expired: idle past idle_timeout_s; refused)"
        );
        describe_histogram!(
            RESTORE_DURATION,
            Unit::Seconds,
            "Time to read and install the keyed state of newly assigned partitions"
        );
        describe_counter!(
            REPLAYS_SKIPPED,
            "Messages read again after a crash or move whose effect a restored state already holds (answered before, not scored again)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn parse(args: &[&str]) -> Result<Option<KafkaConfig>, KafkaError> {
        Cli::parse_from(std::iter::once("shoal").chain(args.iter().copied()))
            .kafka
            .config(64 << 20)
    }

    /// [`parse`] with a broker and the topics `in` and `out`.
    fn parse_in_out(more: &[&str]) -> Result<Option<KafkaConfig>, KafkaError> {
        let mut args = vec![
            "--kafka-brokers",
            "b:1",
            "--kafka-input-topic",
            "in",
            "--kafka-output-topic",
            "out",
        ];
        args.extend(more);
        parse(&args)
    }

    #[test]
    fn kafka_flags_are_checked_together() {
        assert!(parse(&[]).unwrap().is_none());
        let e = parse(&["--kafka-input-topic", "in"]).unwrap_err();
        assert!(e.to_string().contains("needs --kafka-brokers"), "{e}");
        let e = parse(&["--kafka-brokers", "b:1", "--kafka-input-topic", "in"]).unwrap_err();
        assert!(e.to_string().contains("--kafka-output-topic"), "{e}");
        let e = parse(&[
            "--kafka-brokers",
            "b:1",
            "--kafka-input-topic",
            "t",
            "--kafka-output-topic",
            "t",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("must differ"), "{e}");
        let e = parse_in_out(&["--kafka-state-topic", "out"]).unwrap_err();
        assert!(e.to_string().contains("a topic of its own"), "{e}");
        let c = parse_in_out(&[
            "--kafka-model",
            "ffnn:2",
            "--kafka-property",
            "fetch.wait.max.ms=5;debug=fetch,consumer",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.group_id, "shoal-ffnn");
        assert_eq!(c.model, Some(("ffnn".into(), Some("2".into()))));
        assert_eq!(c.properties.len(), 2);
        let e = parse_in_out(&["--kafka-property", "nonsense"]).unwrap_err();
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    }
}
