//! Keyed state on a compacted topic (`--kafka-state-topic`).
//!
//! After each scored message of a model whose keyed state shoal holds, the
//! key's new state goes to the state topic's partition with the input
//! partition's number, tagged with the input offset it reflects, after the
//! answer is acknowledged and before the offset may be committed. A process
//! that gains an input partition reads the state partition back, installs
//! each key's newest state and skips the messages that state already covers
//! (their answers are on the output topic). So a crash or a move neither
//! resets a key nor applies one of its events twice. A key whose snapshot
//! (its record's timestamp) is older than its model's idle timeout expires
//! instead, as it would have in a process that held it all along.
//!
//! A record's key is `model \0 version \0 message key` (what compaction
//! keeps one of); its value is a format byte, the input offset and the
//! state's rows, each length-prefixed, little-endian.

use super::{KafkaConfig, KafkaError};
use crate::engine::state::KeyState;
use bytes::{Buf, Bytes};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The key of the record a restore writes to find the end of each state
/// partition: everything acknowledged before it is before it in the log
/// (a high watermark can lag behind what is acknowledged; tansu's does).
const END_MARKER: &[u8] = b"\0shoal-end-marker";
const FORMAT: u8 = 1;

/// Which key's state a record holds: the model version that holds it and
/// the input message's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateKey {
    pub model: String,
    pub version: String,
    pub key: Bytes,
}

impl StateKey {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.model.len() + self.version.len() + 2 + self.key.len());
        v.extend_from_slice(self.model.as_bytes());
        v.push(0);
        v.extend_from_slice(self.version.as_bytes());
        v.push(0);
        v.extend_from_slice(&self.key);
        v
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut parts = b.splitn(3, |&c| c == 0);
        let model = std::str::from_utf8(parts.next()?).ok()?;
        let version = std::str::from_utf8(parts.next()?).ok()?;
        let key = parts.next()?;
        (!model.is_empty()).then(|| Self {
            model: model.to_string(),
            version: version.to_string(),
            key: Bytes::copy_from_slice(key),
        })
    }
}

/// A key's state as of an input offset.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub offset: i64,
    pub state: KeyState,
}

fn put_rows<'a>(v: &mut Vec<u8>, rows: impl ExactSizeIterator<Item = &'a Bytes>) {
    v.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    for r in rows {
        v.extend_from_slice(&(r.len() as u32).to_le_bytes());
        v.extend_from_slice(r);
    }
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17 + self.state.bytes() + 4 * self.state.sequence.len());
        v.push(FORMAT);
        v.extend_from_slice(&self.offset.to_le_bytes());
        put_rows(&mut v, self.state.sequence.iter());
        put_rows(&mut v, self.state.window.iter());
        v
    }

    /// Refuses anything but a whole record of this format: a restore never
    /// installs a state it half understood.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let mut buf = Bytes::copy_from_slice(b);
        let short = || "the record ends early".to_string();
        if buf.remaining() < 9 {
            return Err(short());
        }
        let format = buf.get_u8();
        if format != FORMAT {
            return Err(format!("format {format}, not {FORMAT}"));
        }
        let offset = buf.get_i64_le();
        let rows = |buf: &mut Bytes| -> Result<Vec<Bytes>, String> {
            if buf.remaining() < 4 {
                return Err(short());
            }
            let n = buf.get_u32_le() as usize;
            // Each row needs at least its length: a count past that is a
            // corrupt record, not an allocation to make.
            if n > buf.remaining() / 4 {
                return Err(short());
            }
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                if buf.remaining() < 4 {
                    return Err(short());
                }
                let len = buf.get_u32_le() as usize;
                if buf.remaining() < len {
                    return Err(short());
                }
                out.push(buf.split_to(len));
            }
            Ok(out)
        };
        let sequence = rows(&mut buf)?;
        let window = rows(&mut buf)?.into();
        if buf.has_remaining() {
            return Err(format!("{} bytes after the record", buf.remaining()));
        }
        Ok(Self {
            offset,
            state: KeyState { sequence, window },
        })
    }
}

/// A snapshot as read back, with when it was written: its record's
/// timestamp (the writer's clock, or the broker's for a topic with
/// `LogAppendTime`), which is when its key was last scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub snapshot: Snapshot,
    pub written: Option<SystemTime>,
}

impl Stored {
    /// How long its key has been idle: zero for a record without a
    /// timestamp, or one from a clock ahead of this one.
    pub fn idle_for(&self, now: SystemTime) -> Duration {
        self.written
            .and_then(|w| now.duration_since(w).ok())
            .unwrap_or_default()
    }
}

/// The newest snapshot of every key in some partitions of the state topic.
pub type Found = HashMap<(i32, StateKey), Stored>;

/// Reads `partitions` of the state topic from their start to their end,
/// keeping each key's snapshot of the highest input offset (compaction
/// keeps the last record of a key, and shoal writes a key's snapshots in
/// offset order, so either rule gives the same answer). Records that do not
/// decode are counted in `.1` and skipped. Blocking (the consumer thread
/// calls it inside a rebalance); `rt` runs the marker's produce.
pub fn read(
    cfg: &KafkaConfig,
    topic: &str,
    producer: &FutureProducer,
    rt: &tokio::runtime::Handle,
    partitions: &[i32],
    timeout: Duration,
) -> Result<(Found, usize), KafkaError> {
    let fail = |what: String| KafkaError::Fatal(format!("state topic {topic}: {what}"));
    let deadline = Instant::now() + timeout;
    // The end of each partition: where a marker written now lands.
    let mut ends = HashMap::new();
    for &p in partitions {
        let record = FutureRecord::<[u8], [u8]>::to(topic)
            .partition(p)
            .key(END_MARKER)
            .payload(&[]);
        let delivered = rt
            .block_on(producer.send(record, timeout))
            .map_err(|(e, _)| fail(format!("cannot mark the end of partition {p}: {e}")))?;
        ends.insert(p, delivered.offset);
    }
    let mut consumer_cfg = ClientConfig::new();
    consumer_cfg
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("{}-state-restore", cfg.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "5");
    for (k, v) in &cfg.properties {
        if k != "group.instance.id" {
            consumer_cfg.set(k, v);
        }
    }
    let consumer: BaseConsumer = consumer_cfg
        .create()
        .map_err(|e| fail(format!("cannot create its reader: {e}")))?;
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| fail(e.to_string()))?;
    }
    consumer.assign(&tpl).map_err(|e| fail(e.to_string()))?;
    let mut found = Found::new();
    let mut bad = 0;
    while !ends.is_empty() {
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "partitions {:?} not read to their end within {timeout:?}",
                ends.keys().collect::<Vec<_>>()
            )));
        }
        let m = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(e)) => {
                tracing::debug!("state topic reader: {e}");
                continue;
            }
            Some(Ok(m)) => m,
        };
        let p = m.partition();
        if ends.get(&p).is_some_and(|&end| m.offset() >= end) {
            ends.remove(&p);
        }
        let key = m.key().unwrap_or_default();
        if key == END_MARKER {
            continue;
        }
        let record = StateKey::decode(key)
            .ok_or_else(|| "its key is not model\\0version\\0key".to_string())
            .and_then(|k| Ok((k, Snapshot::decode(m.payload().unwrap_or_default())?)));
        let written = m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        match record.map(|(k, snapshot)| (k, Stored { snapshot, written })) {
            Ok((k, s)) => match found.entry((p, k)) {
                Entry::Occupied(mut e) if s.snapshot.offset >= e.get().snapshot.offset => {
                    e.insert(s);
                }
                Entry::Occupied(_) => {}
                Entry::Vacant(e) => {
                    e.insert(s);
                }
            },
            Err(why) => {
                bad += 1;
                tracing::warn!(
                    partition = p,
                    offset = m.offset(),
                    "state topic record skipped: {why}"
                );
            }
        }
    }
    Ok((found, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_survives_its_encoding_and_corruption_is_refused() {
        let s = Snapshot {
            offset: 41,
            state: KeyState {
                sequence: vec![Bytes::from_static(&[1, 2, 3, 4]), Bytes::new()],
                window: vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")].into(),
            },
        };
        let b = s.encode();
        assert_eq!(Snapshot::decode(&b).unwrap(), s);
        for cut in 0..b.len() {
            assert!(Snapshot::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Snapshot::decode(&long).is_err());
        let mut other = b.clone();
        other[0] = 9;
        assert!(Snapshot::decode(&other).unwrap_err().contains("format 9"));
        // A huge row count is refused, not allocated.
        let mut huge = vec![FORMAT];
        huge.extend_from_slice(&0i64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Snapshot::decode(&huge).is_err());

        let k = StateKey {
            model: "decay".into(),
            version: "1".into(),
            key: Bytes::from_static(b"k\0ey"),
        };
        assert_eq!(StateKey::decode(&k.encode()), Some(k));
        assert_eq!(StateKey::decode(b"no separators"), None);
        assert_eq!(StateKey::decode(END_MARKER), None);
    }

    #[test]
    fn a_snapshots_idle_time_is_its_age_and_never_negative() {
        let snapshot = Snapshot {
            offset: 0,
            state: KeyState::default(),
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |written| Stored {
            snapshot: snapshot.clone(),
            written,
        };
        let ten_ago = Some(now - Duration::from_secs(10));
        assert_eq!(at(ten_ago).idle_for(now), Duration::from_secs(10));
        // A writer whose clock runs ahead, or a record without a time.
        let ahead = Some(now + Duration::from_secs(10));
        assert_eq!(at(ahead).idle_for(now), Duration::ZERO);
        assert_eq!(at(None).idle_for(now), Duration::ZERO);
    }
}
