//! Errors of the load driver. A leaf: it names nothing else of the crate.

use std::{net::SocketAddr, time::Duration};

use contract::client::StreamError;

/// Why a run cannot start or finish.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Flags that make no sense together.
    #[error("{0}")]
    Config(String),
    /// Writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Output {
        /// The file.
        path: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A server could not start.
    #[error("{0}")]
    Serve(String),
    /// More requests failed than `--max-errors` allows.
    #[error("{failed} of {requests} requests failed ({rate:.1} %), more than --max-errors {max} %")]
    TooManyErrors {
        /// Requests that failed.
        failed: u64,
        /// Requests made.
        requests: u64,
        /// The share that failed, in percent.
        rate: f64,
        /// `--max-errors`.
        max: f64,
    },
    /// A control-plane run failed.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
}

/// Why a control-plane run failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A connection or stream to the controller failed.
    #[error("{what}: {source}")]
    Controller {
        /// Who was talking to the controller.
        what: String,
        /// What went wrong.
        #[source]
        source: StreamError,
    },
    /// The controller refused a registration.
    #[error("the controller refused backend {backend} of tcp:{port}: {message}")]
    Refused {
        /// Service port.
        port: u16,
        /// The backend.
        backend: SocketAddr,
        /// The controller's reason.
        message: String,
    },
    /// A step did not finish within `--timeout`.
    #[error("{what}: no answer within {after:?}")]
    Timeout {
        /// The step.
        what: String,
        /// `--timeout`.
        after: Duration,
    },
    /// A stream ended before the run did.
    #[error("{what} ended: {why}")]
    Ended {
        /// The stream.
        what: String,
        /// Why, as far as known.
        why: String,
    },
    /// The figures do not describe the cluster asked for: a broken set-up, not a measurement.
    #[error("inconsistent run: {0}")]
    Inconsistent(String),
    /// The whole run took longer than `--time-limit`.
    #[error("the run did not finish within --time-limit {0:?}")]
    TimeLimit(Duration),
}

/// Why one request failed: the kinds the summary counts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The connection was refused or could not be made.
    Connect,
    /// No complete answer within `--timeout`.
    Timeout,
    /// The peer closed before answering.
    Closed,
    /// An HTTP status outside 2xx/3xx.
    Status,
    /// An answer that is not what was sent (echo) or not HTTP.
    Protocol,
    /// Any other I/O error (reset, ...).
    Io,
}

impl ErrorKind {
    /// The kind of an I/O error.
    pub fn of(error: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match error.kind() {
            K::ConnectionRefused | K::AddrNotAvailable | K::HostUnreachable | K::NetworkUnreachable => {
                ErrorKind::Connect
            }
            K::TimedOut => ErrorKind::Timeout,
            K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => ErrorKind::Closed,
            _ => ErrorKind::Io,
        }
    }
}
