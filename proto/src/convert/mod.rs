//! The one place where `switchboard.v1` wire messages become domain types and back. Both ends of every
//! stream use these conversions, so the controller, nodes and agents cannot disagree on a mapping; a wire
//! value that makes no valid domain value is a [`ConvertError`], never a panic.
//!
//! # Layout
//! - this module: the error, service keys, algorithm names, weights, addresses.
//! - [`routing`]: snapshots, bind results, load reports (`Dataplane.Sync`).
//! - [`registry`]: registrations, deregistrations, replies (`Registry`).
//! - [`admin`]: backend references, events, the read model (`Admin`).

mod admin;
mod registry;
mod routing;

use std::net::{IpAddr, SocketAddr};

pub use admin::event_message;
pub use routing::{MAX_KNOWN_VERSION, cluster_load, cluster_load_message, delta_message, snapshot_message};

use crate::{
    model::{Algorithm, Protocol, ServiceKey, Weight},
    v1,
};

/// A wire message that does not make a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {why}")]
pub struct ConvertError {
    /// Which field.
    pub what: &'static str,
    /// What is wrong with it.
    pub why: String,
}

fn invalid(what: &'static str, why: impl Into<String>) -> ConvertError {
    ConvertError { what, why: why.into() }
}

/// An address `ip:port` sent as text.
fn socket_addr(what: &'static str, text: &str) -> Result<SocketAddr, ConvertError> {
    text.parse().map_err(|_| invalid(what, format!("{text:?} is not ip:port")))
}

/// An IP address sent as text; empty means "not given".
fn optional_ip(what: &'static str, text: &str) -> Result<Option<IpAddr>, ConvertError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| invalid(what, format!("{text:?} is not an IP address")))
}

/// A port sent as `uint32`; 0 means "not given".
fn optional_port(what: &'static str, port: u32) -> Result<Option<u16>, ConvertError> {
    match port {
        0 => Ok(None),
        p => u16::try_from(p).map(Some).map_err(|_| invalid(what, format!("{p} is not in 1..=65535"))),
    }
}

/// An algorithm by its wire name.
pub fn algorithm(name: &str) -> Result<Algorithm, ConvertError> {
    name.parse().map_err(|e: crate::model::UnknownName| invalid("algorithm", e.to_string()))
}

/// A weight sent as `uint32`.
pub fn weight(value: u32) -> Result<Weight, ConvertError> {
    Weight::new(value.into()).map_err(|e| invalid("weight", e.to_string()))
}

impl From<ServiceKey> for v1::ServiceKey {
    fn from(key: ServiceKey) -> Self {
        let protocol = match key.protocol {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Udp => v1::Protocol::Udp,
        };
        v1::ServiceKey { protocol: protocol.into(), port: key.port.into() }
    }
}

impl TryFrom<Option<&v1::ServiceKey>> for ServiceKey {
    type Error = ConvertError;

    fn try_from(key: Option<&v1::ServiceKey>) -> Result<Self, Self::Error> {
        let key = key.ok_or_else(|| invalid("service", "missing"))?;
        let protocol = match v1::Protocol::try_from(key.protocol) {
            Ok(v1::Protocol::Tcp) => Protocol::Tcp,
            Ok(v1::Protocol::Udp) => Protocol::Udp,
            _ => return Err(invalid("service protocol", "must be PROTOCOL_TCP or PROTOCOL_UDP")),
        };
        let port = u16::try_from(key.port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| invalid("service port", format!("{} is not in 1..=65535", key.port)))?;
        Ok(ServiceKey { protocol, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_keys_names_and_weights_are_errors_not_panics() {
        assert!(ServiceKey::try_from(None).is_err());
        assert!(ServiceKey::try_from(Some(&v1::ServiceKey { protocol: 1, port: 70_000 })).is_err());
        assert!(ServiceKey::try_from(Some(&v1::ServiceKey { protocol: 9, port: 80 })).is_err());
        let key = ServiceKey::udp(53);
        assert_eq!(ServiceKey::try_from(Some(&v1::ServiceKey::from(key))), Ok(key));
        assert_eq!(algorithm("Source_Hash"), Ok(Algorithm::SourceHash));
        assert!(algorithm("fastest").unwrap_err().to_string().contains("expected one of round_robin"));
        assert_eq!(weight(0).unwrap_err().to_string(), "invalid weight: 0 is not in 1..=10000");
        assert_eq!(optional_port("backend_port", 70_000).unwrap_err().what, "backend_port");
        assert_eq!(optional_ip("backend_address", "").unwrap(), None);
    }
}
