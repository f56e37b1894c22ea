//! Idempotent forwarding (docs/design.md §3.16): the producer identity leaderlink stamps on the
//! batches it encodes, their per-partition sequences, and the batches with a producer id that
//! are in leaderlink's hands, which decide how OUT_OF_ORDER_SEQUENCE_NUMBER is read.
//!
//! The rules follow Kafka's Java producer (`Sender`, `TransactionManager`):
//! * one producer id and epoch (InitProducerId without a transactional id), obtained on first
//!   use;
//! * a sequence per partition, counted in records, assigned when a batch is first handed to its
//!   leader connection and kept, with the batch's bytes, on every retry;
//! * at most five requests in flight per partition (the forwarder's partition gates);
//! * OUT_OF_ORDER_SEQUENCE_NUMBER while an earlier batch of the same producer and partition is
//!   still unfinished means "retry behind it";
//! * a partition's batches go on the wire in sequence order ([`Turn`]): a batch waits (without
//!   backoff) while an earlier one of its producer and epoch is in leaderlink's hands but not on
//!   the wire (it failed and waits for its own retry), and retries go one at a time, each once
//!   every earlier batch is acknowledged. Sent anyway, a batch could only come back
//!   OUT_OF_ORDER_SEQUENCE_NUMBER, and every later batch behind it, each retried on its own
//!   backoff: after a leader failover that convoy kept a partition at a few batches per second.
//!   Java's producer has the same rule (`RecordAccumulator` drains a partition's retried batches
//!   one at a time, in sequence order, before new ones);
//! * a batch given up without a success (a final error, the call's deadline, a cancelled call)
//!   leaves a hole in its partition's sequence, which only a new epoch closes: the epoch is
//!   bumped (KIP-360) before the next batch is stamped, every partition's sequence starts again
//!   at 0, and unfinished batches of the old epoch are stamped anew when they are retried;
//! * INVALID_PRODUCER_EPOCH, UNKNOWN_PRODUCER_ID and PRODUCER_FENCED for a batch of the current
//!   epoch bump it too, and the batch is retried with a new stamp; so does
//!   OUT_OF_ORDER_SEQUENCE_NUMBER for a batch with nothing of its producer unfinished before it
//!   (the leader lost the producer's state, or an earlier batch was acknowledged after this one's
//!   request left), as Java's idempotent producer does (`TransactionManager.canRetry`);
//! * once a bump is due, no batch is sent again with a stamp of the old epoch: each is stamped
//!   anew after the bump (Java resets the sequences of its unacknowledged batches likewise).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use tokio::time::Instant;

use super::batch;
use crate::kafka::{
    connection::Connection,
    producer_id::{InitProducerIdError, ProducerIdentity, init_producer_id},
};

/// A partition: topic and index.
pub type Tp = (String, i32);

/// The stamp leaderlink put on one batch it encoded.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// The identity generation the stamp belongs to (one per producer id + epoch).
    pub generation: u64,
    /// The producer identity.
    pub identity: ProducerIdentity,
    /// First sequence of the batch.
    pub base_sequence: i32,
    /// The batch with the stamp in its header.
    pub batch: Bytes,
}

/// A batch with a producer id while it is in leaderlink's hands: the producer, epoch and base
/// sequence in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Open {
    /// Producer id.
    pub producer_id: i64,
    /// Producer epoch.
    pub epoch: i16,
    /// Base sequence.
    pub base_sequence: i32,
}

#[derive(Default)]
struct State {
    /// The cluster offers no InitProducerId: batches go out without a producer id.
    unsupported: bool,
    identity: Option<ProducerIdentity>,
    generation: u64,
    /// A batch of the current generation was given up: bump the epoch before the next stamp.
    bump: bool,
    /// Next sequence per partition, for the current generation.
    next: HashMap<Tp, i32>,
    /// Batches with a producer id in leaderlink's hands, per partition, and whether each is on
    /// the wire now (handed to its connection and not yet answered).
    open: HashMap<Tp, BTreeMap<Open, bool>>,
}

/// A batch about to go on the wire, for the turn rule (the module's rules): when it may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A batch to be stamped now: once every batch of the current identity on its partition in
    /// leaderlink's hands is on the wire.
    New,
    /// A batch with a producer id sent for the first time (a caller's raw idempotent batch):
    /// once every earlier batch of its producer and epoch in leaderlink's hands is on the wire.
    Behind(Open),
    /// A batch sent again: once no earlier batch of its producer and epoch is in leaderlink's
    /// hands at all. Retries go one at a time, each after the one before it is acknowledged,
    /// as Java's producer sends them: pipelined behind an earlier retry, a batch would come
    /// back OUT_OF_ORDER_SEQUENCE_NUMBER whenever that one fails again.
    First(Open),
}

impl State {
    /// Whether every batch of `tp` in leaderlink's hands that `earlier` selects is on the wire.
    fn all_on_wire(&self, tp: &Tp, earlier: impl Fn(&Open) -> bool) -> bool {
        self.open
            .get(tp)
            .is_none_or(|set| set.iter().all(|(o, on)| *on || !earlier(o)))
    }

    fn has_turn(&self, tp: &Tp, turn: Turn) -> bool {
        let earlier = |open: Open| {
            move |o: &Open| {
                o.producer_id == open.producer_id
                    && o.epoch == open.epoch
                    && o.base_sequence < open.base_sequence
            }
        };
        match turn {
            // With a bump due, the batch is stamped under the next identity, of which nothing
            // is open yet (the bump runs before the stamp).
            Turn::New => {
                self.bump
                    || self.identity.is_none_or(|id| {
                        self.all_on_wire(tp, |o| {
                            o.producer_id == id.producer_id && o.epoch == id.epoch
                        })
                    })
            }
            Turn::Behind(open) => self.all_on_wire(tp, earlier(open)),
            Turn::First(open) => self
                .open
                .get(tp)
                .is_none_or(|set| !set.keys().any(earlier(open))),
        }
    }
}

/// The idempotent producer of one forwarder.
#[derive(Default)]
pub struct Producer {
    /// Single flight for InitProducerId (the first identity, and epoch bumps).
    init: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    /// Calls waiting for their turn ([`Producer::wait_turn`]); nobody is woken while it is zero.
    turn_waiters: AtomicUsize,
    /// Woken when an open batch goes on the wire or is settled.
    changed: tokio::sync::Notify,
}

/// The producer's state, locked: stamping and handing the stamped batches to their connection
/// under one lock keeps each partition's wire order equal to its sequence order.
pub struct Stamper<'a> {
    st: MutexGuard<'a, State>,
}

impl Stamper<'_> {
    /// Stamps `batch` (encoded by leaderlink, `records` records) for `tp` with the current
    /// identity and the partition's next sequence, and counts it as open. `None` when no
    /// identity is ready (see [`Producer::ready`]).
    pub fn stamp(&mut self, tp: &Tp, batch: &[u8], records: u32) -> Option<Stamp> {
        let identity = self.st.identity?;
        let generation = self.st.generation;
        let next = self.st.next.entry(tp.clone()).or_insert(0);
        let base_sequence = *next;
        // Sequences wrap to 0 after i32::MAX, as Kafka's do.
        *next =
            ((i64::from(base_sequence) + i64::from(records)) % (i64::from(i32::MAX) + 1)) as i32;
        self.st.open.entry(tp.clone()).or_default().insert(
            Open {
                producer_id: identity.producer_id,
                epoch: identity.epoch,
                base_sequence,
            },
            false,
        );
        Some(Stamp {
            generation,
            identity,
            base_sequence,
            batch: batch::stamp(batch, identity.producer_id, identity.epoch, base_sequence),
        })
    }

    /// Counts a caller's batch with a producer id (a raw idempotent batch) as open on `tp`.
    pub fn open_raw(&mut self, tp: &Tp, open: Open) {
        self.st
            .open
            .entry(tp.clone())
            .or_default()
            .entry(open)
            .or_insert(false);
    }

    /// Whether a batch of `tp` may go on the wire now (see [`Turn`]).
    pub fn has_turn(&self, tp: &Tp, turn: Turn) -> bool {
        self.st.has_turn(tp, turn)
    }

    /// The open batch `open` of `tp` was handed to its connection.
    pub fn on_wire(&mut self, tp: &Tp, open: Open) {
        if let Some(on) = self.st.open.get_mut(tp).and_then(|set| set.get_mut(&open)) {
            *on = true;
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Producer {
    /// Whether leaderlink stamps batches at all: false once a broker turned out to offer no
    /// InitProducerId (see [`Self::disable`]).
    pub fn available(&self) -> bool {
        !lock(&self.state).unsupported
    }

    /// The brokers offer no InitProducerId (a Kafka-compatible broker without idempotent
    /// producers): from now on batches go out without a producer id, as Kafka's Java producer
    /// does when idempotence is only its default. Logged once, at warn.
    pub fn disable(&self) {
        let mut st = lock(&self.state);
        if !st.unsupported {
            st.unsupported = true;
            tracing::warn!(
                "the broker offers no InitProducerId: batches leaderlink encodes go out without \
                 a producer id, and retries may duplicate them (flagged possibly_duplicated)"
            );
        }
    }

    /// Whether an InitProducerId must run before the next stamp (no identity yet, or a bump is
    /// due).
    pub fn needs_init(&self) -> bool {
        let st = lock(&self.state);
        st.identity.is_none() || st.bump
    }

    /// Obtains the first identity, or bumps the epoch when a batch was given up, over `conn`.
    /// Concurrent callers wait for one InitProducerId.
    pub async fn ready(
        &self,
        conn: &Arc<Connection>,
        deadline: Instant,
    ) -> Result<(), InitProducerIdError> {
        let Ok(_single) = tokio::time::timeout_at(deadline, self.init.lock()).await else {
            return Err(crate::kafka::error::ConnError::NotSentInTime.into());
        };
        let current = {
            let st = lock(&self.state);
            if st.identity.is_some() && !st.bump {
                return Ok(());
            }
            st.identity.filter(|_| st.bump)
        };
        let identity = match init_producer_id(conn, current, deadline).await {
            Ok(id) => id,
            // A broker that will not bump this identity (it no longer knows it, or the epoch
            // is exhausted) hands out a new one.
            Err(InitProducerIdError::Kafka { .. }) if current.is_some() => {
                init_producer_id(conn, None, deadline).await?
            }
            Err(e) => return Err(e),
        };
        let mut st = lock(&self.state);
        st.identity = Some(identity);
        st.generation += 1;
        st.bump = false;
        st.next.clear();
        // Batches of the old identity stay open until their calls settle them; the new one
        // starts every partition at sequence 0.
        tracing::debug!(
            producer_id = identity.producer_id,
            epoch = identity.epoch,
            "idempotent producer identity"
        );
        Ok(())
    }

    /// Locks the state for stamping (see [`Stamper`]).
    pub fn stamper(&self) -> Stamper<'_> {
        Stamper {
            st: lock(&self.state),
        }
    }

    /// Whether `stamp` belongs to the current identity and no bump of it is due (else the
    /// batch is stamped anew, after the bump, before it is sent again: sent with the old stamp,
    /// a batch refused as fenced or out of order would only be refused again).
    pub fn is_current(&self, stamp: &Stamp) -> bool {
        let st = lock(&self.state);
        st.generation == stamp.generation && !st.bump
    }

    /// The open batch `open` of `tp` is back from the wire (answered, or its request failed):
    /// until it is sent again, later batches of its producer wait for their turn.
    pub fn off_wire(&self, tp: &Tp, open: Open) {
        let mut st = lock(&self.state);
        if let Some(on) = st.open.get_mut(tp).and_then(|set| set.get_mut(&open)) {
            *on = false;
        }
    }

    /// The batch `open` on `tp` is settled: acknowledged (`acked`), or given up. A stamp of the
    /// current identity given up leaves a hole in the partition's sequence: the epoch is bumped
    /// before the next stamp.
    pub fn settle(&self, tp: &Tp, open: Open, stamp_generation: Option<u64>, acked: bool) {
        let mut st = lock(&self.state);
        if let Some(set) = st.open.get_mut(tp) {
            set.remove(&open);
            if set.is_empty() {
                st.open.remove(tp);
            }
        }
        if !acked && stamp_generation == Some(st.generation) {
            st.bump = true;
        }
        drop(st);
        self.turn_may_have_changed();
    }

    /// Wakes the calls waiting for their turn, if any. Called after an open batch went on the
    /// wire or was settled, with the state unlocked (a batch leaving the wire gives no turn).
    pub fn turn_may_have_changed(&self) {
        if self.turn_waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Waits until one of `batches` has its turn (see [`Turn`]), or until `deadline`.
    pub async fn wait_turn(&self, batches: &[(Tp, Turn)], deadline: tokio::time::Instant) {
        /// Counts a waiter for as long as it waits, however the wait ends (a cancelled call).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.turn_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.turn_waiters);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the state is looked at: a change after the look wakes it.
            notified.as_mut().enable();
            {
                let st = lock(&self.state);
                if batches.iter().any(|(tp, turn)| st.has_turn(tp, *turn)) {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// The leader refused a stamp of the current identity as fenced or unknown
    /// (INVALID_PRODUCER_EPOCH, UNKNOWN_PRODUCER_ID, PRODUCER_FENCED): bump before the next
    /// stamp.
    pub fn fenced(&self, stamp: &Stamp) {
        let mut st = lock(&self.state);
        if st.generation == stamp.generation {
            st.bump = true;
        }
    }

    /// OUT_OF_ORDER_SEQUENCE_NUMBER for `open` on `tp`: whether to retry. Yes while an earlier
    /// batch of the same producer and epoch on the partition is still unfinished (the broker
    /// waits for it), or, for a stamp (`stamp_generation`), when its identity is replaced or
    /// about to be (it is stamped anew). No otherwise: the sequence is broken and the batch is
    /// given up.
    pub fn retry_out_of_order(&self, tp: &Tp, open: Open, stamp_generation: Option<u64>) -> bool {
        let st = lock(&self.state);
        if let Some(g) = stamp_generation
            && (g != st.generation || st.bump)
        {
            return true;
        }
        st.open.get(tp).is_some_and(|set| {
            set.keys().any(|o| {
                o.producer_id == open.producer_id
                    && o.epoch == open.epoch
                    && o.base_sequence < open.base_sequence
            })
        })
    }

    /// Partitions with batches in leaderlink's hands (for tests and the admin view).
    pub fn open_partitions(&self) -> usize {
        lock(&self.state).open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn producer_with(identity: ProducerIdentity) -> Producer {
        let p = Producer::default();
        {
            let mut st = lock(&p.state);
            st.identity = Some(identity);
            st.generation = 1;
        }
        p
    }

    fn plain() -> Bytes {
        batch::encode(
            &[crate::proto::v1::Record {
                key: None,
                value: Some(Bytes::from_static(b"v")),
                headers: vec![],
                timestamp_ms: 1,
            }],
            1,
        )
    }

    fn open_of(s: &Stamp) -> Open {
        Open {
            producer_id: s.identity.producer_id,
            epoch: s.identity.epoch,
            base_sequence: s.base_sequence,
        }
    }

    #[test]
    fn sequences_count_records_per_partition_and_wrap() {
        let p = producer_with(ProducerIdentity {
            producer_id: 9,
            epoch: 0,
        });
        let (t0, t1) = (("t".to_string(), 0), ("t".to_string(), 1));
        let b = plain();
        let mut s = p.stamper();
        assert_eq!(s.stamp(&t0, &b, 3).unwrap().base_sequence, 0);
        assert_eq!(s.stamp(&t0, &b, 2).unwrap().base_sequence, 3);
        assert_eq!(s.stamp(&t1, &b, 1).unwrap().base_sequence, 0);
        s.st.next.insert(t1.clone(), i32::MAX - 1);
        assert_eq!(s.stamp(&t1, &b, 4).unwrap().base_sequence, i32::MAX - 1);
        assert_eq!(s.stamp(&t1, &b, 1).unwrap().base_sequence, 2);
    }

    #[test]
    fn out_of_order_is_retried_only_behind_an_earlier_open_batch() {
        let p = producer_with(ProducerIdentity {
            producer_id: 9,
            epoch: 0,
        });
        let tp = ("t".to_string(), 0);
        let b = plain();
        let (first, second) = {
            let mut s = p.stamper();
            (s.stamp(&tp, &b, 1).unwrap(), s.stamp(&tp, &b, 1).unwrap())
        };
        // The first is unfinished: the second waits behind it.
        assert!(p.retry_out_of_order(&tp, open_of(&second), Some(1)));
        // The first is acknowledged: the second's OUT_OF_ORDER is final.
        p.settle(&tp, open_of(&first), Some(1), true);
        assert!(!p.retry_out_of_order(&tp, open_of(&second), Some(1)));
        // A raw batch of another producer is judged by its own producer's batches.
        let raw = |seq| Open {
            producer_id: 77,
            epoch: 3,
            base_sequence: seq,
        };
        p.stamper().open_raw(&tp, raw(10));
        assert!(p.retry_out_of_order(&tp, raw(11), None));
        assert!(!p.retry_out_of_order(&tp, raw(10), None));
    }

    #[test]
    fn a_batch_given_up_asks_for_a_new_epoch_and_retries_stale_stamps() {
        let p = producer_with(ProducerIdentity {
            producer_id: 9,
            epoch: 0,
        });
        let tp = ("t".to_string(), 0);
        let b = plain();
        let (first, second) = {
            let mut s = p.stamper();
            (s.stamp(&tp, &b, 1).unwrap(), s.stamp(&tp, &b, 1).unwrap())
        };
        assert!(!p.needs_init());
        // Acknowledged batches leave no hole.
        p.settle(&tp, open_of(&first), Some(1), true);
        assert!(!p.needs_init());
        // A given-up one does: the second's OUT_OF_ORDER is then retried with a new stamp.
        p.settle(&tp, open_of(&second), Some(1), false);
        assert!(p.needs_init());
        assert!(p.retry_out_of_order(&tp, open_of(&second), Some(1)));
        assert_eq!(p.open_partitions(), 0);
    }

    #[tokio::test]
    async fn a_partitions_batches_take_turns_in_sequence_order() {
        let p = Arc::new(producer_with(ProducerIdentity {
            producer_id: 9,
            epoch: 0,
        }));
        let tp = ("t".to_string(), 0);
        let b = plain();
        let (a, c) = {
            let mut s = p.stamper();
            let (a, c) = (s.stamp(&tp, &b, 1).unwrap(), s.stamp(&tp, &b, 1).unwrap());
            // Stamped, not yet on the wire: nothing behind them may go.
            assert!(!s.has_turn(&tp, Turn::New));
            assert!(!s.has_turn(&tp, Turn::Behind(open_of(&c))));
            assert!(s.has_turn(&tp, Turn::Behind(open_of(&a))));
            s.on_wire(&tp, open_of(&a));
            s.on_wire(&tp, open_of(&c));
            // Both on the wire: new batches pipeline behind them.
            assert!(s.has_turn(&tp, Turn::New));
            assert!(s.has_turn(&tp, Turn::Behind(open_of(&c))));
            (a, c)
        };
        // The first comes back failed: nothing new goes, and the second's retry waits until
        // the first is appended.
        p.off_wire(&tp, open_of(&a));
        assert!(!p.stamper().has_turn(&tp, Turn::New));
        assert!(p.stamper().has_turn(&tp, Turn::First(open_of(&a))));
        assert!(!p.stamper().has_turn(&tp, Turn::First(open_of(&c))));
        let waiter = {
            let p = p.clone();
            let (tp, c) = (tp.clone(), open_of(&c));
            tokio::spawn(async move {
                let far = Instant::now() + std::time::Duration::from_secs(3600);
                p.wait_turn(&[(tp, Turn::First(c))], far).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        p.settle(&tp, open_of(&a), Some(1), true);
        waiter.await.unwrap();
        assert!(p.stamper().has_turn(&tp, Turn::First(open_of(&c))));
        // Another producer's batches take no turn from leaderlink's.
        let raw = Open {
            producer_id: 77,
            epoch: 0,
            base_sequence: 0,
        };
        p.stamper().open_raw(&tp, raw);
        assert!(p.stamper().has_turn(&tp, Turn::First(open_of(&c))));
    }
}
