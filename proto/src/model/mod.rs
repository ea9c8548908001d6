//! The domain model every process shares: plain Rust types that hold only valid values. The controller
//! builds them, nodes and agents consume them, and [`crate::convert`] alone maps them to and from the wire.
//!
//! # Layout
//! - [`service`]: protocol, service key, algorithm, weight.
//! - [`snapshot`]: the routing snapshot nodes follow.
//! - [`report`]: what nodes report back: bind results, connection counts.
//! - [`registration`]: what registering clients and operators ask for, and the reply.
//! - [`event`], [`view`]: state changes and the read model operators see.

pub mod event;
pub mod registration;
pub mod report;
pub mod service;
pub mod snapshot;
pub mod view;

pub use event::{Event, EventKind};
pub use registration::{
    BackendRef, BackendTarget, Deregistration, HelloAnswer, ProbeOverrides, RegisterReply, RegistrationRequest,
};
pub use report::{BackendLoad, FrontendAddresses, FrontendStatus, NodeHello, NodeReport};
pub use service::{Algorithm, InvalidWeight, Protocol, ProxyProtocol, ServiceAsk, ServiceKey, UnknownName, Weight};
pub use snapshot::{BackendSpec, RoutingDelta, RoutingSnapshot, ServiceSpec};
pub use view::{BackendView, FrontendView, NodeView, ServiceView, StateView};
