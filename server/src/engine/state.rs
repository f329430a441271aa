//! Per-key bookkeeping of a model version and the per-replica state stores.
//!
//! The [`KeyTable`] hands every keyed request a ticket in arrival order and
//! lets a replica run ticket `t` of a key only once ticket `t - 1` has
//! finished, wherever it ran: per-key order holds under every routing
//! policy. It also records which replica holds the key's state, so a replica
//! that gets a key whose state lives elsewhere moves it over (a migration)
//! instead of using a stale copy. Under affinity routing a key never moves.
//!
//! Each replica's [`StateStore`] is only touched by its own thread, except
//! during a migration or an expiry, when the key has no request in flight:
//! its mutex is uncontended on the hot path.

use super::config::KeyedLimits;
use super::keys::Key;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// A key's state on the replica that holds it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KeyState {
    /// One row per sequence state pair, in config order; empty until the
    /// key's first request has run.
    pub sequence: Vec<Bytes>,
    /// The key's last events, oldest first (sliding window models).
    pub window: VecDeque<Bytes>,
}

impl KeyState {
    pub fn bytes(&self) -> usize {
        self.sequence.iter().map(|b| b.len()).sum::<usize>()
            + self.window.iter().map(|b| b.len()).sum::<usize>()
    }
}

/// One replica's keyed state.
#[derive(Debug, Default)]
pub struct StateStore {
    map: Mutex<HashMap<Key, KeyState>>,
    /// Keys held here, for the per-replica live-keys gauge.
    pub live_keys: AtomicUsize,
}

impl StateStore {
    pub fn take(&self, key: &Key) -> Option<KeyState> {
        let s = self.map.lock().remove(key);
        if s.is_some() {
            self.live_keys.fetch_sub(1, Relaxed);
        }
        s
    }

    pub fn put(&self, key: Key, state: KeyState) {
        if self.map.lock().insert(key, state).is_none() {
            self.live_keys.fetch_add(1, Relaxed);
        }
    }
}

/// Counters of the keyed state of one model version.
#[derive(Debug, Default)]
pub struct StateCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub migrations: AtomicU64,
    pub evictions: AtomicU64,
    pub expirations: AtomicU64,
    /// Bytes of state held across replicas.
    pub bytes: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    issued: u64,
    next: u64,
    /// (ticket, replica) of every issued ticket not yet finished, in order.
    route: VecDeque<(u64, usize)>,
    /// Tickets dropped before they ran (cancelled, expired) that `next`
    /// must step over.
    skipped: BTreeSet<u64>,
    /// The replica that holds the key's state, if any.
    owner: Option<usize>,
    last_used: Instant,
    lru_tick: u64,
}

impl Entry {
    fn idle(&self) -> bool {
        self.route.is_empty()
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// LRU order: tick of last use → key.
    lru: BTreeMap<u64, Key>,
    tick: u64,
}

/// A request's place in its key's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub number: u64,
    pub replica: usize,
}

/// Per-key order, ownership and bounds for one model version.
#[derive(Debug)]
pub struct KeyTable {
    inner: Mutex<Inner>,
    limits: KeyedLimits,
    stores: Vec<Arc<StateStore>>,
    pub counters: StateCounters,
}

/// Expired keys removed per admission at most, so one request never pays
/// for a large sweep.
const SWEEP_PER_ADMIT: usize = 8;

/// Why a key could not be admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFull;

/// Why a key's state could not be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreRefused {
    InFlight,
    TableFull,
}

impl KeyTable {
    pub fn new(limits: KeyedLimits, replicas: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            limits,
            stores: (0..replicas)
                .map(|_| Arc::new(StateStore::default()))
                .collect(),
            counters: StateCounters::default(),
        }
    }

    pub fn store(&self, replica: usize) -> &Arc<StateStore> {
        &self.stores[replica]
    }

    /// Keys with bookkeeping (in flight or holding state).
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys with a request admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.inner
            .lock()
            .entries
            .values()
            .filter(|e| !e.idle())
            .count()
    }

    /// Issues the next ticket of `key`, on the replica `choose` picks.
    /// Expires idle keys and evicts least-recently-used ones to stay within
    /// `max_keys`; fails only when every key held has a request in flight.
    pub fn admit(
        &self,
        key: &Key,
        now: Instant,
        choose: impl FnOnce() -> usize,
    ) -> Result<Ticket, TableFull> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        self.sweep(inner, now);
        if let Some(e) = inner.entries.get(key) {
            if e.idle()
                && self
                    .limits
                    .expired(now.saturating_duration_since(e.last_used))
            {
                self.remove(inner, key);
                self.counters.expirations.fetch_add(1, Relaxed);
            }
        }
        if !inner.entries.contains_key(key) {
            while inner.entries.len() >= self.limits.max_keys {
                let victim = inner
                    .lru
                    .values()
                    .find(|k| inner.entries.get(*k).is_some_and(Entry::idle))
                    .cloned();
                match victim {
                    Some(v) => {
                        self.remove(inner, &v);
                        self.counters.evictions.fetch_add(1, Relaxed);
                    }
                    None => return Err(TableFull),
                }
            }
            inner.entries.insert(
                key.clone(),
                Entry {
                    issued: 0,
                    next: 0,
                    route: VecDeque::new(),
                    skipped: BTreeSet::new(),
                    owner: None,
                    last_used: now,
                    lru_tick: 0,
                },
            );
        }
        inner.tick += 1;
        let tick = inner.tick;
        let e = inner.entries.get_mut(key).expect("inserted above");
        inner.lru.remove(&e.lru_tick);
        inner.lru.insert(tick, key.clone());
        e.lru_tick = tick;
        e.last_used = now;
        let replica = choose();
        let number = e.issued;
        e.issued += 1;
        e.route.push_back((number, replica));
        Ok(Ticket { number, replica })
    }

    fn sweep(&self, inner: &mut Inner, now: Instant) {
        for _ in 0..SWEEP_PER_ADMIT {
            let Some((_, key)) = inner.lru.first_key_value() else {
                return;
            };
            let key = key.clone();
            let e = &inner.entries[&key];
            if !e.idle()
                || !self
                    .limits
                    .expired(now.saturating_duration_since(e.last_used))
            {
                return;
            }
            self.remove(inner, &key);
            self.counters.expirations.fetch_add(1, Relaxed);
        }
    }

    /// Forgets a key with nothing in flight, and frees its state.
    fn remove(&self, inner: &mut Inner, key: &Key) {
        if let Some(e) = inner.entries.remove(key) {
            inner.lru.remove(&e.lru_tick);
            if let Some(owner) = e.owner {
                if let Some(s) = self.stores[owner].take(key) {
                    self.counters.bytes.fetch_sub(s.bytes() as u64, Relaxed);
                }
            }
        }
    }

    /// For each `(key, ticket)`, whether it may run now, and where its
    /// state is. One lock for the whole scan.
    pub fn check(&self, items: &mut [(Option<&Key>, u64, Option<usize>, bool)]) {
        let g = self.inner.lock();
        for (key, ticket, owner, ok) in items.iter_mut() {
            match key {
                None => *ok = true,
                Some(k) => match g.entries.get(*k) {
                    Some(e) => {
                        *ok = e.next == *ticket;
                        *owner = e.owner;
                    }
                    None => *ok = false,
                },
            }
        }
    }

    /// Marks a ticket finished on `replica`; `holds_state` says whether the
    /// key's state now lives there (false after `sequence_end`). Returns the
    /// replica that holds the key's next ticket if it is another one, so the
    /// caller can wake it.
    pub fn finish(
        &self,
        key: &Key,
        ticket: u64,
        replica: usize,
        holds_state: Option<bool>,
    ) -> Option<usize> {
        let mut g = self.inner.lock();
        let e = g.entries.get_mut(key)?;
        if let Some(pos) = e.route.iter().position(|&(t, _)| t == ticket) {
            e.route.remove(pos);
        }
        if e.next == ticket {
            e.next += 1;
            while e.skipped.remove(&e.next) {
                e.next += 1;
            }
        } else if ticket > e.next {
            // Dropped before its turn: step over it when its turn comes.
            e.skipped.insert(ticket);
        }
        match holds_state {
            Some(true) => e.owner = Some(replica),
            Some(false) => e.owner = None,
            None => {}
        }
        let next_replica = e.route.front().map(|&(_, r)| r).filter(|&r| r != replica);
        if e.idle() && e.owner.is_none() && holds_state == Some(false) {
            // sequence_end: nothing left of the key.
            let key = key.clone();
            let inner = &mut *g;
            if let Some(e) = inner.entries.remove(&key) {
                inner.lru.remove(&e.lru_tick);
            }
        }
        next_replica
    }

    /// Makes `state` the state of `key`, held by the replica `choose` picks,
    /// in place of whatever the table held for it: a restore from a
    /// snapshot. The key must have no request in flight (its state could
    /// not be replaced under it).
    pub fn restore(
        &self,
        key: &Key,
        state: KeyState,
        now: Instant,
        choose: impl FnOnce() -> usize,
    ) -> Result<(), RestoreRefused> {
        {
            let mut g = self.inner.lock();
            match g.entries.get(key) {
                Some(e) if !e.idle() => return Err(RestoreRefused::InFlight),
                Some(_) => self.remove(&mut g, key),
                None => {}
            }
        }
        let t = self
            .admit(key, now, choose)
            .map_err(|TableFull| RestoreRefused::TableFull)?;
        self.account(0, state.bytes());
        self.stores[t.replica].put(key.clone(), state);
        self.finish(key, t.number, t.replica, Some(true));
        Ok(())
    }

    /// Adjusts the held-bytes gauge after a replica changed a key's state.
    pub fn account(&self, before: usize, after: usize) {
        if after >= before {
            self.counters
                .bytes
                .fetch_add((after - before) as u64, Relaxed);
        } else {
            self.counters
                .bytes
                .fetch_sub((before - after) as u64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max_keys: usize, idle_ms: u64) -> KeyedLimits {
        KeyedLimits {
            max_keys,
            idle_timeout: Duration::from_millis(idle_ms),
        }
    }

    fn may_run(t: &KeyTable, key: &Key, ticket: u64) -> bool {
        let mut items = [(Some(key), ticket, None, false)];
        t.check(&mut items);
        items[0].3
    }

    #[test]
    fn tickets_run_in_order_across_replicas() {
        let t = KeyTable::new(limits(10, 60_000), 2);
        let k: Key = "a".into();
        let now = Instant::now();
        let a = t.admit(&k, now, || 0).unwrap();
        let b = t.admit(&k, now, || 1).unwrap();
        assert_eq!((a.number, b.number), (0, 1));
        assert!(may_run(&t, &k, 0));
        assert!(!may_run(&t, &k, 1), "ticket 1 waits for ticket 0");
        // Ticket 0 finishes on replica 0 and its next ticket is on replica 1.
        assert_eq!(t.finish(&k, 0, 0, Some(true)), Some(1));
        assert!(may_run(&t, &k, 1));
        let mut items = [(Some(&k), 1, None, false)];
        t.check(&mut items);
        assert_eq!(
            items[0].2,
            Some(0),
            "the state is on replica 0: a migration"
        );
    }

    #[test]
    fn dropped_tickets_are_stepped_over() {
        let t = KeyTable::new(limits(10, 60_000), 1);
        let k: Key = "a".into();
        let now = Instant::now();
        for _ in 0..3 {
            t.admit(&k, now, || 0).unwrap();
        }
        // Ticket 1 is cancelled while ticket 0 still waits.
        t.finish(&k, 1, 0, None);
        assert!(!may_run(&t, &k, 2));
        t.finish(&k, 0, 0, Some(true));
        assert!(may_run(&t, &k, 2), "ticket 1 was skipped");
    }

    #[test]
    fn lru_eviction_keeps_keys_in_flight() {
        let t = KeyTable::new(limits(2, 60_000), 1);
        let now = Instant::now();
        let (a, b, c): (Key, Key, Key) = ("a".into(), "b".into(), "c".into());
        t.admit(&a, now, || 0).unwrap();
        t.admit(&b, now, || 0).unwrap();
        t.finish(&b, 0, 0, Some(true));
        t.store(0).put(
            b.clone(),
            KeyState {
                sequence: vec![Bytes::from_static(b"1234")],
                ..Default::default()
            },
        );
        t.account(0, 4);
        // `a` is in flight, `b` is idle: `b` goes although `a` is older.
        t.admit(&c, now, || 0).unwrap();
        assert_eq!(t.counters.evictions.load(Relaxed), 1);
        assert!(t.store(0).take(&b).is_none(), "evicting frees the state");
        assert_eq!(t.counters.bytes.load(Relaxed), 0);
        // Every key in flight: a new key is refused, not admitted unbounded.
        assert_eq!(t.admit(&"d".into(), now, || 0), Err(TableFull));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_restore_replaces_the_keys_state_wherever_it_was() {
        let t = KeyTable::new(limits(10, 60_000), 2);
        let k: Key = "a".into();
        let now = Instant::now();
        let row = |b: &'static [u8]| KeyState {
            sequence: vec![Bytes::from_static(b)],
            ..Default::default()
        };
        // The key's stale state lives on replica 0.
        t.admit(&k, now, || 0).unwrap();
        t.finish(&k, 0, 0, Some(true));
        t.store(0).put(k.clone(), row(b"old!"));
        t.account(0, 4);
        t.restore(&k, row(b"snapshot"), now, || 1).unwrap();
        assert!(t.store(0).take(&k).is_none(), "the stale copy is gone");
        assert_eq!(t.counters.bytes.load(Relaxed), 8);
        // The key's next request runs at once and finds the state on 1.
        let next = t.admit(&k, now, || 1).unwrap();
        let mut items = [(Some(&k), next.number, None, false)];
        t.check(&mut items);
        assert!(items[0].3);
        assert_eq!(items[0].2, Some(1));
        assert_eq!(&t.store(1).take(&k).unwrap().sequence[0][..], b"snapshot");
        // A key with a request in flight keeps its state.
        assert_eq!(
            t.restore(&k, row(b"late"), now, || 1),
            Err(RestoreRefused::InFlight)
        );
    }

    #[test]
    fn a_restore_dated_when_its_key_was_last_used_expires_from_then() {
        // Snapshots 7 ms old of keys whose idle timeout is 10 ms (what
        // `ModelVersion::restore_state` passes for a snapshot's age): they
        // expire 3 ms after the restore, not 10.
        let t = KeyTable::new(limits(100, 10), 1);
        let restored_at = Instant::now() + Duration::from_secs(1);
        let last_used = restored_at - Duration::from_millis(7);
        let (a, b): (Key, Key) = ("a".into(), "b".into());
        for k in [&a, &b] {
            t.restore(k, KeyState::default(), last_used, || 0).unwrap();
        }
        let held = t.admit(&a, restored_at + Duration::from_millis(2), || 0);
        assert_eq!(held.unwrap().number, 1, "ticket 0 was the restore's");
        let expired = t.admit(&b, restored_at + Duration::from_millis(4), || 0);
        assert_eq!(expired.unwrap().number, 0, "starts over");
        assert_eq!(t.counters.expirations.load(Relaxed), 1);
    }

    #[test]
    fn idle_keys_expire() {
        let t = KeyTable::new(limits(100, 10), 1);
        let k: Key = "a".into();
        let now = Instant::now();
        t.admit(&k, now, || 0).unwrap();
        t.finish(&k, 0, 0, Some(true));
        t.store(0).put(k.clone(), KeyState::default());
        let later = now + Duration::from_millis(50);
        let other: Key = "b".into();
        t.admit(&other, later, || 0).unwrap();
        assert_eq!(t.counters.expirations.load(Relaxed), 1);
        assert!(t.store(0).take(&k).is_none());
        // The expired key starts over from ticket 0.
        assert_eq!(t.admit(&k, later, || 0).unwrap().number, 0);
    }
}
