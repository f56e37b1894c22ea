//! Gray failures: brokers that stop answering while their sockets stay open (a stopped or
//! frozen process, a stuck disk, a blackholed link). The kernel still accepts TCP connections
//! for a stopped process, so neither a dial nor a write fails; only the answers stop
//! (docs/design.md §3.21).
//!
//! * **Detection.** The pool's watchdog (`pool::watch`) looks at every leader connection every
//!   quarter of `stall_timeout`. When the oldest request awaiting an answer on one has waited
//!   longer than `stall_timeout`, it checks the broker over a *new* connection: a broker that is
//!   slow (acks=all waiting for its followers, a long request ahead on the connection) answers
//!   ApiVersions on a fresh connection at once, a stopped one does not within
//!   `handshake_timeout`. Only then is the broker declared stalled: its connections are
//!   poisoned, so the requests on them are retried (after a metadata refresh, on the new leader
//!   once the cluster has elected one).
//! * **Avoidance.** A stalled broker, or one whose dial timed out, is *suspect*
//!   ([`Suspects`]): calls are refused at once with the cause instead of dialling it (each dial
//!   would wait `handshake_timeout` again), and metadata refreshes ask other brokers first.
//! * **Recovery.** A call that finds a suspect broker after its backoff starts a probe in the
//!   background: a new connection. The suspicion ends when a probe's connection is set up;
//!   a failed probe doubles the backoff (up to `retry_backoff_max_ms`). Nothing probes a broker
//!   no call asks for.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tracing::{debug, info, info_span, warn};

use super::{
    connect,
    connection::{ConnStats, ConnectionConfig},
    error::{ConnError, chain},
};

/// What is known about one broker address.
enum State {
    /// A stall check is dialling it now.
    Checking,
    /// It answered a stall check: no other check before `until`.
    Alive { until: Instant },
    /// Calls are refused with `cause`; the next probe may start at `probe_at` (`None`: one is
    /// running).
    Suspect {
        cause: ConnError,
        probe_at: Option<Instant>,
        attempts: u32,
    },
}

/// The brokers leaderlink does not dial now because they stopped answering, by address.
/// Shared by the pool and the metadata client. Holds at most one entry per broker address the
/// cluster ever named.
pub struct Suspects {
    config: ConnectionConfig,
    /// First probe delay after a verdict, and the most it doubles to.
    backoff: (Duration, Duration),
    states: Mutex<HashMap<String, State>>,
    /// Times a broker became suspect.
    marked: AtomicU64,
}

/// `base` doubled per attempt after the first, at most `max`, jittered to 50–100% so that
/// many waiters do not all come back at once.
pub(super) fn jittered_backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    base.saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(max)
        .mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

impl Suspects {
    /// No broker suspect yet. Probes dial with `config`; the first waits `backoff.0`, each
    /// failed one doubles the wait up to `backoff.1`.
    pub fn new(config: ConnectionConfig, backoff: (Duration, Duration)) -> Arc<Self> {
        Arc::new(Self {
            config,
            backoff,
            states: Mutex::new(HashMap::new()),
            marked: AtomicU64::new(0),
        })
    }

    /// Brokers suspect now.
    pub fn len(&self) -> usize {
        self.states()
            .values()
            .filter(|s| matches!(s, State::Suspect { .. }))
            .count()
    }

    /// Whether no broker is suspect now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Times a broker became suspect so far.
    pub fn marked(&self) -> u64 {
        self.marked.load(Ordering::Relaxed)
    }

    fn states(&self) -> std::sync::MutexGuard<'_, HashMap<String, State>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `addr` is suspect now.
    pub fn contains(&self, addr: &str) -> bool {
        matches!(self.states().get(addr), Some(State::Suspect { .. }))
    }

    /// Makes `addr` suspect because of `cause` (logged at warn when it was not suspect yet).
    pub fn mark(&self, addr: &str, cause: ConnError) {
        let mut states = self.states();
        if let Some(State::Suspect { .. }) = states.get(addr) {
            return;
        }
        // A check of it that was running ends here.
        let wait = jittered_backoff(self.backoff.0, self.backoff.1, 1);
        self.marked.fetch_add(1, Ordering::Relaxed);
        warn!(
            %addr,
            cause = %chain(&cause),
            probe_in = ?wait,
            "broker does not answer: no new connections to it until it answers a probe"
        );
        states.insert(
            addr.to_string(),
            State::Suspect {
                cause,
                probe_at: Some(Instant::now() + wait),
                attempts: 1,
            },
        );
    }

    /// For a call about to dial `addr`: [`ConnError::Avoided`], to answer with at once, if
    /// `addr` is suspect. When the suspect's backoff has passed and no probe is running, starts
    /// one in the background.
    pub fn refuse(self: &Arc<Self>, addr: &str) -> Option<ConnError> {
        let mut states = self.states();
        let Some(State::Suspect {
            cause, probe_at, ..
        }) = states.get_mut(addr)
        else {
            return None;
        };
        let cause = ConnError::Avoided {
            addr: addr.to_string(),
            cause: Arc::new(cause.clone()),
        };
        if probe_at.is_some_and(|at| Instant::now() >= at) {
            *probe_at = None;
            tokio::spawn(self.clone().probe(addr.to_string()));
        }
        Some(cause)
    }

    /// Dials `addr` once: a connection set up ends the suspicion; a failure schedules the next
    /// probe after a longer backoff.
    async fn probe(self: Arc<Self>, addr: String) {
        match self.dial(&addr).await {
            Ok(()) => {
                info!(%addr, "broker answers again: it is dialled as usual");
                self.states().remove(&addr);
            }
            Err(cause) => {
                let mut states = self.states();
                if let Some(State::Suspect {
                    probe_at,
                    attempts,
                    cause: last,
                }) = states.get_mut(&addr)
                {
                    *attempts = attempts.saturating_add(1);
                    let wait = jittered_backoff(self.backoff.0, self.backoff.1, *attempts);
                    debug!(%addr, cause = %chain(&cause), probe_in = ?wait, "broker probe failed");
                    *probe_at = Some(Instant::now() + wait);
                    *last = cause;
                }
            }
        }
    }

    /// A new connection to `addr`, set up (ApiVersions answered, SASL done) and dropped.
    pub(super) async fn dial(&self, addr: &str) -> Result<(), ConnError> {
        let span = info_span!(
            target: crate::telemetry::TASK_TARGET,
            parent: None,
            "broker_probe",
            addr = %addr
        );
        let deadline = Instant::now() + self.config.connect_timeout;
        let conn = connect(
            addr,
            &self.config,
            Arc::new(ConnStats::default()),
            deadline,
            span,
        )
        .await?;
        conn.drain();
        Ok(())
    }

    /// Starts a stall check of `addr` unless one runs, it passed one lately, or it is suspect
    /// already. Returns whether one started; the check ends with [`Self::passed_check`] or
    /// [`Self::mark`].
    pub(super) fn begin_check(&self, addr: &str) -> bool {
        let mut states = self.states();
        match states.get(addr) {
            Some(State::Checking | State::Suspect { .. }) => false,
            Some(State::Alive { until }) if Instant::now() < *until => false,
            _ => {
                states.insert(addr.to_string(), State::Checking);
                true
            }
        }
    }

    /// `addr` answered a stall check: no other check for `quiet`.
    pub(super) fn passed_check(&self, addr: &str, quiet: Duration) {
        self.states().insert(
            addr.to_string(),
            State::Alive {
                until: Instant::now() + quiet,
            },
        );
    }
}
