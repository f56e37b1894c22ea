//! The defensive decode path for broker answers: `guard::check`, then kafka-protocol's decoder,
//! exactly as leaderlink runs them (`frame::decode_response` and friends).
//!
//! Input layout: 1 byte API (Produce, Metadata, ApiVersions), 1 byte version (mapped into the
//! range leaderlink speaks for that API), then the response frame without its length prefix
//! (response header + body), as `FrameDecoder::split` hands it over.
//!
//! Checked: no panic, no absurd allocation (libFuzzer's -malloc_limit_mb/-rss_limit_mb); and
//! the guard is no stricter than kafka-protocol's own encoder: whatever decodes re-encodes into
//! a body the guard accepts (unless the encoder contradicts itself, see `reencoded_passes`).
#![no_main]

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, ApiVersionsResponse, MetadataResponse, ProduceResponse, ResponseHeader},
    protocol::{Decodable, Encodable},
};
use leaderlink::kafka::{
    frame::{decode_response, decode_response_counting},
    guard, produce,
    versions::{self, API_VERSIONS_FIRST, METADATA_VERSIONS, PRODUCE_VERSIONS},
};
use libfuzzer_sys::fuzz_target;

/// UNSUPPORTED_VERSION.
const UNSUPPORTED_VERSION: i16 = 35;

/// The body after the response header, if the header decodes.
fn body(api: ApiKey, version: i16, frame: &Bytes) -> Option<Bytes> {
    let mut b = frame.clone();
    ResponseHeader::decode(&mut b, api.response_header_version(version)).ok()?;
    Some(b)
}

/// Re-encodes a decoded body and runs the guard on it: kafka-protocol's own encoding must pass.
///
/// Skipped when the encoder contradicts itself: kafka-protocol 0.18 decodes an unknown tag
/// number >= 2^31 into a negative map key, which `write_unknown_tagged_fields(buf, 0.., ..)` then
/// leaves out while the tag count (and `compute_size`) still include it. Such output is garbage
/// to every reader (decoding it unguarded can even announce a 256 GiB array), so the guard may
/// refuse it.
fn reencoded_passes<T: Encodable>(api: ApiKey, version: i16, m: &T) {
    let mut b = BytesMut::new();
    if m.encode(&mut b, version).is_err() {
        return;
    }
    if m.compute_size(version).ok() != Some(b.len()) {
        return;
    }
    if let Err(e) = guard::check(api, version, &b) {
        panic!("guard refuses kafka-protocol's own {api:?} v{version} encoding: {e}\n{b:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (api, (lo, hi)) = match data[0] % 3 {
        0 => (ApiKey::Produce, PRODUCE_VERSIONS),
        1 => (ApiKey::Metadata, METADATA_VERSIONS),
        _ => (ApiKey::ApiVersions, (0, API_VERSIONS_FIRST)),
    };
    let version = lo + (i16::from(data[1]) % (hi - lo + 1));
    let frame = Bytes::copy_from_slice(&data[2..]);

    // The guard on its own, on the bytes as a body.
    let _ = guard::check(api, version, &frame);

    match api {
        ApiKey::Produce => {
            // What the forwarder runs on every Produce answer.
            if produce::decode(version, frame.clone()).is_ok() {
                let b = body(api, version, &frame).expect("decoded, so the header did");
                let m = ProduceResponse::decode(&mut b.clone(), version).expect("decoded once");
                reencoded_passes(api, version, &m);
            }
        }
        ApiKey::Metadata => {
            // What the metadata client runs on every Metadata answer.
            if let Ok(m) = decode_response::<MetadataResponse>(api, version, frame) {
                reencoded_passes(api, version, &m);
            }
        }
        _ => {
            // What version negotiation runs, including its v0 fallback for an
            // UNSUPPORTED_VERSION answer.
            let resp = match decode_response_counting::<ApiVersionsResponse>(
                api,
                version,
                frame.clone(),
            ) {
                Ok((resp, _)) => Some((resp, version)),
                Err(_)
                    if version > 0
                        && frame.get(4..6) == Some(&UNSUPPORTED_VERSION.to_be_bytes()[..]) =>
                {
                    decode_response::<ApiVersionsResponse>(api, 0, frame)
                        .ok()
                        .map(|r| (r, 0))
                }
                Err(_) => None,
            };
            if let Some((resp, decoded_at)) = resp {
                let _ = versions::pick(&resp);
                reencoded_passes(api, decoded_at, &resp);
            }
        }
    }
});
