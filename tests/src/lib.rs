//! End-to-end test support for Switchboard: spawns the real binaries on ephemeral ports, reads their
//! `READY` lines, and talks to them over real sockets. The tests themselves live in `tests/e2e/` (one test
//! binary, to keep link time down on small machines).
//!
//! # Layout
//! - [`harness`]: processes (build, spawn, READY, stderr capture), per-test loopback networks, the
//!   controller's state polled with a deadline, JSON control-channel clients and demo backends.
//! - [`hosts`]: the machine, or network namespaces on a bridge, as hosts for processes and sockets.
//! - [`tools`]: outside programs used as real peers (the Prometheus text parser), and what a missing one
//!   does; [`browser`]: headless Chromium over WebDriver; [`etcd`]: real etcd members.

#![forbid(unsafe_code)]

pub mod browser;
pub mod etcd;
pub mod harness;
pub mod hosts;
pub mod tools;
