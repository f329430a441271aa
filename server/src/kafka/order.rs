//! Keeps each key's answers in offset order on the output topic.
//!
//! A key's messages are scored in order on one replica, but each answer is
//! written by a task of its own, and two tasks woken back to back can reach
//! the producer in either order. Each keyed message therefore takes a turn
//! in its key's queue: it enqueues its answer only after its predecessor
//! has enqueued (or given up) its own. Keys whose last message has already
//! enqueued need no queue, so the table holds about the messages in flight.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use tokio::sync::oneshot;

/// The turns of keyed messages, taken in offset order by the consumer
/// thread.
#[derive(Default)]
pub struct KeyOrder {
    last: Mutex<HashMap<Bytes, oneshot::Receiver<()>>>,
}

/// One message's place in its key's queue.
#[derive(Default)]
pub struct Turn {
    /// Resolves when the key's previous message has enqueued its answer.
    after: Option<oneshot::Receiver<()>>,
    /// Tells the key's next message that this one has (dropped: or never
    /// will).
    done: Option<oneshot::Sender<()>>,
}

impl KeyOrder {
    /// The next turn of `key` (keyless messages have no order to keep).
    pub fn turn(&self, key: Option<&Bytes>) -> Turn {
        let Some(key) = key else {
            return Turn::default();
        };
        let (done, next) = oneshot::channel();
        let after = self.last.lock().insert(key.clone(), next);
        Turn {
            after,
            done: Some(done),
        }
    }

    /// Forgets the keys whose last message has enqueued its answer.
    pub fn prune(&self) {
        self.last
            .lock()
            .retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.last.lock().len()
    }
}

impl Turn {
    /// Waits for the key's previous message.
    pub async fn wait(&mut self) {
        if let Some(rx) = self.after.take() {
            // An error means the predecessor gave up its turn: go on.
            let _ = rx.await;
        }
    }

    /// Lets the key's next message go.
    pub fn release(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_key_s_turns_pass_in_order_whatever_order_they_finish_in() {
        let order = KeyOrder::default();
        let key = Bytes::from_static(b"k");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20u64 {
            let mut turn = order.turn(Some(&key));
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                // Later messages finish their work first.
                tokio::time::sleep(std::time::Duration::from_millis(40 - 2 * i)).await;
                turn.wait().await;
                log.lock().push(i);
                turn.release();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*log.lock(), (0..20).collect::<Vec<_>>());
        // All enqueued: nothing left to remember.
        order.prune();
        assert_eq!(order.len(), 0);
    }

    #[tokio::test]
    async fn a_turn_given_up_releases_the_next_and_keyless_messages_never_wait() {
        let order = KeyOrder::default();
        let key = Bytes::from_static(b"k");
        let first = order.turn(Some(&key));
        let mut second = order.turn(Some(&key));
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second.wait())
            .await
            .expect("a dropped turn lets the next go");
        let mut keyless = order.turn(None);
        keyless.wait().await;
        // The second has not released: its key is remembered until then.
        order.prune();
        assert_eq!(order.len(), 1);
        second.release();
        order.prune();
        assert_eq!(order.len(), 0);
    }
}
