//! In-memory topics: partitions as bounded channels, keyed messages
//! partitioned by key hash as Kafka's default partitioner does (so a key
//! stays on one processor task), keyless ones round robin.

use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;

/// A message as a topic carries it.
#[derive(Debug, Clone)]
pub struct Message {
    pub key: Option<String>,
    pub payload: Bytes,
    /// The event's identity outside the payload (Kafka headers), for
    /// payloads that are not loadgen's own encoding.
    pub stamp: Option<Stamp>,
}

/// Which event a message is, when the payload cannot say: kafka-native mode
/// sends shoal raw tensors, and shoal carries the headers to its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    pub scheduled_ns: u64,
}

/// The sending side of an in-memory topic.
#[derive(Debug, Clone)]
pub struct TopicSender {
    partitions: Vec<mpsc::Sender<Message>>,
    next: std::sync::Arc<AtomicUsize>,
}

/// Why a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The partition's buffer is full (the consumer is far behind).
    Full,
    Closed,
}

/// Creates a topic of `partitions` partitions holding up to `capacity`
/// messages each; returns the sender and one receiver per partition.
pub fn topic(partitions: usize, capacity: usize) -> (TopicSender, Vec<mpsc::Receiver<Message>>) {
    let (tx, rx): (Vec<_>, Vec<_>) = (0..partitions.max(1))
        .map(|_| mpsc::channel(capacity.max(1)))
        .unzip();
    (
        TopicSender {
            partitions: tx,
            next: Default::default(),
        },
        rx,
    )
}

/// FNV-1a, so partitioning is stable across runs and builds.
pub fn partition_of(key: &str, partitions: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % partitions as u64) as usize
}

impl TopicSender {
    pub fn partitions(&self) -> usize {
        self.partitions.len()
    }

    fn pick(&self, key: Option<&str>) -> usize {
        match key {
            Some(k) => partition_of(k, self.partitions.len()),
            None => self.next.fetch_add(1, Ordering::Relaxed) % self.partitions.len(),
        }
    }

    /// Sends without waiting: an open-loop producer never blocks.
    pub fn try_send(&self, m: Message) -> Result<(), SendError> {
        let p = self.pick(m.key.as_deref());
        self.try_send_to(p, m)
    }

    /// Sends to one partition without waiting (end-of-stream markers).
    pub fn try_send_to(&self, p: usize, m: Message) -> Result<(), SendError> {
        self.partitions[p].try_send(m).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Sends, waiting for room (processor to sink).
    pub async fn send(&self, m: Message) -> Result<(), SendError> {
        let p = self.pick(m.key.as_deref());
        self.partitions[p]
            .send(m)
            .await
            .map_err(|_| SendError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_stays_on_one_partition() {
        let (tx, mut rx) = topic(4, 100);
        for i in 0..40 {
            tx.try_send(Message {
                key: Some(format!("k{}", i % 3)),
                payload: Bytes::new(),
                stamp: None,
            })
            .unwrap();
        }
        let mut seen = std::collections::HashMap::new();
        for (p, r) in rx.iter_mut().enumerate() {
            while let Ok(m) = r.try_recv() {
                let prev = seen.insert(m.key.unwrap(), p);
                assert!(prev.is_none_or(|q| q == p));
            }
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn a_full_partition_is_reported_not_waited_for() {
        let (tx, _rx) = topic(1, 1);
        tx.try_send(Message {
            key: None,
            payload: Bytes::new(),
            stamp: None,
        })
        .unwrap();
        assert_eq!(
            tx.try_send(Message {
                key: None,
                payload: Bytes::new(),
                stamp: None,
            }),
            Err(SendError::Full)
        );
    }
}
