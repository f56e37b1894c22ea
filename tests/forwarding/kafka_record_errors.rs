//! Per-record errors from a real Apache Kafka (Produce v8+ `record_errors`): a record without a
//! key sent to a compacted topic makes the leader refuse the batch with INVALID_RECORD, naming
//! that record's index; leaderlink hands the index and the leader's reason to the caller.
//!
//! `#[ignore]`d in a plain `cargo test`; the README's test command runs it with
//! `LEADERLINK_KAFKA_BOOTSTRAP` set.

use crate::common;

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
