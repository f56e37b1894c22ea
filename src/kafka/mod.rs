//! The Kafka-wire side: framing, the pipelined connection, version negotiation, the shape guard
//! run before decoding, the connection pool and the leader map. Nothing in here knows about gRPC.

// The public rooms: what the Forwarder's own API shows (its pool and leader map, connection
// counters and settings, errors, TLS and SASL settings).
pub mod connection;
pub mod error;
pub mod histogram;
pub mod metadata;
pub mod pool;
pub mod security;

// The wire layer, private to the crate; public only with the `fuzz` feature, for the fuzz
// targets (rskafka keeps its protocol layer the same way).
#[cfg(feature = "fuzz")]
pub mod coalesce;
#[cfg(not(feature = "fuzz"))]
pub(crate) mod coalesce;
mod dial;
#[cfg(feature = "fuzz")]
pub mod frame;
#[cfg(not(feature = "fuzz"))]
pub(crate) mod frame;
#[cfg(feature = "fuzz")]
pub mod guard;
#[cfg(not(feature = "fuzz"))]
pub(crate) mod guard;
#[cfg(feature = "fuzz")]
pub mod produce;
#[cfg(not(feature = "fuzz"))]
pub(crate) mod produce;
#[cfg(feature = "fuzz")]
pub mod producer_id;
#[cfg(not(feature = "fuzz"))]
pub(crate) mod producer_id;
#[cfg(feature = "fuzz")]
pub mod versions;
#[cfg(not(feature = "fuzz"))]
pub(crate) mod versions;

pub use dial::connect;
