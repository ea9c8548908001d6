//! How clients of the contract (data-plane nodes, agents) reach the controller: a bounded connect and
//! HTTP/2 keep-alives, so a controller that vanished without closing its connections is noticed in seconds
//! rather than never; and why one of their streams ended.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{convert::ConvertError, process::FlagError};

/// How a client checks the controller's certificate, and the certificate it shows for mutual TLS.
#[derive(Clone, Debug)]
pub struct ClientTls {
    ca: Certificate,
    identity: Option<Identity>,
}

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
    /// The controller broke the stream's rules (a delta from a version the node does not hold).
    #[error("out of step with the controller: {0}")]
    Protocol(String),
    /// The controller refused what the client asked for.
    #[error("the controller refused the registration: {0}")]
    Refused(String),
    /// The stream closed under us.
    #[error("the stream closed")]
    Closed,
}

/// `url` as a controller URL for a `--controller` flag: `http://`, or `https://` when `tls` says how to
/// check the controller.
pub fn controller_url(url: String, tls: Option<&ClientTls>) -> Result<String, FlagError> {
    match (url.starts_with("http://"), url.starts_with("https://"), tls) {
        (true, _, None) | (_, true, Some(_)) => Ok(url),
        (true, _, Some(_)) => Err(FlagError::new("controller", format!("{url:?}: --ca needs an https:// URL"))),
        (_, true, None) => {
            Err(FlagError::new("ca", format!("{url:?} is https://: --ca must name the authority to trust")))
        }
        _ => Err(FlagError::new("controller", format!("{url:?} is not an http:// or https:// URL"))),
    }
}

/// The request metadata by which a client says what it is (`agent` for the Switchboard agent); only a
/// label in the controller's metrics, never a credential.
pub const CLIENT_KIND: &str = "x-switchboard-client";

/// The [`CLIENT_KIND`] of the Switchboard agent.
pub const AGENT: &str = "agent";

/// The endpoint of the controller at `url` (`http://host:port`), or why the URL is not one.
pub fn controller_endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// A channel to the controller at `url`, leaving from `source` when that address is this host's (an agent
/// beside its server connects from the server's address, so the controller sees the backend's own host),
/// over TLS when `tls` is given.
pub async fn connect(url: &str, source: Option<IpAddr>, tls: Option<&ClientTls>) -> Result<Channel, StreamError> {
    let mut endpoint = controller_endpoint(url).map_err(|e| StreamError::Url(e.to_string()))?;
    if let Some(tls) = tls {
        let mut config = ClientTlsConfig::new().ca_certificate(tls.ca.clone());
        if let Some(identity) = &tls.identity {
            config = config.identity(identity.clone());
        }
        endpoint = endpoint.tls_config(config)?;
    }
    let source = source.filter(|&ip| is_local(ip));
    Ok(endpoint.local_address(source).connect().await?)
}

// === impl ClientTls ===

impl ClientTls {
    /// From `--ca` (the authority that signed the controller's certificate) and, for mutual TLS,
    /// `--tls-cert` and `--tls-key`; none without `--ca`. The files are read now, so a missing one is a
    /// flag error at start.
    pub fn from_flags(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Self>, FlagError> {
        let identity = read_identity(cert, key)?;
        match ca {
            Some(ca) => Ok(Some(ClientTls { ca: Certificate::from_pem(read_pem("ca", ca)?), identity })),
            None if identity.is_some() => {
                Err(FlagError::new("ca", "a client certificate needs --ca to check the controller"))
            }
            None => Ok(None),
        }
    }
}

/// The certificate and key named by `--tls-cert` and `--tls-key`, which go together; none without them.
pub fn read_identity(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Identity>, FlagError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(read_pem("tls-cert", cert)?, read_pem("tls-key", key)?))),
        (None, None) => Ok(None),
        _ => Err(FlagError::new("tls-cert", "--tls-cert and --tls-key go together")),
    }
}

/// The contents of a PEM file named by `--flag`.
pub fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, FlagError> {
    let pem = std::fs::read(path).map_err(|e| FlagError::new(flag, format!("cannot read {}: {e}", path.display())))?;
    if !pem.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Err(FlagError::new(flag, format!("{} is not a PEM file", path.display())));
    }
    Ok(pem)
}

/// True when `ip` is one of this host's addresses (this host can send from it).
pub fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
