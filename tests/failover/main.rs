//! Leaders that fail: on the mock cluster, as a hostile fake broker, and on real Kafka (killed,
//! and the fault matrix through Toxiproxy).
//!
//! One test binary per behaviour; the modules below are its parts.

#[path = "../common/mod.rs"]
mod common;

mod faults;
mod hostile_leader;
mod kafka;
mod mock;
