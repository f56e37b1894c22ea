//! Kafka RecordBatch (magic 2): checking a caller's raw batch and encoding `records` into one.
//!
//! Hand-written rather than kafka-protocol's `RecordBatchEncoder`/`RecordBatchDecoder`:
//! * its `Record` keeps headers in an `IndexMap`, which silently merges the duplicate header
//!   keys that Kafka allows — forwarding must not lose a header;
//! * checking a raw batch needs only the 61-byte header and one CRC pass, while its decoder
//!   decompresses and materialises every record (and allocates from counts read off the wire).
//!
//! The encoder is tested against kafka-protocol's decoder below.

use bytes::{BufMut, Bytes, BytesMut};

use crate::proto::v1::Record;

pub use crate::kafka::record_batch::BATCH_HEADER;
use crate::kafka::record_batch::{
    ATTRIBUTES_OFFSET, BASE_SEQUENCE_OFFSET, CRC_OFFSET, LENGTH_OFFSET, MAGIC_OFFSET,
    PRODUCER_EPOCH_OFFSET, PRODUCER_ID_OFFSET, RECORDS_COUNT_OFFSET, put_varint, put_varlong,
    varlong_len,
};

/// Attributes bit of a transactional batch.
const TRANSACTIONAL_BIT: i16 = 0x10;

/// What a valid raw batch header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    /// Number of records the header announces.
    pub records: i32,
    /// Producer id; -1 for non-idempotent batches.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
    /// Sequence of the first record.
    pub base_sequence: i32,
    /// Attributes bit 0x10: the batch belongs to a transaction. Apache Kafka accepts it only in
    /// a Produce request that carries the producer's `transactional_id` (docs/design.md §3.15).
    pub transactional: bool,
}

/// Checks that `b` is exactly one v2 record batch: long enough, magic 2, length field matching
/// the bytes, CRC-32C matching. Returns a reason fit for an INVALID_ARGUMENT message.
pub fn check(b: &[u8]) -> Result<BatchInfo, String> {
    if b.len() < BATCH_HEADER {
        return Err(format!(
            "is {} bytes; a v2 record batch header alone is {BATCH_HEADER}",
            b.len()
        ));
    }
    let magic = b[MAGIC_OFFSET] as i8;
    if magic != 2 {
        return Err(format!(
            "has magic byte {magic}; only v2 record batches (magic 2) are accepted"
        ));
    }
    let length = i32::from_be_bytes(b[LENGTH_OFFSET..LENGTH_OFFSET + 4].try_into().expect("4"));
    let following = b.len() - 12;
    if i64::from(length) != following as i64 {
        return Err(format!(
            "length field says {length} bytes follow the first 12, but {following} do \
             (exactly one batch per partition)"
        ));
    }
    let stored = u32::from_be_bytes(b[CRC_OFFSET..CRC_OFFSET + 4].try_into().expect("4"));
    let computed = crc32c::crc32c(&b[ATTRIBUTES_OFFSET..]);
    if stored != computed {
        return Err(format!(
            "CRC-32C mismatch: header says {stored:#010x}, bytes give {computed:#010x}"
        ));
    }
    let records = i32::from_be_bytes(
        b[RECORDS_COUNT_OFFSET..RECORDS_COUNT_OFFSET + 4]
            .try_into()
            .expect("4"),
    );
    if records <= 0 {
        return Err(format!(
            "announces {records} records; at least one is needed"
        ));
    }
    let producer_id = i64::from_be_bytes(
        b[PRODUCER_ID_OFFSET..PRODUCER_ID_OFFSET + 8]
            .try_into()
            .expect("8"),
    );
    let attributes = i16::from_be_bytes(
        b[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2]
            .try_into()
            .expect("2"),
    );
    let producer_epoch = i16::from_be_bytes(
        b[PRODUCER_EPOCH_OFFSET..PRODUCER_EPOCH_OFFSET + 2]
            .try_into()
            .expect("2"),
    );
    let base_sequence = i32::from_be_bytes(
        b[BASE_SEQUENCE_OFFSET..BASE_SEQUENCE_OFFSET + 4]
            .try_into()
            .expect("4"),
    );
    Ok(BatchInfo {
        records,
        producer_id,
        producer_epoch,
        base_sequence,
        transactional: attributes & TRANSACTIONAL_BIT != 0,
    })
}

/// A copy of `batch` (one valid v2 batch, as [`encode`] makes) stamped with an idempotent
/// producer's id, epoch and base sequence, its CRC-32C computed again.
pub fn stamp(batch: &[u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Bytes {
    let mut b = BytesMut::from(batch);
    b[PRODUCER_ID_OFFSET..PRODUCER_ID_OFFSET + 8].copy_from_slice(&producer_id.to_be_bytes());
    b[PRODUCER_EPOCH_OFFSET..PRODUCER_EPOCH_OFFSET + 2]
        .copy_from_slice(&producer_epoch.to_be_bytes());
    b[BASE_SEQUENCE_OFFSET..BASE_SEQUENCE_OFFSET + 4].copy_from_slice(&base_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&b[ATTRIBUTES_OFFSET..]);
    b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    b.freeze()
}

fn put_nullable(buf: &mut BytesMut, b: Option<&Bytes>) {
    match b {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, b.len() as i32);
            buf.put_slice(b);
        }
    }
}

fn nullable_len(b: Option<&Bytes>) -> usize {
    match b {
        None => 1,
        Some(b) => varlong_len(b.len() as i64) + b.len(),
    }
}

/// Encodes `records` into one uncompressed v2 batch without producer id, for batches known to
/// be small (tests, tools); an empty `Bytes` if it would not fit a batch's i32 length.
pub fn encode(records: &[Record], now_ms: i64) -> Bytes {
    encode_within(records, now_ms, i32::MAX as usize).unwrap_or_default()
}

/// Encodes `records` into one uncompressed v2 batch without producer id, unless it would take
/// more than `max_len` bytes (capped at i32::MAX): then `Err` with the length it would have,
/// before anything is allocated. A protobuf request can be much smaller than its batch (an
/// empty record takes 2 bytes there, about 10 here, and a traceparent header adds 70).
///
/// `now_ms` stands in for records whose `timestamp_ms` is 0. Callers have checked that there is
/// at least one record.
pub fn encode_within(records: &[Record], now_ms: i64, max_len: usize) -> Result<Bytes, usize> {
    let ts = |r: &Record| {
        if r.timestamp_ms == 0 {
            now_ms
        } else {
            r.timestamp_ms
        }
    };
    let base_ts = records.first().map_or(now_ms, ts);
    let max_ts = records.iter().map(ts).max().unwrap_or(base_ts);

    let body_len = |i: usize, r: &Record| {
        1 + varlong_len(ts(r).wrapping_sub(base_ts))
            + varlong_len(i as i64)
            + nullable_len(r.key.as_ref())
            + nullable_len(r.value.as_ref())
            + varlong_len(r.headers.len() as i64)
            + r.headers
                .iter()
                .map(|h| {
                    varlong_len(h.key.len() as i64) + h.key.len() + nullable_len(h.value.as_ref())
                })
                .sum::<usize>()
    };
    let records_len: usize = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let l = body_len(i, r);
            varlong_len(l as i64) + l
        })
        .sum();
    let total = BATCH_HEADER + records_len;
    if total > max_len.min(i32::MAX as usize) {
        return Err(total);
    }

    let mut buf = BytesMut::with_capacity(total);
    buf.put_i64(0); // base offset: the leader assigns offsets
    buf.put_i32((BATCH_HEADER - 12 + records_len) as i32); // batch length
    buf.put_i32(-1); // partition leader epoch
    buf.put_i8(2); // magic
    buf.put_u32(0); // CRC, patched below
    buf.put_i16(0); // attributes: no compression, create time, not transactional
    buf.put_i32(records.len() as i32 - 1); // last offset delta
    buf.put_i64(base_ts);
    buf.put_i64(max_ts);
    buf.put_i64(-1); // producer id
    buf.put_i16(-1); // producer epoch
    buf.put_i32(-1); // base sequence
    buf.put_i32(records.len() as i32);
    for (i, r) in records.iter().enumerate() {
        put_varint(&mut buf, body_len(i, r) as i32);
        buf.put_i8(0); // record attributes
        put_varlong(&mut buf, ts(r).wrapping_sub(base_ts));
        put_varint(&mut buf, i as i32);
        put_nullable(&mut buf, r.key.as_ref());
        put_nullable(&mut buf, r.value.as_ref());
        put_varint(&mut buf, r.headers.len() as i32);
        for h in &r.headers {
            put_varint(&mut buf, h.key.len() as i32);
            buf.put_slice(h.key.as_bytes());
            put_nullable(&mut buf, h.value.as_ref());
        }
    }
    let crc = crc32c::crc32c(&buf[ATTRIBUTES_OFFSET..]);
    buf[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::Header;
    use kafka_protocol::records::RecordBatchDecoder;

    fn rec(key: Option<&str>, value: Option<&str>, ts: i64) -> Record {
        Record {
            key: key.map(|k| Bytes::from(k.to_string())),
            value: value.map(|v| Bytes::from(v.to_string())),
            headers: vec![Header {
                key: "h".into(),
                value: Some(Bytes::from_static(b"x")),
            }],
            timestamp_ms: ts,
        }
    }

    #[test]
    fn encoded_batches_decode_with_kafka_protocol_and_pass_the_check() {
        let big = "v".repeat(300);
        let records = vec![
            rec(Some("k1"), Some("v1"), 1_700_000_000_000),
            rec(None, Some(&big), 1_700_000_000_005),
            rec(Some("k3"), None, 0),
        ];
        let b = encode(&records, 1_700_000_000_009);
        let info = check(&b).expect("valid");
        assert_eq!(info.records, 3);
        assert_eq!(info.producer_id, -1);
        let set = RecordBatchDecoder::decode(&mut b.clone()).expect("decodes");
        assert_eq!(set.records.len(), 3);
        assert_eq!(set.records[0].key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(set.records[1].key, None);
        assert_eq!(set.records[1].value.as_deref(), Some(big.as_bytes()));
        assert_eq!(set.records[2].value, None);
        assert_eq!(set.records[2].timestamp, 1_700_000_000_009);
        assert_eq!(set.records[1].offset, 1);
        assert_eq!(
            set.records[0]
                .headers
                .get(&b"h"[..])
                .cloned()
                .flatten()
                .as_deref(),
            Some(&b"x"[..])
        );
    }

    #[test]
    fn merged_batches_keep_every_record_with_its_own_timestamp_and_headers() {
        use crate::kafka::record_batch::merge;
        let a = encode(
            &[
                rec(Some("a0"), Some("x"), 1_700_000_000_100),
                rec(None, None, 1_700_000_000_090),
            ],
            0,
        );
        // Earlier than the first batch's base timestamp: a negative delta.
        let big = "v".repeat(200);
        let b = encode(&[rec(Some("b0"), Some(&big), 1_700_000_000_000)], 0);
        let c = encode(&[rec(Some("c0"), Some("z"), 1_700_000_999_999)], 0);
        let merged = merge(&[a, b, c]).expect("merges");
        let info = check(&merged).expect("a valid batch");
        assert_eq!(info.records, 4);
        let set = RecordBatchDecoder::decode(&mut merged.clone()).expect("decodes");
        let got: Vec<(i64, Option<&[u8]>, i64, usize)> = set
            .records
            .iter()
            .map(|r| {
                (
                    r.offset,
                    r.key.as_deref(),
                    r.timestamp,
                    r.value.as_ref().map_or(0, |v| v.len()),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, Some(&b"a0"[..]), 1_700_000_000_100, 1),
                (1, None, 1_700_000_000_090, 0),
                (2, Some(&b"b0"[..]), 1_700_000_000_000, 200),
                (3, Some(&b"c0"[..]), 1_700_000_999_999, 1),
            ]
        );
        assert!(set.records.iter().all(|r| r.headers.len() == 1));
        let max_ts = i64::from_be_bytes(merged[35..43].try_into().unwrap());
        assert_eq!(max_ts, 1_700_000_999_999);
    }

    #[test]
    fn duplicate_header_keys_survive_encoding() {
        let r = Record {
            key: None,
            value: Some(Bytes::from_static(b"v")),
            headers: vec![
                Header {
                    key: "dup".into(),
                    value: Some(Bytes::from_static(b"1")),
                },
                Header {
                    key: "dup".into(),
                    value: Some(Bytes::from_static(b"2")),
                },
            ],
            timestamp_ms: 5,
        };
        let b = encode(&[r], 0);
        check(&b).unwrap();
        // Both header values are on the wire.
        let s = &b[BATCH_HEADER..];
        assert!(s.windows(5).any(|w| w == b"dup\x021"));
        assert!(s.windows(5).any(|w| w == b"dup\x022"));
    }

    #[test]
    fn a_stamped_batch_carries_the_producer_and_passes_the_check() {
        use kafka_protocol::records::RecordBatchDecoder;
        let plain = encode(&[rec(Some("k"), Some("v"), 1), rec(None, Some("w"), 2)], 1);
        let stamped = stamp(&plain, 4242, 7, 100);
        let info = check(&stamped).expect("valid after stamping");
        assert_eq!((info.producer_id, info.records), (4242, 2));
        let set = RecordBatchDecoder::decode(&mut stamped.clone()).unwrap();
        let seqs: Vec<(i64, i16, i32)> = set
            .records
            .iter()
            .map(|r| (r.producer_id, r.producer_epoch, r.sequence))
            .collect();
        assert_eq!(seqs, vec![(4242, 7, 100), (4242, 7, 101)]);
        assert_eq!(
            &plain[..],
            &encode(&[rec(Some("k"), Some("v"), 1), rec(None, Some("w"), 2)], 1)[..]
        );
    }

    #[test]
    fn compressed_batches_decode_with_kafka_protocol_with_their_stamp_kept() {
        use crate::kafka::record_batch::{Codec, compress};
        let value = "compressible ".repeat(40);
        let records: Vec<Record> = (0..20)
            .map(|i| rec(Some(&format!("k{i}")), Some(&value), 1_700_000_000_000 + i))
            .collect();
        let plain = stamp(&encode(&records, 1), 4242, 7, 100);
        for codec in [Codec::Gzip, Codec::Snappy, Codec::Lz4, Codec::Zstd] {
            let c = compress(&plain, codec).expect("compresses");
            let info = check(&c).expect("length and CRC valid");
            assert_eq!(
                (info.records, info.producer_id, info.base_sequence),
                (20, 4242, 100),
                "{codec:?}"
            );
            assert!(c.len() < plain.len() / 4, "{codec:?}: {} bytes", c.len());
            let attributes = i16::from_be_bytes([c[ATTRIBUTES_OFFSET], c[ATTRIBUTES_OFFSET + 1]]);
            assert_eq!(attributes & 7, codec.attribute(), "{codec:?}");
            // The header before the records is the uncompressed batch's but for length,
            // CRC and attributes.
            assert_eq!(c[23..BATCH_HEADER], plain[23..BATCH_HEADER], "{codec:?}");
            let set = RecordBatchDecoder::decode(&mut c.clone()).expect("decodes");
            assert_eq!(set.compression as i16, codec.attribute());
            assert_eq!(set.records.len(), 20);
            for (i, r) in set.records.iter().enumerate() {
                assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()));
                assert_eq!(r.value.as_deref(), Some(value.as_bytes()));
                assert_eq!(r.timestamp, 1_700_000_000_000 + i as i64);
                assert_eq!((r.producer_id, r.sequence), (4242, 100 + i as i32));
            }
            // A compressed batch is not compressed again.
            assert!(compress(&c, codec).is_err(), "{codec:?}");
        }
        assert_eq!(compress(&plain, Codec::None).unwrap(), plain);
    }

    #[test]
    fn check_rejects_each_defect() {
        let good = encode(&[rec(Some("k"), Some("v"), 1)], 1);
        assert!(check(&good[..40]).unwrap_err().contains("61"));
        let mut bad = good.to_vec();
        bad[MAGIC_OFFSET] = 1;
        assert!(check(&bad).unwrap_err().contains("magic"));
        let mut bad = good.to_vec();
        bad.push(0);
        assert!(check(&bad).unwrap_err().contains("length field"));
        let mut bad = good.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(check(&bad).unwrap_err().contains("CRC"));
    }
}
