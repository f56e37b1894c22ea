//! Produce request encoding and response decoding.

use std::collections::HashMap;

use bytes::Bytes;
use kafka_protocol::{
    messages::{
        ApiKey, ProduceRequest, ProduceResponse, TopicName, TransactionalId,
        produce_request::{PartitionProduceData, TopicProduceData},
    },
    protocol::StrBytes,
};
use tokio::time::{Duration, Instant};

use super::{
    error::ConnError,
    frame::{decode_response, encode_body},
    metadata::Broker,
};

/// Kafka `acks` values.
pub mod acks {
    /// Leader does not answer.
    pub const NONE: i16 = 0;
    /// Leader answers after its own append.
    pub const LEADER: i16 = 1;
    /// Leader answers after every in-sync replica has the batch.
    pub const ALL: i16 = -1;
}

/// One partition's batch in a Produce request.
#[derive(Debug, Clone)]
pub struct PartitionBatch<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Partition index.
    pub partition: i32,
    /// One record batch, sent as is.
    pub batch: Bytes,
}

/// Encodes a Produce request body. Callers guarantee at most one batch per partition
/// (docs/design.md §3.10), and that `transactional_id` is set exactly when the batches are
/// transactional (§3.15).
pub fn encode(
    version: i16,
    acks: i16,
    timeout_ms: i32,
    transactional_id: Option<&str>,
    batches: &[PartitionBatch<'_>],
) -> Result<Bytes, ConnError> {
    let mut topics: Vec<TopicProduceData> = Vec::new();
    for b in batches {
        let data = PartitionProduceData::default()
            .with_index(b.partition)
            .with_records(Some(b.batch.clone()));
        match topics.iter_mut().find(|t| t.name.0.as_str() == b.topic) {
            Some(t) => t.partition_data.push(data),
            None => topics.push(
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(b.topic.to_string())))
                    .with_partition_data(vec![data]),
            ),
        }
    }
    let req = ProduceRequest::default()
        .with_transactional_id(
            transactional_id.map(|t| TransactionalId(StrBytes::from_string(t.to_string()))),
        )
        .with_acks(acks)
        .with_timeout_ms(timeout_ms)
        .with_topic_data(topics);
    encode_body(ApiKey::Produce, version, &req)
}

/// The Kafka `timeout_ms` for a request sent now: `asked_ms`, cut so that the leader gives up
/// before `deadline`, with a margin for the answer's way back (a tenth of the time left, at
/// least 5 ms and at most 1 s; docs/design.md §3.14). `None` when no useful time is left.
pub fn cut_timeout(asked_ms: u32, deadline: Instant) -> Option<i32> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let margin = (remaining / 10).clamp(Duration::from_millis(5), Duration::from_secs(1));
    let avail = remaining.checked_sub(margin)?.as_millis();
    if avail == 0 {
        return None;
    }
    Some(avail.min(u128::from(asked_ms)).min(i32::MAX as u128) as i32)
}

/// Sets `timeout_ms` in a body from [`encode`] with the same `transactional_id`, in place when
/// the buffer is not shared.
///
/// The field follows the transactional id (a nullable string: int16 length, or from v9 on a
/// compact varint of length + 1) and the int16 acks.
pub fn with_timeout(
    body: Bytes,
    version: i16,
    transactional_id: Option<&str>,
    timeout_ms: i32,
) -> Bytes {
    let id_len = transactional_id.map_or(0, str::len);
    let prefix = if version >= 9 {
        // Unsigned varint of length + 1 (0 for null).
        let mut n = transactional_id.map_or(0, |t| t.len() + 1);
        let mut bytes = 1;
        while n >= 0x80 {
            n >>= 7;
            bytes += 1;
        }
        bytes
    } else {
        2
    };
    let at = prefix + id_len + 2;
    let mut b = match body.try_into_mut() {
        Ok(b) => b,
        Err(shared) => bytes::BytesMut::from(&shared[..]),
    };
    b[at..at + 4].copy_from_slice(&timeout_ms.to_be_bytes());
    b.freeze()
}

/// The leader's answer for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionAnswer {
    /// Kafka error code, 0 on success.
    pub error_code: i16,
    /// The leader's error message, if any (the record errors are in `record_errors`).
    pub error_message: Option<String>,
    /// Offset of the first record appended.
    pub base_offset: i64,
    /// Log append time, or -1.
    pub log_append_time_ms: i64,
    /// Log start offset, or -1.
    pub log_start_offset: i64,
    /// Records the leader refused (Produce v8+): index in the batch, and the leader's reason.
    pub record_errors: Vec<(i32, Option<String>)>,
    /// KIP-951 hint (Produce v10+): the current leader id and epoch, when the leader knows it
    /// is no longer the leader.
    pub current_leader: Option<(i32, i32)>,
}

/// A decoded Produce response.
#[derive(Debug, Default)]
pub struct Answers {
    /// Per (topic, partition).
    pub partitions: HashMap<(String, i32), PartitionAnswer>,
    /// KIP-951 (Produce v10+): addresses of the brokers named in `current_leader` hints.
    pub endpoints: Vec<Broker>,
}

/// Decodes a Produce response frame.
pub fn decode(version: i16, frame: Bytes) -> Result<Answers, ConnError> {
    let resp: ProduceResponse = decode_response(ApiKey::Produce, version, frame)?;
    let endpoints = resp
        .node_endpoints
        .iter()
        .map(|e| Broker {
            id: e.node_id.0,
            host: e.host.as_str().to_string(),
            port: e.port,
        })
        .collect();
    let mut out = HashMap::new();
    for t in resp.responses {
        let topic = t.name.0.as_str().to_string();
        for p in t.partition_responses {
            let leader = p.current_leader.leader_id.0;
            let current_leader = (leader >= 0).then_some((leader, p.current_leader.leader_epoch));
            let error_message = p.error_message.map(|m| m.as_str().to_string());
            out.insert(
                (topic.clone(), p.index),
                PartitionAnswer {
                    error_code: p.error_code,
                    error_message,
                    base_offset: p.base_offset,
                    log_append_time_ms: p.log_append_time_ms,
                    log_start_offset: p.log_start_offset,
                    current_leader,
                    record_errors: p
                        .record_errors
                        .iter()
                        .map(|e| {
                            let msg = e.batch_index_error_message.as_ref();
                            (e.batch_index, msg.map(|m| m.as_str().to_string()))
                        })
                        .collect(),
                },
            );
        }
    }
    Ok(Answers {
        partitions: out,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use kafka_protocol::protocol::Decodable;

    use super::*;

    #[test]
    fn the_timeout_can_be_set_after_encoding_in_every_version() {
        let long = "x".repeat(300);
        for version in 3..=12 {
            for tid in [None, Some("tx-1"), Some(""), Some(long.as_str())] {
                let batches = [PartitionBatch {
                    topic: "t",
                    partition: 2,
                    batch: Bytes::from_static(b"not a real batch"),
                }];
                let body = with_timeout(
                    encode(version, acks::ALL, 0, tid, &batches).unwrap(),
                    version,
                    tid,
                    4321,
                );
                let req = ProduceRequest::decode(&mut body.clone(), version).unwrap();
                assert_eq!(req.timeout_ms, 4321, "v{version} {tid:?}");
                assert_eq!(req.acks, acks::ALL);
                assert_eq!(req.transactional_id.as_ref().map(|t| t.0.as_str()), tid);
                assert_eq!(req.topic_data[0].partition_data[0].index, 2);
            }
        }
    }
}
