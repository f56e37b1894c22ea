//! The explicit state of one call: each partition's batch through its attempts
//! ([`ItemState`]), the call's own ([`Call`]), and what a round leaves for the next
//! ([`Round`]). The phases that move it along live in `run.rs` (metadata, route, dial,
//! retry), `submit.rs` (admit, stamp, queue) and `judge.rs` (await, judge).

use std::{collections::HashMap, sync::Arc};

use tokio::{sync::oneshot, time::Instant};

use super::{
    Forwarder, GateHold,
    idempotence::{Open, Stamp, Stamper, Tp, Turn},
    ledger::Ledger,
    validate::Validated,
};
use crate::{
    kafka::{coalesce::Ticket, connection::Connection, error::ConnError, metadata::Broker},
    proto::v1::PartitionResult,
    telemetry::SendSpan,
};

/// Why a partition's last attempt failed (reported if the deadline passes).
#[derive(Debug, Clone)]
pub(super) enum Failure {
    Kafka { code: i16, message: Option<String> },
    Conn { cause: ConnError, connecting: bool },
}

/// One partition's batch through the call.
#[derive(Debug, Default)]
pub(super) struct ItemState {
    pub(super) result: Option<PartitionResult>,
    pub(super) attempts: u32,
    pub(super) last: Option<Failure>,
    /// An earlier attempt may have been appended although it did not succeed.
    pub(super) may_be_in_log: bool,
    /// The batch was sent again after such an attempt.
    pub(super) possibly_duplicated: bool,
    /// A connection bound refused the batch.
    pub(super) overloaded: Option<ConnError>,
    /// Refreshed metadata rounds that still did not know the topic.
    pub(super) unknown_rounds: u32,
    /// Together with the call's other batches for its leader, the batch exceeded the leader
    /// connection's byte budget: it goes in a request of its own.
    pub(super) alone: bool,
    /// The idempotent producer's stamp on the batch, kept with its bytes for retries.
    pub(super) stamp: Option<Stamp>,
    /// The leader refused a record batch this one shared with other calls' as too large: it
    /// goes in a record batch of its own.
    pub(super) unmerged: bool,
}

/// The state of one call across its rounds.
pub(super) struct Call<'a> {
    pub(super) fwd: &'a Forwarder,
    pub(super) v: Validated,
    pub(super) deadline: Instant,
    /// Batches with a producer id this call has handed to a leader and not yet settled;
    /// whatever ends the call (its deadline, a cancel) settles the rest as given up. Declared
    /// before `gates`, so it drops first: a given-up batch is settled (its partition's next
    /// stamp takes a new epoch) before the gate lets another call of the partition in.
    pub(super) ledger: Ledger,
    /// The call's permits of its partitions' gates (see `Forwarder::enter_gates`).
    pub(super) gates: HashMap<(String, i32), GateHold>,
    /// Per item of `v`.
    pub(super) st: Vec<ItemState>,
    /// The next round refreshes metadata first.
    pub(super) refresh: bool,
    /// Some round has refreshed metadata.
    pub(super) refreshed: bool,
    /// The first broker that refused leaderlink's credentials or certificate, and why.
    pub(super) refused: Option<(Broker, ConnError)>,
    /// Signalled once every partition's first attempt is queued (see `Forwarder::forward`).
    pub(super) enqueued: Option<oneshot::Sender<()>>,
}

/// What one round decides about the batches it did not finish.
#[derive(Default)]
pub(super) struct Round {
    /// Failed: sent again after a backoff.
    pub(super) retry: Vec<usize>,
    /// Sent again at once: gated batches behind an earlier one of their partition (strict
    /// mode, or idempotent ones: one per partition per round), and batches that go alone.
    pub(super) deferred: Vec<usize>,
    /// Batches with a producer id held back by the turn rule (see `ledger::turn_of`).
    pub(super) turn_wait: Vec<usize>,
    /// Requests queued on leader connections, awaited by the judge phase.
    pub(super) waits: Vec<Wait>,
    /// A leader was refused as suspect ([`ConnError::Avoided`]): the backoff does not grow, so
    /// that the call sees the cluster's new leader soon after it is elected.
    pub(super) avoided: bool,
}

/// A request queued on a leader connection, for the await phase: the connection, the leader's
/// id, the items it carries, its ticket, and the span that follows it.
pub(super) type Wait = (Arc<Connection>, i32, Vec<usize>, Ticket, SendSpan);

impl<'a> Call<'a> {
    /// A call's state before its first round.
    pub(super) fn new(
        fwd: &'a Forwarder,
        v: Validated,
        deadline: Instant,
        gates: HashMap<(String, i32), GateHold>,
        enqueued: Option<oneshot::Sender<()>>,
    ) -> Self {
        let st = (0..v.items.len()).map(|_| ItemState::default()).collect();
        Self {
            ledger: Ledger::new(fwd.inner.producer.clone()),
            fwd,
            v,
            deadline,
            gates,
            st,
            refresh: false,
            refreshed: false,
            refused: None,
            enqueued,
        }
    }
}

/// Item `i`'s partition.
pub(super) fn tp_of(v: &Validated, i: usize) -> Tp {
    (v.items[i].topic.clone(), v.items[i].partition)
}

/// Item `i`'s batch for the turn rule (see [`Turn`]): `None` for a batch without a producer id;
/// `new` when leaderlink stamps it now.
pub(super) fn turn_of(v: &Validated, i: usize, s: &ItemState, new: bool) -> Option<Turn> {
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
pub(super) fn mark_on_wire(
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

pub(super) fn open_of(stamp: &Stamp) -> Open {
    Open {
        producer_id: stamp.identity.producer_id,
        epoch: stamp.identity.epoch,
        base_sequence: stamp.base_sequence,
    }
}

/// Awaits `f` of every item, in order. A round mostly has one (one leader, one request): that
/// one is awaited directly, without `join_all`'s allocations.
pub(super) async fn join_each<T, F: std::future::Future>(
    items: impl ExactSizeIterator<Item = T>,
    f: impl Fn(T) -> F,
) -> Vec<F::Output> {
    let mut items = items;
    if items.len() == 1 {
        let one = items.next().expect("one item");
        return vec![f(one).await];
    }
    futures::future::join_all(items.map(f)).await
}
