//! The measured load: workers in a closed loop (or paced by a token bucket), each recording
//! its calls' latencies, and the once-a-second progress line.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::{task::JoinHandle, time::Instant};

use crate::{
    Args,
    target::{CALL_DEADLINE, Target, call},
    values::Values,
};

/// Counters the workers share with the reporter.
pub struct Shared {
    pub records: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicU64,
    pub stop: AtomicBool,
    /// One histogram per worker, locked by its worker per sample and by the reporter once a
    /// second.
    pub hists: Vec<Mutex<Histogram<u64>>>,
    /// Per worker, the latencies of its successful calls only (what an admitted call sees when
    /// others are shed).
    pub ok_hists: Vec<Mutex<Histogram<u64>>>,
}

pub fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h with 3 significant digits; `record` saturates above.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

pub fn merged(shared: &Shared) -> Histogram<u64> {
    merge(&shared.hists)
}

/// The workers' histograms of successful calls, merged.
pub fn merged_ok(shared: &Shared) -> Histogram<u64> {
    merge(&shared.ok_hists)
}

fn merge(hists: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
    let mut all = new_hist();
    for h in hists {
        all.add(&*h.lock().unwrap_or_else(|p| p.into_inner()))
            .expect("same bounds");
    }
    all
}

impl Shared {
    /// Zeroed counters and one histogram per worker.
    pub fn new(workers: usize) -> Self {
        Shared {
            records: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            hists: (0..workers).map(|_| Mutex::new(new_hist())).collect(),
            ok_hists: (0..workers).map(|_| Mutex::new(new_hist())).collect(),
        }
    }
}

/// Open-loop pacing (`--rate`): a bucket of call tokens refilled every millisecond, closed when
/// the run stops. `None` for the closed loop.
pub fn pacer(args: &Args, shared: &Arc<Shared>) -> Option<Arc<tokio::sync::Semaphore>> {
    let tokens = (args.rate > 0).then(|| Arc::new(tokio::sync::Semaphore::new(0)))?;
    let (rate, shared, bucket) = (args.rate, shared.clone(), tokens.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut owed = 0.0f64;
        while !shared.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            owed += rate as f64 / 1000.0;
            let whole = owed.floor();
            owed -= whole;
            // Bounded: a backlog larger than one second of calls is not kept.
            if bucket.available_permits() < rate as usize {
                bucket.add_permits(whole as usize);
            }
        }
        bucket.close();
    });
    Some(tokens)
}

/// Starts `--concurrency` workers, spread over `targets`; each loops over the partitions
/// (round robin) until `shared.stop`.
pub fn spawn_workers(
    args: &Arc<Args>,
    shared: &Arc<Shared>,
    targets: &[Target],
    tokens: Option<Arc<tokio::sync::Semaphore>>,
    values: &Values,
) -> Vec<JoinHandle<()>> {
    (0..args.concurrency)
        .map(|w| {
            let (shared, args, values) = (shared.clone(), args.clone(), values.clone());
            let mut target = targets[w % targets.len()].clone();
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let mut n = w as u64;
                while !shared.stop.load(Ordering::Relaxed) {
                    if let Some(tokens) = &tokens {
                        match tokens.acquire().await {
                            Ok(t) => t.forget(),
                            Err(_) => break,
                        }
                    }
                    let partition = (n % args.partitions as u64) as i32;
                    n += args.concurrency as u64;
                    shared.in_flight.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let r = call(&mut target, &args, partition, &values, n, CALL_DEADLINE).await;
                    let micros = t.elapsed().as_micros().max(1) as u64;
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    shared.hists[w]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .saturating_record(micros);
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Ok(k) => {
                            shared.records.fetch_add(k, Ordering::Relaxed);
                            shared.ok_hists[w]
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .saturating_record(micros);
                        }
                        Err(e) => {
                            if shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("call failed: {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

/// Prints progress once a second on stderr until `args.duration` has passed since `started`.
pub async fn progress(args: &Args, shared: &Shared, started: Instant) {
    let mut last = 0;
    while started.elapsed() < args.duration {
        let left = args.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        let now = shared.records.load(Ordering::Relaxed);
        let p99 = merged(shared).value_at_quantile(0.99) as f64 / 1000.0;
        eprintln!(
            "[{:>5.1}s] {:>10} records/s  in flight {:>5}  p99 so far {:.2} ms",
            started.elapsed().as_secs_f64(),
            now - last,
            shared.in_flight.load(Ordering::Relaxed),
            p99
        );
        last = now;
    }
}
