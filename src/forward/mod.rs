//! The core: validate a request, route each partition to its leader, send over pipelined
//! connections, retry within the caller's deadline, assemble one result per partition.

pub mod batch;
mod errors;
pub mod idempotence;
pub mod validate;

pub use errors::error_name;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::join_all;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
    time::Instant,
};
use tracing::{Instrument, Span, debug, debug_span, field::Empty};

use crate::{
    kafka::{
        coalesce,
        connection::ConnectionConfig,
        error::{ConnError, RequestError, chain},
        metadata::{Broker, MetadataClient, Route},
        pool::Pool,
        produce::acks,
        producer_id::InitProducerIdError,
    },
    proto::v1::{ForwardRequest, ForwardResponse, PartitionResult},
    stats::Stats,
};
use errors::{
    DUPLICATE_SEQUENCE_NUMBER, FENCED_LEADER_EPOCH, INVALID_PRODUCER_EPOCH, MESSAGE_TOO_LARGE,
    NETWORK_EXCEPTION, NOT_LEADER_OR_FOLLOWER, OUT_OF_ORDER_SEQUENCE_NUMBER, PRODUCER_FENCED,
    SASL_AUTHENTICATION_FAILED, UNKNOWN_PRODUCER_ID, UNKNOWN_TOPIC_OR_PARTITION, may_have_appended,
    needs_refresh, retriable,
};
use idempotence::{Open, Producer, Stamp, Stamper, Tp, Turn};
use validate::{Validated, validate};

/// Why a forward failed as a whole. Kafka errors of single partitions are not here: they are
/// data in [`PartitionResult`].
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The request is malformed; nothing was sent.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field, e.g. `partitions[2].topic`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The deadline ran out before every partition had its answer.
    #[error("deadline exceeded: {detail}")]
    DeadlineExceeded {
        /// Which partitions were still waiting, and the last cause.
        detail: String,
    },
    /// No broker that could take the request was reachable.
    #[error("no leader reachable: {detail}")]
    Unavailable {
        /// What was tried.
        detail: String,
        /// The last connection failure.
        #[source]
        cause: ConnError,
    },
    /// A bound on a leader connection was hit (queue full, or a request larger than the
    /// connection's byte budget).
    #[error("overloaded: {detail}; retry later")]
    Overloaded {
        /// Which partitions could not be queued, and those already answered.
        detail: String,
        /// The bound that was hit.
        #[source]
        cause: ConnError,
    },
    /// A bug: something that validation should have prevented.
    #[error("internal error: {0}")]
    Internal(String),
}

/// How much ordering a partition's batches get (see the README's "Ordering").
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PartitionOrder {
    /// Batches for a partition are pipelined: many requests in flight. A retry after a failed
    /// request can land behind a later one (reordering), which idempotent batches prevent.
    #[default]
    Pipelined,
    /// At most one request in flight per partition, held through its retries: a later batch
    /// waits until the earlier one has its final answer, so retries cannot reorder.
    Strict,
}

/// Requests in flight per partition for batches that carry a producer id: the most a broker
/// keeps sequence state for (Kafka's `max.in.flight.requests.per.connection` limit for
/// idempotence). A further batch of the partition waits for one to be answered.
pub const MAX_IDEMPOTENT_IN_FLIGHT: usize = 5;

/// Settings of the forwarding core.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// Ordering of each partition's batches.
    pub ordering: PartitionOrder,
    /// Stamp the batches leaderlink encodes as an idempotent producer's (see
    /// [`idempotence`]).
    pub idempotence: bool,
    /// Largest accepted `ForwardRequest`, encoded; larger ones get INVALID_ARGUMENT.
    pub max_request_bytes: usize,
    /// Kafka `timeout_ms` sent when a request says 0; always cut to fit the caller's deadline.
    pub kafka_timeout_ms: u32,
    /// First pause before a retry; doubles per retry up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    /// Longest pause between retries.
    pub retry_backoff_max: Duration,
    /// Pipelined connections per leader; each partition always uses the same one.
    pub connections_per_leader: usize,
    /// Add the call's `traceparent` as a header to each record leaderlink encodes.
    pub trace_record_header: bool,
    /// A topic unused for this long leaves the leader map at the next refresh.
    pub metadata_max_idle: Duration,
}

#[derive(Debug, Clone)]
enum Failure {
    Kafka { code: i16, message: Option<String> },
    Conn { cause: ConnError, connecting: bool },
}

#[derive(Debug, Default)]
struct ItemState {
    result: Option<PartitionResult>,
    attempts: u32,
    last: Option<Failure>,
    /// An earlier attempt may have been appended although it did not succeed.
    may_be_in_log: bool,
    /// The batch was sent again after such an attempt.
    possibly_duplicated: bool,
    /// A connection bound refused the batch.
    overloaded: Option<ConnError>,
    /// Refreshed metadata rounds that still did not know the topic.
    unknown_rounds: u32,
    /// Together with the call's other batches for its leader, the batch exceeded the leader
    /// connection's byte budget: it goes in a request of its own.
    alone: bool,
    /// The idempotent producer's stamp on the batch, kept with its bytes for retries.
    stamp: Option<Stamp>,
}

/// The batches with a producer id one call has handed to leaders and not yet settled (see
/// [`idempotence::Producer::settle`]). Dropping it settles the rest as given up: a call that
/// ends by its deadline, or is cancelled, leaves no batch counted as open.
struct Ledger {
    producer: Arc<Producer>,
    held: HashMap<usize, (Tp, Open, Option<u64>)>,
}

impl Ledger {
    fn new(producer: Arc<Producer>) -> Self {
        Self {
            producer,
            held: HashMap::new(),
        }
    }

    /// Item `i`'s batch (on `tp`) is in leaderlink's hands; `generation` for leaderlink's own
    /// stamps. A batch stamped anew replaces its earlier stamp, which is settled as given up.
    fn hold(&mut self, i: usize, tp: Tp, open: Open, generation: Option<u64>) {
        if let Some((tp, open, generation)) = self.held.insert(i, (tp, open, generation)) {
            self.producer.settle(&tp, open, generation, false);
        }
    }

    fn holds(&self, i: usize) -> bool {
        self.held.contains_key(&i)
    }

    fn get(&self, i: usize) -> Option<(Tp, Open, Option<u64>)> {
        self.held.get(&i).cloned()
    }

    /// Item `i`'s batch, if it is held, is back from the wire (see [`Producer::off_wire`]).
    fn off_wire(&self, i: usize) {
        if let Some((tp, open, _)) = self.held.get(&i) {
            self.producer.off_wire(tp, *open);
        }
    }

    /// Item `i` has its final answer: acknowledged or not.
    fn settle(&mut self, i: usize, acked: bool) {
        if let Some((tp, open, generation)) = self.held.remove(&i) {
            self.producer.settle(&tp, open, generation, acked);
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        for (_, (tp, open, generation)) in self.held.drain() {
            self.producer.settle(&tp, open, generation, false);
        }
    }
}

/// Item `i`'s partition.
fn tp_of(v: &Validated, i: usize) -> Tp {
    (v.items[i].topic.clone(), v.items[i].partition)
}

/// Item `i`'s batch for the turn rule (see [`Turn`]): `None` for a batch without a producer id;
/// `new` when leaderlink stamps it now.
fn turn_of(v: &Validated, i: usize, s: &ItemState, new: bool) -> Option<Turn> {
    if new {
        return Some(Turn::New);
    }
    let open = open_of_item(v, i, s)?;
    Some(if s.attempts > 0 {
        Turn::First(open)
    } else {
        Turn::Behind(open)
    })
}

/// Marks the chunk's batches with a producer id as on the wire (they were just handed to their
/// connection). Returns whether there was any.
fn mark_on_wire(
    stamper: &mut Stamper<'_>,
    v: &Validated,
    st: &[ItemState],
    chunk: &[usize],
) -> bool {
    let mut any = false;
    for &i in chunk {
        if let Some(open) = open_of_item(v, i, &st[i]) {
            stamper.on_wire(&tp_of(v, i), open);
            any = true;
        }
    }
    any
}

/// Item `i`'s producer id, epoch and sequence: leaderlink's stamp, or the caller's own.
fn open_of_item(v: &Validated, i: usize, s: &ItemState) -> Option<Open> {
    s.stamp.as_ref().map(open_of).or(v.items[i].producer)
}

fn open_of(stamp: &Stamp) -> Open {
    Open {
        producer_id: stamp.identity.producer_id,
        epoch: stamp.identity.epoch,
        base_sequence: stamp.base_sequence,
    }
}

/// What a one-partition Produce request adds to its batch (fields, array and string lengths)
/// at most, beside the topic name and transactional id.
const PRODUCE_OVERHEAD: usize = 64;

/// One permit of a partition's gate, shared by a call and the requests that carry its batches
/// of the partition (see `Forwarder::enter_gates`).
type GateHold = Arc<OwnedSemaphorePermit>;

/// The forwarding core. Cheap to clone.
#[derive(Clone)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

struct Inner {
    /// Per-partition gates: one permit in strict mode, [`MAX_IDEMPOTENT_IN_FLIGHT`] for
    /// idempotent batches otherwise.
    gates: std::sync::Mutex<HashMap<(String, i32), Arc<Semaphore>>>,
    allow_auto_topic_creation: bool,
    /// A leader connection's byte budget: the largest Produce request it takes.
    max_in_flight_bytes: usize,
    /// The idempotent producer whose id leaderlink stamps on the batches it encodes.
    producer: Arc<Producer>,
    cfg: ForwardConfig,
    metadata: MetadataClient,
    pool: Pool,
    stats: Arc<Stats>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Forwarder {
    /// A forwarder that bootstraps through `bootstrap` (`host:port` each).
    pub fn new(
        cfg: ForwardConfig,
        conn: ConnectionConfig,
        bootstrap: Vec<String>,
        allow_auto_topic_creation: bool,
    ) -> Self {
        let max_in_flight_bytes = conn.max_in_flight_bytes;
        Self {
            inner: Arc::new(Inner {
                metadata: MetadataClient::new(
                    bootstrap,
                    conn.clone(),
                    allow_auto_topic_creation,
                    cfg.metadata_max_idle,
                ),
                pool: Pool::new(conn, (cfg.retry_backoff, cfg.retry_backoff_max)),
                stats: Arc::new(Stats::default()),
                gates: std::sync::Mutex::new(HashMap::new()),
                allow_auto_topic_creation,
                max_in_flight_bytes,
                producer: Arc::new(Producer::default()),
                cfg,
            }),
        }
    }

    /// The leader map and its client.
    pub fn metadata(&self) -> &MetadataClient {
        &self.inner.metadata
    }

    /// The leader connections.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Process-wide counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    fn count_forwarded(&self, it: &validate::Item) {
        let s = &self.inner.stats;
        s.records_forwarded
            .fetch_add(u64::from(it.records), Ordering::Relaxed);
        s.bytes_forwarded
            .fetch_add(it.batch.len() as u64, Ordering::Relaxed);
    }

    fn gate(&self, topic: &str, partition: i32) -> Arc<Semaphore> {
        let permits = match self.inner.cfg.ordering {
            PartitionOrder::Strict => 1,
            PartitionOrder::Pipelined => MAX_IDEMPOTENT_IN_FLIGHT,
        };
        let mut gates = self.inner.gates.lock().unwrap_or_else(|p| p.into_inner());
        if gates.len() > 16 * 1024 {
            // Forget idle gates (nobody holds or waits on them).
            gates.retain(|_, g| Arc::strong_count(g) > 1 || g.available_permits() < permits);
        }
        gates
            .entry((topic.to_string(), partition))
            .or_insert_with(|| Arc::new(Semaphore::new(permits)))
            .clone()
    }

    /// Takes one permit of each gated partition's gate for the whole call: every partition in
    /// strict mode, those of idempotent batches otherwise (a call sends a partition's batches
    /// one request at a time, so one permit per partition suffices). Taken in (topic,
    /// partition) order, so calls sharing partitions cannot deadlock.
    ///
    /// Each permit is shared: the call holds it until it ends, and each request that carries a
    /// batch of the partition holds it until that request is answered or its connection is
    /// gone (docs/design.md §3.16), even when the call stops waiting sooner.
    async fn enter_gates(
        &self,
        v: &Validated,
        deadline: Instant,
    ) -> Result<HashMap<(String, i32), GateHold>, ForwardError> {
        let strict = self.inner.cfg.ordering == PartitionOrder::Strict;
        let mut tps: Vec<(&str, i32)> = v
            .items
            .iter()
            .filter(|it| strict || self.gated(v, it))
            .map(|it| (it.topic.as_str(), it.partition))
            .collect();
        tps.sort_unstable();
        tps.dedup();
        let mut held = HashMap::with_capacity(tps.len());
        for (topic, partition) in tps {
            match tokio::time::timeout_at(deadline, self.gate(topic, partition).acquire_owned())
                .await
            {
                Ok(Ok(p)) => {
                    held.insert((topic.to_string(), partition), Arc::new(p));
                }
                _ => {
                    let why = if strict {
                        "ordering = strict".to_string()
                    } else {
                        format!(
                            "idempotent batches: at most {MAX_IDEMPOTENT_IN_FLIGHT} requests in \
                             flight per partition"
                        )
                    };
                    return Err(ForwardError::DeadlineExceeded {
                        detail: format!(
                            "still waiting behind earlier requests for {topic}-{partition} ({why})"
                        ),
                    });
                }
            }
        }
        Ok(held)
    }

    /// Whether leaderlink stamps `it` as the idempotent producer's: a batch it encodes, with
    /// `idempotence` on, for an acks=all call (Kafka's producer is idempotent only with
    /// acks=all: a batch acknowledged by a leader alone can be lost with it, and the sequence
    /// would then be broken).
    fn stamps(&self, v: &Validated, it: &validate::Item) -> bool {
        self.inner.cfg.idempotence
            && it.encoded
            && v.acks == acks::ALL
            && self.inner.producer.available()
    }

    /// Whether `it`'s partition gate applies outside strict mode: batches with a producer id,
    /// the caller's or leaderlink's (at most [`MAX_IDEMPOTENT_IN_FLIGHT`] requests in flight).
    fn gated(&self, v: &Validated, it: &validate::Item) -> bool {
        it.idempotent || self.stamps(v, it)
    }

    /// Whether item `i` must be stamped before it is sent: it is to carry leaderlink's
    /// producer id and has no stamp of the current identity.
    fn needs_stamp(&self, v: &Validated, i: usize, s: &ItemState) -> bool {
        self.stamps(v, &v.items[i])
            && s.result.is_none()
            && s.stamp
                .as_ref()
                .is_none_or(|stamp| !self.inner.producer.is_current(stamp))
    }

    /// Refuses, before anything is sent, a batch that alone would make a Produce request larger
    /// than a leader connection's whole byte budget (`max_in_flight_bytes_per_connection`): no
    /// retry could ever send it.
    fn check_fits(&self, v: &Validated) -> Result<(), ForwardError> {
        let limit = self.inner.max_in_flight_bytes;
        let tid = v.transactional_id.as_deref().map_or(0, str::len);
        for (i, it) in v.items.iter().enumerate() {
            let size = it.batch.len() + it.topic.len() + tid + PRODUCE_OVERHEAD;
            if size > limit {
                return Err(ForwardError::Invalid {
                    field: format!("partitions[{i}]"),
                    reason: format!(
                        "encodes to a Produce request of about {size} bytes; the limit \
                         (max_in_flight_bytes_per_connection) is {limit}"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Metadata rounds an unknown topic is retried: a broker creating it on our request (Apache
    /// Kafka answers UNKNOWN_TOPIC_OR_PARTITION while it does) needs a few; without
    /// auto-creation one refresh settles it.
    fn unknown_topic_rounds(&self) -> u32 {
        if self.inner.allow_auto_topic_creation {
            5
        } else {
            1
        }
    }

    fn conn_index(&self, topic: &str, partition: i32) -> usize {
        let k = self.inner.cfg.connections_per_leader.max(1);
        if k == 1 {
            return 0;
        }
        let mut h = DefaultHasher::new();
        (topic, partition).hash(&mut h);
        (h.finish() % k as u64) as usize
    }

    /// The Kafka `timeout_ms` a request asks for, or the default when it says 0. The coalescer
    /// cuts it to fit the caller's deadline when it sends (docs/design.md §3.14).
    fn asked_timeout(&self, asked: u32) -> u32 {
        if asked == 0 {
            self.inner.cfg.kafka_timeout_ms
        } else {
            asked
        }
    }

    /// Forwards one request.
    ///
    /// `traceparent` (W3C trace context of the call) is added as a record header to the
    /// records leaderlink encodes, when `trace_record_header` is on. `enqueued`, if given, is
    /// signalled (or dropped) once every partition's first attempt is queued on its leader
    /// connection, so a caller can keep the wire order of consecutive requests.
    pub async fn forward(
        &self,
        req: ForwardRequest,
        deadline: Instant,
        traceparent: Option<&str>,
        mut enqueued: Option<oneshot::Sender<()>>,
    ) -> Result<ForwardResponse, ForwardError> {
        let header = traceparent.filter(|_| self.inner.cfg.trace_record_header);
        let v = validate(req, self.inner.cfg.max_request_bytes, now_ms(), header)?;
        self.check_fits(&v)?;
        let strict = self.inner.cfg.ordering == PartitionOrder::Strict;
        let gates = self.enter_gates(&v, deadline).await?;
        let mut st: Vec<ItemState> = (0..v.items.len()).map(|_| ItemState::default()).collect();
        // Batches with a producer id this call has handed to a leader and not yet settled;
        // whatever ends the call (its deadline, a cancel) settles the rest as given up.
        let mut ledger = Ledger::new(self.inner.producer.clone());
        let mut pending: Vec<usize> = (0..v.items.len()).collect();
        let mut refresh = false;
        let mut refreshed = false;
        // The first broker that refused leaderlink's credentials or certificate, and why.
        let mut refused: Option<(Broker, ConnError)> = None;
        let mut backoff = self.inner.cfg.retry_backoff;
        for round in 0u32.. {
            match self.ensure_metadata(&v, &pending, refresh, deadline).await {
                Ok(r) => refreshed |= r,
                // Nothing was sent yet and no broker answers: say so now rather than spinning
                // until the deadline.
                Err(cause) if round == 0 && Instant::now() < deadline => {
                    return Err(ForwardError::Unavailable {
                        detail: "could not fetch metadata from any broker".into(),
                        cause,
                    });
                }
                // On a retry, keep going with the map we have until the deadline: some
                // partitions may already have their answer.
                Err(cause) => {
                    // A refresh cut short by the call's own deadline says nothing new: the
                    // earlier cause stays the one reported.
                    let out_of_time = Instant::now() >= deadline;
                    for &i in &pending {
                        if !(out_of_time && st[i].last.is_some()) {
                            st[i].last = Some(Failure::Conn {
                                connecting: is_connect_failure(&cause),
                                cause: cause.clone(),
                            });
                        }
                    }
                }
            }
            refresh = false;
            let map = self.inner.metadata.leader_map();

            let mut retry = Vec::new();
            // Gated batches (strict mode, or idempotent ones) go one per partition per round:
            // a later batch of the partition waits for the earlier one's final answer.
            let mut deferred = Vec::new();
            // Batches with a producer id held back by the turn rule (see `turn_of`).
            let mut turn_wait = Vec::new();
            let mut gated_seen: HashSet<(&str, i32)> = HashSet::new();
            let mut groups: BTreeMap<(i32, usize), (Broker, Vec<usize>)> = BTreeMap::new();
            for &i in &pending {
                let it = &v.items[i];
                if (strict || self.gated(&v, it))
                    && !gated_seen.insert((it.topic.as_str(), it.partition))
                {
                    deferred.push(i);
                    continue;
                }
                let fail = |code: i16, msg: &str| Failure::Kafka {
                    code,
                    message: Some(msg.to_string()),
                };
                match map.route(&it.topic, it.partition) {
                    Route::Leader(b, _epoch) => {
                        let key = (b.id, self.conn_index(&it.topic, it.partition));
                        groups
                            .entry(key)
                            .or_insert_with(|| (b, Vec::new()))
                            .1
                            .push(i);
                    }
                    Route::Unknown => {
                        st[i].last = Some(fail(
                            UNKNOWN_TOPIC_OR_PARTITION,
                            "topic not in the leader map yet",
                        ));
                        refresh = true;
                        retry.push(i);
                    }
                    // An unknown topic is final once a refresh confirmed it — after a few
                    // rounds when the broker may be creating it on our request.
                    Route::Error(UNKNOWN_TOPIC_OR_PARTITION)
                        if refreshed && st[i].unknown_rounds >= self.unknown_topic_rounds() =>
                    {
                        st[i].result = Some(error_result(
                            it,
                            UNKNOWN_TOPIC_OR_PARTITION,
                            "the cluster's metadata does not know this topic".into(),
                            -1,
                            &st[i],
                        ));
                    }
                    Route::Error(UNKNOWN_TOPIC_OR_PARTITION) => {
                        st[i].unknown_rounds += u32::from(refreshed);
                        st[i].last = Some(fail(
                            UNKNOWN_TOPIC_OR_PARTITION,
                            "the cluster's metadata does not know this topic",
                        ));
                        refresh = true;
                        retry.push(i);
                    }
                    Route::Error(code) if !retriable(code) => {
                        st[i].result = Some(error_result(
                            it,
                            code,
                            "the cluster's metadata reports this error for the topic or partition"
                                .into(),
                            -1,
                            &st[i],
                        ));
                    }
                    Route::Error(code) => {
                        st[i].last = Some(fail(code, "metadata reports no usable leader"));
                        refresh = true;
                        retry.push(i);
                    }
                    Route::NoSuchPartition { partitions } if refreshed => {
                        st[i].result = Some(error_result(
                            it,
                            UNKNOWN_TOPIC_OR_PARTITION,
                            format!("topic {} has {partitions} partitions", it.topic),
                            -1,
                            &st[i],
                        ));
                    }
                    Route::NoSuchPartition { .. } => {
                        refresh = true;
                        retry.push(i);
                    }
                }
            }

            // Dial every leader at once: one slow or dead leader must not use up the time of
            // the others.
            let pool = &self.inner.pool;
            let dialed = join_all(groups.into_iter().map(
                |((_, index), (broker, items))| async move {
                    let conn = pool.get(&broker, index, deadline).await;
                    (broker, items, conn)
                },
            ))
            .await;
            let mut waits = Vec::new();
            for (broker, items, conn) in dialed {
                let conn = match conn {
                    Ok(c) => c,
                    // A broker that refuses leaderlink's credentials or certificate will do so
                    // again: its partitions are answered now instead of retried until the
                    // deadline, and the call's other partitions go on (some may be written
                    // already). If nothing of the call was ever sent, the call as a whole is
                    // UNAVAILABLE (below; docs/design.md §3.19).
                    Err(cause @ (ConnError::Auth { .. } | ConnError::Tls { .. })) => {
                        let (code, what) = match cause {
                            ConnError::Auth { .. } => (SASL_AUTHENTICATION_FAILED, "SASL"),
                            _ => (NETWORK_EXCEPTION, "TLS"),
                        };
                        for i in items {
                            st[i].result = Some(error_result(
                                &v.items[i],
                                code,
                                format!(
                                    "broker {} ({}) refused the connection ({what}): {}",
                                    broker.id,
                                    broker.addr(),
                                    chain(&cause)
                                ),
                                broker.id,
                                &st[i],
                            ));
                        }
                        refused.get_or_insert((broker, cause));
                        continue;
                    }
                    Err(cause) => {
                        debug!(broker = broker.id, cause = %cause, "leader connection failed");
                        let out_of_time = Instant::now() >= deadline;
                        for i in items {
                            // A dial cut short by the call's own deadline says nothing new: the
                            // earlier cause stays the one reported.
                            if !(out_of_time && st[i].last.is_some()) {
                                st[i].last = Some(Failure::Conn {
                                    cause: cause.clone(),
                                    connecting: true,
                                });
                            }
                            retry.push(i);
                        }
                        refresh = true;
                        continue;
                    }
                };
                let chunks: Vec<Vec<usize>> = one_batch_per_partition(&v, items)
                    .into_iter()
                    .flat_map(|c| {
                        let (alone, together): (Vec<usize>, Vec<usize>) =
                            c.into_iter().partition(|&i| st[i].alone);
                        alone
                            .into_iter()
                            .map(|i| vec![i])
                            .chain((!together.is_empty()).then_some(together))
                    })
                    .collect();
                for mut chunk in chunks {
                    let not_sent = |st: &mut [ItemState],
                                    retry: &mut Vec<usize>,
                                    chunk: &[usize],
                                    cause: ConnError| {
                        for &i in chunk {
                            // Likewise, running out of time before the write is no news
                            // when an earlier attempt already failed for a reason.
                            let artifact =
                                matches!(cause, ConnError::NotSentInTime) && st[i].last.is_some();
                            if !artifact {
                                st[i].last = Some(Failure::Conn {
                                    cause: cause.clone(),
                                    connecting: false,
                                });
                            }
                            retry.push(i);
                        }
                    };
                    // Batches leaderlink stamps as the idempotent producer's: a producer
                    // identity first (or a new epoch after a batch was given up).
                    let mut to_stamp: Vec<usize> = chunk
                        .iter()
                        .copied()
                        .filter(|&i| self.needs_stamp(&v, i, &st[i]))
                        .collect();
                    if !to_stamp.is_empty()
                        && self.inner.producer.needs_init()
                        && let Err(e) = self.inner.producer.ready(&conn, deadline).await
                    {
                        match e {
                            InitProducerIdError::Conn(cause) => {
                                refresh |= !matches!(cause, ConnError::NotSentInTime);
                                not_sent(&mut st, &mut retry, &chunk, cause);
                            }
                            InitProducerIdError::Unsupported => {
                                // Sent again at once, without a producer id.
                                self.inner.producer.disable();
                                deferred.extend(chunk.iter().copied());
                            }
                            InitProducerIdError::Kafka { code } if retriable(code) => {
                                for &i in &chunk {
                                    st[i].last = Some(Failure::Kafka {
                                        code,
                                        message: Some("InitProducerId failed".into()),
                                    });
                                    retry.push(i);
                                }
                            }
                            e @ InitProducerIdError::Kafka { code } => {
                                for &i in &chunk {
                                    st[i].result = Some(error_result(
                                        &v.items[i],
                                        code,
                                        format!("no idempotent producer id: {e}"),
                                        broker.id,
                                        &st[i],
                                    ));
                                }
                            }
                        }
                        continue;
                    }
                    // Stamping and queueing under one lock: a partition's sequences reach its
                    // connection in order.
                    let mut stamper = self.inner.producer.stamper();
                    // A batch with a producer id waits for its turn (docs/design.md §3.16):
                    // while an earlier one of its partition waits for a retry, and, as a retry
                    // itself, until every earlier one is appended.
                    chunk.retain(|&i| {
                        let turn = turn_of(&v, i, &st[i], to_stamp.contains(&i));
                        let go = turn.is_none_or(|t| stamper.has_turn(&tp_of(&v, i), t));
                        if !go {
                            turn_wait.push(i);
                        }
                        go
                    });
                    if chunk.is_empty() {
                        continue;
                    }
                    to_stamp.retain(|i| chunk.contains(i));
                    // The gate permits of the chunk's partitions go with its request.
                    let holds: Vec<GateHold> = chunk
                        .iter()
                        .filter_map(|&i| gates.get(&tp_of(&v, i)).cloned())
                        .collect();
                    let mut stamped = Vec::with_capacity(to_stamp.len());
                    for &i in &to_stamp {
                        let it = &v.items[i];
                        let tp = tp_of(&v, i);
                        let Some(stamp) = stamper.stamp(&tp, &it.batch, it.records) else {
                            continue;
                        };
                        // Stamped anew after an earlier attempt under an old epoch: the broker
                        // cannot tell the two apart.
                        if st[i].stamp.is_some() {
                            st[i].possibly_duplicated |= st[i].may_be_in_log;
                        }
                        stamped.push((i, tp, open_of(&stamp), stamp.generation));
                        st[i].stamp = Some(stamp);
                    }
                    for &i in &chunk {
                        let it = &v.items[i];
                        if let Some(open) = it.producer
                            && !ledger.holds(i)
                        {
                            let tp = tp_of(&v, i);
                            stamper.open_raw(&tp, open);
                            ledger.hold(i, tp, open, None);
                        }
                    }
                    // Into the connection's coalescing queue: concurrent calls' batches for
                    // other partitions of this leader may share the Produce request.
                    let submitted = coalesce::submit(
                        &conn,
                        coalesce::Chunk {
                            acks: v.acks,
                            timeout_ms: self.asked_timeout(v.timeout_ms),
                            deadline,
                            transactional_id: v.transactional_id.clone(),
                            hold: (!holds.is_empty())
                                .then(|| Box::new(holds) as crate::kafka::connection::Attachment),
                            parts: chunk
                                .iter()
                                .map(|&i| coalesce::Part {
                                    topic: v.items[i].topic.clone(),
                                    partition: v.items[i].partition,
                                    batch: st[i].stamp.as_ref().map_or_else(
                                        || v.items[i].batch.clone(),
                                        |s| s.batch.clone(),
                                    ),
                                })
                                .collect(),
                        },
                    );
                    let went_on_wire =
                        submitted.is_ok() && mark_on_wire(&mut stamper, &v, &st, &chunk);
                    drop(stamper);
                    if went_on_wire {
                        self.inner.producer.turn_may_have_changed();
                    }
                    // The ledger settles replaced stamps, which takes the producer's lock.
                    for (i, tp, open, generation) in stamped {
                        ledger.hold(i, tp, open, Some(generation));
                    }
                    match submitted {
                        Ok(ticket) => {
                            for &i in &chunk {
                                if st[i].attempts > 0 {
                                    self.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
                                }
                                st[i].attempts += 1;
                                // A batch with a producer id is sent again with the same bytes:
                                // the leader drops it if it has it already.
                                if !ledger.holds(i) {
                                    st[i].possibly_duplicated |= st[i].may_be_in_log;
                                }
                            }
                            let attempt = chunk.iter().map(|&i| st[i].attempts).max();
                            let span = leader_span(&v, &chunk, &broker, attempt.unwrap_or(1));
                            waits.push((conn.clone(), broker.id, chunk, ticket, span));
                        }
                        Err(RequestError {
                            cause: cause @ ConnError::QueueFull { .. },
                            ..
                        }) => {
                            // A bound was hit: answer RESOURCE_EXHAUSTED rather than queue more.
                            for &i in &chunk {
                                st[i].overloaded = Some(cause.clone());
                            }
                        }
                        Err(e) => {
                            refresh = true;
                            not_sent(&mut st, &mut retry, &chunk, e.cause);
                        }
                    }
                }
            }
            // The caller may read its next request once this one's batches are all on their
            // connections (or final): only then does wire order follow arrival order.
            if enqueued.is_some() && st.iter().all(|s| s.attempts > 0 || s.result.is_some()) {
                let _ = enqueued.take().map(|tx| tx.send(()));
            }

            let answers = join_all(
                waits
                    .into_iter()
                    .map(|(conn, broker, chunk, ticket, span)| {
                        async move {
                            let r = match ticket.sent(deadline).await {
                                Ok(sent) => {
                                    let span = Span::current();
                                    span.record("leaderlink.correlation_id", sent.correlation_id());
                                    span.record(
                                        "leaderlink.request_partitions",
                                        sent.partitions() as i64,
                                    );
                                    sent.answer(deadline).await
                                }
                                Err(e) => Err(e),
                            };
                            (conn, broker, chunk, r, Span::current())
                        }
                        .instrument(span)
                    }),
            )
            .await;
            for (conn, broker, chunk, r, span) in answers {
                // The span ends when this iteration has read the answer.
                let _entered = span.enter();
                // Whatever came back, the chunk's batches with a producer id are off the wire
                // until they are sent again (or settled below).
                for &i in &chunk {
                    ledger.off_wire(i);
                }
                let answers = match r {
                    Ok(None) => {
                        // acks=0: done once written (docs/design.md §3.4).
                        for i in chunk {
                            self.count_forwarded(&v.items[i]);
                            st[i].result = Some(ok_result(&v.items[i], -1, -1, -1, broker, &st[i]));
                        }
                        continue;
                    }
                    Ok(Some(answers)) => answers,
                    Err(RequestError {
                        cause: ConnError::TooLarge { limit, actual },
                        ..
                    }) => {
                        // Nothing was sent. Together the batches exceed the connection's byte
                        // budget: each goes alone in the next round, at once. Alone (which
                        // `check_fits` estimates up front) the batch can never fit: that is its
                        // final answer, and the call's other partitions keep theirs.
                        let alone = chunk.len() == 1;
                        for i in chunk {
                            st[i].attempts -= 1;
                            if alone {
                                st[i].result = Some(error_result(
                                    &v.items[i],
                                    MESSAGE_TOO_LARGE,
                                    format!(
                                        "the batch encodes to a Produce request of {actual} \
                                         bytes; the limit (max_in_flight_bytes_per_connection) \
                                         is {limit}"
                                    ),
                                    broker,
                                    &st[i],
                                ));
                            } else {
                                st[i].alone = true;
                                deferred.push(i);
                            }
                        }
                        continue;
                    }
                    Err(RequestError { cause, maybe_sent }) => {
                        // The coalescer has poisoned the connection where the failure calls for
                        // it; a request taken back unsent leaves it healthy.
                        span.record("error.type", "connection");
                        span.record("otel.status_code", "error");
                        span.record("otel.status_description", chain(&cause));
                        // Running out of time in the queue or while others still wait is no
                        // news when an earlier attempt already failed for a reason.
                        let deadline_artifact =
                            matches!(cause, ConnError::NotSentInTime | ConnError::AnswerLate);
                        for i in chunk {
                            st[i].may_be_in_log |= maybe_sent;
                            if !(deadline_artifact && st[i].last.is_some()) {
                                st[i].last = Some(Failure::Conn {
                                    cause: cause.clone(),
                                    connecting: false,
                                });
                            }
                            retry.push(i);
                        }
                        refresh |= !deadline_artifact;
                        continue;
                    }
                };
                for i in chunk {
                    let it = &v.items[i];
                    let Some(a) = answers
                        .partitions
                        .get(&(it.topic.clone(), it.partition))
                        .cloned()
                    else {
                        let cause = ConnError::Malformed {
                            api: "Produce",
                            reason: format!("answer omits {}-{}", it.topic, it.partition),
                        };
                        conn.poison(cause.clone());
                        // The leader had the request; whatever it did with this batch, it may
                        // be in the log.
                        st[i].may_be_in_log = true;
                        st[i].last = Some(Failure::Conn {
                            cause,
                            connecting: false,
                        });
                        retry.push(i);
                        continue;
                    };
                    if a.error_code != 0 {
                        // A request answers for several partitions; the span shows the first
                        // error (each partition's is in its result).
                        span.record("leaderlink.kafka_error_code", a.error_code);
                        span.record("error.type", error_name(a.error_code));
                    }
                    let held = ledger.get(i);
                    if a.error_code == 0
                        || (a.error_code == DUPLICATE_SEQUENCE_NUMBER && held.is_some())
                    {
                        // A duplicate sequence is a batch the leader already has (§3.16); its
                        // offset is not in the answer.
                        let dup = a.error_code != 0;
                        self.count_forwarded(it);
                        st[i].result = Some(ok_result(
                            it,
                            if dup { -1 } else { a.base_offset },
                            a.log_append_time_ms,
                            a.log_start_offset,
                            broker,
                            &st[i],
                        ));
                    } else if let Some((tp, open, generation)) = held
                        && a.error_code == OUT_OF_ORDER_SEQUENCE_NUMBER
                        && self
                            .inner
                            .producer
                            .retry_out_of_order(&tp, open, generation)
                    {
                        // An earlier batch of the producer on this partition is still being
                        // retried (or this stamp is replaced): retry behind it, when its turn
                        // comes, without a backoff of its own.
                        st[i].last = Some(Failure::Kafka {
                            code: a.error_code,
                            message: a.error_message,
                        });
                        turn_wait.push(i);
                    } else if let Some(stamp) = &st[i].stamp
                        && matches!(
                            a.error_code,
                            INVALID_PRODUCER_EPOCH | UNKNOWN_PRODUCER_ID | PRODUCER_FENCED
                        )
                    {
                        // leaderlink's own identity is stale: a new epoch, then a new stamp.
                        self.inner.producer.fenced(stamp);
                        st[i].last = Some(Failure::Kafka {
                            code: a.error_code,
                            message: a.error_message,
                        });
                        retry.push(i);
                    } else if retriable(a.error_code) {
                        // KIP-951: a newer leader named in the answer saves a full refresh.
                        let hinted =
                            matches!(a.error_code, NOT_LEADER_OR_FOLLOWER | FENCED_LEADER_EPOCH)
                                && a.current_leader.is_some_and(|(leader, epoch)| {
                                    self.inner.metadata.apply_hint(
                                        &it.topic,
                                        it.partition,
                                        leader,
                                        epoch,
                                        &answers.endpoints,
                                    )
                                });
                        refresh |= needs_refresh(a.error_code) && !hinted;
                        st[i].may_be_in_log |= may_have_appended(a.error_code, v.acks);
                        st[i].last = Some(Failure::Kafka {
                            code: a.error_code,
                            message: a.error_message,
                        });
                        retry.push(i);
                    } else {
                        let mut r = error_result(
                            it,
                            a.error_code,
                            a.error_message.unwrap_or_default(),
                            broker,
                            &st[i],
                        );
                        r.log_start_offset = a.log_start_offset;
                        st[i].result = Some(r);
                    }
                }
            }

            for (i, s) in st.iter().enumerate() {
                if let Some(r) = &s.result {
                    ledger.settle(i, r.error_code == 0);
                }
            }
            if let Some(cause) = st.iter().find_map(|s| s.overloaded.clone()) {
                return Err(self.overloaded(&v, &st, cause));
            }
            let failed = !retry.is_empty();
            // Batches waiting for their turn behind earlier ones of their partition.
            let turns: Vec<(Tp, Turn)> = turn_wait
                .iter()
                .filter_map(|&i| {
                    let new = self.needs_stamp(&v, i, &st[i]);
                    Some((tp_of(&v, i), turn_of(&v, i, &st[i], new)?))
                })
                .collect();
            retry.extend(turn_wait);
            retry.extend(deferred);
            retry.sort_unstable();
            pending = retry;
            if pending.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.expired(&v, &st, &pending));
            }
            if !failed {
                // Only batches deferred behind an earlier one of their partition (or their
                // producer's sequence): go on once one of them can go.
                if !turns.is_empty() {
                    self.inner.producer.wait_turn(&turns, deadline).await;
                    if Instant::now() >= deadline {
                        return Err(self.expired(&v, &st, &pending));
                    }
                }
                continue;
            }
            debug!(pending = pending.len(), ?backoff, "retrying partitions");
            tokio::time::sleep_until((now + backoff).min(deadline)).await;
            // A round started with no time left would only fail at once (a dial with an expired
            // deadline, a refresh cut short) and bury the real cause under that failure.
            if Instant::now() >= deadline {
                return Err(self.expired(&v, &st, &pending));
            }
            backoff = (backoff * 2).min(self.inner.cfg.retry_backoff_max);
        }
        // Refused by a broker, and not one batch of the call ever sent: nothing can be in a log,
        // and the cause concerns the whole service, not one partition.
        if let Some((broker, cause)) = refused
            && st.iter().all(|s| s.attempts == 0)
        {
            return Err(ForwardError::Unavailable {
                detail: format!(
                    "broker {} ({}) refused the connection",
                    broker.id,
                    broker.addr()
                ),
                cause,
            });
        }
        Ok(ForwardResponse {
            id: v.id,
            partitions: st
                .into_iter()
                .map(|s| s.result.expect("every partition has a result"))
                .collect(),
            ..Default::default()
        })
    }

    /// Fetches metadata when asked to or when a pending topic is not in the map yet. Returns
    /// whether a refresh happened.
    async fn ensure_metadata(
        &self,
        v: &Validated,
        pending: &[usize],
        force: bool,
        deadline: Instant,
    ) -> Result<bool, ConnError> {
        let map = self.inner.metadata.leader_map();
        let mut topics: Vec<&str> = pending.iter().map(|&i| v.items[i].topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        // Every topic is marked (no short cut): marking keeps a topic in the map.
        let mut all_known = true;
        for t in &topics {
            all_known &= map.mark_used(t);
        }
        if !force && all_known {
            return Ok(false);
        }
        self.inner
            .metadata
            .refresh(&topics, Some(map.generation), deadline)
            .await
            .map(|_| true)
    }

    fn overloaded(&self, v: &Validated, st: &[ItemState], cause: ConnError) -> ForwardError {
        let refused: Vec<String> = st
            .iter()
            .enumerate()
            .filter(|(_, s)| s.overloaded.is_some())
            .take(5)
            .map(|(i, _)| format!("{}-{}", v.items[i].topic, v.items[i].partition))
            .collect();
        ForwardError::Overloaded {
            detail: format!(
                "the leader connection of {} refused the batch{}",
                refused.join(", "),
                answered_list(v, st)
            ),
            cause,
        }
    }

    fn expired(&self, v: &Validated, st: &[ItemState], pending: &[usize]) -> ForwardError {
        let name = |i: usize| format!("{}-{}", v.items[i].topic, v.items[i].partition);
        let waiting: Vec<String> = pending.iter().take(5).map(|&i| name(i)).collect();
        let answered = answered_list(v, st);
        let last = pending.iter().rev().find_map(|&i| st[i].last.clone());
        let all_connecting = pending.iter().all(|&i| {
            matches!(
                st[i].last,
                Some(Failure::Conn {
                    connecting: true,
                    ..
                })
            )
        });
        if all_connecting && let Some(Failure::Conn { cause, .. }) = last {
            return ForwardError::Unavailable {
                detail: format!(
                    "cannot reach the leader of {}{answered}",
                    waiting.join(", ")
                ),
                cause,
            };
        }
        let cause = match last {
            Some(Failure::Kafka { code, message }) => format!(
                "last answer {}{}",
                error_name(code),
                message.map(|m| format!(" ({m})")).unwrap_or_default()
            ),
            Some(Failure::Conn { cause, .. }) => format!("last cause: {}", chain(&cause)),
            None => "no attempt could be made in time".into(),
        };
        ForwardError::DeadlineExceeded {
            detail: format!(
                "{} of {} partitions unanswered ({}{}); {cause}{answered}",
                pending.len(),
                v.items.len(),
                waiting.join(", "),
                if pending.len() > 5 { ", …" } else { "" }
            ),
        }
    }
}

/// "; answered: t-0 at offset 5, …" for the partitions that already have a result.
/// The span of one Produce request to a leader (OpenTelemetry messaging conventions, client
/// side): entered while the request awaits its answer, ended once the answer is read.
fn leader_span(v: &Validated, chunk: &[usize], broker: &Broker, attempt: u32) -> Span {
    let first = &v.items[chunk[0]];
    let span = debug_span!(
        "produce",
        otel.name = Empty,
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "produce",
        messaging.destination.name = Empty,
        messaging.destination.partition.id = Empty,
        messaging.batch.message_count = Empty,
        server.address = broker.host.as_str(),
        server.port = broker.port,
        leaderlink.leader_id = broker.id,
        leaderlink.partitions = chunk.len() as i64,
        leaderlink.attempt = i64::from(attempt),
        leaderlink.acks = v.acks,
        leaderlink.correlation_id = Empty,
        leaderlink.request_partitions = Empty,
        leaderlink.kafka_error_code = Empty,
        error.type = Empty,
    );
    // Nothing takes the span (no span export, logs above debug): skip the work below, which
    // would run on every request.
    if span.is_disabled() {
        return span;
    }
    // Integers as i64: OpenTelemetry has no unsigned attributes (u64 would export as a string).
    let records: i64 = chunk.iter().map(|&i| i64::from(v.items[i].records)).sum();
    span.record("messaging.batch.message_count", records);
    if chunk.iter().all(|&i| v.items[i].topic == first.topic) {
        span.record("otel.name", format!("send {}", first.topic));
        span.record("messaging.destination.name", first.topic.as_str());
    } else {
        span.record("otel.name", "send");
    }
    if chunk.len() == 1 {
        span.record(
            "messaging.destination.partition.id",
            first.partition.to_string(),
        );
    }
    span
}

fn answered_list(v: &Validated, st: &[ItemState]) -> String {
    let answered: Vec<String> = st
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.result.as_ref().map(|r| (i, r)))
        .take(5)
        .map(|(i, r)| {
            let name = format!("{}-{}", v.items[i].topic, v.items[i].partition);
            match r.error_code {
                0 => format!("{name} at offset {}", r.base_offset),
                _ => format!("{name} with {}", r.error_name),
            }
        })
        .collect();
    if answered.is_empty() {
        String::new()
    } else {
        format!("; answered: {}", answered.join(", "))
    }
}

fn is_connect_failure(cause: &ConnError) -> bool {
    matches!(
        cause,
        ConnError::Connect { .. } | ConnError::ConnectTimeout { .. }
    )
}

/// Splits one leader connection's items into requests holding at most one batch per partition
/// (docs/design.md §3.10): the k-th batch for a partition goes into the k-th request, so batches of
/// one partition keep their order on the wire.
fn one_batch_per_partition(v: &Validated, items: Vec<usize>) -> Vec<Vec<usize>> {
    let mut seen: HashMap<(&str, i32), usize> = HashMap::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for i in items {
        let k = seen
            .entry((v.items[i].topic.as_str(), v.items[i].partition))
            .or_insert(0);
        if out.len() <= *k {
            out.push(Vec::new());
        }
        out[*k].push(i);
        *k += 1;
    }
    debug_assert!(out.iter().all(|c| {
        let set: HashSet<_> = c
            .iter()
            .map(|&i| (&v.items[i].topic, v.items[i].partition))
            .collect();
        set.len() == c.len()
    }));
    out
}

fn ok_result(
    it: &validate::Item,
    base_offset: i64,
    log_append_time_ms: i64,
    log_start_offset: i64,
    leader_id: i32,
    st: &ItemState,
) -> PartitionResult {
    PartitionResult {
        topic: it.topic.clone(),
        partition: it.partition,
        base_offset,
        log_append_time_ms,
        log_start_offset,
        leader_id,
        attempts: st.attempts,
        possibly_duplicated: st.possibly_duplicated,
        ..Default::default()
    }
}

fn error_result(
    it: &validate::Item,
    code: i16,
    message: String,
    leader_id: i32,
    st: &ItemState,
) -> PartitionResult {
    PartitionResult {
        topic: it.topic.clone(),
        partition: it.partition,
        error_code: i32::from(code),
        error_name: error_name(code),
        error_message: message,
        base_offset: -1,
        log_append_time_ms: -1,
        log_start_offset: -1,
        leader_id,
        attempts: st.attempts,
        possibly_duplicated: st.possibly_duplicated,
    }
}
