//! Kafka-native serving against a real Kafka-protocol broker (tansu): the
//! real binary joins a consumer group, scores keyed messages in offset
//! order with their state, writes answers and error records, commits
//! what is done, and fails fast when no broker answers.

#[path = "common/broker.rs"]
mod broker;
mod common;

use broker::Broker;
use common::Server;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

const DECAY: &str = "max_batch_size = 32\ninstance_count = 2\nrouting = \"affinity\"\n\
[dynamic_batching]\nmax_queue_delay_us = 100\nmax_queue_size = 8192\n\
[keyed_state]\nmax_keys = 100000\nidle_timeout_s = 600\n\
[[sequence_state]]\ninput = \"h_in\"\noutput = \"h_out\"\ninitial = 0.0\n";

fn decay_repo() -> tempfile::TempDir {
    common::repo_of("decay", "decay", DECAY)
}

async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

/// One message to produce: key, value, headers.
struct Record {
    key: Option<String>,
    value: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

/// Produces every record (partitioned by key, as a stream processor's
/// producer would) and waits until the broker has them all.
fn produce(brokers: &str, topic: &str, records: &[Record]) {
    produce_with(brokers, topic, records, &[]);
}

/// [`produce`] with more producer properties.
fn produce_with(brokers: &str, topic: &str, records: &[Record], props: &[(&str, &str)]) {
    let mut cfg = ClientConfig::new();
    for (k, v) in props {
        cfg.set(*k, *v);
    }
    let p: BaseProducer = cfg
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    for r in records {
        let mut h = OwnedHeaders::new();
        for (k, v) in &r.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut rec = BaseRecord::<str, [u8]>::to(topic)
            .payload(&r.value[..])
            .headers(h);
        if let Some(k) = &r.key {
            rec = rec.key(k.as_str());
        }
        let mut rec = Some(rec);
        while let Some(x) = rec.take() {
            if let Err((e, back)) = p.send(x) {
                assert!(
                    matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ),
                    "{e}"
                );
                p.poll(Duration::from_millis(5));
                rec = Some(back);
            }
        }
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// Reads `n` messages of `topic` (every partition, from the start, in log
/// order), or panics after `within`.
fn consume(brokers: &str, topic: &str, n: usize, within: Duration) -> Vec<OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap();
    let mut from_start = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        from_start
            .add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    c.assign(&from_start).unwrap();
    let mut log = LogRead::default();
    let (t, mut heard) = (Instant::now(), Instant::now());
    while log.got.len() < n {
        assert!(
            t.elapsed() < within,
            "{topic}: {} of {n} messages after {within:?}",
            log.got.len()
        );
        match c.poll(Duration::from_millis(100)) {
            Some(m) => {
                log.take(m.unwrap().detach());
                heard = Instant::now();
            }
            // tansu (0.6) raises a partition's high watermark before it
            // stores the batch, so a fetch that races two producers of
            // one partition can return the later batch and step over the
            // earlier one. Once the reader is at the end, what it stepped
            // over is stored: read again from the start.
            None if log.skipped && heard.elapsed() > Duration::from_secs(1) => {
                eprintln!(
                    "{topic}: {} of {n} read; reading again from the start",
                    log.got.len()
                );
                log.skipped = false;
                log.next.clear();
                c.assign(&from_start).unwrap();
                heard = Instant::now();
            }
            None => {}
        }
    }
    // Nothing more arrives (no duplicates beyond what was counted).
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        if let Some(m) = c.poll(Duration::from_millis(50)) {
            log.take(m.unwrap().detach());
        }
    }
    log.got.into_values().collect()
}

/// What [`consume`] has read of a topic.
#[derive(Default)]
struct LogRead {
    /// Each record once, by its place in the log: a record read again is
    /// the same record, while a duplicate answer is a record of its own.
    got: BTreeMap<(i32, i64), OwnedMessage>,
    /// The offset each partition's next record should have: these topics
    /// are neither compacted nor transactional, so a jump is a skip.
    next: HashMap<i32, i64>,
    /// Offsets were skipped that have not been read since.
    skipped: bool,
}

impl LogRead {
    fn take(&mut self, m: OwnedMessage) {
        let (p, o) = (m.partition(), m.offset());
        let want = self.next.insert(p, o + 1).unwrap_or(0);
        if o > want && !self.got.contains_key(&(p, want)) {
            eprintln!(
                "{}: the broker skipped partition {p} offsets {want}..{o}",
                m.topic()
            );
            self.skipped = true;
        }
        self.got.entry((p, o)).or_insert(m);
    }
}

fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

/// The value of one series, `name` or `name{label="value",...}`, in a
/// Prometheus text page (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
    let labels: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| !l.is_empty())
        .collect();
    common::metric_sum(text, name, &labels)
}

async fn metrics_of(s: &Server) -> String {
    common::get_text(&reqwest::Client::new(), format!("{}/metrics", s.metrics)).await
}

/// Waits until the server's consumer has been assigned `n` partitions
/// (net of revocations).
async fn wait_assigned(s: &Server, n: f64) {
    let t = Instant::now();
    loop {
        let m = metrics_of(s).await;
        let held = metric(&m, "shoal_kafka_rebalances_total{kind=\"assign\"}")
            - metric(&m, "shoal_kafka_rebalances_total{kind=\"revoke\"}");
        if held == n {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{held} partitions assigned, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kafka_args<'a>(brokers: &'a str, input: &'a str, output: &'a str) -> Vec<&'a str> {
    vec![
        "--kafka-brokers",
        brokers,
        "--kafka-input-topic",
        input,
        "--kafka-output-topic",
        output,
        "--kafka-model",
        "decay",
    ]
}

/// A JSON request body for the decay model.
fn json_body(id: &str, x: [f32; 4]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}]
    }))
    .unwrap()
}

/// A binary-extension body and its header length.
fn binary_body(id: &str, x: [f32; 4]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(&json!({
        "id": id,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                    "parameters": {"binary_data_size": 16}}]
    }))
    .unwrap();
    let n = body.len();
    for v in x {
        body.extend_from_slice(&v.to_le_bytes());
    }
    (body, n)
}

/// The answer's id and its output `y`, JSON or binary extension.
fn answer_y(m: &OwnedMessage) -> (String, Vec<f32>) {
    let value = m.payload().unwrap();
    let (head, blobs) = match header(m, "Inference-Header-Content-Length") {
        Some(n) => {
            let n: usize = n.parse().unwrap();
            (&value[..n], &value[n..])
        }
        None => (value, &[][..]),
    };
    let head: Value = serde_json::from_slice(head).unwrap();
    let mut at = 0;
    let mut y = None;
    for o in head["outputs"].as_array().unwrap() {
        let data = match o["parameters"]["binary_data_size"].as_u64() {
            Some(n) => {
                let b = &blobs[at..at + n as usize];
                at += n as usize;
                b.chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
            None => common::f32s(&o["data"]),
        };
        if o["name"] == "y" {
            y = Some(data);
        }
    }
    let id = head["id"].as_str().unwrap_or_default().to_string();
    (id, y.expect("output y"))
}

/// The event `i` of key `k` (small integers: the fold is exact).
fn event(k: usize, i: usize) -> [f32; 4] {
    [(i % 7) as f32, 1.0, -((i % 3) as f32), (k % 5) as f32]
}

#[tokio::test]
async fn two_processes_in_a_group_score_every_key_in_order_with_its_state() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 4), ("out", 1)]).await;
    let repo = decay_repo();
    let args = kafka_args(b, "in", "out");
    let first = Server::start_with_repo(repo.path(), &args);
    wait_assigned(&first, 4.0).await;
    let second = Server::start_with_repo(repo.path(), &args);
    wait_assigned(&second, 2.0).await;
    wait_assigned(&first, 2.0).await;

    // 50k keyed events of 500 keys, half as JSON and half as the binary
    // extension, produced before any is scored would be fine too: the
    // processes keep up or lag, and either way each key stays in order.
    let (keys, per_key) = (500, 100);
    let mut records = Vec::with_capacity(keys * per_key);
    for i in 0..per_key {
        for k in 0..keys {
            let id = format!("{k}/{i}");
            let (value, headers) = if (k + i) % 2 == 0 {
                (json_body(&id, event(k, i)), vec![("trace", id.clone())])
            } else {
                let (v, n) = binary_body(&id, event(k, i));
                (
                    v,
                    vec![
                        ("trace", id.clone()),
                        ("Inference-Header-Content-Length", n.to_string()),
                    ],
                )
            };
            records.push(Record {
                key: Some(format!("key-{k}")),
                value,
                headers,
            });
        }
    }
    let t = Instant::now();
    produce(b, "in", &records);
    let out = consume(b, "out", keys * per_key, Duration::from_secs(240));
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} answers in {secs:.1} s ({:.0}/s)",
        out.len(),
        out.len() as f64 / secs
    );

    // The expectation: each key's fold h = 0.5 h + x over its events in
    // order, in f32 as the model computes it.
    let mut want: HashMap<String, Vec<f32>> = HashMap::new();
    for k in 0..keys {
        let mut h = [0f32; 4];
        for i in 0..per_key {
            let x = event(k, i);
            for j in 0..4 {
                h[j] = h[j] * 0.5 + x[j];
            }
            want.insert(format!("{k}/{i}"), h.to_vec());
        }
    }
    let mut seen = HashSet::new();
    for m in &out {
        let (id, y) = answer_y(m);
        assert_eq!(y, want[&id], "answer {id}");
        let k = id.split('/').next().unwrap();
        assert_eq!(m.key(), Some(format!("key-{k}").as_bytes()), "answer {id}");
        assert_eq!(header(m, "trace"), Some(id.as_str()), "headers carried");
        let binary = header(m, "Inference-Header-Content-Length").is_some();
        let i: usize = id.split('/').nth(1).unwrap().parse().unwrap();
        assert_eq!(
            binary,
            (k.parse::<usize>().unwrap() + i) % 2 == 1,
            "answer {id} in the request's format"
        );
        let p = header(m, "shoal-input-partition").unwrap();
        let o = header(m, "shoal-input-offset").unwrap();
        assert!(header(m, "shoal-compute-us").is_some());
        assert!(header(m, "shoal-queue-us").is_some());
        assert!(
            seen.insert((p.to_string(), o.to_string())),
            "partition {p} offset {o} answered twice"
        );
    }
    assert_eq!(
        seen.len(),
        keys * per_key,
        "every input offset answered once"
    );

    let (m1, m2) = (metrics_of(&first).await, metrics_of(&second).await);
    let scored = |m: &str| metric(m, "shoal_kafka_messages_total{outcome=\"scored\"}");
    assert!(
        scored(&m1) > 0.0 && scored(&m2) > 0.0,
        "both processes scored"
    );
    assert_eq!(scored(&m1) + scored(&m2), (keys * per_key) as f64);
    common::promtool_check(&m1);

    // A clean stop commits everything: the group's offsets are the ends.
    assert_eq!(first.stop(), Some(0));
    assert_eq!(second.stop(), Some(0));
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .set("group.id", "shoal-decay")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition("in", p);
    }
    // Against the answers' input offsets: tansu's high watermarks lag.
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let mut total = 0;
    for e in committed.elements() {
        let p = e.partition().to_string();
        let end = seen
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| o.parse::<i64>().unwrap() + 1)
            .max()
            .unwrap();
        assert_eq!(e.offset(), Offset::Offset(end), "partition {p}");
        total += end;
    }
    assert_eq!(total as usize, keys * per_key);
}

#[tokio::test]
async fn bad_messages_go_to_the_error_topic_and_the_partition_keeps_moving() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 1), ("out", 1), ("dlq", 1)]).await;
    let repo = decay_repo();
    let mut args = kafka_args(b, "in", "out");
    // Values over the REST body limit are refused as bodies are.
    args.extend(["--kafka-error-topic", "dlq", "--max-body-bytes", "4096"]);
    let s = Server::start_with_repo(repo.path(), &args);
    wait_assigned(&s, 1.0).await;

    let keyed = |value: Vec<u8>, headers: Vec<(&'static str, String)>| Record {
        key: Some("k".into()),
        value,
        headers,
    };
    let wrong_type = serde_json::to_vec(&json!({
        "inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 4], "data": [1, 2, 3, 4]}]
    }))
    .unwrap();
    let two_rows = serde_json::to_vec(&json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0, 0, 0, 0, 0, 0, 0, 0]}]
    }))
    .unwrap();
    let records = vec![
        keyed(json_body("a", [1.0; 4]), vec![]),
        keyed(b"{ not json".to_vec(), vec![("note", "garbage".into())]),
        keyed(wrong_type, vec![]),
        keyed(json_body("c", [1.0; 4]), vec![("model", "nope".into())]),
        Record {
            key: None,
            value: json_body("d", [1.0; 4]),
            headers: vec![],
        },
        keyed(two_rows, vec![]),
        keyed(
            b"{}".to_vec(),
            vec![("Inference-Header-Content-Length", "999".into())],
        ),
        keyed(
            [json_body("big", [1.0; 4]), vec![b' '; 5000]].concat(),
            vec![],
        ),
        keyed(json_body("b", [2.0; 4]), vec![]),
    ];
    produce(b, "in", &records);
    let out = consume(b, "out", 2, Duration::from_secs(60));
    let mut dlq = consume(b, "dlq", 7, Duration::from_secs(60));
    // Error records are written as each refusal happens, not in order.
    dlq.sort_by_key(|m| {
        header(m, "shoal-input-offset")
            .unwrap()
            .parse::<i64>()
            .unwrap()
    });
    assert_eq!(out.len(), 2);
    assert_eq!(dlq.len(), 7);
    // The errors changed no state: b follows a directly.
    assert_eq!(answer_y(&out[0]), ("a".to_string(), vec![1.0; 4]));
    assert_eq!(answer_y(&out[1]), ("b".to_string(), vec![2.5; 4]));
    assert_eq!(header(&out[1], "shoal-input-offset"), Some("8"));

    let reasons: Vec<(&str, &str, &str)> = dlq
        .iter()
        .map(|m| {
            (
                header(m, "shoal-input-offset").unwrap(),
                header(m, "shoal-error-reason").unwrap(),
                header(m, "shoal-error").unwrap(),
            )
        })
        .collect();
    let expect = [
        ("1", "invalid_argument", "invalid JSON"),
        ("2", "invalid_argument", "INT32"),
        ("3", "not_found", "nope"),
        ("4", "invalid_argument", "correlation key"),
        ("5", "invalid_argument", "one row"),
        (
            "6",
            "invalid_argument",
            "Inference-Header-Content-Length 999",
        ),
        ("7", "payload_too_large", "over the limit of 4096"),
    ];
    for ((o, r, text), (wo, wr, wtext)) in reasons.iter().zip(expect) {
        assert_eq!((*o, *r), (wo, wr), "{text}");
        assert!(text.contains(wtext), "offset {o}: {text:?} lacks {wtext:?}");
    }
    // The error record keeps the input as it came, to be replayed.
    assert_eq!(dlq[0].payload(), Some(&b"{ not json"[..]));
    assert_eq!(header(&dlq[0], "note"), Some("garbage"));
    assert_eq!(dlq[0].key(), Some(&b"k"[..]));

    let m = metrics_of(&s).await;
    assert_eq!(
        metric(&m, "shoal_kafka_messages_total{outcome=\"scored\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "shoal_kafka_messages_total{outcome=\"failed\"}"),
        7.0
    );
    assert_eq!(metric(&m, "shoal_kafka_error_records_total"), 7.0);
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn raw_tensors_are_scored_and_a_small_in_flight_bound_pauses_without_loss() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 2), ("out", 1)]).await;
    let repo = decay_repo();
    let mut args = kafka_args(b, "in", "out");
    args.extend(["--kafka-input-format", "raw", "--kafka-max-in-flight", "4"]);
    let s = Server::start_with_repo(repo.path(), &args);
    wait_assigned(&s, 2.0).await;

    let (keys, per_key) = (20, 100);
    let mut records = Vec::new();
    for i in 0..per_key {
        for k in 0..keys {
            let mut value: Vec<u8> = event(k, i).iter().flat_map(|v| v.to_le_bytes()).collect();
            if k == 0 && i == 50 {
                value.truncate(10); // not a whole row: refused, logged
            }
            records.push(Record {
                key: Some(format!("{k}")),
                value,
                headers: vec![("i", i.to_string())],
            });
        }
    }
    produce(b, "in", &records);
    let n = keys * per_key - 1;
    let out = consume(b, "out", n, Duration::from_secs(120));
    assert_eq!(out.len(), n, "each input answered once");
    for m in &out {
        let k: usize = std::str::from_utf8(m.key().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        let i: usize = header(m, "i").unwrap().parse().unwrap();
        let mut h = [0f32; 4];
        for e in (0..=i).filter(|&e| !(k == 0 && e == 50)) {
            let x = event(k, e);
            for j in 0..4 {
                h[j] = h[j] * 0.5 + x[j];
            }
        }
        let (_, y) = answer_y(m);
        assert_eq!(y, h.to_vec(), "key {k} event {i}");
    }
    let m = metrics_of(&s).await;
    assert!(
        metric(&m, "shoal_kafka_pauses_total") > 0.0,
        "4 in flight against 2000 messages pauses the partitions"
    );
    assert_eq!(
        metric(&m, "shoal_kafka_messages_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn startup_fails_within_seconds_when_no_broker_answers() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let repo = decay_repo();
    let t = Instant::now();
    let err = common::failed_start(&[
        "--model-repository",
        repo.path().to_str().unwrap(),
        "--kafka-brokers",
        &closed,
        "--kafka-input-topic",
        "in",
        "--kafka-output-topic",
        "out",
        "--kafka-model",
        "decay",
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert!(err.contains("kafka at") && err.contains(&closed), "{err}");
    let err = common::failed_start(&[
        "--model-repository",
        repo.path().to_str().unwrap(),
        "--kafka-brokers",
        &closed,
        "--kafka-input-topic",
        "in",
        "--kafka-output-topic",
        "out",
        "--kafka-model",
        "absent",
    ]);
    assert!(err.contains("--kafka-model absent"), "{err}");
}

/// The records of events `from..to` of `keys` keys, JSON bodies.
fn json_records(keys: usize, from: usize, to: usize) -> Vec<Record> {
    (from..to)
        .flat_map(|i| {
            (0..keys).map(move |k| Record {
                key: Some(format!("key-{k}")),
                value: json_body(&format!("{k}/{i}"), event(k, i)),
                headers: vec![],
            })
        })
        .collect()
}

/// Key `k`'s answer to event `i` when its state started afresh at `from`.
fn fold(k: usize, from: usize, i: usize) -> Vec<f32> {
    let mut h = [0f32; 4];
    for e in from..=i {
        let x = event(k, e);
        for j in 0..4 {
            h[j] = h[j] * 0.5 + x[j];
        }
    }
    h.to_vec()
}

/// The answers of a process that holds the four partitions of `in` (events
/// `0..p1` of each key), then shares them with a second that joins (events
/// `p1..p2`), then holds them again once it has left (`p2..p3`). Also the
/// first process's metrics and those the second had before it left.
async fn join_and_leave(
    b: &str,
    args: &[&str],
    keys: usize,
    (p1, p2, p3): (usize, usize, usize),
) -> (Vec<OwnedMessage>, String, String) {
    let repo = decay_repo();
    let a = Server::start_with_repo(repo.path(), args);
    wait_assigned(&a, 4.0).await;
    produce(b, "in", &json_records(keys, 0, p1));
    consume(b, "out", keys * p1, Duration::from_secs(120));
    // Phase 2: a second process joins; two partitions move to it.
    let second = Server::start_with_repo(repo.path(), args);
    wait_assigned(&second, 2.0).await;
    wait_assigned(&a, 2.0).await;
    produce(b, "in", &json_records(keys, p1, p2));
    consume(b, "out", keys * p2, Duration::from_secs(120));
    // Phase 3: it leaves; its partitions come back to the first, which
    // still holds those keys' state from phase 1.
    let second_metrics = metrics_of(&second).await;
    assert_eq!(second.stop(), Some(0));
    wait_assigned(&a, 4.0).await;
    produce(b, "in", &json_records(keys, p2, p3));
    let out = consume(b, "out", keys * p3, Duration::from_secs(120));
    let a_metrics = metrics_of(&a).await;
    assert_eq!(a.stop(), Some(0));
    (out, a_metrics, second_metrics)
}

/// (input partition, key, event, y) of each answer; panics if an input is
/// answered twice.
fn answered_once(out: &[OwnedMessage]) -> Vec<(String, usize, usize, Vec<f32>)> {
    let mut seen = HashSet::new();
    out.iter()
        .map(|m| {
            let p = header(m, "shoal-input-partition").unwrap().to_string();
            let o = header(m, "shoal-input-offset").unwrap().to_string();
            assert!(seen.insert((p.clone(), o)), "an input answered twice");
            let (id, y) = answer_y(m);
            let mut it = id.split('/').map(|s| s.parse::<usize>().unwrap());
            (p, it.next().unwrap(), it.next().unwrap(), y)
        })
        .collect()
}

#[tokio::test]
async fn partitions_that_move_commit_first_and_their_keys_start_afresh_where_they_land() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 4), ("out", 1)]).await;
    let (keys, p1, p2, p3) = (200, 10, 20, 30);
    let (out, _, _) = join_and_leave(b, &kafka_args(b, "in", "out"), keys, (p1, p2, p3)).await;
    let answers = answered_once(&out);
    assert_eq!(answers.len(), keys * p3, "every input answered once");

    // partition -> (phase-2 answers that continue phase 1's state, that
    // started afresh)
    let mut moved: HashMap<String, (usize, usize)> = HashMap::new();
    for (p, k, i, y) in &answers {
        if (p1..p2).contains(i) {
            let e = moved.entry(p.clone()).or_default();
            if *y == fold(*k, 0, *i) {
                e.0 += 1;
            } else {
                assert_eq!(*y, fold(*k, p1, *i), "key {k} event {i} on partition {p}");
                e.1 += 1;
            }
        }
    }
    let moved: HashSet<String> = moved
        .into_iter()
        .map(|(p, (kept, fresh))| {
            assert!(kept == 0 || fresh == 0, "partition {p}: mixed state");
            (p, fresh > 0)
        })
        .filter(|(_, fresh)| *fresh)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(moved.len(), 2, "two partitions moved: {moved:?}");
    // Where they came back, the first process's phase-1 state is stale:
    // not used.
    for (p, k, i, y) in answers {
        let want = match (moved.contains(&p), i) {
            (_, i) if i < p1 => fold(k, 0, i),
            (true, i) if i < p2 => fold(k, p1, i),
            (true, i) => fold(k, p2, i),
            (false, i) => fold(k, 0, i),
        };
        assert_eq!(y, want, "key {k} event {i} on partition {p}");
    }
}

/// `--kafka-state-topic state` beside [`kafka_args`].
fn with_state_topic(mut args: Vec<&str>) -> Vec<&str> {
    args.extend(["--kafka-state-topic", "state"]);
    args
}

#[tokio::test]
async fn with_a_state_topic_keys_keep_their_state_wherever_their_partition_moves() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 4), ("out", 1), ("state", 4)]).await;
    let (keys, p1, p2, p3) = (200, 10, 20, 30);
    let args = with_state_topic(kafka_args(b, "in", "out"));
    let (out, a, second) = join_and_leave(b, &args, keys, (p1, p2, p3)).await;
    // Every answer continues its key's state from event 0, on whichever
    // process scored it, and nothing is scored twice.
    let answers = answered_once(&out);
    assert_eq!(answers.len(), keys * p3, "every input answered once");
    for (p, k, i, y) in answers {
        assert_eq!(y, fold(k, 0, i), "key {k} event {i} on partition {p}");
    }
    let restored = |m: &str| {
        metric(
            m,
            "shoal_kafka_state_restored_keys_total{outcome=\"restored\"}",
        )
    };
    // The joiner restored the two moved partitions' keys (half the keys,
    // roughly); the first restored them again when they came back.
    assert!(restored(&second) > 0.0, "{second}");
    assert!(restored(&a) >= restored(&second), "{a}");
    assert_eq!(
        metric(&a, "shoal_kafka_state_snapshots_total")
            + metric(&second, "shoal_kafka_state_snapshots_total"),
        (keys * p3) as f64,
        "a snapshot per scored message"
    );
    assert_eq!(metric(&a, "shoal_kafka_state_replays_skipped_total"), 0.0);
    common::promtool_check(&a);
}

#[tokio::test]
async fn with_a_state_topic_a_key_idle_past_its_timeout_is_expired_not_restored() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 4), ("out", 1), ("state", 4)]).await;
    let config = DECAY.replace("idle_timeout_s = 600", "idle_timeout_s = 2");
    let repo = common::repo_of("decay", "decay", &config);
    let args = with_state_topic(kafka_args(b, "in", "out"));
    let (keys, p1, p2) = (50, 5, 10);
    let first = Server::start_with_repo(repo.path(), &args);
    wait_assigned(&first, 4.0).await;
    produce(b, "in", &json_records(keys, 0, p1));
    consume(b, "out", keys * p1, Duration::from_secs(120));
    assert_eq!(first.stop(), Some(0));
    // Every key's snapshot is now older than its model's idle timeout: in
    // a process that had held the keys all along they would have expired.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = Server::start_with_repo(repo.path(), &args);
    wait_assigned(&second, 4.0).await;
    produce(b, "in", &json_records(keys, p1, p2));
    let out = consume(b, "out", keys * p2, Duration::from_secs(120));
    let m = metrics_of(&second).await;
    assert_eq!(second.stop(), Some(0));
    let answers = answered_once(&out);
    assert_eq!(answers.len(), keys * p2, "every input answered once");
    for (p, k, i, y) in answers {
        let from = if i < p1 { 0 } else { p1 };
        assert_eq!(y, fold(k, from, i), "key {k} event {i} on partition {p}");
    }
    let restored = |outcome: &str| {
        metric(
            &m,
            &format!("shoal_kafka_state_restored_keys_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(restored("expired"), keys as f64, "{m}");
    assert_eq!(restored("restored"), 0.0, "{m}");
    assert_eq!(metric(&m, "shoal_kafka_state_replays_skipped_total"), 0.0);
}

/// Starts a process on `in` (static member `shoal-0`), kills it with
/// SIGKILL once it has scored 2,000 of `keys × per_key` events, and starts
/// it again. Returns every answer, once each input has at least one, and
/// the restarted process's metrics.
async fn crash_and_restart(
    b: &str,
    args: &[&str],
    keys: usize,
    per_key: usize,
) -> (Vec<OwnedMessage>, String) {
    let repo = decay_repo();
    let mut args = args.to_vec();
    // Static membership (a pod's stable name): the restarted process takes
    // the dead one's place in the group at once. tansu never expires a
    // member that stops heartbeating, so a dynamic member's partitions
    // would stay with the dead process there.
    args.extend(["--kafka-property", "group.instance.id=shoal-0"]);
    let doomed = Server::start_with_repo(repo.path(), &args);
    wait_assigned(&doomed, 4.0).await;

    let records = json_records(keys, 0, per_key);
    // One message per record batch: the restarted process resumes from the
    // dead member's commits, and tansu only answers fetches at batch starts.
    let producing = {
        let b = b.to_string();
        std::thread::spawn(move || produce_with(&b, "in", &records, &[("batch.num.messages", "1")]))
    };
    // Killed mid-run, with answers written and not yet committed.
    let t = Instant::now();
    loop {
        let m = metrics_of(&doomed).await;
        if metric(&m, "shoal_kafka_messages_total{outcome=\"scored\"}") >= 2000.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-9", &doomed.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let restarted_process = Server::start_with_repo(repo.path(), &args);
    producing.join().unwrap();

    // Every input is answered at least once.
    let total = keys * per_key;
    let t = Instant::now();
    let out = loop {
        let out = consume(b, "out", total, Duration::from_secs(180));
        let distinct = inputs_answered(&out);
        if distinct.len() == total {
            break out;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "{} of {total} inputs answered",
            distinct.len()
        );
    };
    let m = metrics_of(&restarted_process).await;
    assert_eq!(restarted_process.stop(), Some(0));
    (out, m)
}

/// The distinct inputs (partition, offset) the answers are to.
fn inputs_answered(out: &[OwnedMessage]) -> HashSet<(String, String)> {
    out.iter()
        .map(|m| {
            (
                header(m, "shoal-input-partition").unwrap().to_string(),
                header(m, "shoal-input-offset").unwrap().to_string(),
            )
        })
        .collect()
}

/// Each key's answers, in output order: (event, y).
fn by_key(out: &[OwnedMessage]) -> HashMap<usize, Vec<(usize, Vec<f32>)>> {
    let mut by_key: HashMap<usize, Vec<(usize, Vec<f32>)>> = HashMap::new();
    for m in out {
        let (id, y) = answer_y(m);
        let mut it = id.split('/').map(|s| s.parse::<usize>().unwrap());
        let (k, i) = (it.next().unwrap(), it.next().unwrap());
        by_key.entry(k).or_default().push((i, y));
    }
    by_key
}

#[tokio::test]
async fn after_a_crash_the_restarted_process_scores_the_uncommitted_rest_from_fresh_state() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 4), ("out", 1)]).await;
    let (keys, per_key) = (200, 100);
    let (out, _) = crash_and_restart(b, &kafka_args(b, "in", "out"), keys, per_key).await;
    let duplicates = out.len() - keys * per_key;
    eprintln!("{duplicates} inputs answered twice after the crash");
    assert!(duplicates <= 4096, "{duplicates} duplicates");

    // Per key, in output order: its answers from event 0 with its state,
    // then at most one restart from fresh state at or before the next
    // event (the restarted process resuming from the dead one's commit).
    let mut restarted = 0;
    for (k, answers) in by_key(&out) {
        let (mut from, mut next, mut restarts) = (0, 0, 0);
        for (i, y) in answers {
            if i == next && y == fold(k, from, i) {
                next += 1;
                continue;
            }
            assert!(
                restarts == 0 && i <= next && y == fold(k, i, i),
                "key {k}: event {i} (expected {next}, state from {from}) answered {y:?}"
            );
            (from, next, restarts) = (i, i + 1, 1);
        }
        assert_eq!(next, per_key, "key {k} answered to its last event");
        restarted += restarts;
    }
    assert!(restarted > 0, "keys restarted from the commit");
    eprintln!("{restarted} keys restarted from fresh state");
}

#[tokio::test]
async fn with_a_state_topic_a_crash_resets_no_key_and_applies_no_event_twice() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 4), ("out", 1), ("state", 4)]).await;
    let (keys, per_key) = (200, 100);
    let args = with_state_topic(kafka_args(b, "in", "out"));
    let (out, m) = crash_and_restart(b, &args, keys, per_key).await;
    let restored = metric(
        &m,
        "shoal_kafka_state_restored_keys_total{outcome=\"restored\"}",
    );
    let skipped = metric(&m, "shoal_kafka_state_replays_skipped_total");
    let duplicates = out.len() - keys * per_key;
    eprintln!(
        "{restored} keys restored; of the uncommitted events, {skipped} skipped as already in a snapshot, {duplicates} answered twice"
    );
    assert_eq!(restored, keys as f64, "every key had scored when it died");
    // Every answer, duplicates included, continues its key's state from
    // event 0: no key restarts, no event counts twice in a state. A
    // duplicate is an answer acknowledged just before the crash whose
    // snapshot was not: the event is scored again from the state before
    // it, so its answer repeats, equal.
    for (k, answers) in by_key(&out) {
        let mut next = 0;
        for (i, y) in answers {
            assert_eq!(y, fold(k, 0, i), "key {k} event {i}");
            assert!(i <= next, "key {k}: event {i} before {next}");
            next = next.max(i + 1);
        }
        assert_eq!(next, per_key, "key {k} answered to its last event");
    }
    assert!(duplicates <= 1024, "{duplicates} duplicates");
}

#[tokio::test]
async fn a_hundred_thousand_keys_are_restored_and_scoring_continues_from_them() {
    use shoal::engine::state::KeyState;
    use shoal::kafka::snapshot::{Snapshot, StateKey};
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 4), ("out", 1), ("state", 4), ("small", 1)]).await;
    // The state a process would have left: key k's h is [k, 1, 2, 3] as of
    // input offset 0 of partition k % 4 (written straight to the topic).
    let keys = 100_000;
    let h = |k: usize| [k as f32, 1.0, 2.0, 3.0];
    let snapshots: Vec<(i32, Vec<u8>, Vec<u8>)> = (0..keys)
        .map(|k| {
            let key = StateKey {
                model: "decay".into(),
                version: "1".into(),
                key: format!("key-{k}").into(),
            };
            let row: Vec<u8> = h(k).iter().flat_map(|v| v.to_le_bytes()).collect();
            let snap = Snapshot {
                offset: 0,
                state: KeyState {
                    sequence: vec![row.into()],
                    window: Default::default(),
                },
            };
            ((k % 4) as i32, key.encode(), snap.encode())
        })
        .collect();
    {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", b)
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .unwrap();
        for (part, key, value) in &snapshots {
            let rec = BaseRecord::<[u8], [u8]>::to("state")
                .partition(*part)
                .key(&key[..])
                .payload(&value[..]);
            p.send(rec).map_err(|(e, _)| e).unwrap();
            p.poll(Duration::ZERO);
        }
        p.flush(Duration::from_secs(60)).unwrap();
    }
    // Offset 0 of each partition is an event of key-p the snapshots cover:
    // a replay, skipped.
    let to_partition = |events: &[(usize, Vec<u8>)]| {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", b)
            .create()
            .unwrap();
        for (k, body) in events {
            p.send(
                BaseRecord::<str, [u8]>::to("in")
                    .partition((k % 4) as i32)
                    .key(&format!("key-{k}"))
                    .payload(&body[..]),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        }
        p.flush(Duration::from_secs(10)).unwrap();
    };
    to_partition(
        &(0..4)
            .map(|k| (k, json_body("replay", [100.0; 4])))
            .collect::<Vec<_>>(),
    );

    let repo = common::repo_of("decay", "decay", &DECAY.replace("100000", "200000"));
    // A state topic with fewer partitions than the input cannot hold
    // input partition p's keys in its partition p: refused at startup.
    let mut args = vec!["--model-repository", repo.path().to_str().unwrap()];
    args.extend(kafka_args(b, "in", "out"));
    args.extend(["--kafka-state-topic", "small"]);
    let err = common::failed_start(&args);
    assert!(err.contains("has 1 partitions, fewer than the 4"), "{err}");

    let s = Server::start_with_repo(repo.path(), &with_state_topic(kafka_args(b, "in", "out")));
    let t = Instant::now();
    let m = loop {
        let m = metrics_of(&s).await;
        if metric(&m, "shoal_kafka_state_restore_seconds_count") > 0.0 {
            break m;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no restore");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = metric(&m, "shoal_kafka_state_restore_seconds_sum");
    let restored = metric(
        &m,
        "shoal_kafka_state_restored_keys_total{outcome=\"restored\"}",
    );
    eprintln!("{restored} keys restored in {seconds:.2} s");
    assert_eq!(restored, keys as f64);

    // Some keys' next events, on their snapshot's partition: each answer is
    // 0.5 h + x from the restored h.
    let sample: Vec<usize> = (0..keys).step_by(997).collect();
    to_partition(
        &sample
            .iter()
            .map(|&k| (k, json_body(&format!("{k}/1"), event(k, 1))))
            .collect::<Vec<_>>(),
    );
    let out = consume(b, "out", sample.len(), Duration::from_secs(60));
    assert_eq!(out.len(), sample.len(), "the replays were skipped");
    for m in &out {
        let (id, y) = answer_y(m);
        let k: usize = id.split('/').next().unwrap().parse().unwrap();
        let x = event(k, 1);
        let want: Vec<f32> = h(k).iter().zip(x).map(|(h, x)| 0.5 * h + x).collect();
        assert_eq!(y, want, "key {k}");
    }
    let m = metrics_of(&s).await;
    assert_eq!(metric(&m, "shoal_kafka_state_replays_skipped_total"), 4.0);
    assert_eq!(s.stop(), Some(0));
}

/// The resident set of a process, in bytes (Linux).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_slow_model_fed_three_times_faster_keeps_its_objective_bounded_memory_and_every_message()
{
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topics(b, &[("in", 4), ("out", 1)]).await;
    // `slow`: ~460 MFLOP a row on one core (about 190 rows a second
    // batched, on an idle 2-core VM), latency_objective_ms = 200, no
    // shedding; 64 KB raw tensors.
    let config =
        std::fs::read_to_string(common::model_repository().join("slow/config.toml")).unwrap();
    let repo = common::repo_of("slow", "slow", &config);
    let s = Server::start_with_repo(
        repo.path(),
        &[
            "--kafka-brokers",
            b,
            "--kafka-input-topic",
            "in",
            "--kafka-output-topic",
            "out",
            "--kafka-model",
            "slow",
            "--kafka-input-format",
            "raw",
            // librdkafka's prefetch queue: 16 MB, against the 192 MB the
            // producer writes.
            "--kafka-property",
            "queued.max.messages.kbytes=16384",
        ],
    );
    wait_assigned(&s, 4.0).await;
    let baseline = rss_bytes(s.pid());

    // 3,000 events at 600 a second, keyed over 100 keys.
    let (n, rate) = (3000usize, 600.0);
    let producing = {
        let b = b.to_string();
        std::thread::spawn(move || {
            let p: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &b)
                .set("linger.ms", "5")
                .create()
                .unwrap();
            let start = Instant::now();
            for i in 0..n {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let x: Vec<u8> = (0..16384)
                    .flat_map(|j| (((i * 31 + j) % 97) as f32 / 97.0).to_le_bytes())
                    .collect();
                let key = format!("key-{}", i % 100);
                let mut rec = Some(BaseRecord::<str, [u8]>::to("in").key(&key).payload(&x));
                while let Some(r) = rec.take() {
                    if let Err((_, back)) = p.send(r) {
                        p.poll(Duration::from_millis(5));
                        rec = Some(back);
                    }
                }
                p.poll(Duration::ZERO);
            }
            p.flush(Duration::from_secs(60)).unwrap();
            start.elapsed()
        })
    };
    // While it runs and drains: the server's memory, lag and limit.
    let (mut peak, mut max_lag, mut limits) = (baseline, 0f64, Vec::new());
    let t = Instant::now();
    loop {
        peak = peak.max(rss_bytes(s.pid()));
        let m = metrics_of(&s).await;
        let lag: f64 = (0..4)
            .map(|p| {
                metric(
                    &m,
                    &format!("shoal_kafka_consumer_lag{{partition=\"{p}\"}}"),
                )
            })
            .sum();
        max_lag = max_lag.max(lag);
        limits.push(metric(&m, "shoal_kafka_in_flight_limit"));
        let scored = metric(&m, "shoal_kafka_messages_total{outcome=\"scored\"}");
        if scored >= n as f64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "{scored} of {n} scored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = t.elapsed();
    let produced_in = producing.join().unwrap();
    let out = consume(b, "out", n, Duration::from_secs(60));

    // Nothing lost, nothing twice.
    let offsets = inputs_answered(&out);
    assert_eq!((offsets.len(), out.len()), (n, n));
    // What is scored meets the objective: the time in the engine (queue +
    // compute) of each answer. The limit learns the model's speed from the
    // first answers, so a few of those may be late.
    let mut engine_ms: Vec<f64> = out
        .iter()
        .map(|m| {
            let us = |h: &str| header(m, h).unwrap().parse::<f64>().unwrap();
            (us("shoal-queue-us") + us("shoal-compute-us")) / 1000.0
        })
        .collect();
    engine_ms.sort_by(f64::total_cmp);
    let q = |p: f64| engine_ms[((engine_ms.len() - 1) as f64 * p) as usize];
    let grown = peak.saturating_sub(baseline) as f64 / 1e6;
    let speedup = (n as f64 / produced_in.as_secs_f64()) / (n as f64 / drained.as_secs_f64());
    limits.sort_by(f64::total_cmp);
    eprintln!(
        "produced {n} in {produced_in:?}, scored in {drained:?} ({speedup:.1}x); engine time p50 {:.0} p90 {:.0} p99 {:.0} max {:.0} ms; in-flight limit median {}; peak lag {max_lag}; RSS {:.0} MB, +{grown:.1} MB",
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0),
        limits[limits.len() / 2],
        baseline as f64 / 1e6,
    );
    assert!(
        speedup >= 2.0,
        "the producer outran the model {speedup:.1}x"
    );
    assert!(
        q(0.9) <= 200.0,
        "p90 {} ms over the 200 ms objective",
        q(0.9)
    );
    assert!(max_lag >= 500.0, "lag grew to {max_lag}");
    // 192 MB went through; the server holds at most the prefetch queue
    // and what is in flight.
    assert!(grown < 64.0, "RSS grew {grown:.1} MB");
    assert_eq!(s.stop(), Some(0));
}
