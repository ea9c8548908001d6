//! The validated configuration of a controller, built from [`crate::Cli`]: parse first, bind later.

use std::{ffi::OsString, net::SocketAddr, time::Duration};

use contract::{
    auth::Token,
    config_file::{self, ConfigFile, ParseError},
    process::FlagError,
};
use dataplane::NodeConfig;

pub use crate::api::door::FdShares;
use crate::{
    api::{auth::Tokens, cidr::CidrList, door::DoorTimeouts, tls::ServerTls},
    cli::Cli,
    error::ConfigError,
    probe::ProbeSettings,
    statics::{self, StaticService},
    store::{EMBEDDED_NODE, PortRanges, RegistryLimits},
};

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
    /// The bearer tokens of the three doors.
    pub tokens: Tokens,
    /// Any gRPC registration may name another host's backend.
    pub allow_foreign_backends: bool,
    /// Sources that may use the JSON control channel (`None`: every source); with a registration token,
    /// the sources whose JSON registrations need no token.
    pub json_allow: Option<CidrList>,
    /// A node that left is forgotten this long after.
    pub node_forget_after: Duration,
    /// How the descriptor limit is shared between the doors and the embedded node's clients.
    pub fd_shares: FdShares,
    /// TLS on the gRPC listener.
    pub tls: Option<ServerTls>,
    /// Bounds on what registrations may make the store hold.
    pub registry_limits: RegistryLimits,
    /// A JSON connection that has registered nothing is closed after this long without a request.
    pub json_idle_timeout: Duration,
    /// How long a connection of any door may go without a request.
    pub door_timeouts: DoorTimeouts,
    /// Only validate.
    pub check: bool,
    /// Where the registry lives.
    pub store: StoreSettings,
    /// A server's load report counts this long.
    pub load_report_max_age: Duration,
    /// The static services of the `--config` file.
    pub static_services: Vec<StaticService>,
    /// The command line and the `--config` file it was read with, read again on SIGHUP.
    pub source: Option<ConfigSource>,
}

/// Where a configuration came from, so a reload reads it the same way.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The command line, program name first.
    pub args: Vec<OsString>,
    /// The `--config` file as read.
    pub file: ConfigFile,
}

// === impl ConfigSource ===

impl ConfigSource {
    /// The `--config` file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.file.path
    }
}

/// Where the registry lives (`--store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSettings {
    /// In this process only.
    Memory,
    /// Shared with other controllers through etcd.
    Etcd {
        /// `HOST:PORT` of each member.
        endpoints: Vec<String>,
        /// `--etcd-prefix`, without a trailing `/`.
        prefix: String,
        /// `--etcd-lease-ttl`.
        lease_ttl: Duration,
        /// `--controller-id`.
        id: String,
    },
}

impl StoreSettings {
    fn from_flags(store: &str, prefix: &str, lease_ttl: Duration, id: Option<String>) -> Result<Self, FlagError> {
        if store == "memory" {
            return Ok(StoreSettings::Memory);
        }
        let Some(members) = store.strip_prefix("etcd://") else {
            return Err(FlagError::new("store", format!("{store:?} is neither `memory` nor `etcd://HOST:PORT[,...]`")));
        };
        let endpoints: Vec<String> =
            members.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_owned).collect();
        if endpoints.is_empty() || endpoints.iter().any(|m| m.contains('/') || !m.contains(':')) {
            return Err(FlagError::new(
                "store",
                format!("{store:?}: give etcd members as etcd://HOST:PORT[,HOST:PORT...]"),
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.starts_with('/') || prefix.len() < 2 {
            return Err(FlagError::new("etcd-prefix", "must start with / and name something, e.g. /switchboard/v1"));
        }
        if lease_ttl < Duration::from_secs(3) {
            return Err(FlagError::new("etcd-lease-ttl", "must be at least 3s (keep-alives go every third of it)"));
        }
        let id = match id {
            Some(id) if id.is_empty() || id.contains('/') || id.len() > 128 => {
                return Err(FlagError::new("controller-id", "must be 1 to 128 characters without /"));
            }
            Some(id) => id,
            None => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            }
        };
        Ok(StoreSettings::Etcd { endpoints, prefix: prefix.to_owned(), lease_ttl, id })
    }
}

/// How often the embedded node reports its counts (a remote node's `--load-report-interval` default).
const EMBEDDED_LOAD_REPORT_INTERVAL: Duration = Duration::from_millis(100);

// === impl Config ===

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, Self::Error> {
        FlagError::require_positive(&[
            ("hello-interval", cli.hello_interval),
            ("hello-timeout", cli.hello_timeout),
            ("bind-ack-timeout", cli.bind_ack_timeout),
            ("json-idle-timeout", cli.json_idle_timeout),
            ("first-request-timeout", cli.first_request_timeout),
            ("idle-connection-timeout", cli.idle_connection_timeout),
            ("load-report-max-age", cli.load_report_max_age),
            ("node-forget-after", cli.node_forget_after),
        ])?;
        if cli.hello_failures == 0 {
            return Err(FlagError::new("hello-failures", "must be at least 1").into());
        }
        let probe =
            ProbeSettings { interval: cli.hello_interval, timeout: cli.hello_timeout, failures: cli.hello_failures };
        // Checked even when no node is embedded: a flag given is a flag that must make sense.
        let listeners =
            [("json-listen", cli.json_listen), ("grpc-listen", cli.grpc_listen), ("admin-listen", cli.admin_listen)];
        check_listeners_apart(&listeners)?;
        let fd_shares = FdShares::current();
        let node = cli.node.node_config(EMBEDDED_NODE.to_owned(), EMBEDDED_LOAD_REPORT_INTERVAL, fd_shares.clients)?;
        let store = StoreSettings::from_flags(&cli.store, &cli.etcd_prefix, cli.etcd_lease_ttl, cli.controller_id)?;
        if node.takeover.is_some() {
            if cli.no_embedded_dataplane {
                return Err(FlagError::new(
                    "takeover",
                    "hands over the embedded node's sockets: it needs the embedded node",
                )
                .into());
            }
            if !matches!(store, StoreSettings::Memory) {
                let why = "needs --store memory: replicas sharing etcd are upgraded one at a time while their nodes follow the others";
                return Err(FlagError::new("takeover", why).into());
            }
        }
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
            tokens: Tokens {
                auth: Token::from_flags("auth-token", cli.auth_token, cli.auth_token_file.as_deref())?,
                node: Token::from_flags("node-token", cli.node_token, cli.node_token_file.as_deref())?,
                admin: Token::from_flags("admin-token", cli.admin_token, cli.admin_token_file.as_deref())?,
            },
            allow_foreign_backends: cli.allow_foreign_backends,
            json_allow: cli
                .json_allow
                .map(|list| list.parse().map_err(|why| FlagError::new("json-allow", why)))
                .transpose()?,
            node_forget_after: cli.node_forget_after,
            fd_shares,
            tls: ServerTls::from_flags(cli.tls_cert.as_deref(), cli.tls_key.as_deref(), cli.client_ca.as_deref())?,
            registry_limits: RegistryLimits {
                registrations_per_source: at_least_one(
                    "max-registrations-per-source",
                    cli.max_registrations_per_source,
                )?,
                backends_per_registration: at_least_one(
                    "max-backends-per-registration",
                    cli.max_backends_per_registration,
                )?,
                services: at_least_one("max-services", cli.max_services)?,
                services_per_source: at_least_one("max-services-per-source", cli.max_services_per_source)?,
            },
            json_idle_timeout: cli.json_idle_timeout,
            door_timeouts: DoorTimeouts { first_request: cli.first_request_timeout, idle: cli.idle_connection_timeout },
            check: cli.check,
            store,
            static_services: Vec::new(),
            source: None,
            load_report_max_age: cli.load_report_max_age,
        })
    }
}

impl Config {
    /// Parses `args` (program name first) with the `--config` file beneath them, as the binary starts.
    pub fn load(args: Vec<OsString>) -> Result<(Cli, Option<ConfigFile>), ParseError> {
        config_file::parse::<Cli>(&args, statics::SECTIONS)
    }

    /// The configuration of `cli`, with the static services of `file` (read from `args`).
    pub fn with_file(cli: Cli, file: Option<ConfigFile>, args: Vec<OsString>) -> Result<Self, ConfigError> {
        let mut config = Config::try_from(cli)?;
        if let Some(file) = file {
            config.static_services = statics::from_file(&file)?;
            config.source = Some(ConfigSource { args, file });
        }
        Ok(config)
    }

    /// Reads the command line and the file of `source` again (SIGHUP).
    pub fn reload(source: &ConfigSource) -> Result<Self, ConfigError> {
        let (cli, file) = Config::load(source.args.clone()).map_err(|e| match e {
            ParseError::File(e) => ConfigError::File(e),
            ParseError::Flags(e) => ConfigError::File(source.file.invalid(e.to_string().trim_end())),
        })?;
        Config::with_file(cli, file, source.args.clone())
    }
}

/// Two of the controller's listeners on one port of overlapping addresses (the same one, or one of them
/// unspecified) cannot both bind: refused before anything is bound, `--check` included.
fn check_listeners_apart(listeners: &[(&'static str, SocketAddr)]) -> Result<(), FlagError> {
    for (i, &(flag, addr)) in listeners.iter().enumerate() {
        for &(other, other_addr) in &listeners[..i] {
            let overlap =
                addr.ip() == other_addr.ip() || addr.ip().is_unspecified() || other_addr.ip().is_unspecified();
            if addr.port() != 0 && addr.port() == other_addr.port() && overlap {
                return Err(FlagError::new(
                    flag,
                    format!("{addr} clashes with --{other} {other_addr}: give each listener its own port"),
                ));
            }
        }
    }
    Ok(())
}

fn at_least_one(flag: &'static str, value: usize) -> Result<usize, FlagError> {
    if value == 0 { Err(FlagError::new(flag, "must be at least 1")) } else { Ok(value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_flag_takes_memory_or_etcd_members() {
        let ttl = Duration::from_secs(10);
        assert_eq!(StoreSettings::from_flags("memory", "/switchboard/v1", ttl, None).unwrap(), StoreSettings::Memory);
        for bad in ["etcd", "etcd://", "http://127.0.0.1:2379", "etcd://127.0.0.1", "etcd://h:1/path"] {
            assert_eq!(
                StoreSettings::from_flags(bad, "/switchboard/v1", ttl, None).unwrap_err().flag,
                "store",
                "{bad}"
            );
        }
        let etcd = StoreSettings::from_flags("etcd://127.0.0.1:2379, 127.0.0.2:2379", "/sb/", ttl, Some("c1".into()));
        let StoreSettings::Etcd { endpoints, prefix, id, .. } = etcd.unwrap() else { panic!("not etcd") };
        assert_eq!((endpoints.len(), prefix.as_str(), id.as_str()), (2, "/sb", "c1"));
        let short = StoreSettings::from_flags("etcd://h:1", "/sb", Duration::from_secs(1), None);
        assert_eq!(short.unwrap_err().flag, "etcd-lease-ttl");
        assert_eq!(StoreSettings::from_flags("etcd://h:1", "sb", ttl, None).unwrap_err().flag, "etcd-prefix");
        assert_eq!(
            StoreSettings::from_flags("etcd://h:1", "/sb", ttl, Some("a/b".into())).unwrap_err().flag,
            "controller-id"
        );
    }

    #[test]
    fn listeners_that_would_clash_are_refused() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let clash =
            check_listeners_apart(&[("json-listen", addr("0.0.0.0:8080")), ("admin-listen", addr("127.0.0.1:8080"))]);
        assert_eq!(clash.unwrap_err().flag, "admin-listen");
        assert!(check_listeners_apart(&[("a", addr("127.0.0.1:8080")), ("b", addr("127.0.0.2:8080"))]).is_ok());
        assert!(check_listeners_apart(&[("a", addr("127.0.0.1:0")), ("b", addr("127.0.0.1:0"))]).is_ok());
        let cli = <Cli as clap::Parser>::parse_from(["controller", "--json-listen", "127.0.0.1:9901"]);
        let refused = Config::try_from(cli).unwrap_err().to_string();
        assert!(
            refused.contains("--admin-listen") && refused.contains("clashes with --json-listen 127.0.0.1:9901"),
            "{refused}"
        );
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

    #[test]
    fn takeover_needs_the_embedded_node_and_the_memory_store() {
        use clap::Parser;
        let flag = |args: &[&str]| match Config::try_from(Cli::parse_from([&["controller"], args].concat())) {
            Err(ConfigError::Flag(error)) => Some(error.flag),
            _ => None,
        };
        assert_eq!(flag(&["--takeover", "/run/sb.sock"]), None);
        assert_eq!(flag(&["--takeover", "/run/sb.sock", "--no-embedded-dataplane"]), Some("takeover"));
        assert_eq!(flag(&["--takeover", "/run/sb.sock", "--store", "etcd://127.0.0.1:2379"]), Some("takeover"));
    }
}
