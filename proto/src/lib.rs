//! The contract of Switchboard: what every process shares, so none of them keeps a copy. It holds the
//! gRPC code of package `switchboard.v1` (`Registry`, `Dataplane`, `Admin`, generated at build time from
//! `proto/switchboard/v1/*.proto`), the domain model, the one conversion between the two, and the process
//! plumbing of every binary. The controller, the data plane and the agent depend on it; generated types go
//! no further than their API layers.
//!
//! # Layout
//! - [`model`]: domain types: services, weights, snapshots, node reports, registrations, events, views.
//! - [`convert`]: the only place wire messages become domain types and back.
//! - [`v1`]: generated messages, clients (`*_client`) and servers (`*_server`); [`FILE_DESCRIPTOR_SET`]
//!   for server reflection.
//! - [`process`]: logging, the READY line, the shutdown signal, task supervision, exit codes.
//! - [`addr`]: the parsers of address flags, whose errors show an example.
//! - [`auth`]: bearer tokens, presented by clients and checked by the controller.
//! - [`limit`]: bounds on what clients can make a process hold, and throttled refusal logs.
//! - [`sources`]: counts per source address and per /24 or /64 prefix, for caps per source.
//! - [`metrics`]: the Prometheus exposition every admin listener serves at `/metrics`.
//! - [`config_file`]: `--config PATH`, a TOML file of flags and sections beneath the command line.
//! - [`check`]: health checks of a server and the rise/fall rule (agents and static backends).
//! - [`backoff`], [`client`]: how the contract's clients reach the controller and retry.
//! - [`build`]: the version, commit and profile a binary was built from.

#![forbid(unsafe_code)]

pub mod addr;
pub mod auth;
pub mod backoff;
pub mod build;
pub mod check;
pub mod client;
pub mod config_file;
pub mod convert;
pub mod limit;
pub mod metrics;
pub mod model;
pub mod process;
pub mod sources;

/// Generated code of package `switchboard.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("switchboard.v1");
}

/// Encoded `FileDescriptorSet` of every `switchboard.v1` file, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/switchboard_descriptor.bin"));
