//! The controller's front doors: the HW1 JSON control channel, gRPC, and admin HTTP. They translate their
//! wire formats into [`crate::store`] calls and nothing else; gRPC messages become domain types through the
//! contract crate's `convert`, and the errors of both become gRPC statuses here, once.

pub mod admin;
pub mod auth;
pub mod cidr;
pub mod door;
pub mod framing;
pub mod grpc;
pub mod http;
pub mod in_flight;
pub mod json;
pub mod listener;
pub mod request;
pub mod sync;
pub mod tls;

use std::time::Duration;

use contract::convert::ConvertError;
use tonic::{Status, Streaming};

use crate::error::StoreError;

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { .. } | StoreError::NoService { .. } => Status::not_found(error.to_string()),
            StoreError::AlgorithmConflict { .. } | StoreError::ProxyConflict { .. } => {
                Status::failed_precondition(error.to_string())
            }
            StoreError::PortNotAllowed { .. } | StoreError::ReservedPort { .. } => {
                Status::failed_precondition(error.to_string())
            }
            StoreError::OwnListener { .. }
            | StoreError::Loop { .. }
            | StoreError::NotAHost { .. }
            | StoreError::NotOwner { .. }
            | StoreError::NeedsAuthority { .. } => Status::permission_denied(error.to_string()),
            StoreError::TooManyRegistrations { .. }
            | StoreError::TooManyServicesFromSource { .. }
            | StoreError::TooManyBackends { .. }
            | StoreError::TooManyServices { .. } => Status::resource_exhausted(error.to_string()),
            StoreError::Invariant(_) => Status::internal(error.to_string()),
            StoreError::Unavailable(_) => Status::unavailable(error.to_string()),
        }
    }
}

/// A request that does not make a valid domain value is the client's mistake.
fn invalid_argument(error: ConvertError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// The first message of a stream, within `timeout`: a stream that waits longer would hold its connection
/// as a request in flight, which the door never evicts.
async fn first_message<T>(inbound: &mut Streaming<T>, timeout: Duration) -> Result<Option<T>, Status> {
    match tokio::time::timeout(timeout, inbound.message()).await {
        Ok(message) => message,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no first message within {timeout:?} of opening the stream (--first-request-timeout)"
        ))),
    }
}
