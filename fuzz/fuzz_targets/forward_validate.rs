//! `forward::validate::validate` on a `ForwardRequest` decoded from arbitrary protobuf bytes,
//! and `forward::batch::check` on every raw `record_batch` in it.
//!
//! Input layout: 4 bytes max_request_bytes (u32 BE), 8 bytes now_ms (i64 BE), 1 flag byte
//! (bit 0: pass a traceparent), then a protobuf `leaderlink.v1.ForwardRequest`.
//!
//! Checked: no panic; errors are only `Invalid`; on success one item per partition in request
//! order, each with a valid topic, a partition >= -1 (-1, `CHOOSE_PARTITION`, only for `records`
//! that share one key, which the item carries) and a batch that passes `batch::check`
//! again with the item's record count and idempotence; raw batches are forwarded byte for byte;
//! batches encoded from `records` decode with kafka-protocol into the same keys, values and
//! timestamps, with the traceparent header added where the record had none.
#![no_main]

use bytes::Bytes;
use kafka_protocol::records::RecordBatchDecoder;
use leaderlink::{
    forward::{
        ForwardError, batch,
        validate::{CHOOSE_PARTITION, TRACEPARENT, check_topic, validate},
    },
    proto::v1::ForwardRequest,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 {
        return;
    }
    let max_request_bytes = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
    let now_ms = i64::from_be_bytes(data[4..12].try_into().unwrap());
    let traceparent = (data[12] & 1 == 1).then_some(TP);
    let Ok(req) = ForwardRequest::decode(&data[13..]) else {
        return;
    };

    // The batch checker on its own, on every raw payload.
    for p in &req.partitions {
        if let Ok(info) = batch::check(&p.record_batch) {
            assert!(p.record_batch.len() >= batch::BATCH_HEADER);
            assert!(info.records > 0);
        }
    }

    let original = req.clone();
    match validate(req, max_request_bytes, now_ms, traceparent) {
        Err(ForwardError::Invalid { field, reason }) => {
            assert!(!field.is_empty() && !reason.is_empty());
        }
        Err(other) => panic!("validate returned a non-Invalid error: {other:?}"),
        Ok(v) => {
            assert!(original.encoded_len() <= max_request_bytes);
            assert!(v.timeout_ms <= i32::MAX as u32);
            assert!((-1..=1).contains(&v.acks), "acks {}", v.acks);
            assert_eq!(v.id, original.id);
            assert_eq!(v.items.len(), original.partitions.len());
            assert!(!v.items.is_empty());
            for (it, p) in v.items.iter().zip(&original.partitions) {
                assert_eq!(it.topic, p.topic);
                assert_eq!(it.partition, p.partition);
                assert!(check_topic(&it.topic).is_ok());
                assert!(it.partition >= CHOOSE_PARTITION);
                if it.partition == CHOOSE_PARTITION {
                    assert!(p.record_batch.is_empty(), "a raw batch to partition -1 passed");
                    assert!(
                        p.records.iter().all(|r| r.key == it.key),
                        "the item's key is not every record's"
                    );
                } else {
                    assert!(it.key.is_none());
                }
                let info = batch::check(&it.batch)
                    .unwrap_or_else(|e| panic!("validated batch fails the check: {e}"));
                assert_eq!(info.records, it.records as i32);
                assert_eq!(info.producer_id >= 0, it.idempotent);
                if p.records.is_empty() {
                    assert_eq!(it.batch, p.record_batch, "raw batch altered");
                } else {
                    assert!(p.record_batch.is_empty());
                    assert_eq!(it.records as usize, p.records.len());
                    assert!(!it.idempotent);
                    check_encoded(&it.batch, &p.records, now_ms, traceparent);
                }
            }
        }
    }
});

/// Decodes a batch leaderlink encoded with kafka-protocol and compares it with the records.
fn check_encoded(
    b: &Bytes,
    records: &[leaderlink::proto::v1::Record],
    now_ms: i64,
    traceparent: Option<&str>,
) {
    let ts = |r: &leaderlink::proto::v1::Record| {
        if r.timestamp_ms == 0 {
            now_ms
        } else {
            r.timestamp_ms
        }
    };
    let base = ts(&records[0]);
    // kafka-protocol adds the timestamp delta to the base without wrapping (a debug panic in
    // its decoder, not leaderlink's concern): compare only batches whose deltas fit.
    if records.iter().any(|r| ts(r).checked_sub(base).is_none()) {
        return;
    }
    let set = RecordBatchDecoder::decode(&mut b.clone())
        .unwrap_or_else(|e| panic!("kafka-protocol cannot decode leaderlink's batch: {e:#}"));
    assert_eq!(set.records.len(), records.len());
    for (i, (got, want)) in set.records.iter().zip(records).enumerate() {
        assert_eq!(got.offset, i as i64);
        assert_eq!(got.timestamp, ts(want));
        assert_eq!(got.key, want.key);
        assert_eq!(got.value, want.value);
        let own_tp = want.headers.iter().any(|h| h.key == TRACEPARENT);
        if let Some(tp) = traceparent
            && !own_tp
        {
            assert_eq!(
                got.headers
                    .get(TRACEPARENT.as_bytes())
                    .cloned()
                    .flatten()
                    .as_deref(),
                Some(tp.as_bytes()),
                "traceparent header missing"
            );
        }
        // kafka-protocol keeps headers in a map (duplicate keys merge): compare the key sets.
        for h in &want.headers {
            assert!(
                got.headers.contains_key(h.key.as_bytes()),
                "header {:?} lost",
                h.key
            );
        }
    }
}
