//! How clients of the contract (data-plane nodes, agents) reach the controller: a bounded connect and
//! HTTP/2 keep-alives, so a controller that vanished without closing its connections is noticed in seconds
//! rather than never; and why one of their streams ended.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use tonic::transport::{Channel, Endpoint};

use crate::convert::ConvertError;

/// Why a client's stream with the controller ended (or never began).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The controller URL is not a valid one.
    #[error("invalid controller URL: {0}")]
    Url(String),
    /// The controller could not be reached.
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The stream failed.
    #[error("stream failed: {}", .0.message())]
    Stream(#[from] tonic::Status),
    /// The controller sent a message that makes no valid domain value.
    #[error("invalid message from the controller: {0}")]
    Invalid(#[from] ConvertError),
    /// The controller refused what the client asked for.
    #[error("the controller refused the registration: {0}")]
    Refused(String),
    /// The stream closed under us.
    #[error("the stream closed")]
    Closed,
}

/// `url` as a controller URL for a `--controller` flag: it must be `http://` or `https://`.
pub fn controller_url(url: String) -> Result<String, crate::process::FlagError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url)
    } else {
        Err(crate::process::FlagError::new("controller", format!("{url:?} is not an http:// or https:// URL")))
    }
}

/// The endpoint of the controller at `url` (`http://host:port`), or why the URL is not one.
pub fn controller_endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// A channel to the controller at `url`, leaving from `source` when that address is this host's (an agent
/// beside its server connects from the server's address, so the controller sees the backend's own host).
pub async fn connect(url: &str, source: Option<IpAddr>) -> Result<Channel, StreamError> {
    let endpoint = controller_endpoint(url).map_err(|e| StreamError::Url(e.to_string()))?;
    let source = source.filter(|&ip| is_local(ip));
    Ok(endpoint.local_address(source).connect().await?)
}

/// True when `ip` is one of this host's addresses (this host can send from it).
pub fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
