//! How clients of the contract (data-plane nodes, agents) reach the controller: a bounded connect and
//! HTTP/2 keep-alives, so a controller that vanished without closing its connections is noticed in seconds
//! rather than never.

use std::time::Duration;

use tonic::transport::Endpoint;

/// The endpoint of the controller at `url` (`http://host:port`), or why the URL is not one.
pub fn controller_endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}
