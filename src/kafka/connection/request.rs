//! One request's way through a connection: room for it ([`Admission`]), then its wait for the
//! answer ([`InFlight`]).

use std::sync::{Arc, atomic::Ordering};

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;
use tokio::{
    sync::{OwnedSemaphorePermit, oneshot},
    time::Instant,
};

use super::super::{
    error::{ConnError, RequestError},
    frame::encode_request_head,
};
use super::{
    Connection,
    shared::{AtDeadline, Attachment, BytesGuard, Entry, Outgoing, Reply, lock},
};

/// Room on a connection for one request, from [`Connection::admit`]. Dropping it gives the
/// room back.
pub struct Admission {
    pub(super) conn: Arc<Connection>,
    pub(super) permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    pub(super) size: usize,
    pub(super) queued_at: Instant,
    pub(super) attachment: Option<Attachment>,
}

impl Admission {
    /// Keeps `attachment` alive while the request occupies the connection: until its answer is
    /// read, it is taken back unsent, or the connection is gone (for a request that expects no
    /// answer, until it is written). A sender's own wait may end sooner (its deadline, a
    /// cancelled call); what it attaches outlives that wait. The producer layer attaches its
    /// per-partition in-flight permits (docs/design.md §3.16).
    pub fn attach(mut self, attachment: Attachment) -> Self {
        self.attachment = Some(attachment);
        self
    }

    /// Registers the request and queues its frame for the writer, under one lock: the pending
    /// entry exists before a byte is written, and queue order is wire order.
    pub fn send(
        self,
        api_key: ApiKey,
        api_version: i16,
        body: Bytes,
        expect_answer: bool,
    ) -> Result<InFlight, RequestError> {
        let Admission {
            conn,
            permits,
            size,
            queued_at,
            attachment,
        } = self;
        let shared = &conn.shared;
        let not_sent = |cause: ConnError| RequestError {
            cause,
            maybe_sent: false,
        };
        let mut st = lock(&shared.state);
        if let Some(cause) = &st.poisoned {
            return Err(not_sent(cause.clone()));
        }
        if st.draining {
            return Err(not_sent(ConnError::Shutdown));
        }
        let correlation_id = st.next_correlation_id;
        let head = encode_request_head(
            api_key,
            api_version,
            correlation_id,
            &shared.client_id,
            body.len(),
        )
        .map_err(not_sent)?;
        if st.to_writer.is_none() {
            return Err(not_sent(ConnError::Shutdown));
        }
        // Correlation ids are i32 and wrap (docs/design.md §3.7); in-flight requests are bounded far
        // below 2^32, so ids stay unique among them.
        st.next_correlation_id = correlation_id.wrapping_add(1);
        st.next_seq += 1;
        let seq = st.next_seq;
        // Counted under the lock, before the reader can see (and complete) the entry.
        shared
            .stats
            .in_flight_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        let guard = BytesGuard {
            stats: shared.stats.clone(),
            bytes: size as u64,
        };
        let (reply, kind, entry_hold, out_hold, written) = if expect_answer {
            let (tx, rx) = oneshot::channel();
            (
                Reply::Answer(tx),
                Waiting::Answer(rx),
                Some((permits, guard, attachment)),
                None,
                None,
            )
        } else {
            let (tx, rx) = oneshot::channel();
            (
                Reply::None,
                Waiting::Written(rx),
                None,
                Some((permits, guard, attachment)),
                Some(tx),
            )
        };
        let outgoing = Outgoing {
            seq,
            head,
            body,
            written,
            _hold: out_hold,
        };
        if st
            .to_writer
            .as_ref()
            .is_none_or(|w| w.send(outgoing).is_err())
        {
            return Err(not_sent(ConnError::Shutdown));
        }
        if expect_answer {
            let now = shared.stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            shared
                .stats
                .peak_in_flight
                .fetch_max(now, Ordering::Relaxed);
        } else {
            st.no_response_slots += 1;
        }
        st.fifo.push_back(Entry {
            correlation_id,
            seq,
            reply,
            queued_at,
            sent_at: Instant::now(),
            _hold: entry_hold,
        });
        st.bound_no_response_slots();
        drop(st);
        Ok(InFlight {
            conn: conn.clone(),
            seq,
            correlation_id,
            kind: Some(kind),
            deadline: None,
            done: false,
            #[cfg(test)]
            after_deadline: None,
        })
    }
}

/// A request that was queued on a connection; [`InFlight::wait`] yields its answer.
pub struct InFlight {
    pub(super) conn: Arc<Connection>,
    pub(super) seq: u64,
    pub(super) correlation_id: i32,
    pub(super) kind: Option<Waiting>,
    /// Set by [`InFlight::with_deadline`] or [`InFlight::wait`]; applied by a watchdog if the
    /// waiter is dropped before the answer.
    pub(super) deadline: Option<Instant>,
    /// The wait ended (answer, error or timeout handled).
    pub(super) done: bool,
    /// Test hook: once the deadline has passed, the wait pauses here before it judges the
    /// connection, so a test can deliver the answer inside that window.
    #[cfg(test)]
    pub(super) after_deadline: Option<oneshot::Receiver<()>>,
}

impl Drop for InFlight {
    /// A caller that stops waiting (its call was cancelled) must not leave its request pending
    /// for ever: unsent, it is taken back; sent and awaiting an answer with a known deadline, a
    /// watchdog applies that deadline — poisoning the connection if the answer has not come by
    /// then, so that a silent leader is still noticed and its slots freed. Without a known
    /// deadline the request stays until its answer or the connection's end.
    fn drop(&mut self) {
        if self.done || !matches!(self.kind, Some(Waiting::Answer(_))) {
            return;
        }
        let shared = self.conn.shared.clone();
        if shared.withdraw(self.seq) {
            return;
        }
        let Some(at) = self.deadline else { return };
        let seq = self.seq;
        let watch = async move {
            tokio::time::sleep_until(at).await;
            let pending = {
                let st = lock(&shared.state);
                st.poisoned.is_none() && st.fifo.iter().any(|e| e.seq == seq)
            };
            if pending {
                shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                shared.poison(ConnError::TimedOut);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(watch);
            }
            // No runtime to wait on (the process is ending): give the connection up now.
            Err(_) => self.conn.shared.poison(ConnError::Shutdown),
        }
    }
}

pub(super) enum Waiting {
    Answer(oneshot::Receiver<Result<Bytes, RequestError>>),
    Written(oneshot::Receiver<()>),
}

impl InFlight {
    /// Records the caller's deadline now, so that it is enforced even if the caller goes away
    /// before [`InFlight::wait`] runs (see `Drop`).
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Correlation id the request was sent with.
    pub fn correlation_id(&self) -> i32 {
        self.correlation_id
    }

    /// Waits for the answer until `deadline`.
    ///
    /// Returns the response frame (header included) or, for a request sent without expecting
    /// an answer, `None` once it is written. If the deadline passes first, the connection is
    /// poisoned (docs/design.md §3.5) and the error says whether the request may have been written.
    pub async fn wait(mut self, deadline: Instant) -> Result<Option<Bytes>, RequestError> {
        self.deadline = Some(deadline);
        let r = self.wait_inner(deadline).await;
        self.done = true;
        r
    }

    async fn wait_inner(&mut self, deadline: Instant) -> Result<Option<Bytes>, RequestError> {
        let shared = self.conn.shared.clone();
        // Borrowed, not taken: if this future is dropped mid-wait, `Drop` sees the kind.
        let outcome = match self.kind.as_mut() {
            Some(Waiting::Answer(rx)) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(result)) => return result.map(Some),
                Ok(Err(_)) => None,
                Err(_) => Some(()),
            },
            Some(Waiting::Written(rx)) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(())) => return Ok(None),
                Ok(Err(_)) => None,
                Err(_) => Some(()),
            },
            None => None,
        };
        if outcome.is_some() {
            #[cfg(test)]
            if let Some(hook) = self.after_deadline.take() {
                let _ = hook.await;
            }
            let expects_answer = matches!(self.kind, Some(Waiting::Answer(_)));
            match shared.at_deadline(self.seq, expects_answer) {
                AtDeadline::Withdrawn => {
                    shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(RequestError {
                        cause: ConnError::NotSentInTime,
                        maybe_sent: false,
                    });
                }
                // The deadline raced the answer and lost by a hair: the reader has taken the
                // request's entry and is handing the answer over. The connection is in sync;
                // poisoning it would fail every other request on it for nothing.
                AtDeadline::Answered => {
                    if let Some(Waiting::Answer(rx)) = self.kind.as_mut()
                        && let Ok(result) = rx.await
                    {
                        return result.map(Some);
                    }
                }
                AtDeadline::Written => return Ok(None),
                AtDeadline::Pending => {
                    shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    shared.poison(ConnError::TimedOut);
                }
                AtDeadline::Poisoned => {}
            }
        }
        let st = lock(&shared.state);
        Err(RequestError {
            cause: st.poisoned.clone().unwrap_or(ConnError::Shutdown),
            maybe_sent: self.seq <= st.claimed_seq,
        })
    }
}
