//! Errors of the load driver.

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
    ControlPlane(#[from] crate::control_plane::ControlPlaneError),
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
