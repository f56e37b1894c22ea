//! Property tests: random `ForwardRequest`s — valid and hostile — against `validate` alone, and
//! through a real gRPC client to a real leaderlink in front of the embedded mock cluster.
//!
//! The server may answer only INVALID_ARGUMENT (exactly when `validate` refuses the request,
//! with the same message) or OK with one result per requested partition, in request order,
//! whose error codes are Kafka errors as data. Never INTERNAL or UNKNOWN; with these settings
//! (a healthy cluster, short retries, no load) not DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or
//! UNAVAILABLE either.

use crate::common;

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use leaderlink::{
    forward::{
        ForwardError, batch,
        partitioner::for_key,
        validate::{MAX_TOPIC_LEN, check_topic, validate},
    },
    proto::v1::{Acks, ForwardRequest, ForwardResponse, Header, PartitionData, Record},
};
use proptest::{
    prelude::*,
    test_runner::{Config as ProptestConfig, TestCaseError, TestRunner},
};
use prost::Message;
use tonic::Code;

/// `max_request_bytes` of the server under test: small, so that the size check is exercised.
const MAX_REQUEST_BYTES: usize = 4096;
/// Partitions of the main test topic.
const PARTITIONS: i32 = 3;

/// `default` cases, or `PROPTEST_CASES` from the environment (for a longer hunt).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------- strategies

/// The two topics that exist on the cluster: `main` with [`PARTITIONS`] partitions, `single`
/// with one.
#[derive(Debug, Clone)]
struct Topics {
    main: String,
    single: String,
}

fn topic_name(t: &Topics) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just(t.main.clone()),
        2 => Just(t.single.clone()),
        // Valid names no topic has.
        2 => "[a-zA-Z0-9._-]{1,30}".prop_filter("not . or ..", |s| s != "." && s != ".."),
        1 => Just(String::new()),
        1 => prop_oneof![Just(".".to_string()), Just("..".to_string())],
        1 => Just("a".repeat(MAX_TOPIC_LEN)),
        1 => Just("b".repeat(MAX_TOPIC_LEN + 1)),
        // Anything: spaces, slashes, control characters, non-ASCII.
        2 => "\\PC{0,12}",
        1 => "[a-z]{1,5}[ /\\\\:\\x00\u{e9}\u{1f600}][a-z]{0,5}",
    ]
}

fn partition_index() -> impl Strategy<Value = i32> {
    prop_oneof![
        6 => 0..PARTITIONS,
        1 => -3..0,
        2 => PARTITIONS..PARTITIONS + 5,
        1 => any::<i32>(),
        1 => prop_oneof![Just(i32::MIN), Just(i32::MAX)],
    ]
}

fn opt_bytes(max: usize) -> impl Strategy<Value = Option<Bytes>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Bytes::new())),
        3 => prop::collection::vec(any::<u8>(), 0..max).prop_map(|v| Some(Bytes::from(v))),
    ]
}

fn header() -> impl Strategy<Value = Header> {
    (
        prop_oneof![
            3 => "[a-z-]{0,10}",
            1 => Just("traceparent".to_string()),
            1 => "\\PC{0,6}",
        ],
        opt_bytes(16),
    )
        .prop_map(|(key, value)| Header { key, value })
}

fn record() -> impl Strategy<Value = Record> {
    (
        opt_bytes(24),
        prop_oneof![4 => opt_bytes(64), 1 => opt_bytes(1500)],
        prop::collection::vec(header(), 0..4),
        prop_oneof![
            4 => Just(0i64),
            2 => 1_600_000_000_000i64..1_800_000_000_000,
            1 => any::<i64>(),
        ],
    )
        .prop_map(|(key, value, headers, timestamp_ms)| Record {
            key,
            value,
            headers,
            timestamp_ms,
        })
}

/// A valid v2 batch: leaderlink's own encoding of random records, or kafka-protocol's (with or
/// without a producer id).
fn valid_batch() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        prop::collection::vec(record(), 1..4).prop_map(|r| batch::encode(&r, 1_700_000_000_000)),
        (
            prop::collection::vec("[a-z]{0,20}", 1..4),
            prop_oneof![Just(-1i64), 1_000i64..1_010],
            0i32..3,
        )
            .prop_map(|(values, pid, seq)| {
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                common::raw_batch(&values, pid, seq)
            }),
    ]
}

/// Random bytes whose length field, magic byte and CRC are made right, so that they pass
/// `batch::check` and reach the broker.
fn checked_garbage() -> impl Strategy<Value = Bytes> {
    (
        prop::collection::vec(any::<u8>(), batch::BATCH_HEADER..200),
        1i32..5,
    )
        .prop_map(|(mut b, records)| {
            let len = (b.len() - 12) as i32;
            b[8..12].copy_from_slice(&len.to_be_bytes());
            b[16] = 2;
            b[57..61].copy_from_slice(&records.to_be_bytes());
            let crc = crc32c::crc32c(&b[21..]);
            b[17..21].copy_from_slice(&crc.to_be_bytes());
            Bytes::from(b)
        })
}

fn raw_batch() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        // Pure garbage.
        2 => prop::collection::vec(any::<u8>(), 0..120).prop_map(Bytes::from),
        3 => valid_batch(),
        // One bit flipped.
        3 => (valid_batch(), any::<prop::sample::Index>(), 0u8..8).prop_map(|(b, at, bit)| {
            let mut v = b.to_vec();
            let i = at.index(v.len());
            v[i] ^= 1 << bit;
            Bytes::from(v)
        }),
        // Truncated.
        2 => (valid_batch(), any::<prop::sample::Index>()).prop_map(|(b, at)| {
            b.slice(..at.index(b.len()))
        }),
        1 => checked_garbage(),
    ]
}

/// A payload that passes validation: records, or a valid raw batch.
fn valid_payload() -> impl Strategy<Value = (Bytes, Vec<Record>)> {
    prop_oneof![
        5 => prop::collection::vec(record(), 1..4).prop_map(|r| (Bytes::new(), r)),
        3 => valid_batch().prop_map(|b| (b, vec![])),
    ]
}

/// Anything: records, raw bytes of every kind, both, neither.
fn hostile_payload() -> impl Strategy<Value = (Bytes, Vec<Record>)> {
    prop_oneof![
        3 => prop::collection::vec(record(), 1..6).prop_map(|r| (Bytes::new(), r)),
        4 => raw_batch().prop_map(|b| (b, vec![])),
        1 => (raw_batch(), prop::collection::vec(record(), 1..3)),
        1 => Just((Bytes::new(), vec![])),
    ]
}

/// A partition that passes validation: an existing topic, or a valid name no topic has; a
/// partition index >= 0 (within the topic's count or beyond it), or -1 (leaderlink chooses)
/// for records that share one key.
fn plausible_partition(t: &Topics) -> impl Strategy<Value = PartitionData> {
    let topic = prop_oneof![
        6 => Just(t.main.clone()),
        2 => Just(t.single.clone()),
        1 => "[a-zA-Z0-9._-]{1,30}".prop_filter("not . or ..", |s| s != "." && s != ".."),
    ];
    let partition = prop_oneof![5 => 0..PARTITIONS, 1 => PARTITIONS..PARTITIONS + 5];
    (topic, partition, any::<bool>(), valid_payload()).prop_map(
        |(topic, partition, choose, (rb, mut records))| {
            let partition = if choose && rb.is_empty() {
                let key = records.first().and_then(|r| r.key.clone());
                for r in &mut records {
                    r.key = key.clone();
                }
                -1
            } else {
                partition
            };
            PartitionData {
                topic,
                partition,
                record_batch: rb,
                records,
            }
        },
    )
}

fn hostile_partition(t: &Topics) -> impl Strategy<Value = PartitionData> {
    (topic_name(t), partition_index(), hostile_payload()).prop_map(
        |(topic, partition, (rb, records))| PartitionData {
            topic,
            partition,
            record_batch: rb,
            records,
        },
    )
}

/// Half of the requests are plausible (valid, or refused only for their size), half hostile in
/// every field.
fn forward_request(t: &Topics) -> impl Strategy<Value = ForwardRequest> {
    let plausible = (
        any::<u64>(),
        0..=3i32,
        prop_oneof![3 => Just(0u32), 1 => 1u32..5_000, 1 => 5_000u32..=i32::MAX as u32],
        prop::collection::vec(plausible_partition(t), 1..6),
    );
    let hostile = (
        any::<u64>(),
        prop_oneof![
            6 => 0..=3i32,
            1 => any::<i32>(),
            1 => prop_oneof![Just(-1), Just(4)],
        ],
        prop_oneof![
            4 => Just(0u32),
            3 => 1u32..5_000,
            1 => 5_000u32..=i32::MAX as u32,
            2 => (i32::MAX as u32)..=u32::MAX,
        ],
        prop_oneof![
            1 => Just(vec![]),
            10 => prop::collection::vec(
                prop_oneof![hostile_partition(t), plausible_partition(t)],
                1..8,
            ),
        ],
    );
    let transactional_id = prop_oneof![4 => Just(String::new()), 1 => "[a-z]{1,8}"];
    let compression = prop_oneof![8 => Just(0), 8 => 1..=5i32, 1 => any::<i32>()];
    (
        prop_oneof![plausible, hostile],
        transactional_id,
        compression,
    )
        .prop_map(
            |((id, acks, timeout_ms, partitions), transactional_id, compression)| ForwardRequest {
                call_timeout_ms: 0,
                id,
                acks,
                timeout_ms,
                partitions,
                transactional_id,
                compression,
            },
        )
}

// ---------------------------------------------------------------- the model

/// What `validate` should say, written from the proto's documentation: `Ok(())`, or the field
/// of the first defect (in the order the documentation lists the checks).
fn expected(req: &ForwardRequest, max_request_bytes: usize) -> Result<(), String> {
    if req.encoded_len() > max_request_bytes {
        return Err("request".into());
    }
    if !(0..=3).contains(&req.acks) {
        return Err("acks".into());
    }
    if req.timeout_ms > i32::MAX as u32 {
        return Err("timeout_ms".into());
    }
    if req.partitions.is_empty() {
        return Err("partitions".into());
    }
    if !(0..=5).contains(&req.compression) {
        return Err("compression".into());
    }
    for (i, p) in req.partitions.iter().enumerate() {
        let t = &p.topic;
        let topic_ok = !t.is_empty()
            && t.len() <= 249
            && t != "."
            && t != ".."
            && t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !topic_ok {
            return Err(format!("partitions[{i}].topic"));
        }
        // -1 asks leaderlink to choose: only for records, all with the same key (or none).
        if p.partition < -1
            || (p.partition == -1
                && (!p.record_batch.is_empty()
                    || p.records.iter().any(|r| r.key != p.records[0].key)))
        {
            return Err(format!("partitions[{i}].partition"));
        }
        match (p.record_batch.is_empty(), p.records.is_empty()) {
            (false, false) => return Err(format!("partitions[{i}].record_batch")),
            (true, true) => return Err(format!("partitions[{i}].records")),
            (false, true) if !batch_ok(&p.record_batch) => {
                return Err(format!("partitions[{i}].record_batch"));
            }
            // A transactional batch (attributes bit 0x10) goes with a transactional id, and a
            // transactional id with transactional batches only.
            (false, true) => {
                let transactional = p.record_batch[22] & 0x10 != 0;
                match (transactional, req.transactional_id.is_empty()) {
                    (true, true) => return Err("transactional_id".into()),
                    (false, false) => return Err(format!("partitions[{i}].record_batch")),
                    _ => {}
                }
            }
            (true, false) if !req.transactional_id.is_empty() => {
                return Err(format!("partitions[{i}].records"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A v2 batch per the proto: magic 2, length field and CRC-32C matching, at least one record.
fn batch_ok(b: &[u8]) -> bool {
    b.len() >= 61
        && b[16] == 2
        && i32::from_be_bytes(b[8..12].try_into().unwrap()) as i64 == b.len() as i64 - 12
        && u32::from_be_bytes(b[17..21].try_into().unwrap()) == crc32c::crc32c(&b[21..])
        && i32::from_be_bytes(b[57..61].try_into().unwrap()) > 0
}

fn is_kafka_error(code: i32) -> bool {
    i16::try_from(code).is_ok_and(|c| {
        c != 0 && matches!(ResponseError::try_from_code(c), Some(e) if !matches!(e, ResponseError::Unknown(_)))
    })
}

// ---------------------------------------------------------------- validate alone

/// `validate` agrees with the model, refuses only with `Invalid`, and what it accepts is what
/// the request said, with batches that pass `batch::check`.
#[test]
fn validate_agrees_with_the_documented_rules() {
    let cfg = ProptestConfig {
        cases: cases(4096),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(cfg);
    let topics = Topics {
        main: "prop-main".into(),
        single: "prop-single".into(),
    };
    let strategy = (
        forward_request(&topics),
        prop_oneof![Just(MAX_REQUEST_BYTES), 1024usize..1 << 20],
        any::<bool>(),
    );
    runner
        .run(&strategy, |(req, max, with_tp)| {
            let tp = with_tp.then_some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
            let want = expected(&req, max);
            match (validate(req.clone(), max, 1_700_000_000_000, tp), want) {
                (Ok(v), Ok(())) => {
                    prop_assert_eq!(v.id, req.id);
                    prop_assert_eq!(v.items.len(), req.partitions.len());
                    prop_assert_eq!(
                        v.acks,
                        match req.acks {
                            1 => 0,
                            2 => 1,
                            _ => -1,
                        }
                    );
                    for (it, p) in v.items.iter().zip(&req.partitions) {
                        prop_assert_eq!(&it.topic, &p.topic);
                        prop_assert_eq!(it.partition, p.partition);
                        prop_assert!(check_topic(&it.topic).is_ok());
                        let info = batch::check(&it.batch).map_err(TestCaseError::fail)?;
                        prop_assert_eq!(info.records, it.records as i32);
                        prop_assert_eq!(info.producer_id >= 0, it.idempotent);
                        if p.records.is_empty() {
                            prop_assert_eq!(&it.batch, &p.record_batch);
                        } else {
                            prop_assert_eq!(it.records as usize, p.records.len());
                        }
                    }
                }
                (Err(ForwardError::Invalid { field, reason }), Err(want_field)) => {
                    prop_assert_eq!(&field, &want_field, "reason: {}", reason);
                }
                (got, want) => {
                    return Err(TestCaseError::fail(format!(
                        "validate says {got:?}, the documented rules say {want:?}"
                    )));
                }
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------- through gRPC

#[derive(Default, Debug)]
struct Tally {
    invalid: usize,
    ok: usize,
    codes: BTreeMap<i32, usize>,
}

/// Checks one answer; returns a failure message if the property does not hold.
fn check_answer(
    topics: &Topics,
    req: &ForwardRequest,
    got: &Result<ForwardResponse, tonic::Status>,
    tally: &mut Tally,
) -> Result<(), TestCaseError> {
    let Topics { main, single } = topics;
    let local = validate(req.clone(), MAX_REQUEST_BYTES, now_ms(), None);
    match got {
        // Over twice `max_request_bytes` the gRPC transport refuses the message before
        // leaderlink sees it (documented with `max_request_bytes`).
        Err(s) if s.code() == Code::OutOfRange => {
            prop_assert!(
                req.encoded_len() > 2 * MAX_REQUEST_BYTES,
                "OUT_OF_RANGE for a request of {} bytes: {}",
                req.encoded_len(),
                s.message()
            );
            prop_assert!(
                s.message().contains("message length too large"),
                "{}",
                s.message()
            );
            tally.invalid += 1;
        }
        Err(s) => {
            prop_assert_eq!(
                s.code(),
                Code::InvalidArgument,
                "unexpected status {:?}: {}",
                s.code(),
                s.message()
            );
            let Err(e) = local else {
                return Err(TestCaseError::fail(format!(
                    "INVALID_ARGUMENT for a request validate accepts: {}",
                    s.message()
                )));
            };
            prop_assert_eq!(s.message(), e.to_string());
            tally.invalid += 1;
        }
        Ok(resp) => {
            if let Err(e) = local {
                return Err(TestCaseError::fail(format!(
                    "OK for a request validate refuses ({e})"
                )));
            }
            prop_assert_eq!(resp.id, req.id);
            prop_assert_eq!(resp.status_code, 0);
            prop_assert_eq!(resp.partitions.len(), req.partitions.len());
            for (r, p) in resp.partitions.iter().zip(&req.partitions) {
                prop_assert_eq!(&r.topic, &p.topic);
                let count = if &p.topic == main {
                    PARTITIONS
                } else if &p.topic == single {
                    1
                } else {
                    0
                };
                if p.partition == -1 {
                    // Chosen among the topic's partitions: the key's, when the records have
                    // one; -1 when the topic's partition count is unknown.
                    if count == 0 {
                        prop_assert_eq!(r.partition, -1, "{:?}", r);
                    } else if let Some(key) = &p.records[0].key {
                        prop_assert_eq!(r.partition, for_key(key, count as usize), "{:?}", r);
                    } else {
                        prop_assert!((0..count).contains(&r.partition), "{:?}", r);
                    }
                } else {
                    prop_assert_eq!(r.partition, p.partition);
                }
                *tally.codes.entry(r.error_code).or_default() += 1;
                let exists = r.partition >= 0 && r.partition < count;
                if r.error_code == 0 {
                    prop_assert!(
                        exists,
                        "success for a partition that does not exist: {:?}",
                        r
                    );
                    prop_assert!(r.error_name.is_empty());
                    if req.acks == Acks::None as i32 {
                        prop_assert_eq!(r.base_offset, -1);
                    } else {
                        prop_assert!(r.base_offset >= 0, "{:?}", r);
                    }
                    prop_assert!(r.attempts >= 1);
                } else {
                    prop_assert!(is_kafka_error(r.error_code), "not a Kafka error: {:?}", r);
                    prop_assert!(!r.error_name.is_empty(), "{:?}", r);
                    prop_assert_eq!(r.base_offset, -1);
                    if !exists {
                        // UNKNOWN_TOPIC_OR_PARTITION: an unknown topic, or beyond its count.
                        prop_assert_eq!(r.error_code, 3, "{:?}", r);
                    } else if !p.records.is_empty() {
                        // leaderlink's own batches are valid: the mock must take them.
                        return Err(TestCaseError::fail(format!(
                            "records refused by the leader: {r:?}"
                        )));
                    }
                }
            }
            tally.ok += 1;
        }
    }
    Ok(())
}

/// Random requests through gRPC never break the server and get only the documented answers
/// (INVALID_ARGUMENT, OUT_OF_RANGE from the transport over twice the size limit, or Kafka's
/// errors as data).
#[test]
fn forward_answers_only_invalid_argument_or_kafka_errors_as_data() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(common::start(|cfg| {
        cfg.max_request_bytes = MAX_REQUEST_BYTES;
        // Unknown topics are final after one Metadata round (and the mock creates none).
        cfg.allow_auto_topic_creation = false;
        cfg.default_timeout_ms = 5_000;
        cfg.retry_backoff_ms = 10;
        cfg.retry_backoff_max_ms = 100;
    }));
    let (main, _) = rt.block_on(common::warm_topic(&h, "prop-main", PARTITIONS));
    let (single, _) = rt.block_on(common::warm_topic(&h, "prop-single", 1));
    let topics = Topics {
        main: main.clone(),
        single,
    };

    let cfg = ProptestConfig {
        cases: cases(1024),
        failure_persistence: None,
        // Every shrinking step is a call; a failure still shrinks well within this.
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    };
    let tally = Mutex::new(Tally::default());
    let started = tokio::time::Instant::now();
    let mut runner = TestRunner::new(cfg);
    let result = runner.run(&forward_request(&topics), |req| {
        let mut client = h.client.clone();
        let got = rt.block_on(async {
            // The server's default deadline (5 s) applies; this only guards against a hang.
            tokio::time::timeout(
                Duration::from_secs(20),
                client.forward(tonic::Request::new(req.clone())),
            )
            .await
        });
        let Ok(got) = got else {
            return Err(TestCaseError::fail("no answer within 20 s"));
        };
        check_answer(
            &topics,
            &req,
            &got.map(|r| r.into_inner()),
            &mut tally.lock().unwrap(),
        )
    });
    let tally = tally.into_inner().unwrap();
    eprintln!(
        "{} cases in {:?}: {} INVALID_ARGUMENT, {} OK; per-partition codes {:?}",
        tally.invalid + tally.ok,
        started.elapsed(),
        tally.invalid,
        tally.ok,
        tally.codes
    );
    result.unwrap();
    // Both kinds of answer were exercised, and Kafka answered for real partitions.
    assert!(tally.invalid > 20 && tally.ok > 20, "{tally:?}");
    assert!(tally.codes.get(&0).is_some_and(|&n| n > 20), "{tally:?}");
    assert!(tally.codes.contains_key(&3), "{tally:?}");

    // The server is still healthy.
    let mut c = h.client.clone();
    let r = rt
        .block_on(common::forward_one(
            &mut c,
            common::request(1, Acks::All, &main, 1, common::records("after", 3)),
        ))
        .expect("a valid request after the run");
    assert_eq!(r.error_code, 0, "{r:?}");
    assert!(r.base_offset >= 0);
    let _rt = rt.enter();
    drop(h);
}
