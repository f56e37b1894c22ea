//! One pipelined Kafka connection: many requests in flight, answers matched by correlation id.
//!
//! Shaped after rskafka's messenger, with a single writer task instead of a write lock:
//!
//! * [`Connection::send`] waits for an in-flight permit (the `max_in_flight` bound), then, under
//!   one lock, assigns the correlation id, registers the pending entry and queues the frame for the
//!   writer. The entry exists before a byte is written, so a fast answer always finds it
//!   (docs/design.md §3.1), and queue order equals wire order.
//! * The writer task owns the socket's write half and writes every queued frame whole, batching
//!   what is queued per wake-up into one flush. Callers never write, so a caller that is
//!   cancelled (a dropped future) can never leave half a frame on the wire (§3.2).
//! * The reader task splits frames ([`FrameDecoder`]) and matches each answer against the oldest
//!   pending entry: correlation id *and* FIFO order (§3.3). An acks=0 entry occupies a FIFO slot
//!   that may be answered (the answer is dropped) or skipped (§3.4).
//! * Any framing, ordering or I/O error *poisons* the connection: every pending caller gets the
//!   cause at once and later sends fail immediately, so the pool reconnects instead of hanging.
//! * A request whose deadline passes after it may have been written poisons the connection too
//!   (§3.5); one still queued behind a slow write is withdrawn instead, without harming the
//!   others. [`RequestError::maybe_sent`] tells "never written" from "maybe written". The
//!   verdict is taken under the state lock: a request whose answer the reader took as the
//!   deadline passed gets that answer (an acks=0 one whose write completed counts as written),
//!   and the connection, still in step, lives on.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::{Bytes, BytesMut};
use kafka_protocol::{messages::ApiKey, protocol::StrBytes};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    task::AbortHandle,
    time::Instant,
};
use tracing::{Instrument, Span, debug, warn};

use super::{
    error::{ConnError, RequestError},
    frame::{FrameDecoder, correlation_id, encode_request_head},
    histogram::Histogram,
    versions::Versions,
};

/// Settings of one connection.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Most requests awaiting an answer at once on this connection. When reached, further
    /// requests wait (they count as *queued*) until an answer frees a slot. `1` reproduces
    /// one-at-a-time forwarding.
    pub max_in_flight: usize,
    /// Most requests waiting to be admitted (for an in-flight slot or for bytes). When reached,
    /// [`Connection::send`] fails at once with [`ConnError::QueueFull`].
    pub max_queued: usize,
    /// Most request bytes in flight. Requests beyond it wait like requests beyond
    /// `max_in_flight`; a single request larger than this fails with [`ConnError::TooLarge`].
    pub max_in_flight_bytes: usize,
    /// Largest response frame accepted; a larger length prefix poisons the connection.
    pub max_frame_bytes: usize,
    /// `client_id` sent in every request header.
    pub client_id: Option<StrBytes>,
    /// Longest a new connection may take (TCP connect and ApiVersions), within the caller's
    /// deadline: one unresponsive address must not use up a whole call or metadata refresh.
    pub connect_timeout: std::time::Duration,
    /// TLS and SASL for new connections.
    pub security: super::security::Security,
}

/// How many acks=0 slots (requests the broker may answer or skip, docs/design.md §3.4) the FIFO
/// holds at most. Apache Kafka never answers acks=0 requests, so without this bound a stream of
/// them would grow the FIFO forever, also behind an older request still awaiting its answer;
/// when hit, the oldest such slot leaves the FIFO and its correlation id goes to a ring of as
/// many forgotten ids, whose late answers are dropped like any acks=0 answer. Memory stays
/// within twice this bound. (Smaller in unit tests, which fill it.)
const MAX_NO_RESPONSE_SLOTS: usize = if cfg!(test) { 64 } else { 16 * 1024 };

/// Most frames the writer takes from its queue before one flush.
const MAX_WRITE_BATCH: usize = 256;

/// Capacity of the writer's buffer; frames larger than this are written straight through.
const WRITE_BUFFER: usize = 64 * 1024;

/// Counters of one connection slot, kept across reconnects.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Requests written or queued for writing and awaiting an answer now.
    pub in_flight: AtomicU64,
    /// Highest `in_flight` ever observed.
    pub peak_in_flight: AtomicU64,
    /// Requests waiting for an in-flight permit now.
    pub queued: AtomicU64,
    /// Frames handed to the socket (counted as the write starts; a failed write poisons).
    pub sent: AtomicU64,
    /// Answers delivered to their caller.
    pub completed: AtomicU64,
    /// Requests failed by a poisoned connection.
    pub errors: AtomicU64,
    /// Requests whose deadline passed while waiting for an answer.
    pub timeouts: AtomicU64,
    /// Times a connection of this slot was poisoned.
    pub poisoned: AtomicU64,
    /// Highest `queued` ever observed.
    pub peak_queued: AtomicU64,
    /// Request bytes in flight now.
    pub in_flight_bytes: AtomicU64,
    /// Connections opened for this slot.
    pub connects: AtomicU64,
    /// Requests refused because the queue was full or the request too large.
    pub rejected: AtomicU64,
    /// Time from queueing a request to its answer.
    pub latency: Histogram,
}

/// Life stage of a connection.
#[derive(Debug, Clone)]
pub enum ConnState {
    /// Taking requests.
    Open,
    /// Taking no new requests; closes once the pending ones are answered.
    Draining,
    /// Closed; the cause.
    Closed(ConnError),
}

enum Reply {
    /// A caller waits for the answer.
    Answer(oneshot::Sender<Result<Bytes, RequestError>>),
    /// acks=0: nobody waits; an answer, if the broker sends one, is dropped.
    None,
}

struct Entry {
    correlation_id: i32,
    seq: u64,
    reply: Reply,
    queued_at: Instant,
    /// Held until the answer arrives, so `max_in_flight` and `max_in_flight_bytes` bound
    /// requests awaiting answers.
    _hold: Option<Hold>,
}

/// An in-flight slot, the request's bytes, its share of the bytes gauge, and what the sender
/// attached (see [`Admission::attach`]).
type Hold = (
    (OwnedSemaphorePermit, OwnedSemaphorePermit),
    BytesGuard,
    Option<Attachment>,
);

/// Something a sender wants kept alive exactly as long as its request occupies the connection
/// (see [`Admission::attach`]).
pub type Attachment = Box<dyn std::any::Any + Send + Sync>;

struct Outgoing {
    seq: u64,
    head: Bytes,
    body: Bytes,
    /// Signalled once the frame is flushed (acks=0 callers wait for this).
    written: Option<oneshot::Sender<()>>,
    /// acks=0 requests hold their room only until written (or dropped unwritten).
    _hold: Option<Hold>,
}

struct State {
    next_correlation_id: i32,
    next_seq: u64,
    /// Sequence number of the last frame the writer has begun to write. Frames at or below it
    /// may have reached the broker.
    claimed_seq: u64,
    /// Highest sequence number of a request sent without expecting an answer whose write has
    /// completed (updated only for write batches that carry such requests).
    written_seq: u64,
    fifo: VecDeque<Entry>,
    no_response_slots: usize,
    /// Correlation ids of acks=0 slots taken out of the FIFO at its bound (oldest first, at
    /// most [`MAX_NO_RESPONSE_SLOTS`]): an answer to one of them is dropped.
    forgotten: VecDeque<i32>,
    to_writer: Option<mpsc::UnboundedSender<Outgoing>>,
    /// Requests taken back before the writer reached them (their deadline passed in the queue);
    /// the writer drops their frames. Only ever holds requests queued behind a write in progress.
    withdrawn: Vec<u64>,
    /// Drain requested: the writer's queue is closed, and the connection closes once nothing
    /// awaits an answer and the writer is done.
    draining: bool,
    writer_done: bool,
    poisoned: Option<ConnError>,
}

struct Shared {
    state: Mutex<State>,
    permits: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_queued: usize,
    max_in_flight_bytes: usize,
    stats: Arc<ConnStats>,
    tasks: Mutex<Vec<AbortHandle>>,
    client_id: Option<StrBytes>,
    span: Span,
}

/// A pipelined connection to one broker. Cheap to share behind an `Arc`; dropping the last
/// reference closes it and fails whatever was pending.
pub struct Connection {
    shared: Arc<Shared>,
    versions: OnceLock<Versions>,
    /// When to replace this connection: set when the broker's SASL session has a lifetime
    /// (KIP-368, `connections.max.reauth.ms`; docs/design.md §3.18). A broker closes a connection whose session has
    /// expired as soon as it gets another request on it, failing everything in flight; the
    /// pool drains the connection and opens a fresh one before that (see
    /// [`Connection::due_for_renewal`]).
    renew_at: OnceLock<Instant>,
    /// Merges concurrent Produce batches into shared requests; started on first use.
    coalescer: OnceLock<super::coalesce::Coalescer>,
}

/// Room on a connection for one request, from [`Connection::admit`]. Dropping it gives the
/// room back.
pub struct Admission {
    conn: Arc<Connection>,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    size: usize,
    queued_at: Instant,
    attachment: Option<Attachment>,
}

/// A place in a connection's queue of requests waiting for room (the *queued* gauge), from
/// [`Connection::enter_queue`]; dropping it gives the place back.
pub(crate) struct QueuePlace(Arc<ConnStats>);

impl QueuePlace {
    /// Counts one more queued request; returns the place and the gauge's new value.
    pub(crate) fn new(stats: Arc<ConnStats>) -> (Self, u64) {
        let queued = stats.queued.fetch_add(1, Ordering::Relaxed) + 1;
        (Self(stats), queued)
    }
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Releases a request's bytes from the in-flight gauge when the request is done with, however
/// that happens (answered, written with acks=0, withdrawn, or failed by a poison).
struct BytesGuard {
    stats: Arc<ConnStats>,
    bytes: u64,
}

impl Drop for BytesGuard {
    fn drop(&mut self) {
        self.stats
            .in_flight_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Admission {
    /// Keeps `attachment` alive while the request occupies the connection: until its answer is
    /// read, it is taken back unsent, or the connection is gone (for a request that expects no
    /// answer, until it is written). A sender's own wait may end sooner (its deadline, a
    /// cancelled call); what it attaches outlives that wait. The producer layer attaches its
    /// per-partition in-flight permits (docs/design.md §3.16).
    pub fn attach(mut self, attachment: Attachment) -> Self {
        self.attachment = Some(attachment);
        self
    }

    /// Registers the request and queues its frame for the writer, under one lock: the pending
    /// entry exists before a byte is written, and queue order is wire order.
    pub fn send(
        self,
        api_key: ApiKey,
        api_version: i16,
        body: Bytes,
        expect_answer: bool,
    ) -> Result<InFlight, RequestError> {
        let Admission {
            conn,
            permits,
            size,
            queued_at,
            attachment,
        } = self;
        let shared = &conn.shared;
        let not_sent = |cause: ConnError| RequestError {
            cause,
            maybe_sent: false,
        };
        let mut st = lock(&shared.state);
        if let Some(cause) = &st.poisoned {
            return Err(not_sent(cause.clone()));
        }
        if st.draining {
            return Err(not_sent(ConnError::Shutdown));
        }
        let correlation_id = st.next_correlation_id;
        let head = encode_request_head(
            api_key,
            api_version,
            correlation_id,
            &shared.client_id,
            body.len(),
        )
        .map_err(not_sent)?;
        if st.to_writer.is_none() {
            return Err(not_sent(ConnError::Shutdown));
        }
        // Correlation ids are i32 and wrap (docs/design.md §3.7); in-flight requests are bounded far
        // below 2^32, so ids stay unique among them.
        st.next_correlation_id = correlation_id.wrapping_add(1);
        st.next_seq += 1;
        let seq = st.next_seq;
        // Counted under the lock, before the reader can see (and complete) the entry.
        shared
            .stats
            .in_flight_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        let guard = BytesGuard {
            stats: shared.stats.clone(),
            bytes: size as u64,
        };
        let (reply, kind, entry_hold, out_hold, written) = if expect_answer {
            let (tx, rx) = oneshot::channel();
            (
                Reply::Answer(tx),
                Waiting::Answer(rx),
                Some((permits, guard, attachment)),
                None,
                None,
            )
        } else {
            let (tx, rx) = oneshot::channel();
            (
                Reply::None,
                Waiting::Written(rx),
                None,
                Some((permits, guard, attachment)),
                Some(tx),
            )
        };
        let outgoing = Outgoing {
            seq,
            head,
            body,
            written,
            _hold: out_hold,
        };
        if st
            .to_writer
            .as_ref()
            .is_none_or(|w| w.send(outgoing).is_err())
        {
            return Err(not_sent(ConnError::Shutdown));
        }
        if expect_answer {
            let now = shared.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            shared
                .stats
                .peak_in_flight
                .fetch_max(now, Ordering::Relaxed);
        } else {
            st.no_response_slots += 1;
        }
        st.fifo.push_back(Entry {
            correlation_id,
            seq,
            reply,
            queued_at,
            _hold: entry_hold,
        });
        while st.no_response_slots > MAX_NO_RESPONSE_SLOTS {
            let Some(pos) = st.fifo.iter().position(|e| matches!(e.reply, Reply::None)) else {
                break;
            };
            let entry = st.fifo.remove(pos).expect("position is valid");
            st.no_response_slots -= 1;
            if st.forgotten.len() == MAX_NO_RESPONSE_SLOTS {
                st.forgotten.pop_front();
            }
            st.forgotten.push_back(entry.correlation_id);
        }
        drop(st);
        Ok(InFlight {
            conn: conn.clone(),
            seq,
            correlation_id,
            kind: Some(kind),
            deadline: None,
            done: false,
            #[cfg(test)]
            after_deadline: None,
        })
    }
}

/// A request that was queued on a connection; [`InFlight::wait`] yields its answer.
pub struct InFlight {
    conn: Arc<Connection>,
    seq: u64,
    correlation_id: i32,
    kind: Option<Waiting>,
    /// Set by [`InFlight::with_deadline`] or [`InFlight::wait`]; applied by a watchdog if the
    /// waiter is dropped before the answer.
    deadline: Option<Instant>,
    /// The wait ended (answer, error or timeout handled).
    done: bool,
    /// Test hook: once the deadline has passed, the wait pauses here before it judges the
    /// connection, so a test can deliver the answer inside that window.
    #[cfg(test)]
    after_deadline: Option<oneshot::Receiver<()>>,
}

impl Drop for InFlight {
    /// A caller that stops waiting (its call was cancelled) must not leave its request pending
    /// for ever: unsent, it is taken back; sent and awaiting an answer with a known deadline, a
    /// watchdog applies that deadline — poisoning the connection if the answer has not come by
    /// then, so that a silent leader is still noticed and its slots freed. Without a known
    /// deadline the request stays until its answer or the connection's end.
    fn drop(&mut self) {
        if self.done || !matches!(self.kind, Some(Waiting::Answer(_))) {
            return;
        }
        let shared = self.conn.shared.clone();
        if shared.withdraw(self.seq) {
            return;
        }
        let Some(at) = self.deadline else { return };
        let seq = self.seq;
        let watch = async move {
            tokio::time::sleep_until(at).await;
            let pending = {
                let st = lock(&shared.state);
                st.poisoned.is_none() && st.fifo.iter().any(|e| e.seq == seq)
            };
            if pending {
                shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                shared.poison(ConnError::TimedOut);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(watch);
            }
            // No runtime to wait on (the process is ending): give the connection up now.
            Err(_) => self.conn.shared.poison(ConnError::Shutdown),
        }
    }
}

enum Waiting {
    Answer(oneshot::Receiver<Result<Bytes, RequestError>>),
    Written(oneshot::Receiver<()>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the state half-updated in a way that matters
    // more than losing the connection, so poisoning of the std mutex is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connection {
    /// Starts the reader and writer tasks on an already connected stream.
    ///
    /// The connection is not negotiated yet: `versions` holds [`Versions::UNNEGOTIATED`] until
    /// the caller sets it (see [`super::versions::negotiate`]).
    pub fn start<R, W>(
        reader: R,
        writer: W,
        config: &ConnectionConfig,
        stats: Arc<ConnStats>,
        span: Span,
    ) -> Arc<Connection>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        Self::start_at(reader, writer, config, stats, span, 0)
    }

    fn start_at<R, W>(
        reader: R,
        writer: W,
        config: &ConnectionConfig,
        stats: Arc<ConnStats>,
        span: Span,
        first_correlation_id: i32,
    ) -> Arc<Connection>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_correlation_id: first_correlation_id,
                next_seq: 0,
                claimed_seq: 0,
                written_seq: 0,
                fifo: VecDeque::new(),
                no_response_slots: 0,
                forgotten: VecDeque::new(),
                to_writer: Some(tx),
                withdrawn: Vec::new(),
                draining: false,
                writer_done: false,
                poisoned: None,
            }),
            permits: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            bytes: Arc::new(Semaphore::new(
                config.max_in_flight_bytes.clamp(1, Semaphore::MAX_PERMITS),
            )),
            max_queued: config.max_queued.max(1),
            max_in_flight_bytes: config.max_in_flight_bytes.clamp(1, Semaphore::MAX_PERMITS),
            stats,
            tasks: Mutex::new(Vec::new()),
            client_id: config.client_id.clone(),
            span: span.clone(),
        });
        let decoder = FrameDecoder::new(config.max_frame_bytes);
        let r = tokio::spawn(read_loop(shared.clone(), reader, decoder).instrument(span.clone()));
        let w = tokio::spawn(write_loop(shared.clone(), rx, writer).instrument(span));
        lock(&shared.tasks).extend([r.abort_handle(), w.abort_handle()]);
        // The peer may have closed before the handles were stored: the poison then found no
        // task to stop, so stop them now.
        if lock(&shared.state).poisoned.is_some() {
            for t in lock(&shared.tasks).drain(..) {
                t.abort();
            }
        }
        Arc::new(Connection {
            shared,
            versions: OnceLock::new(),
            renew_at: OnceLock::new(),
            coalescer: OnceLock::new(),
        })
    }

    /// API versions negotiated with this broker (docs/design.md §3.9), or
    /// [`Versions::UNNEGOTIATED`] before [`super::versions::negotiate`] ran.
    pub fn versions(&self) -> Versions {
        self.versions
            .get()
            .copied()
            .unwrap_or(Versions::UNNEGOTIATED)
    }

    pub(crate) fn set_versions(&self, versions: Versions) {
        let _ = self.versions.set(versions);
    }

    pub(crate) fn set_renew_at(&self, at: Instant) {
        let _ = self.renew_at.set(at);
    }

    /// Whether the connection's SASL session is close enough to its end that the connection
    /// should take no new requests (see the `renew_at` field). Always false without a session
    /// lifetime.
    pub fn due_for_renewal(&self) -> bool {
        self.renew_at.get().is_some_and(|at| Instant::now() >= *at)
    }

    /// Queues one request: [`Self::admit`] then [`Admission::send`].
    ///
    /// Waits while `max_in_flight` requests (or `max_in_flight_bytes`) await answers. Returns once
    /// the frame is queued for the writer; the returned [`InFlight`] yields the answer (or, with
    /// `expect_answer = false`, completes once the frame is written). Cancelling this future
    /// before it returns sends nothing.
    pub async fn send(
        self: &Arc<Self>,
        api_key: ApiKey,
        api_version: i16,
        body: Bytes,
        expect_answer: bool,
    ) -> Result<InFlight, RequestError> {
        self.admit(body.len())
            .await?
            .send(api_key, api_version, body, expect_answer)
    }

    /// Waits for room for a request of `size` body bytes: an in-flight slot and the bytes,
    /// counted as *queued* meanwhile. Fails at once when the queue is full
    /// ([`ConnError::QueueFull`]) or `size` exceeds the whole byte budget
    /// ([`ConnError::TooLarge`]). Cancelling it sends nothing and holds nothing.
    pub async fn admit(self: &Arc<Self>, size: usize) -> Result<Admission, RequestError> {
        let queued = self.enter_queue()?;
        let admitted = self.admit_queued(size).await;
        drop(queued);
        admitted
    }

    /// Takes a place in the connection's queue of requests waiting for room, counted in the
    /// *queued* gauge until the returned guard drops. Fails (counted as *rejected*) when
    /// `max_queued` requests already wait beyond those the free in-flight slots take at once
    /// (a burst on an idle connection is not refused for requests that can go out now).
    pub(crate) fn enter_queue(&self) -> Result<QueuePlace, RequestError> {
        let stats = &self.shared.stats;
        let (place, queued) = QueuePlace::new(stats.clone());
        let free = self.shared.permits.available_permits() as u64;
        let queued = queued.saturating_sub(free);
        if queued > self.shared.max_queued as u64 {
            drop(place);
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(RequestError {
                cause: ConnError::QueueFull {
                    limit: self.shared.max_queued,
                },
                maybe_sent: false,
            });
        }
        stats.peak_queued.fetch_max(queued, Ordering::Relaxed);
        Ok(place)
    }

    /// [`Self::admit`] for a request whose place in the queue is already held (see
    /// [`Self::enter_queue`]).
    pub(crate) async fn admit_queued(
        self: &Arc<Self>,
        size: usize,
    ) -> Result<Admission, RequestError> {
        let shared = &self.shared;
        if size > shared.max_in_flight_bytes {
            shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(RequestError {
                cause: ConnError::TooLarge {
                    limit: shared.max_in_flight_bytes,
                    actual: size,
                },
                maybe_sent: false,
            });
        }
        let queued_at = Instant::now();
        let permits = async {
            let slot = shared.permits.clone().acquire_owned().await?;
            let bytes = shared
                .bytes
                .clone()
                .acquire_many_owned(size.max(1) as u32)
                .await?;
            Ok::<_, tokio::sync::AcquireError>((slot, bytes))
        }
        .await;
        match permits {
            Ok(permits) => Ok(Admission {
                conn: self.clone(),
                permits,
                size,
                queued_at,
                attachment: None,
            }),
            Err(_) => Err(RequestError {
                cause: self.poisoned().unwrap_or(ConnError::Shutdown),
                maybe_sent: false,
            }),
        }
    }

    /// Poisons the connection: every pending request fails with `cause`, later sends fail at
    /// once. Idempotent; the first cause wins.
    pub fn poison(&self, cause: ConnError) {
        self.shared.poison(cause);
    }

    /// The cause, if the connection is poisoned.
    pub fn poisoned(&self) -> Option<ConnError> {
        lock(&self.shared.state).poisoned.clone()
    }

    /// Where the connection is in its life.
    pub fn state(&self) -> ConnState {
        let st = lock(&self.shared.state);
        match (&st.poisoned, st.draining) {
            (Some(cause), _) => ConnState::Closed(cause.clone()),
            (None, true) => ConnState::Draining,
            (None, false) => ConnState::Open,
        }
    }

    /// Stops taking requests: those already queued are written, those awaiting answers get
    /// them, then the connection closes. Requests sent after this fail (unsent) with
    /// [`ConnError::Shutdown`].
    pub fn drain(&self) {
        let mut st = lock(&self.shared.state);
        if st.poisoned.is_some() || st.draining {
            return;
        }
        st.draining = true;
        // Closing the queue lets the writer finish what is in it, then stop.
        st.to_writer = None;
        drop(st);
        self.shared.permits.close();
        self.shared.bytes.close();
    }

    /// Requests awaiting an answer on this connection now.
    pub fn pending(&self) -> usize {
        let st = lock(&self.shared.state);
        st.fifo.len() - st.no_response_slots
    }

    /// Negotiated Produce version, or -1 before negotiation.
    pub fn produce_version(&self) -> i16 {
        self.versions().produce
    }

    /// Counters of the slot this connection belongs to.
    pub fn stats(&self) -> &Arc<ConnStats> {
        &self.shared.stats
    }

    /// Largest request body the connection's byte budget admits.
    pub fn max_request_bytes(&self) -> usize {
        self.shared.max_in_flight_bytes
    }

    /// The connection's span (for tasks that work on its behalf).
    pub(crate) fn span(&self) -> &Span {
        &self.shared.span
    }

    pub(crate) fn coalescer(&self) -> &OnceLock<super::coalesce::Coalescer> {
        &self.coalescer
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The last handle is gone (every InFlight holds one, so nobody waits for an answer):
        // close the socket and stop the tasks.
        self.shared.poison(ConnError::Shutdown);
    }
}

impl InFlight {
    /// Records the caller's deadline now, so that it is enforced even if the caller goes away
    /// before [`InFlight::wait`] runs (see `Drop`).
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Correlation id the request was sent with.
    pub fn correlation_id(&self) -> i32 {
        self.correlation_id
    }

    /// Waits for the answer until `deadline`.
    ///
    /// Returns the response frame (header included) or, for a request sent without expecting
    /// an answer, `None` once it is written. If the deadline passes first, the connection is
    /// poisoned (docs/design.md §3.5) and the error says whether the request may have been written.
    pub async fn wait(mut self, deadline: Instant) -> Result<Option<Bytes>, RequestError> {
        self.deadline = Some(deadline);
        let r = self.wait_inner(deadline).await;
        self.done = true;
        r
    }

    async fn wait_inner(&mut self, deadline: Instant) -> Result<Option<Bytes>, RequestError> {
        let shared = self.conn.shared.clone();
        // Borrowed, not taken: if this future is dropped mid-wait, `Drop` sees the kind.
        let outcome = match self.kind.as_mut() {
            Some(Waiting::Answer(rx)) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(result)) => return result.map(Some),
                Ok(Err(_)) => None,
                Err(_) => Some(()),
            },
            Some(Waiting::Written(rx)) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(())) => return Ok(None),
                Ok(Err(_)) => None,
                Err(_) => Some(()),
            },
            None => None,
        };
        if outcome.is_some() {
            #[cfg(test)]
            if let Some(hook) = self.after_deadline.take() {
                let _ = hook.await;
            }
            let expects_answer = matches!(self.kind, Some(Waiting::Answer(_)));
            match shared.at_deadline(self.seq, expects_answer) {
                AtDeadline::Withdrawn => {
                    shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(RequestError {
                        cause: ConnError::NotSentInTime,
                        maybe_sent: false,
                    });
                }
                // The deadline raced the answer and lost by a hair: the reader has taken the
                // request's entry and is handing the answer over. The connection is in sync;
                // poisoning it would fail every other request on it for nothing.
                AtDeadline::Answered => {
                    if let Some(Waiting::Answer(rx)) = self.kind.as_mut()
                        && let Ok(result) = rx.await
                    {
                        return result.map(Some);
                    }
                }
                AtDeadline::Written => return Ok(None),
                AtDeadline::Pending => {
                    shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    shared.poison(ConnError::TimedOut);
                }
                AtDeadline::Poisoned => {}
            }
        }
        let st = lock(&shared.state);
        Err(RequestError {
            cause: st.poisoned.clone().unwrap_or(ConnError::Shutdown),
            maybe_sent: self.seq <= st.claimed_seq,
        })
    }
}

/// Where a request stands when its waiter's deadline has passed ([`Shared::at_deadline`]).
enum AtDeadline {
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
    fn awaits_answers(&self) -> bool {
        self.fifo.len() > self.no_response_slots
    }
}

impl Shared {
    /// The writer has written everything it was given after a drain: close now if nothing
    /// awaits an answer.
    /// Returns whether the writer should keep its half open (a drain still waits for answers).
    fn writer_finished(&self) -> bool {
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
    fn at_deadline(&self, seq: u64, expects_answer: bool) -> AtDeadline {
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
    fn withdraw(&self, seq: u64) -> bool {
        let mut st = lock(&self.state);
        if st.poisoned.is_some() {
            return false;
        }
        Self::withdraw_locked(&self.stats, &mut st, seq)
    }

    fn withdraw_locked(stats: &ConnStats, st: &mut State, seq: u64) -> bool {
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

    fn poison(&self, cause: ConnError) {
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
    fn deliver(&self, frame: Bytes) -> Result<(), ConnError> {
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

async fn read_loop<R: AsyncRead + Unpin>(
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

async fn write_loop<W: AsyncWrite + Unpin>(
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

#[cfg(test)]
mod tests {
    //! The connection against a scripted fake peer over `tokio::io::duplex`, with paused time.

    use std::time::Duration;

    use bytes::{Buf, BufMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const MAX_FRAME: usize = 1024 * 1024;

    fn conn(max_in_flight: usize, first_id: i32, buffer: usize) -> (Arc<Connection>, DuplexStream) {
        let (ours, peer) = tokio::io::duplex(buffer);
        let (r, w) = tokio::io::split(ours);
        let cfg = ConnectionConfig {
            max_in_flight,
            max_queued: 64,
            max_in_flight_bytes: 1 << 30,
            max_frame_bytes: MAX_FRAME,
            client_id: Some(StrBytes::from_static_str("test")),
            connect_timeout: Duration::from_secs(5),
            security: Default::default(),
        };
        let c = Connection::start_at(
            r,
            w,
            &cfg,
            Arc::new(ConnStats::default()),
            Span::none(),
            first_id,
        );
        (c, peer)
    }

    /// Reads one whole request frame: (api key, version, correlation id, rest after the id).
    async fn read_request(peer: &mut DuplexStream) -> (i16, i16, i32, Bytes) {
        let len = peer.read_i32().await.expect("length");
        let mut buf = vec![0; len as usize];
        peer.read_exact(&mut buf).await.expect("whole frame");
        let mut b = Bytes::from(buf);
        let (key, version, id) = (b.get_i16(), b.get_i16(), b.get_i32());
        (key, version, id, b)
    }

    async fn answer(peer: &mut DuplexStream, id: i32, payload: &[u8]) {
        let mut f = BytesMut::new();
        f.put_i32(4 + payload.len() as i32);
        f.put_i32(id);
        f.put_slice(payload);
        peer.write_all(&f).await.unwrap();
    }

    static BIG: [u8; 200_000] = [7u8; 200_000];

    /// A connection on a 64-byte pipe whose writer is busy with a 200 KB frame (the peer reads
    /// nothing yet), and that frame's request.
    async fn busy_writer() -> (Arc<Connection>, DuplexStream, InFlight) {
        let (c, peer) = conn(16, 0, 64);
        let a = c
            .send(ApiKey::Produce, 9, Bytes::from_static(&BIG), true)
            .await
            .unwrap();
        (c, peer, a)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    async fn send(c: &Arc<Connection>, body: &'static [u8]) -> InFlight {
        c.send(ApiKey::Produce, 9, Bytes::from_static(body), true)
            .await
            .expect("queued")
    }

    fn payload(frame: Option<Bytes>) -> Bytes {
        let mut f = frame.expect("an answer");
        f.advance(4);
        f
    }

    #[tokio::test(start_paused = true)]
    async fn pipelined_requests_get_their_own_answers() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let b = send(&c, b"b").await;
        let d = send(&c, b"c").await;
        // All three are on the wire before any answer: pipelined.
        let mut ids = Vec::new();
        for want in [b"a", b"b", b"c"] {
            let (key, version, id, rest) = read_request(&mut peer).await;
            assert_eq!((key, version), (ApiKey::Produce as i16, 9));
            assert!(rest.ends_with(want));
            ids.push(id);
        }
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(c.stats().peak_in_flight.load(Ordering::Relaxed), 3);
        for (id, p) in ids.iter().zip([b"A", b"B", b"C"]) {
            answer(&mut peer, *id, p).await;
        }
        assert_eq!(&payload(a.wait(far()).await.unwrap())[..], b"A");
        assert_eq!(&payload(b.wait(far()).await.unwrap())[..], b"B");
        assert_eq!(&payload(d.wait(far()).await.unwrap())[..], b"C");
        assert_eq!(c.pending(), 0);
        assert!(c.poisoned().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_correlation_id_poisons_and_fails_every_pending_request() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let b = send(&c, b"b").await;
        read_request(&mut peer).await;
        read_request(&mut peer).await;
        answer(&mut peer, 99, b"?").await;
        for f in [a, b] {
            let e = f.wait(far()).await.unwrap_err();
            assert!(
                matches!(
                    e.cause,
                    ConnError::OutOfOrder {
                        expected: 0,
                        got: 99
                    }
                ),
                "{e:?}"
            );
            assert!(e.maybe_sent);
        }
        // Later sends fail at once with the same cause, so the pool reconnects.
        let e = c
            .send(ApiKey::Produce, 9, Bytes::from_static(b"x"), true)
            .await
            .err()
            .expect("poisoned");
        assert!(matches!(e.cause, ConnError::OutOfOrder { .. }));
        assert!(!e.maybe_sent);
        assert_eq!(c.stats().poisoned.load(Ordering::Relaxed), 1);
        assert_eq!(c.stats().in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_with_nothing_pending_poisons() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        answer(&mut peer, 7, b"unsolicited").await;
        // The reader poisons as soon as the frame arrives.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(matches!(
            c.poisoned(),
            Some(ConnError::UnknownCorrelationId { got: 7 })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_order_answers_poison() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let b = send(&c, b"b").await;
        let (_, _, _id_a, _) = read_request(&mut peer).await;
        let (_, _, id_b, _) = read_request(&mut peer).await;
        answer(&mut peer, id_b, b"B").await;
        assert!(matches!(
            a.wait(far()).await.unwrap_err().cause,
            ConnError::OutOfOrder {
                expected: 0,
                got: 1
            }
        ));
        assert!(b.wait(far()).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn garbage_bytes_poison_without_allocating_their_claimed_length() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        read_request(&mut peer).await;
        // An HTTP answer on a Kafka port: "HTTP" read as a length is ~1.2 GB.
        peer.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        let e = a.wait(far()).await.unwrap_err();
        assert!(
            matches!(e.cause, ConnError::FrameTooLarge { limit: MAX_FRAME, actual } if actual > MAX_FRAME),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn negative_and_oversize_lengths_poison() {
        for (len, check) in [
            (
                -1i32,
                &(|e: &ConnError| matches!(e, ConnError::BadLength(-1)))
                    as &dyn Fn(&ConnError) -> bool,
            ),
            ((MAX_FRAME + 1) as i32, &|e: &ConnError| {
                matches!(e, ConnError::FrameTooLarge { .. })
            }),
        ] {
            let (c, mut peer) = conn(16, 0, 64 * 1024);
            let a = send(&c, b"a").await;
            read_request(&mut peer).await;
            peer.write_all(&len.to_be_bytes()).await.unwrap();
            let e = a.wait(far()).await.unwrap_err();
            assert!(check(&e.cause), "{len}: {e:?}");
            assert!(c.poisoned().is_some());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hang_up_fails_every_request_in_flight() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let b = send(&c, b"b").await;
        read_request(&mut peer).await;
        read_request(&mut peer).await;
        drop(peer);
        for f in [a, b] {
            let e = f.wait(far()).await.unwrap_err();
            assert!(matches!(e.cause, ConnError::Closed), "{e:?}");
            assert!(e.maybe_sent, "it was written before the hang-up");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn caller_cancelled_while_queued_sends_nothing() {
        let (c, mut peer) = conn(1, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let (_, _, id_a, _) = read_request(&mut peer).await;
        // max_in_flight = 1: the second send waits for a permit; the caller gives up.
        let waiting = tokio::time::timeout(
            Duration::from_millis(50),
            c.send(ApiKey::Produce, 9, Bytes::from_static(b"never"), true),
        )
        .await;
        assert!(waiting.is_err(), "the second request had to wait");
        assert_eq!(c.stats().queued.load(Ordering::Relaxed), 0);
        answer(&mut peer, id_a, b"A").await;
        assert_eq!(&payload(a.wait(far()).await.unwrap())[..], b"A");
        // The next request carries the next id; "never" was never written.
        let b = send(&c, b"b").await;
        let (_, _, id_b, rest) = read_request(&mut peer).await;
        assert_eq!(id_b, id_a + 1);
        assert!(rest.ends_with(b"b"));
        answer(&mut peer, id_b, b"B").await;
        assert!(b.wait(far()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn caller_cancelled_during_the_write_leaves_a_whole_frame() {
        let (c, mut peer, a) = busy_writer().await;
        // The writer has begun: its first bytes are here.
        let len = peer.read_i32().await.expect("length");
        drop(a); // the caller is gone while the frame is being written
        let mut buf = vec![0; len as usize];
        peer.read_exact(&mut buf).await.expect("whole frame");
        let mut rest = Bytes::from(buf);
        let id = {
            rest.advance(4);
            rest.get_i32()
        };
        assert!(rest.ends_with(&BIG), "the whole body arrived");
        // Its answer is dropped without poisoning; the connection goes on.
        answer(&mut peer, id, b"late").await;
        let b = send(&c, b"b").await;
        let (_, _, id_b, _) = read_request(&mut peer).await;
        answer(&mut peer, id_b, b"B").await;
        assert_eq!(&payload(b.wait(far()).await.unwrap())[..], b"B");
        assert!(c.poisoned().is_none());
    }

    /// Runs `req`'s wait with a deadline 1 s ahead that passes at once (the peer is silent);
    /// the wait then pauses, before it judges the connection, until the returned sender fires.
    async fn wait_paused_after_deadline(
        mut req: InFlight,
    ) -> (
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<Option<Bytes>, RequestError>>,
    ) {
        let (go, hook) = oneshot::channel();
        req.after_deadline = Some(hook);
        let waiter = tokio::spawn(req.wait(Instant::now() + Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished(), "paused at the hook");
        (go, waiter)
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_read_as_the_deadline_passes_is_kept_and_the_connection_too() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let (_, _, id, _) = read_request(&mut peer).await;
        let (go, waiter) = wait_paused_after_deadline(a).await;
        // The answer arrives between the deadline and the waiter's verdict.
        answer(&mut peer, id, b"A").await;
        while c.stats().completed.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        go.send(()).unwrap();
        let got = waiter.await.unwrap();
        assert_eq!(&payload(got.expect("the answer, not a timeout"))[..], b"A");
        assert!(c.poisoned().is_none(), "{:?}", c.poisoned());
        assert_eq!(c.stats().timeouts.load(Ordering::Relaxed), 0);
        // The connection still serves.
        let b = send(&c, b"b").await;
        let (_, _, id_b, _) = read_request(&mut peer).await;
        answer(&mut peer, id_b, b"B").await;
        assert_eq!(&payload(b.wait(far()).await.unwrap())[..], b"B");
    }

    #[tokio::test(start_paused = true)]
    async fn an_acks_zero_write_completed_as_the_deadline_passes_counts_as_written() {
        // A 64-byte pipe the peer does not read yet: the 200 KB write is under way.
        let (c, mut peer) = conn(16, 0, 64);
        let z = c
            .send(ApiKey::Produce, 9, Bytes::from_static(&BIG), false)
            .await
            .unwrap();
        let (go, waiter) = wait_paused_after_deadline(z).await;
        // The write completes between the deadline and the waiter's verdict.
        let (_, _, _, rest) = read_request(&mut peer).await;
        assert!(rest.ends_with(&BIG));
        tokio::time::sleep(Duration::from_millis(10)).await;
        go.send(()).unwrap();
        assert!(waiter.await.unwrap().expect("written").is_none());
        assert!(c.poisoned().is_none(), "{:?}", c.poisoned());
        assert_eq!(c.stats().timeouts.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_gone_with_a_deadline_still_has_it_enforced() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a")
            .await
            .with_deadline(Instant::now() + Duration::from_secs(2));
        let _ = read_request(&mut peer).await;
        drop(a); // cancelled after the write; the leader never answers
        assert_eq!(c.pending(), 1);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            matches!(c.poisoned(), Some(ConnError::TimedOut)),
            "the silent leader is noticed at the deadline: {:?}",
            c.poisoned()
        );
        assert_eq!(c.stats().timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(c.stats().in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn acks_zero_leaves_nothing_pending_and_tolerates_answer_or_silence() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let z1 = c
            .send(ApiKey::Produce, 9, Bytes::from_static(b"z1"), false)
            .await
            .unwrap();
        assert!(z1.wait(far()).await.unwrap().is_none(), "done once written");
        assert_eq!(c.pending(), 0);
        let z2 = c
            .send(ApiKey::Produce, 9, Bytes::from_static(b"z2"), false)
            .await
            .unwrap();
        z2.wait(far()).await.unwrap();
        let a = send(&c, b"a").await;
        let (_, _, id1, _) = read_request(&mut peer).await;
        let (_, _, _id2, _) = read_request(&mut peer).await;
        let (_, _, id_a, _) = read_request(&mut peer).await;
        // The first acks=0 request is answered (as librdkafka's mock does), the second not (as
        // Apache Kafka does): neither poisons.
        answer(&mut peer, id1, b"ignored").await;
        answer(&mut peer, id_a, b"A").await;
        assert_eq!(&payload(a.wait(far()).await.unwrap())[..], b"A");
        assert!(c.poisoned().is_none());
        assert_eq!(c.pending(), 0);
        assert_eq!(c.stats().peak_in_flight.load(Ordering::Relaxed), 1);
    }

    /// acks=0 requests queued behind an older request that awaits its answer: the FIFO keeps
    /// at most MAX_NO_RESPONSE_SLOTS of their slots, and answers to forgotten ones (as the mock
    /// broker sends) are dropped without poisoning.
    #[tokio::test(start_paused = true)]
    async fn acks_zero_slots_stay_bounded_behind_a_pending_request() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let n = MAX_NO_RESPONSE_SLOTS * 2;
        let reader = tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..=n {
                ids.push(read_request(&mut peer).await.2);
            }
            (peer, ids)
        });
        for _ in 0..n {
            let z = c
                .send(ApiKey::Produce, 9, Bytes::from_static(b"z"), false)
                .await
                .unwrap();
            z.wait(far()).await.unwrap();
        }
        {
            let st = lock(&c.shared.state);
            assert!(
                st.fifo.len() <= MAX_NO_RESPONSE_SLOTS + 1,
                "{}",
                st.fifo.len()
            );
            assert!(st.forgotten.len() <= MAX_NO_RESPONSE_SLOTS);
        }
        let (mut peer, ids) = reader.await.unwrap();
        // The leader answers everything in order, acks=0 requests included.
        for id in &ids {
            let body: &[u8] = if *id == ids[0] { b"A" } else { b"ignored" };
            answer(&mut peer, *id, body).await;
        }
        assert_eq!(&payload(a.wait(far()).await.unwrap())[..], b"A");
        let b = send(&c, b"b").await;
        let (_, _, id_b, _) = read_request(&mut peer).await;
        answer(&mut peer, id_b, b"B").await;
        assert_eq!(&payload(b.wait(far()).await.unwrap())[..], b"B");
        assert!(c.poisoned().is_none(), "{:?}", c.poisoned());
    }

    #[tokio::test(start_paused = true)]
    async fn correlation_ids_wrap() {
        let (c, mut peer) = conn(16, i32::MAX - 1, 64 * 1024);
        let fs = [
            send(&c, b"1").await,
            send(&c, b"2").await,
            send(&c, b"3").await,
        ];
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(read_request(&mut peer).await.2);
        }
        assert_eq!(ids, vec![i32::MAX - 1, i32::MAX, i32::MIN]);
        for id in &ids {
            answer(&mut peer, *id, b"ok").await;
        }
        for f in fs {
            assert!(f.wait(far()).await.is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_still_queued_at_its_deadline_is_withdrawn_without_poisoning() {
        let (c, mut peer, a) = busy_writer().await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let b = send(&c, b"b").await;
        let e = b
            .wait(Instant::now() + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e.cause, ConnError::NotSentInTime), "{e:?}");
        assert!(!e.maybe_sent);
        assert!(c.poisoned().is_none(), "the other request is unharmed");
        let (_, _, id_a, rest) = read_request(&mut peer).await;
        assert!(rest.ends_with(&BIG));
        answer(&mut peer, id_a, b"A").await;
        assert_eq!(&payload(a.wait(far()).await.unwrap())[..], b"A");
        // "b" never reached the wire: the next frame is the next request.
        let d = send(&c, b"d").await;
        let (_, _, id_d, rest) = read_request(&mut peer).await;
        assert!(rest.ends_with(b"d"));
        answer(&mut peer, id_d, b"D").await;
        assert_eq!(&payload(d.wait(far()).await.unwrap())[..], b"D");
        assert_eq!(c.stats().in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drained_connection_answers_what_is_in_flight_then_closes() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let (_, _, id, _) = read_request(&mut peer).await;
        c.drain();
        assert!(matches!(c.state(), ConnState::Draining));
        let e = c
            .send(ApiKey::Produce, 9, Bytes::from_static(b"late"), true)
            .await
            .err()
            .expect("no new requests");
        assert!(!e.maybe_sent);
        answer(&mut peer, id, b"A").await;
        assert_eq!(&payload(a.wait(far()).await.unwrap())[..], b"A");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(matches!(c.state(), ConnState::Closed(ConnError::Shutdown)));
        assert_eq!(c.stats().poisoned.load(Ordering::Relaxed), 0);
        // The peer sees the connection close only now, after its answer.
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_after_sending_poisons_the_connection() {
        let (c, mut peer) = conn(16, 0, 64 * 1024);
        let a = send(&c, b"a").await;
        let b = send(&c, b"b").await;
        read_request(&mut peer).await;
        let e = a
            .wait(Instant::now() + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e.cause, ConnError::TimedOut));
        assert!(e.maybe_sent, "it was written: it may be in the log");
        assert_eq!(c.stats().timeouts.load(Ordering::Relaxed), 1);
        // The other pending request fails too: a late answer could no longer be trusted.
        assert!(matches!(
            b.wait(far()).await.unwrap_err().cause,
            ConnError::TimedOut
        ));
        assert!(c.poisoned().is_some());
    }
}
