//! The Kafka-wire side: framing, the pipelined connection, version negotiation, the shape guard
//! run before decoding, the connection pool and the leader map. Nothing in here knows about gRPC.

// The public rooms: what the Forwarder's own API shows (its pool and leader map, connection
// counters and settings, errors, TLS and SASL settings, the brokers avoided as stalled).
pub mod connection;
pub mod error;
pub mod histogram;
pub mod metadata;
pub mod pool;
pub mod security;
pub mod stall;

// The wire layer, private to the crate; public only with the `fuzz` feature, for the fuzz
// targets (rskafka keeps its protocol layer the same way).
mod dial;
macro_rules! wire_layer {
    ($($m:ident),*) => {$(
        #[cfg(feature = "fuzz")]
        pub mod $m;
        #[cfg(not(feature = "fuzz"))]
        pub(crate) mod $m;
    )*};
}
wire_layer!(
    coalesce,
    frame,
    guard,
    produce,
    producer_id,
    record_batch,
    versions
);

pub use dial::connect;
/// The codec of the batches leaderlink encodes is a setting (`compression`) of the public config.
pub use record_batch::Codec;
