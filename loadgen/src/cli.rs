//! Command-line interface of `loadgen`: one subcommand per workload, and `serve` for the demo backends.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

/// Switchboard load driver and demo backends. Every run is bounded by --duration, and aims only at
/// loopback or private test addresses unless --allow-any-target.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version = contract::build::VERSION, about, args_override_self = true)]
pub struct Cli {
    /// Log format and filter.
    #[command(flatten)]
    pub log: contract::process::LogArgs,

    /// Worker threads of the runtime (default: one per CPU).
    #[arg(long, global = true)]
    pub threads: Option<usize>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// TCP: connect, send, read the echo, close (or keep the connection with --keepalive).
    Tcp(RunArgs),
    /// HTTP/1.1 GET, keep-alive (or a new connection per request with --close).
    Http(RunArgs),
    /// UDP request/response, one flow per connection.
    Udp(RunArgs),
    /// Long TCP streams written as fast as possible: throughput.
    Bulk(RunArgs),
    /// A demo backend.
    #[command(subcommand)]
    Serve(ServeCommand),
    /// The controller at scale: simulated nodes on real `Dataplane.Sync` streams, registrations over
    /// `Registry`, and how long registrations and changes take to reach every node.
    ControlPlane(ControlPlaneArgs),
}

/// Options of every load run.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Where to send load; repeat for several nodes.
    #[arg(long = "target", required = true, value_parser = contract::addr::socket_addr)]
    pub targets: Vec<SocketAddr>,

    /// Exit with status 1 when more than this percentage of requests failed (the summary says so); 100
    /// never fails the run for its errors.
    #[arg(long, default_value_t = 0.0, value_name = "PERCENT")]
    pub max_errors: f64,

    /// Share of each target, e.g. `80,20`.
    #[arg(long)]
    pub split: Option<String>,

    /// Open loop: requests per second in all (latency counts from each request's intended start).
    /// Without it the run is closed loop.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Connections (UDP: flows; bulk: streams per target).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,

    /// How long the run lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Longest a request may take before it counts as a timeout.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// TCP: keep the connection for many requests.
    #[arg(long)]
    pub keepalive: bool,

    /// HTTP: `Connection: close`, a new connection per request.
    #[arg(long)]
    pub close: bool,

    /// Payload size of TCP and UDP requests, in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,

    /// HTTP request path.
    #[arg(long, default_value = "/")]
    pub path: String,

    /// Write the report as JSON to this file (`-` for stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Write the per-second timeline as CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,

    /// Write latency and rate charts as SVG to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,

    /// Allow targets outside loopback and private test ranges.
    #[arg(long)]
    pub allow_any_target: bool,

    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,
}

/// Demo backends.
#[derive(Debug, Subcommand)]
pub enum ServeCommand {
    /// TCP echo.
    TcpEcho(ServeArgs),
    /// UDP echo.
    UdpEcho(ServeArgs),
    /// HTTP server with optional CPU work and sleep per request; `GET /stats` answers the counters.
    Http(ServeArgs),
}

/// Options of the demo backends.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where to listen (port 0 for any).
    #[arg(long, default_value = "127.0.0.1:0", value_parser = contract::addr::socket_addr)]
    pub listen: SocketAddr,

    /// Register with a controller's JSON channel (`HOST:8080`) and answer its hellos.
    #[arg(long, value_parser = contract::addr::socket_addr)]
    pub register: Option<SocketAddr>,

    /// Public port to register (default: the listen port).
    #[arg(long)]
    pub public_port: Option<u16>,

    /// Serve `{"active":N,"total":N}` over HTTP on this address.
    #[arg(long, value_parser = contract::addr::socket_addr)]
    pub stats_listen: Option<SocketAddr>,

    /// HTTP: CPU spin per request, in microseconds.
    #[arg(long, default_value_t = 0)]
    pub work_us: u64,

    /// HTTP: wait per request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub sleep_ms: u64,
}

/// Options of `control-plane`.
#[derive(Debug, Clone, Args)]
pub struct ControlPlaneArgs {
    /// gRPC URL of the controller, e.g. `http://127.0.0.40:50051`.
    #[arg(long)]
    pub controller: String,

    /// Services (TCP ports from --base-port on) to register.
    #[arg(long, default_value_t = 1000)]
    pub services: usize,

    /// Backends per service: backend `b` is --backend-address + `b`, each on its own source address.
    #[arg(long, default_value_t = 10)]
    pub backends: usize,

    /// Simulated nodes, each on its own `Dataplane.Sync` stream.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,

    /// Health changes to time once everything is registered.
    #[arg(long, default_value_t = 50)]
    pub changes: usize,

    /// Port of the first service.
    #[arg(long, default_value_t = 20000)]
    pub base_port: u16,

    /// Address of the first backend (and source address of its registrations).
    #[arg(long, default_value = "127.0.0.101", value_parser = contract::addr::ipv4_addr)]
    pub backend_address: Ipv4Addr,

    /// Backends one `Register` stream holds at most (keep it within the controller's
    /// --max-backends-per-registration).
    #[arg(long, default_value_t = 250)]
    pub backends_per_stream: usize,

    /// Bearer token for `Registry` (the controller's --auth-token).
    #[arg(long, env = "SWITCHBOARD_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// Bearer token for `Dataplane.Sync` (the controller's --node-token).
    #[arg(long, env = "SWITCHBOARD_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,

    /// Longest wait for any one step: a registration's answer, every node's ack of a change.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Longest the whole run may take.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub time_limit: Duration,

    /// After the report, keep the nodes and registrations until stdin closes (at most --timeout), so a
    /// script can read the controller and other nodes at the final state.
    #[arg(long)]
    pub hold: bool,

    /// Write the report as JSON to this file (`-` for stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Allow a controller outside loopback and private test ranges.
    #[arg(long)]
    pub allow_any_target: bool,
}
