//! Checks a `ForwardRequest` before any leader sees it.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::{ForwardError, batch, idempotence::Open};
use crate::{
    kafka::{produce::acks, record_batch::Codec},
    proto::v1::{Acks, Compression, ForwardRequest, Header, Record},
};

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// One partition's payload, ready to send.
#[derive(Debug, Clone)]
pub struct Item {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: i32,
    /// One v2 record batch.
    pub batch: Bytes,
    /// Records in the batch.
    pub records: u32,
    /// The batch carries a producer id (an idempotent or transactional producer's batch): its
    /// bytes and sequence must survive retries unchanged, with at most 5 requests in flight
    /// for its partition.
    pub idempotent: bool,
    /// The producer id, epoch and base sequence in a raw batch's header, when it has a producer
    /// id.
    pub producer: Option<Open>,
    /// leaderlink encoded the batch from `records` (it may stamp it as an idempotent
    /// producer's).
    pub encoded: bool,
    /// With `partition` [`CHOOSE_PARTITION`]: the key every record of the batch carries, from
    /// which the partition is chosen; `None` for records without a key (the topic's sticky
    /// partition).
    pub key: Option<Bytes>,
}

/// A request that passed validation.
#[derive(Debug)]
pub struct Validated {
    /// Caller's request id.
    pub id: u64,
    /// Kafka acks value.
    pub acks: i16,
    /// Kafka `timeout_ms` asked for; 0 = server default.
    pub timeout_ms: u32,
    /// The producer's transactional id, sent in the Produce request; set exactly when the
    /// request carries transactional batches.
    pub transactional_id: Option<Arc<str>>,
    /// Payloads, in request order.
    pub items: Vec<Item>,
    /// Codec of the batches leaderlink encodes, as the request asks; `None`: the server's.
    pub codec: Option<Codec>,
}

/// A `PartitionData.partition` that asks leaderlink to choose the partition (see
/// [`super::partitioner`]).
pub const CHOOSE_PARTITION: i32 = -1;

/// Longest transactional id: the Produce request carries it as a string with an int16 length.
pub const MAX_TRANSACTIONAL_ID_LEN: usize = i16::MAX as usize;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ForwardError {
    ForwardError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks a topic name the way Kafka does.
pub fn check_topic(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "is {} characters; Kafka allows at most {MAX_TOPIC_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("contains {c:?}; Kafka allows only [a-zA-Z0-9._-]"));
    }
    Ok(())
}

/// The batches leaderlink encodes from a request's `records` may take at most this many times
/// `max_request_bytes` in all; beyond it the request gets INVALID_ARGUMENT.
pub const BATCH_EXPANSION: usize = 8;

/// Name of the record header that carries the call's W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Validates `req` and turns every payload into one record batch.
///
/// `max_request_bytes` bounds the encoded request; `now_ms` stamps records without a timestamp.
/// `traceparent`, when given, is added as a header to every record in `records` that has no
/// `traceparent` header of its own; `record_batch` bytes are never altered.
pub fn validate(
    req: ForwardRequest,
    max_request_bytes: usize,
    now_ms: i64,
    traceparent: Option<&str>,
) -> Result<Validated, ForwardError> {
    let traceparent = traceparent.map(|t| Bytes::copy_from_slice(t.as_bytes()));
    // What the batches leaderlink encodes may take in all: tiny records cost several times
    // their protobuf size (more with a traceparent header); a request must not turn into an
    // allocation far beyond its own size.
    let mut batch_budget = max_request_bytes.saturating_mul(BATCH_EXPANSION);
    let (acks, codec) = check_request(&req, max_request_bytes)?;
    let transactional_id: Option<Arc<str>> =
        (!req.transactional_id.is_empty()).then(|| req.transactional_id.as_str().into());
    let mut items = Vec::with_capacity(req.partitions.len());
    for (i, p) in req.partitions.into_iter().enumerate() {
        let field = |f: &str| format!("partitions[{i}].{f}");
        check_topic(&p.topic).map_err(|r| invalid(field("topic"), r))?;
        if p.partition < CHOOSE_PARTITION {
            return Err(invalid(
                field("partition"),
                format!(
                    "is {}; must be >= 0, or -1 for leaderlink to choose",
                    p.partition
                ),
            ));
        }
        let key = if p.partition == CHOOSE_PARTITION {
            common_key(&p.records, !p.record_batch.is_empty())
                .map_err(|r| invalid(field("partition"), r))?
        } else {
            None
        };
        let encoded = p.record_batch.is_empty();
        let (batch, records, producer) = match (p.record_batch.is_empty(), p.records.is_empty()) {
            (false, false) => {
                return Err(invalid(
                    field("record_batch"),
                    "both record_batch and records are set; set exactly one",
                ));
            }
            (true, true) => {
                return Err(invalid(
                    field("records"),
                    "neither record_batch nor records is set; set exactly one",
                ));
            }
            (false, true) => raw_batch(p.record_batch, i, transactional_id.is_some())?,
            (true, false) if transactional_id.is_some() => {
                return Err(invalid(
                    field("records"),
                    "are encoded by leaderlink outside any transaction, but transactional_id \
                     is set; send the producer's transactional record_batch instead",
                ));
            }
            (true, false) => {
                let records = p.records.len() as u32;
                let batch = encode_records(
                    p.records,
                    traceparent.as_ref(),
                    now_ms,
                    &mut batch_budget,
                    max_request_bytes,
                )
                .map_err(|r| invalid(field("records"), r))?;
                (batch, records, None)
            }
        };
        items.push(Item {
            topic: p.topic,
            partition: p.partition,
            batch,
            records,
            idempotent: producer.is_some(),
            producer,
            encoded,
            key,
        });
    }
    Ok(Validated {
        id: req.id,
        acks,
        timeout_ms: req.timeout_ms,
        transactional_id,
        items,
        codec,
    })
}

/// For an entry with partition -1: the key all its `records` share. A raw batch cannot have
/// its partition chosen, and records with different keys would belong to different partitions
/// while an entry is one batch for one partition.
fn common_key(records: &[Record], raw: bool) -> Result<Option<Bytes>, String> {
    if raw {
        return Err(
            "is -1, which only `records` may use: the producer that built a \
                    record_batch chose its partition (its sequence numbers count per \
                    partition); set it"
                .into(),
        );
    }
    let Some(first) = records.first() else {
        return Ok(None);
    };
    if let Some(j) = records.iter().position(|r| r.key != first.key) {
        return Err(format!(
            "is -1, but records[{j}] has another key than records[0]; leaderlink chooses one \
             partition per entry from the key its records share (or a sticky partition when \
             none has a key): put records with different keys in entries of their own"
        ));
    }
    Ok(first.key.clone())
}

/// Checks the request's own fields (size, acks, Kafka timeout, partitions present,
/// transactional id, codec); returns its Kafka `acks` and the codec it asks for.
fn check_request(
    req: &ForwardRequest,
    max_request_bytes: usize,
) -> Result<(i16, Option<Codec>), ForwardError> {
    let size = req.encoded_len();
    if size > max_request_bytes {
        return Err(invalid(
            "request",
            format!("is {size} bytes; the limit (max_request_bytes) is {max_request_bytes}"),
        ));
    }
    let acks = match Acks::try_from(req.acks) {
        Ok(Acks::None) => acks::NONE,
        Ok(Acks::Leader) => acks::LEADER,
        Ok(Acks::All | Acks::Unspecified) => acks::ALL,
        Err(_) => {
            return Err(invalid(
                "acks",
                format!(
                    "unknown value {}; use ACKS_NONE, ACKS_LEADER or ACKS_ALL",
                    req.acks
                ),
            ));
        }
    };
    if req.timeout_ms > i32::MAX as u32 {
        return Err(invalid(
            "timeout_ms",
            format!("{} exceeds {}", req.timeout_ms, i32::MAX),
        ));
    }
    if req.partitions.is_empty() {
        return Err(invalid("partitions", "at least one partition is required"));
    }
    if req.transactional_id.len() > MAX_TRANSACTIONAL_ID_LEN {
        return Err(invalid(
            "transactional_id",
            format!(
                "is {} bytes; Kafka allows at most {MAX_TRANSACTIONAL_ID_LEN}",
                req.transactional_id.len()
            ),
        ));
    }
    let codec = match Compression::try_from(req.compression) {
        Ok(Compression::Unspecified) => None,
        Ok(Compression::None) => Some(Codec::None),
        Ok(Compression::Gzip) => Some(Codec::Gzip),
        Ok(Compression::Snappy) => Some(Codec::Snappy),
        Ok(Compression::Lz4) => Some(Codec::Lz4),
        Ok(Compression::Zstd) => Some(Codec::Zstd),
        Err(_) => {
            return Err(invalid(
                "compression",
                format!(
                    "unknown value {}; use COMPRESSION_UNSPECIFIED (the server's setting), \
                     COMPRESSION_NONE, COMPRESSION_GZIP, COMPRESSION_SNAPPY, COMPRESSION_LZ4 \
                     or COMPRESSION_ZSTD",
                    req.compression
                ),
            ));
        }
    };
    Ok((acks, codec))
}

/// Checks partition `i`'s caller-built `record_batch`; returns it with its record count and
/// producer id, epoch and sequence (if it has a producer id).
fn raw_batch(
    record_batch: Bytes,
    i: usize,
    has_transactional_id: bool,
) -> Result<(Bytes, u32, Option<Open>), ForwardError> {
    let field = format!("partitions[{i}].record_batch");
    let info = batch::check(&record_batch).map_err(|r| invalid(field.clone(), r))?;
    // Apache Kafka refuses a whole Produce request that holds a transactional batch but no
    // transactional id (TRANSACTIONAL_ID_AUTHORIZATION_FAILED), so the two go together
    // (docs/design.md §3.15).
    match (info.transactional, has_transactional_id) {
        (true, false) => {
            return Err(invalid(
                "transactional_id",
                format!(
                    "is empty, but partitions[{i}].record_batch is transactional \
                     (attributes bit 0x10); set the producer's transactional id"
                ),
            ));
        }
        (false, true) => {
            return Err(invalid(
                field,
                "is not transactional (attributes bit 0x10 unset), but \
                 transactional_id is set; send plain batches in another request",
            ));
        }
        _ => {}
    }
    let producer = (info.producer_id >= 0).then_some(Open {
        producer_id: info.producer_id,
        epoch: info.producer_epoch,
        base_sequence: info.base_sequence,
    });
    Ok((record_batch, info.records as u32, producer))
}

/// Encodes `records` as one batch (with the call's `traceparent` header added where a record
/// has none), taking its size from `budget`. Fails with the reason when the budget is spent.
fn encode_records(
    mut records: Vec<Record>,
    traceparent: Option<&Bytes>,
    now_ms: i64,
    budget: &mut usize,
    max_request_bytes: usize,
) -> Result<Bytes, String> {
    if let Some(tp) = traceparent {
        for r in &mut records {
            if !r.headers.iter().any(|h| h.key == TRACEPARENT) {
                r.headers.push(Header {
                    key: TRACEPARENT.into(),
                    value: Some(tp.clone()),
                });
            }
        }
    }
    let encoded = batch::encode_within(&records, now_ms, *budget).map_err(|n| {
        format!(
            "encode to a batch of {n} bytes; a request's encoded records may take at most \
             {BATCH_EXPANSION} x max_request_bytes ({} bytes) in all",
            max_request_bytes.saturating_mul(BATCH_EXPANSION)
        )
    })?;
    *budget -= encoded.len();
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(check_topic("orders.v1_x-2").is_ok());
        assert!(check_topic(&"a".repeat(249)).is_ok());
        assert!(check_topic(&"a".repeat(250)).is_err());
        assert!(check_topic("").is_err());
        assert!(check_topic(".").is_err());
        assert!(check_topic("..").is_err());
        assert!(check_topic("a b").unwrap_err().contains("' '"));
        assert!(check_topic("ü").is_err());
    }

    #[test]
    fn records_that_expand_far_beyond_the_request_are_refused() {
        use crate::proto::v1::{PartitionData, Record};
        let req = |n: usize| ForwardRequest {
            call_timeout_ms: 0,
            id: 1,
            acks: 0,
            timeout_ms: 0,
            partitions: vec![PartitionData {
                topic: "t".into(),
                partition: 0,
                record_batch: Bytes::new(),
                records: vec![Record::default(); n],
            }],
            transactional_id: String::new(),
            compression: 0,
        };
        let tp = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        // 400 empty records: 800 bytes of protobuf, over 30 KB of batch with the header.
        let big = req(400);
        assert!(big.encoded_len() <= 1024);
        match validate(big.clone(), 1024, 1, tp) {
            Err(ForwardError::Invalid { field, reason }) => {
                assert_eq!(field, "partitions[0].records");
                assert!(reason.contains("max_request_bytes"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Without the header, or with fewer records, it fits.
        assert!(validate(big, 1024, 1, None).is_ok());
        assert!(validate(req(40), 1024, 1, tp).is_ok());
    }
}
