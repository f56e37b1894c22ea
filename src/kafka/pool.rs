//! Connections to leaders: `connections_per_leader` pipelined connections per broker, each
//! with the Produce queue in front of it ([`Leader`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, Weak, atomic::Ordering},
};

use tokio::time::{Duration, Instant};
use tracing::{debug, info, info_span, warn};

pub use super::coalesce::QueueSettings;
use super::{
    coalesce::Coalescer,
    connect,
    connection::{ConnStats, Connection, ConnectionConfig},
    error::{ConnError, chain},
    metadata::Broker,
    stall::{Suspects, jittered_backoff},
};

/// How often a new connection's dial checks whether the slot's earlier connection still has
/// requests in flight (see `Pool::await_earlier`).
const EARLIER_POLL: Duration = Duration::from_millis(5);

/// A leader connection and its coalescing Produce queue. Cheap to clone.
#[derive(Clone)]
pub struct Leader {
    /// The connection: for requests sent one by one (InitProducerId), and to poison it.
    pub conn: Arc<Connection>,
    /// The queue Produce batches go through (see [`super::coalesce`]).
    pub produce: Arc<Coalescer>,
}

/// One connection slot: broker id and index among that broker's connections.
pub struct Slot {
    /// Broker id.
    pub broker_id: i32,
    /// Index among the broker's `connections_per_leader` connections.
    pub index: usize,
    /// Counters, kept across reconnects.
    pub stats: Arc<ConnStats>,
    current: Mutex<Option<(Leader, String)>>,
    /// Connections taken out of service by a drain, shown until they close.
    retired: Mutex<Vec<(Weak<Connection>, String)>>,
    /// The last failed connect: until `retry_at`, requests fail at once with its cause instead
    /// of dialling again (jittered exponential backoff per slot).
    failed: Mutex<Option<Failed>>,
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    /// The slot's current connection (in any state) and its address.
    pub fn current(&self) -> Option<(Arc<Connection>, String)> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(l, a)| (l.conn.clone(), a.clone()))
    }

    /// Connections of this slot that are draining now.
    pub fn draining(&self) -> Vec<(Arc<Connection>, String)> {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|(w, _)| w.upgrade().is_some_and(|c| c.poisoned().is_none()));
        retired
            .iter()
            .filter_map(|(w, a)| w.upgrade().map(|c| (c, a.clone())))
            .collect()
    }

    fn healthy_for(&self, broker: &Broker) -> Option<Leader> {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        cur.as_ref()
            .filter(|(l, a)| {
                broker.is_at(a) && l.conn.poisoned().is_none() && !l.conn.due_for_renewal()
            })
            .map(|(l, _)| l.clone())
    }

    /// Takes the current connection out of service if `retire` says so: it takes no new
    /// requests, finishes the ones in flight, then closes. Returns the requests it had
    /// awaiting answers, or `None` if nothing was retired.
    fn retire_current(&self, retire: impl Fn(&Connection) -> bool) -> Option<usize> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if !cur
            .as_ref()
            .is_some_and(|(l, _)| l.conn.poisoned().is_none() && retire(&l.conn))
        {
            return None;
        }
        let (Leader { conn, .. }, addr) = cur.take()?;
        drop(cur);
        let in_flight = conn.pending();
        conn.drain();
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|(w, _)| w.upgrade().is_some_and(|c| c.poisoned().is_none()));
        retired.push((Arc::downgrade(&conn), addr));
        Some(in_flight)
    }
}

#[derive(Clone)]
struct Failed {
    retry_at: Instant,
    cause: ConnError,
    attempts: u32,
}

/// The slots of a pool, by broker id and index.
type Slots = Mutex<HashMap<(i32, usize), Arc<Slot>>>;

/// The pool of leader connections.
pub struct Pool {
    config: ConnectionConfig,
    /// Each Produce queue's settings (see [`Coalescer`]).
    queue: QueueSettings,
    backoff: (Duration, Duration),
    slots: Arc<Slots>,
    /// Brokers not dialled now because they stopped answering (see [`super::stall`]).
    suspects: Arc<Suspects>,
    /// The stall watchdog ([`watch`]), started with the first connection when
    /// `stall_timeout` is not zero; it ends on its own once the pool is gone.
    watchdog: OnceLock<()>,
}

impl Pool {
    /// An empty pool; connections open on first use, each with a Produce queue of these
    /// settings. After a failed connect, a slot waits `backoff.0`, doubling per further
    /// failure up to `backoff.1`, each wait jittered to 50–100%, before dialling again. A
    /// broker whose dial timed out, or that stalled, goes into `suspects` instead: it is not
    /// dialled again until it answers a probe (see [`super::stall`]).
    pub fn new(
        config: ConnectionConfig,
        queue: QueueSettings,
        backoff: (Duration, Duration),
        suspects: Arc<Suspects>,
    ) -> Self {
        Self {
            config,
            queue,
            backoff,
            slots: Arc::new(Mutex::new(HashMap::new())),
            suspects,
            watchdog: OnceLock::new(),
        }
    }

    /// Starts the stall watchdog once (needs the runtime, hence not in [`Pool::new`]).
    fn start_watchdog(&self) {
        let stall = self.config.stall_timeout;
        if stall.is_zero() {
            return;
        }
        self.watchdog.get_or_init(|| {
            tokio::spawn(watch(
                Arc::downgrade(&self.slots),
                self.suspects.clone(),
                stall,
            ));
        });
    }

    fn slot(&self, broker_id: i32, index: usize) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry((broker_id, index))
            .or_insert_with(|| {
                Arc::new(Slot {
                    broker_id,
                    index,
                    stats: Arc::new(ConnStats::default()),
                    current: Mutex::new(None),
                    retired: Mutex::new(Vec::new()),
                    failed: Mutex::new(None),
                    connecting: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// A healthy connection to `broker`, slot `index`, opened (and negotiated) if needed, with
    /// its Produce queue.
    ///
    /// A poisoned connection is replaced here; since only poisoned connections are replaced, a
    /// stale failure can never tear down a fresh connection.
    pub async fn get(
        &self,
        broker: &Broker,
        index: usize,
        deadline: Instant,
    ) -> Result<Leader, ConnError> {
        let slot = self.slot(broker.id, index);
        if let Some(c) = slot.healthy_for(broker) {
            return Ok(c);
        }
        let addr = broker.addr();
        if let Some(cause) = self.suspects.refuse(&addr) {
            return Err(cause);
        }
        self.start_watchdog();
        // One dialer per slot; the others wait for its result, but never past their deadline.
        let Ok(_one_dialer) = tokio::time::timeout_at(deadline, slot.connecting.lock()).await
        else {
            return Err(ConnError::ConnectTimeout {
                addr,
                after: Duration::ZERO,
            });
        };
        if let Some(c) = slot.healthy_for(broker) {
            return Ok(c);
        }
        // The dial this one waited for may have found the broker silent.
        if let Some(cause) = self.suspects.refuse(&addr) {
            return Err(cause);
        }
        // A connection whose SASL session nears its end is replaced before the broker closes
        // it (see `Connection::due_for_renewal`); the wait below keeps the partitions' order
        // across the change.
        if let Some(in_flight) = slot.retire_current(Connection::due_for_renewal) {
            info!(
                broker = broker.id,
                index, in_flight, "renewing a leader connection before its SASL session ends"
            );
        }
        Self::await_earlier(&slot, &addr, deadline).await?;
        let failed = slot
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = &failed
            && Instant::now() < f.retry_at
        {
            return Err(f.cause.clone());
        }
        // A root span: the connection outlives the call that opened it (a child span would
        // keep that call's span open as long as the connection lives).
        let span = info_span!(
            target: crate::telemetry::TASK_TARGET,
            parent: None,
            "leader_conn",
            broker = broker.id,
            index,
            addr = %addr
        );
        let conn = match connect(&addr, &self.config, slot.stats.clone(), deadline, span).await {
            Ok(c) => c,
            // A dial cut short by this caller's own deadline says nothing about the broker: it
            // is not remembered, so a caller with more time left dials again instead of taking
            // over a failure that was only this caller running out of time.
            Err(cause) if Instant::now() >= deadline => return Err(cause),
            // A broker that accepts no connection in time, or does not answer one, would make
            // every call that dials it wait as long again: it is suspect until a probe gets
            // through (the warning is logged there).
            Err(
                cause @ (ConnError::ConnectTimeout { .. } | ConnError::HandshakeTimeout { .. }),
            ) => {
                self.suspects.mark(&addr, cause.clone());
                return Err(cause);
            }
            Err(cause) => {
                let attempts = failed.map_or(1, |f| f.attempts.saturating_add(1));
                let (base, max) = self.backoff;
                let wait = jittered_backoff(base, max, attempts);
                // At most once per backoff per slot: the calls that meanwhile find the slot
                // failed are answered with this cause without a dial.
                warn!(
                    broker = broker.id,
                    index,
                    %addr,
                    cause = %chain(&cause),
                    retry_in = ?wait,
                    "cannot open a leader connection"
                );
                *slot.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Failed {
                    retry_at: Instant::now() + wait,
                    cause: cause.clone(),
                    attempts,
                });
                return Err(cause);
            }
        };
        *slot.failed.lock().unwrap_or_else(|p| p.into_inner()) = None;
        slot.stats.connects.fetch_add(1, Ordering::Relaxed);
        let leader = Leader {
            produce: Arc::new(Coalescer::new(&conn, self.queue)),
            conn,
        };
        *slot.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((leader.clone(), addr));
        Ok(leader)
    }

    /// Waits, within `deadline`, until the slot's earlier connections (drained, or to the
    /// broker's previous address) have no request awaiting an answer. A partition must not
    /// change connection while it has requests in flight on the old one (docs/design.md
    /// §3.17): the broker handles each connection on its own, so a request on the new one could
    /// be appended before them. Drains and address changes are rare, so the wait polls every
    /// [`EARLIER_POLL`] instead of keeping a notification on every connection.
    async fn await_earlier(slot: &Slot, addr: &str, deadline: Instant) -> Result<(), ConnError> {
        let mut earlier: Vec<Arc<Connection>> =
            slot.draining().into_iter().map(|(c, _)| c).collect();
        if let Some((c, a)) = slot.current()
            && a != addr
        {
            earlier.push(c);
        }
        loop {
            let waiting: usize = earlier
                .iter()
                .filter(|c| c.poisoned().is_none())
                .map(|c| c.pending())
                .sum();
            if waiting == 0 {
                return Ok(());
            }
            if Instant::now() + EARLIER_POLL > deadline {
                return Err(ConnError::EarlierInFlight { waiting });
            }
            tokio::time::sleep(EARLIER_POLL).await;
        }
    }

    /// Drains every connection to `broker_id`: they take no new requests, finish the ones in
    /// flight, then close; the next request for the broker opens a new connection. Returns the
    /// connections drained and the requests they had awaiting answers.
    pub fn drain(&self, broker_id: i32) -> (usize, usize) {
        let (mut drained, mut in_flight) = (0, 0);
        for slot in self
            .slots()
            .into_iter()
            .filter(|s| s.broker_id == broker_id)
        {
            if let Some(n) = slot.retire_current(|_| true) {
                in_flight += n;
                drained += 1;
            }
        }
        (drained, in_flight)
    }

    /// The brokers not dialled now because they stopped answering.
    pub fn suspects(&self) -> &Suspects {
        &self.suspects
    }

    /// Requests written to leaders so far over every slot's connections (the slots' `sent`).
    pub fn requests_sent(&self) -> u64 {
        self.slots()
            .iter()
            .map(|s| s.stats.sent.load(Ordering::Relaxed))
            .sum()
    }

    /// Record batches written to leaders so far over every slot's connections, and the records
    /// in them (the slots' `batches` and `records`): their ratio is how many records a leader
    /// batch held on average.
    pub fn batches_sent(&self) -> (u64, u64) {
        self.slots().iter().fold((0, 0), |(b, r), s| {
            (
                b + s.stats.batches.load(Ordering::Relaxed),
                r + s.stats.records.load(Ordering::Relaxed),
            )
        })
    }

    /// Bytes of the Produce requests written to leaders so far over every slot's connections
    /// (the slots' `produce_bytes`).
    pub fn produce_bytes_sent(&self) -> u64 {
        self.slots()
            .iter()
            .map(|s| s.stats.produce_bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Every slot opened so far, sorted by broker and index.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = slots.values().cloned().collect();
        v.sort_by_key(|s| (s.broker_id, s.index));
        v
    }
}

/// The pool's watchdog: every quarter of `stall` (at least 10 ms), finds the leader connections
/// whose oldest request has waited longer than `stall` for its answer and checks their brokers
/// (see [`super::stall`]). Ends when the pool is gone.
async fn watch(slots: Weak<Slots>, suspects: Arc<Suspects>, stall: Duration) {
    let tick = (stall / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(tick).await;
        let Some(live) = slots.upgrade() else { return };
        let now = Instant::now();
        let mut overdue: HashMap<String, Duration> = HashMap::new();
        for slot in live.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let Some((conn, addr)) = slot.current() else {
                continue;
            };
            if conn.poisoned().is_some() {
                continue;
            }
            if let Some(sent) = conn.oldest_unanswered() {
                let age = now.saturating_duration_since(sent);
                if age >= stall {
                    let e = overdue.entry(addr).or_default();
                    *e = (*e).max(age);
                }
            }
        }
        drop(live);
        for (addr, age) in overdue {
            if suspects.begin_check(&addr) {
                tokio::spawn(check(slots.clone(), suspects.clone(), addr, age, stall));
            }
        }
    }
}

/// Checks `addr`, whose oldest request has waited `age`, over a new connection: if it is set
/// up the broker is only slow (no check again for `stall`); if not, the broker is stalled.
async fn check(
    slots: Weak<Slots>,
    suspects: Arc<Suspects>,
    addr: String,
    age: Duration,
    stall: Duration,
) {
    match suspects.dial(&addr).await {
        Ok(()) => {
            debug!(
                %addr,
                oldest = ?age,
                "a request has waited long for its answer, but the broker answers a new \
                 connection: slow, not stalled"
            );
            suspects.passed_check(&addr, stall);
        }
        Err(dial) => {
            let cause = ConnError::Stalled {
                addr: addr.clone(),
                after: age,
            };
            debug!(%addr, cause = %chain(&dial), "stall check: the new connection failed");
            suspects.mark(&addr, cause.clone());
            let Some(live) = slots.upgrade() else { return };
            let slots: Vec<_> = live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            for slot in slots {
                for (conn, a) in slot.current().into_iter().chain(slot.draining()) {
                    if a == addr {
                        conn.poison(cause.clone());
                    }
                }
            }
        }
    }
}
