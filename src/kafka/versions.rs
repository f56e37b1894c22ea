//! The API versions leaderlink speaks, and the choice among those a broker offers
//! (docs/design.md §3.9; the exchange itself is in `dial.rs`).

use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

use super::error::ConnError;

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
