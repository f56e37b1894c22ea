//! ForwardBatches against the mock cluster: many requests per message, answers routed by id,
//! ForwardStream's ordering per partition, malformed requests and sheds answered in band while
//! the others proceed, and responses that complete together sharing a message.

use crate::common;

use std::time::Duration;

use common::{records, request, start, topic};
use futures::StreamExt;
use leaderlink::proto::v1::{Acks, ForwardBatch, ForwardBatchResponse, ForwardResponse};
use tonic::Code;

/// Sends `batches` on one ForwardBatches call; returns every response message.
async fn send(h: &common::Harness, batches: Vec<ForwardBatch>) -> Vec<ForwardBatchResponse> {
    let mut c = h.client.clone();
    c.forward_batches(futures::stream::iter(batches))
        .await
        .unwrap()
        .into_inner()
        .map(|m| m.unwrap())
        .collect()
        .await
}

fn flat(msgs: &[ForwardBatchResponse]) -> Vec<ForwardResponse> {
    msgs.iter().flat_map(|m| m.responses.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_routed_by_id_in_partition_order_and_a_bad_request_fails_alone() {
    let h = start(|_| {}).await;
    let t = topic("batches");
    h.dev.create_topic(&t, 2).unwrap();
    // Two messages of 20 requests alternating over two partitions; one malformed request (a
    // bad topic name) in the middle of the first.
    let mut first: Vec<_> = (0..20u64)
        .map(|i| request(i, Acks::Leader, &t, (i % 2) as i32, records("b", 1)))
        .collect();
    first.insert(
        10,
        request(1000, Acks::Leader, "bad topic", 0, records("b", 1)),
    );
    let second: Vec<_> = (20..40u64)
        .map(|i| request(i, Acks::Leader, &t, (i % 2) as i32, records("b", 1)))
        .collect();
    let msgs = send(
        &h,
        vec![
            ForwardBatch { requests: first },
            ForwardBatch { requests: second },
        ],
    )
    .await;
    let all = flat(&msgs);
    assert_eq!(all.len(), 41);
    let bad = all.iter().find(|r| r.id == 1000).unwrap();
    assert_eq!(bad.status_code, Code::InvalidArgument as i32, "{bad:?}");
    assert!(bad.status_message.contains("topic"), "{bad:?}");
    for p in 0..2u64 {
        let in_partition: Vec<(u64, i64)> = all
            .iter()
            .filter(|r| r.id < 1000 && r.id % 2 == p)
            .map(|r| {
                assert_eq!(r.status_code, 0, "{r:?}");
                assert_eq!(r.partitions[0].error_code, 0, "{r:?}");
                (r.id, r.partitions[0].base_offset)
            })
            .collect();
        let expected: Vec<(u64, i64)> = (0..20).map(|k| (2 * k + p, k as i64)).collect();
        assert_eq!(
            in_partition, expected,
            "partition {p}: answers and offsets in request order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_that_complete_together_share_a_message() {
    let h = start(|_| {}).await;
    let (t, _) = common::warm_topic(&h, "together", 4).await;
    // A slow leader: the 64 requests are all in flight when their answers come.
    h.dev
        .set_leader_latency(Duration::from_millis(200))
        .unwrap();
    let reqs: Vec<_> = (0..64u64)
        .map(|i| request(i, Acks::Leader, &t, (i % 4) as i32, records("t", 1)))
        .collect();
    let msgs = send(&h, vec![ForwardBatch { requests: reqs }]).await;
    let all = flat(&msgs);
    assert_eq!(all.len(), 64);
    assert!(all.iter().all(|r| r.partitions[0].error_code == 0));
    eprintln!("64 responses in {} messages", msgs.len());
    assert!(
        msgs.len() <= 16,
        "64 responses completing together took {} messages",
        msgs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_in_band_per_request() {
    // Four calls at once in all; the stream itself takes one.
    let h = start(|cfg| cfg.max_concurrent_calls = 4).await;
    let (t, _) = common::warm_topic(&h, "shed-batches", 1).await;
    h.dev
        .set_leader_latency(Duration::from_millis(200))
        .unwrap();
    let reqs: Vec<_> = (0..24u64)
        .map(|i| request(i, Acks::Leader, &t, 0, records("s", 1)))
        .collect();
    let all = flat(&send(&h, vec![ForwardBatch { requests: reqs }]).await);
    assert_eq!(all.len(), 24);
    let shed = all
        .iter()
        .filter(|r| r.status_code == Code::ResourceExhausted as i32)
        .count();
    let ok = all
        .iter()
        .filter(|r| r.status_code == 0 && r.partitions[0].error_code == 0)
        .count();
    assert_eq!(ok + shed, 24, "{all:?}");
    assert!(shed >= 1 && ok >= 1, "ok={ok} shed={shed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_own_timeout_bounds_it() {
    let h = start(|_| {}).await;
    let (t, _) = common::warm_topic(&h, "own-timeout", 1).await;
    h.dev
        .set_leader_latency(Duration::from_millis(500))
        .unwrap();
    let mut short = request(1, Acks::Leader, &t, 0, records("o", 1));
    short.call_timeout_ms = 100;
    let long = request(2, Acks::Leader, &t, 0, records("o", 1));
    let started = tokio::time::Instant::now();
    let msgs = send(
        &h,
        vec![ForwardBatch {
            requests: vec![short, long],
        }],
    )
    .await;
    let all = flat(&msgs);
    let short = all.iter().find(|r| r.id == 1).unwrap();
    let long = all.iter().find(|r| r.id == 2).unwrap();
    assert_eq!(
        short.status_code,
        Code::DeadlineExceeded as i32,
        "{short:?}"
    );
    assert_eq!(long.status_code, 0, "{long:?}");
    assert_eq!(long.partitions[0].error_code, 0, "{long:?}");
    // The short one's answer left first, on its own.
    let ids: Vec<u64> = msgs[0].responses.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![1], "{msgs:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
}
