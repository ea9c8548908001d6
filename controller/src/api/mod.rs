//! The controller's front doors: the HW1 JSON control channel, gRPC, and admin HTTP. They translate their
//! wire formats into [`crate::store`] calls and nothing else.

pub mod admin;
pub mod framing;
pub mod grpc;
pub mod http;
pub mod json;
pub mod request;
pub mod sync;
