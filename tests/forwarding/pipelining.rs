//! Pipelining proof without timing assertions: with a slow leader and 128 concurrent callers on
//! one partition, count how many requests were in flight at once on the leader connection.

use crate::common;

use std::{sync::atomic::Ordering, time::Duration};

use common::{forward_one, records, request, start, topic};
use leaderlink::proto::v1::Acks;

const CALLERS: u64 = 128;

/// Returns (peak requests in flight on the leader connection, successful calls).
async fn run(max_in_flight: Option<usize>, leader_latency: Duration) -> (u64, u64) {
    let h = start(|cfg| {
        // Merging off: each call's record is a request of its own, so the peak counts the
        // requests the callers pipeline (merged, they would share a few requests).
        cfg.max_batch_bytes = 0;
        if let Some(n) = max_in_flight {
            cfg.max_in_flight = n;
        }
    })
    .await;
    let t = topic("pipe");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();
    // Metadata and the leader connection exist before the load starts.
    let warm = forward_one(&mut c, request(0, Acks::Leader, &t, 0, records("w", 1)))
        .await
        .unwrap();
    assert_eq!(warm.error_code, 0);
    h.dev.set_leader_latency(leader_latency).unwrap();

    let tasks: Vec<_> = (1..=CALLERS)
        .map(|i| {
            let mut c = h.client.clone();
            let t = t.clone();
            tokio::spawn(async move {
                let mut r = tonic::Request::new(request(i, Acks::Leader, &t, 0, records("p", 1)));
                r.set_timeout(Duration::from_secs(60));
                let resp = c.forward(r).await.unwrap().into_inner();
                resp.partitions[0].error_code == 0
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += u64::from(t.await.unwrap());
    }
    let slots = h.server.forwarder.pool().slots();
    let leader = slots
        .iter()
        .find(|s| s.broker_id == warm.leader_id)
        .expect("leader slot");
    let peak = leader.stats.peak_in_flight.load(Ordering::Relaxed);
    let sent = leader.stats.sent.load(Ordering::Relaxed);
    assert!(sent > CALLERS, "every call went over the leader connection");
    (peak, ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_max_in_flight_pipelines_the_callers() {
    // Long enough that all callers are in before the first answer, even on a loaded machine:
    // each request stays in flight for a whole second.
    let (peak, ok) = run(None, Duration::from_secs(1)).await;
    eprintln!("peak requests in flight on the leader connection: {peak}");
    assert_eq!(ok, CALLERS);
    assert!(
        peak >= 100,
        "peak in flight on the leader connection was {peak}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_one_forwards_one_request_at_a_time() {
    let (peak, ok) = run(Some(1), Duration::from_millis(50)).await;
    assert_eq!(ok, CALLERS);
    assert_eq!(peak, 1);
}
