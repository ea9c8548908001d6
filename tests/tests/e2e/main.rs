//! End-to-end tests: the real `controller` binary on port-0 listeners, real sockets, state polled from
//! `/api/state` with a deadline. One test binary for the whole suite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod agent;
mod balancing;
mod config_file;
mod doors;
mod failover;
mod grpc;
mod json_channel;
mod least_load;
mod limits;
mod loadgen;
mod logs;
mod multihost;
mod nodes;
mod observability;
mod operator;
mod proxy_protocol;
mod relay;
mod replicas;
mod replicas_etcd;
mod security;
mod soak;
mod splice;
mod takeover;
mod trust;
mod udp_flood;
