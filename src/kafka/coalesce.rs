//! Coalescing: Produce batches of concurrent calls for one leader connection go out as one
//! multi-partition Produce request.
//!
//! This is the Produce layer in front of a [`Connection`], which itself knows nothing of
//! Produce: the pool keeps one [`Coalescer`] per leader connection. A call hands its batches
//! for the connection over as a [`Chunk`] (at most one batch per partition) with
//! [`Coalescer::submit`]. The coalescer's queue is bounded (`max_queued`, counted in the slot's
//! *queued* gauge); one flusher task per coalescer takes every chunk queued since its last
//! round and packs them into as few Produce requests as these rules allow:
//!
//! * at most one batch per partition per request (docs/design.md §3.10), and a partition's batches
//!   go out in the order their chunks were queued: a chunk goes into a request after every
//!   request that holds an earlier batch of one of its partitions;
//! * only chunks with the same `acks`, the same asked Kafka timeout and the same transactional id
//!   (or none) share a request: Apache Kafka refuses a whole request whose transactional id
//!   does not fit one of its batches (docs/design.md §3.15), which must not touch other calls;
//! * a request stays within [`MAX_COALESCED_BYTES`] and the connection's byte budget;
//! * batches of one partition that leaderlink encoded from records ([`Part::merge`]) share one
//!   record batch when they fall into the same request (record accumulation, docs/design.md
//!   §3.20): their records follow each other in the order the chunks were queued, up to
//!   `max_batch_bytes` per batch. Each call learns where its records sit in it
//!   ([`Placement`]). Raw batches of callers are never merged.
//!
//! There is no linger by default: a round takes what is queued, so a lone call goes out at
//! once, and requests grow only while the connection is busy. At `max_in_flight` the flusher
//! waits for a free slot (or the round's earliest deadline) before it packs, so the round takes
//! everything queued meanwhile; otherwise a round holds what was queued before the flusher ran.
//! An optional linger ([`QueueSettings::linger`]) makes a round wait for more. The answer is
//! decoded once and shared by the request's calls.
//!
//! Every call keeps its own deadline. One that passes while its chunk is still queued takes the
//! chunk out unsent ([`ConnError::NotSentInTime`]). One that passes while the request is in
//! flight ends that call's wait ([`ConnError::AnswerLate`]) and leaves the request to the calls
//! that wait longer; the connection is poisoned (docs/design.md §3.5) only if no answer has come by
//! the latest deadline among them.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use kafka_protocol::messages::ApiKey;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::Instrument;

use super::{
    connection::{Attachment, ConnStats, Connection},
    error::{ConnError, RequestError},
    produce::{self, Answers, PartitionBatch, acks},
    record_batch::{self, Codec},
};

/// Largest Produce request the flusher builds from several chunks (estimated from the batches'
/// sizes). Bounds the memory of one request and how many calls one slow answer holds up; when
/// reached, further chunks go into the next request. A single chunk larger than this goes out
/// alone (the connection's byte budget still applies to it).
pub const MAX_COALESCED_BYTES: usize = 1024 * 1024;

/// Most chunks the flusher takes from its queue for one round of packing. The rest wait for the
/// next round, which goes out after this one, so order is kept; the queue itself is bounded by
/// the coalescer's `max_queued` (see [`Coalescer::submit`]).
const MAX_ROUND: usize = 4096;

/// What a Produce request adds around one partition's batch (partition index, records length,
/// topic name and array lengths), for the size estimate used while packing.
const PART_OVERHEAD: usize = 32;

/// One partition's batch.
#[derive(Debug, Clone)]
pub struct Part {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: i32,
    /// One record batch, sent as is unless `merge` is set.
    pub batch: Bytes,
    /// The batch may share one record batch with other calls' batches for the partition: it
    /// was encoded by leaderlink from records (uncompressed, without producer id, see
    /// [`record_batch::mergeable`]). Its records keep their order and content; only their
    /// offset and timestamp deltas change.
    pub merge: bool,
    /// Codec the batch goes out with: the record batch that carries it (merged or not) is
    /// compressed with it as the request is encoded, so merging works on records as they are.
    /// Parts with different codecs never share a record batch. Always [`Codec::None`] for a
    /// caller's raw batch, which is sent as is.
    pub codec: Codec,
}

/// Where a part's records went: the record batch that carried them, shared with other calls'
/// or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement {
    /// Index of the part's first record in that batch: its offset is the batch's base offset
    /// plus this, and a per-record error with a batch index in
    /// `first..first + records` is one of its records.
    pub first: i32,
    /// Records of the part.
    pub records: i32,
    /// The batch also carried other calls' records: a batch-level error may be theirs.
    pub shared: bool,
}

/// One call's batches for one connection: at most one per partition.
#[derive(Debug)]
pub struct Chunk {
    /// Kafka `acks` of the call.
    pub acks: i16,
    /// The Kafka `timeout_ms` the call asks for; cut at send time so that the leader gives up
    /// before the call's deadline (see [`produce::cut_timeout`]).
    pub timeout_ms: u32,
    /// The call's deadline.
    pub deadline: Instant,
    /// The producer's transactional id, set exactly when the batches are transactional.
    pub transactional_id: Option<Arc<str>>,
    /// The batches.
    pub parts: Vec<Part>,
    /// Kept alive while the chunk's request occupies the connection: until it is answered or
    /// the connection is gone, even when the call stops waiting earlier (see
    /// [`Admission::attach`](super::connection::Admission::attach)). Dropped at once if the
    /// chunk is not sent.
    pub hold: Option<Attachment>,
}

impl Chunk {
    fn estimate(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.batch.len() + p.topic.len() + PART_OVERHEAD)
            .sum()
    }
}

type SharedAnswer = Shared<BoxFuture<'static, Result<Option<Arc<Answers>>, RequestError>>>;

/// A chunk whose request is queued for the connection's writer.
pub struct Sent {
    correlation_id: i32,
    partitions: usize,
    placements: Vec<Placement>,
    /// The request's own wait ends here: the latest deadline of its calls.
    deadline: Instant,
    answer: SharedAnswer,
}

impl Sent {
    /// Where each of the chunk's parts (in the chunk's order) went in the request; taken
    /// once (empty afterwards).
    fn take_placements(&mut self) -> Vec<Placement> {
        std::mem::take(&mut self.placements)
    }

    /// Correlation id of the request that carries the chunk.
    pub fn correlation_id(&self) -> i32 {
        self.correlation_id
    }

    /// Partitions in that request, the chunk's and those of the calls it was coalesced with.
    pub fn partitions(&self) -> usize {
        self.partitions
    }
}

/// A chunk queued by [`Coalescer::submit`].
pub struct Ticket {
    rx: oneshot::Receiver<Result<Sent, RequestError>>,
    conn: Arc<Connection>,
}

impl Ticket {
    /// Waits until the chunk's request is queued for the writer and then for the leader's
    /// answer, both until `deadline` and with one timer for the two: the decoded response
    /// (shared by the request's calls), or `None` for acks=0 once the request is written, with
    /// the chunk's [`Placement`]s. `on_sent` sees the request once it is queued.
    ///
    /// Fails with the chunk's refusal (connection closed, too large for the connection's byte
    /// budget), with [`ConnError::NotSentInTime`] if the deadline passes while the chunk is
    /// queued, and with [`ConnError::AnswerLate`] if it passes while the request is in flight.
    pub async fn outcome(
        self,
        deadline: Instant,
        on_sent: impl FnOnce(&Sent),
    ) -> Result<(Option<Arc<Answers>>, Vec<Placement>), RequestError> {
        let Ticket { rx, conn } = self;
        // One timer for both waits; each polls its work first, as `timeout_at` would.
        let late = tokio::time::sleep_until(deadline);
        tokio::pin!(late);
        let sent = tokio::select! {
            biased;
            r = rx => r,
            () = &mut late => {
                // The flusher does not send a chunk with less than the Kafka timeout's margin
                // left (at least 5 ms, see `produce::cut_timeout`), so one whose deadline
                // passed before it was queued for the writer was not sent.
                return Err(RequestError {
                    cause: ConnError::NotSentInTime,
                    maybe_sent: false,
                });
            }
        };
        let mut sent = match sent {
            Ok(r) => r?,
            // The flusher ended without deciding (the connection went away).
            Err(_) => {
                return Err(RequestError {
                    cause: conn.poisoned().unwrap_or(ConnError::Shutdown),
                    maybe_sent: false,
                });
            }
        };
        on_sent(&sent);
        let placements = sent.take_placements();
        // The request's own wait ends at the latest deadline of its calls (and poisons the
        // connection then, or keeps an answer that raced it); a call that must give up earlier
        // stops waiting on its own.
        if deadline >= sent.deadline {
            return sent.answer.await.map(|a| (a, placements));
        }
        tokio::select! {
            biased;
            r = sent.answer => r.map(|a| (a, placements)),
            () = &mut late => Err(RequestError {
                cause: ConnError::AnswerLate,
                maybe_sent: true,
            }),
        }
    }
}

/// A place in a coalescer's queue (the slot's *queued* gauge); dropping it gives the place
/// back.
struct QueuePlace(Arc<ConnStats>);

impl QueuePlace {
    /// Counts one more queued request; returns the place and the gauge's new value.
    fn new(stats: Arc<ConnStats>) -> (Self, u64) {
        let queued = stats.queued.fetch_add(1, Ordering::Relaxed) + 1;
        (Self(stats), queued)
    }
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Pending {
    chunk: Chunk,
    /// Per part, set when the request is encoded.
    placements: Vec<Placement>,
    reply: oneshot::Sender<Result<Sent, RequestError>>,
    /// The chunk counts as queued until it is sent or refused.
    _place: QueuePlace,
}

impl Pending {
    fn fail(self, cause: ConnError, maybe_sent: bool) {
        let _ = self.reply.send(Err(RequestError { cause, maybe_sent }));
    }
}

/// Settings of a leader connection's Produce queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    /// Most chunks waiting for room on the connection beyond those its free in-flight slots
    /// take at once. Bounds the queue's memory and the wait of a call behind a slow leader;
    /// when reached, [`Coalescer::submit`] fails at once with [`ConnError::QueueFull`], which a
    /// caller answers RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// Largest record batch merged from several calls' batches for one partition (a broker
    /// refuses a batch over its `max.message.bytes`); a part that would take a batch past it
    /// starts a new one, in the next request. 0: no merging.
    pub max_batch_bytes: usize,
    /// How long the flusher waits, after the first chunk of a round arrives, for more to join
    /// it. Zero (the default): no timer, a round takes what is queued when the flusher runs.
    /// Never longer than half the time the round's earliest deadline leaves.
    pub linger: Duration,
}

/// The coalescing Produce queue of one connection. Its flusher ends once the coalescer is
/// dropped and its queue is empty, or once the connection is gone.
pub struct Coalescer {
    tx: mpsc::UnboundedSender<Pending>,
    conn: Arc<Connection>,
    /// See [`QueueSettings::max_queued`].
    max_queued: usize,
}

impl Coalescer {
    /// A queue in front of `conn`, with its flusher task started.
    pub fn new(conn: &Arc<Connection>, settings: QueueSettings) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        // The flusher holds the connection weakly: it ends when the connection is dropped.
        tokio::spawn(
            flush_loop(Arc::downgrade(conn), rx, settings).instrument(conn.span().clone()),
        );
        Self {
            tx,
            conn: conn.clone(),
            max_queued: settings.max_queued.max(1),
        }
    }

    /// Queues `chunk` for the connection's next Produce request. Fails at once, unsent, when
    /// the queue is full ([`ConnError::QueueFull`], counted as *rejected*) or the connection
    /// is closed.
    pub fn submit(&self, chunk: Chunk) -> Result<Ticket, RequestError> {
        let place = self.enter_queue()?;
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            chunk,
            placements: Vec::new(),
            reply,
            _place: place,
        };
        if self.tx.send(pending).is_err() {
            return Err(RequestError {
                cause: self.conn.poisoned().unwrap_or(ConnError::Shutdown),
                maybe_sent: false,
            });
        }
        Ok(Ticket {
            rx,
            conn: self.conn.clone(),
        })
    }

    /// Takes a place in the queue. Fails when `max_queued` chunks already wait beyond those
    /// the free in-flight slots take at once (a burst on an idle connection is not refused
    /// for requests that can go out now).
    fn enter_queue(&self) -> Result<QueuePlace, RequestError> {
        let stats = self.conn.stats();
        let (place, queued) = QueuePlace::new(stats.clone());
        let queued = queued.saturating_sub(self.conn.free_slots() as u64);
        if queued > self.max_queued as u64 {
            drop(place);
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(RequestError {
                cause: ConnError::QueueFull {
                    limit: self.max_queued,
                },
                maybe_sent: false,
            });
        }
        stats.peak_queued.fetch_max(queued, Ordering::Relaxed);
        Ok(place)
    }
}

async fn flush_loop(
    conn: Weak<Connection>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    settings: QueueSettings,
) {
    let mut round = Vec::new();
    while rx.recv_many(&mut round, MAX_ROUND).await > 0 {
        if settings.linger.is_zero() {
            // Let the tasks that are ready to run now (callers woken by the answers just read)
            // go first: what they queue joins this round. This is the only wait before a send
            // by default — one turn of the scheduler, no timer — so a lone call is not delayed.
            tokio::task::yield_now().await;
        } else {
            let now = Instant::now();
            let earliest = round.iter().map(|p| p.chunk.deadline).min().unwrap_or(now);
            let until = (now + settings.linger).min(now + (earliest - now) / 2);
            tokio::time::sleep_until(until).await;
        }
        let Some(conn) = conn.upgrade() else { return };
        // At max_in_flight, wait for a slot before packing, so that everything queued while
        // the leader answers goes out together (one record batch per partition) rather than
        // the first call alone and the rest after it. The earliest deadline ends the wait; the
        // member whose time is up is then taken out by `send`.
        if conn.free_slots() == 0
            && let Some(earliest) = round.iter().map(|p| p.chunk.deadline).min()
        {
            let _ = tokio::time::timeout_at(earliest, conn.slot_free()).await;
        }
        while round.len() < MAX_ROUND {
            match rx.try_recv() {
                Ok(p) => round.push(p),
                Err(_) => break,
            }
        }
        let limit = conn.max_request_bytes().min(MAX_COALESCED_BYTES);
        let mut requests: VecDeque<Request> =
            pack(std::mem::take(&mut round), limit, settings.max_batch_bytes).into();
        while let Some(req) = requests.pop_front() {
            if let Some(split) = send(&conn, req).await {
                // Too large together: each chunk alone, in the same order.
                for r in split.into_iter().rev() {
                    requests.push_front(r);
                }
            }
        }
    }
}

/// Chunks that go out as one Produce request.
struct Request {
    acks: i16,
    timeout_ms: u32,
    transactional_id: Option<Arc<str>>,
    members: Vec<Pending>,
}

/// Packs a round of chunks into requests (see the module's rules), in wire order. Parts of one
/// partition in one request are all [`Part::merge`] and together within `max_batch_bytes`:
/// [`encode`] merges them into one batch.
fn pack(mut round: Vec<Pending>, limit: usize, max_batch_bytes: usize) -> Vec<Request> {
    // A chunk whose caller has gone is not sent at all.
    round.retain(|p| !p.reply.is_closed());
    let mut placed = Vec::with_capacity(round.len());
    // Per request: its chunks' common (acks, timeout, transactional id) and its estimated size.
    let mut heads: Vec<(i16, u32, Option<&Arc<str>>, usize)> = Vec::new();
    {
        // Per partition, its latest batch so far: the request that holds it, whether more
        // records may join it, its size and its codec.
        let mut last: HashMap<(&str, i32), (usize, bool, usize, Codec)> = HashMap::new();
        for p in &round {
            let c = &p.chunk;
            let joins = |pt: &Part, &(_, open, bytes, codec): &(usize, bool, usize, Codec)| {
                pt.merge && open && codec == pt.codec && bytes + pt.batch.len() <= max_batch_bytes
            };
            // The earliest request the chunk may go into: its parts' batches follow the
            // partitions' earlier ones, in the same request only by joining their batch.
            let first = c
                .parts
                .iter()
                .filter_map(|pt| {
                    let l = last.get(&(pt.topic.as_str(), pt.partition))?;
                    Some(if joins(pt, l) { l.0 } else { l.0 + 1 })
                })
                .max()
                .unwrap_or(0);
            let size = c.estimate();
            let tid = c.transactional_id.as_ref();
            let j = (first..heads.len())
                .find(|&j| {
                    let (a, t, x, bytes) = heads[j];
                    a == c.acks && t == c.timeout_ms && x == tid && bytes + size <= limit
                })
                .unwrap_or_else(|| {
                    heads.push((c.acks, c.timeout_ms, tid, 0));
                    heads.len() - 1
                });
            heads[j].3 += size;
            for pt in &c.parts {
                let l = last
                    .entry((pt.topic.as_str(), pt.partition))
                    .or_insert((usize::MAX, false, 0, pt.codec));
                if l.0 == j {
                    l.2 += pt.batch.len();
                } else {
                    *l = (j, pt.merge, pt.batch.len(), pt.codec);
                }
            }
            placed.push(j);
        }
    }
    let mut out: Vec<Request> = heads
        .iter()
        .map(|&(acks, timeout_ms, tid, _)| Request {
            acks,
            timeout_ms,
            transactional_id: tid.cloned(),
            members: Vec::new(),
        })
        .collect();
    for (p, j) in round.into_iter().zip(placed) {
        out[j].members.push(p);
    }
    out
}

/// Takes out the members that cannot be sent now: callers gone, or too little time left for a
/// useful Kafka timeout. Returns the request's Kafka timeout for the others.
fn expire(req: &mut Request) -> Option<i32> {
    let mut timeout: Option<i32> = None;
    let mut keep = Vec::with_capacity(req.members.len());
    for m in req.members.drain(..) {
        if m.reply.is_closed() {
            continue;
        }
        match produce::cut_timeout(req.timeout_ms, m.chunk.deadline) {
            Some(t) => {
                timeout = Some(timeout.map_or(t, |o| o.min(t)));
                keep.push(m);
            }
            None => m.fail(ConnError::NotSentInTime, false),
        }
    }
    req.members = keep;
    timeout
}

impl Request {
    /// Fails every member with `e`.
    fn fail(&mut self, e: RequestError) {
        for m in self.members.drain(..) {
            m.fail(e.cause.clone(), e.maybe_sent);
        }
    }
}

/// Lays out the request's record batches: per partition (in the order the partitions first
/// appear), its parts as (member, part), which go into one batch. Sets each member's
/// placements.
fn layout(req: &mut Request) -> Vec<Vec<(usize, usize)>> {
    let mut groups: Vec<Vec<(usize, usize)>> = Vec::new();
    {
        let mut index: HashMap<(&str, i32), usize> = HashMap::new();
        for (m, member) in req.members.iter().enumerate() {
            for (k, p) in member.chunk.parts.iter().enumerate() {
                let g = *index
                    .entry((p.topic.as_str(), p.partition))
                    .or_insert_with(|| {
                        groups.push(Vec::new());
                        groups.len() - 1
                    });
                groups[g].push((m, k));
            }
        }
    }
    for m in &mut req.members {
        m.placements = vec![Placement::default(); m.chunk.parts.len()];
    }
    for g in &groups {
        let shared = g.len() > 1;
        let mut first = 0i32;
        for &(m, k) in g {
            let member = &mut req.members[m];
            let records = record_batch::record_count(&member.chunk.parts[k].batch);
            member.placements[k] = Placement {
                first,
                records,
                shared,
            };
            first = first.saturating_add(records);
        }
    }
    groups
}

/// The request's record batches from its [`layout`]: the parts of one partition merged into
/// one batch, compressed with the parts' codec. `version` is the request's Produce version.
fn batches<'r>(
    req: &'r Request,
    groups: &[Vec<(usize, usize)>],
    version: i16,
) -> Result<Vec<PartitionBatch<'r>>, ConnError> {
    let part = |&(m, k): &(usize, usize)| &req.members[m].chunk.parts[k];
    groups
        .iter()
        .map(|g| {
            let head = part(&g[0]);
            let batch = if g.len() > 1 {
                let parts: Vec<Bytes> = g.iter().map(|mk| part(mk).batch.clone()).collect();
                // Only parts marked `merge` share a partition in a request (see `pack`), and
                // leaderlink's encoder makes those; a failure here is a defect, reported as
                // the members' error rather than sent.
                record_batch::merge(&parts).ok_or_else(|| ConnError::Malformed {
                    api: "Produce",
                    reason: format!(
                        "batches for {}-{} could not be merged",
                        head.topic, head.partition
                    ),
                })?
            } else {
                head.batch.clone()
            };
            // Parts of one batch share their codec (see `pack`).
            let batch = compressed(batch, head.codec, version).map_err(|reason| {
                ConnError::Encode {
                    api: "Produce",
                    reason: format!("batch for {}-{}: {reason}", head.topic, head.partition),
                }
            })?;
            Ok(PartitionBatch {
                topic: &head.topic,
                partition: head.partition,
                batch,
            })
        })
        .collect()
}

/// `batch` as it goes out with `codec` in a Produce request of `version`.
fn compressed(batch: Bytes, codec: Codec, version: i16) -> Result<Bytes, String> {
    if codec == Codec::Zstd && version < record_batch::ZSTD_MIN_PRODUCE_VERSION {
        return Err(format!(
            "zstd needs Produce v{} or later; the leader speaks v{version}",
            record_batch::ZSTD_MIN_PRODUCE_VERSION
        ));
    }
    record_batch::compress(&batch, codec)
}

/// Encodes the request's body; on failure (nothing sent) every member gets the cause.
fn encode(req: &mut Request, version: i16, timeout: i32) -> Option<Bytes> {
    let groups = layout(req);
    let encoded = batches(req, &groups, version).and_then(|batches| {
        let tid = req.transactional_id.as_deref();
        produce::encode(version, req.acks, timeout, tid, &batches)
    });
    match encoded {
        Ok(b) => Some(b),
        Err(cause) => {
            req.fail(RequestError {
                cause,
                maybe_sent: false,
            });
            None
        }
    }
}

/// Sends one request: waits for room on the connection, then queues it for the writer and
/// hands each member its [`Sent`]. Returns the members as single requests when together they
/// exceed the connection's byte budget.
async fn send(conn: &Arc<Connection>, mut req: Request) -> Option<Vec<Request>> {
    let version = conn.versions().produce;
    let (admission, body) = loop {
        let timeout = expire(&mut req)?;
        let body = encode(&mut req, version, timeout)?;
        let earliest = req.members.iter().map(|m| m.chunk.deadline).min()?;
        // Waiting for room ends at the earliest deadline; that member is then taken out (it
        // has no time left) and the others wait on.
        match tokio::time::timeout_at(earliest, conn.admit(body.len())).await {
            Err(_) => continue,
            Ok(Ok(a)) => break (a, body),
            Ok(Err(e))
                if req.members.len() > 1 && matches!(e.cause, ConnError::TooLarge { .. }) =>
            {
                let Request {
                    acks,
                    timeout_ms,
                    transactional_id,
                    members,
                } = req;
                return Some(
                    members
                        .into_iter()
                        .map(|m| Request {
                            acks,
                            timeout_ms,
                            transactional_id: transactional_id.clone(),
                            members: vec![m],
                        })
                        .collect(),
                );
            }
            Ok(Err(e)) => {
                req.fail(e);
                return None;
            }
        }
    };
    // Waiting for room took time: the Kafka timeout is fixed only now, so that the leader gives
    // up before the callers do (docs/design.md §3.14).
    let before = req.members.len();
    let timeout = expire(&mut req)?;
    let body = if req.members.len() == before {
        produce::with_timeout(body, version, req.transactional_id.as_deref(), timeout)
    } else {
        encode(&mut req, version, timeout)?
    };
    let latest = req.members.iter().map(|m| m.chunk.deadline).max()?;
    let holds: Vec<Attachment> = req
        .members
        .iter_mut()
        .filter_map(|m| m.chunk.hold.take())
        .collect();
    let admission = if holds.is_empty() {
        admission
    } else {
        admission.attach(Box::new(holds))
    };
    let body_len = body.len() as u64;
    let in_flight = match admission.send(ApiKey::Produce, version, body, req.acks != acks::NONE) {
        Ok(f) => f.with_deadline(latest),
        Err(e) => {
            req.fail(e);
            return None;
        }
    };
    let correlation_id = in_flight.correlation_id();
    // Each batch has one part placed first in it.
    let placed = || req.members.iter().flat_map(|m| &m.placements);
    let partitions = placed().filter(|p| p.first == 0).count();
    let records: i64 = placed().map(|p| i64::from(p.records)).sum();
    let stats = conn.stats();
    stats
        .batches
        .fetch_add(partitions as u64, Ordering::Relaxed);
    stats
        .records
        .fetch_add(records.max(0) as u64, Ordering::Relaxed);
    stats.produce_bytes.fetch_add(body_len, Ordering::Relaxed);
    let c = conn.clone();
    let answer = async move {
        match in_flight.wait(latest).await {
            Ok(None) => Ok(None),
            Ok(Some(frame)) => match produce::decode(version, frame) {
                Ok(a) => Ok(Some(Arc::new(a))),
                Err(cause) => {
                    c.poison(cause.clone());
                    Err(RequestError {
                        cause,
                        maybe_sent: true,
                    })
                }
            },
            // A request that may have been written and failed leaves the connection unusable:
            // `wait` poisoned it already, or it was poisoned by the failure itself.
            Err(e) => Err(e),
        }
    }
    .boxed()
    .shared();
    for m in req.members {
        let _ = m.reply.send(Ok(Sent {
            correlation_id,
            partitions,
            placements: m.placements,
            deadline: latest,
            answer: answer.clone(),
        }));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    type Rx = oneshot::Receiver<Result<Sent, RequestError>>;

    fn pending(acks: i16, parts: &[(&str, i32)]) -> (Pending, Rx) {
        pending_tx(acks, None, parts)
    }

    fn pending_tx(acks: i16, transactional_id: Option<&str>, parts: &[(&str, i32)]) -> (Pending, Rx) {
        with_batches(
            acks,
            transactional_id,
            parts
                .iter()
                .map(|&(t, p)| (t, p, Bytes::from_static(&[0; 100]), false))
                .collect(),
        )
    }

    /// A chunk whose parts are records encoded as leaderlink does (mergeable).
    fn pending_records(parts: &[(&str, i32, &[&str])]) -> (Pending, Rx) {
        with_batches(
            1,
            None,
            parts
                .iter()
                .map(|&(t, p, keys)| (t, p, records(keys), true))
                .collect(),
        )
    }

    /// A v2 batch of one record per key (value = key), without producer id.
    fn records(keys: &[&str]) -> Bytes {
        use kafka_protocol::records::{
            Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
        };
        let recs: Vec<Record> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                // The encoder starts a new batch where `offset - sequence` changes; the batch's
                // base sequence is the first record's, -1 (no producer id).
                sequence: i as i32 - 1,
                timestamp: 1_700_000_000_000 + i as i64,
                key: Some(Bytes::from(k.to_string())),
                value: Some(Bytes::from(k.to_string())),
                headers: Default::default(),
            })
            .collect();
        let mut buf = bytes::BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &recs,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        buf.freeze()
    }

    fn with_batches(
        acks: i16,
        transactional_id: Option<&str>,
        parts: Vec<(&str, i32, Bytes, bool)>,
    ) -> (Pending, Rx) {
        let stats = Arc::new(ConnStats::default());
        let (reply, rx) = oneshot::channel();
        let chunk = Chunk {
            acks,
            timeout_ms: 1000,
            deadline: Instant::now() + std::time::Duration::from_secs(5),
            transactional_id: transactional_id.map(Arc::from),
            hold: None,
            parts: parts
                .into_iter()
                .map(|(t, p, batch, merge)| Part {
                    topic: t.into(),
                    partition: p,
                    batch,
                    merge,
                    codec: Codec::None,
                })
                .collect(),
        };
        (
            Pending {
                chunk,
                placements: Vec::new(),
                reply,
                _place: QueuePlace::new(stats).0,
            },
            rx,
        )
    }

    fn shape(reqs: &[Request]) -> Vec<Vec<Vec<(String, i32)>>> {
        reqs.iter()
            .map(|r| {
                r.members
                    .iter()
                    .map(|m| {
                        m.chunk
                            .parts
                            .iter()
                            .map(|p| (p.topic.clone(), p.partition))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    fn tp(t: &str, p: i32) -> (String, i32) {
        (t.to_string(), p)
    }

    #[tokio::test]
    async fn chunks_for_different_partitions_share_a_request() {
        let (a, _ra) = pending(1, &[("t", 0)]);
        let (b, _rb) = pending(1, &[("t", 1), ("u", 0)]);
        let (c, _rc) = pending(1, &[("t", 2)]);
        let reqs = pack(vec![a, b, c], MAX_COALESCED_BYTES, usize::MAX);
        assert_eq!(
            shape(&reqs),
            vec![vec![
                vec![tp("t", 0)],
                vec![tp("t", 1), tp("u", 0)],
                vec![tp("t", 2)]
            ]]
        );
    }

    #[tokio::test]
    async fn a_partitions_batches_keep_their_order_one_per_request() {
        // t-0 twice: b goes into a later request than a; c (t-2) still fits into the first;
        // d (t-1) must follow b, which holds t-1 too.
        let (a, _ra) = pending(1, &[("t", 0)]);
        let (b, _rb) = pending(1, &[("t", 0), ("t", 1)]);
        let (c, _rc) = pending(1, &[("t", 2)]);
        let (d, _rd) = pending(1, &[("t", 1)]);
        let reqs = pack(vec![a, b, c, d], MAX_COALESCED_BYTES, usize::MAX);
        assert_eq!(
            shape(&reqs),
            vec![
                vec![vec![tp("t", 0)], vec![tp("t", 2)]],
                vec![vec![tp("t", 0), tp("t", 1)]],
                vec![vec![tp("t", 1)]],
            ]
        );
    }

    #[tokio::test]
    async fn only_equal_acks_share_a_request_and_the_size_bound_splits() {
        let (a, _ra) = pending(1, &[("t", 0)]);
        let (b, _rb) = pending(-1, &[("t", 1)]);
        let (c, _rc) = pending(1, &[("t", 2)]);
        let reqs = pack(vec![a, b, c], MAX_COALESCED_BYTES, usize::MAX);
        assert_eq!(
            shape(&reqs),
            vec![
                vec![vec![tp("t", 0)], vec![tp("t", 2)]],
                vec![vec![tp("t", 1)]]
            ]
        );
        // Room for two 100-byte batches per request.
        let (a, _ra) = pending(1, &[("t", 0)]);
        let (b, _rb) = pending(1, &[("t", 1)]);
        let (c, _rc) = pending(1, &[("t", 2)]);
        let reqs = pack(vec![a, b, c], 2 * (100 + 1 + PART_OVERHEAD), usize::MAX);
        assert_eq!(
            shape(&reqs),
            vec![
                vec![vec![tp("t", 0)], vec![tp("t", 1)]],
                vec![vec![tp("t", 2)]]
            ]
        );
    }

    #[tokio::test]
    async fn only_chunks_of_one_transactional_id_share_a_request() {
        // A transactional chunk in a request without its id, or with another's, would make
        // Apache Kafka refuse the whole request, the other calls' batches with it.
        let (a, _ra) = pending_tx(-1, None, &[("t", 0)]);
        let (b, _rb) = pending_tx(-1, Some("tx-a"), &[("t", 1)]);
        let (c, _rc) = pending_tx(-1, Some("tx-b"), &[("t", 2)]);
        let (d, _rd) = pending_tx(-1, Some("tx-a"), &[("t", 3)]);
        let (e, _re) = pending_tx(-1, None, &[("t", 4)]);
        let reqs = pack(vec![a, b, c, d, e], MAX_COALESCED_BYTES, usize::MAX);
        assert_eq!(
            shape(&reqs),
            vec![
                vec![vec![tp("t", 0)], vec![tp("t", 4)]],
                vec![vec![tp("t", 1)], vec![tp("t", 3)]],
                vec![vec![tp("t", 2)]],
            ]
        );
        let ids: Vec<Option<&str>> = reqs.iter().map(|r| r.transactional_id.as_deref()).collect();
        assert_eq!(ids, vec![None, Some("tx-a"), Some("tx-b")]);
    }

    #[tokio::test]
    async fn a_chunk_whose_caller_left_is_not_packed() {
        let (a, ra) = pending(1, &[("t", 0)]);
        let (b, _rb) = pending(1, &[("t", 1)]);
        drop(ra);
        let reqs = pack(vec![a, b], MAX_COALESCED_BYTES, usize::MAX);
        assert_eq!(shape(&reqs), vec![vec![vec![tp("t", 1)]]]);
    }

    #[tokio::test]
    async fn records_of_one_partition_share_a_batch_in_arrival_order() {
        let (a, _ra) = pending_records(&[("t", 0, &["a0", "a1"])]);
        let (b, _rb) = pending_records(&[("t", 0, &["b0"]), ("t", 1, &["b1"])]);
        let (c, _rc) = pending_records(&[("t", 0, &["c0"])]);
        let mut reqs = pack(vec![a, b, c], MAX_COALESCED_BYTES, usize::MAX);
        assert_eq!(reqs.len(), 1, "one request");
        let req = &mut reqs[0];
        let groups = layout(req);
        let placements: Vec<Vec<(i32, i32, bool)>> = req
            .members
            .iter()
            .map(|m| {
                m.placements
                    .iter()
                    .map(|p| (p.first, p.records, p.shared))
                    .collect()
            })
            .collect();
        assert_eq!(
            placements,
            vec![
                vec![(0, 2, true)],
                vec![(2, 1, true), (0, 1, false)],
                vec![(3, 1, true)]
            ]
        );
        let batches = batches(req, &groups, 9).unwrap();
        assert_eq!(batches.len(), 2, "one batch per partition");
        let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut batches[0].batch.clone())
            .unwrap();
        let keys: Vec<(i64, &[u8])> = set
            .records
            .iter()
            .map(|r| (r.offset, r.key.as_deref().unwrap()))
            .collect();
        assert_eq!(
            keys,
            vec![(0, &b"a0"[..]), (1, b"a1"), (2, b"b0"), (3, b"c0")]
        );
    }

    #[tokio::test]
    async fn raw_batches_and_the_batch_bound_start_a_new_batch_in_a_later_request() {
        // A raw batch (not mergeable) of t-0 after records of t-0: the next request.
        let (a, _ra) = pending_records(&[("t", 0, &["a"])]);
        let (b, _rb) = pending_tx(1, None, &[("t", 0)]);
        let (c, _rc) = pending_records(&[("t", 0, &["c"])]);
        let reqs = pack(vec![a, b, c], MAX_COALESCED_BYTES, usize::MAX);
        assert_eq!(
            shape(&reqs),
            vec![
                vec![vec![tp("t", 0)]],
                vec![vec![tp("t", 0)]],
                vec![vec![tp("t", 0)]]
            ]
        );
        // Room for one record's batch per record batch: no merging.
        let one = records(&["a"]).len();
        let (a, _ra) = pending_records(&[("t", 0, &["a"])]);
        let (b, _rb) = pending_records(&[("t", 0, &["b"])]);
        let reqs = pack(vec![a, b], MAX_COALESCED_BYTES, one);
        assert_eq!(shape(&reqs).len(), 2);
        let (a, _ra) = pending_records(&[("t", 0, &["a"])]);
        let (b, _rb) = pending_records(&[("t", 0, &["b"])]);
        let reqs = pack(vec![a, b], MAX_COALESCED_BYTES, 2 * one);
        assert_eq!(shape(&reqs).len(), 1);
    }
}
