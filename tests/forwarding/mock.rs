//! Forwarding against librdkafka's mock cluster, through a real gRPC client.

use crate::common;

use std::collections::HashSet;

use bytes::Bytes;
use common::{forward, forward_one, records, request, start, topic};
use futures::StreamExt;
use leaderlink::proto::v1::{Acks, ForwardRequest, PartitionData};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_get_increasing_offsets_under_every_acks_setting() {
    let mut h = start(|_| {}).await;
    let t = topic("offsets");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();

    let r = forward_one(&mut c, request(1, Acks::All, &t, 0, records("a", 2)))
        .await
        .unwrap();
    assert_eq!(
        (r.error_code, r.error_name.as_str(), r.base_offset),
        (0, "", 0),
        "{r:?}"
    );
    assert_eq!(r.attempts, 1);
    assert!(r.leader_id >= 1);
    let r = forward_one(&mut c, request(2, Acks::Leader, &t, 0, records("b", 3)))
        .await
        .unwrap();
    assert_eq!((r.error_code, r.base_offset), (0, 2));
    let r = forward_one(
        &mut c,
        request(3, Acks::Unspecified, &t, 0, records("c", 1)),
    )
    .await
    .unwrap();
    assert_eq!((r.error_code, r.base_offset), (0, 5));
    // acks=0: no offset, done once written.
    let r = forward_one(&mut c, request(4, Acks::None, &t, 0, records("d", 4)))
        .await
        .unwrap();
    assert_eq!((r.error_code, r.base_offset), (0, -1));
    // The acks=0 batch landed: the next offset moved past it.
    let r = forward_one(&mut c, request(5, Acks::Leader, &t, 0, records("e", 1)))
        .await
        .unwrap();
    assert_eq!((r.error_code, r.base_offset), (0, 10));
    h.client = c;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_record_batches_are_forwarded() {
    let h = start(|_| {}).await;
    let t = topic("raw");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();
    let raw = |id, values: &[&str]| ForwardRequest {
        call_timeout_ms: 0,
        id,
        acks: Acks::All as i32,
        timeout_ms: 5_000,
        partitions: vec![PartitionData {
            topic: t.clone(),
            partition: 0,
            record_batch: common::raw_batch(values, -1, -1),
            records: vec![],
        }],
        transactional_id: String::new(),
        compression: 0,
    };
    let r = forward_one(&mut c, raw(1, &["x", "y", "z"])).await.unwrap();
    assert_eq!((r.error_code, r.base_offset), (0, 0), "{r:?}");
    let r = forward_one(&mut c, raw(2, &["w"])).await.unwrap();
    assert_eq!((r.error_code, r.base_offset), (0, 3), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_and_partitions_are_errors_as_data() {
    let h = start(|cfg| cfg.allow_auto_topic_creation = false).await;
    let mut c = h.client.clone();
    let missing = topic("missing");
    let r = forward_one(&mut c, request(1, Acks::All, &missing, 0, records("a", 1)))
        .await
        .expect("a Kafka error is data, not a gRPC error");
    assert_eq!(r.error_code, 3, "{r:?}");
    assert_eq!(r.error_name, "UNKNOWN_TOPIC_OR_PARTITION");
    assert_eq!(r.base_offset, -1);

    let t = topic("small");
    h.dev.create_topic(&t, 2).unwrap();
    let r = forward_one(&mut c, request(2, Acks::All, &t, 7, records("a", 1)))
        .await
        .unwrap();
    assert_eq!(r.error_name, "UNKNOWN_TOPIC_OR_PARTITION", "{r:?}");
    assert!(r.error_message.contains("2 partitions"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_on_first_use_when_allowed() {
    let h = start(|_| {}).await;
    let mut c = h.client.clone();
    let t = topic("auto");
    let r = forward_one(&mut c, request(1, Acks::All, &t, 0, records("a", 1)))
        .await
        .unwrap();
    assert_eq!((r.error_code, r.base_offset), (0, 0), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_leader_moves_keeps_succeeding() {
    let h = start(|_| {}).await;
    let t = topic("moving");
    h.dev.create_topic(&t, 1).unwrap();
    h.dev.set_leader(&t, 0, 1).unwrap();
    let mut c = h.client.clone();
    let mut leaders = HashSet::new();
    let mut retried = 0;
    let mut next = 0;
    for i in 0..30u64 {
        if i % 10 == 5 {
            h.dev
                .set_leader(&t, 0, ((i / 10 % 3) as i32 + 1) % 3 + 1)
                .unwrap();
        }
        let r = forward_one(&mut c, request(i, Acks::All, &t, 0, records("m", 2)))
            .await
            .unwrap();
        assert_eq!(r.error_code, 0, "call {i}: {r:?}");
        assert_eq!(
            r.base_offset, next,
            "call {i}: offsets continue across leaders"
        );
        next += 2;
        leaders.insert(r.leader_id);
        if r.attempts > 1 {
            retried += 1;
        }
    }
    assert!(leaders.len() >= 2, "leaders seen: {leaders:?}");
    assert!(
        retried >= 1,
        "a moved leader answers NOT_LEADER_OR_FOLLOWER first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_spans_leaders_and_repeats_a_partition_in_order() {
    let h = start(|_| {}).await;
    let t = topic("multi");
    h.dev.create_topic(&t, 3).unwrap();
    for p in 0..3 {
        h.dev.set_leader(&t, p, p + 1).unwrap();
    }
    let mut c = h.client.clone();
    let part = |p: i32, n: usize| PartitionData {
        topic: t.clone(),
        partition: p,
        record_batch: Bytes::new(),
        records: records("x", n),
    };
    let req = ForwardRequest {
        call_timeout_ms: 0,
        id: 9,
        acks: Acks::All as i32,
        timeout_ms: 0,
        partitions: vec![part(0, 2), part(1, 1), part(2, 1), part(0, 3), part(0, 1)],
        transactional_id: String::new(),
        compression: 0,
    };
    let resp = forward(&mut c, req).await.unwrap();
    assert_eq!(resp.id, 9);
    let got: Vec<(i32, i32, i64, i32)> = resp
        .partitions
        .iter()
        .map(|r| (r.partition, r.error_code, r.base_offset, r.leader_id))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 0, 0, 1),
            (1, 0, 0, 2),
            (2, 0, 0, 3),
            (0, 0, 2, 1),
            (0, 0, 5, 1)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_stream_keeps_partition_order_and_reports_bad_requests_in_band() {
    let h = start(|_| {}).await;
    let t = topic("stream");
    h.dev.create_topic(&t, 2).unwrap();
    let mut c = h.client.clone();
    let mut reqs = Vec::new();
    for i in 0..40u64 {
        reqs.push(request(i, Acks::All, &t, (i % 2) as i32, records("s", 1)));
    }
    // One malformed request in the middle, and one that lists a partition twice.
    reqs.insert(
        20,
        request(1000, Acks::All, "bad topic", 0, records("s", 1)),
    );
    let mut twice = request(2000, Acks::All, &t, 0, records("d", 1));
    twice.partitions.push(twice.partitions[0].clone());
    reqs.push(twice);
    let resp = c
        .forward_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let all: Vec<_> = resp.map(|r| r.unwrap()).collect().await;
    assert_eq!(all.len(), 42);
    let twice = all.iter().find(|r| r.id == 2000).unwrap();
    let offsets: Vec<i64> = twice.partitions.iter().map(|p| p.base_offset).collect();
    assert_eq!(
        offsets,
        vec![20, 21],
        "both batches, in order, after the other 20"
    );
    let bad = all.iter().find(|r| r.id == 1000).unwrap();
    assert_eq!(bad.status_code, tonic::Code::InvalidArgument as i32);
    assert!(bad.status_message.contains("topic"), "{bad:?}");
    for p in 0..2 {
        let in_partition: Vec<(u64, i64)> = all
            .iter()
            .filter(|r| r.id < 1000 && r.id % 2 == p)
            .map(|r| (r.id, r.partitions[0].base_offset))
            .collect();
        let expected: Vec<(u64, i64)> = (0..20).map(|k| (2 * k + p, k as i64)).collect();
        assert_eq!(
            in_partition, expected,
            "partition {p}: responses and offsets in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_counted_and_flag_possible_duplicates() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // Batches without a producer id: leaderlink's idempotence off.
    let h = start(|cfg| cfg.idempotence = false).await;
    let t = topic("retry");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();
    forward_one(&mut c, request(0, Acks::All, &t, 0, records("w", 1)))
        .await
        .unwrap();
    let inject = |e: RDKafkaRespErr| {
        h.dev
            .with(move |m| m.request_errors(RDKafkaApiKey::Produce, &[e]));
    };

    // NOT_LEADER_OR_FOLLOWER under acks=1: nothing was appended, the retry is clean.
    inject(RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION);
    let r = forward_one(&mut c, request(1, Acks::Leader, &t, 0, records("a", 1)))
        .await
        .unwrap();
    assert_eq!(
        (r.error_code, r.attempts, r.possibly_duplicated),
        (0, 2, false),
        "{r:?}"
    );

    // REQUEST_TIMED_OUT and NOT_ENOUGH_REPLICAS_AFTER_APPEND: the batch may be in the log.
    for e in [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    ] {
        inject(e);
        let r = forward_one(&mut c, request(2, Acks::All, &t, 0, records("b", 1)))
            .await
            .unwrap();
        assert_eq!(
            (r.error_code, r.attempts, r.possibly_duplicated),
            (0, 2, true),
            "{e:?}: {r:?}"
        );
    }

    // A non-retriable error is returned as data at once.
    inject(RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD);
    let r = forward_one(&mut c, request(3, Acks::All, &t, 0, records("c", 1)))
        .await
        .unwrap();
    assert_eq!(
        (r.error_name.as_str(), r.attempts),
        ("INVALID_RECORD", 1),
        "{r:?}"
    );
}

/// With idempotence on (the default), an acks=all batch leaderlink encodes carries its producer
/// id and sequence; a retry after an answer that says it may be in the log resends the same
/// bytes, which the leader drops if it has them: not flagged as a possible duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_resend_the_same_batch_and_are_not_flagged() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let h = start(|_| {}).await;
    let t = topic("idem-retry");
    h.dev.create_topic(&t, 1).unwrap();
    let mut c = h.client.clone();
    let r = forward_one(&mut c, request(0, Acks::All, &t, 0, records("w", 1)))
        .await
        .unwrap();
    assert_eq!(r.error_code, 0, "{r:?}");
    for e in [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    ] {
        h.dev
            .with(move |m| m.request_errors(RDKafkaApiKey::Produce, &[e]));
        let r = forward_one(&mut c, request(1, Acks::All, &t, 0, records("b", 1)))
            .await
            .unwrap();
        assert_eq!(
            (r.error_code, r.attempts, r.possibly_duplicated),
            (0, 2, false),
            "{e:?}: {r:?}"
        );
    }
}

/// A call whose batches for one leader together exceed the connection's byte budget
/// (`max_in_flight_bytes_per_connection`) while each fits alone: each goes in its own request
/// and every partition gets its offset. A batch that alone exceeds the budget makes the call
/// INVALID_ARGUMENT before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_too_large_together_go_alone_and_one_too_large_alone_sends_nothing() {
    let h = start(|cfg| {
        cfg.max_request_bytes = 16 * 1024;
        cfg.max_in_flight_bytes_per_connection = 16 * 1024;
        cfg.trace_record_header = false;
    })
    .await;
    let t = topic("budget");
    h.dev.create_topic(&t, 2).unwrap();
    h.dev.set_leader(&t, 0, 1).unwrap();
    h.dev.set_leader(&t, 1, 1).unwrap();
    let mut c = h.client.clone();
    // Empty records: 2 bytes of protobuf each, about 8 in a batch.
    let empty = |n: usize| vec![leaderlink::proto::v1::Record::default(); n];
    let part = |partition: i32, n: usize| PartitionData {
        topic: t.clone(),
        partition,
        record_batch: Bytes::new(),
        records: empty(n),
    };
    let req = |parts: Vec<PartitionData>| ForwardRequest {
        call_timeout_ms: 0,
        id: 1,
        acks: Acks::All as i32,
        timeout_ms: 0,
        partitions: parts,
        transactional_id: String::new(),
        compression: 0,
    };

    let both = forward(&mut c, req(vec![part(0, 1200), part(1, 1200)]))
        .await
        .expect("each batch fits alone");
    for r in &both.partitions {
        assert_eq!((r.error_code, r.base_offset), (0, 0), "{r:?}");
        assert_eq!(r.attempts, 1, "{r:?}");
    }

    let sent = h.server.forwarder.pool().requests_sent();
    let e = forward(&mut c, req(vec![part(0, 1), part(1, 2500)]))
        .await
        .expect_err("one batch exceeds the budget alone");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("partitions[1]")
            && e.message().contains("max_in_flight_bytes_per_connection"),
        "{}",
        e.message()
    );
    assert_eq!(
        h.server.forwarder.pool().requests_sent(),
        sent,
        "nothing was sent"
    );
}
