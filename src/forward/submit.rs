//! The submit phase: a leader's batches of the round, split into requests; each request
//! admitted (a producer id, the turn rule), stamped, and queued on the leader connection's
//! coalescing queue, where concurrent calls' batches for other partitions of the leader may
//! share its Produce request.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
};

use super::{
    GateHold,
    call::{Call, Failure, Round, mark_on_wire, open_of, tp_of, turn_of},
    errors::retriable,
    idempotence::{Open, Stamper, Tp},
    report::{error_result, leader_span},
    validate::Validated,
};
use crate::kafka::{
    coalesce::{self, Ticket},
    connection::{Attachment, Connection},
    error::{ConnError, RequestError},
    metadata::Broker,
    pool::Leader,
    producer_id::InitProducerIdError,
    record_batch::Codec,
};
use crate::telemetry::SendSpan;

impl Call<'_> {
    /// Submit phase for one leader connection's batches of the round.
    pub(super) async fn submit(
        &mut self,
        leader: &Leader,
        broker: &Broker,
        items: Vec<usize>,
        r: &mut Round,
    ) {
        let chunks: Vec<Vec<usize>> = one_batch_per_partition(&self.v, items)
            .into_iter()
            .flat_map(|c| {
                let (alone, together): (Vec<usize>, Vec<usize>) =
                    c.into_iter().partition(|&i| self.st[i].alone);
                alone
                    .into_iter()
                    .map(|i| vec![i])
                    .chain((!together.is_empty()).then_some(together))
            })
            .collect();
        for chunk in chunks {
            self.submit_chunk(leader, broker, chunk, r).await;
        }
    }

    /// Admits, stamps and queues one request's batches.
    async fn submit_chunk(
        &mut self,
        leader: &Leader,
        broker: &Broker,
        mut chunk: Vec<usize>,
        r: &mut Round,
    ) {
        // Batches leaderlink stamps as the idempotent producer's: a producer identity first
        // (or a new epoch after a batch was given up).
        let mut to_stamp: Vec<usize> = chunk
            .iter()
            .copied()
            .filter(|&i| self.fwd.needs_stamp(&self.v, i, &self.st[i]))
            .collect();
        if !to_stamp.is_empty() && !self.producer_ready(&leader.conn, broker, &chunk, r).await {
            return;
        }
        let fwd = self.fwd;
        // Stamping and queueing under one lock: a partition's sequences reach its connection
        // in order.
        let mut stamper = fwd.inner.producer.stamper();
        self.admit(&mut stamper, &mut chunk, &to_stamp, r);
        if chunk.is_empty() {
            return;
        }
        to_stamp.retain(|i| chunk.contains(i));
        let stamped = self.stamp(&mut stamper, &to_stamp);
        for &i in &chunk {
            if let Some(open) = self.v.items[i].producer
                && !self.ledger.holds(i)
            {
                let tp = tp_of(&self.v, i);
                stamper.open_raw(&tp, open);
                self.ledger.hold(i, tp, open, None);
            }
        }
        let submitted = leader.produce.submit(self.request(&chunk));
        let went_on_wire =
            submitted.is_ok() && mark_on_wire(&mut stamper, &self.v, &self.st, &chunk);
        drop(stamper);
        if went_on_wire {
            fwd.inner.producer.turn_may_have_changed();
        }
        // The ledger settles replaced stamps, which takes the producer's lock.
        for (i, tp, open, generation) in stamped {
            self.ledger.hold(i, tp, open, Some(generation));
        }
        self.submitted(submitted, &leader.conn, broker, chunk, r);
    }

    /// Makes sure the idempotent producer has an identity before `chunk` is stamped. If it
    /// cannot get one, the chunk is retried, sent again without a producer id (a broker
    /// without InitProducerId), or answered, and `false` is returned.
    async fn producer_ready(
        &mut self,
        conn: &Arc<Connection>,
        broker: &Broker,
        chunk: &[usize],
        r: &mut Round,
    ) -> bool {
        let producer = &self.fwd.inner.producer;
        if !producer.needs_init() {
            return true;
        }
        let Err(e) = producer.ready(conn, self.deadline).await else {
            return true;
        };
        match e {
            InitProducerIdError::Conn(cause) => {
                self.refresh |= !matches!(cause, ConnError::NotSentInTime);
                self.not_sent(r, chunk, cause);
            }
            InitProducerIdError::Unsupported => {
                // Sent again at once, without a producer id.
                producer.disable();
                r.deferred.extend(chunk.iter().copied());
            }
            InitProducerIdError::Kafka { code } if retriable(code) => {
                for &i in chunk {
                    self.st[i].last = Some(Failure::Kafka {
                        code,
                        message: Some("InitProducerId failed".into()),
                    });
                    r.retry.push(i);
                }
            }
            e @ InitProducerIdError::Kafka { code } => {
                for &i in chunk {
                    self.st[i].result = Some(error_result(
                        &self.v.items[i],
                        code,
                        format!("no idempotent producer id: {e}"),
                        broker.id,
                        &self.st[i],
                    ));
                }
            }
        }
        false
    }

    /// Admission by the turn rule (docs/design.md §3.16): a batch with a producer id waits
    /// while an earlier one of its partition waits for a retry, and, as a retry itself, until
    /// every earlier one is appended. Those waiting leave `chunk` for `r.turn_wait`.
    fn admit(
        &self,
        stamper: &mut Stamper<'_>,
        chunk: &mut Vec<usize>,
        to_stamp: &[usize],
        r: &mut Round,
    ) {
        chunk.retain(|&i| {
            let turn = turn_of(&self.v, i, &self.st[i], to_stamp.contains(&i));
            let go = turn.is_none_or(|t| stamper.has_turn(&tp_of(&self.v, i), t));
            if !go {
                r.turn_wait.push(i);
            }
            go
        });
    }

    /// Stamps the batches of `to_stamp` with the producer's identity and their sequences.
    /// Returns them for the ledger, which takes them once the stamper's lock is released.
    fn stamp(
        &mut self,
        stamper: &mut Stamper<'_>,
        to_stamp: &[usize],
    ) -> Vec<(usize, Tp, Open, u64)> {
        let mut stamped = Vec::with_capacity(to_stamp.len());
        for &i in to_stamp {
            let it = &self.v.items[i];
            let tp = tp_of(&self.v, i);
            let Some(stamp) = stamper.stamp(&tp, &it.batch, it.records) else {
                continue;
            };
            let s = &mut self.st[i];
            // Stamped anew after an earlier attempt under an old epoch: the broker cannot
            // tell the two apart.
            if s.stamp.is_some() {
                s.possibly_duplicated |= s.may_be_in_log;
            }
            stamped.push((i, tp, open_of(&stamp), stamp.generation));
            s.stamp = Some(stamp);
        }
        stamped
    }

    /// The request for `chunk`, with the gate permits of its partitions (they go with it).
    fn request(&self, chunk: &[usize]) -> coalesce::Chunk {
        let v = &self.v;
        let holds: Vec<GateHold> = chunk
            .iter()
            .filter_map(|&i| self.gates.get(&tp_of(v, i)).cloned())
            .collect();
        coalesce::Chunk {
            acks: v.acks,
            timeout_ms: self.fwd.asked_timeout(v.timeout_ms),
            deadline: self.deadline,
            transactional_id: v.transactional_id.clone(),
            hold: (!holds.is_empty()).then(|| Box::new(holds) as Attachment),
            parts: chunk
                .iter()
                .map(|&i| coalesce::Part {
                    topic: v.items[i].topic.clone(),
                    partition: v.items[i].partition,
                    batch: self.st[i]
                        .stamp
                        .as_ref()
                        .map_or_else(|| v.items[i].batch.clone(), |s| s.batch.clone()),
                    merge: self.merges(i),
                    codec: if v.items[i].encoded {
                        v.codec.unwrap_or(self.fwd.inner.cfg.compression)
                    } else {
                        Codec::None
                    },
                })
                .collect(),
        }
    }

    /// Whether item `i`'s batch may share a record batch with other calls' batches for its
    /// partition (record accumulation, docs/design.md §3.20): leaderlink encoded it from
    /// records and sends it without producer id. Raw batches keep their bytes; stamped ones
    /// keep their own sequence range, which a retry must resend unchanged (§3.16).
    fn merges(&self, i: usize) -> bool {
        let (it, s) = (&self.v.items[i], &self.st[i]);
        it.encoded && it.producer.is_none() && s.stamp.is_none() && !s.unmerged
    }

    /// Counts the attempt of a queued request and hands it to the await phase, or records why
    /// it could not be queued.
    fn submitted(
        &mut self,
        submitted: Result<Ticket, RequestError>,
        conn: &Arc<Connection>,
        broker: &Broker,
        chunk: Vec<usize>,
        r: &mut Round,
    ) {
        match submitted {
            Ok(ticket) => {
                for &i in &chunk {
                    let s = &mut self.st[i];
                    if s.attempts > 0 {
                        self.fwd.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    s.attempts += 1;
                    // A batch with a producer id is sent again with the same bytes: the
                    // leader drops it if it has it already.
                    if !self.ledger.holds(i) {
                        s.possibly_duplicated |= s.may_be_in_log;
                    }
                }
                let span = self.span(&chunk, broker);
                r.waits.push((conn.clone(), broker.id, chunk, ticket, span));
            }
            Err(RequestError {
                cause: cause @ ConnError::QueueFull { .. },
                ..
            }) => {
                // A bound was hit: answer RESOURCE_EXHAUSTED rather than queue more.
                for &i in &chunk {
                    self.st[i].overloaded = Some(cause.clone());
                }
            }
            Err(e) => {
                self.refresh = true;
                self.not_sent(r, &chunk, e.cause);
            }
        }
    }

    /// The span of the request carrying `chunk`, on its first attempt or a retry.
    pub(super) fn span(&self, chunk: &[usize], broker: &Broker) -> SendSpan {
        let attempt = chunk.iter().map(|&i| self.st[i].attempts).max();
        leader_span(&self.v, chunk, broker, attempt.unwrap_or(1))
    }

    /// The chunk was not sent: it is retried, and `cause` becomes its last failure.
    fn not_sent(&mut self, r: &mut Round, chunk: &[usize], cause: ConnError) {
        for &i in chunk {
            let s = &mut self.st[i];
            // Running out of time before the write is no news when an earlier attempt
            // already failed for a reason.
            let artifact = matches!(cause, ConnError::NotSentInTime) && s.last.is_some();
            if !artifact {
                s.last = Some(Failure::Conn {
                    cause: cause.clone(),
                    connecting: false,
                });
            }
            r.retry.push(i);
        }
    }
}

/// Splits one leader connection's items into requests holding at most one batch per partition
/// (docs/design.md §3.10): the k-th batch for a partition goes into the k-th request, so
/// batches of one partition keep their order on the wire.
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
