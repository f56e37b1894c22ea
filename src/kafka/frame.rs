//! Kafka framing: a 4-byte big-endian length, then a header and a body.
//!
//! Checked before parsed, as in mini-redis: [`FrameDecoder::split`] first confirms that a whole
//! frame is buffered and that its length prefix is sane, and only then splits it off. An
//! incomplete frame is an ordinary state, not an error. Memory grows only with bytes actually
//! received, never with what a length prefix claims.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, RequestHeader, ResponseHeader},
    protocol::{Decodable, Encodable, StrBytes},
};

use super::error::ConnError;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Splits complete response frames off a receive buffer.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Largest accepted frame body. A larger length prefix poisons the connection instead of
    /// being allocated (docs/design.md §3.6).
    max_frame_bytes: usize,
}

/// How much buffer to reserve at a time while a large frame arrives, so that a peer announcing a
/// large frame and then trickling bytes costs memory only for what it really sent.
const READ_CHUNK: usize = 64 * 1024;

impl FrameDecoder {
    /// A decoder that rejects frames larger than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// Returns the next whole frame body (without its length prefix) if one is buffered.
    ///
    /// `Ok(None)` means "need more bytes"; `buf` then has spare capacity reserved for them.
    pub fn split(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, ConnError> {
        if buf.len() < LEN_PREFIX {
            buf.reserve(READ_CHUNK);
            return Ok(None);
        }
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        // A response must at least hold its correlation id.
        if len < 4 {
            return Err(ConnError::BadLength(len));
        }
        let len = len as usize;
        if len > self.max_frame_bytes {
            return Err(ConnError::FrameTooLarge {
                limit: self.max_frame_bytes,
                actual: len,
            });
        }
        let total = LEN_PREFIX + len;
        if buf.len() < total {
            buf.reserve((total - buf.len()).min(READ_CHUNK));
            return Ok(None);
        }
        buf.advance(LEN_PREFIX);
        Ok(Some(buf.split_to(len).freeze()))
    }
}

/// The correlation id at the start of every response header (all versions).
pub fn correlation_id(frame: &[u8]) -> i32 {
    // FrameDecoder guarantees at least 4 bytes.
    i32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]])
}

/// Encodes the length prefix and request header for a request whose body is `body_len` bytes.
///
/// The body is kept apart so that large payloads are written from their own buffer.
pub fn encode_request_head(
    api_key: ApiKey,
    api_version: i16,
    correlation_id: i32,
    client_id: &Option<StrBytes>,
    body_len: usize,
) -> Result<Bytes, ConnError> {
    // Header versions follow the API version (docs/design.md §3.8); client_id is a classic nullable
    // string in every header version, which kafka-protocol's RequestHeader honours.
    let header_version = api_key.request_header_version(api_version);
    let header = RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(api_version)
        .with_correlation_id(correlation_id)
        .with_client_id(client_id.clone());
    let enc = |e: anyhow::Error| ConnError::Encode {
        api: api_name(api_key),
        reason: e.to_string(),
    };
    let header_len = header.compute_size(header_version).map_err(enc)?;
    let frame_len = i32::try_from(header_len + body_len).map_err(|_| ConnError::Encode {
        api: api_name(api_key),
        reason: format!("request of {} bytes is too large", header_len + body_len),
    })?;
    let mut head = BytesMut::with_capacity(LEN_PREFIX + header_len);
    head.put_i32(frame_len);
    header.encode(&mut head, header_version).map_err(enc)?;
    Ok(head.freeze())
}

/// Strips the response header (whose version depends on the request) and decodes the body.
pub fn decode_response<R: Decodable>(
    api_key: ApiKey,
    api_version: i16,
    frame: Bytes,
) -> Result<R, ConnError> {
    decode_response_counting(api_key, api_version, frame).map(|(body, _)| body)
}

/// Like [`decode_response`], also returning how many bytes followed the body.
pub fn decode_response_counting<R: Decodable>(
    api_key: ApiKey,
    api_version: i16,
    mut frame: Bytes,
) -> Result<(R, usize), ConnError> {
    let malformed = |e: anyhow::Error| ConnError::Malformed {
        api: api_name(api_key),
        reason: e.to_string(),
    };
    // ApiVersions responses always use header v0 (docs/design.md §3.8); kafka-protocol's
    // `response_header_version` already encodes that rule.
    let header_version = api_key.response_header_version(api_version);
    ResponseHeader::decode(&mut frame, header_version).map_err(malformed)?;
    // kafka-protocol reserves memory from counts read off the wire; walk the shape first.
    super::guard::check(api_key, api_version, &frame).map_err(|reason| ConnError::Malformed {
        api: api_name(api_key),
        reason: format!("refused before decoding: {reason}"),
    })?;
    let body = R::decode(&mut frame, api_version).map_err(malformed)?;
    // Bytes after the body are ignored, as Apache Kafka's Java client and librdkafka do (the
    // mock broker, for one, appends a byte to its Metadata v12 answers).
    Ok((body, frame.remaining()))
}

/// Encodes a request body.
pub fn encode_body<R: Encodable>(
    api_key: ApiKey,
    api_version: i16,
    req: &R,
) -> Result<Bytes, ConnError> {
    let enc = |e: anyhow::Error| ConnError::Encode {
        api: api_name(api_key),
        reason: e.to_string(),
    };
    let size = req.compute_size(api_version).map_err(enc)?;
    let mut buf = BytesMut::with_capacity(size);
    req.encode(&mut buf, api_version).map_err(enc)?;
    Ok(buf.freeze())
}

/// A short name for log lines and errors.
pub fn api_name(api_key: ApiKey) -> &'static str {
    match api_key {
        ApiKey::Produce => "Produce",
        ApiKey::Metadata => "Metadata",
        ApiKey::ApiVersions => "ApiVersions",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_frames_wait_for_more_bytes() {
        let d = FrameDecoder::new(1024);
        let mut buf = BytesMut::new();
        buf.put_slice(&[0, 0]);
        assert!(d.split(&mut buf).unwrap().is_none());
        buf.put_slice(&[0, 6, 0, 0, 0, 7]);
        assert!(d.split(&mut buf).unwrap().is_none());
        buf.put_slice(&[1, 2, 9]);
        let f = d.split(&mut buf).unwrap().unwrap();
        assert_eq!(&f[..], &[0, 0, 0, 7, 1, 2]);
        assert_eq!(correlation_id(&f), 7);
        assert_eq!(&buf[..], &[9]);
    }

    #[test]
    fn negative_short_and_oversize_lengths_are_rejected_without_allocating() {
        let d = FrameDecoder::new(1024);
        let mut buf = BytesMut::from(&(-5i32).to_be_bytes()[..]);
        assert!(matches!(d.split(&mut buf), Err(ConnError::BadLength(-5))));
        let mut buf = BytesMut::from(&2i32.to_be_bytes()[..]);
        assert!(matches!(d.split(&mut buf), Err(ConnError::BadLength(2))));
        let mut buf = BytesMut::from(&i32::MAX.to_be_bytes()[..]);
        let before = buf.capacity();
        assert!(matches!(
            d.split(&mut buf),
            Err(ConnError::FrameTooLarge { limit: 1024, .. })
        ));
        assert_eq!(buf.capacity(), before);
    }
}

#[cfg(test)]
mod hostile_tests {
    use bytes::{BufMut, BytesMut};
    use kafka_protocol::messages::{ApiKey, ProduceResponse};

    use super::*;

    #[test]
    fn a_produce_answer_announcing_billions_of_topics_is_refused_not_allocated() {
        let mut f = BytesMut::new();
        f.put_i32(7); // correlation id
        f.put_u8(0); // response header v1: no tagged fields
        f.put_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // compact array of 2^32 - 2 topics
        let err = decode_response::<ProduceResponse>(ApiKey::Produce, 9, f.freeze()).unwrap_err();
        assert!(
            matches!(&err, ConnError::Malformed { reason, .. } if reason.contains("refused before decoding")),
            "{err:?}"
        );
    }
}
