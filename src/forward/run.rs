//! The phases of a round that are not about one request: metadata, route, dial and retry, and
//! the loop that runs the rounds ([`Call::run`]):
//!
//! 1. **metadata**: refresh the leader map when the last round asked for it;
//! 2. **route**: each pending batch to its leader connection, or to its final error;
//! 3. **dial**: every leader at once;
//! 4. **submit**: admit (turn rule), stamp and queue each request (`submit.rs`);
//! 5. **await** and **judge** each answer (`judge.rs`);
//! 6. **retry**: settle, then back off or wait for a turn.

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use opentelemetry::KeyValue;
use tokio::time::Instant;
use tracing::debug;

use super::{
    ForwardError, PartitionOrder,
    call::{Call, Failure, Round, join_each, tp_of, turn_of},
    errors::{
        NETWORK_EXCEPTION, SASL_AUTHENTICATION_FAILED, UNKNOWN_TOPIC_OR_PARTITION, retriable,
    },
    idempotence::{Tp, Turn},
    judge,
    report::{error_result, expired, is_connect_failure, overloaded},
    validate::CHOOSE_PARTITION,
};
use crate::{
    kafka::{
        error::{ConnError, chain},
        metadata::{Broker, Route},
        pool::Leader,
    },
    proto::v1::ForwardResponse,
    telemetry,
};

/// A leader's batches of this round.
type Group = (Broker, Vec<usize>);

impl Call<'_> {
    /// Runs the rounds until every partition has its result or the deadline passes.
    pub(super) async fn run(mut self) -> Result<ForwardResponse, ForwardError> {
        let mut pending: Vec<usize> = (0..self.v.items.len()).collect();
        let mut backoff = self.fwd.inner.cfg.retry_backoff;
        let mut first = true;
        loop {
            self.metadata(first, &pending).await?;
            first = false;
            let mut r = Round::default();
            let groups = self.route(&pending, &mut r);
            for (broker, items, leader) in self.dial(groups).await {
                match leader {
                    Ok(leader) => self.submit(&leader, &broker, items, &mut r).await,
                    Err(cause) => self.dial_failed(broker, items, cause, &mut r),
                }
            }
            // The caller may read its next request once this one's batches are all on their
            // connections (or final): only then does wire order follow arrival order.
            if self.enqueued.is_some()
                && self.st.iter().all(|s| s.attempts > 0 || s.result.is_some())
            {
                let _ = self.enqueued.take().map(|tx| tx.send(()));
            }
            let waits = std::mem::take(&mut r.waits);
            for answer in judge::await_answers(waits, self.deadline).await {
                self.judge(answer, &mut r);
            }
            match self.next_round(r, &mut backoff).await? {
                Some(next) => pending = next,
                None => return self.finish(),
            }
        }
    }

    /// Metadata phase: fetches metadata when the last round asked for it or when a pending
    /// topic is not in the map yet.
    async fn metadata(&mut self, first: bool, pending: &[usize]) -> Result<(), ForwardError> {
        let deadline = self.deadline;
        match self
            .fwd
            .ensure_metadata(&self.v, pending, self.refresh, deadline)
            .await
        {
            Ok(r) => self.refreshed |= r,
            // Nothing was sent yet and no broker answers: say so now rather than spinning
            // until the deadline.
            Err(cause) if first && Instant::now() < deadline => {
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
                for &i in pending {
                    if !(out_of_time && self.st[i].last.is_some()) {
                        self.st[i].last = Some(Failure::Conn {
                            connecting: is_connect_failure(&cause),
                            cause: cause.clone(),
                        });
                    }
                }
            }
        }
        self.refresh = false;
        Ok(())
    }

    /// Route phase: groups the pending batches by leader connection. A batch whose route is
    /// final (an unknown topic confirmed, a metadata error that is not retriable) gets its
    /// result; one whose route is not known yet is retried after a refresh.
    fn route(&mut self, pending: &[usize], r: &mut Round) -> BTreeMap<(i32, usize), Group> {
        let strict = self.fwd.inner.cfg.ordering == PartitionOrder::Strict;
        let map = self.fwd.inner.metadata.leader_map();
        let v = &self.v;
        let mut gated_seen: HashSet<(&str, i32)> = HashSet::new();
        let mut groups: BTreeMap<(i32, usize), Group> = BTreeMap::new();
        for &i in pending {
            let it = &v.items[i];
            if (strict || self.fwd.gated(v, it))
                && !gated_seen.insert((it.topic.as_str(), it.partition))
            {
                r.deferred.push(i);
                continue;
            }
            let s = &mut self.st[i];
            if it.partition == CHOOSE_PARTITION {
                // `Forwarder::choose_partitions` could not learn the topic's partition count.
                let (code, why) = match map.route(&it.topic, 0) {
                    Route::Error(code) => {
                        (code, "the cluster's metadata reports this error for it")
                    }
                    _ => (
                        UNKNOWN_TOPIC_OR_PARTITION,
                        "the cluster's metadata does not know it",
                    ),
                };
                s.result = Some(error_result(
                    it,
                    code,
                    format!(
                        "partition -1: leaderlink chooses the partition from the topic's \
                         partition count, which it could not learn: {why}"
                    ),
                    -1,
                    s,
                ));
                continue;
            }
            let fail = |code: i16, msg: &str| Failure::Kafka {
                code,
                message: Some(msg.to_string()),
            };
            match map.route(&it.topic, it.partition) {
                Route::Leader(b, _epoch) => {
                    let key = (b.id, self.fwd.conn_index(&it.topic, it.partition));
                    groups
                        .entry(key)
                        .or_insert_with(|| (b, Vec::new()))
                        .1
                        .push(i);
                }
                Route::Unknown => {
                    s.last = Some(fail(
                        UNKNOWN_TOPIC_OR_PARTITION,
                        "topic not in the leader map yet",
                    ));
                    self.refresh = true;
                    r.retry.push(i);
                }
                // An unknown topic is final once a refresh confirmed it — after a few
                // rounds when the broker may be creating it on our request.
                Route::Error(UNKNOWN_TOPIC_OR_PARTITION)
                    if self.refreshed && s.unknown_rounds >= self.fwd.unknown_topic_rounds() =>
                {
                    s.result = Some(error_result(
                        it,
                        UNKNOWN_TOPIC_OR_PARTITION,
                        "the cluster's metadata does not know this topic".into(),
                        -1,
                        s,
                    ));
                }
                Route::Error(UNKNOWN_TOPIC_OR_PARTITION) => {
                    s.unknown_rounds += u32::from(self.refreshed);
                    s.last = Some(fail(
                        UNKNOWN_TOPIC_OR_PARTITION,
                        "the cluster's metadata does not know this topic",
                    ));
                    self.refresh = true;
                    r.retry.push(i);
                }
                Route::Error(code) if !retriable(code) => {
                    s.result = Some(error_result(
                        it,
                        code,
                        "the cluster's metadata reports this error for the topic or partition"
                            .into(),
                        -1,
                        s,
                    ));
                }
                Route::Error(code) => {
                    s.last = Some(fail(code, "metadata reports no usable leader"));
                    self.refresh = true;
                    r.retry.push(i);
                }
                Route::NoSuchPartition { partitions } if self.refreshed => {
                    s.result = Some(error_result(
                        it,
                        UNKNOWN_TOPIC_OR_PARTITION,
                        format!("topic {} has {partitions} partitions", it.topic),
                        -1,
                        s,
                    ));
                }
                Route::NoSuchPartition { .. } => {
                    self.refresh = true;
                    r.retry.push(i);
                }
            }
        }
        groups
    }

    /// Dial phase: a connection to every leader of the round, all at once (one slow or dead
    /// leader must not use up the time of the others).
    async fn dial(
        &self,
        groups: BTreeMap<(i32, usize), Group>,
    ) -> Vec<(Broker, Vec<usize>, Result<Leader, ConnError>)> {
        let pool = &self.fwd.inner.pool;
        let deadline = self.deadline;
        let one = |((_, index), (broker, items)): ((i32, usize), Group)| async move {
            let conn = pool.get(&broker, index, deadline).await;
            (broker, items, conn)
        };
        join_each(groups.into_iter(), one).await
    }

    /// A leader of the round could not be dialled: its batches are retried, or answered if it
    /// refuses leaderlink's credentials or certificate.
    fn dial_failed(&mut self, broker: Broker, items: Vec<usize>, cause: ConnError, r: &mut Round) {
        match cause {
            // A broker that refuses leaderlink's credentials or certificate will do so
            // again: its partitions are answered now instead of retried until the
            // deadline, and the call's other partitions go on (some may be written
            // already). If nothing of the call was ever sent, the call as a whole is
            // UNAVAILABLE (see `finish`; docs/design.md §3.19).
            cause @ (ConnError::Auth { .. } | ConnError::Tls { .. }) => {
                let (code, what) = match cause {
                    ConnError::Auth { .. } => (SASL_AUTHENTICATION_FAILED, "SASL"),
                    _ => (NETWORK_EXCEPTION, "TLS"),
                };
                for i in items {
                    self.st[i].result = Some(error_result(
                        &self.v.items[i],
                        code,
                        format!(
                            "broker {} ({}) refused the connection ({what}): {}",
                            broker.id,
                            broker.addr(),
                            chain(&cause)
                        ),
                        broker.id,
                        &self.st[i],
                    ));
                }
                self.refused.get_or_insert((broker, cause));
            }
            cause => {
                debug!(broker = broker.id, cause = %cause, "leader connection failed");
                telemetry::call_event("leader connection failed", || {
                    vec![
                        KeyValue::new("leaderlink.leader_id", i64::from(broker.id)),
                        KeyValue::new("error.message", chain(&cause)),
                    ]
                });
                r.avoided |= matches!(cause, ConnError::Avoided { .. });
                let out_of_time = Instant::now() >= self.deadline;
                for i in items {
                    // A dial cut short by the call's own deadline says nothing new: the
                    // earlier cause stays the one reported.
                    if !(out_of_time && self.st[i].last.is_some()) {
                        self.st[i].last = Some(Failure::Conn {
                            cause: cause.clone(),
                            connecting: true,
                        });
                    }
                    r.retry.push(i);
                }
                self.refresh = true;
            }
        }
    }

    /// Retry phase: settles what has its final answer, then returns the batches for the next
    /// round (`None` when there are none) after a backoff if any failed, or once one of them
    /// has its turn if they only wait behind earlier ones. Ends the call when a connection
    /// bound refused a batch or the deadline passed.
    async fn next_round(
        &mut self,
        r: Round,
        backoff: &mut Duration,
    ) -> Result<Option<Vec<usize>>, ForwardError> {
        let Round {
            mut retry,
            deferred,
            turn_wait,
            avoided,
            ..
        } = r;
        for (i, s) in self.st.iter().enumerate() {
            if let Some(r) = &s.result {
                self.ledger.settle(i, r.error_code == 0);
            }
        }
        if let Some(cause) = self.st.iter().find_map(|s| s.overloaded.clone()) {
            return Err(overloaded(&self.v, &self.st, cause));
        }
        let failed = !retry.is_empty();
        // Batches waiting for their turn behind earlier ones of their partition.
        let turns: Vec<(Tp, Turn)> = turn_wait
            .iter()
            .filter_map(|&i| {
                let new = self.fwd.needs_stamp(&self.v, i, &self.st[i]);
                Some((tp_of(&self.v, i), turn_of(&self.v, i, &self.st[i], new)?))
            })
            .collect();
        retry.extend(turn_wait);
        retry.extend(deferred);
        retry.sort_unstable();
        let pending = retry;
        if pending.is_empty() {
            return Ok(None);
        }
        let deadline = self.deadline;
        let now = Instant::now();
        if now >= deadline {
            return Err(expired(&self.v, &self.st, &pending));
        }
        if !failed {
            // Only batches deferred behind an earlier one of their partition (or their
            // producer's sequence): go on once one of them can go.
            if !turns.is_empty() {
                self.fwd.inner.producer.wait_turn(&turns, deadline).await;
                if Instant::now() >= deadline {
                    return Err(expired(&self.v, &self.st, &pending));
                }
            }
            return Ok(Some(pending));
        }
        debug!(pending = pending.len(), ?backoff, "retrying partitions");
        telemetry::call_event("retrying partitions", || {
            vec![
                KeyValue::new("leaderlink.pending", pending.len() as i64),
                KeyValue::new(
                    "leaderlink.backoff_ms",
                    i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX),
                ),
            ]
        });
        tokio::time::sleep_until((now + *backoff).min(deadline)).await;
        // A round started with no time left would only fail at once (a dial with an expired
        // deadline, a refresh cut short) and bury the real cause under that failure.
        if Instant::now() >= deadline {
            return Err(expired(&self.v, &self.st, &pending));
        }
        if !avoided {
            *backoff = (*backoff * 2).min(self.fwd.inner.cfg.retry_backoff_max);
        }
        Ok(Some(pending))
    }

    /// The call's answer once every partition has its result.
    fn finish(self) -> Result<ForwardResponse, ForwardError> {
        // Refused by a broker, and not one batch of the call ever sent: nothing can be in a
        // log, and the cause concerns the whole service, not one partition.
        if let Some((broker, cause)) = self.refused
            && self.st.iter().all(|s| s.attempts == 0)
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
            id: self.v.id,
            partitions: self
                .st
                .into_iter()
                .map(|s| s.result.expect("every partition has a result"))
                .collect(),
            ..Default::default()
        })
    }
}
