//! Command-line flags of `dataplane`. Every flag has an environment override.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use clap::Parser;

use crate::{node::NodeConfig, sync::SyncConfig};

/// Switchboard data-plane node: follows a controller and relays TCP and UDP to the backends it lists.
#[derive(Debug, Clone, Parser)]
#[command(name = "dataplane", version, about, args_override_self = true)]
pub struct Cli {
    /// gRPC URL of the controller.
    #[arg(long, env = "SWITCHBOARD_CONTROLLER", default_value = "http://127.0.0.1:50051")]
    pub controller: String,

    /// Name of this node (default: hostname-pid).
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    pub node_id: Option<String>,

    /// IP address the frontends bind.
    #[arg(long, env = "SWITCHBOARD_FRONTEND_ADDRESS", default_value = "0.0.0.0")]
    pub frontend_address: IpAddr,

    /// Address of the node's admin HTTP server (`GET /api/state`).
    #[arg(long, env = "SWITCHBOARD_ADMIN_LISTEN", default_value = "127.0.0.1:9902")]
    pub admin_listen: SocketAddr,

    /// How long connections to a removed backend go on before they are closed; also how long a stopping
    /// node waits for open connections.
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Time allowed to connect to one backend before the next one is tried.
    #[arg(long, env = "SWITCHBOARD_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// A UDP session with no datagram either way for this long ends.
    #[arg(long, env = "SWITCHBOARD_UDP_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub udp_idle_timeout: Duration,

    /// Most UDP sessions per frontend.
    #[arg(long, env = "SWITCHBOARD_UDP_MAX_SESSIONS", default_value_t = 65_536)]
    pub udp_max_sessions: usize,

    /// Shortest time between two load reports to the controller.
    #[arg(long, env = "SWITCHBOARD_LOAD_REPORT_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub load_report_interval: Duration,

    /// Longest wait between two attempts to reach the controller.
    #[arg(long, env = "SWITCHBOARD_BACKOFF_MAX", default_value = "5s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
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
}

/// A flag value that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --{flag}: {why}")]
pub struct ConfigError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong with it.
    pub why: String,
}

impl TryFrom<Cli> for DataplaneConfig {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, Self::Error> {
        let err = |flag, why: &str| ConfigError { flag, why: why.to_owned() };
        if !(cli.controller.starts_with("http://") || cli.controller.starts_with("https://")) {
            return Err(err("controller", "must be an http:// or https:// URL"));
        }
        if cli.udp_max_sessions == 0 {
            return Err(err("udp-max-sessions", "must be at least 1"));
        }
        for (flag, value) in [
            ("connect-timeout", cli.connect_timeout),
            ("udp-idle-timeout", cli.udp_idle_timeout),
            ("load-report-interval", cli.load_report_interval),
            ("backoff-max", cli.backoff_max),
        ] {
            if value.is_zero() {
                return Err(err(flag, "must be more than zero"));
            }
        }
        let node_id = match cli.node_id {
            Some(id) if id.trim().is_empty() => return Err(err("node-id", "must not be empty")),
            Some(id) => id,
            None => default_node_id(),
        };
        Ok(DataplaneConfig {
            node: NodeConfig {
                node_id: node_id.clone(),
                frontend_address: cli.frontend_address,
                connect_timeout: cli.connect_timeout,
                udp_idle_timeout: cli.udp_idle_timeout,
                udp_max_sessions: cli.udp_max_sessions,
                load_report_interval: cli.load_report_interval,
                drain_timeout: cli.drain_timeout,
            },
            sync: SyncConfig {
                controller: cli.controller,
                node_id,
                backoff_min: Duration::from_millis(100).min(cli.backoff_max),
                backoff_max: cli.backoff_max,
            },
            admin_listen: cli.admin_listen,
        })
    }
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
        assert_eq!(config.sync.controller, "http://127.0.0.1:50051");
        assert!(config.node.node_id.ends_with(&format!("-{}", std::process::id())));
        assert_eq!(config.node.drain_timeout, Duration::from_secs(30));
        let bad = Cli::parse_from(["dataplane", "--controller", "127.0.0.1:50051"]);
        assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, "controller");
        let bad = Cli::parse_from(["dataplane", "--node-id", " "]);
        assert_eq!(DataplaneConfig::try_from(bad).unwrap_err().flag, "node-id");
    }
}
