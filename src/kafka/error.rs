//! Errors of the Kafka-wire layer.

use std::{io, sync::Arc, time::Duration};

/// Why a leader connection failed or was poisoned.
///
/// Cloneable so that one cause can be handed to every request that was pending when a connection
/// was poisoned.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnError {
    /// TCP connect to the broker failed.
    #[error("connecting to {addr} failed")]
    Connect {
        /// `host:port` that was dialled.
        addr: String,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// TCP connect did not finish in time.
    #[error("connecting to {addr} timed out (after {after:?} of dialling)")]
    ConnectTimeout {
        /// `host:port` that was dialled.
        addr: String,
        /// How long the attempt ran.
        after: Duration,
    },
    /// The broker accepted the TCP connection but did not answer ApiVersions within the
    /// handshake bound: a stopped or stalled process (the kernel still accepts connections
    /// for it).
    #[error(
        "{addr} accepted the connection but did not answer ApiVersions within {after:?} \
         (stopped or stalled?)"
    )]
    HandshakeTimeout {
        /// `host:port` that was dialled.
        addr: String,
        /// The bound that passed (`handshake_timeout_ms`).
        after: Duration,
    },
    /// The broker stopped answering: the oldest request on one of its connections went
    /// unanswered for `after` (`stall_timeout_ms`), and a new connection to it got no
    /// ApiVersions answer either. Its connections are poisoned and no new ones are dialled
    /// until it answers a probe again (see [`super::stall`]).
    #[error(
        "{addr} stalled: a request went unanswered for {after:?} and a new connection got no \
         answer either (stopped or stalled process?)"
    )]
    Stalled {
        /// The broker's `host:port`.
        addr: String,
        /// How long the oldest request had gone unanswered.
        after: Duration,
    },
    /// The broker is suspect (it stalled, or a dial to it timed out): it is not dialled until a
    /// probe in the background gets an answer (see [`super::stall`]).
    #[error("{addr} is not dialled until it answers a probe")]
    Avoided {
        /// The broker's `host:port`.
        addr: String,
        /// Why it is suspect.
        #[source]
        cause: Arc<ConnError>,
    },
    /// The TLS handshake with the broker failed (certificate not trusted, wrong name, a
    /// plaintext listener, ...).
    #[error("TLS with {addr} failed: {reason}")]
    Tls {
        /// `host:port` that was dialled.
        addr: String,
        /// What rustls reported.
        reason: String,
    },
    /// SASL authentication failed. Not retried on the same connection; the slot's reconnect
    /// backoff spaces further attempts.
    #[error("SASL {mechanism} authentication failed: {reason}")]
    Auth {
        /// The mechanism used.
        mechanism: &'static str,
        /// What the broker (or the exchange) said.
        reason: String,
    },
    /// Reading or writing the socket failed.
    #[error("socket I/O failed")]
    Io(#[source] Arc<io::Error>),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// A frame's length prefix exceeds the configured maximum.
    #[error("frame of {actual} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The configured `max_frame_bytes`.
        limit: usize,
        /// The length prefix read off the wire.
        actual: usize,
    },
    /// A frame's length prefix is negative or too short to hold a correlation id.
    #[error("invalid frame length {0}")]
    BadLength(i32),
    /// A response arrived for a correlation id that no request on this connection is waiting for.
    #[error("response for unknown correlation id {got}")]
    UnknownCorrelationId {
        /// The correlation id read off the wire.
        got: i32,
    },
    /// A response arrived out of request order: the stream is out of sync.
    #[error("response out of order: expected correlation id {expected}, got {got}")]
    OutOfOrder {
        /// Correlation id of the oldest request waiting for an answer.
        expected: i32,
        /// The correlation id read off the wire.
        got: i32,
    },
    /// A response could not be decoded.
    #[error("malformed {api} response: {reason}")]
    Malformed {
        /// The API whose response failed to decode.
        api: &'static str,
        /// What the decoder reported.
        reason: String,
    },
    /// A request could not be encoded (a bug or an unencodable value, never the broker's fault).
    #[error("could not encode {api} request: {reason}")]
    Encode {
        /// The API whose request failed to encode.
        api: &'static str,
        /// What the encoder reported.
        reason: String,
    },
    /// The broker does not support a version of an API leaderlink needs.
    #[error("broker supports {api} versions {min}..={max}; leaderlink needs {need}")]
    Unsupported {
        /// The API that cannot be used.
        api: &'static str,
        /// Lowest version the broker supports.
        min: i16,
        /// Highest version the broker supports.
        max: i16,
        /// The versions leaderlink can speak.
        need: &'static str,
    },
    /// The broker rejected the ApiVersions request.
    #[error("ApiVersions failed with error code {0}")]
    ApiVersions(i16),
    /// A request got no answer before its deadline; the connection was poisoned because a late
    /// answer can no longer be trusted to reach the right caller.
    #[error("no answer within the deadline; connection poisoned")]
    TimedOut,
    /// A request was still queued behind a slow write when its deadline passed; it was taken
    /// back unsent and the connection stays up.
    #[error("deadline passed before the request could be written; not sent")]
    NotSentInTime,
    /// A call's deadline passed before the answer to the Produce request it shares with other
    /// calls (see [`super::coalesce`]); the request stays in flight for those that wait longer,
    /// and the connection is poisoned only if the last of them gets no answer either.
    #[error(
        "no answer within the deadline; the request stays in flight for the calls it was coalesced with"
    )]
    AnswerLate,
    /// A new connection for a slot was not opened in time: the slot's earlier connection
    /// (drained, or to the broker's old address) still had requests awaiting answers, which a
    /// request on the new connection could overtake.
    #[error("{waiting} requests still in flight on the previous connection to this broker")]
    EarlierInFlight {
        /// Requests that awaited answers when the wait gave up.
        waiting: usize,
    },
    /// The connection's queue is full (`max_queued_per_connection`).
    #[error("leader connection queue is full ({limit} requests waiting)")]
    QueueFull {
        /// The configured bound.
        limit: usize,
    },
    /// A request is larger than the connection's whole byte budget.
    #[error("request of {actual} bytes exceeds max_in_flight_bytes_per_connection ({limit})")]
    TooLarge {
        /// The configured bound.
        limit: usize,
        /// The request's size.
        actual: usize,
    },
    /// The connection was closed on purpose (drain or shutdown).
    #[error("connection closed locally")]
    Shutdown,
}

impl ConnError {
    pub(crate) fn io(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ConnError::Closed
        } else {
            ConnError::Io(Arc::new(e))
        }
    }

    /// True for causes that are part of a connection's ordinary life (the peer hung up), as
    /// opposed to protocol violations worth a warning.
    pub fn is_ordinary(&self) -> bool {
        matches!(
            self,
            ConnError::Closed | ConnError::Io(_) | ConnError::Shutdown | ConnError::TimedOut
        )
    }
}

/// A request that failed on a connection, with what is known about whether it reached the broker.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{cause}")]
pub struct RequestError {
    /// Why it failed.
    #[source]
    pub cause: ConnError,
    /// `false` when the request's bytes were certainly never written (safe to retry without
    /// risking a duplicate); `true` when they may have reached the broker.
    pub maybe_sent: bool,
}

/// Formats an error with its whole `source()` chain: `outer: inner: innermost`.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}
