//! What an operator sees: metrics, logs and record headers; spans in a real Jaeger; the metrics
//! in a real Prometheus, through the chart's dashboard queries.
//!
//! One test binary per behaviour; the modules below are its parts.

#[path = "../common/mod.rs"]
mod common;

mod jaeger;
mod metrics_and_headers;
mod prometheus;
