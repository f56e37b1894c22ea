//! Per-record errors from a real Apache Kafka (Produce v8+ `record_errors`): a record without a
//! key sent to a compacted topic makes the leader refuse the batch with INVALID_RECORD, naming
//! that record's index; leaderlink hands the index and the leader's reason to the caller. When
//! the batch was shared by several calls, only the call that holds the record gets the error,
//! by its index in that call's records, and the others are sent again.
//!
//! `#[ignore]`d in a plain `cargo test`; the README's test command runs it with
//! `LEADERLINK_KAFKA_BOOTSTRAP` set.

use crate::common;

use std::time::Duration;

use leaderlink::proto::v1::Acks;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Kafka: LEADERLINK_KAFKA_BOOTSTRAP (scripts/test starts one)"]
async fn a_keyless_record_on_a_compacted_topic_is_named_by_its_batch_index() {
    let topic = common::topic("compacted");
    common::kafka::create_topic(&topic, 1, &[("cleanup.policy", "compact")]).await;
    let (server, mut client) = common::kafka::start(|_| {}).await;

    // Three records; the second has no key.
    let mut recs = common::records("r", 3);
    recs[1].key = None;
    let r = common::forward_one(&mut client, common::request(1, Acks::All, &topic, 0, recs))
        .await
        .unwrap();
    assert_eq!(r.error_name, "INVALID_RECORD", "{r:?}");
    assert_eq!(r.base_offset, -1, "{r:?}");
    assert_eq!(r.record_errors.len(), 1, "{r:?}");
    assert_eq!(r.record_errors[0].batch_index, 1, "{r:?}");
    assert!(
        r.record_errors[0].message.to_lowercase().contains("key"),
        "the leader's reason: {r:?}"
    );

    // A batch whose records all have keys goes in; its result carries no record errors.
    let ok = common::forward_one(
        &mut client,
        common::request(2, Acks::All, &topic, 0, common::records("ok", 2)),
    )
    .await
    .unwrap();
    assert_eq!(ok.error_code, 0, "{ok:?}");
    assert!(ok.record_errors.is_empty(), "{ok:?}");
    server.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Kafka: LEADERLINK_KAFKA_BOOTSTRAP (scripts/test starts one)"]
async fn in_a_shared_batch_a_record_error_reaches_only_the_call_that_holds_the_record() {
    let topic = common::topic("compacted-shared");
    common::kafka::create_topic(&topic, 1, &[("cleanup.policy", "compact")]).await;
    // A linger of 300 ms: the five calls below, sent at once, share one record batch.
    let (server, client) = common::kafka::start(|cfg| cfg.linger_ms = 300).await;
    let calls: Vec<_> = (1..=5u64)
        .map(|i| {
            let mut c = client.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                let mut recs = common::records(&format!("c{i}"), 2);
                if i == 3 {
                    // Call 3's second record has no key.
                    recs[1].key = None;
                }
                // acks=1: batches without producer id, which may share a record batch.
                let r = common::request(i, Acks::Leader, &topic, 0, recs);
                (i, common::forward_one(&mut c, r).await.unwrap())
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let (sent_batches, _) = server.forwarder.pool().batches_sent();
    for (i, r) in &results {
        if *i == 3 {
            assert_eq!(r.error_name, "INVALID_RECORD", "{r:?}");
            assert_eq!(r.record_errors.len(), 1, "{r:?}");
            assert_eq!(
                r.record_errors[0].batch_index, 1,
                "the index in call 3's own records: {r:?}"
            );
            assert!(r.error_message.contains("record 1:"), "{r:?}");
        } else {
            // Refused with the shared batch for call 3's record, then sent again.
            assert_eq!((r.error_code, r.attempts), (0, 2), "call {i}: {r:?}");
            assert!(r.record_errors.is_empty(), "{r:?}");
            assert!(!r.possibly_duplicated, "{r:?}");
        }
    }
    // The first batch held all five calls; the retry of the four shared one more.
    assert_eq!(sent_batches, 2, "{results:?}");
    // Each successful call's records are at its offsets.
    let mut ok: Vec<_> = results.iter().filter(|(i, _)| *i != 3).collect();
    ok.sort_by_key(|(_, r)| r.base_offset);
    let back = common::read_back(&common::kafka::bootstrap(), &topic, 0, 8);
    for (i, r) in ok {
        for j in 0..2 {
            let at = usize::try_from(r.base_offset).unwrap() + j;
            assert_eq!(
                back[at].0,
                format!("c{i}-{j}").as_bytes(),
                "call {i}: {r:?}"
            );
        }
    }
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Kafka: LEADERLINK_KAFKA_BOOTSTRAP (scripts/test starts one)"]
async fn a_shared_batch_over_the_topics_size_limit_is_sent_again_call_by_call() {
    let topic = common::topic("small-batches");
    // Each call's batch fits the topic's limit; four of them together do not.
    common::kafka::create_topic(&topic, 1, &[("max.message.bytes", "2000")]).await;
    let (server, client) = common::kafka::start(|cfg| cfg.linger_ms = 300).await;
    let calls: Vec<_> = (1..=4u64)
        .map(|i| {
            let mut c = client.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                let mut recs = common::records(&format!("c{i}"), 1);
                recs[0].value = Some(vec![b'0' + i as u8; 700].into());
                let r = common::request(i, Acks::Leader, &topic, 0, recs);
                common::forward_one(&mut c, r).await.unwrap()
            })
        })
        .collect();
    let mut offsets = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!((r.error_code, r.attempts), (0, 2), "{r:?}");
        offsets.push(r.base_offset);
    }
    offsets.sort();
    assert_eq!(offsets, vec![0, 1, 2, 3]);
    // One shared batch refused, then one batch per call.
    let (sent_batches, _) = server.forwarder.pool().batches_sent();
    assert_eq!(sent_batches, 1 + 4);
    server.shutdown(Duration::from_secs(5)).await;
}
