//! Record accumulation against the mock cluster: the `records` of concurrent calls for one
//! partition share record batches at the leader (counted with a Fetch of the leader's log), each
//! call's offsets point at its own records, order follows arrival, an error about a shared batch
//! reaches every call in it, and a call whose deadline passes while queued is withdrawn while the
//! others go out. A property test runs random interleavings.

use crate::common;

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use common::{Harness, forward_one, kafka_client::read_batches, records, request, start, topic};
use futures::StreamExt;
use leaderlink::{
    kafka::{metadata::Route, pool::Slot},
    proto::v1::{Acks, ForwardRequest, PartitionResult},
};
use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, TestCaseError, TestRunner},
};
use tonic::Code;

/// The leader's address of `topic`-`partition` in leaderlink's leader map.
fn leader_of(h: &Harness, topic: &str, partition: i32) -> String {
    match h
        .server
        .forwarder
        .metadata()
        .leader_map()
        .route(topic, partition)
    {
        Route::Leader(b, _) => b.addr(),
        other => panic!("no leader for {topic}-{partition}: {other:?}"),
    }
}

/// The harness's one leader connection slot, once a request is in flight on it.
async fn first_request_in_flight(h: &Harness) -> Arc<Slot> {
    let slot = h.server.forwarder.pool().slots()[0].clone();
    while slot.stats.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    slot
}

/// Call `i`'s records: `n` of them, values `"{tag}{i}-{j}"`.
fn call_request(i: u64, topic: &str, partition: i32, n: usize, tag: &str) -> ForwardRequest {
    let mut recs = records("x", n);
    for (j, r) in recs.iter_mut().enumerate() {
        r.value = Some(Bytes::from(format!("{tag}{i}-{j}")));
    }
    request(i, Acks::Leader, topic, partition, recs)
}

/// Asserts that `r`'s records, `"{tag}{i}-{j}"` for j < n, sit at its offsets in `log`
/// (offset → value).
fn assert_own_records(log: &HashMap<i64, Bytes>, r: &PartitionResult, i: u64, n: usize, tag: &str) {
    for j in 0..n {
        let at = r.base_offset + j as i64;
        assert_eq!(
            log.get(&at).map(|v| v.as_ref()),
            Some(format!("{tag}{i}-{j}").as_bytes()),
            "call {i}'s record {j} is not at offset {at}: {r:?}"
        );
    }
}

fn flatten(batches: &[Vec<(i64, Bytes)>]) -> HashMap<i64, Bytes> {
    batches.iter().flatten().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_leader_batches_in_arrival_order_with_their_own_offsets() {
    // One request in flight and a slow leader: while one is answered, the stream's next
    // requests queue, and the next round sends them as one batch.
    let h = start(|cfg| cfg.max_in_flight = 1).await;
    let (t, _) = common::warm_topic(&h, "accumulate", 1).await;
    h.dev
        .set_leader_latency(Duration::from_millis(100))
        .unwrap();
    const CALLS: u64 = 60;
    let n_of = |i: u64| 1 + (i % 3) as usize;
    let reqs: Vec<ForwardRequest> = (1..=CALLS)
        .map(|i| call_request(i, &t, 0, n_of(i), "s"))
        .collect();
    let mut c = h.client.clone();
    let answers: Vec<_> = c
        .forward_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await;
    h.dev.set_leader_latency(Duration::ZERO).unwrap();
    assert_eq!(answers.len(), CALLS as usize);

    let batches = read_batches(&leader_of(&h, &t, 0), &t, 0).await;
    let log = flatten(&batches);
    let total: usize = (1..=CALLS).map(n_of).sum();
    assert_eq!(log.len(), 1 + total, "the warm-up record and every call's");
    // Arrival order on the stream is offset order, without gaps: each call's records follow
    // the previous call's.
    let mut next = 1;
    let mut starts = vec![0];
    for (k, a) in answers.iter().enumerate() {
        let i = k as u64 + 1;
        assert_eq!(a.id, i, "answers in request order");
        let r = &a.partitions[0];
        assert_eq!((r.error_code, r.attempts), (0, 1), "{r:?}");
        assert_eq!(r.base_offset, next, "call {i} follows call {}", i - 1);
        assert_own_records(&log, r, i, n_of(i), "s");
        next += n_of(i) as i64;
        starts.push(r.base_offset);
    }
    // Fewer batches than calls: records of several calls shared batches, and no call's
    // records were split over two batches.
    eprintln!("{CALLS} calls in {} leader batches", batches.len() - 1);
    assert!(
        batches.len() < CALLS as usize / 2,
        "{} batches for {CALLS} calls",
        batches.len()
    );
    for b in &batches {
        assert!(
            starts.contains(&b[0].0),
            "a batch starts inside a call: {b:?}"
        );
    }
    let (sent_batches, sent_records) = h.server.forwarder.pool().batches_sent();
    assert_eq!(sent_records, 1 + total as u64);
    assert_eq!(sent_batches, batches.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_while_queued_is_withdrawn_and_the_others_go_out() {
    let h = start(|cfg| cfg.max_in_flight = 1).await;
    let (t, _) = common::warm_topic(&h, "withdraw", 1).await;
    h.dev
        .set_leader_latency(Duration::from_millis(400))
        .unwrap();
    let call = |i: u64| {
        let mut c = h.client.clone();
        let req = call_request(i, &t, 0, 2, "w");
        tokio::spawn(async move {
            let mut r = tonic::Request::new(req);
            r.set_timeout(Duration::from_secs(10));
            c.forward(r)
                .await
                .map(|r| r.into_inner().partitions[0].clone())
        })
    };
    // Call 1 takes the connection's one slot for 400 ms; 2 (100 ms) and 3 queue behind it.
    let first = call(1);
    first_request_in_flight(&h).await;
    // Call 2 has 100 ms, given as a ForwardStream request's own `call_timeout_ms`: a unary
    // call's `grpc-timeout` also starts tonic's timer in this client, which ends the call
    // CANCELLED whenever leaderlink's DEADLINE_EXCEEDED, sent 5 ms before that limit, comes
    // later than it (as on a busy machine).
    let short = {
        let mut c = h.client.clone();
        let mut req = call_request(2, &t, 0, 2, "w");
        req.call_timeout_ms = 100;
        tokio::spawn(async move {
            let mut answers = c
                .forward_stream(futures::stream::iter([req]))
                .await
                .unwrap()
                .into_inner();
            answers.next().await.unwrap().unwrap()
        })
    };
    let last = call(3);
    let e = short.await.unwrap();
    assert_eq!(
        Code::from_i32(e.status_code),
        Code::DeadlineExceeded,
        "{e:?}"
    );
    let first = first.await.unwrap().unwrap();
    let last = last.await.unwrap().unwrap();
    h.dev.set_leader_latency(Duration::ZERO).unwrap();
    assert_eq!((first.error_code, first.base_offset), (0, 1), "{first:?}");
    assert_eq!((last.error_code, last.base_offset), (0, 3), "{last:?}");
    let log = flatten(&read_batches(&leader_of(&h, &t, 0), &t, 0).await);
    assert_eq!(
        log.len(),
        5,
        "warm-up, call 1 and call 3; call 2 never sent"
    );
    assert_own_records(&log, &first, 1, 2, "w");
    assert_own_records(&log, &last, 3, 2, "w");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_about_a_shared_batch_reaches_every_call_in_it() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let h = start(|cfg| cfg.max_in_flight = 1).await;
    let (t, _) = common::warm_topic(&h, "batch-error", 1).await;
    // The next Produce request (call 1's) is answered; the one after it, carrying the batch
    // the other calls share, is refused whole with a non-retriable error and no record errors.
    h.dev.with(|m| {
        m.request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
            ],
        )
    });
    h.dev.set_leader_latency(Duration::from_secs(1)).unwrap();
    let (batches_before, _) = h.server.forwarder.pool().batches_sent();
    // Call 1 takes the connection's one slot for a second; calls 2..=6 queue behind it and go
    // out together, in one record batch.
    let mut c = h.client.clone();
    let first = tokio::spawn({
        let req = call_request(1, &t, 0, 2, "e");
        async move { forward_one(&mut c, req).await }
    });
    let slot = first_request_in_flight(&h).await;
    const CALLS: u64 = 6;
    let reqs: Vec<ForwardRequest> = (2..=CALLS)
        .map(|i| call_request(i, &t, 0, 2, "e"))
        .collect();
    let mut c = h.client.clone();
    let rest = tokio::spawn(async move {
        c.forward_stream(futures::stream::iter(reqs))
            .await
            .unwrap()
            .into_inner()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>()
            .await
    });
    while slot.stats.queued.load(Ordering::SeqCst) < CALLS - 1 && !first.is_finished() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        !first.is_finished(),
        "calls 2..={CALLS} were not all queued while call 1 was in flight"
    );
    let answers = rest.await.unwrap();
    let first = first.await.unwrap().unwrap();
    h.dev.set_leader_latency(Duration::ZERO).unwrap();

    assert_eq!((first.error_code, first.base_offset), (0, 1), "{first:?}");
    assert_eq!(answers.len(), CALLS as usize - 1);
    for a in &answers {
        let r = &a.partitions[0];
        assert_eq!(
            (r.error_name.as_str(), r.attempts, r.base_offset),
            ("INVALID_RECORD", 1, -1),
            "call {}: {r:?}",
            a.id
        );
        assert!(r.record_errors.is_empty(), "call {}: {r:?}", a.id);
    }
    let (batches_after, _) = h.server.forwarder.pool().batches_sent();
    assert_eq!(
        batches_after - batches_before,
        2,
        "call 1's batch and the one the others shared"
    );
    let log = flatten(&read_batches(&leader_of(&h, &t, 0), &t, 0).await);
    assert_eq!(log.len(), 3, "the warm-up and call 1's records only");
    assert_own_records(&log, &first, 1, 2, "e");
}

/// One call of a random interleaving.
#[derive(Debug, Clone)]
struct Planned {
    partition: i32,
    records: usize,
    /// Sent this long after the start.
    delay_ms: u64,
    /// A deadline close to the leader's latency: it may pass while the call is queued.
    short: bool,
}

fn planned() -> impl Strategy<Value = Planned> {
    (0..2i32, 1..4usize, 0..30u64, prop::bool::weighted(0.2)).prop_map(
        |(partition, records, delay_ms, short)| Planned {
            partition,
            records,
            delay_ms,
            short,
        },
    )
}

/// Runs one interleaving on a fresh topic and checks: every successful call's records sit at
/// its offsets; every record in the log belongs to exactly one call, with its records
/// contiguous and in order; no record is there twice; a call refused before it was sent
/// (DEADLINE_EXCEEDED) has no record in the log unless it may have been sent.
async fn run_interleaving(h: &Harness, plan: Vec<Planned>) -> Result<(), TestCaseError> {
    let t = topic("interleave");
    h.dev.create_topic(&t, 2).unwrap();
    let mut c = h.client.clone();
    for p in 0..2 {
        let r = forward_one(&mut c, request(0, Acks::Leader, &t, p, records("warm", 1)))
            .await
            .unwrap();
        prop_assert_eq!(r.error_code, 0);
    }
    let calls: Vec<_> = plan
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let mut c = h.client.clone();
            let req = call_request(k as u64 + 1, &t, p.partition, p.records, "p");
            let (delay, short) = (Duration::from_millis(p.delay_ms), p.short);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut r = tonic::Request::new(req);
                r.set_timeout(if short {
                    Duration::from_millis(30)
                } else {
                    Duration::from_secs(10)
                });
                c.forward(r)
                    .await
                    .map(|r| r.into_inner().partitions[0].clone())
            })
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    for partition in 0..2 {
        let batches = read_batches(&leader_of(h, &t, partition), &t, partition).await;
        let log = flatten(&batches);
        // Every record (after the warm-up) is some call's, its calls' records contiguous and
        // in order, none twice.
        let mut seen: HashMap<u64, (i64, usize)> = HashMap::new();
        let mut offsets: Vec<i64> = log.keys().copied().filter(|&o| o > 0).collect();
        offsets.sort();
        for o in offsets {
            let v = String::from_utf8(log[&o].to_vec()).unwrap();
            let (i, j) = v
                .strip_prefix('p')
                .and_then(|v| v.split_once('-'))
                .map(|(i, j)| (i.parse::<u64>().unwrap(), j.parse::<usize>().unwrap()))
                .unwrap_or_else(|| panic!("a record of no call at {o}: {v}"));
            let k = (i - 1) as usize;
            prop_assert_eq!(
                plan[k].partition,
                partition,
                "call {} in the wrong partition",
                i
            );
            let e = seen.entry(i).or_insert((o, 0));
            prop_assert_eq!(o, e.0 + j as i64, "call {}'s record {} out of place", i, j);
            prop_assert_eq!(e.1, j, "call {}'s record {} twice or skipped", i, j);
            e.1 += 1;
        }
        for (k, (p, r)) in plan.iter().zip(&results).enumerate() {
            if p.partition != partition {
                continue;
            }
            let i = k as u64 + 1;
            match r {
                Ok(r) => {
                    prop_assert_eq!(r.error_code, 0, "{:?}", r);
                    prop_assert_eq!(seen.get(&i).map(|s| s.0), Some(r.base_offset));
                    assert_own_records(&log, r, i, p.records, "p");
                }
                Err(e) => {
                    prop_assert!(p.short, "only short deadlines fail: {:?}", e);
                    // leaderlink's answer, or the client's own timer first (CANCELLED).
                    prop_assert!(
                        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
                        "{:?}",
                        e
                    );
                }
            }
            if let Some(&(_, n)) = seen.get(&i) {
                prop_assert_eq!(n, p.records, "call {} only partly in the log", i);
            }
        }
    }
    Ok(())
}

#[test]
fn random_interleavings_keep_each_calls_records_whole_and_its_own() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // One request in flight and a leader that takes 20 ms: calls queue and merge.
    let h = rt.block_on(start(|cfg| cfg.max_in_flight = 1));
    h.dev.set_leader_latency(Duration::from_millis(20)).unwrap();
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&prop::collection::vec(planned(), 4..24), |plan| {
            rt.block_on(run_interleaving(&h, plan))
        })
        .unwrap();
}
