//! The Prometheus exposition every admin listener serves at `/metrics`: one registry per process, named
//! `switchboard_*`, with `switchboard_build_info`, encoded in the Prometheus text format (or OpenMetrics
//! when the scraper asks for it).
//!
//! Labels name services and backends (a backend's address is the server's, announced by its
//! registration), nodes and origins; never a client's address, so a scan of the frontends cannot grow the
//! series without bound.

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text, text},
    metrics::{
        counter::ConstCounter,
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};

use crate::model::ServiceKey;

/// Every metric name starts with this and an underscore.
pub const PREFIX: &str = "switchboard";

/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = prometheus_text::CONTENT_TYPE;

/// The content type of OpenMetrics text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The labels of a per-service series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `tcp:PORT` or `udp:PORT`.
    pub service: String,
}

/// The labels of a per-backend series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `tcp:PORT` or `udp:PORT`.
    pub service: String,
    /// The backend's address.
    pub backend: String,
}

/// The labels of a per-backend series with a reason (connect failures).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendReasonLabels {
    /// `tcp:PORT` or `udp:PORT`.
    pub service: String,
    /// The backend's address.
    pub backend: String,
    /// One of a fixed set of words.
    pub reason: &'static str,
}

/// The labels of a per-service series with a reason (refusals, drops).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceReasonLabels {
    /// `tcp:PORT` or `udp:PORT`.
    pub service: String,
    /// One of a fixed set of words.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    binary: &'static str,
    version: &'static str,
    commit: &'static str,
}

// === impl labels ===

impl ServiceLabels {
    /// The labels of `service`.
    pub fn new(service: ServiceKey) -> Self {
        ServiceLabels { service: service.to_string() }
    }
}

impl BackendLabels {
    /// The labels of `backend` in `service`.
    pub fn new(service: ServiceKey, backend: std::net::SocketAddr) -> Self {
        BackendLabels { service: service.to_string(), backend: backend.to_string() }
    }

    /// The same backend with a reason.
    pub fn with_reason(&self, reason: &'static str) -> BackendReasonLabels {
        BackendReasonLabels { service: self.service.clone(), backend: self.backend.clone(), reason }
    }
}

impl ServiceLabels {
    /// The same service with a reason.
    pub fn with_reason(&self, reason: &'static str) -> ServiceReasonLabels {
        ServiceReasonLabels { service: self.service.clone(), reason }
    }
}

/// A process's registry, `switchboard_build_info{binary, version, commit}` already in it.
pub fn registry(binary: &'static str) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels { binary, version: crate::build::PKG_VERSION, commit: crate::build::COMMIT })
        .set(1);
    registry.register("build_info", "The running binary, its version and commit (always 1)", build);
    registry
}

/// Encodes, from a collector, the gauge `name` (under the registry's prefix) with `value`.
pub fn const_gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// Encodes, from a collector, the counter `name` (`_total` is added) with `value`.
pub fn const_counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

/// `registry` encoded for a scraper whose `Accept` header is `accept`: OpenMetrics text when it lists
/// `application/openmetrics-text`, else the Prometheus text format. Returns the content type and body.
pub fn exposition(registry: &Registry, accept: Option<&str>) -> (&'static str, String) {
    let mut body = String::with_capacity(16 * 1024);
    let openmetrics = accept.is_some_and(|accept| accept.contains("application/openmetrics-text"));
    // Writing into a String cannot fail; an encoder error would be a bug in a metric, shown as such.
    let (content_type, encoded) = if openmetrics {
        (OPENMETRICS_TEXT, text::encode(&mut body, registry))
    } else {
        (PROMETHEUS_TEXT, prometheus_text::encode(&mut body, registry))
    };
    if encoded.is_err() {
        body.push_str("# encoding failed\n");
    }
    (content_type, body)
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn both_formats_name_counters_with_total_and_carry_build_info() {
        let mut registry = registry("test");
        let family = Family::<BackendLabels, Counter>::default();
        let labels = BackendLabels::new(ServiceKey::tcp(80), "127.0.0.2:8080".parse().unwrap());
        family.get_or_create(&labels).inc_by(3);
        registry.register("backend_connections", "Connections", family);
        let (kind, text) = exposition(&registry, None);
        assert_eq!(kind, PROMETHEUS_TEXT);
        assert!(text.contains("# TYPE switchboard_backend_connections_total counter"), "{text}");
        assert!(
            text.contains(r#"switchboard_backend_connections_total{service="tcp:80",backend="127.0.0.2:8080"} 3"#),
            "{text}"
        );
        let build = format!(
            r#"switchboard_build_info{{binary="test",version="{}",commit="{}"}} 1"#,
            crate::build::PKG_VERSION,
            crate::build::COMMIT
        );
        assert!(text.contains(&build), "{text}");
        let (kind, open) = exposition(&registry, Some("application/openmetrics-text;version=1.0.0"));
        assert_eq!(kind, OPENMETRICS_TEXT);
        assert!(open.ends_with("# EOF\n"), "{open}");
    }
}
