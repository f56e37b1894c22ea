//! The state a connection's callers and its two tasks share, and the tasks themselves: the
//! reader (frames in, matched to the pending FIFO) and the writer (frames out, whole).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, atomic::Ordering},
};

use bytes::{Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    task::AbortHandle,
    time::Instant,
};
use tracing::{Span, debug, warn};

use super::super::{
    error::{ConnError, RequestError},
    frame::{FrameDecoder, correlation_id},
};
use super::ConnStats;

/// How many acks=0 slots (requests the broker may answer or skip, docs/design.md §3.4) the FIFO
/// holds at most. Apache Kafka never answers acks=0 requests, so without this bound a stream of
/// them would grow the FIFO forever, also behind an older request still awaiting its answer;
/// when hit, the oldest such slot leaves the FIFO and its correlation id goes to a ring of as
/// many forgotten ids, whose late answers are dropped like any acks=0 answer. Memory stays
/// within twice this bound. (Smaller in unit tests, which fill it.)
pub(super) const MAX_NO_RESPONSE_SLOTS: usize = if cfg!(test) { 64 } else { 16 * 1024 };

/// Most frames the writer takes from its queue before one flush.
pub(super) const MAX_WRITE_BATCH: usize = 256;

/// Capacity of the writer's buffer; frames larger than this are written straight through.
pub(super) const WRITE_BUFFER: usize = 64 * 1024;

pub(super) enum Reply {
    /// A caller waits for the answer.
    Answer(oneshot::Sender<Result<Bytes, RequestError>>),
    /// acks=0: nobody waits; an answer, if the broker sends one, is dropped.
    None,
}

pub(super) struct Entry {
    pub(super) correlation_id: i32,
    pub(super) seq: u64,
    pub(super) reply: Reply,
    pub(super) queued_at: Instant,
    /// When the entry was registered, its frame queued for the writer (after any wait for
    /// room): how long the broker has had it, give or take the write.
    pub(super) sent_at: Instant,
    /// Held until the answer arrives, so `max_in_flight` and `max_in_flight_bytes` bound
    /// requests awaiting answers.
    pub(super) _hold: Option<Hold>,
}

/// An in-flight slot, the request's bytes, its share of the bytes gauge, and what the sender
/// attached (see [`Admission::attach`]).
pub(super) type Hold = (
    (OwnedSemaphorePermit, OwnedSemaphorePermit),
    BytesGuard,
    Option<Attachment>,
);

/// Something a sender wants kept alive exactly as long as its request occupies the connection
/// (see [`Admission::attach`]).
pub type Attachment = Box<dyn std::any::Any + Send + Sync>;

pub(super) struct Outgoing {
    pub(super) seq: u64,
    pub(super) head: Bytes,
    pub(super) body: Bytes,
    /// Signalled once the frame is flushed (acks=0 callers wait for this).
    pub(super) written: Option<oneshot::Sender<()>>,
    /// acks=0 requests hold their room only until written (or dropped unwritten).
    pub(super) _hold: Option<Hold>,
}

pub(super) struct State {
    pub(super) next_correlation_id: i32,
    pub(super) next_seq: u64,
    /// Sequence number of the last frame the writer has begun to write. Frames at or below it
    /// may have reached the broker.
    pub(super) claimed_seq: u64,
    /// Highest sequence number of a request sent without expecting an answer whose write has
    /// completed (updated only for write batches that carry such requests).
    pub(super) written_seq: u64,
    pub(super) fifo: VecDeque<Entry>,
    pub(super) no_response_slots: usize,
    /// Correlation ids of acks=0 slots taken out of the FIFO at its bound (oldest first, at
    /// most [`MAX_NO_RESPONSE_SLOTS`]): an answer to one of them is dropped.
    pub(super) forgotten: VecDeque<i32>,
    pub(super) to_writer: Option<mpsc::UnboundedSender<Outgoing>>,
    /// Requests taken back before the writer reached them (their deadline passed in the queue);
    /// the writer drops their frames. Only ever holds requests queued behind a write in progress.
    pub(super) withdrawn: Vec<u64>,
    /// Drain requested: the writer's queue is closed, and the connection closes once nothing
    /// awaits an answer and the writer is done.
    pub(super) draining: bool,
    pub(super) writer_done: bool,
    pub(super) poisoned: Option<ConnError>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) bytes: Arc<Semaphore>,
    pub(super) max_in_flight_bytes: usize,
    pub(super) stats: Arc<ConnStats>,
    pub(super) tasks: Mutex<Vec<AbortHandle>>,
    pub(super) client_id: Option<StrBytes>,
    pub(super) span: Span,
}

/// Releases a request's bytes from the in-flight gauge when the request is done with, however
/// that happens (answered, written with acks=0, withdrawn, or failed by a poison).
pub(super) struct BytesGuard {
    pub(super) stats: Arc<ConnStats>,
    pub(super) bytes: u64,
}

impl Drop for BytesGuard {
    fn drop(&mut self) {
        self.stats
            .in_flight_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the state half-updated in a way that matters
    // more than losing the connection, so poisoning of the std mutex is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a request stands when its waiter's deadline has passed ([`Shared::at_deadline`]).
pub(super) enum AtDeadline {
    /// Not begun on the wire: taken back, the connection is untouched.
    Withdrawn,
    /// Its answer has been read (it is being handed over).
    Answered,
    /// Sent without expecting an answer, and the write has completed.
    Written,
    /// On the wire and unanswered: the connection is out of step with its leader.
    Pending,
    /// The connection is already gone.
    Poisoned,
}

impl State {
    /// Keeps the FIFO within [`MAX_NO_RESPONSE_SLOTS`] acks=0 slots: the oldest leave it, and
    /// their correlation ids go to the `forgotten` ring.
    pub(super) fn bound_no_response_slots(&mut self) {
        while self.no_response_slots > MAX_NO_RESPONSE_SLOTS {
            let Some(pos) = self
                .fifo
                .iter()
                .position(|e| matches!(e.reply, Reply::None))
            else {
                break;
            };
            let entry = self.fifo.remove(pos).expect("position is valid");
            self.no_response_slots -= 1;
            if self.forgotten.len() == MAX_NO_RESPONSE_SLOTS {
                self.forgotten.pop_front();
            }
            self.forgotten.push_back(entry.correlation_id);
        }
    }

    pub(super) fn awaits_answers(&self) -> bool {
        self.fifo.len() > self.no_response_slots
    }
}

impl Shared {
    /// The writer has written everything it was given after a drain: close now if nothing
    /// awaits an answer.
    /// Returns whether the writer should keep its half open (a drain still waits for answers).
    pub(super) fn writer_finished(&self) -> bool {
        let mut st = lock(&self.state);
        st.writer_done = true;
        let draining = st.draining;
        let close = draining && !st.awaits_answers();
        drop(st);
        if close {
            self.poison(ConnError::Shutdown);
        }
        draining && !close
    }

    /// Judges, under one lock, a request whose waiter's deadline has passed: takes it back if
    /// the writer has not begun it, and otherwise tells whether it is still owed an answer.
    pub(super) fn at_deadline(&self, seq: u64, expects_answer: bool) -> AtDeadline {
        let mut st = lock(&self.state);
        if st.poisoned.is_some() {
            return AtDeadline::Poisoned;
        }
        if Self::withdraw_locked(&self.stats, &mut st, seq) {
            return AtDeadline::Withdrawn;
        }
        let pending = if expects_answer {
            st.fifo.iter().any(|e| e.seq == seq)
        } else {
            seq > st.written_seq
        };
        match (pending, expects_answer) {
            (true, _) => AtDeadline::Pending,
            (false, true) => AtDeadline::Answered,
            (false, false) => AtDeadline::Written,
        }
    }

    /// Takes back a request the writer has not begun to write: its FIFO entry goes, and the
    /// writer will skip its frame. Returns false if it may already be on the wire.
    pub(super) fn withdraw(&self, seq: u64) -> bool {
        let mut st = lock(&self.state);
        if st.poisoned.is_some() {
            return false;
        }
        Self::withdraw_locked(&self.stats, &mut st, seq)
    }

    pub(super) fn withdraw_locked(stats: &ConnStats, st: &mut State, seq: u64) -> bool {
        if seq <= st.claimed_seq {
            return false;
        }
        let Some(pos) = st.fifo.iter().position(|e| e.seq == seq) else {
            return false;
        };
        let entry = st.fifo.remove(pos).expect("position is valid");
        match entry.reply {
            Reply::Answer(_) => {
                stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            Reply::None => st.no_response_slots -= 1,
        }
        st.withdrawn.push(seq);
        true
    }

    pub(super) fn poison(&self, cause: ConnError) {
        let (entries, claimed) = {
            let mut st = lock(&self.state);
            if st.poisoned.is_some() {
                return;
            }
            st.poisoned = Some(cause.clone());
            st.to_writer = None;
            st.no_response_slots = 0;
            (std::mem::take(&mut st.fifo), st.claimed_seq)
        };
        self.permits.close();
        self.bytes.close();
        if !matches!(cause, ConnError::Shutdown) {
            self.stats.poisoned.fetch_add(1, Ordering::Relaxed);
        }
        let mut failed = 0usize;
        for entry in entries {
            if let Reply::Answer(tx) = entry.reply {
                failed += 1;
                self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Err(RequestError {
                    cause: cause.clone(),
                    maybe_sent: entry.seq <= claimed,
                }));
            }
        }
        self.span.in_scope(|| {
            if cause.is_ordinary() {
                debug!(cause = %cause, failed, "leader connection closed");
            } else {
                warn!(cause = %cause, failed, "leader connection poisoned");
            }
        });
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }

    /// Matches one answer against the FIFO of pending requests.
    pub(super) fn deliver(&self, frame: Bytes) -> Result<(), ConnError> {
        let got = correlation_id(&frame);
        let mut st = lock(&self.state);
        // The answer to an acks=0 request forgotten at the FIFO's bound: dropped. (Ids are
        // unique among recent requests; the ring is empty unless the bound was hit.)
        if let Some(pos) = st.forgotten.iter().position(|&id| id == got) {
            st.forgotten.remove(pos);
            return Ok(());
        }
        loop {
            let Some(front) = st.fifo.front() else {
                return Err(ConnError::UnknownCorrelationId { got });
            };
            let matches = front.correlation_id == got;
            let no_answer_expected = matches!(front.reply, Reply::None);
            if !matches && !no_answer_expected {
                return Err(ConnError::OutOfOrder {
                    expected: front.correlation_id,
                    got,
                });
            }
            let entry = st.fifo.pop_front().expect("front exists");
            if no_answer_expected {
                // acks=0 slot: answered (drop the answer) or skipped (a later id came first).
                st.no_response_slots -= 1;
            }
            if !matches {
                continue;
            }
            let drained = st.draining && st.writer_done && !st.awaits_answers();
            drop(st);
            if let Reply::Answer(tx) = entry.reply {
                self.stats.latency.record(entry.queued_at.elapsed());
                self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                // The caller may have gone away (cancelled); the answer is then dropped.
                let _ = tx.send(Ok(frame));
            }
            if drained {
                self.poison(ConnError::Shutdown);
            }
            return Ok(());
        }
    }
}

pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut reader: R,
    decoder: FrameDecoder,
) {
    let mut buf = BytesMut::new();
    let cause = loop {
        match decoder.split(&mut buf) {
            Ok(Some(frame)) => {
                if let Err(e) = shared.deliver(frame) {
                    break e;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => break e,
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => break ConnError::Closed,
            Ok(_) => {}
            Err(e) => break ConnError::io(e),
        }
    };
    shared.poison(cause);
}

pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    writer: W,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    let mut batch = Vec::with_capacity(MAX_WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_WRITE_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        {
            let mut st = lock(&shared.state);
            if st.poisoned.is_some() {
                return;
            }
            st.claimed_seq = batch.last().map_or(st.claimed_seq, |o| o.seq);
            if !st.withdrawn.is_empty() {
                // Drop withdrawn frames of this batch; the others are still in the queue.
                let in_batch: Vec<u64> = st
                    .withdrawn
                    .iter()
                    .copied()
                    .filter(|seq| batch.iter().any(|o| o.seq == *seq))
                    .collect();
                st.withdrawn.retain(|seq| !in_batch.contains(seq));
                batch.retain(|o| !in_batch.contains(&o.seq));
            }
            // Counted before the write, not after: an answer can reach its caller before this
            // task runs again, and a caller that reads `sent` after its answer must see its
            // request counted. A write that then fails poisons the connection, and those
            // requests are reported as maybe written, so counting them as sent is accurate.
            shared
                .stats
                .sent
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        let mut result = Ok(());
        for o in &batch {
            result = async {
                w.write_all(&o.head).await?;
                w.write_all(&o.body).await
            }
            .await;
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = w.flush().await;
        }
        if let Err(e) = result {
            shared.poison(ConnError::io(e));
            return;
        }
        if let Some(last) = batch.iter().rev().find(|o| o.written.is_some()) {
            let mut st = lock(&shared.state);
            st.written_seq = st.written_seq.max(last.seq);
        }
        for o in batch.drain(..) {
            if let Some(tx) = o.written {
                let _ = tx.send(());
            }
        }
    }
    // The queue was closed by a drain (a poison aborts this task instead). Keep the write half
    // open: dropping it would send FIN, and a broker may close the connection before
    // answering what is in flight. The task is aborted when the connection closes.
    if shared.writer_finished() {
        let _keep_open = w;
        std::future::pending::<()>().await
    }
}
