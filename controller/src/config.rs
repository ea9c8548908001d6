//! The validated configuration of a controller, built from [`crate::Cli`]: parse first, bind later.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use contract::process::FlagError;
use dataplane::NodeConfig;

use crate::{cli::Cli, error::ConfigError, probe::ProbeSettings};

/// Everything a controller needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// HW1 JSON control channel listener.
    pub json_listen: SocketAddr,
    /// gRPC listener.
    pub grpc_listen: SocketAddr,
    /// Admin HTTP listener.
    pub admin_listen: SocketAddr,
    /// Hello probes of registered servers.
    pub probe: ProbeSettings,
    /// Ports services may use.
    pub allowed_ports: PortRanges,
    /// Print the routing table after every change.
    pub print_state: bool,
    /// How long a registration waits for bind results.
    pub bind_ack_timeout: Duration,
    /// Warm-up window after start, during which nodes keep services not yet re-registered.
    pub resync_grace: Duration,
    /// Share nodes' connection counts with each other.
    pub cluster_counts: bool,
    /// The embedded node, unless disabled.
    pub embedded_node: Option<NodeConfig>,
    /// Only validate.
    pub check: bool,
}

/// The name of the node that runs inside the controller.
pub const EMBEDDED_NODE: &str = "embedded";

/// How often the embedded node reports its counts (a remote node's `--load-report-interval` default).
const EMBEDDED_LOAD_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// A set of port ranges, e.g. `80,8000-8999`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRanges(Vec<(u16, u16)>);

// === impl Config ===

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, Self::Error> {
        FlagError::require_positive(&[
            ("hello-interval", cli.hello_interval),
            ("hello-timeout", cli.hello_timeout),
            ("bind-ack-timeout", cli.bind_ack_timeout),
        ])?;
        if cli.hello_failures == 0 {
            return Err(FlagError::new("hello-failures", "must be at least 1").into());
        }
        let probe =
            ProbeSettings { interval: cli.hello_interval, timeout: cli.hello_timeout, failures: cli.hello_failures };
        // Checked even when no node is embedded: a flag given is a flag that must make sense.
        let node = cli.node.node_config(EMBEDDED_NODE.to_owned(), EMBEDDED_LOAD_REPORT_INTERVAL)?;
        Ok(Config {
            json_listen: cli.json_listen,
            grpc_listen: cli.grpc_listen,
            admin_listen: cli.admin_listen,
            probe,
            allowed_ports: cli.allowed_ports.parse()?,
            print_state: cli.print_state,
            bind_ack_timeout: cli.bind_ack_timeout,
            resync_grace: cli.resync_grace,
            cluster_counts: !cli.no_cluster_counts,
            embedded_node: (!cli.no_embedded_dataplane).then_some(node),
            check: cli.check,
        })
    }
}

// === impl PortRanges ===

impl PortRanges {
    /// True when `port` is in one of the ranges.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&port))
    }
}

impl Default for PortRanges {
    fn default() -> Self {
        PortRanges(vec![(1, 65535)])
    }
}

impl FromStr for PortRanges {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::AllowedPorts { value: s.to_owned(), why };
        let port = |p: &str| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(err(format!("{p:?} is not a port in 1..=65535"))),
            Ok(p) => Ok(p),
        };
        let mut ranges = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None => (port(part)?, port(part)?),
            };
            if lo > hi {
                return Err(err(format!("range {part:?} is backwards")));
            }
            ranges.push((lo, hi));
        }
        if ranges.is_empty() {
            return Err(err("no port given".to_owned()));
        }
        Ok(PortRanges(ranges))
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi { write!(f, "{lo}")? } else { write!(f, "{lo}-{hi}")? }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_match() {
        let r: PortRanges = "80, 8000-8999".parse().unwrap();
        assert!(r.contains(80) && r.contains(8000) && r.contains(8999));
        assert!(!r.contains(81) && !r.contains(9000));
        assert_eq!(r.to_string(), "80,8000-8999");
        for bad in ["", "0", "70000", "9-1", "a-b", "1-"] {
            assert!(bad.parse::<PortRanges>().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_are_valid_and_zero_failures_is_not() {
        use clap::Parser;
        let config = Config::try_from(Cli::parse_from(["controller"])).unwrap();
        assert_eq!(config.json_listen.port(), 8080);
        assert_eq!(config.grpc_listen.port(), 50051);
        assert_eq!(config.probe.interval, Duration::from_secs(2));
        assert!(config.embedded_node.is_some());
        let cli = Cli::parse_from(["controller", "--hello-failures", "0", "--hello-interval", "300ms"]);
        assert_eq!(cli.hello_interval, Duration::from_millis(300));
        assert!(Config::try_from(cli).is_err());
    }
}
