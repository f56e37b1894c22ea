//! Process-wide counters, read by the admin service and by `/metrics`.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tonic::Code;

use crate::kafka::histogram::Histogram;

/// What became of one Forward call or ForwardStream request: the `outcome` label of
/// `leaderlink_forward_calls_total`. Each outcome has one gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// OK, every partition acknowledged.
    Ok,
    /// OK, but at least one partition carries a Kafka error (errors are data).
    PartitionErrors,
    /// INVALID_ARGUMENT: refused before any leader saw it.
    Invalid,
    /// DEADLINE_EXCEEDED.
    Timeout,
    /// UNAVAILABLE: no broker reachable, or shutting down.
    Unavailable,
    /// RESOURCE_EXHAUSTED by the global concurrency limit (`max_concurrent_calls`).
    Shed,
    /// RESOURCE_EXHAUSTED by a per-leader bound (queue or bytes in flight).
    Overloaded,
    /// Any other code.
    Error,
}

impl Outcome {
    /// Every outcome, in the order of [`Stats`]' counters.
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::PartitionErrors,
        Outcome::Invalid,
        Outcome::Timeout,
        Outcome::Unavailable,
        Outcome::Shed,
        Outcome::Overloaded,
        Outcome::Error,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::PartitionErrors => "partition_errors",
            Outcome::Invalid => "invalid",
            Outcome::Timeout => "timeout",
            Outcome::Unavailable => "unavailable",
            Outcome::Shed => "shed",
            Outcome::Overloaded => "overloaded",
            Outcome::Error => "error",
        }
    }

    /// The gRPC code the caller received.
    pub fn code(self) -> Code {
        match self {
            Outcome::Ok | Outcome::PartitionErrors => Code::Ok,
            Outcome::Invalid => Code::InvalidArgument,
            Outcome::Timeout => Code::DeadlineExceeded,
            Outcome::Unavailable => Code::Unavailable,
            Outcome::Shed | Outcome::Overloaded => Code::ResourceExhausted,
            Outcome::Error => Code::Internal,
        }
    }

    /// The outcome of an error answer with `code` that was not a shed.
    pub fn of_error(code: Code) -> Outcome {
        match code {
            Code::Ok => Outcome::Ok,
            Code::InvalidArgument => Outcome::Invalid,
            Code::DeadlineExceeded => Outcome::Timeout,
            Code::Unavailable => Outcome::Unavailable,
            Code::ResourceExhausted => Outcome::Overloaded,
            _ => Outcome::Error,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The name gRPC gives `code` (the `code` label).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Totals since start. Relaxed atomics: each counter is exact, a snapshot of several is not
/// taken at one instant.
#[derive(Debug, Default)]
pub struct Stats {
    /// Forward calls and ForwardStream requests answered, by [`Outcome`].
    calls: [AtomicU64; Outcome::ALL.len()],
    /// Time from receiving a call (or a stream request) to its answer, all outcomes.
    pub call_latency: Histogram,
    /// Forward calls being served now.
    pub calls_in_progress: AtomicU64,
    /// Records acknowledged by leaders (or written, with acks=0).
    pub records_forwarded: AtomicU64,
    /// Batch bytes acknowledged by leaders (or written, with acks=0).
    pub bytes_forwarded: AtomicU64,
    /// Partition batches sent again after a failed attempt.
    pub retries: AtomicU64,
    /// Calls refused by the global concurrency limit.
    pub sheds: AtomicU64,
    /// 1 while the last metadata fetch of the health check succeeded (health SERVING), else 0.
    pub cluster_reachable: AtomicU64,
}

/// Counts one unit in a gauge for as long as it lives, however its holder ends (return, error
/// or cancellation).
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    /// Adds one to `gauge`; returns the guard and the gauge's new value.
    pub fn enter(gauge: &'a AtomicU64) -> (Self, u64) {
        let now = gauge.fetch_add(1, Ordering::Relaxed) + 1;
        (Self(gauge), now)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    /// Counts one answered call or stream request and how long it took.
    pub fn record(&self, outcome: Outcome, took: Duration) {
        self.calls[outcome.index()].fetch_add(1, Ordering::Relaxed);
        if outcome == Outcome::Shed {
            self.sheds.fetch_add(1, Ordering::Relaxed);
        }
        self.call_latency.record(took);
    }

    /// Calls answered with `outcome` so far.
    pub fn calls(&self, outcome: Outcome) -> u64 {
        self.calls[outcome.index()].load(Ordering::Relaxed)
    }

    /// Calls answered with gRPC `code` so far; codes without an outcome of their own count as
    /// INTERNAL.
    pub fn calls_with_code(&self, code: Code) -> u64 {
        Outcome::ALL
            .iter()
            .filter(|o| o.code() == code)
            .map(|o| self.calls(*o))
            .sum()
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_count_under_their_code() {
        let s = Stats::default();
        s.record(Outcome::Ok, Duration::from_millis(1));
        s.record(Outcome::PartitionErrors, Duration::from_millis(1));
        s.record(Outcome::Shed, Duration::ZERO);
        s.record(Outcome::Overloaded, Duration::ZERO);
        assert_eq!(s.calls_with_code(Code::Ok), 2);
        assert_eq!(s.calls_with_code(Code::ResourceExhausted), 2);
        assert_eq!(Stats::get(&s.sheds), 1);
        assert_eq!(s.call_latency.count(), 4);
        for o in Outcome::ALL {
            assert_eq!(Outcome::ALL[o.index()], o);
        }
    }
}
