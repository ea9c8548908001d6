//! What a control-plane run registers, from which source addresses, and how long any step may take.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use contract::{
    auth::Token,
    client,
    v1::{self, Registration},
};

use crate::{cli::ControlPlaneArgs, error::LoadError, target};

/// What to register, from where, and how long any step may take.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) controller: String,
    pub(super) services: usize,
    pub(super) backends: usize,
    pub(super) nodes: usize,
    pub(super) changes: usize,
    pub(super) base_port: u16,
    pub(super) backend_address: Ipv4Addr,
    pub(super) per_stream: usize,
    pub(super) registry_token: Option<Token>,
    pub(super) node_token: Option<Token>,
    pub(super) step: Duration,
}

// === impl Plan ===

impl Plan {
    pub(super) fn from_args(args: &ControlPlaneArgs) -> Result<Plan, LoadError> {
        let config = |why: String| LoadError::Config(why);
        let url = client::controller_url(args.controller.clone(), None).map_err(|e| config(e.to_string()))?;
        if !args.allow_any_target {
            let authority = url.trim_start_matches("http://").trim_end_matches('/');
            let at: SocketAddr = authority
                .parse()
                .map_err(|_| config(format!("--controller {url:?}: give an IP:port (or pass --allow-any-target)")))?;
            target::check_targets(&[at], false)?;
        }
        let ports = usize::from(u16::MAX - args.base_port) + 1;
        if args.services == 0 || args.services > ports {
            return Err(config(format!("--services must be 1..={ports} from --base-port {}", args.base_port)));
        }
        if args.base_port == 0 {
            return Err(config("--base-port must be at least 1".into()));
        }
        if !args.backend_address.is_loopback() {
            return Err(config("--backend-address must be a loopback address (127.0.0.0/8)".into()));
        }
        let addresses = 256 - usize::from(args.backend_address.octets()[3]);
        if args.backends == 0 || args.backends > addresses {
            return Err(config(format!(
                "--backends must be 1..={addresses} from --backend-address {}",
                args.backend_address
            )));
        }
        if args.nodes == 0 || args.nodes > 10_000 {
            return Err(config("--nodes must be 1..=10000".into()));
        }
        if args.changes > 100_000 {
            return Err(config("--changes must be at most 100000".into()));
        }
        if args.backends_per_stream == 0 {
            return Err(config("--backends-per-stream must be at least 1".into()));
        }
        if args.timeout.is_zero() || args.time_limit.is_zero() || args.time_limit > Duration::from_secs(24 * 3600) {
            return Err(config("--timeout and --time-limit must be more than 0 (--time-limit at most 24h)".into()));
        }
        let token = |flag: &str, value: &Option<String>| {
            value.as_deref().map(Token::new).transpose().map_err(|why| config(format!("--{flag}: {why}")))
        };
        Ok(Plan {
            controller: url,
            services: args.services,
            backends: args.backends,
            nodes: args.nodes,
            changes: args.changes,
            base_port: args.base_port,
            backend_address: args.backend_address,
            per_stream: args.backends_per_stream,
            registry_token: token("auth-token", &args.auth_token)?,
            node_token: token("node-token", &args.node_token)?,
            step: args.timeout,
        })
    }

    /// Streams per backend address (the flipped backend's stream aside).
    pub(super) fn chunks(&self) -> usize {
        self.services.div_ceil(self.per_stream)
    }

    /// The stream whose health the changes flip; it holds one backend: the last backend of service 0.
    pub(super) fn flip_stream(&self) -> usize {
        self.backends * self.chunks()
    }

    pub(super) fn streams(&self) -> usize {
        self.flip_stream() + 1
    }

    /// The `Register` stream that registers backend `b` of service `s`.
    pub(super) fn stream_of(&self, s: usize, b: usize) -> usize {
        if (s, b) == (0, self.backends - 1) { self.flip_stream() } else { b * self.chunks() + s / self.per_stream }
    }

    /// The backend address (its source address) of stream `index`.
    pub(super) fn source_of(&self, index: usize) -> usize {
        if index == self.flip_stream() { self.backends - 1 } else { index / self.chunks() }
    }

    pub(super) fn address(&self, b: usize) -> Ipv4Addr {
        // In range: `from_args` checked that the last backend stays in the /24.
        Ipv4Addr::from(u32::from(self.backend_address) + b as u32)
    }

    pub(super) fn port(&self, s: usize) -> u16 {
        // In range: `from_args` checked that the last service's port is at most 65535.
        self.base_port + s as u16
    }

    pub(super) fn backend(&self, s: usize, b: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.address(b)), self.port(s))
    }

    /// Backend `b` of service `s` as an agent registers it: its own address, healthy by its check.
    pub(super) fn registration(&self, s: usize, b: usize) -> Registration {
        Registration {
            service: Some(v1::ServiceKey { protocol: v1::Protocol::Tcp.into(), port: self.port(s).into() }),
            backend_address: self.address(b).to_string(),
            backend_port: 0,
            weight: 1,
            health: None,
            healthy: Some(true),
            algorithm: String::new(),
            proxy_protocol: String::new(),
            accept_proxy: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(services: usize, backends: usize, per_stream: usize) -> Plan {
        Plan {
            controller: "http://127.0.0.1:1".into(),
            services,
            backends,
            nodes: 1,
            changes: 0,
            base_port: 20000,
            backend_address: Ipv4Addr::new(127, 0, 0, 101),
            per_stream,
            registry_token: None,
            node_token: None,
            step: Duration::from_secs(1),
        }
    }

    #[test]
    fn every_stream_holds_at_most_its_share_and_comes_from_its_backend() {
        for (services, backends, per_stream) in [(1000, 10, 250), (200, 10, 250), (7, 1, 3), (5, 2, 1)] {
            let plan = plan(services, backends, per_stream);
            let mut held = vec![0; plan.streams()];
            for s in 0..services {
                for b in 0..backends {
                    let index = plan.stream_of(s, b);
                    held[index] += 1;
                    assert_eq!(plan.source_of(index), b, "{s}/{b}");
                }
            }
            assert!(held.iter().all(|&n| n <= per_stream));
            assert_eq!(held[plan.flip_stream()], 1);
        }
    }

    #[test]
    fn the_controller_must_be_a_test_address() {
        let cli = |url: &str| {
            use clap::Parser as _;
            match crate::cli::Cli::parse_from(["loadgen", "control-plane", "--controller", url]).command {
                crate::cli::Command::ControlPlane(args) => args,
                _ => unreachable!(),
            }
        };
        assert!(Plan::from_args(&cli("http://127.0.0.40:50051")).is_ok());
        assert!(Plan::from_args(&cli("http://8.8.8.8:50051")).is_err());
        assert!(Plan::from_args(&cli("127.0.0.40:50051")).is_err());
    }
}
