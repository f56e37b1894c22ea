//! Per-connection API version negotiation (docs/design.md §3.9).

use bytes::Bytes;
use kafka_protocol::{
    messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse},
    protocol::StrBytes,
};
use tokio::time::Instant;

use super::{
    connection::Connection,
    error::{ConnError, RequestError},
    frame::{decode_response, decode_response_counting, encode_body},
};
use std::sync::Arc;

/// Produce versions leaderlink speaks: v13 needs topic ids, and Kafka 4 rejects v0–2.
pub const PRODUCE_VERSIONS: (i16, i16) = (3, 12);
/// Metadata versions leaderlink speaks (v1 is the first with rack and controller fields that
/// Kafka 4 still accepts below v4; v12 is the last before topic-id-only changes).
pub const METADATA_VERSIONS: (i16, i16) = (1, 12);
/// InitProducerId versions leaderlink speaks: v3 (KIP-360) lets an idempotent producer bump its
/// epoch; v4 is the last the mock cluster knows.
pub const INIT_PRODUCER_ID_VERSIONS: (i16, i16) = (0, 4);
/// The ApiVersions version tried first. v3 (KIP-511) carries the client software name; a broker
/// that does not know it answers a v0 body with UNSUPPORTED_VERSION, and a lower version is
/// tried.
pub const API_VERSIONS_FIRST: i16 = 3;

/// UNSUPPORTED_VERSION.
const UNSUPPORTED_VERSION: i16 = 35;

/// The API versions agreed with one broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    /// Produce version: the highest both sides support within [`PRODUCE_VERSIONS`].
    pub produce: i16,
    /// Metadata version: the highest both sides support within [`METADATA_VERSIONS`].
    pub metadata: i16,
    /// Highest SaslHandshake version the broker supports; -1 when it has none.
    pub sasl_handshake: i16,
    /// Highest SaslAuthenticate version the broker supports; -1 when it has none.
    pub sasl_authenticate: i16,
    /// InitProducerId version: the highest both sides support within
    /// [`INIT_PRODUCER_ID_VERSIONS`]; -1 when the broker has none (no idempotent producer).
    pub init_producer_id: i16,
}

impl Versions {
    /// Placeholder before negotiation; never used to encode a request.
    pub const UNNEGOTIATED: Versions = Versions {
        produce: -1,
        metadata: -1,
        sasl_handshake: -1,
        sasl_authenticate: -1,
        init_producer_id: -1,
    };
}

/// Runs ApiVersions on a fresh connection and picks the versions to use on it.
pub async fn negotiate(
    conn: &Arc<Connection>,
    deadline: Instant,
) -> Result<Versions, RequestError> {
    let mut version = API_VERSIONS_FIRST;
    loop {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("leaderlink"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let body = encode_body(ApiKey::ApiVersions, version, &req).map_err(not_sent)?;
        let frame = answer(conn, version, body, deadline).await?;
        let decoded = decode_response_counting::<ApiVersionsResponse>(
            ApiKey::ApiVersions,
            version,
            frame.clone(),
        );
        let resp = match decoded {
            Ok((resp, 0)) => resp,
            // librdkafka's mock broker answers v3 with a body that is not standard v3 (bytes
            // left over); the frame itself was whole, so the stream is in sync: ask with v2.
            Ok(_) if version >= 3 => {
                version = 2;
                continue;
            }
            Ok((resp, _)) => resp,
            // A broker that does not support `version` answers with a v0 body (§3.9).
            // Every ApiVersions body starts with its int16 error code, after the 4-byte header.
            // Only an UNSUPPORTED_VERSION answer is decoded as v0 — never a body of another
            // version, whose counts read as v0 would be nonsense.
            Err(e)
                if version > 0
                    && frame.get(4..6) == Some(&UNSUPPORTED_VERSION.to_be_bytes()[..]) =>
            {
                match decode_response::<ApiVersionsResponse>(ApiKey::ApiVersions, 0, frame) {
                    Ok(resp) => resp,
                    Err(_) => {
                        conn.poison(e.clone());
                        return Err(RequestError {
                            cause: e,
                            maybe_sent: true,
                        });
                    }
                }
            }
            // Undecodable at v3+: same fallback as above.
            Err(_) if version >= 3 => {
                version = 2;
                continue;
            }
            Err(e) => {
                conn.poison(e.clone());
                return Err(RequestError {
                    cause: e,
                    maybe_sent: true,
                });
            }
        };
        if resp.error_code == UNSUPPORTED_VERSION && version > 0 {
            let broker_max = resp
                .api_keys
                .iter()
                .find(|k| k.api_key == ApiKey::ApiVersions as i16)
                .map(|k| k.max_version);
            version = match broker_max {
                Some(max) if max < version && max >= 0 => max,
                _ => version - 1,
            };
            continue;
        }
        if resp.error_code != 0 {
            return Err(RequestError {
                cause: ConnError::ApiVersions(resp.error_code),
                maybe_sent: true,
            });
        }
        return pick(&resp).map_err(|cause| RequestError {
            cause,
            maybe_sent: true,
        });
    }
}

fn not_sent(cause: ConnError) -> RequestError {
    RequestError {
        cause,
        maybe_sent: false,
    }
}

async fn answer(
    conn: &Arc<Connection>,
    version: i16,
    body: Bytes,
    deadline: Instant,
) -> Result<Bytes, RequestError> {
    let in_flight = conn.send(ApiKey::ApiVersions, version, body, true).await?;
    in_flight.wait(deadline).await?.ok_or(RequestError {
        cause: ConnError::Shutdown,
        maybe_sent: true,
    })
}

/// Chooses, for each API leaderlink uses, the highest version both sides support.
pub fn pick(resp: &ApiVersionsResponse) -> Result<Versions, ConnError> {
    let choose = |key: ApiKey, (lo, hi): (i16, i16), name: &'static str, need: &'static str| {
        let Some(k) = resp.api_keys.iter().find(|k| k.api_key == key as i16) else {
            return Err(ConnError::Unsupported {
                api: name,
                min: -1,
                max: -1,
                need,
            });
        };
        let v = k.max_version.min(hi);
        if v < lo || v < k.min_version {
            return Err(ConnError::Unsupported {
                api: name,
                min: k.min_version,
                max: k.max_version,
                need,
            });
        }
        Ok(v)
    };
    let max = |key: ApiKey| {
        resp.api_keys
            .iter()
            .find(|k| k.api_key == key as i16)
            .map_or(-1, |k| k.max_version)
    };
    Ok(Versions {
        produce: choose(ApiKey::Produce, PRODUCE_VERSIONS, "Produce", "3..=12")?,
        metadata: choose(ApiKey::Metadata, METADATA_VERSIONS, "Metadata", "1..=12")?,
        sasl_handshake: max(ApiKey::SaslHandshake),
        sasl_authenticate: max(ApiKey::SaslAuthenticate),
        init_producer_id: max(ApiKey::InitProducerId).min(INIT_PRODUCER_ID_VERSIONS.1),
    })
}
