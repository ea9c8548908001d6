//! Command-line flags of `dataplane`. Every flag has an environment override. [`NodeArgs`] are the flags
//! of a node itself, which the controller takes too for its embedded node.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser};
use contract::{auth::Token, client::ClientTls, process::FlagError};

use crate::{access_log::AccessLogTarget, node::NodeConfig, stats::Passive, sync::SyncConfig};

/// Switchboard data-plane node: follows a controller and relays TCP and UDP to the backends it lists.
#[derive(Debug, Clone, Parser)]
#[command(name = "dataplane", version = contract::build::VERSION, about, args_override_self = true)]
pub struct Cli {
    /// Log format and filter.
    #[command(flatten)]
    pub log: contract::process::LogArgs,

    /// gRPC URL of the controller, or several separated by commas: the node follows one at a time and
    /// moves to the next when it is lost.
    #[arg(long, env = "SWITCHBOARD_CONTROLLER", default_value = "http://127.0.0.1:50051", value_name = "URL[,URL...]")]
    pub controller: String,

    /// Name of this node (default: hostname-pid).
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    pub node_id: Option<String>,

    /// Address of the node's admin HTTP server (`GET /api/state`).
    #[arg(long, env = "SWITCHBOARD_ADMIN_LISTEN", default_value = "127.0.0.1:9902", value_parser = contract::addr::socket_addr)]
    pub admin_listen: SocketAddr,

    /// The node's own flags.
    #[command(flatten)]
    pub node: NodeArgs,

    /// TOML file of these settings (the long flags without dashes, e.g. `controller = "http://10.0.0.1:50051"`).
    /// Flags and environment variables win over the file. SIGHUP checks it again and names the settings
    /// that changed (they apply at the next restart).
    #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,

    /// Shortest time between two load reports to the controller.
    #[arg(long, env = "SWITCHBOARD_LOAD_REPORT_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub load_report_interval: Duration,

    /// Longest wait between two attempts to reach the controller.
    #[arg(long, env = "SWITCHBOARD_BACKOFF_MAX", default_value = "5s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,

    /// Bearer token required by this node's admin listener (`/api/state`, `/metrics`); none: open, so keep
    /// --admin-listen on loopback.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File whose first line is the --admin-token.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Bearer token presented to the controller (its --node-token).
    #[arg(long, env = "SWITCHBOARD_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,

    /// File whose first line is the --node-token (keeps it out of `ps`).
    #[arg(long, env = "SWITCHBOARD_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,

    /// PEM file of the authority that signed the controller's certificate (an https:// --controller).
    #[arg(long, env = "SWITCHBOARD_CA")]
    pub ca: Option<PathBuf>,

    /// PEM certificate this node shows the controller (mutual TLS, with --tls-key).
    #[arg(long, env = "SWITCHBOARD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// The flags of one node: how it binds frontends and treats connections. `dataplane` and the controller
/// (for its embedded node) take the same ones.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// IP address the node binds its frontends on.
    #[arg(long, env = "SWITCHBOARD_FRONTEND_ADDRESS", default_value = "0.0.0.0", value_parser = contract::addr::ip_addr)]
    pub frontend_address: IpAddr,

    /// How long connections to a removed backend go on before they are closed; also how long a stopping
    /// node waits for open connections.
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Time allowed to connect to one backend before the next one is tried.
    #[arg(long, env = "SWITCHBOARD_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Passive health: TCP connects to a backend that fail in a row before this node takes it out of
    /// rotation (it shows as failing in the controller's /api/state); 0 never does.
    #[arg(long, env = "SWITCHBOARD_PASSIVE_FAILURES", default_value_t = 3)]
    pub passive_failures: u32,

    /// Passive health: while a backend is out, one new connection tries it this often; the first that
    /// gets through puts it back.
    #[arg(long, env = "SWITCHBOARD_PASSIVE_RETRY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub passive_retry: Duration,

    /// On services that accept the PROXY protocol (a balancer in front): time a client has to send its
    /// header before it is closed.
    #[arg(long, env = "SWITCHBOARD_ACCEPT_PROXY_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub accept_proxy_timeout: Duration,

    /// A UDP session with no datagram either way for this long ends.
    #[arg(long, env = "SWITCHBOARD_UDP_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub udp_idle_timeout: Duration,

    /// A UDP session whose backend has not answered yet ends after this long without a datagram from its
    /// client (at most --udp-idle-timeout); once the backend answers, --udp-idle-timeout applies. Sessions
    /// the backend ignores (a spoofed flood's, most often) leave the table this soon.
    #[arg(long, env = "SWITCHBOARD_UDP_UNANSWERED_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub udp_unanswered_timeout: Duration,

    /// Most UDP sessions per frontend (each holds a descriptor); datagrams that would open more are dropped.
    #[arg(long, env = "SWITCHBOARD_UDP_MAX_SESSIONS", default_value_t = 4_096)]
    pub udp_max_sessions: usize,

    /// Most UDP sessions per frontend from one client address (its ports are its sessions); datagrams that
    /// would open more are dropped. Above --udp-max-sessions-per-prefix, the prefix's cap binds first.
    #[arg(long, env = "SWITCHBOARD_UDP_MAX_SESSIONS_PER_SOURCE", default_value_t = 64)]
    pub udp_max_sessions_per_source: usize,

    /// Most UDP sessions per frontend from one client /24 (IPv4, IPv4-mapped IPv6 included) or /64 (IPv6);
    /// datagrams that would open more are dropped. With the defaults a spoofed flood from one network holds
    /// at most a quarter of --udp-max-sessions.
    #[arg(long, env = "SWITCHBOARD_UDP_MAX_SESSIONS_PER_PREFIX", default_value_t = 1_024)]
    pub udp_max_sessions_per_prefix: usize,

    /// Most TCP connections open at once per service and node; more are queued (--queue-timeout) or refused.
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_SERVICE", default_value_t = 10_000)]
    pub max_connections_per_service: usize,

    /// How long a TCP client past --max-connections-per-service waits for a slot before it is refused;
    /// 0 refuses at once.
    #[arg(long, env = "SWITCHBOARD_QUEUE_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub queue_timeout: Duration,

    /// A TCP client that sends nothing for this long after connecting is closed before a backend is
    /// chosen (slowloris-style idlers). 0 turns it off, as protocols where the server speaks first need.
    #[arg(long, env = "SWITCHBOARD_CLIENT_FIRST_BYTE_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub client_first_byte_timeout: Duration,

    /// Data-path worker threads, each with its own socket on every frontend port (0: one per core).
    #[arg(long, env = "SWITCHBOARD_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Most pipes for zero-copy TCP relaying (splice), two descriptors each, held only while bytes are in
    /// flight; past it connections copy through a buffer (0: never splice).
    #[arg(long, env = "SWITCHBOARD_SPLICE_PIPES", default_value_t = 256)]
    pub splice_pipes: usize,

    /// Capacity asked of each splice pipe, in bytes.
    #[arg(long, env = "SWITCHBOARD_PIPE_SIZE", default_value_t = 256 * 1024)]
    pub pipe_size: usize,

    /// Write one JSON line per finished TCP connection and ended UDP session to this file (`-`: standard
    /// output). Off by default.
    #[arg(long, env = "SWITCHBOARD_ACCESS_LOG", value_name = "PATH|-")]
    pub access_log: Option<AccessLogTarget>,

    /// Unix socket for upgrades that drop nothing: the node listens on it for its successor, and a node
    /// started with a node already listening there takes over its listening sockets, accepts on them, and
    /// tells the old one to stop accepting and drain.
    #[arg(long, env = "SWITCHBOARD_TAKEOVER", value_name = "PATH")]
    pub takeover: Option<PathBuf>,
}

/// The validated configuration of a `dataplane` process.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// The node.
    pub node: NodeConfig,
    /// Its link to the controller.
    pub sync: SyncConfig,
    /// Admin HTTP listener.
    pub admin_listen: SocketAddr,
    /// Required by the admin listener when set.
    pub admin_token: Option<Token>,
}

// === impl NodeArgs ===

impl NodeArgs {
    /// The configuration of a node named `node_id` that reports its load at most every
    /// `load_report_interval` and lets clients hold at most `client_fds` file descriptors.
    pub fn node_config(
        &self,
        node_id: String,
        load_report_interval: Duration,
        client_fds: usize,
    ) -> Result<NodeConfig, FlagError> {
        for (flag, value) in [
            ("udp-max-sessions", self.udp_max_sessions),
            ("udp-max-sessions-per-source", self.udp_max_sessions_per_source),
            ("udp-max-sessions-per-prefix", self.udp_max_sessions_per_prefix),
        ] {
            if value == 0 {
                return Err(FlagError::new(flag, "must be at least 1"));
            }
        }
        if self.max_connections_per_service == 0 {
            return Err(FlagError::new("max-connections-per-service", "must be at least 1"));
        }
        if !(4096..=1 << 20).contains(&self.pipe_size) {
            return Err(FlagError::new("pipe-size", "must be between 4096 and 1048576 bytes"));
        }
        FlagError::require_positive(&[
            ("connect-timeout", self.connect_timeout),
            ("passive-retry", self.passive_retry),
            ("accept-proxy-timeout", self.accept_proxy_timeout),
            ("udp-idle-timeout", self.udp_idle_timeout),
            ("udp-unanswered-timeout", self.udp_unanswered_timeout),
            ("load-report-interval", load_report_interval),
        ])?;
        Ok(NodeConfig {
            node_id,
            frontend_address: self.frontend_address,
            connect_timeout: self.connect_timeout,
            passive: Passive { failures: self.passive_failures, retry: self.passive_retry },
            accept_proxy_timeout: self.accept_proxy_timeout,
            udp_idle_timeout: self.udp_idle_timeout,
            udp_unanswered_timeout: self.udp_unanswered_timeout,
            udp_max_sessions: self.udp_max_sessions,
            udp_max_sessions_per_source: self.udp_max_sessions_per_source,
            udp_max_sessions_per_prefix: self.udp_max_sessions_per_prefix,
            load_report_interval,
            drain_timeout: self.drain_timeout,
            client_fds,
            max_connections_per_service: self.max_connections_per_service,
            queue_timeout: self.queue_timeout,
            first_byte_timeout: (!self.client_first_byte_timeout.is_zero()).then_some(self.client_first_byte_timeout),
            workers: match self.workers {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            splice_pipes: self.splice_pipes,
            pipe_size: self.pipe_size,
            access_log: self.access_log.clone(),
            takeover: self.takeover.clone(),
        })
    }
}

// === impl DataplaneConfig ===

impl TryFrom<Cli> for DataplaneConfig {
    type Error = FlagError;

    fn try_from(cli: Cli) -> Result<Self, Self::Error> {
        let tls = ClientTls::from_flags(cli.ca.as_deref(), cli.tls_cert.as_deref(), cli.tls_key.as_deref())?;
        let controllers = contract::client::controller_urls(&cli.controller, tls.as_ref())?;
        FlagError::require_positive(&[("backoff-max", cli.backoff_max)])?;
        let node_id = match cli.node_id {
            Some(id) if id.trim().is_empty() => return Err(FlagError::new("node-id", "must not be empty")),
            Some(id) => id,
            None => default_node_id(),
        };
        let node = cli.node.node_config(node_id.clone(), cli.load_report_interval, client_fds())?;
        Ok(DataplaneConfig {
            sync: SyncConfig {
                frontend_address: node.frontend_address,
                controllers,
                node_id,
                backoff_min: Duration::from_millis(100).min(cli.backoff_max),
                backoff_max: cli.backoff_max,
                token: Token::from_flags("node-token", cli.node_token, cli.node_token_file.as_deref())?,
                tls,
            },
            node,
            admin_listen: cli.admin_listen,
            admin_token: Token::from_flags("admin-token", cli.admin_token, cli.admin_token_file.as_deref())?,
        })
    }
}

/// Descriptors a `dataplane` process lets clients hold: its limit, less what is open now and a reserve
/// for its link to the controller, its admin listener and its logs.
fn client_fds() -> usize {
    contract::process::fd_limit().saturating_sub(contract::process::open_fds() + 64)
}

/// `hostname-pid`: unique per process on a host, readable in logs.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-{}", if host.is_empty() { "node" } else { host }, std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bad_values() {
        let config = DataplaneConfig::try_from(Cli::parse_from(["dataplane"])).unwrap();
        assert_eq!(config.sync.controllers, ["http://127.0.0.1:50051"]);
        let two = Cli::parse_from(["dataplane", "--controller", "http://127.0.0.1:1,http://127.0.0.2:1"]);
        assert_eq!(DataplaneConfig::try_from(two).unwrap().sync.controllers.len(), 2);
        assert!(config.node.node_id.ends_with(&format!("-{}", std::process::id())));
        assert_eq!(config.node.drain_timeout, Duration::from_secs(30));
        let bad = Cli::parse_from(["dataplane", "--controller", "127.0.0.1:50051"]);
        assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, "controller");
        let bad = Cli::parse_from(["dataplane", "--node-id", " "]);
        assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, "node-id");
        let bad = Cli::parse_from(["dataplane", "--udp-max-sessions", "0"]);
        assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, "udp-max-sessions");
        assert_eq!(config.node.udp_unanswered_timeout, Duration::from_secs(2));
        assert_eq!((config.node.udp_max_sessions_per_source, config.node.udp_max_sessions_per_prefix), (64, 1_024));
        for flag in ["--udp-max-sessions-per-source", "--udp-max-sessions-per-prefix"] {
            let bad = Cli::parse_from(["dataplane", flag, "0"]);
            assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, &flag[2..]);
        }
        let bad = Cli::parse_from(["dataplane", "--udp-unanswered-timeout", "0s"]);
        assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, "udp-unanswered-timeout");
        let bad = Cli::parse_from(["dataplane", "--pipe-size", "100"]);
        assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, "pipe-size");
        assert!(config.node.workers >= 1);
        let bad = Cli::parse_from(["dataplane", "--connect-timeout", "0s"]);
        assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, "connect-timeout");
    }
}
