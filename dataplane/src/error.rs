//! Errors of the data plane.

use std::{io, net::SocketAddr};

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
