//! Leaders that fail: on the mock cluster, as a hostile fake broker, and on real Kafka.
//!
//! One test binary per behaviour; the modules below are its parts.

#[path = "../common/mod.rs"]
mod common;

mod hostile_leader;
mod kafka;
mod mock;
