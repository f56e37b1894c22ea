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
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use kafka_protocol::{messages::ApiKey, protocol::StrBytes};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{Semaphore, mpsc},
    time::Instant,
};
use tracing::{Instrument, Span};

mod request;
mod shared;

pub use request::{Admission, InFlight};
pub use shared::Attachment;
use shared::{Shared, State, lock, read_loop, write_loop};

use super::{
    error::{ConnError, RequestError},
    frame::FrameDecoder,
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
    /// Longest each ApiVersions answer of a new connection may take, within
    /// `connect_timeout`: a broker that accepts the TCP connection but does not answer (a
    /// stopped process) is given up after this, with [`ConnError::HandshakeTimeout`].
    pub handshake_timeout: std::time::Duration,
    /// How long the oldest request on a leader connection may wait for its answer before the
    /// pool checks its broker over a new connection (see [`super::stall`]); zero turns the
    /// check off. Not used by the connection itself.
    pub stall_timeout: std::time::Duration,
    /// TLS and SASL for new connections.
    pub security: super::security::Security,
}

/// Counters of one connection slot, kept across reconnects.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Requests written or queued for writing and awaiting an answer now.
    pub in_flight: AtomicU64,
    /// Highest `in_flight` ever observed.
    pub peak_in_flight: AtomicU64,
    /// Produce requests waiting for room (an in-flight slot or bytes) in the slot's Produce
    /// queue now (kept by [`super::coalesce`], in front of the connection).
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
    /// Requests refused because the Produce queue was full or the request too large.
    pub rejected: AtomicU64,
    /// Record batches handed to the writer in Produce requests (kept by [`super::coalesce`];
    /// batches of several calls merged into one count once).
    pub batches: AtomicU64,
    /// Records in those batches.
    pub records: AtomicU64,
    /// Bytes of the Produce requests handed to the writer (kept by [`super::coalesce`]; the
    /// request bodies, with their record batches as sent: compressed when `compression` is on).
    pub produce_bytes: AtomicU64,
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
}

impl Connection {
    /// Starts the reader and writer tasks on an already connected stream.
    ///
    /// The connection is not negotiated yet: `versions` holds [`Versions::UNNEGOTIATED`] until
    /// the caller sets it (see [`super::connect`]).
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
        })
    }

    /// API versions negotiated with this broker (docs/design.md §3.9), or
    /// [`Versions::UNNEGOTIATED`] before [`super::connect`] ran.
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

    /// When the oldest request still awaiting an answer was handed to the writer (`None` when
    /// nothing awaits one). acks=0 requests are left out: Apache Kafka never answers them.
    pub fn oldest_unanswered(&self) -> Option<Instant> {
        lock(&self.shared.state)
            .fifo
            .iter()
            .find(|e| matches!(e.reply, shared::Reply::Answer(_)))
            .map(|e| e.sent_at)
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

    /// Waits for room for a request of `size` body bytes: an in-flight slot and the bytes.
    /// Fails at once when `size` exceeds the whole byte budget ([`ConnError::TooLarge`],
    /// counted as *rejected*). Cancelling it sends nothing and holds nothing.
    pub async fn admit(self: &Arc<Self>, size: usize) -> Result<Admission, RequestError> {
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

    /// In-flight slots free now: requests that can go out without waiting (bytes allowing).
    pub fn free_slots(&self) -> usize {
        self.shared.permits.available_permits()
    }

    /// Waits until an in-flight slot is free, without taking it (a later [`Self::admit`]
    /// does), or until the connection is poisoned.
    pub async fn slot_free(&self) {
        let _ = self.shared.permits.acquire().await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The last handle is gone (every InFlight holds one, so nobody waits for an answer):
        // close the socket and stop the tasks.
        self.shared.poison(ConnError::Shutdown);
    }
}

#[cfg(test)]
mod tests {
    //! The connection against a scripted fake peer over `tokio::io::duplex`, with paused time.

    use std::time::Duration;

    use bytes::{Buf, BufMut, BytesMut};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
        sync::oneshot,
    };

    use super::{shared::MAX_NO_RESPONSE_SLOTS, *};

    const MAX_FRAME: usize = 1024 * 1024;

    fn conn(max_in_flight: usize, first_id: i32, buffer: usize) -> (Arc<Connection>, DuplexStream) {
        let (ours, peer) = tokio::io::duplex(buffer);
        let (r, w) = tokio::io::split(ours);
        let cfg = ConnectionConfig {
            max_in_flight,
            max_in_flight_bytes: 1 << 30,
            max_frame_bytes: MAX_FRAME,
            client_id: Some(StrBytes::from_static_str("test")),
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(1),
            stall_timeout: Duration::ZERO,
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
