//! Command-line interface of `loadgen`: one subcommand per workload, and `serve` for the demo backends.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

/// Switchboard load driver and demo backends. Every run is bounded by --duration, and aims only at
/// loopback or private test addresses unless --allow-any-target.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about, args_override_self = true)]
pub struct Cli {
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
}

/// Options of every load run.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Where to send load; repeat for several nodes.
    #[arg(long = "target", required = true)]
    pub targets: Vec<SocketAddr>,

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
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// Register with a controller's JSON channel (`HOST:8080`) and answer its hellos.
    #[arg(long)]
    pub register: Option<SocketAddr>,

    /// Public port to register (default: the listen port).
    #[arg(long)]
    pub public_port: Option<u16>,

    /// Serve `{"active":N,"total":N}` over HTTP on this address.
    #[arg(long)]
    pub stats_listen: Option<SocketAddr>,

    /// HTTP: CPU spin per request, in microseconds.
    #[arg(long, default_value_t = 0)]
    pub work_us: u64,

    /// HTTP: wait per request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub sleep_ms: u64,
}
