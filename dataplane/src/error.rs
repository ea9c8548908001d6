//! Errors of the data plane. A leaf: it names no other module of the crate.

use std::{io, net::SocketAddr, path::PathBuf};

/// A frontend could not be opened. Its `Display` is what a registering server reads in a `failed` reply,
/// e.g. `bind 0.0.0.0:80: Address already in use (os error 98)`.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The OS refused the socket, the bind or the listen.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address the node tried to bind.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// Why a `dataplane` process cannot start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The admin listener could not be bound: the OS error once, and what to do about it.
    #[error("cannot listen on {addr} (admin HTTP): {source}{}", contract::addr::bind_hint(.source, .addr, "dataplane", "admin-listen"))]
    Bind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The data-path worker threads could not start.
    #[error("cannot start worker threads: {0}")]
    Workers(#[source] std::io::Error),
    /// The access log could not be opened.
    #[error("cannot open the access log {target}: {source}")]
    AccessLog {
        /// `--access-log`, as shown: a path or `standard output`.
        target: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Taking over from the node at `--takeover`, or listening there, failed.
    #[error(transparent)]
    Takeover(#[from] TakeoverError),
    /// The READY line could not be written.
    #[error("writing the READY line: {0}")]
    Ready(#[source] std::io::Error),
    /// The admin HTTP server failed.
    #[error("admin HTTP server: {0}")]
    Admin(#[source] std::io::Error),
}

/// Why a takeover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// A system call on the takeover socket failed.
    #[error("takeover socket {path}: {what}: {source}")]
    Io {
        /// `--takeover`.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is at the path: never removed, in case it is someone's file.
    #[error("takeover socket {0}: the path exists and is not a socket; remove it or choose another --takeover path")]
    NotASocket(PathBuf),
    /// The other side runs as another user.
    #[error("takeover socket {path}: the other process runs as user {uid}, not as this one's")]
    Foreign {
        /// `--takeover`.
        path: PathBuf,
        /// Its user.
        uid: u32,
    },
    /// The other side broke the exchange.
    #[error("takeover exchange: {0}")]
    Exchange(String),
}
