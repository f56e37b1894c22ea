//! TLS on the listeners; SASL and TLS to real Kafka.
//!
//! One test binary per behaviour; the modules below are its parts.

#[path = "../common/mod.rs"]
mod common;

mod kafka_sasl;
mod tls;
