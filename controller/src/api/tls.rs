//! TLS of the gRPC listener, read from the files the flags name.

use std::{fmt, path::Path};

use contract::{
    client::{read_identity, read_pem},
    process::FlagError,
};
use tonic::transport::{Certificate, Identity};

/// TLS of the gRPC listener: its certificate and key, and the authority nodes' certificates must chain to.
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate and key.
    pub identity: Identity,
    /// Authority of nodes' certificates (mutual TLS).
    pub client_ca: Option<Certificate>,
}

// === impl ServerTls ===

impl fmt::Debug for ServerTls {
    /// Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("client_ca", &self.client_ca.is_some()).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The TLS of `--tls-cert`, `--tls-key` and `--client-ca`: none without a certificate, refused when a
    /// file cannot be read or a client authority comes without a certificate.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>, FlagError> {
        let Some(identity) = read_identity(cert, key)? else {
            return match client_ca {
                Some(_) => Err(FlagError::new("client-ca", "needs --tls-cert and --tls-key")),
                None => Ok(None),
            };
        };
        let client_ca = client_ca.map(|path| read_pem("client-ca", path).map(Certificate::from_pem)).transpose()?;
        Ok(Some(ServerTls { identity, client_ca }))
    }
}
