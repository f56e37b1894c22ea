//! The public contract: the gRPC API (unary and stream), validation properties, the Admin service.
//!
//! One test binary per behaviour; the modules below are its parts.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod grpc_api;
mod property;
