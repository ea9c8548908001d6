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
        _ => {
            // The same place, with the scheme a gRPC client speaks.
            let example = match url.split_once("://") {
                Some((_, rest)) if !rest.is_empty() => format!("http://{rest}"),
                None if !url.is_empty() && !url.contains(char::is_whitespace) => format!("http://{url}"),
                _ => "http://127.0.0.1:50051".to_owned(),
            };
            Err(FlagError::new("controller", format!("{url:?} is not an http:// or https:// URL, e.g. {example}")))
        }
    }
}

/// The controllers of `--controller URL[,URL...]`, each checked as [`controller_url`]; at least one, no
/// repeats.
pub fn controller_urls(list: &str, tls: Option<&ClientTls>) -> Result<Vec<String>, FlagError> {
    let mut urls: Vec<String> = Vec::new();
    for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let url = controller_url(url.to_owned(), tls)?;
        if urls.contains(&url) {
            return Err(FlagError::new("controller", format!("{url:?} is listed twice")));
        }
        urls.push(url);
    }
    if urls.is_empty() {
        return Err(FlagError::new(
            "controller",
            "needs at least one http:// or https:// URL, e.g. http://127.0.0.1:50051",
        ));
    }
    Ok(urls)
}

/// Which of several controllers to try next. A client holds one stream at a time: when it ends or cannot
/// be opened, the client moves on to the next controller at once, and waits (its backoff) only once every
/// controller failed in a row.
#[derive(Debug, Clone)]
pub struct Rotation {
    urls: Vec<String>,
    current: usize,
    failed_in_row: usize,
}

impl Rotation {
    /// Starts with the first of `urls` (at least one).
    pub fn new(urls: Vec<String>) -> Self {
        assert!(!urls.is_empty(), "a rotation needs at least one controller");
        Rotation { urls, current: 0, failed_in_row: 0 }
    }

    /// The controller to try now.
    pub fn current(&self) -> &str {
        &self.urls[self.current]
    }

    /// Every controller, in order.
    pub fn all(&self) -> &[String] {
        &self.urls
    }

    /// A stream with the current controller was held (so the next failure starts a new round).
    pub fn held(&mut self) {
        self.failed_in_row = 0;
    }

    /// The current controller failed or its stream ended: moves to the next. True when every controller
    /// has now failed in a row, so the caller should back off before trying again.
    pub fn failed(&mut self) -> bool {
        self.current = (self.current + 1) % self.urls.len();
        self.failed_in_row += 1;
        if self.failed_in_row >= self.urls.len() {
            self.failed_in_row = 0;
            return true;
        }
        false
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_controllers_is_checked_url_by_url() {
        let urls = controller_urls("http://127.0.0.1:1, http://127.0.0.2:1", None).unwrap();
        assert_eq!(urls, ["http://127.0.0.1:1", "http://127.0.0.2:1"]);
        assert_eq!(controller_urls("", None).unwrap_err().flag, "controller");
        assert_eq!(controller_urls("http://a:1,127.0.0.1:1", None).unwrap_err().flag, "controller");
        assert_eq!(controller_urls("http://a:1,http://a:1", None).unwrap_err().flag, "controller");
        // A refused URL is shown as it should have been written.
        let why = |list: &str| controller_urls(list, None).unwrap_err().why;
        assert_eq!(
            why("127.0.0.1:50051"),
            r#""127.0.0.1:50051" is not an http:// or https:// URL, e.g. http://127.0.0.1:50051"#
        );
        assert!(why("grpc://10.0.0.1:50051").ends_with("e.g. http://10.0.0.1:50051"));
        assert!(why(" , ").ends_with("e.g. http://127.0.0.1:50051"));
    }

    #[test]
    fn a_rotation_moves_on_at_once_and_backs_off_after_a_whole_round() {
        let mut rotation = Rotation::new(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(rotation.current(), "a");
        rotation.held();
        assert!(!rotation.failed(), "a lost stream moves to the next at once");
        assert_eq!(rotation.current(), "b");
        assert!(!rotation.failed());
        assert!(rotation.failed(), "every controller failed in a row");
        assert_eq!(rotation.current(), "a");
        let mut single = Rotation::new(vec!["a".into()]);
        assert!(single.failed(), "one controller: always back off");
    }
}
