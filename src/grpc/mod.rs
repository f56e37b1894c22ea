//! Thin tonic handlers, and the one place that maps errors to gRPC status codes.

pub mod abuse;
pub mod conn;
pub mod idle;
pub mod layers;

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::{Instrument, Span, debug_span, info_span, warn};

use crate::{
    forward::{ForwardError, Forwarder},
    kafka::error::chain,
    proto::v1::{
        ForwardBatch, ForwardBatchResponse, ForwardRequest, ForwardResponse, forwarder_server,
    },
    stats::{GaugeGuard, Outcome},
    telemetry::{CALL_TARGET, CallTrace, TASK_TARGET},
};

/// Every way a Forwarder call can end without its answer. [`status`] is the one place that
/// chooses the gRPC status for each: the handlers' own errors, the stack's
/// ([`layers::RescueLayer`]) and a stream's in-band answers all come here.
pub enum Failure<'a> {
    /// Forwarding failed as a whole.
    Forward(&'a ForwardError),
    /// `max_concurrent_calls` calls are being served already (the limit, when known).
    Shed(Option<usize>),
    /// The deadline layer's backstop fired: the handler did not answer in time.
    Backstop(&'a layers::DeadlineElapsed),
    /// The shutdown grace expired while the call was running.
    ShuttingDown,
    /// An error the stack did not expect.
    Unexpected(&'a tower::BoxError),
}

/// The gRPC status the caller sees for `failure` (see [`Failure`]).
pub fn status(failure: Failure<'_>) -> Status {
    match failure {
        Failure::Forward(err) => match err {
            ForwardError::Invalid { .. } => Status::invalid_argument(err.to_string()),
            ForwardError::DeadlineExceeded { .. } => Status::deadline_exceeded(err.to_string()),
            ForwardError::Unavailable { .. } => Status::unavailable(chain(err)),
            ForwardError::Overloaded { .. } => Status::resource_exhausted(chain(err)),
            ForwardError::Internal(_) => {
                warn!(error = %err, "internal error");
                Status::internal(err.to_string())
            }
        },
        Failure::Shed(limit) => Status::resource_exhausted(format!(
            "leaderlink is serving its limit of {}concurrent calls (max_concurrent_calls); \
             retry later",
            limit.map(|n| format!("{n} ")).unwrap_or_default()
        )),
        Failure::Backstop(e) => Status::deadline_exceeded(e.to_string()),
        Failure::ShuttingDown => Status::unavailable(
            "leaderlink is shutting down and its shutdown_grace expired; retry on another \
             instance",
        ),
        Failure::Unexpected(err) => {
            warn!(error = %err, "unexpected error in the Forwarder stack");
            Status::internal(format!("internal error: {err}"))
        }
    }
}

/// Reads the caller's deadline from `grpc-timeout`.
///
/// tonic parses this header only inside its own timeout layer, whose expiry answers CANCELLED;
/// leaderlink needs the deadline itself (to cut the Kafka `timeout_ms` and answer
/// DEADLINE_EXCEEDED), so the short format (`<=8 digits><H|M|S|m|u|n>`) is parsed here.
pub fn caller_timeout(md: &MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(md.get("grpc-timeout")?.to_str().ok()?)
}

/// [`caller_timeout`] on plain HTTP headers (for tower layers).
pub fn caller_timeout_headers(headers: &http::HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long leaderlink works on a call whose caller allows `timeout`: 5% (at most 100 ms) less,
/// so that its own DEADLINE_EXCEEDED — naming the partitions still waiting and the last cause —
/// reaches the caller before the caller's timer fires.
pub fn answer_within(timeout: Duration) -> Duration {
    timeout - (timeout / 20).min(Duration::from_millis(100))
}

/// The Forwarder gRPC service.
#[derive(Clone)]
pub struct ForwarderService {
    forwarder: Forwarder,
    default_timeout: Duration,
    max_stream_in_flight: usize,
    /// Becomes true when the shutdown grace expired: calls still running answer UNAVAILABLE.
    abort: watch::Receiver<bool>,
    /// The `max_concurrent_calls` budget shared with the global concurrency limit layer: each
    /// request on a ForwardStream takes a permit too, so streams cannot exceed it.
    calls: Arc<Semaphore>,
}

/// Resolves once `abort` turns true (never, if its sender goes away without doing so).
async fn aborted(mut abort: watch::Receiver<bool>) {
    if abort.wait_for(|a| *a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl ForwarderService {
    /// A service over `forwarder`. `default_timeout` is the deadline of unary calls that carry
    /// none (and of each request of a stream); `max_stream_in_flight` bounds the requests one
    /// ForwardStream has outstanding (more are not read from the stream until one completes,
    /// which pushes back on the caller through HTTP/2 flow control). `abort` turning true
    /// makes running calls answer UNAVAILABLE.
    pub fn new(
        forwarder: Forwarder,
        default_timeout: Duration,
        max_stream_in_flight: usize,
        abort: watch::Receiver<bool>,
        calls: Arc<Semaphore>,
    ) -> Self {
        Self {
            forwarder,
            default_timeout,
            max_stream_in_flight: max_stream_in_flight.max(1),
            abort,
            calls,
        }
    }

    /// The deadline [`layers::DeadlineLayer`] computed (the service always runs behind it, see
    /// [`layers::forwarder_stack`]): for a unary call always there, for a stream only when its
    /// caller sent `grpc-timeout`.
    fn deadline<T>(req: &Request<T>) -> Option<Instant> {
        req.extensions().get::<layers::Deadline>().map(|d| d.0)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ForwardResponse, Status>> + Send>>;

/// What became of an answered call (sheds are counted where they happen).
fn outcome_of(r: &Result<ForwardResponse, Status>) -> Outcome {
    match r {
        Ok(resp) if resp.partitions.iter().any(|p| p.error_code != 0) => Outcome::PartitionErrors,
        Ok(_) => Outcome::Ok,
        Err(s) => Outcome::of_error(s.code()),
    }
}

/// The `tracing` span of one Forward call or stream request: the context of its log lines (at
/// debug). Its exported span is a [`CallTrace`].
fn call_span(method: &'static str, id: u64) -> Span {
    debug_span!(target: CALL_TARGET, "rpc", rpc.method = method, leaderlink.request_id = id)
}

/// Ends a call's exported span with how the call ended.
fn end_trace(trace: CallTrace, outcome: Outcome, r: &Result<ForwardResponse, Status>) {
    trace.end(
        outcome.code(),
        outcome.name(),
        r.as_ref().err().map(Status::message),
    );
}

#[tonic::async_trait]
impl forwarder_server::Forwarder for ForwarderService {
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let started = Instant::now();
        // Outside its stack (no deadline layer) a call still gets the default.
        let deadline =
            Self::deadline(&request).unwrap_or_else(|| Instant::now() + self.default_timeout);
        const METHOD: &str = "leaderlink.v1.Forwarder/Forward";
        let id = request.get_ref().id;
        let span = call_span(METHOD, id);
        let (trace, traceparent) = CallTrace::start(
            METHOD,
            id,
            request.metadata(),
            self.forwarder.wants_traceparent(),
        );
        let stats = self.forwarder.stats().clone();
        let _in_progress = GaugeGuard::enter(&stats.calls_in_progress);
        // Boxed at once: the call's future is large (kilobytes), and every future that holds it
        // unboxed is copied whole as it moves into tonic's own box.
        let call = Box::pin(self.forwarder.forward(
            request.into_inner(),
            deadline,
            traceparent.as_deref(),
            None,
        ));
        let result = trace
            .scope(async {
                tokio::select! {
                    biased;
                    r = call => r.map_err(|e| status(Failure::Forward(&e))),
                    () = aborted(self.abort.clone()) => Err(status(Failure::ShuttingDown)),
                }
            })
            .instrument(span)
            .await;
        let outcome = outcome_of(&result);
        end_trace(trace, outcome, &result);
        stats.record(outcome, started.elapsed());
        result.map(Response::new)
    }

    type ForwardStreamStream = ResponseStream;

    async fn forward_stream(
        &self,
        request: Request<tonic::Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let (head, inbound) = StreamHead::of(request);
        let inbound = inbound.map(|m| m.map(|r| vec![r]));
        self.clone()
            .serve_stream("leaderlink.v1.Forwarder/ForwardStream", head, inbound, tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ForwardBatchesStream = BatchResponseStream;

    async fn forward_batches(
        &self,
        request: Request<tonic::Streaming<ForwardBatch>>,
    ) -> Result<Response<Self::ForwardBatchesStream>, Status> {
        let (tx, rx) = mpsc::channel(self.max_stream_in_flight.min(MAX_BATCH_RESPONSES));
        let (out_tx, out_rx) = mpsc::channel(16);
        let (head, inbound) = StreamHead::of(request);
        let inbound = inbound.map(|m| m.map(|b| b.requests));
        self.clone()
            .serve_stream("leaderlink.v1.Forwarder/ForwardBatches", head, inbound, tx);
        tokio::spawn(
            gather_responses(rx, out_tx)
                .instrument(info_span!(target: TASK_TARGET, "forward_batches_out")),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// Most responses one ForwardBatchResponse carries; more that complete at once go in the next
/// message. Bounds a message's size (each response is small; a request's results are bounded
/// by its partitions).
const MAX_BATCH_RESPONSES: usize = 1024;

type BatchResponseStream = Pin<Box<dyn Stream<Item = Result<ForwardBatchResponse, Status>> + Send>>;

/// Packs the responses of a ForwardBatches stream into messages: each takes the responses that
/// are ready, after one turn of the scheduler for those completing at the same moment. A
/// stream-level error goes out after the responses before it, and ends the stream.
async fn gather_responses(
    mut rx: mpsc::Receiver<Result<ForwardResponse, Status>>,
    out: mpsc::Sender<Result<ForwardBatchResponse, Status>>,
) {
    let mut ready = Vec::new();
    while rx.recv_many(&mut ready, MAX_BATCH_RESPONSES).await > 0 {
        tokio::task::yield_now().await;
        while ready.len() < MAX_BATCH_RESPONSES {
            match rx.try_recv() {
                Ok(r) => ready.push(r),
                Err(_) => break,
            }
        }
        let mut responses = Vec::with_capacity(ready.len());
        let mut error = None;
        for r in ready.drain(..) {
            match r {
                Ok(resp) => responses.push(resp),
                Err(status) => {
                    error = Some(status);
                    break;
                }
            }
        }
        if !responses.is_empty()
            && out
                .send(Ok(ForwardBatchResponse { responses }))
                .await
                .is_err()
        {
            return;
        }
        if let Some(status) = error {
            let _ = out.send(Err(status)).await;
            return;
        }
    }
}

/// What a stream's start carries for all its requests: its deadline (when the caller sent
/// `grpc-timeout`) and its metadata (for the caller's `traceparent`).
struct StreamHead {
    deadline: Option<Instant>,
    metadata: MetadataMap,
}

impl StreamHead {
    fn of<T>(request: Request<T>) -> (Self, T) {
        let head = Self {
            deadline: ForwarderService::deadline(&request),
            metadata: request.metadata().clone(),
        };
        (head, request.into_inner())
    }
}

impl ForwarderService {
    /// Serves the requests of one stream (ForwardStream's, or ForwardBatches' messages taken
    /// apart), each as a call of its own, with their responses sent to `tx`:
    /// * the stream's deadline, if it has one, bounds every request on it; a request's own
    ///   `call_timeout_ms` may shorten it;
    /// * streams carry metadata only at their start: each request's span is a child of the
    ///   caller's `traceparent` given then (one span per request, not one per stream, so a long
    ///   stream does not build an unbounded trace);
    /// * at most `max_stream_in_flight` requests are outstanding; the next is not read until
    ///   one completes, which pushes back on the caller through HTTP/2 flow control;
    /// * responses for requests that share a partition leave in arrival order, and their
    ///   batches are handed to the leader connections in that order;
    /// * once the stream is gone (its answers can no longer be sent), its requests still
    ///   running are dropped, as unary calls whose caller went are.
    fn serve_stream<S>(
        self,
        method: &'static str,
        head: StreamHead,
        mut inbound: S,
        tx: mpsc::Sender<Result<ForwardResponse, Status>>,
    ) where
        S: Stream<Item = Result<Vec<ForwardRequest>, Status>> + Send + Unpin + 'static,
    {
        let this = self;
        tokio::spawn(
            async move {
                let permits = Arc::new(Semaphore::new(this.max_stream_in_flight));
                // Completion signal of the latest request per partition, so that responses for one
                // partition leave in arrival order.
                let mut last: HashMap<(String, i32), watch::Receiver<bool>> = HashMap::new();
                'stream: loop {
                    let msg = tokio::select! {
                        m = inbound.next() => m,
                        () = aborted(this.abort.clone()) => None,
                    };
                    let Some(msg) = msg else { break };
                    let reqs = match msg {
                        Ok(r) => r,
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    };
                    for req in reqs {
                        // A stream whose answers nobody can read any more is not served on.
                        if tx.is_closed() {
                            break 'stream;
                        }
                        let Ok(permit) = permits.clone().acquire_owned().await else {
                            break 'stream;
                        };
                        let enqueued = this.serve_one(method, &head, &mut last, req, &tx, permit);
                        // Hand this request's batches to the leader connections before taking
                        // the next one, so that requests for one partition reach the leader in
                        // order.
                        let _ = enqueued.await;
                    }
                }
            }
            .instrument(info_span!(target: TASK_TARGET, "forward_stream")),
        );
    }

    /// Starts one request of a stream (see [`Self::serve_stream`]); the returned receiver
    /// resolves once its batches are queued for their leaders (or it has ended).
    fn serve_one(
        &self,
        method: &'static str,
        head: &StreamHead,
        last: &mut HashMap<(String, i32), watch::Receiver<bool>>,
        req: ForwardRequest,
        tx: &mpsc::Sender<Result<ForwardResponse, Status>>,
        permit: OwnedSemaphorePermit,
    ) -> oneshot::Receiver<()> {
        let started = Instant::now();
        let span = call_span(method, req.id);
        let (trace, traceparent) = CallTrace::start(
            method,
            req.id,
            &head.metadata,
            self.forwarder.wants_traceparent(),
        );
        let mut deadline = started + self.default_timeout;
        if let Some(d) = head.deadline {
            deadline = deadline.min(d);
        }
        if req.call_timeout_ms > 0 {
            let own = answer_within(Duration::from_millis(u64::from(req.call_timeout_ms)));
            deadline = deadline.min(started + own);
        }
        let (done_tx, done_rx) = watch::channel(false);
        let mut before = Vec::new();
        for p in &req.partitions {
            let key = (p.topic.clone(), p.partition);
            if let Some(prev) = last.insert(key, done_rx.clone()) {
                // A partition listed twice in this request must not wait on itself.
                if !prev.same_channel(&done_rx) {
                    before.push(prev);
                }
            }
        }
        if last.len() > 4 * self.max_stream_in_flight {
            last.retain(|_, rx| !*rx.borrow());
        }
        let (enq_tx, enq_rx) = oneshot::channel();
        let id = req.id;
        let forwarder = self.forwarder.clone();
        let abort = self.abort.clone();
        let tx = tx.clone();
        // A stream's requests count against max_concurrent_calls like unary calls; one over the
        // budget is shed (answered in band, in its partitions' order).
        let call = self.calls.clone().try_acquire_owned();
        tokio::spawn(
            async move {
                let stats = forwarder.stats().clone();
                let (result, outcome) = match call {
                    Err(_) => (Err(status(Failure::Shed(None))), Outcome::Shed),
                    Ok(_call) => {
                        let _in_progress = GaugeGuard::enter(&stats.calls_in_progress);
                        let call = trace.scope(forwarder.forward(
                            req,
                            deadline,
                            traceparent.as_deref(),
                            Some(enq_tx),
                        ));
                        let r = tokio::select! {
                            r = call => r.map_err(|e| status(Failure::Forward(&e))),
                            () = aborted(abort) => Err(status(Failure::ShuttingDown)),
                            () = tx.closed() => {
                                // The stream is gone (its caller closed it or lost the
                                // connection): nobody can read this answer. Dropped as a unary
                                // call whose caller went is, so its slot of
                                // max_concurrent_calls is free at once (a batch already on a
                                // leader connection still gets its answer there).
                                return;
                            }
                        };
                        let outcome = outcome_of(&r);
                        (r, outcome)
                    }
                };
                end_trace(trace, outcome, &result);
                stats.record(outcome, started.elapsed());
                for mut prev in before {
                    let _ = prev.wait_for(|done| *done).await;
                }
                let resp = result.unwrap_or_else(|s| ForwardResponse {
                    id,
                    status_code: s.code() as i32,
                    status_message: s.message().to_string(),
                    ..Default::default()
                });
                let _ = tx.send(Ok(resp)).await;
                let _ = done_tx.send(true);
                drop(permit);
            }
            .instrument(span),
        );
        enq_rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_is_parsed() {
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(caller_timeout(&md), Some(Duration::from_millis(250)));
        md.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(caller_timeout(&md), Some(Duration::from_secs(3)));
        md.insert("grpc-timeout", "123456789m".parse().unwrap());
        assert_eq!(caller_timeout(&md), None);
        md.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(caller_timeout(&md), None);
    }

    #[test]
    fn answers_leave_before_the_callers_deadline() {
        assert_eq!(
            answer_within(Duration::from_millis(300)),
            Duration::from_millis(285)
        );
        assert_eq!(
            answer_within(Duration::from_secs(30)),
            Duration::from_millis(29_900)
        );
    }
}
