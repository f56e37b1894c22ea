//! leaderlink forwards produce requests, received over gRPC, to Kafka partition leaders through
//! pipelined Kafka-wire connections.
//!
//! # Layout
//!
//! The modules follow the data path:
//!
//! * [`grpc`] — thin tonic handlers, the one error → `Status` mapping, and the tower layers in
//!   front of the Forwarder (shedding, concurrency limit, deadline).
//! * [`forward`] — the core: validate a request, route each partition to its leader, send,
//!   retry within the caller's deadline (with the ordering mode's gates), assemble the results.
//! * [`kafka`] — the Kafka-wire side, with no gRPC types: framing, the pipelined
//!   [`kafka::connection::Connection`], version negotiation, the shape guard run before decoding,
//!   the connection pool and the leader map.
//!
//! Side rooms: [`config`] (flags, environment, TOML), [`server`] (builds and runs both gRPC
//! servers with health and reflection, and drains them), [`admin`] (the operator's service),
//! [`stats`] (counters), [`metrics`] (`/metrics` for Prometheus, read from those counters),
//! [`telemetry`] (log lines and OTLP span export), [`tls`] (the listeners' TLS, reloaded when
//! its files change), [`dev`] (librdkafka's mock cluster as an embedded dev cluster),
//! [`proto`] (generated types). The benchmark is `src/bin/leaderlink-bench.rs`.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod admin;
pub mod config;
#[cfg(feature = "dev-cluster")]
pub mod dev;
pub mod forward;
pub mod grpc;
pub mod kafka;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod tls;
