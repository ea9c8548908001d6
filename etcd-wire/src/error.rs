//! What a call to etcd can end in.

use thiserror::Error;

/// An etcd call that failed.
#[derive(Debug, Error)]
pub enum Error {
    /// [`crate::Client::connect`] was given no member.
    #[error("no etcd endpoint given")]
    NoEndpoints,
    /// A member's address is not `HOST:PORT` (or `http://HOST:PORT`).
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The address as given.
        endpoint: String,
        /// Why it is not one.
        reason: String,
    },
    /// etcd answered with an error, or could not be reached (`Unavailable`), or did not answer in time.
    /// Boxed: a status is large, and every result carries this type.
    #[error("etcd: {}: {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),
    /// The request half of a stream is gone (the call ended): nothing more can be sent on it.
    #[error("the etcd {0} stream is closed")]
    StreamClosed(&'static str),
}

// === impl Error ===

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status(Box::new(status))
    }
}
