//! Command-line flags of `controller`. Every flag has an environment override; library code never sees
//! this type, only the validated [`crate::Config`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use dataplane::NodeArgs;

/// Switchboard controller: the registry of services and backends, with an embedded data-plane node.
#[derive(Debug, Clone, Parser)]
#[command(name = "controller", version = contract::build::VERSION, about, args_override_self = true)]
pub struct Cli {
    /// Log format and filter.
    #[command(flatten)]
    pub log: contract::process::LogArgs,

    /// Address of the JSON control channel (the HW1 protocol). Loopback by default: give `0.0.0.0:8080`
    /// (with `--auth-token` or `--json-allow`) to let servers on other hosts register.
    #[arg(long, env = "SWITCHBOARD_JSON_LISTEN", default_value = "127.0.0.1:8080", value_parser = contract::addr::socket_addr)]
    pub json_listen: SocketAddr,

    /// Address of the gRPC API (Registry, Admin, Dataplane, health, reflection). Loopback by default: give
    /// `0.0.0.0:50051` (with tokens) for agents and nodes on other hosts.
    #[arg(long, env = "SWITCHBOARD_GRPC_LISTEN", default_value = "127.0.0.1:50051", value_parser = contract::addr::socket_addr)]
    pub grpc_listen: SocketAddr,

    /// Address of the admin HTTP server (`GET /api/state`).
    #[arg(long, env = "SWITCHBOARD_ADMIN_LISTEN", default_value = "127.0.0.1:9901", value_parser = contract::addr::socket_addr)]
    pub admin_listen: SocketAddr,

    /// Time between two hello probes to a registered server.
    #[arg(long, env = "SWITCHBOARD_HELLO_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub hello_interval: Duration,

    /// Time a server has to answer one hello.
    #[arg(long, env = "SWITCHBOARD_HELLO_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub hello_timeout: Duration,

    /// Unanswered hellos in a row after which a server is removed and its channel closed.
    #[arg(long, env = "SWITCHBOARD_HELLO_FAILURES", default_value_t = 3)]
    pub hello_failures: u32,

    /// Ports services may use, e.g. `80,8000-8999`. The controller's own ports are always refused.
    #[arg(long, env = "SWITCHBOARD_ALLOWED_PORTS", default_value = "1-65535")]
    pub allowed_ports: String,

    /// Print the whole routing table to stderr after every change.
    #[arg(long, env = "SWITCHBOARD_PRINT_STATE")]
    pub print_state: bool,

    /// Do not run a data-plane node inside the controller.
    #[arg(long, env = "SWITCHBOARD_NO_EMBEDDED_DATAPLANE")]
    pub no_embedded_dataplane: bool,

    /// How long a registration waits for nodes to report whether they could bind its frontend.
    #[arg(long, env = "SWITCHBOARD_BIND_ACK_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub bind_ack_timeout: Duration,

    /// Warm-up after start: nodes keep serving services this controller has not relearned yet, so servers
    /// can re-register after a controller restart without their ports closing. 0 disables it.
    #[arg(long, env = "SWITCHBOARD_RESYNC_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub resync_grace: Duration,

    /// Where the registry lives: `memory` (this process alone), or `etcd://HOST:PORT[,HOST:PORT...]` to run
    /// as one of several controllers sharing their backends through etcd.
    #[arg(long, env = "SWITCHBOARD_STORE", default_value = "memory", value_name = "memory|etcd://HOST:PORT[,...]")]
    pub store: String,

    /// With an etcd store: every key of this cluster of controllers starts with this.
    #[arg(long, env = "SWITCHBOARD_ETCD_PREFIX", default_value = "/switchboard/v1")]
    pub etcd_prefix: String,

    /// With an etcd store: time-to-live of this controller's lease. Its keys (the backends its registrations
    /// hold) vanish this long after it dies; keep-alives go every third of it.
    #[arg(long, env = "SWITCHBOARD_ETCD_LEASE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub etcd_lease_ttl: Duration,

    /// With an etcd store: this controller's name among the others (default: hostname-pid).
    #[arg(long, env = "SWITCHBOARD_CONTROLLER_ID")]
    pub controller_id: Option<String>,

    /// The embedded node's flags.
    #[command(flatten)]
    pub node: NodeArgs,

    /// Do not share connection counts between nodes: least_connections and power_of_two then see only each
    /// node's own connections (for comparison).
    #[arg(long, env = "SWITCHBOARD_NO_CLUSTER_COUNTS")]
    pub no_cluster_counts: bool,

    /// Bearer token that callers of `Registry` (agents, gRPC servers) must present. Unset: anyone may.
    #[arg(long, env = "SWITCHBOARD_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// File whose first line is the --auth-token (keeps it out of `ps`).
    #[arg(long, env = "SWITCHBOARD_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Bearer token that nodes must present on `Dataplane.Sync`. Unset: anyone may follow as a node.
    #[arg(long, env = "SWITCHBOARD_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,

    /// File whose first line is the --node-token.
    #[arg(long, env = "SWITCHBOARD_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,

    /// Bearer token that callers of `Admin` and of the admin HTTP listener must present; it also lets a
    /// gRPC registration name another host's backend. Unset: anyone may.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File whose first line is the --admin-token.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// PEM certificate of the gRPC listener: with --tls-key, gRPC is served over TLS only.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM authority whose certificates nodes must show (mutual TLS for `Dataplane.Sync`; agents and
    /// operators need none).
    #[arg(long, env = "SWITCHBOARD_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,

    /// Let any gRPC registration name a backend at another IP than the one it connects from (otherwise
    /// only a caller with the admin token may).
    #[arg(long, env = "SWITCHBOARD_ALLOW_FOREIGN_BACKENDS")]
    pub allow_foreign_backends: bool,

    /// Source addresses allowed on the JSON control channel, as CIDR blocks, e.g. `10.0.0.0/8,::1/128`.
    /// Others get one `failed` reply and are disconnected. Unset: every source may connect. With
    /// --auth-token set, a JSON registration needs the token (its `"token"` field) unless its source is
    /// in this list.
    #[arg(long, env = "SWITCHBOARD_JSON_ALLOW")]
    pub json_allow: Option<String>,

    /// Live registrations (JSON connections, gRPC streams, agents) one source address may hold.
    #[arg(long, env = "SWITCHBOARD_MAX_REGISTRATIONS_PER_SOURCE", default_value_t = 64)]
    pub max_registrations_per_source: usize,

    /// Backends one registration may hold.
    #[arg(long, env = "SWITCHBOARD_MAX_BACKENDS_PER_REGISTRATION", default_value_t = 256)]
    pub max_backends_per_registration: usize,

    /// Services (each a frontend on every node) the balancer serves at most.
    #[arg(long, env = "SWITCHBOARD_MAX_SERVICES", default_value_t = 4096)]
    pub max_services: usize,

    /// Services the registrations of one source address may create, so one host cannot fill
    /// --max-services (joining a service someone else created does not count).
    #[arg(long, env = "SWITCHBOARD_MAX_SERVICES_PER_SOURCE", default_value_t = 256)]
    pub max_services_per_source: usize,

    /// A node that left is forgotten (no longer listed) this long after.
    #[arg(long, env = "SWITCHBOARD_NODE_FORGET_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub node_forget_after: Duration,

    /// A JSON control connection that has registered nothing is closed after this long without a request.
    #[arg(long, env = "SWITCHBOARD_JSON_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub json_idle_timeout: Duration,

    /// A connection to any door (JSON, gRPC, admin HTTP) that has not made its first request this long
    /// after it was accepted is closed: the first JSON line, the HTTP/2 preface and first headers, the
    /// HTTP request headers.
    #[arg(long, env = "SWITCHBOARD_FIRST_REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub first_request_timeout: Duration,

    /// A gRPC or admin HTTP connection with no request in flight for this long is closed (a `Register`,
    /// `Sync` or event stream is a request in flight for as long as it lasts).
    #[arg(long, env = "SWITCHBOARD_IDLE_CONNECTION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_connection_timeout: Duration,

    /// `least_load`: a server's load report (agents' `--report-load`) counts this long; a backend whose
    /// reports stop is then judged by its connections alone.
    #[arg(long, env = "SWITCHBOARD_LOAD_REPORT_MAX_AGE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub load_report_max_age: Duration,

    /// TOML file of these settings (the long flags without dashes, e.g. `json-listen = "0.0.0.0:8080"`)
    /// and of static services (`[[service]]`). Flags and environment variables win over the file. SIGHUP
    /// reloads its static services.
    #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Validate the configuration and exit.
    #[arg(long)]
    pub check: bool,
}
