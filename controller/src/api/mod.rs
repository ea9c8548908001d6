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

use contract::convert::ConvertError;
use tonic::Status;

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
