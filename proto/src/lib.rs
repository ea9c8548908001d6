//! The wire contract of Switchboard: the gRPC services of package `switchboard.v1` (`Registry`, `Dataplane`,
//! `Admin`),
//! generated at build time from `proto/switchboard/v1/*.proto`. Only the API layers of the other crates use
//! these types; everything else works with domain types.
//!
//! # Layout
//! - [`v1`]: generated messages, clients (`*_client`) and servers (`*_server`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`backoff`], [`client`]: how the contract's clients reach the controller and retry.

pub mod backoff;
pub mod client;

/// Generated code of package `switchboard.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("switchboard.v1");
}

/// Encoded `FileDescriptorSet` of every `switchboard.v1` file, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/switchboard_descriptor.bin"));
