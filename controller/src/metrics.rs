//! The controller's Prometheus series: what the store counts as it goes (registrations opened, hello
//! round trips, snapshot push times), and what is read from the store when scraped (registrations and
//! nodes now, each backend's health, weight, drain and cluster-wide connections). The embedded node's
//! data-path series are registered in the same registry.
//!
//! A leaf: the store and the doors are read through [`StoreReadout`] and [`DoorReadout`], which they
//! implement, so this module names no module above it.

use std::sync::Arc;

use contract::{
    metrics::{BackendLabels, const_gauge},
    model::{StateView, Weight},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// What the store shows when scraped.
pub trait StoreReadout: Send + Sync + std::fmt::Debug + 'static {
    /// The read model: services, backends and nodes now.
    fn view(&self) -> StateView;
    /// Live registrations by origin name (`json`, `grpc`, `agent`, `static`, `replica`).
    fn registrations_by_origin(&self) -> Vec<(&'static str, usize)>;
}

/// What a door shows when scraped.
pub trait DoorReadout: Send + Sync + std::fmt::Debug + 'static {
    /// The door's name: `json`, `grpc` or `admin`.
    fn name(&self) -> &'static str;
    /// Connections open now.
    fn open(&self) -> usize;
    /// Connections refused on arrival so far.
    fn refusals(&self) -> u64;
    /// Idle connections closed to make room so far.
    fn evictions(&self) -> u64;
    /// Connections closed for their first-request or idle timeout so far.
    fn timeouts_fired(&self) -> u64;
}

/// The labels of a per-origin series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    /// `json`, `grpc` or `agent`.
    pub origin: &'static str,
}

/// The labels of a per-node series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

/// What the store counts as it goes. Cloning shares the series.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    /// Registrations opened, by origin.
    pub registrations: Family<OriginLabels, Counter>,
    /// Round trip of hellos answered by registrations.
    pub hello_rtt: Histogram,
    /// From a snapshot's publication to each node's ack of it.
    pub snapshot_push: Histogram,
}

/// The labels of a per-door series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabels {
    door: &'static str,
}

/// One counter of every door: its name, help, series and how it is read.
type DoorCount = (&'static str, &'static str, Family<DoorLabels, Counter>, fn(&dyn DoorReadout) -> u64);

/// Reads the doors' tables when scraped.
#[derive(Debug)]
struct DoorCollector {
    doors: Vec<Arc<dyn DoorReadout>>,
}

/// Reads the store when scraped.
#[derive(Debug)]
struct StoreCollector {
    store: Arc<dyn StoreReadout>,
}

// === impl ControllerMetrics ===

impl Default for ControllerMetrics {
    fn default() -> Self {
        ControllerMetrics {
            registrations: Family::default(),
            // 100 µs to about 6.5 s.
            hello_rtt: Histogram::new(exponential_buckets(0.000_1, 2.0, 17)),
            snapshot_push: Histogram::new(exponential_buckets(0.000_1, 2.0, 17)),
        }
    }
}

impl ControllerMetrics {
    /// A registration from `origin` (its name: `json`, `grpc`, ...) opened.
    pub fn registration_opened(&self, origin: &'static str) {
        self.registrations.get_or_create(&OriginLabels { origin }).inc();
    }
}

/// Registers the controller's series, those counted in `metrics` and those read from `store`, in `registry`.
pub fn register(registry: &mut Registry, metrics: &ControllerMetrics, store: Arc<dyn StoreReadout>) {
    registry.register(
        "registrations_opened",
        "Registrations opened, by origin (json, grpc, agent)",
        metrics.registrations.clone(),
    );
    registry.register_with_unit(
        "hello_round_trip",
        "Time from a hello to its registration's answer",
        Unit::Seconds,
        metrics.hello_rtt.clone(),
    );
    registry.register_with_unit(
        "snapshot_push",
        "Time from a snapshot's publication to a node's ack of it",
        Unit::Seconds,
        metrics.snapshot_push.clone(),
    );
    registry.register_collector(Box::new(StoreCollector { store }));
}

/// Registers the series of the doors' tables (open connections, refusals, evictions, timeouts).
pub fn register_doors(registry: &mut Registry, doors: Vec<Arc<dyn DoorReadout>>) {
    registry.register_collector(Box::new(DoorCollector { doors }));
}

// === impl DoorCollector ===

impl Collector for DoorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let open = Family::<DoorLabels, Gauge>::default();
        let counts: [DoorCount; 3] = [
            (
                "door_refused",
                "Connections refused on arrival: every one under the cap they met had a request in flight.",
                Family::default(),
                |door| door.refusals(),
            ),
            (
                "door_evicted",
                "Connections without a request in flight closed to make room for a newcomer.",
                Family::default(),
                |door| door.evictions(),
            ),
            (
                "door_timed_out",
                "Connections closed for making no request within --first-request-timeout or their idle timeout.",
                Family::default(),
                |door| door.timeouts_fired(),
            ),
        ];
        for door in &self.doors {
            let labels = DoorLabels { door: door.name() };
            open.get_or_create(&labels).set(i64::try_from(door.open()).unwrap_or(i64::MAX));
            for (_, _, family, read) in &counts {
                family.get_or_create(&labels).inc_by(read(door.as_ref()));
            }
        }
        open.encode(encoder.encode_descriptor(
            "door_connections",
            "Connections open on each door (json, grpc, admin).",
            None,
            open.metric_type(),
        )?)?;
        for (name, help, family, _) in &counts {
            family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)?;
        }
        Ok(())
    }
}

// === impl StoreCollector ===

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = self.store.view();
        let registrations = self.store.registrations_by_origin();
        const_gauge(&mut encoder, "snapshot_version", "Version of the routing snapshot in force.", view.version)?;
        let warming_up = u64::from(view.warming_up);
        const_gauge(&mut encoder, "warming_up", "1 during the controller's warm-up window.", warming_up)?;
        let connected = view.nodes.iter().filter(|n| n.connected && n.controller.is_none()).count() as u64;
        const_gauge(&mut encoder, "connected_nodes", "Nodes following this controller now.", connected)?;

        let family = Family::<OriginLabels, Gauge>::default();
        for (origin, count) in registrations {
            family.get_or_create(&OriginLabels { origin }).set(count as i64);
        }
        family.encode(encoder.encode_descriptor(
            "registrations",
            "Live registrations, by origin (json, grpc, agent, replica: imported from another controller).",
            None,
            family.metric_type(),
        )?)?;

        backend_series(&mut encoder, &view)?;

        let acked = Family::<NodeLabels, Gauge>::default();
        let node_connected = Family::<NodeLabels, Gauge>::default();
        for node in &view.nodes {
            let labels = NodeLabels { node: node.id.clone() };
            if let Some(version) = node.acked_version {
                acked.get_or_create(&labels).set(i64::try_from(version).unwrap_or(i64::MAX));
            }
            node_connected.get_or_create(&labels).set(i64::from(node.connected));
        }
        acked.encode(encoder.encode_descriptor(
            "node_acked_version",
            "Last snapshot version each node acknowledged.",
            None,
            acked.metric_type(),
        )?)?;
        node_connected.encode(encoder.encode_descriptor(
            "node_connected",
            "1 while the node's sync stream is open.",
            None,
            node_connected.metric_type(),
        )?)
    }
}

/// Per backend: up, weight, draining, and cluster-wide connections.
fn backend_series(encoder: &mut DescriptorEncoder, view: &StateView) -> Result<(), std::fmt::Error> {
    let up = Family::<BackendLabels, Gauge>::default();
    let weight = Family::<BackendLabels, Gauge>::default();
    let draining = Family::<BackendLabels, Gauge>::default();
    let connections = Family::<BackendLabels, Gauge>::default();
    for service in &view.services {
        for backend in &service.backends {
            let labels = BackendLabels::new(service.service, backend.address);
            up.get_or_create(&labels).set(i64::from(backend.healthy));
            weight.get_or_create(&labels).set(i64::from(Weight::get(backend.weight)));
            draining.get_or_create(&labels).set(i64::from(backend.draining));
            connections.get_or_create(&labels).set(i64::try_from(backend.active_connections).unwrap_or(i64::MAX));
        }
    }
    let series = [
        ("backend_up", "1 when the backend's health check passes, 0 when it fails.", &up),
        ("backend_weight", "The backend's weight.", &weight),
        ("backend_draining", "1 while an operator drains the backend.", &draining),
        ("backend_cluster_connections", "Connections open to the backend over every node.", &connections),
    ];
    for (name, help, family) in series {
        family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)?;
    }
    Ok(())
}
