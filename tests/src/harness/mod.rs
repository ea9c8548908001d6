//! The harness, in rooms by role: [`process`] (binaries, READY lines, networks, ports), [`controller`]
//! (the controller and nodes, their state polled), [`clients`] (JSON channel, gRPC, round trips) and
//! [`backends`] (echo servers). Every wait polls real state under a deadline ([`eventually`]); nothing
//! sleeps for a fixed time hoping state has settled.
//!
//! Binaries are resolved from the target directory of the running test (or `SWITCHBOARD_BIN_DIR`), and
//! built once per test process first, so `cargo test --workspace` never runs stale binaries.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UdpSocket, tcp::OwnedWriteHalf},
    process::Child,
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, timeout},
};

pub use crate::hosts::{Host, Network};

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

mod backends;
mod clients;
mod controller;
mod process;

pub use backends::*;
pub use clients::*;
pub use controller::*;
pub use process::*;

/// Polls `probe` until it returns `Ok`, every 20 ms, and returns its value; fails the test with `what` and
/// the last error after [`DEADLINE`].
pub async fn eventually<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(why) => assert!(Instant::now() < deadline, "timed out waiting for {what}: {why}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
