//! The Kafka-wire side: framing, the pipelined connection, version negotiation, the shape guard
//! run before decoding, the connection pool and the leader map. Nothing in here knows about gRPC.

pub mod coalesce;
pub mod connection;
mod dial;
pub mod error;
pub mod frame;
pub mod guard;
pub mod histogram;
pub mod metadata;
pub mod pool;
pub mod produce;
pub mod producer_id;
pub mod security;
pub mod versions;

pub use dial::connect;
