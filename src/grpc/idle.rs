//! The idle timeout of caller connections (`idle_connection_timeout_ms`): a connection on which no
//! call has been in progress for that long is closed, so that callers that connect and go quiet
//! do not hold descriptors and memory for ever.
//!
//! tonic's server offers a maximum connection age but no idle timeout, and no handle on a single
//! connection, so this is built from two pieces: [`IdleClock`] ends each accepted connection
//! (from inside [`super::conn::CallerIo`], which wraps it), and [`IdleLayer`] counts the
//! connection's calls, finding the connection's
//! [`Activity`] in the connect info tonic puts into every request ([`ConnInfo`]). A call is in
//! progress from its request until its response body is done (a ForwardStream for as long as it
//! is open).
//!
//! The connection ends as if the caller had closed it (the read side reports the end of the
//! stream), not with a GOAWAY, which tonic gives no way to send to one connection. A request the
//! caller sends at that very moment fails with UNAVAILABLE before leaderlink reads it, so it is
//! safe to retry. To keep that window small, a connection is closed only after nothing at all was
//! read from it for [`QUIET`] as well.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tower::{Layer, Service};

/// How long nothing may have been read from a connection before its idle timeout may close it:
/// bytes just read may be a new call's request that has not reached [`IdleLayer`] yet.
pub const QUIET: Duration = Duration::from_secs(1);

/// The calls of one connection and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    calls: AtomicUsize,
    /// Calls begun since the connection was accepted (see [`crate::grpc::abuse`]).
    started: AtomicU64,
    /// When the last call ended (or the connection was accepted).
    last_call: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A connection just accepted: no call yet.
    pub fn new() -> Self {
        Self {
            calls: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            last_call: Mutex::new(Instant::now()),
        }
    }

    /// A call begins; it is in progress until the guard is dropped.
    fn enter(self: &Arc<Self>) -> CallGuard {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }

    /// Calls begun on the connection so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Since when the connection has had no call (`None`: a call is in progress).
    fn idle_since(&self) -> Option<Instant> {
        // The count first: a call that ends sets `last_call` before it leaves the count, so a
        // count of 0 seen here comes with that call's end time, not an older one.
        if self.calls.load(Ordering::SeqCst) != 0 {
            return None;
        }
        Some(*self.last_call.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One call in progress on a connection (see [`Activity::enter`]).
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        *self.0.last_call.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What tonic puts into each request of a caller connection ([`super::conn::CallerIo`]).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The caller's address.
    pub peer: Option<SocketAddr>,
    activity: Arc<Activity>,
}

impl ConnInfo {
    /// The info of a connection from `peer` whose calls `activity` counts.
    pub(super) fn new(peer: Option<SocketAddr>, activity: Arc<Activity>) -> Self {
        Self { peer, activity }
    }
}

/// The idle timeout of one connection (see the module docs).
pub(super) struct IdleClock {
    timeout: Duration,
    last_read: Instant,
    timer: Pin<Box<Sleep>>,
}

impl IdleClock {
    /// A clock for a connection just accepted, closed after `timeout` without a call.
    pub(super) fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            timeout,
            last_read: now,
            timer: Box::pin(tokio::time::sleep_until(now)),
        }
    }

    /// Bytes were just read from the connection.
    pub(super) fn read(&mut self) {
        self.last_read = Instant::now();
    }

    /// When the connection may be closed as idle, if no call begins and nothing is read before
    /// (`None`: a call is in progress; look again after a while).
    fn closes_at(&self, activity: &Activity) -> Option<Instant> {
        activity
            .idle_since()
            .map(|since| (since + self.timeout).max(self.last_read + QUIET))
    }

    /// Ready once the connection from `peer`, whose calls `activity` counts, is to be closed as
    /// idle; else the timer is set to wake `cx` when it may be. Polled when a read finds nothing.
    pub(super) fn poll_expired(
        &mut self,
        activity: &Activity,
        peer: Option<SocketAddr>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        loop {
            let now = Instant::now();
            let at = match self.closes_at(activity) {
                Some(at) if at <= now => {
                    tracing::debug!(?peer, timeout = ?self.timeout, "closing an idle caller connection");
                    return Poll::Ready(());
                }
                Some(at) => at,
                // A call is in progress: look again a timeout later.
                None => now + self.timeout,
            };
            // Calls and reads only move the closing time later, so the timer is set again when
            // it has fired (or when the closing time is earlier than it), not on every read: a
            // timer reset on each read would cost the busy connections.
            let deadline = self.timer.deadline();
            if deadline <= now || at < deadline {
                self.timer.as_mut().reset(at);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// Counts each call as in progress on its connection (see the module docs); a request without
/// [`ConnInfo`] (a connection not wrapped by [`super::conn::CallerIo`]) passes untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdleLayer;

impl<S> Layer<S> for IdleLayer {
    type Service = IdleService<S>;

    fn layer(&self, inner: S) -> IdleService<S> {
        IdleService(inner)
    }
}

/// The service of [`IdleLayer`].
#[derive(Debug, Clone)]
pub struct IdleService<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> Service<http::Request<Body>> for IdleService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.activity.enter());
        let call = self.0.call(req);
        Box::pin(async move {
            let resp = call.await?;
            Ok(match guard {
                // In progress until the response body is done with.
                Some(guard) => resp.map(|body| {
                    Body::new(Guarded {
                        inner: body,
                        _call: guard,
                    })
                }),
                None => resp,
            })
        })
    }
}

/// A response body that keeps its call in progress until it is dropped.
struct Guarded {
    inner: Body,
    _call: CallGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
