//! TLS on the listeners; SASL and TLS to real Kafka; hostile HTTP/2 callers.
//!
//! One test binary per behaviour; the modules below are its parts.

#[path = "../common/mod.rs"]
mod common;

mod http2;
mod kafka_sasl;
mod tls;
