//! Forwarding against the mock cluster (results, coalescing, record accumulation, pipelining) and real Kafka (transactional batches).
//!
//! One test binary per behaviour; the modules below are its parts.

#[path = "../common/mod.rs"]
mod common;

mod accumulation;
mod batches;
mod choice_and_codecs;
mod coalescing;
mod kafka_produce_features;
mod kafka_record_errors;
mod kafka_transactions;
mod mock;
mod pipelining;
