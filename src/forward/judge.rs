//! The await and judge phases: wait for the round's requests, then decide each batch's fate
//! from its answer: a result, a retry (after a backoff, at once, or on its turn), or a
//! refreshed leader.

use std::sync::Arc;

use tokio::time::Instant;

use super::{
    call::{Call, Failure, Round, Wait, join_each},
    error_name,
    errors::{
        DUPLICATE_SEQUENCE_NUMBER, FENCED_LEADER_EPOCH, INVALID_PRODUCER_EPOCH, MESSAGE_TOO_LARGE,
        NOT_LEADER_OR_FOLLOWER, OUT_OF_ORDER_SEQUENCE_NUMBER, PRODUCER_FENCED,
        RECORD_LIST_TOO_LARGE, UNKNOWN_PRODUCER_ID, may_have_appended, needs_refresh, retriable,
    },
    report::{error_result, ok_result},
};
use crate::kafka::{
    coalesce::Placement,
    connection::Connection,
    error::{ConnError, RequestError, chain},
    metadata::Broker,
    produce::{Answers, PartitionAnswer},
};
use crate::{proto::v1::RecordError, telemetry::SendSpan};

/// A request's outcome: the answer (`None` for acks=0 once written), and where the chunk's
/// batches went in the request's record batches (per item of the chunk).
type Outcome = Result<(Option<Arc<Answers>>, Vec<Placement>), RequestError>;

/// [`Wait`] with its request's outcome.
pub(super) type Answered = (Arc<Connection>, i32, Vec<usize>, Outcome, SendSpan);

/// Await phase: every request of the round, until answered or the deadline.
pub(super) async fn await_answers(waits: Vec<Wait>, deadline: Instant) -> Vec<Answered> {
    let one = |(conn, broker, chunk, ticket, mut span): Wait| async move {
        let r = ticket
            .outcome(deadline, |sent| {
                span.set(
                    "leaderlink.correlation_id",
                    i64::from(sent.correlation_id()),
                );
                span.set("leaderlink.request_partitions", sent.partitions() as i64);
            })
            .await;
        (conn, broker, chunk, r, span)
    };
    join_each(waits.into_iter(), one).await
}

impl Call<'_> {
    /// Judge phase for one request.
    pub(super) fn judge(&mut self, answered: Answered, r: &mut Round) {
        // The span ends when this call has read the answer (it is dropped on return).
        let (conn, broker, chunk, outcome, mut span) = answered;
        // Whatever came back, the chunk's batches with a producer id are off the wire
        // until they are sent again (or settled below).
        for &i in &chunk {
            self.ledger.off_wire(i);
        }
        let (answers, placements) = match outcome {
            Ok((None, _)) => {
                // acks=0: done once written (docs/design.md §3.4).
                for i in chunk {
                    self.fwd.count_forwarded(&self.v.items[i]);
                    self.st[i].result =
                        Some(ok_result(&self.v.items[i], -1, -1, -1, broker, &self.st[i]));
                }
                return;
            }
            Ok((Some(answers), placements)) => (answers, placements),
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
                    self.st[i].attempts -= 1;
                    if alone {
                        self.st[i].result = Some(error_result(
                            &self.v.items[i],
                            MESSAGE_TOO_LARGE,
                            format!(
                                "the batch encodes to a Produce request of {actual} \
                                 bytes; the limit (max_in_flight_bytes_per_connection) \
                                 is {limit}"
                            ),
                            broker,
                            &self.st[i],
                        ));
                    } else {
                        self.st[i].alone = true;
                        r.deferred.push(i);
                    }
                }
                return;
            }
            Err(RequestError { cause, maybe_sent }) => {
                // The coalescer has poisoned the connection where the failure calls for
                // it; a request taken back unsent leaves it healthy.
                span.set("error.type", "connection");
                span.fail(|| chain(&cause));
                // Running out of time in the queue or while others still wait is no
                // news when an earlier attempt already failed for a reason.
                let deadline_artifact =
                    matches!(cause, ConnError::NotSentInTime | ConnError::AnswerLate);
                for i in chunk {
                    let s = &mut self.st[i];
                    s.may_be_in_log |= maybe_sent;
                    if !(deadline_artifact && s.last.is_some()) {
                        s.last = Some(Failure::Conn {
                            cause: cause.clone(),
                            connecting: false,
                        });
                    }
                    r.retry.push(i);
                }
                self.refresh |= !deadline_artifact;
                return;
            }
        };
        for (k, i) in chunk.into_iter().enumerate() {
            let it = &self.v.items[i];
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
                self.st[i].may_be_in_log = true;
                self.st[i].last = Some(Failure::Conn {
                    cause,
                    connecting: false,
                });
                r.retry.push(i);
                continue;
            };
            if a.error_code != 0 {
                // A request answers for several partitions; the span shows the first
                // error (each partition's is in its result).
                if span.is_recording() {
                    span.set("leaderlink.kafka_error_code", i64::from(a.error_code));
                    span.set("error.type", error_name(a.error_code));
                }
            }
            let placed = placements.get(k).copied().unwrap_or_default();
            self.judge_partition(i, a, placed, &answers.endpoints, broker, r);
        }
    }

    /// Judge phase for one partition's answer from leader `broker`, for the batch `placed` in
    /// the record batch the answer is about.
    fn judge_partition(
        &mut self,
        i: usize,
        mut a: PartitionAnswer,
        placed: Placement,
        endpoints: &[Broker],
        broker: i32,
        r: &mut Round,
    ) {
        let it = &self.v.items[i];
        let held = self.ledger.get(i);
        let producer = &self.fwd.inner.producer;
        let s = &mut self.st[i];
        // The answer is about the whole record batch: keep this batch's records' errors, by
        // their index in this batch (docs/design.md §3.20).
        let all_record_errors = !a.record_errors.is_empty();
        let own = placed.first..placed.first.saturating_add(placed.records);
        a.record_errors.retain(|(index, _)| own.contains(index));
        for (index, _) in &mut a.record_errors {
            *index -= placed.first;
        }
        if a.error_code == 0 || (a.error_code == DUPLICATE_SEQUENCE_NUMBER && held.is_some()) {
            // A duplicate sequence is a batch the leader already has (§3.16); its
            // offset is not in the answer.
            let dup = a.error_code != 0;
            self.fwd.count_forwarded(it);
            let base_offset = if dup || a.base_offset < 0 {
                -1
            } else {
                a.base_offset + i64::from(placed.first)
            };
            s.result = Some(ok_result(
                it,
                base_offset,
                a.log_append_time_ms,
                a.log_start_offset,
                broker,
                s,
            ));
        } else if let Some((tp, open, generation)) = held
            && a.error_code == OUT_OF_ORDER_SEQUENCE_NUMBER
            && producer.retry_out_of_order(&tp, open, generation)
        {
            // An earlier batch of the producer on this partition is still being
            // retried (or this stamp is replaced): retry behind it, when its turn
            // comes, without a backoff of its own.
            s.last = Some(Failure::Kafka {
                code: a.error_code,
                message: a.error_message,
            });
            r.turn_wait.push(i);
        } else if let Some(stamp) = &s.stamp
            && matches!(
                a.error_code,
                INVALID_PRODUCER_EPOCH
                    | UNKNOWN_PRODUCER_ID
                    | PRODUCER_FENCED
                    | OUT_OF_ORDER_SEQUENCE_NUMBER
            )
        {
            // leaderlink's own identity is stale: a new epoch, then a new stamp. For
            // OUT_OF_ORDER_SEQUENCE_NUMBER with nothing of the producer unfinished before this
            // batch (the branch above), the leader expects another sequence: it lost the
            // producer's state, or an earlier batch was acknowledged after this request left
            // (on another connection). Java's idempotent producer retries that too, under a
            // bumped epoch (`TransactionManager.canRetry`); docs/design.md §3.16.
            producer.fenced(stamp);
            s.last = Some(Failure::Kafka {
                code: a.error_code,
                message: a.error_message,
            });
            r.retry.push(i);
        } else if placed.shared
            && ((all_record_errors && a.record_errors.is_empty())
                || matches!(a.error_code, MESSAGE_TOO_LARGE | RECORD_LIST_TOO_LARGE))
        {
            // The leader refused the whole shared record batch (nothing of it is in the log)
            // for other calls' records, or as too large together: sent again at once, in a
            // batch of its own after a size refusal.
            s.unmerged |= matches!(a.error_code, MESSAGE_TOO_LARGE | RECORD_LIST_TOO_LARGE);
            s.last = Some(Failure::Kafka {
                code: a.error_code,
                message: a.error_message,
            });
            r.deferred.push(i);
        } else if retriable(a.error_code) {
            // KIP-951: a newer leader named in the answer saves a full refresh.
            let hinted = matches!(a.error_code, NOT_LEADER_OR_FOLLOWER | FENCED_LEADER_EPOCH)
                && a.current_leader.is_some_and(|(leader, epoch)| {
                    self.fwd.inner.metadata.apply_hint(
                        &it.topic,
                        it.partition,
                        leader,
                        epoch,
                        endpoints,
                    )
                });
            self.refresh |= needs_refresh(a.error_code) && !hinted;
            s.may_be_in_log |= may_have_appended(a.error_code, self.v.acks);
            s.last = Some(Failure::Kafka {
                code: a.error_code,
                message: a.error_message,
            });
            r.retry.push(i);
        } else {
            let mut res = error_result(
                it,
                a.error_code,
                with_record_errors(a.error_message, &a.record_errors),
                broker,
                s,
            );
            res.log_start_offset = a.log_start_offset;
            res.record_errors = a
                .record_errors
                .into_iter()
                .map(|(batch_index, message)| RecordError {
                    batch_index,
                    message: message.unwrap_or_default(),
                })
                .collect();
            s.result = Some(res);
        }
    }
}

/// The leader's message with the batch's record errors (INVALID_RECORD etc.) added, by their
/// index in the caller's batch.
fn with_record_errors(message: Option<String>, errors: &[(i32, Option<String>)]) -> String {
    let records: Vec<String> = errors
        .iter()
        .map(|(index, m)| format!("record {index}: {}", m.as_deref().unwrap_or("rejected")))
        .collect();
    match (message, records.is_empty()) {
        (m, true) => m.unwrap_or_default(),
        (Some(m), false) => format!("{m} ({})", records.join("; ")),
        (None, false) => records.join("; "),
    }
}
