//! Coalescing against the mock cluster: concurrent calls for different partitions of one leader
//! share Produce requests, and every call still gets its own partition's answer.

use crate::common;

use std::{collections::HashSet, time::Duration};

use common::{forward_one, read_back, records, request, start, topic};
use leaderlink::proto::v1::Acks;

const PARTITIONS: i32 = 12;
const CALLS_PER_PARTITION: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_for_one_leader_share_requests_and_get_their_own_offsets() {
    // One request in flight per connection and a slow leader: the calls queue behind it, so
    // what is sent is decided by the packing alone.
    let h = start(|cfg| cfg.max_in_flight = 1).await;
    let t = topic("coalesce");
    h.dev.create_topic(&t, PARTITIONS).unwrap();
    let mut c = h.client.clone();
    let mut leaders = HashSet::new();
    for p in 0..PARTITIONS {
        let r = forward_one(&mut c, request(0, Acks::Leader, &t, p, records("warm", 1)))
            .await
            .unwrap();
        assert_eq!(
            (r.error_code, r.base_offset),
            (0, 0),
            "warm-up of {p}: {r:?}"
        );
        leaders.insert(r.leader_id);
    }
    let sent = |h: &common::Harness| h.server.forwarder.pool().requests_sent();
    let before = sent(&h);
    h.dev
        .set_leader_latency(Duration::from_millis(500))
        .unwrap();

    let calls: Vec<_> = (0..PARTITIONS * CALLS_PER_PARTITION)
        .map(|i| {
            let mut c = h.client.clone();
            let t = t.clone();
            let p = i % PARTITIONS;
            let value = format!("call-{i}");
            tokio::spawn(async move {
                let mut recs = records("x", 1);
                recs[0].value = Some(value.clone().into());
                let mut r = tonic::Request::new(request(i as u64 + 1, Acks::Leader, &t, p, recs));
                r.set_timeout(Duration::from_secs(60));
                let resp = c.forward(r).await.unwrap().into_inner();
                assert_eq!(resp.partitions.len(), 1);
                (p, value, resp.partitions[0].clone())
            })
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    h.dev.set_leader_latency(Duration::ZERO).unwrap();
    let requests = sent(&h) - before;
    let n_calls = results.len() as u64;
    eprintln!(
        "{n_calls} calls over {} leaders in {requests} Produce requests",
        leaders.len()
    );

    // Per leader: the first call goes alone, the next round takes what came while it was
    // written, the last takes the rest; at most one batch per partition per request makes each
    // of the two later rounds at most CALLS_PER_PARTITION requests. Without coalescing every
    // call is a request of its own.
    let bound = leaders.len() as u64 * (1 + 2 * CALLS_PER_PARTITION as u64);
    assert!(
        requests <= bound && requests < n_calls,
        "{n_calls} calls took {requests} requests (bound {bound})"
    );

    // Each call's answer is its own partition's: the offset it got holds its value.
    for p in 0..PARTITIONS {
        let back = read_back(h.dev.bootstrap(), &t, p, 1 + CALLS_PER_PARTITION as usize);
        let mut offsets = HashSet::new();
        for (_, value, r) in results.iter().filter(|(rp, _, _)| *rp == p) {
            assert_eq!(r.error_code, 0, "partition {p}: {r:?}");
            assert_eq!(r.partition, p);
            assert!(offsets.insert(r.base_offset), "offset given twice: {r:?}");
            let at = usize::try_from(r.base_offset).unwrap();
            assert_eq!(
                back[at].0,
                value.as_bytes(),
                "partition {p} offset {at} holds another call's record"
            );
        }
        assert_eq!(offsets.len(), CALLS_PER_PARTITION as usize);
    }
}
