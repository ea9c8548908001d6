//! Command-line flags of `agent`, and the validated [`AgentConfig`] built from them.

use std::{fmt, net::IpAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::Parser;
use contract::model::{Algorithm, Protocol, ProxyProtocol, ServiceAsk, ServiceKey, Weight};

use contract::{auth::Token, client::ClientTls, process::FlagError};

use crate::{
    check::{self, Check},
    load::LoadSource,
};

/// Switchboard agent: registers the server beside it with the controller and reports its local health
/// checks, so a dead server leaves rotation while the agent lives.
#[derive(Debug, Clone, Parser)]
#[command(name = "agent", version = contract::build::VERSION, about, args_override_self = true)]
pub struct Cli {
    /// Log format and filter.
    #[command(flatten)]
    pub log: contract::process::LogArgs,

    /// gRPC URL of the controller, or several separated by commas: the server is registered through one
    /// at a time, and through the next when that one is lost.
    #[arg(long, env = "SWITCHBOARD_CONTROLLER", default_value = "http://127.0.0.1:50051", value_name = "URL[,URL...]")]
    pub controller: String,

    /// Protocol of the service: tcp or udp.
    #[arg(long, env = "SWITCHBOARD_PROTOCOL")]
    pub protocol: Option<String>,

    /// Public port of the service on the nodes.
    #[arg(long, env = "SWITCHBOARD_PORT")]
    pub port: Option<u16>,

    /// A service to register, `PROTOCOL:PORT[:BACKEND_PORT]`; repeat for several. Replaces --protocol and
    /// --port.
    #[arg(long = "service", value_name = "PROTOCOL:PORT[:BACKEND_PORT]")]
    pub services: Vec<String>,

    /// Address of the server (default: the address the controller sees the agent connect from). Local
    /// checks go to this address, or to 127.0.0.1 when it is not given.
    #[arg(long, env = "SWITCHBOARD_BACKEND_ADDRESS", value_parser = contract::addr::ip_addr)]
    pub backend_address: Option<IpAddr>,

    /// Port the server listens on (default: --port).
    #[arg(long, env = "SWITCHBOARD_BACKEND_PORT")]
    pub backend_port: Option<u16>,

    /// Relative weight of the server, 1..=10000.
    #[arg(long, env = "SWITCHBOARD_WEIGHT", default_value_t = 1)]
    pub weight: u32,

    /// Balancing algorithm to ask for (the first registration of a service sets it): round_robin,
    /// weighted_round_robin, least_connections, random, power_of_two, source_hash, least_load.
    #[arg(long, env = "SWITCHBOARD_ALGORITHM")]
    pub algorithm: Option<String>,

    /// PROXY protocol header the balancer sends the server before each connection (UDP: datagram), so it
    /// learns the client's address: v2 or none. Like the algorithm, the first registration sets it.
    #[arg(long, env = "SWITCHBOARD_PROXY_PROTOCOL", value_name = "v2|none")]
    pub proxy_protocol: Option<String>,

    /// TCP: the balancer stands behind another one, whose connections start with a PROXY v1 or v2 header
    /// carrying the client's address.
    #[arg(long, env = "SWITCHBOARD_ACCEPT_PROXY")]
    pub accept_proxy: bool,

    /// Send the server's load with each hello answer, for the controller's `least_load`: the host's CPU
    /// and memory use, or the --cgroup's, or the number --load-command prints.
    #[arg(long, env = "SWITCHBOARD_REPORT_LOAD")]
    pub report_load: bool,

    /// With --report-load: measure this cgroup (v2 directory, e.g. /sys/fs/cgroup/system.slice/nginx.service)
    /// instead of the host.
    #[arg(long, env = "SWITCHBOARD_CGROUP", value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// With --report-load: `sh -c COMMAND` prints the load (1.0 = fully loaded), for servers that know better;
    /// it gets --check-timeout, and runs every --check-interval.
    #[arg(long, env = "SWITCHBOARD_LOAD_COMMAND", value_name = "COMMAND")]
    pub load_command: Option<String>,

    /// Local check: tcp (default for TCP), udp:PAYLOAD, http:/PATH (on the backend), http://IP:PORT/PATH (elsewhere),
    /// exec:COMMAND, none (default for UDP).
    #[arg(long, env = "SWITCHBOARD_CHECK")]
    pub check: Option<String>,

    /// Time between two local checks.
    #[arg(long, env = "SWITCHBOARD_CHECK_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub check_interval: Duration,

    /// Time one check may take.
    #[arg(long, env = "SWITCHBOARD_CHECK_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub check_timeout: Duration,

    /// Good checks in a row that put an unhealthy server back in rotation.
    #[arg(long, env = "SWITCHBOARD_RISE", default_value_t = 2)]
    pub rise: u32,

    /// Failed checks in a row that take a healthy server out of rotation.
    #[arg(long, env = "SWITCHBOARD_FALL", default_value_t = 3)]
    pub fall: u32,

    /// Give up (exit 1) when the controller cannot be reached for this long at startup; once registered,
    /// the agent retries for ever.
    #[arg(long, env = "SWITCHBOARD_STARTUP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub startup_timeout: Duration,

    /// Longest wait between two attempts to reach the controller.
    #[arg(long, env = "SWITCHBOARD_BACKOFF_MAX", default_value = "5s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,

    /// How long to wait for the controller to confirm the deregistration on SIGTERM/SIGINT.
    #[arg(long, env = "SWITCHBOARD_DEREGISTER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub deregister_timeout: Duration,

    /// Bearer token presented to the controller (its --auth-token).
    #[arg(long, env = "SWITCHBOARD_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// File whose first line is the --auth-token (keeps it out of `ps`).
    #[arg(long, env = "SWITCHBOARD_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// PEM file of the authority that signed the controller's certificate (an https:// --controller).
    #[arg(long, env = "SWITCHBOARD_CA")]
    pub ca: Option<PathBuf>,
}

/// One service to register the server in, and the port the server listens on for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentService {
    /// The service: protocol and public port on the nodes.
    pub key: ServiceKey,
    /// Port the server listens on.
    pub backend_port: u16,
}

/// The validated configuration of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// gRPC URLs of the controllers, in order (at least one).
    pub controllers: Vec<String>,
    /// At least one.
    pub services: Vec<AgentService>,
    /// The server's address, if not the one the controller sees.
    pub backend_address: Option<IpAddr>,
    /// Relative weight.
    pub weight: Weight,
    /// Algorithm and PROXY protocol to ask for.
    pub ask: ServiceAsk,
    /// Where the load reported with each hello answer comes from (none: no report).
    pub load_source: Option<LoadSource>,
    /// The check, per protocol default when not given.
    pub check: Option<Check>,
    /// Time between checks.
    pub check_interval: Duration,
    /// Time one check may take.
    pub check_timeout: Duration,
    /// Good checks in a row to come back.
    pub rise: u32,
    /// Failed checks in a row to leave.
    pub fall: u32,
    /// How long to try at startup.
    pub startup_timeout: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Bound on the deregistration at shutdown.
    pub deregister_timeout: Duration,
    /// Presented on every call.
    pub token: Option<Token>,
    /// TLS towards an https:// controller.
    pub tls: Option<ClientTls>,
}

// === impl AgentConfig ===

impl TryFrom<Cli> for AgentConfig {
    type Error = FlagError;

    fn try_from(cli: Cli) -> Result<Self, Self::Error> {
        let tls = ClientTls::from_flags(cli.ca.as_deref(), None, None)?;
        let controllers = contract::client::controller_urls(&cli.controller, tls.as_ref())?;
        let services = match (&cli.protocol, cli.port, cli.services.is_empty()) {
            (Some(protocol), Some(port), true) => {
                let protocol: Protocol = protocol.parse().map_err(|e| FlagError::new("protocol", format!("{e}")))?;
                let port = nonzero("port", port)?;
                let backend_port = nonzero("backend-port", cli.backend_port.unwrap_or(port))?;
                vec![AgentService { key: ServiceKey { protocol, port }, backend_port }]
            }
            (None, None, false) => {
                if cli.backend_port.is_some() {
                    return Err(FlagError::new("backend-port", "goes with --port; give it in --service instead"));
                }
                cli.services
                    .iter()
                    .map(|s| s.parse().map_err(|why| FlagError::new("service", why)))
                    .collect::<Result<_, _>>()?
            }
            (_, _, false) => {
                return Err(FlagError::new("service", "replaces --protocol and --port; give one or the other"));
            }
            _ => return Err(FlagError::new("protocol/--port", "both are needed (or use --service PROTOCOL:PORT)")),
        };
        let check = cli.check.as_deref().map(str::parse).transpose().map_err(|why| FlagError::new("check", why))?;
        let weight = Weight::new(cli.weight.into()).map_err(|e| FlagError::new("weight", e.to_string()))?;
        let algorithm = cli
            .algorithm
            .as_deref()
            .map(str::parse::<Algorithm>)
            .transpose()
            .map_err(|e| FlagError::new("algorithm", format!("{e}")))?;
        let send_v2 = cli
            .proxy_protocol
            .as_deref()
            .map(ProxyProtocol::parse_send)
            .transpose()
            .map_err(|e| FlagError::new("proxy-protocol", e.to_string()))?;
        let proxy = (send_v2.is_some() || cli.accept_proxy)
            .then(|| ProxyProtocol { send_v2: send_v2.unwrap_or(false), accept: cli.accept_proxy });
        if let Some(proxy) = proxy {
            for service in &services {
                proxy.check(service.key.protocol).map_err(|why| FlagError::new("accept-proxy", why))?;
            }
        }
        let load_source = match (cli.report_load, cli.cgroup, cli.load_command) {
            (false, None, None) => None,
            (false, _, _) => return Err(FlagError::new("report-load", "--cgroup and --load-command need it")),
            (true, Some(_), Some(_)) => {
                return Err(FlagError::new("cgroup", "give --cgroup or --load-command, not both"));
            }
            (true, Some(dir), None) => {
                if !dir.join("cpu.stat").is_file() {
                    return Err(FlagError::new(
                        "cgroup",
                        format!("{} has no cpu.stat: give a cgroup v2 directory", dir.display()),
                    ));
                }
                Some(LoadSource::Cgroup(dir))
            }
            (true, None, Some(command)) if command.trim().is_empty() => {
                return Err(FlagError::new("load-command", "is empty"));
            }
            (true, None, Some(command)) => Some(LoadSource::Command(command)),
            (true, None, None) => Some(LoadSource::Host),
        };
        if cli.rise == 0 || cli.fall == 0 {
            return Err(FlagError::new("rise/--fall", "must be at least 1"));
        }
        FlagError::require_positive(&[
            ("check-interval", cli.check_interval),
            ("check-timeout", cli.check_timeout),
            ("backoff-max", cli.backoff_max),
            ("deregister-timeout", cli.deregister_timeout),
        ])?;
        Ok(AgentConfig {
            controllers,
            services,
            backend_address: cli.backend_address,
            weight,
            ask: ServiceAsk { algorithm, proxy },
            load_source,
            check,
            check_interval: cli.check_interval,
            check_timeout: cli.check_timeout,
            rise: cli.rise,
            fall: cli.fall,
            startup_timeout: cli.startup_timeout,
            backoff_max: cli.backoff_max,
            deregister_timeout: cli.deregister_timeout,
            token: Token::from_flags("auth-token", cli.auth_token, cli.auth_token_file.as_deref())?,
            tls,
        })
    }
}

impl AgentConfig {
    /// The check of `service`: the configured one, or tcp for TCP and none for UDP.
    pub fn check_for(&self, service: &AgentService) -> Check {
        self.check.clone().unwrap_or_else(|| Check::default_for(service.key.protocol))
    }

    /// When checks run and how many results in a row change the verdict.
    pub fn schedule(&self) -> check::Schedule {
        check::Schedule { interval: self.check_interval, timeout: self.check_timeout, rise: self.rise, fall: self.fall }
    }
}

fn nonzero(flag: &'static str, port: u16) -> Result<u16, FlagError> {
    if port == 0 { Err(FlagError::new(flag, "must be a port in 1..=65535")) } else { Ok(port) }
}

// === impl AgentService ===

impl FromStr for AgentService {
    type Err = String;

    /// `tcp:80` or `tcp:80:8080`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let (Some(protocol), Some(port)) = (parts.next(), parts.next()) else {
            return Err(format!("{s:?} is not PROTOCOL:PORT[:BACKEND_PORT]"));
        };
        let port_of = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} in {s:?} is not a port in 1..=65535")),
            Ok(p) => Ok(p),
        };
        let port = port_of(port)?;
        let backend_port = parts.next().map(port_of).transpose()?.unwrap_or(port);
        if parts.next().is_some() {
            return Err(format!("{s:?} is not PROTOCOL:PORT[:BACKEND_PORT]"));
        }
        let protocol: Protocol = protocol.parse().map_err(|e| format!("{e}"))?;
        Ok(AgentService { key: ServiceKey { protocol, port }, backend_port })
    }
}

impl fmt::Display for AgentService {
    /// `tcp:80`: the service.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.key.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<AgentConfig, FlagError> {
        AgentConfig::try_from(Cli::try_parse_from([&["agent"], args].concat()).unwrap())
    }

    #[test]
    fn protocol_and_port_or_services() {
        let c = config(&["--protocol", "tcp", "--port", "80"]).unwrap();
        assert_eq!(c.services, [AgentService { key: ServiceKey::tcp(80), backend_port: 80 }]);
        assert_eq!(c.check_for(&c.services[0]), Check::Tcp);
        let c = config(&["--service", "tcp:80:8080", "--service", "UDP:53"]).unwrap();
        assert_eq!(c.services[0].backend_port, 8080);
        assert_eq!(c.services[1], AgentService { key: ServiceKey::udp(53), backend_port: 53 });
        assert_eq!(c.check_for(&c.services[1]), Check::None);
    }

    #[test]
    fn bad_input_names_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--protocol", "tcp", "--port", "0"], "port"),
            (&["--protocol", "sctp", "--port", "80"], "protocol"),
            (&["--protocol", "tcp"], "protocol/--port"),
            (&["--protocol", "tcp", "--port", "80", "--check", "http:"], "check"),
            (&["--protocol", "tcp", "--port", "80", "--service", "tcp:81"], "service"),
            (&["--service", "tcp:0"], "service"),
            (&["--service", "tcp:80:9:9"], "service"),
            (&["--protocol", "tcp", "--port", "80", "--weight", "0"], "weight"),
            (&["--protocol", "tcp", "--port", "80", "--controller", "localhost:50051"], "controller"),
            (&["--protocol", "tcp", "--port", "80", "--rise", "0"], "rise/--fall"),
        ];
        for (args, flag) in cases {
            assert_eq!(config(args).unwrap_err().flag, *flag, "{args:?}");
        }
        assert_eq!(
            config(&["--protocol", "tcp", "--port", "80", "--check", "http:"]).unwrap_err().to_string(),
            "invalid --check: an HTTP check needs a path, e.g. http:/health, or a whole URL, e.g. http://127.0.0.1:8080/health"
        );
        // A URL is where the check goes (not a path on the agent's own address); a name is refused.
        let c = config(&["--protocol", "tcp", "--port", "80", "--check", "http://127.0.0.2:8080/up"]).unwrap();
        assert_eq!(c.check.map(|c| c.to_string()).as_deref(), Some("http://127.0.0.2:8080/up"));
        let refused = config(&["--protocol", "tcp", "--port", "80", "--check", "http://db.internal/up"]).unwrap_err();
        assert!(refused.to_string().contains("must be an IP address"), "{refused}");
    }
}
