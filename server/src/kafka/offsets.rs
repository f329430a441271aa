//! Which input offsets are in flight, per assigned partition, and so how
//! far each partition may be committed: up to (not including) its oldest
//! message whose result the broker has not yet acknowledged. Messages
//! finish out of order (different keys run in parallel); the commit only
//! ever moves over a prefix that is wholly done, which is at-least-once.

use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

/// One assigned partition.
#[derive(Debug, Default)]
struct Partition {
    /// Bumped on each assignment, so a message of an earlier assignment
    /// that finishes late does not touch the new one's books.
    epoch: u64,
    in_flight: BTreeSet<i64>,
    /// One past the newest offset taken; `None` before the first.
    next: Option<i64>,
    /// The offset last committed (the next one to read after a restart).
    committed: Option<i64>,
    /// Keys seen since the partition was assigned: a key's first message
    /// after an assignment starts its state afresh (`sequence_start`), so
    /// a key that comes back never meets state left from before.
    keys: HashSet<Vec<u8>>,
}

impl Partition {
    /// Where a commit may go now.
    fn committable(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }
}

/// The books of every assigned partition.
#[derive(Debug, Default)]
pub struct Offsets {
    parts: Mutex<BTreeMap<i32, Partition>>,
    /// Signalled when a message finishes (drain and backpressure waits).
    finished: Condvar,
    next_epoch: Mutex<u64>,
}

/// A message taken: give it back with [`Offsets::done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub partition: i32,
    pub offset: i64,
    epoch: u64,
}

impl Offsets {
    /// A partition was assigned: fresh books.
    pub fn assign(&self, partition: i32) {
        let epoch = {
            let mut e = self.next_epoch.lock();
            *e += 1;
            *e
        };
        self.parts.lock().insert(
            partition,
            Partition {
                epoch,
                ..Default::default()
            },
        );
    }

    /// A partition was revoked: its books go (after [`Self::drain`]).
    pub fn revoke(&self, partition: i32) {
        self.parts.lock().remove(&partition);
        self.finished.notify_all();
    }

    pub fn assigned(&self) -> Vec<i32> {
        self.parts.lock().keys().copied().collect()
    }

    /// Takes a message in. `key`: whether it is the key's first message
    /// since the assignment comes back as the second value. `None`: the
    /// partition is not assigned (a message fetched before a revoke).
    pub fn take(&self, partition: i32, offset: i64, key: Option<&[u8]>) -> Option<(Taken, bool)> {
        let mut parts = self.parts.lock();
        let p = parts.get_mut(&partition)?;
        p.in_flight.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        let first = key.is_some_and(|k| {
            if p.keys.contains(k) {
                false
            } else {
                p.keys.insert(k.to_vec());
                true
            }
        });
        Some((
            Taken {
                partition,
                offset,
                epoch: p.epoch,
            },
            first,
        ))
    }

    /// Its result (or error record) is acknowledged by the broker.
    pub fn done(&self, t: Taken) {
        let mut parts = self.parts.lock();
        if let Some(p) = parts.get_mut(&t.partition) {
            if p.epoch == t.epoch {
                p.in_flight.remove(&t.offset);
            }
        }
        drop(parts);
        self.finished.notify_all();
    }

    /// Messages in flight, all partitions together.
    pub fn in_flight(&self) -> usize {
        self.parts.lock().values().map(|p| p.in_flight.len()).sum()
    }

    /// The next offset to read of each partition, where the newest taken
    /// one is known (for the lag).
    pub fn positions(&self) -> Vec<(i32, i64)> {
        let parts = self.parts.lock();
        parts
            .iter()
            .filter_map(|(&k, p)| Some((k, p.next?)))
            .collect()
    }

    /// Offsets to commit now: partitions (of `only`, or all) whose
    /// committable offset moved past the last commit.
    pub fn to_commit(&self, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        let parts = self.parts.lock();
        parts
            .iter()
            .filter(|(k, _)| only.is_none_or(|o| o.contains(k)))
            .filter_map(|(&k, p)| {
                let c = p.committable()?;
                (p.committed != Some(c)).then_some((k, c))
            })
            .collect()
    }

    /// Those offsets are committed.
    pub fn committed(&self, done: &[(i32, i64)]) {
        let mut parts = self.parts.lock();
        for &(k, c) in done {
            if let Some(p) = parts.get_mut(&k) {
                p.committed = Some(p.committed.map_or(c, |x| x.max(c)));
            }
        }
    }

    /// Waits until `partitions` (all: `None`) have nothing in flight, or
    /// `timeout`; whether they drained.
    pub fn drain(&self, partitions: Option<&[i32]>, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut parts = self.parts.lock();
        loop {
            let busy = parts
                .iter()
                .any(|(k, p)| partitions.is_none_or(|o| o.contains(k)) && !p.in_flight.is_empty());
            if !busy {
                return true;
            }
            if self.finished.wait_until(&mut parts, until).timed_out() {
                return false;
            }
        }
    }

    /// Waits until at most `limit` messages are in flight, or `timeout`.
    pub fn wait_below(&self, limit: usize, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut parts = self.parts.lock();
        loop {
            if parts.values().map(|p| p.in_flight.len()).sum::<usize>() <= limit {
                return true;
            }
            if self.finished.wait_until(&mut parts, until).timed_out() {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_only_moves_over_a_prefix_that_is_wholly_done() {
        let o = Offsets::default();
        o.assign(0);
        let t: Vec<Taken> = (10..15).map(|i| o.take(0, i, None).unwrap().0).collect();
        assert_eq!(o.to_commit(None), vec![(0, 10)]);
        o.done(t[1]);
        o.done(t[3]);
        assert_eq!(o.to_commit(None), vec![(0, 10)], "10 is still in flight");
        o.done(t[0]);
        assert_eq!(o.to_commit(None), vec![(0, 12)]);
        o.committed(&[(0, 12)]);
        assert!(o.to_commit(None).is_empty(), "nothing new since the commit");
        o.done(t[2]);
        o.done(t[4]);
        assert_eq!(o.to_commit(None), vec![(0, 15)]);
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn a_late_finish_from_an_earlier_assignment_changes_nothing() {
        let o = Offsets::default();
        o.assign(3);
        let (old, _) = o.take(3, 7, None).unwrap();
        o.revoke(3);
        assert!(o.take(3, 8, None).is_none(), "not assigned");
        o.assign(3);
        let (new, _) = o.take(3, 7, None).unwrap();
        o.done(old);
        assert_eq!(
            o.in_flight(),
            1,
            "the new assignment's 7 is still in flight"
        );
        o.done(new);
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn a_keys_first_message_after_each_assignment_is_marked() {
        let o = Offsets::default();
        o.assign(1);
        assert!(o.take(1, 0, Some(b"a")).unwrap().1);
        assert!(!o.take(1, 1, Some(b"a")).unwrap().1);
        assert!(o.take(1, 2, Some(b"b")).unwrap().1);
        assert!(!o.take(1, 3, None).unwrap().1, "keyless");
        o.revoke(1);
        o.assign(1);
        assert!(o.take(1, 4, Some(b"a")).unwrap().1, "new assignment");
    }

    #[test]
    fn drain_waits_for_the_partitions_asked_for() {
        let o = std::sync::Arc::new(Offsets::default());
        o.assign(0);
        o.assign(1);
        let (a, _) = o.take(0, 0, None).unwrap();
        let (_b, _) = o.take(1, 0, None).unwrap();
        assert!(!o.drain(Some(&[0]), Duration::from_millis(20)));
        let o2 = o.clone();
        let t = std::thread::spawn(move || o2.drain(Some(&[0]), Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        o.done(a);
        assert!(t.join().unwrap(), "partition 0 drained; 1 is not asked for");
        assert!(!o.wait_below(0, Duration::from_millis(10)));
        assert!(o.wait_below(1, Duration::from_millis(10)));
    }
}
