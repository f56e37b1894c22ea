//! Kafka RecordBatch v2 (magic 2) layout, Kafka's varints, and merging the batches of several
//! calls for one partition into one batch (record accumulation, docs/design.md §3.20).
//!
//! Hand-written rather than kafka-protocol's `RecordBatchEncoder`/`RecordBatchDecoder`: merging
//! needs only each record's two deltas rewritten and the rest copied as is, while a decode and
//! re-encode would materialise every record (and its `IndexMap` of headers merges duplicate
//! header keys, which Kafka allows).

use bytes::{BufMut, Bytes, BytesMut};

/// Size of the v2 batch header, up to and including the record count.
pub const BATCH_HEADER: usize = 61;
/// Offset of the int32 batch length (the bytes after the first 12).
pub const LENGTH_OFFSET: usize = 8;
/// Offset of the int8 magic byte.
pub const MAGIC_OFFSET: usize = 16;
/// Offset of the uint32 CRC-32C, computed over everything from the attributes on.
pub const CRC_OFFSET: usize = 17;
/// Offset of the int16 attributes.
pub const ATTRIBUTES_OFFSET: usize = 21;
/// Offset of the int32 last offset delta.
pub const LAST_OFFSET_DELTA_OFFSET: usize = 23;
/// Offset of the int64 base timestamp.
pub const BASE_TIMESTAMP_OFFSET: usize = 27;
/// Offset of the int64 max timestamp.
pub const MAX_TIMESTAMP_OFFSET: usize = 35;
/// Offset of the int64 producer id.
pub const PRODUCER_ID_OFFSET: usize = 43;
/// Offset of the int16 producer epoch.
pub const PRODUCER_EPOCH_OFFSET: usize = 51;
/// Offset of the int32 base sequence.
pub const BASE_SEQUENCE_OFFSET: usize = 53;
/// Offset of the int32 record count.
pub const RECORDS_COUNT_OFFSET: usize = 57;

/// Writes a Kafka varint (zig-zag, base-128 little-endian groups).
pub fn put_varint(buf: &mut BytesMut, v: i32) {
    put_varlong(buf, i64::from(v));
}

/// Writes a Kafka varlong (zig-zag, base-128 little-endian groups).
pub fn put_varlong(buf: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

/// Bytes [`put_varlong`] takes for `v`.
pub fn varlong_len(v: i64) -> usize {
    let z = ((v << 1) ^ (v >> 63)) as u64;
    (64 - z.max(1).leading_zeros() as usize).div_ceil(7).max(1)
}

/// Reads a Kafka varlong at the start of `b`: its value and length. `None` if `b` ends inside
/// it or it runs past ten bytes.
pub fn read_varlong(b: &[u8]) -> Option<(i64, usize)> {
    let mut z: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        z |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((((z >> 1) as i64) ^ -((z & 1) as i64), i + 1));
        }
    }
    None
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Whether `b` is a batch [`merge`] takes: at least a header, magic 2, attributes 0 (no
/// compression, create time, neither transactional nor control) and no producer id.
pub fn mergeable(b: &[u8]) -> bool {
    b.len() >= BATCH_HEADER
        && b[MAGIC_OFFSET] == 2
        && b[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2] == [0, 0]
        && i64_at(b, PRODUCER_ID_OFFSET) == -1
}

/// Merges `batches` (in order; each [`mergeable`], with record offset deltas 0, 1, 2, …, as
/// leaderlink's encoder makes them) into one batch: the records of each follow those of the
/// one before, their offset deltas shifted by the records before them and their timestamp
/// deltas rebased on the first batch's base timestamp. The rest of each record (key, value,
/// headers) is copied as is. One batch comes back unchanged.
///
/// Returns `None`, and nothing is merged, if a batch is not mergeable or a record runs past
/// its batch's end.
pub fn merge(batches: &[Bytes]) -> Option<Bytes> {
    let [first, rest @ ..] = batches else {
        return None;
    };
    if rest.is_empty() {
        return Some(first.clone());
    }
    if !batches.iter().all(|b| mergeable(b)) {
        return None;
    }
    let base_ts = i64_at(first, BASE_TIMESTAMP_OFFSET);
    // Upper bound: each record's two deltas grow by at most 9 and 4 bytes, its length by 4.
    let capacity: usize = batches
        .iter()
        .map(|b| b.len() - BATCH_HEADER + 17 * i32_at(b, RECORDS_COUNT_OFFSET).max(0) as usize)
        .sum();
    let mut out = BytesMut::with_capacity(BATCH_HEADER + capacity);
    out.put_slice(&first[..BATCH_HEADER]);
    let mut count: i32 = 0;
    let mut max_ts = i64::MIN;
    for b in batches {
        let shift_ts = i64_at(b, BASE_TIMESTAMP_OFFSET).wrapping_sub(base_ts);
        max_ts = max_ts.max(i64_at(b, MAX_TIMESTAMP_OFFSET));
        let n = i32_at(b, RECORDS_COUNT_OFFSET);
        let mut at = BATCH_HEADER;
        for _ in 0..n {
            let (len, l) = read_varlong(&b[at..])?;
            let start = at + l;
            let end = start.checked_add(usize::try_from(len).ok()?)?;
            let body = b.get(start..end)?;
            // attributes (1 byte), timestamp delta (varlong), offset delta (varint), rest.
            let (ts, tl) = read_varlong(body.get(1..)?)?;
            let (off, ol) = read_varlong(body.get(1 + tl..)?)?;
            let tail = &body[1 + tl + ol..];
            let ts = ts.wrapping_add(shift_ts);
            let off = off.checked_add(i64::from(count))?;
            let new_len = 1 + varlong_len(ts) + varlong_len(off) + tail.len();
            put_varlong(&mut out, new_len as i64);
            out.put_u8(body[0]);
            put_varlong(&mut out, ts);
            put_varlong(&mut out, off);
            out.put_slice(tail);
            at = end;
        }
        if at != b.len() {
            return None;
        }
        count = count.checked_add(n)?;
    }
    let length = i32::try_from(out.len() - 12).ok()?;
    out[LENGTH_OFFSET..LENGTH_OFFSET + 4].copy_from_slice(&length.to_be_bytes());
    out[LAST_OFFSET_DELTA_OFFSET..LAST_OFFSET_DELTA_OFFSET + 4]
        .copy_from_slice(&(count - 1).to_be_bytes());
    out[MAX_TIMESTAMP_OFFSET..MAX_TIMESTAMP_OFFSET + 8].copy_from_slice(&max_ts.to_be_bytes());
    out[RECORDS_COUNT_OFFSET..RECORDS_COUNT_OFFSET + 4].copy_from_slice(&count.to_be_bytes());
    let crc = crc32c::crc32c(&out[ATTRIBUTES_OFFSET..]);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    Some(out.freeze())
}

/// Compression codec of the record batches leaderlink encodes (the `compression` config key,
/// and `ForwardRequest.compression`). The attribute bits are Kafka's: the codec number in the
/// lowest three bits of a batch's attributes.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Records as they are.
    #[default]
    None,
    /// gzip (DEFLATE), the slowest and usually smallest of Kafka's first codecs.
    Gzip,
    /// Snappy, in the block framing Kafka's Java client writes.
    Snappy,
    /// LZ4 frame format, independent blocks.
    Lz4,
    /// Zstandard (Produce v7 and later, Kafka 2.1+).
    Zstd,
}

impl Codec {
    /// The codec's number in a batch's attributes.
    pub fn attribute(self) -> i16 {
        match self {
            Codec::None => 0,
            Codec::Gzip => 1,
            Codec::Snappy => 2,
            Codec::Lz4 => 3,
            Codec::Zstd => 4,
        }
    }

    /// The name used in the config file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Gzip => "gzip",
            Codec::Snappy => "snappy",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

/// First Produce version whose batches may be zstd-compressed; a leader refuses such a batch
/// in an older request (UNSUPPORTED_COMPRESSION_TYPE).
pub const ZSTD_MIN_PRODUCE_VERSION: i16 = 7;

/// The mask of the codec bits in a batch's attributes.
const CODEC_MASK: i16 = 0x07;

/// A copy of `batch` (one uncompressed v2 batch: as leaderlink encodes, merges and stamps
/// them) with its records compressed by `codec`: the records section replaced by its
/// compressed form, the codec set in the attributes, the length and CRC-32C computed again.
/// The rest of the header (record count, timestamps, producer id, epoch and base sequence) is
/// kept, so a stamp made before compression holds. [`Codec::None`] returns the batch as is.
///
/// Kafka compresses the records section only (docs/design.md §3.23); kafka-protocol's compressors do the codec and
/// its framing. Fails if `batch` is not an uncompressed v2 batch, or a compressor fails.
pub fn compress(batch: &Bytes, codec: Codec) -> Result<Bytes, String> {
    use kafka_protocol::compression::{Gzip, Snappy, Zstd};
    type Compress = fn(&mut BytesMut, &[u8]) -> anyhow::Result<()>;
    let compress: Compress = match codec {
        // Any batch, a caller's raw one (compressed or not) included, goes out as it is.
        Codec::None => return Ok(batch.clone()),
        Codec::Gzip => kafka_protocol_codec::<Gzip>,
        Codec::Snappy => kafka_protocol_codec::<Snappy>,
        Codec::Lz4 => lz4_fast,
        Codec::Zstd => kafka_protocol_codec::<Zstd>,
    };
    if batch.len() < BATCH_HEADER
        || batch[MAGIC_OFFSET] != 2
        || i16::from_be_bytes([batch[ATTRIBUTES_OFFSET], batch[ATTRIBUTES_OFFSET + 1]])
            & CODEC_MASK
            != 0
    {
        return Err("not an uncompressed v2 record batch".into());
    }
    let records = &batch[BATCH_HEADER..];
    let mut out = BytesMut::with_capacity(BATCH_HEADER + records.len() / 2 + 64);
    out.put_slice(&batch[..BATCH_HEADER]);
    compress(&mut out, records)
    .map_err(|e| format!("{} compression failed: {e:#}", codec.name()))?;
    let length = i32::try_from(out.len() - 12)
        .map_err(|_| format!("{} output exceeds a batch's length field", codec.name()))?;
    out[LENGTH_OFFSET..LENGTH_OFFSET + 4].copy_from_slice(&length.to_be_bytes());
    let attributes = i16::from_be_bytes([out[ATTRIBUTES_OFFSET], out[ATTRIBUTES_OFFSET + 1]])
        | codec.attribute();
    out[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attributes.to_be_bytes());
    let crc = crc32c::crc32c(&out[ATTRIBUTES_OFFSET..]);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(out.freeze())
}

/// Appends `records` to `out` compressed as Kafka's LZ4: the LZ4 frame format with independent
/// blocks, in LZ4's fast mode. Written here with the `lz4` crate (the one kafka-protocol uses)
/// rather than through kafka-protocol's `Lz4`, which compresses at level 4, LZ4-HC: Kafka's
/// Java client at its default level (`Lz4BlockOutputStream` takes `fastCompressor()`) and
/// librdkafka both use the fast mode.
fn lz4_fast(out: &mut BytesMut, records: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut encoder = lz4::EncoderBuilder::new()
        .level(0)
        .block_mode(lz4::BlockMode::Independent)
        .build(out.writer())?;
    encoder.write_all(records)?;
    let (_, result) = encoder.finish();
    Ok(result?)
}

/// Appends `records` to `out` compressed with kafka-protocol's codec `C`.
fn kafka_protocol_codec<C: kafka_protocol::compression::Compressor<BytesMut>>(
    out: &mut BytesMut,
    records: &[u8],
) -> anyhow::Result<()> {
    C::compress(out, |b| {
        b.put_slice(records);
        Ok(())
    })
}

/// Records a v2 batch's header announces (0 if `b` is shorter than a header).
pub fn record_count(b: &[u8]) -> i32 {
    if b.len() < BATCH_HEADER {
        return 0;
    }
    i32_at(b, RECORDS_COUNT_OFFSET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_read_back_what_was_written() {
        for v in [
            0i64,
            1,
            -1,
            63,
            64,
            -64,
            -65,
            8191,
            8192,
            i32::MAX as i64,
            i64::MIN,
            i64::MAX,
        ] {
            let mut b = BytesMut::new();
            put_varlong(&mut b, v);
            assert_eq!(b.len(), varlong_len(v), "{v}");
            assert_eq!(read_varlong(&b), Some((v, b.len())), "{v}");
        }
        assert_eq!(read_varlong(&[0x80, 0x80]), None);
        assert_eq!(read_varlong(&[0xff; 11]), None);
    }

    #[test]
    fn merge_refuses_batches_it_cannot_rewrite() {
        assert_eq!(merge(&[]), None);
        let short = Bytes::from_static(&[0; 20]);
        assert_eq!(merge(&[short.clone(), short]), None);
    }
}
