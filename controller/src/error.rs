//! Errors of the controller, one enum per boundary.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use contract::{
    model::{Algorithm, ProxyProtocol, ServiceKey},
    process::FlagError,
};

/// A registry change the store refuses. Its `Display` is the reason a registering server reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The port is outside `--allowed-ports`.
    #[error("port {port} is outside the allowed ports {allowed}")]
    PortNotAllowed {
        /// The requested port.
        port: u16,
        /// The allowed ranges, as configured.
        allowed: String,
    },
    /// The port is one of the controller's own listeners.
    #[error("port {port} is the controller's own port")]
    ReservedPort {
        /// The requested port.
        port: u16,
    },
    /// A registration asks for another algorithm than the service has.
    #[error(
        "service {service} uses {current}; a registration asking for {requested} is refused (change it with Admin.SetAlgorithm)"
    )]
    AlgorithmConflict {
        /// The service.
        service: ServiceKey,
        /// Its algorithm.
        current: Algorithm,
        /// The one asked for.
        requested: Algorithm,
    },
    /// A registration asks for other PROXY protocol settings than the service has.
    #[error("service {service} has {current}; a registration asking for {requested} is refused")]
    ProxyConflict {
        /// The service.
        service: ServiceKey,
        /// Its settings.
        current: ProxyProtocol,
        /// The ones asked for.
        requested: ProxyProtocol,
    },
    /// No such service.
    #[error("no service {service}")]
    NoService {
        /// The service looked for.
        service: ServiceKey,
    },
    /// No such backend in that service.
    #[error("no backend {backend} in service {service}")]
    NotFound {
        /// The service looked in.
        service: ServiceKey,
        /// The backend looked for.
        backend: SocketAddr,
    },
    /// The backend is one of the controller's own listeners.
    #[error("backend {backend} is one of the balancer's own listeners")]
    OwnListener {
        /// The backend asked for.
        backend: SocketAddr,
    },
    /// The backend is a frontend on a node.
    #[error("backend {backend} is the frontend of {service}: traffic would loop")]
    Loop {
        /// The service.
        service: ServiceKey,
        /// The backend asked for.
        backend: SocketAddr,
    },
    /// A source holds as many registrations as it may.
    #[error("source {address} holds {max} registrations already (--max-registrations-per-source)")]
    TooManyRegistrations {
        /// The source address.
        address: IpAddr,
        /// The bound.
        max: usize,
    },
    /// A registration holds as many backends as it may.
    #[error("this registration holds {max} backends already (--max-backends-per-registration)")]
    TooManyBackends {
        /// The bound.
        max: usize,
    },
    /// The balancer serves as many services as it may.
    #[error("the balancer serves {max} services already (--max-services)")]
    TooManyServices {
        /// The bound.
        max: usize,
    },
    /// The backend's address is no one host's unicast address (unspecified, multicast, broadcast, reserved).
    #[error("backend {backend} is not the unicast address of one host")]
    NotAHost {
        /// The backend asked for.
        backend: SocketAddr,
    },
    /// The backend belongs to another registration, and the requester is neither it, nor of the same
    /// credential from the same address, nor an operator.
    #[error(
        "backend {backend} of {service} belongs to another registration: only it, a later one with the same token from the same address, or an operator (--admin-token) may change or end it"
    )]
    NotOwner {
        /// The service.
        service: ServiceKey,
        /// The backend.
        backend: SocketAddr,
    },
    /// An anonymous registration asked for a service-wide setting while the registration token is set.
    #[error("service {service}: choosing its {setting} needs the registration token (--auth-token) or the admin token")]
    NeedsAuthority {
        /// The service.
        service: ServiceKey,
        /// What was asked for.
        setting: &'static str,
    },
    /// A source created as many services as it may.
    #[error("source {address} created {max} services already (--max-services-per-source)")]
    TooManyServicesFromSource {
        /// The source address.
        address: IpAddr,
        /// The bound.
        max: usize,
    },
    /// The shared store (etcd) cannot be reached: the controller serves what it has and takes no change.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The change would leave the store inconsistent (a bug, not bad input): refused, nothing published.
    #[error("internal error: the change would break a store invariant ({0}); nothing changed")]
    Invariant(String),
}

/// Why the controller cannot start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A listener could not be bound: the OS error once, and what to do about it.
    #[error("cannot listen on {addr} ({what}): {source}{}", contract::addr::bind_hint(.source, .addr, "controller", .flag))]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The flag that sets its address, without dashes.
        flag: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The reflection service could not load the descriptors.
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    /// The admin HTTP server failed.
    #[error("admin HTTP server: {0}")]
    Admin(#[source] io::Error),
    /// The store refused a change of the controller's own (warm-up).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The embedded node could not start.
    #[error("embedded node: {0}")]
    Node(#[from] dataplane::DataplaneError),
    /// Taking over from the controller at `--takeover` failed.
    #[error(transparent)]
    Takeover(#[from] dataplane::TakeoverError),
    /// The READY line could not be written.
    #[error("writing the READY line: {0}")]
    Ready(#[source] io::Error),
    /// SIGHUP cannot be watched.
    #[error("cannot watch SIGHUP: {0}")]
    Signal(#[source] io::Error),
    /// The static services of the configuration file are refused.
    #[error("static services of {path}: {source}")]
    Static {
        /// The file.
        path: std::path::PathBuf,
        /// Why the store refused them.
        source: StoreError,
    },
}

impl ControllerError {
    /// The store refused the static services of the file at `path`.
    pub fn static_services(path: Option<&std::path::Path>, refused: StoreError) -> Self {
        ControllerError::Static { path: path.map(std::path::Path::to_path_buf).unwrap_or_default(), source: refused }
    }
}

/// A configuration value that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `--allowed-ports` could not be parsed.
    #[error("invalid --allowed-ports {value:?}: {why}; expected ports and FIRST-LAST ranges, e.g. 80,8000-8999")]
    AllowedPorts {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A value out of its range.
    #[error(transparent)]
    Flag(#[from] FlagError),
    /// The `--config` file is wrong.
    #[error("invalid --config {0}")]
    File(#[from] contract::config_file::ConfigFileError),
}
