//! The Switchboard data plane: a node owns one frontend socket per service of the current routing
//! snapshot and relays TCP connections and UDP sessions to the service's backends. It is a library so the
//! controller can embed a node and a `dataplane` process can run the very same code on other hosts.
//!
//! The node consumes snapshots from a `watch` channel and answers with [`NodeReport`]s (which frontends are
//! bound, per-backend connection counts). The data path reads one immutable [`RoutingTable`] per connection
//! or new UDP session, swapped atomically, so it takes no lock.
//!
//! # Layout
//! - [`snapshot`]: the routing state domain types shared with the controller.
//! - [`node`]: the reconcile loop: table swap, frontends opened and closed, reports.
//! - [`table`]: a snapshot resolved for the data path.
//! - [`balance`]: which backend takes the next connection.
//! - [`relay`]: TCP and UDP relays.
//! - [`listener`]: how frontend sockets are bound.
//! - [`stats`]: per-backend connection counters.

pub mod balance;
pub mod error;
pub mod listener;
pub mod node;
pub mod relay;
pub mod snapshot;
pub mod stats;
pub mod table;

pub use error::FrontendError;
pub use node::{FrontendStatus, Node, NodeConfig, NodeReport};
pub use snapshot::{Algorithm, BackendSpec, Protocol, RoutingSnapshot, ServiceKey, ServiceSpec};
pub use stats::BackendLoad;
pub use table::RoutingTable;
