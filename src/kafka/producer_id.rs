//! InitProducerId: the producer id and epoch that idempotent Produce batches carry
//! (docs/design.md §3.16).

use std::sync::Arc;

use kafka_protocol::messages::{ApiKey, InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use tokio::time::Instant;

use super::{
    connection::Connection,
    error::{ConnError, RequestError},
    frame::{decode_response, encode_body},
};

/// A producer id and the epoch in use with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    /// The producer id.
    pub producer_id: i64,
    /// Its epoch.
    pub epoch: i16,
}

/// Why no producer identity was obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InitProducerIdError {
    /// The connection failed.
    #[error("InitProducerId: {0}")]
    Conn(#[from] ConnError),
    /// The broker answered with a Kafka error code.
    #[error("InitProducerId answered error code {code}")]
    Kafka {
        /// The Kafka error code.
        code: i16,
    },
    /// The broker does not offer InitProducerId at all.
    #[error("the broker does not offer InitProducerId (no idempotent producer)")]
    Unsupported,
}

/// The transaction timeout sent with an idempotent producer's InitProducerId: brokers ignore it
/// without a transactional id, Kafka's Java producer sends its default.
const TRANSACTION_TIMEOUT_MS: i32 = 60_000;

/// Asks the broker on `conn` for a producer identity without a transactional id. With
/// `current` and a broker that speaks InitProducerId v3+ (KIP-360), the broker bumps that
/// identity's epoch (same id, sequences start again at 0); otherwise it hands out a new id.
pub async fn init_producer_id(
    conn: &Arc<Connection>,
    current: Option<ProducerIdentity>,
    deadline: Instant,
) -> Result<ProducerIdentity, InitProducerIdError> {
    let version = conn.versions().init_producer_id;
    if version < 0 {
        return Err(InitProducerIdError::Unsupported);
    }
    let (producer_id, epoch) = match current {
        Some(c) if version >= 3 => (c.producer_id, c.epoch),
        _ => (-1, -1),
    };
    let req = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(TRANSACTION_TIMEOUT_MS)
        .with_producer_id(ProducerId(producer_id))
        .with_producer_epoch(epoch);
    let body = encode_body(ApiKey::InitProducerId, version, &req)?;
    let answer = async {
        let in_flight = conn
            .send(ApiKey::InitProducerId, version, body, true)
            .await?;
        in_flight.wait(deadline).await?.ok_or(RequestError {
            cause: ConnError::Shutdown,
            maybe_sent: true,
        })
    };
    let frame = answer.await.map_err(|e: RequestError| e.cause)?;
    let resp: InitProducerIdResponse = match decode_response(ApiKey::InitProducerId, version, frame)
    {
        Ok(r) => r,
        Err(e) => {
            conn.poison(e.clone());
            return Err(e.into());
        }
    };
    if resp.error_code != 0 {
        return Err(InitProducerIdError::Kafka {
            code: resp.error_code,
        });
    }
    Ok(ProducerIdentity {
        producer_id: resp.producer_id.0,
        epoch: resp.producer_epoch,
    })
}
