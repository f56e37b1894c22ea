//! Process-wide counters, read by the admin service.

use std::sync::atomic::{AtomicU64, Ordering};

use tonic::Code;

/// Totals since start. Relaxed atomics: each counter is exact, a snapshot of several is not
/// taken at one instant.
#[derive(Debug, Default)]
pub struct Stats {
    /// Forward calls and ForwardStream requests answered OK.
    pub calls_ok: AtomicU64,
    /// ... answered INVALID_ARGUMENT.
    pub calls_invalid_argument: AtomicU64,
    /// ... answered DEADLINE_EXCEEDED.
    pub calls_deadline_exceeded: AtomicU64,
    /// ... answered UNAVAILABLE.
    pub calls_unavailable: AtomicU64,
    /// ... answered RESOURCE_EXHAUSTED (sheds included).
    pub calls_resource_exhausted: AtomicU64,
    /// ... answered with any other code.
    pub calls_internal: AtomicU64,
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
    /// Counts one answered call or stream request by its gRPC code.
    pub fn record(&self, code: Code) {
        let c = match code {
            Code::Ok => &self.calls_ok,
            Code::InvalidArgument => &self.calls_invalid_argument,
            Code::DeadlineExceeded => &self.calls_deadline_exceeded,
            Code::Unavailable => &self.calls_unavailable,
            Code::ResourceExhausted => &self.calls_resource_exhausted,
            _ => &self.calls_internal,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
