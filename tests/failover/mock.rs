//! Failover behaviour against librdkafka's mock cluster: leaders that move mid-stream, brokers
//! that go down and come back, ordering modes, and the in-flight bound of idempotent batches.

use crate::common;

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use common::{forward_one, records, request, start, topic};
use futures::StreamExt;
use leaderlink::{
    forward::PartitionOrder,
    proto::v1::{Acks, ForwardRequest, PartitionData},
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_moved_mid_stream_keeps_the_stream_going_in_order() {
    let _shared = common::PROCESS.read().await;
    let h = start(|_| {}).await;
    let t = topic("stream-move");
    h.dev.create_topic(&t, 1).unwrap();
    h.dev.set_leader(&t, 0, 1).unwrap();
    let mut c = h.client.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut responses = c
        .forward_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut offsets = Vec::new();
    let mut leaders = std::collections::HashSet::new();
    for i in 0..60u64 {
        if i == 20 {
            h.dev.set_leader(&t, 0, 2).unwrap();
        }
        if i == 40 {
            h.dev.set_leader(&t, 0, 3).unwrap();
        }
        tx.send(request(i, Acks::All, &t, 0, records("m", 1)))
            .await
            .unwrap();
        let r = responses.next().await.unwrap().unwrap();
        assert_eq!(r.id, i);
        assert_eq!(r.partitions[0].error_code, 0, "{r:?}");
        offsets.push(r.partitions[0].base_offset);
        leaders.insert(r.partitions[0].leader_id);
    }
    assert_eq!(offsets, (0..60).collect::<Vec<i64>>());
    assert_eq!(leaders.len(), 3, "{leaders:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_then_up_is_retried_within_the_deadline() {
    let _shared = common::PROCESS.read().await;
    let h = start(|_| {}).await;
    let t = topic("down-up");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();
    let warm = forward_one(&mut c, request(0, Acks::All, &t, 0, records("w", 1)))
        .await
        .unwrap();
    let leader = warm.leader_id;
    h.dev.with(move |m| m.broker_down(leader)).unwrap();

    // While it is down, a short call ends UNAVAILABLE with the cause, not at a later time.
    let mut short = tonic::Request::new(request(1, Acks::All, &t, 0, records("s", 1)));
    short.set_timeout(Duration::from_millis(800));
    let e = c.forward(short).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{e:?}"
    );

    // A call with room in its deadline survives the outage.
    let mut patient = c.clone();
    let t2 = t.clone();
    let call = tokio::spawn(async move {
        forward_one(&mut patient, request(2, Acks::All, &t2, 0, records("p", 1))).await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.dev.with(move |m| m.broker_up(leader)).unwrap();
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.error_code, 0, "{r:?}");
    assert_eq!(r.leader_id, leader);
    let slots = h.server.forwarder.pool().slots();
    let slot = slots.iter().find(|s| s.broker_id == leader).unwrap();
    assert!(
        slot.stats.connects.load(Ordering::Relaxed) >= 2,
        "reconnected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_answers_unavailable_quickly() {
    let _shared = common::PROCESS.read().await;
    let h = start(|_| {}).await;
    let t = topic("gone");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();
    forward_one(&mut c, request(0, Acks::All, &t, 0, records("w", 1)))
        .await
        .unwrap();
    h.dev.with(|m| m.broker_down(-1)).unwrap();
    let started = tokio::time::Instant::now();
    let mut r = tonic::Request::new(request(1, Acks::All, &t, 0, records("x", 1)));
    r.set_timeout(Duration::from_secs(5));
    let e = c.forward(r).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("connect"),
        "names the last cause: {e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Spawns one acks=all call carrying `batch(i)` for `topic`.
fn spawn_call(
    h: &common::Harness,
    topic: &str,
    i: u64,
    batch: &impl Fn(u64) -> PartitionData,
) -> tokio::task::JoinHandle<Result<leaderlink::proto::v1::PartitionResult, tonic::Status>> {
    let mut c = h.client.clone();
    let mut p = batch(i);
    p.topic = topic.to_string();
    tokio::spawn(async move {
        let req = ForwardRequest {
            call_timeout_ms: 0,
            id: i,
            acks: Acks::All as i32,
            timeout_ms: 0,
            partitions: vec![p],
            transactional_id: String::new(),
            compression: 0,
        };
        forward_one(&mut c, req).await
    })
}

/// Runs 24 concurrent one-record calls on one partition with a slow leader; returns the peak
/// in flight on the leader connection.
async fn peak_for(ordering: PartitionOrder, batch: impl Fn(u64) -> PartitionData) -> (u64, u64) {
    peak_with(ordering, true, batch).await
}

/// [`peak_for`] with `idempotence` set as given.
async fn peak_with(
    ordering: PartitionOrder,
    idempotence: bool,
    batch: impl Fn(u64) -> PartitionData,
) -> (u64, u64) {
    let h = start(|cfg| {
        cfg.ordering = ordering;
        cfg.idempotence = idempotence;
        // Merging off: each call's batch is a request of its own, so the peak counts calls.
        cfg.max_batch_bytes = 0;
    })
    .await;
    let (t, warm) = common::warm_topic(&h, "order", 1).await;
    h.dev
        .set_leader_latency(Duration::from_millis(100))
        .unwrap();
    let calls: Vec<_> = (1..=24u64).map(|i| spawn_call(&h, &t, i, &batch)).collect();
    let mut ok = 0;
    for call in calls {
        if call.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    let slots = h.server.forwarder.pool().slots();
    let slot = slots
        .iter()
        .find(|s| s.broker_id == warm.leader_id)
        .unwrap();
    (slot.stats.peak_in_flight.load(Ordering::Relaxed), ok)
}

fn plain(i: u64) -> PartitionData {
    PartitionData {
        topic: String::new(),
        partition: 0,
        record_batch: Bytes::new(),
        records: records(&format!("r{i}"), 1),
    }
}

fn idempotent(i: u64) -> PartitionData {
    PartitionData {
        topic: String::new(),
        partition: 0,
        record_batch: common::raw_batch(&[&format!("i{i}")], 4242, i as i32),
        records: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_ordering_keeps_one_request_in_flight_per_partition() {
    let _shared = common::PROCESS.read().await;
    let (peak, ok) = peak_for(PartitionOrder::Strict, plain).await;
    assert_eq!(ok, 24);
    assert_eq!(peak, 1);
    // Batches without a producer id (leaderlink's own idempotence off) are not gated.
    let (peak, ok) = peak_with(PartitionOrder::Pipelined, false, plain).await;
    assert_eq!(ok, 24);
    assert!(peak > 5, "pipelined: {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_batches_have_at_most_five_requests_in_flight_per_partition() {
    let _shared = common::PROCESS.read().await;
    let (peak, ok) = peak_for(PartitionOrder::Pipelined, idempotent).await;
    // Whatever the mock answers about the sequences, the gRPC calls complete...
    assert_eq!(ok, 24);
    // ...and never more than five of these batches were in flight at once.
    assert_eq!(peak, 5);
}

/// Starts `held` calls for one partition of a slow leader, cancels them while their requests
/// are in flight, then makes one more call for the partition; returns the peak in flight on the
/// leader connection.
async fn peak_after_cancelled(
    ordering: PartitionOrder,
    held: u64,
    batch: impl Fn(u64) -> PartitionData,
) -> u64 {
    let h = start(|cfg| cfg.ordering = ordering).await;
    let (t, warm) = common::warm_topic(&h, "gate", 1).await;
    // An acks=all call too: leaderlink's idempotent producer id is obtained before the test's
    // requests, so only Produce requests are in flight below.
    let mut c = h.client.clone();
    let r = forward_one(&mut c, request(0, Acks::All, &t, 0, records("warm", 1)))
        .await
        .unwrap();
    assert_eq!(r.error_code, 0, "{r:?}");
    h.dev
        .set_leader_latency(Duration::from_millis(800))
        .unwrap();
    let call = |i: u64| spawn_call(&h, &t, i, &batch);
    let cancelled: Vec<_> = (1..=held).map(call).collect();
    let slots = h.server.forwarder.pool().slots();
    let slot = slots
        .iter()
        .find(|s| s.broker_id == warm.leader_id)
        .unwrap()
        .clone();
    // Their requests are on the wire...
    let started = tokio::time::Instant::now();
    while slot.stats.in_flight.load(Ordering::Relaxed) < held {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...when their callers go away (the gRPC calls are reset; the server drops the calls).
    for c in &cancelled {
        c.abort();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = call(held + 1).await.unwrap();
    assert_eq!(last.map(|r| r.error_code).ok(), Some(0));
    slot.stats.peak_in_flight.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_calls_request_keeps_its_partition_slot_until_answered() {
    let _shared = common::PROCESS.read().await;
    // Strict: the next batch of the partition waits for the cancelled call's request.
    assert_eq!(
        peak_after_cancelled(PartitionOrder::Strict, 1, plain).await,
        1
    );
    // Idempotent: five requests in flight for the partition, whoever still waits on them.
    assert_eq!(
        peak_after_cancelled(PartitionOrder::Pipelined, 5, idempotent).await,
        5
    );
}

/// A drained leader connection finishes its requests in flight; the partition's next request
/// does not go out on a new connection before they are answered (the broker handles each
/// connection on its own, so it could overtake them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_drain_the_next_request_waits_for_the_old_connections_requests() {
    let _shared = common::PROCESS.read().await;
    let h = start(|_| {}).await;
    let (t, warm) = common::warm_topic(&h, "drain-order", 1).await;
    h.dev
        .set_leader_latency(Duration::from_millis(800))
        .unwrap();
    let slots = h.server.forwarder.pool().slots();
    let slot = slots
        .iter()
        .find(|s| s.broker_id == warm.leader_id)
        .unwrap()
        .clone();
    let mut c = h.client.clone();
    let first = tokio::spawn(async move {
        forward_one(&mut c, request(1, Acks::Leader, &t, 0, records("a", 1))).await
    });
    let started = tokio::time::Instant::now();
    while slot.stats.in_flight.load(Ordering::Relaxed) < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (drained, in_flight) = h.server.forwarder.pool().drain(warm.leader_id);
    assert_eq!((drained, in_flight), (1, 1));
    let t = warm.topic.clone();
    let mut c = h.client.clone();
    let second = forward_one(&mut c, request(2, Acks::Leader, &t, 0, records("b", 1)))
        .await
        .unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!((first.error_code, second.error_code), (0, 0));
    assert!(
        second.base_offset > first.base_offset,
        "{first:?} {second:?}"
    );
    // The slot's counters span its connections: never two requests in flight at once.
    assert_eq!(slot.stats.peak_in_flight.load(Ordering::Relaxed), 1);
    assert_eq!(slot.stats.connects.load(Ordering::Relaxed), 2);
}
