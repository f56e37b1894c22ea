//! Overload: the surplus is shed with RESOURCE_EXHAUSTED, admitted calls succeed, and the
//! per-connection queue never exceeds its bound (observed through the Admin service).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{admin, connections, forward_one, records, request, start, warm_topic};
use leaderlink::proto::v1::{Acks, GetStatsRequest, Record};
use tonic::Code;

/// Runs `callers` concurrent one-record calls; returns (ok, resource_exhausted, messages of
/// other failures).
async fn surge(h: &common::Harness, t: &str, callers: u64) -> (u64, u64, Vec<String>) {
    let calls: Vec<_> = (0..callers)
        .map(|i| {
            let mut c = h.client.clone();
            let t = t.to_string();
            tokio::spawn(async move {
                forward_one(&mut c, request(i, Acks::Leader, &t, 0, records("s", 1))).await
            })
        })
        .collect();
    let (mut ok, mut shed, mut other) = (0, 0, Vec::new());
    for c in calls {
        match c.await.unwrap() {
            Ok(r) if r.error_code == 0 => ok += 1,
            Ok(r) => other.push(format!("{r:?}")),
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("retry later"), "{s:?}");
                shed += 1;
            }
            Err(s) => other.push(format!("{s:?}")),
        }
    }
    (ok, shed, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_concurrency_limit_sheds_the_surplus() {
    let h = start(|cfg| cfg.max_concurrent_calls = 8).await;
    let (t, _) = warm_topic(&h, "shed", 1).await;
    h.dev
        .set_leader_latency(Duration::from_millis(300))
        .unwrap();

    let (ok, shed, other) = surge(&h, &t, 80).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(ok + shed, 80);
    assert!(
        shed >= 40,
        "most of the surplus is shed: ok={ok} shed={shed}"
    );
    assert!(ok >= 8, "admitted calls succeed: ok={ok}");

    let mut a = admin(&h).await;
    let stats = a.get_stats(GetStatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.sheds, shed, "{stats:?}");
    assert_eq!(stats.calls_resource_exhausted, shed);
    assert_eq!(stats.calls_ok, ok + 1);
    let conns = connections(&mut a).await;
    let peak = conns.iter().map(|c| c.peak_in_flight).max().unwrap();
    assert!(
        peak <= 8,
        "no more than the admitted calls reached a leader: {peak}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connection_queue_answers_resource_exhausted_and_stays_bounded() {
    let h = start(|cfg| {
        cfg.max_in_flight = 2;
        cfg.max_queued_per_connection = 4;
        // One request per call: merged, the calls queued when the flusher runs would share
        // one request, and how many requests fill the in-flight slots would depend on timing.
        cfg.max_batch_bytes = 0;
    })
    .await;
    let (t, _) = warm_topic(&h, "queue", 1).await;
    h.dev
        .set_leader_latency(Duration::from_millis(200))
        .unwrap();

    let (ok, shed, other) = surge(&h, &t, 40).await;
    assert!(other.is_empty(), "{other:?}");
    assert!(shed >= 1 && ok >= 6, "ok={ok} shed={shed}");

    let mut a = admin(&h).await;
    let conns = connections(&mut a).await;
    let leader = conns.iter().find(|c| c.sent > 0).unwrap();
    assert!(leader.peak_queued <= 4, "{leader:?}");
    assert_eq!(leader.peak_in_flight, 2, "{leader:?}");
    assert_eq!(leader.rejected, shed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_byte_budget_is_refused() {
    // The smallest budgets: a request under max_request_bytes whose Produce encoding (batch
    // header, topic, framing) exceeds the connection's byte budget can never be sent.
    let h = start(|cfg| {
        cfg.max_request_bytes = 1024;
        cfg.max_in_flight_bytes_per_connection = 1024;
    })
    .await;
    let (t, _) = warm_topic(&h, "bytes", 1).await;
    let mut c = h.client.clone();
    let mut big = request(1, Acks::Leader, &t, 0, vec![]);
    big.partitions[0].records = vec![Record {
        key: None,
        value: Some(Bytes::from(vec![b'x'; 960])),
        headers: vec![],
        timestamp_ms: 0,
    }];
    let e = forward_one(&mut c, big).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("max_in_flight_bytes_per_connection"),
        "{e:?}"
    );
    // Small requests still pass.
    let r = forward_one(&mut c, request(2, Acks::Leader, &t, 0, records("s", 1)))
        .await
        .unwrap();
    assert_eq!(r.error_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_requests_count_against_the_concurrency_limit() {
    use futures::StreamExt;
    let h = start(|cfg| cfg.max_concurrent_calls = 4).await;
    let (t, _) = warm_topic(&h, "stream-shed", 6).await;
    h.dev
        .set_leader_latency(std::time::Duration::from_millis(300))
        .unwrap();
    let mut c = h.client.clone();
    // One request per partition: nothing orders them, so they run concurrently.
    let reqs: Vec<_> = (0..24u64)
        .map(|i| request(i, Acks::Leader, &t, (i % 6) as i32, records("s", 1)))
        .collect();
    let all: Vec<_> = c
        .forward_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(all.len(), 24);
    let shed = all
        .iter()
        .filter(|r| r.status_code == Code::ResourceExhausted as i32)
        .count();
    let ok = all
        .iter()
        .filter(|r| r.status_code == 0 && r.partitions[0].error_code == 0)
        .count();
    assert_eq!(ok + shed, 24);
    assert!(shed >= 1 && ok >= 4, "ok={ok} shed={shed}");
    let conns = connections(&mut admin(&h).await).await;
    let peak = conns.iter().map(|c| c.peak_in_flight).max().unwrap();
    assert!(peak <= 4, "{peak}");
}
