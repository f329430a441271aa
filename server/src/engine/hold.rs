//! What an admitted request holds until it leaves the engine: an admission
//! slot (its model's, and its priority level's), a place in its replica's
//! load, and its key's ticket. One guard owns all three. Each is given back
//! once, at its own point: the admission slot when the request leaves the
//! queue, the ticket when its answer (and its key's state) is settled, the
//! load when the request is dropped. Whatever a path forgets (an unwinding
//! batch, a stopping replica handing a request back) is given back when the
//! guard drops, so no path can leak a slot, a load or a key's turn.

use super::error::EngineError;
use super::keys::Key;
use super::model::ModelCore;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub struct Hold {
    core: Arc<ModelCore>,
    /// Priority level (1 the highest).
    level: u32,
    /// The replica it was routed to, which runs it.
    replica: usize,
    /// Still holds an admission slot: it has not left the queue.
    queued: bool,
    /// Counted in its replica's load.
    loaded: bool,
    /// Its key and ticket, until the ticket is finished.
    ticket: Option<(Key, u64)>,
}

impl Hold {
    /// Takes an admission slot of priority `level` and of the model; a
    /// full level or model refuses at once (never blocks, never grows).
    pub fn admit(core: &Arc<ModelCore>, level: u32) -> Result<Self, EngineError> {
        let cfg = &core.config;
        let policy = cfg.priorities.policy(level);
        let level_count = core.level_queued.get(level.saturating_sub(1) as usize);
        if let Some(c) = level_count {
            if c.fetch_add(1, Ordering::Relaxed) >= policy.max_queue_size {
                c.fetch_sub(1, Ordering::Relaxed);
                return Err(EngineError::Overloaded(format!(
                    "{} (priority level {level})",
                    cfg.name
                )));
            }
        }
        if core.queued.fetch_add(1, Ordering::Relaxed) >= cfg.max_queue_size {
            core.queued.fetch_sub(1, Ordering::Relaxed);
            if let Some(c) = level_count {
                c.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(EngineError::Overloaded(cfg.name.clone()));
        }
        core.metrics.queue_depth.increment(1.0);
        Ok(Self {
            core: core.clone(),
            level,
            replica: 0,
            queued: true,
            loaded: false,
            ticket: None,
        })
    }

    /// Records where the request goes and, for a keyed one, its ticket in
    /// its key's order (already issued by the key table).
    pub fn route(&mut self, replica: usize, ticket: Option<(Key, u64)>) {
        self.replica = replica;
        self.ticket = ticket;
    }

    /// The replica it was routed to.
    pub fn replica(&self) -> usize {
        self.replica
    }

    /// The ticket's number in its key's order (0 for a keyless request).
    pub fn ticket(&self) -> u64 {
        self.ticket.as_ref().map_or(0, |t| t.1)
    }

    /// Counts the request in its replica's load (the replica queued it).
    pub(super) fn count_load(&mut self) {
        if !self.loaded {
            self.loaded = true;
            if let Some(s) = self.core.shared(self.replica) {
                s.load.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Gives the admission slot back: the request left the queue (taken
    /// into a batch, or answered from the queue).
    pub fn leave_queue(&mut self) {
        if std::mem::take(&mut self.queued) {
            self.core.queued.fetch_sub(1, Ordering::Relaxed);
            if let Some(c) = self
                .core
                .level_queued
                .get(self.level.saturating_sub(1) as usize)
            {
                c.fetch_sub(1, Ordering::Relaxed);
            }
            self.core.metrics.queue_depth.decrement(1.0);
        }
    }

    /// Finishes the key's ticket, so the key's next request may run;
    /// `holds_state` says whether the key's state now lives on this replica
    /// (see [`super::state::KeyTable::finish`]). Returns the replica to
    /// wake, which the caller pokes once it holds no queue lock (a replica
    /// never takes another's queue while holding its own).
    pub fn finish_key(&mut self, holds_state: Option<bool>) -> Option<usize> {
        let (key, ticket) = self.ticket.take()?;
        self.core
            .keys
            .finish(&key, ticket, self.replica, holds_state)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.leave_queue();
        // The explicit paths finish the ticket first and poke after their
        // locks; one reaching here is a forgotten path (a batch unwinding,
        // a request handed back by a stopping replica), none of which holds
        // a queue lock, so poking now cannot take two queues at once.
        if let Some(r) = self.finish_key(None) {
            self.core.poke(r);
        }
        if self.loaded {
            if let Some(s) = self.core.shared(self.replica) {
                s.load.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mock::{MockBackend, MockLog};
    use std::time::{Duration, Instant};

    /// A hold dropped on a path that gave nothing back (what a panic or a
    /// forgotten branch would do) gives back all three.
    #[test]
    fn dropping_a_hold_gives_everything_back() {
        let mock = MockBackend::new(1, Duration::ZERO, Arc::new(MockLog::default()));
        let engine = mock
            .serve(
                "m",
                "max_batch_size = 1\ninstance_count = 2\nmax_queue_size = 2\n",
            )
            .unwrap();
        let core = engine.model("m", None).unwrap().core.clone();
        let key: Key = "k".into();
        let mut first = Hold::admit(&core, 1).unwrap();
        let t = core.keys.admit(&key, Instant::now(), || 1).unwrap();
        first.route(t.replica, Some((key.clone(), t.number)));
        first.count_load();
        let mut second = Hold::admit(&core, 1).unwrap();
        let t2 = core.keys.admit(&key, Instant::now(), || 1).unwrap();
        second.route(t2.replica, Some((key.clone(), t2.number)));
        let held = core.holds();
        assert_eq!(
            (held.queued, held.loads.clone(), held.keys_in_flight),
            (2, vec![0, 1], 1)
        );
        // The queue is full: admission refuses, and gives nothing away.
        assert!(matches!(
            Hold::admit(&core, 1),
            Err(EngineError::Overloaded(_))
        ));
        assert_eq!(core.holds().queued, 2);
        // The key's second ticket may not run before the first finishes.
        let may_run = |ticket: u64| {
            let mut items = [(Some(&key), ticket, None, false)];
            core.keys.check(&mut items);
            items[0].3
        };
        assert!(!may_run(t2.number));
        drop(first);
        assert!(may_run(t2.number), "the dropped hold kept its key's turn");
        second.leave_queue();
        second.leave_queue();
        assert_eq!(core.holds().queued, 0, "a slot given back twice");
        assert_eq!(second.finish_key(Some(true)), None);
        assert_eq!(second.finish_key(Some(true)), None);
        drop(second);
        assert!(core.holds().is_empty(), "{:?}", core.holds());
        engine.shutdown();
    }
}
