//! The tower layers in front of the Forwarder service. [`forwarder_stack`] assembles them; read
//! it top to bottom as the path a call takes.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;
use tonic::{body::Body, server::NamedService};
use tower::{
    BoxError, Layer, Service, ServiceBuilder, limit::GlobalConcurrencyLimitLayer,
    load_shed::LoadShedLayer,
};

use super::{Failure, answer_within, caller_timeout_headers, status};
use crate::stats::{Outcome, Stats};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The deadline of a call, put into the request's extensions by [`DeadlineLayer`]: the
/// caller's `grpc-timeout` (less a small reply margin), or `default_timeout_ms` for unary calls
/// that carry none. Streams without `grpc-timeout` have no deadline as a whole.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

/// The backstop of [`DeadlineLayer`] fired: the handler did not answer by the deadline.
#[derive(Debug, thiserror::Error)]
#[error("no answer within the call's deadline of {0:?}")]
pub struct DeadlineElapsed(Duration);

/// Whether `path` is one of the Forwarder's streaming methods
/// (`/leaderlink.v1.Forwarder/ForwardStream` or `/ForwardBatches`).
fn is_forward_stream(path: &str) -> bool {
    matches!(
        path.strip_prefix('/')
            .and_then(|p| p.strip_prefix(crate::proto::v1::forwarder_server::SERVICE_NAME)),
        Some("/ForwardStream" | "/ForwardBatches")
    )
}

/// Computes each call's [`Deadline`] (the only place that derives it) and, as a backstop, ends
/// calls that outlive it.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    default: Duration,
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            default: self.default,
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
    default: Duration,
}

impl<S, B> Service<http::Request<B>> for DeadlineService<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let streaming = is_forward_stream(req.uri().path());
        let caller = caller_timeout_headers(req.headers());
        let limit = match caller {
            Some(t) => Some(t),
            None if streaming => None,
            None => Some(self.default),
        };
        if let Some(t) = limit {
            req.extensions_mut()
                .insert(Deadline(Instant::now() + answer_within(t)));
        }
        // With the caller's `grpc-timeout`, tonic's server (outside this stack) already ends
        // the call at that limit, after the caller's own timer has fired; a second timer here
        // would cost every call for an answer nobody reads. The backstop is for the default.
        let backstop = if caller.is_some() { None } else { limit };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match backstop {
                None => fut.await.map_err(Into::into),
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r.map_err(Into::into),
                    Err(_) => Err(Box::new(DeadlineElapsed(t)) as BoxError),
                },
            }
        })
    }
}

/// Turns the errors of the layers below into gRPC answers (the status itself is chosen by
/// [`super::status`], like every other) and counts sheds.
#[derive(Clone)]
pub struct RescueLayer {
    stats: Arc<Stats>,
    max_concurrent_calls: usize,
}

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Rescue {
            inner,
            stats: self.stats.clone(),
            max_concurrent_calls: self.max_concurrent_calls,
            not_ready: None,
        }
    }
}

/// See [`RescueLayer`].
pub struct Rescue<S> {
    inner: S,
    stats: Arc<Stats>,
    max_concurrent_calls: usize,
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            stats: self.stats.clone(),
            max_concurrent_calls: self.max_concurrent_calls,
            not_ready: None,
        }
    }
}

impl<S> Rescue<S> {
    fn answer(stats: &Stats, max: usize, err: BoxError, started: Instant) -> http::Response<Body> {
        let (failure, outcome) = if err.is::<tower::load_shed::error::Overloaded>() {
            (Failure::Shed(Some(max)), Outcome::Shed)
        } else if let Some(e) = err.downcast_ref::<DeadlineElapsed>() {
            (Failure::Backstop(e), Outcome::Timeout)
        } else {
            (Failure::Unexpected(&err), Outcome::Error)
        };
        let status = status(failure);
        stats.record(outcome, started.elapsed());
        status.into_http()
    }
}

impl<S, B> Service<http::Request<B>> for Rescue<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(e.into());
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let stats = self.stats.clone();
        let max = self.max_concurrent_calls;
        if let Some(e) = self.not_ready.take() {
            return Box::pin(async move { Ok(Self::answer(&stats, max, e, started)) });
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            Ok(match fut.await {
                Ok(resp) => resp,
                Err(e) => Self::answer(&stats, max, e.into(), started),
            })
        })
    }
}

/// Gives the layered Forwarder the service name tonic routes by.
#[derive(Clone)]
pub struct Named<S>(S);

impl<S> NamedService for Named<S> {
    const NAME: &'static str = crate::proto::v1::forwarder_server::SERVICE_NAME;
}

impl<S, R> Service<R> for Named<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: R) -> Self::Future {
        self.0.call(req)
    }
}

/// The Forwarder behind its middleware, as a recipe:
///
/// 1. **Rescue** — errors of the layers below become gRPC statuses (RESOURCE_EXHAUSTED for a
///    shed, DEADLINE_EXCEEDED for the backstop) instead of tonic's UNKNOWN; sheds are counted.
/// 2. **Load shed** — directly over the limit: when no permit is free, the call is refused at
///    once instead of waiting, so a surge costs a fast "retry later", not a growing queue.
/// 3. **Global concurrency limit** — at most `max_concurrent_calls` calls in the Forwarder,
///    counted across all HTTP/2 connections (a per-connection limit would let a few brokers
///    multiplexing many calls over one connection each exceed any budget). `calls` is that
///    budget; the requests of ForwardStream and ForwardBatches draw on it too.
/// 4. **Deadline** — the caller's `grpc-timeout` or the default, handed to the handler in the
///    request's extensions. For a call without `grpc-timeout`, a backstop ends it with
///    DEADLINE_EXCEEDED if it outlives the default (tonic's own `.timeout()` would answer
///    CANCELLED); with `grpc-timeout`, tonic's server enforces the caller's limit (CANCELLED,
///    after the caller's own timer has fired).
///
/// Health and reflection are not behind these layers: probes must work under overload.
pub fn forwarder_stack<S>(
    forwarder: S,
    stats: Arc<Stats>,
    calls: Arc<tokio::sync::Semaphore>,
    default_timeout: Duration,
) -> Named<Rescue<tower::load_shed::LoadShed<tower::limit::ConcurrencyLimit<DeadlineService<S>>>>>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let max_concurrent_calls = calls.available_permits();
    Named(
        ServiceBuilder::new()
            .layer(RescueLayer {
                stats,
                max_concurrent_calls,
            })
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::with_semaphore(calls))
            .layer(DeadlineLayer {
                default: default_timeout,
            })
            .service(forwarder),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_forwarders_stream_method_is_a_stream() {
        assert!(is_forward_stream("/leaderlink.v1.Forwarder/ForwardStream"));
        assert!(is_forward_stream("/leaderlink.v1.Forwarder/ForwardBatches"));
        assert!(!is_forward_stream("/leaderlink.v1.Forwarder/Forward"));
        assert!(!is_forward_stream("/other.v1.Service/ForwardStream"));
        assert!(!is_forward_stream(
            "/leaderlink.v1.Forwarder/ForwardStreamX"
        ));
    }
}
