//! The core: validate a request, route each partition to its leader, send over pipelined
//! connections, retry within the caller's deadline, assemble one result per partition.

pub mod batch;
mod call;
mod errors;
pub mod idempotence;
mod judge;
mod ledger;
pub mod partitioner;
mod report;
mod run;
mod submit;
pub mod validate;

pub use errors::error_name;

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
    time::Instant,
};

use crate::{
    kafka::{
        connection::ConnectionConfig,
        error::ConnError,
        metadata::{MetadataClient, TopicState},
        pool::{Pool, QueueSettings},
        produce::acks,
        record_batch::Codec,
        stall::Suspects,
    },
    proto::v1::{ForwardRequest, ForwardResponse},
    stats::Stats,
};
use call::{Call, ItemState};
use idempotence::Producer;
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
    /// Bound of each leader connection's Produce queue (see [`crate::kafka::coalesce`]).
    pub max_queued_per_connection: usize,
    /// Largest record batch merged from several calls' `records` for one partition.
    pub max_batch_bytes: usize,
    /// How long a leader connection's queue waits for more calls before a send (0: none).
    pub linger: Duration,
    /// Add the call's `traceparent` as a header to each record leaderlink encodes.
    pub trace_record_header: bool,
    /// A topic unused for this long leaves the leader map at the next refresh.
    pub metadata_max_idle: Duration,
    /// Codec of the batches leaderlink encodes, unless a request asks for another.
    pub compression: Codec,
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
    /// Sticky partitions of keyless entries with partition -1.
    sticky: partitioner::Sticky,
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
        let backoff = (cfg.retry_backoff, cfg.retry_backoff_max);
        let suspects = Suspects::new(conn.clone(), backoff);
        Self {
            inner: Arc::new(Inner {
                metadata: MetadataClient::new(
                    bootstrap,
                    conn.clone(),
                    allow_auto_topic_creation,
                    cfg.metadata_max_idle,
                    suspects.clone(),
                ),
                pool: Pool::new(
                    conn,
                    QueueSettings {
                        max_queued: cfg.max_queued_per_connection,
                        max_batch_bytes: cfg.max_batch_bytes,
                        linger: cfg.linger,
                    },
                    backoff,
                    suspects,
                ),
                stats: Arc::new(Stats::default()),
                gates: std::sync::Mutex::new(HashMap::new()),
                allow_auto_topic_creation,
                max_in_flight_bytes,
                producer: Arc::new(Producer::default()),
                sticky: partitioner::Sticky::default(),
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

    /// Whether records leaderlink encodes carry the call's `traceparent` as a header
    /// (`trace_record_header`).
    pub fn wants_traceparent(&self) -> bool {
        self.inner.cfg.trace_record_header
    }

    /// The codec of the batches leaderlink encodes when a request asks for none
    /// (`compression`).
    pub fn compression(&self) -> Codec {
        self.inner.cfg.compression
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
        enqueued: Option<oneshot::Sender<()>>,
    ) -> Result<ForwardResponse, ForwardError> {
        let header = traceparent.filter(|_| self.inner.cfg.trace_record_header);
        let mut v = validate(req, self.inner.cfg.max_request_bytes, now_ms(), header)?;
        self.choose_partitions(&mut v, deadline).await?;
        self.check_fits(&v)?;
        let gates = self.enter_gates(&v, deadline).await?;
        Call::new(self, v, deadline, gates, enqueued).run().await
    }

    /// Chooses the partition of each entry with partition -1 ([`partitioner`]) from its
    /// topic's partition count, before the partitions' gates are entered. A topic not in the
    /// leader map is fetched (and auto-created where the cluster does that) over up to
    /// [`Self::unknown_topic_rounds`] refreshes, with the retry backoff in between. An entry
    /// whose topic's partition count is still unknown then keeps -1: the route phase answers
    /// it with the topic's error ([`Call`]). Fails only as the first metadata phase does, when
    /// no broker answers.
    async fn choose_partitions(
        &self,
        v: &mut Validated,
        deadline: Instant,
    ) -> Result<(), ForwardError> {
        // Most calls name their partitions: no leader map to look at.
        if !v
            .items
            .iter()
            .any(|it| it.partition == validate::CHOOSE_PARTITION)
        {
            return Ok(());
        }
        let mut backoff = self.inner.cfg.retry_backoff;
        let mut rounds = 0;
        loop {
            let map = self.inner.metadata.leader_map();
            let mut missing: Vec<&str> = Vec::new();
            for it in &mut v.items {
                if it.partition != validate::CHOOSE_PARTITION {
                    continue;
                }
                match map.topics.get(&it.topic) {
                    Some(TopicState::Partitions(parts)) if !parts.is_empty() => {
                        it.partition = match &it.key {
                            Some(key) => partitioner::for_key(key, parts.len()),
                            None => self.inner.sticky.choose(&it.topic, parts, it.batch.len()),
                        };
                    }
                    _ => missing.push(it.topic.as_str()),
                }
            }
            if missing.is_empty() || rounds >= self.unknown_topic_rounds() {
                return Ok(());
            }
            missing.sort_unstable();
            missing.dedup();
            if rounds > 0 {
                if Instant::now() + backoff >= deadline {
                    return Ok(());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.inner.cfg.retry_backoff_max);
            }
            rounds += 1;
            if let Err(cause) = self
                .inner
                .metadata
                .refresh(&missing, Some(map.generation), deadline)
                .await
            {
                if Instant::now() >= deadline {
                    return Ok(());
                }
                return Err(ForwardError::Unavailable {
                    detail: "could not fetch metadata from any broker to choose a partition".into(),
                    cause,
                });
            }
        }
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
}
