//! The leader map: which broker leads each partition, fetched with Metadata requests.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use kafka_protocol::{
    messages::{
        ApiKey, MetadataRequest, MetadataResponse, TopicName,
        metadata_request::MetadataRequestTopic,
    },
    protocol::StrBytes,
};
use tokio::time::{Duration, Instant};
use tracing::{Instrument, debug, debug_span, field::Empty, info_span};

use super::{
    connect,
    connection::{ConnStats, Connection, ConnectionConfig},
    error::{ConnError, chain},
    frame::{decode_response, encode_body},
    stall::Suspects,
};

/// Least time a Metadata request has for its answer, however close the deadline of the call
/// that sent it: a late answer keeps the shared metadata connection up; one that has not come by
/// then poisons it.
const METADATA_ANSWER_GRACE: Duration = Duration::from_secs(2);

/// A broker's address as the cluster advertises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Broker id.
    pub id: i32,
    /// Advertised host.
    pub host: String,
    /// Advertised port.
    pub port: i32,
}

impl Broker {
    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Whether `addr` is [`Broker::addr`] (without building that string: it is checked on
    /// every request's way to its connection).
    pub fn is_at(&self, addr: &str) -> bool {
        addr.strip_prefix(self.host.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|port| port.parse() == Ok(self.port))
    }
}

/// One partition's leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLeader {
    /// Leader broker id; -1 when the partition has no leader right now.
    pub leader_id: i32,
    /// Leader epoch, or -1 when the broker does not report it.
    pub leader_epoch: i32,
    /// The partition's error code in the Metadata answer (e.g. LEADER_NOT_AVAILABLE).
    pub error_code: i16,
}

/// What the cluster said about one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    /// The topic exists; index = partition.
    Partitions(Vec<PartitionLeader>),
    /// The topic-level error code (e.g. UNKNOWN_TOPIC_OR_PARTITION).
    Error(i16),
}

/// Where a partition's requests should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Send to this broker.
    Leader(Broker, i32),
    /// The topic is not in the map yet: fetch metadata first.
    Unknown,
    /// The cluster reported an error for the topic or partition (Kafka error code).
    Error(i16),
    /// The topic exists but has fewer partitions.
    NoSuchPartition {
        /// Partition count of the topic.
        partitions: usize,
    },
}

/// A snapshot of the cluster's leaders.
#[derive(Debug, Clone)]
pub struct LeaderMap {
    /// Brokers by id.
    pub brokers: HashMap<i32, Broker>,
    /// Topics asked about and used within `metadata_max_idle_ms`.
    pub topics: HashMap<String, TopicState>,
    /// When the last successful Metadata answer arrived; `None` before the first.
    pub fetched_at: Option<Instant>,
    /// Bumped on every successful refresh.
    pub generation: u64,
    /// When each topic of `topics` was last used, in milliseconds since `born`. Shared by every
    /// snapshot (the counters outlive the map they were made in), so marking a use never
    /// copies the map.
    last_use: HashMap<String, Arc<AtomicU64>>,
    /// The time base of `last_use`: when the client was made.
    born: Instant,
}

impl LeaderMap {
    fn empty(born: Instant) -> Self {
        Self {
            brokers: HashMap::new(),
            topics: HashMap::new(),
            fetched_at: None,
            generation: 0,
            last_use: HashMap::new(),
            born,
        }
    }

    fn age_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_millis() as u64
    }

    /// Notes that a call is about to send to `topic`, so that it stays in the map. Returns
    /// whether the topic is in the map.
    pub fn mark_used(&self, topic: &str) -> bool {
        let Some(stamp) = self.last_use.get(topic) else {
            return false;
        };
        stamp.store(self.age_ms(Instant::now()), Ordering::Relaxed);
        true
    }

    /// Topics of the map used within `max_idle` of `now`: the ones a refresh asks about again.
    fn in_use(&self, now: Instant, max_idle: Duration) -> Vec<String> {
        let now_ms = self.age_ms(now);
        let max_idle_ms = max_idle.as_millis() as u64;
        self.last_use
            .iter()
            .filter(|(_, used)| now_ms.saturating_sub(used.load(Ordering::Relaxed)) <= max_idle_ms)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Where to send a partition's batch.
    pub fn route(&self, topic: &str, partition: i32) -> Route {
        match self.topics.get(topic) {
            None => Route::Unknown,
            Some(TopicState::Error(code)) => Route::Error(*code),
            Some(TopicState::Partitions(parts)) => {
                let Some(p) = usize::try_from(partition).ok().and_then(|i| parts.get(i)) else {
                    return Route::NoSuchPartition {
                        partitions: parts.len(),
                    };
                };
                if p.leader_id < 0 {
                    // LEADER_NOT_AVAILABLE unless the broker said something more specific.
                    return Route::Error(if p.error_code != 0 { p.error_code } else { 5 });
                }
                match self.brokers.get(&p.leader_id) {
                    Some(b) => Route::Leader(b.clone(), p.leader_epoch),
                    None => Route::Error(5),
                }
            }
        }
    }
}

/// Fetches and caches cluster metadata.
pub struct MetadataClient {
    bootstrap: Vec<String>,
    config: ConnectionConfig,
    allow_auto_topic_creation: bool,
    /// A topic no call has used for this long leaves the map at the next refresh, so that the
    /// map and every Metadata request stay the size of the topics in use, not of every name a
    /// caller ever sent (Kafka's Java producer: `metadata.max.idle.ms`). A call for it later
    /// learns it again, as for a new topic.
    max_idle: Duration,
    map: RwLock<Arc<LeaderMap>>,
    /// The connection Metadata requests go over, and its address. The lock also makes
    /// refreshes single-flight.
    conn: tokio::sync::Mutex<Option<(Arc<Connection>, String)>>,
    /// Brokers that stopped answering: asked last, and a connection to one is given up.
    suspects: Arc<Suspects>,
    stats: Arc<ConnStats>,
    refreshes: AtomicU64,
}

impl MetadataClient {
    /// A client that bootstraps through `bootstrap` (`host:port` each).
    /// `max_idle`, `suspects`: see the fields.
    pub fn new(
        bootstrap: Vec<String>,
        config: ConnectionConfig,
        allow_auto_topic_creation: bool,
        max_idle: Duration,
        suspects: Arc<Suspects>,
    ) -> Self {
        Self {
            suspects,
            bootstrap,
            config,
            allow_auto_topic_creation,
            max_idle,
            map: RwLock::new(Arc::new(LeaderMap::empty(Instant::now()))),
            conn: tokio::sync::Mutex::new(None),
            stats: Arc::new(ConnStats::default()),
            refreshes: AtomicU64::new(0),
        }
    }

    /// The current leader map.
    pub fn leader_map(&self) -> Arc<LeaderMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Successful refreshes so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// Fetches metadata for every topic in use (see `max_idle`) plus `topics`, unless a refresh
    /// newer than `seen_generation` that covered `topics` completed while this call waited for
    /// its turn. The new map holds exactly the topics asked about.
    /// Traced as a `metadata refresh` span (a child of the call that needed it).
    pub async fn refresh(
        &self,
        topics: &[&str],
        seen_generation: Option<u64>,
        deadline: Instant,
    ) -> Result<Arc<LeaderMap>, ConnError> {
        let span = debug_span!(
            "metadata refresh",
            leaderlink.topics_asked = topics.len() as i64,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        let r = self
            .refresh_inner(topics, seen_generation, deadline)
            .instrument(span.clone())
            .await;
        if let Err(e) = &r {
            span.record("otel.status_code", "error");
            span.record("otel.status_description", chain(e));
        }
        r
    }

    async fn refresh_inner(
        &self,
        topics: &[&str],
        seen_generation: Option<u64>,
        deadline: Instant,
    ) -> Result<Arc<LeaderMap>, ConnError> {
        let Ok(mut conn) = tokio::time::timeout_at(deadline, self.conn.lock()).await else {
            return Err(ConnError::TimedOut);
        };
        let current = self.leader_map();
        if let Some(seen) = seen_generation
            && current.generation > seen
            && topics.iter().all(|t| current.topics.contains_key(*t))
        {
            return Ok(current);
        }
        let mut wanted = current.in_use(Instant::now(), self.max_idle);
        let known: HashSet<&str> = wanted.iter().map(String::as_str).collect();
        let extra: Vec<String> = topics
            .iter()
            .filter(|t| !known.contains(**t))
            .map(|t| t.to_string())
            .collect();
        wanted.extend(extra);

        // Try the open connection, then every known broker, then the bootstrap list: one dead
        // address must not matter. Suspect brokers (stalled) come last.
        let mut candidates: Vec<String> = current.brokers.values().map(Broker::addr).collect();
        candidates.sort();
        for b in &self.bootstrap {
            if !candidates.contains(b) {
                candidates.push(b.clone());
            }
        }
        candidates.sort_by_key(|a| self.suspects.contains(a));
        // A connection whose SASL session nears its end takes no more Metadata requests
        // (see `Connection::due_for_renewal`).
        if conn.as_ref().is_some_and(|(c, _)| c.due_for_renewal())
            && let Some((old, _)) = conn.take()
        {
            debug!("renewing the metadata connection before its SASL session ends");
            old.drain();
        }
        // A connection to a broker that stopped answering is left for another broker.
        if conn
            .as_ref()
            .is_some_and(|(_, a)| self.suspects.contains(a))
            && let Some((old, addr)) = conn.take()
        {
            debug!(%addr, "leaving the metadata connection to a suspect broker");
            old.drain();
        }
        let mut last_err = ConnError::Shutdown;
        let mut tried_open = false;
        loop {
            let c = match conn.as_ref() {
                Some((c, _)) if c.poisoned().is_none() && !tried_open => {
                    tried_open = true;
                    c.clone()
                }
                _ => {
                    let Some(addr) = candidates.first().cloned() else {
                        break;
                    };
                    candidates.remove(0);
                    // A root span: the connection outlives the refresh that opened it.
                    let span = info_span!(
                        target: crate::telemetry::TASK_TARGET,
                        parent: None,
                        "metadata_conn",
                        addr = %addr
                    );
                    match connect(&addr, &self.config, self.stats.clone(), deadline, span).await {
                        Ok(c) => {
                            *conn = Some((c.clone(), addr));
                            tried_open = true;
                            c
                        }
                        Err(e) => {
                            debug!(addr = %addr, cause = %e, "metadata connection failed");
                            last_err = e;
                            continue;
                        }
                    }
                }
            };
            match self.fetch(&c, &wanted, deadline).await {
                Ok(resp) => {
                    let map = self.merge(resp, &wanted);
                    self.refreshes.fetch_add(1, Ordering::Relaxed);
                    return Ok(map);
                }
                // The caller's deadline passed with the answer still due on a healthy
                // connection: the connection stays (see `fetch`).
                Err(e @ ConnError::TimedOut) if c.poisoned().is_none() => {
                    last_err = e;
                    break;
                }
                Err(e) => {
                    c.poison(e.clone());
                    *conn = None;
                    last_err = e;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }

    /// Applies a KIP-951 leader hint from a Produce answer if its epoch is newer than the one
    /// known. Returns whether the map changed (then no full refresh is needed).
    pub fn apply_hint(
        &self,
        topic: &str,
        partition: i32,
        leader_id: i32,
        leader_epoch: i32,
        endpoints: &[Broker],
    ) -> bool {
        let mut guard = self.map.write().unwrap_or_else(|p| p.into_inner());
        let Some(TopicState::Partitions(parts)) = guard.topics.get(topic) else {
            return false;
        };
        let Some(known) = usize::try_from(partition).ok().and_then(|i| parts.get(i)) else {
            return false;
        };
        let endpoint = endpoints.iter().find(|b| b.id == leader_id);
        if leader_epoch <= known.leader_epoch
            || (endpoint.is_none() && !guard.brokers.contains_key(&leader_id))
        {
            return false;
        }
        let mut next = (**guard).clone();
        if let Some(b) = endpoint {
            next.brokers.insert(b.id, b.clone());
        }
        if let Some(TopicState::Partitions(parts)) = next.topics.get_mut(topic) {
            parts[partition as usize] = PartitionLeader {
                leader_id,
                leader_epoch,
                error_code: 0,
            };
        }
        next.generation += 1;
        *guard = Arc::new(next);
        true
    }

    async fn fetch(
        &self,
        conn: &Arc<Connection>,
        topics: &[String],
        deadline: Instant,
    ) -> Result<MetadataResponse, ConnError> {
        let version = conn.versions().metadata;
        let req = MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                    })
                    .collect(),
            ))
            // The field exists from v4 on and must keep its default (true) below; older versions
            // leave auto-creation to the broker's setting.
            .with_allow_auto_topic_creation(version < 4 || self.allow_auto_topic_creation);
        let body = encode_body(ApiKey::Metadata, version, &req)?;
        let in_flight = conn
            .send(ApiKey::Metadata, version, body, true)
            .await
            .map_err(|e| e.cause)?;
        // The metadata connection is shared: a call running out of time must not tear it down
        // because the answer is late. The request keeps a deadline of its own, at least
        // METADATA_ANSWER_GRACE away; the caller stops waiting at its deadline (`TimedOut`, the
        // connection kept), and the connection is poisoned only if no answer has come by the
        // request's (InFlight's watchdog), so a silent broker is still noticed. (A broker that is
        // slow, not stopped, may take longer than any fixed bound: a 2 s round trip is answered.)
        let own = deadline.max(Instant::now() + METADATA_ANSWER_GRACE);
        let frame = tokio::time::timeout_at(deadline, in_flight.wait(own))
            .await
            .map_err(|_| ConnError::TimedOut)?
            .map_err(|e| e.cause)?
            .ok_or(ConnError::Shutdown)?;
        decode_response(ApiKey::Metadata, version, frame)
    }

    /// Lays a Metadata answer over the latest map (under the write lock, so a leader hint
    /// applied during the fetch is not lost). A partition whose known leader epoch is newer
    /// than the answer's keeps its entry: a broker with a stale cache must not bring an old
    /// leader back. Topics not in `wanted` (idle ones) leave the map; a topic new to the map
    /// counts as used now.
    fn merge(&self, resp: MetadataResponse, wanted: &[String]) -> Arc<LeaderMap> {
        let mut guard = self.map.write().unwrap_or_else(|p| p.into_inner());
        let current = guard.clone();
        let mut next = (*current).clone();
        let keep: HashSet<&str> = wanted.iter().map(String::as_str).collect();
        next.topics.retain(|t, _| keep.contains(t.as_str()));
        next.last_use.retain(|t, _| keep.contains(t.as_str()));
        next.brokers = resp
            .brokers
            .into_iter()
            .map(|b| {
                (
                    b.node_id.0,
                    Broker {
                        id: b.node_id.0,
                        host: b.host.as_str().to_string(),
                        port: b.port,
                    },
                )
            })
            .collect();
        for t in resp.topics {
            let Some(name) = t.name else { continue };
            let state = if t.error_code != 0 {
                TopicState::Error(t.error_code)
            } else {
                // Partitions are numbered 0..n-1; an index outside that range (a broken or
                // hostile answer) is ignored rather than trusted for an allocation.
                let count = t.partitions.len();
                let mut parts = vec![
                    PartitionLeader {
                        leader_id: -1,
                        leader_epoch: -1,
                        error_code: 5,
                    };
                    count
                ];
                for p in t.partitions {
                    if let Some(slot) = usize::try_from(p.partition_index)
                        .ok()
                        .and_then(|i| parts.get_mut(i))
                    {
                        *slot = PartitionLeader {
                            leader_id: p.leader_id.0,
                            leader_epoch: p.leader_epoch,
                            error_code: p.error_code,
                        };
                    }
                }
                if let Some(TopicState::Partitions(known)) = current.topics.get(name.0.as_str()) {
                    for (new, old) in parts.iter_mut().zip(known) {
                        if old.leader_epoch > new.leader_epoch {
                            *new = *old;
                        }
                    }
                }
                TopicState::Partitions(parts)
            };
            let name = name.0.as_str();
            if !keep.contains(name) {
                continue; // not asked about (a broker answering more than it was asked)
            }
            if !next.last_use.contains_key(name) {
                let now = next.age_ms(Instant::now());
                next.last_use
                    .insert(name.to_string(), Arc::new(AtomicU64::new(now)));
            }
            next.topics.insert(name.to_string(), state);
        }
        next.fetched_at = Some(Instant::now());
        next.generation = current.generation + 1;
        let next = Arc::new(next);
        *guard = next.clone();
        next
    }
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::{
        BrokerId,
        metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        },
    };

    use super::*;

    #[test]
    fn a_broker_is_at_exactly_its_own_address() {
        let b = Broker {
            id: 1,
            host: "kafka-1.local".into(),
            port: 9092,
        };
        assert!(b.is_at(&b.addr()));
        for other in [
            "kafka-1.local:9093",
            "kafka-1.local:90920",
            "kafka-1.loca:9092",
            "kafka-1.local9092",
            "kafka-1.local:",
            "x.kafka-1.local:9092",
            "",
        ] {
            assert!(!b.is_at(other), "{other}");
        }
    }

    fn client() -> MetadataClient {
        client_idle(Duration::from_secs(300))
    }

    fn client_idle(max_idle: Duration) -> MetadataClient {
        let config = ConnectionConfig {
            max_in_flight: 1,
            max_in_flight_bytes: 1024,
            max_frame_bytes: 1024,
            client_id: None,
            connect_timeout: std::time::Duration::from_secs(1),
            handshake_timeout: std::time::Duration::from_secs(1),
            stall_timeout: std::time::Duration::ZERO,
            security: Default::default(),
        };
        let suspects = Suspects::new(config.clone(), (Duration::ZERO, Duration::ZERO));
        MetadataClient::new(vec![], config, true, max_idle, suspects)
    }

    fn answer_for(names: &[&str]) -> MetadataResponse {
        MetadataResponse::default()
            .with_brokers(vec![
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(1))
                    .with_host(StrBytes::from_static_str("h"))
                    .with_port(9092),
            ])
            .with_topics(
                names
                    .iter()
                    .map(|n| {
                        MetadataResponseTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(n.to_string()))))
                            .with_partitions(vec![partition(0, 1)])
                    })
                    .collect(),
            )
    }

    #[tokio::test(start_paused = true)]
    async fn a_topic_unused_for_max_idle_leaves_the_map_and_the_next_request() {
        let c = client_idle(Duration::from_secs(10));
        let all = ["busy".to_string(), "idle".to_string(), "new".to_string()];
        let map = c.merge(answer_for(&["busy", "idle"]), &all[..2]);
        assert_eq!(map.topics.len(), 2);
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(map.mark_used("busy"));
        assert!(!map.mark_used("new"), "not in the map yet");
        tokio::time::advance(Duration::from_secs(4)).await;
        // 12 s after it was learnt, "idle" was never used: the next refresh leaves it out.
        let mut wanted = c.leader_map().in_use(Instant::now(), c.max_idle);
        assert_eq!(wanted, vec!["busy".to_string()]);
        wanted.push("new".to_string());
        // A broker that answers for more than it was asked does not bring it back either.
        let map = c.merge(answer_for(&["busy", "idle", "new"]), &wanted);
        let mut names: Vec<&String> = map.topics.keys().collect();
        names.sort();
        assert_eq!(names, ["busy", "new"]);
        assert_eq!(map.route("idle", 0), Route::Unknown);
        // The use counters outlive the snapshot they were marked in; "new" counts as used when
        // learnt.
        tokio::time::advance(Duration::from_secs(9)).await;
        let mut in_use = c.leader_map().in_use(Instant::now(), c.max_idle);
        in_use.sort();
        assert_eq!(in_use, ["new"]);
    }

    fn partition(index: i32, leader: i32) -> MetadataResponsePartition {
        MetadataResponsePartition::default()
            .with_partition_index(index)
            .with_leader_id(BrokerId(leader))
            .with_leader_epoch(4)
    }

    #[test]
    fn partition_indexes_outside_the_topic_are_ignored_not_trusted() {
        let c = client();
        let resp = MetadataResponse::default()
            .with_brokers(vec![
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(1))
                    .with_host(StrBytes::from_static_str("h"))
                    .with_port(9092),
            ])
            .with_topics(vec![
                MetadataResponseTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str("t"))))
                    .with_partitions(vec![
                        partition(0, 1),
                        partition(i32::MAX, 1),
                        partition(-3, 1),
                    ]),
            ]);
        let map = c.merge(resp, &["t".to_string()]);
        let Some(TopicState::Partitions(parts)) = map.topics.get("t") else {
            panic!("topic missing")
        };
        assert_eq!(parts.len(), 3);
        assert!(matches!(map.route("t", 0), Route::Leader(ref b, 4) if b.addr() == "h:9092"));
        // Slots the answer did not fill have no leader.
        assert_eq!(map.route("t", 1), Route::Error(5));
        assert_eq!(map.route("t", 3), Route::NoSuchPartition { partitions: 3 });
        assert_eq!(map.route("u", 0), Route::Unknown);
        assert_eq!(map.generation, 1);
    }
}
