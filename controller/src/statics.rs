//! Static services: the `[[service]]` sections of the configuration file, whose backends need no
//! registration. The controller checks each static backend itself (the agent's checks, with rise and fall),
//! so a static backend that dies leaves rotation like a registered one. [`Statics`] applies a load of the
//! file to the store as one version and keeps one checker per static backend; a reload keeps the checkers
//! (and verdicts) of backends whose check did not change.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use contract::{
    check::{self, Check, Health, Schedule},
    config_file::{ConfigFile, ConfigFileError},
    model::{Algorithm, Protocol, ProxyProtocol, ServiceKey, Weight},
};
use serde::Deserialize;
use tokio::{sync::watch, task::AbortHandle};
use tracing::warn;

use crate::{
    error::StoreError,
    store::{
        Store,
        statics::{StaticBackend, StaticDiff, StaticSpec},
    },
};

/// The file's sections that are not flags.
pub const SECTIONS: &[&str] = &["service"];

/// A static service as the file gives it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticService {
    /// Protocol and port.
    pub key: ServiceKey,
    /// Balancing algorithm.
    pub algorithm: Algorithm,
    /// PROXY protocol toward backends and from clients.
    pub proxy: ProxyProtocol,
    /// Backends and their weights.
    pub backends: BTreeMap<SocketAddr, Weight>,
    /// How each backend is checked.
    pub check: Check,
    /// When, and how many results in a row change a verdict.
    pub schedule: Schedule,
}

/// One `[[service]]` section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServiceSection {
    #[serde(default = "tcp")]
    protocol: String,
    port: u16,
    #[serde(default)]
    algorithm: Option<String>,
    #[serde(default)]
    proxy_protocol: Option<String>,
    #[serde(default)]
    accept_proxy: bool,
    backends: Vec<BackendEntry>,
    #[serde(default)]
    check: Option<String>,
    #[serde(default)]
    expect_status: Option<u16>,
    #[serde(default)]
    expect: Option<String>,
    #[serde(default)]
    check_interval: Option<String>,
    #[serde(default)]
    check_timeout: Option<String>,
    #[serde(default)]
    rise: Option<u32>,
    #[serde(default)]
    fall: Option<u32>,
}

/// A backend as written: `"IP:PORT"`, or `{ address = "IP:PORT", weight = N }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BackendEntry {
    Address(String),
    Weighted {
        address: String,
        #[serde(default = "one")]
        weight: u64,
    },
}

fn tcp() -> String {
    "tcp".to_owned()
}

fn one() -> u64 {
    1
}

/// Defaults of a static backend's checks (HAProxy's `inter 2s`, `rise 2`, `fall 3`).
const DEFAULT_SCHEDULE: Schedule =
    Schedule { interval: Duration::from_secs(2), timeout: Duration::from_secs(1), rise: 2, fall: 3 };

/// Most static services a file may name.
const SERVICES_MAX: usize = 4096;

/// Most backends of one static service.
const BACKENDS_MAX: usize = 1024;

/// The static services of `file`, validated; none when it has no `[[service]]`.
pub fn from_file(file: &ConfigFile) -> Result<Vec<StaticService>, ConfigFileError> {
    let sections: Vec<ServiceSection> = file.section("service")?.unwrap_or_default();
    if sections.len() > SERVICES_MAX {
        return Err(file.invalid(format!("{} services; a file names at most {SERVICES_MAX}", sections.len())));
    }
    let mut services: Vec<StaticService> = Vec::with_capacity(sections.len());
    for (i, section) in sections.into_iter().enumerate() {
        let service = section.validate().map_err(|why| file.invalid(format!("[[service]] #{}: {why}", i + 1)))?;
        if let Some(earlier) = services.iter().position(|s| s.key == service.key) {
            return Err(file.invalid(format!(
                "[[service]] #{}: {} is also service #{}; give each protocol and port once",
                i + 1,
                service.key,
                earlier + 1
            )));
        }
        services.push(service);
    }
    Ok(services)
}

// === impl ServiceSection ===

impl ServiceSection {
    fn validate(self) -> Result<StaticService, String> {
        let protocol: Protocol = self.protocol.parse().map_err(|e| format!("protocol: {e}"))?;
        if self.port == 0 {
            return Err("port: must be in 1..=65535".to_owned());
        }
        let key = ServiceKey { protocol, port: self.port };
        let algorithm = match &self.algorithm {
            Some(name) => name.parse().map_err(|e| format!("algorithm: {e}"))?,
            None => Algorithm::default(),
        };
        let send_v2 = match &self.proxy_protocol {
            Some(name) => ProxyProtocol::parse_send(name).map_err(|e| format!("proxy-protocol: {e}"))?,
            None => false,
        };
        let proxy = ProxyProtocol { send_v2, accept: self.accept_proxy };
        proxy.check(protocol).map_err(|why| format!("accept-proxy: {why}"))?;
        if self.backends.is_empty() {
            return Err("backends: give at least one, e.g. backends = [\"127.0.0.1:9000\"]".to_owned());
        }
        if self.backends.len() > BACKENDS_MAX {
            return Err(format!("backends: {} given, at most {BACKENDS_MAX}", self.backends.len()));
        }
        let check = self.check(protocol)?;
        let mut backends = BTreeMap::new();
        for entry in self.backends {
            let (address, weight) = match entry {
                BackendEntry::Address(address) => (address, 1),
                BackendEntry::Weighted { address, weight } => (address, weight),
            };
            let parsed: SocketAddr = address.parse().map_err(|_| {
                format!("backends: {address:?} is not IP:PORT, e.g. \"127.0.0.1:9000\" or \"[::1]:9000\"")
            })?;
            if parsed.port() == 0 {
                return Err(format!("backends: {address:?} needs a port"));
            }
            let weight = Weight::new(weight).map_err(|e| format!("backends: {address}: weight {e}"))?;
            if backends.insert(parsed, weight).is_some() {
                return Err(format!("backends: {address} is given twice"));
            }
        }
        let duration = |name: &str, value: Option<String>, default: Duration| -> Result<Duration, String> {
            let Some(value) = value else { return Ok(default) };
            let parsed =
                humantime::parse_duration(&value).map_err(|e| format!("{name}: {value:?}: {e}, e.g. \"2s\""))?;
            if parsed.is_zero() {
                return Err(format!("{name}: must be more than zero"));
            }
            Ok(parsed)
        };
        let schedule = Schedule {
            interval: duration("check-interval", self.check_interval, DEFAULT_SCHEDULE.interval)?,
            timeout: duration("check-timeout", self.check_timeout, DEFAULT_SCHEDULE.timeout)?,
            rise: self.rise.unwrap_or(DEFAULT_SCHEDULE.rise),
            fall: self.fall.unwrap_or(DEFAULT_SCHEDULE.fall),
        };
        if schedule.rise == 0 || schedule.fall == 0 {
            return Err("rise and fall: must be at least 1".to_owned());
        }
        Ok(StaticService { key, algorithm, proxy, backends, check, schedule })
    }

    fn check(&self, protocol: Protocol) -> Result<Check, String> {
        let mut check = match &self.check {
            Some(spec) => spec.parse::<Check>().map_err(|e| format!("check: {e}"))?,
            None => Check::default_for(protocol),
        };
        match (&mut check, self.expect_status, &self.expect) {
            (Check::Exec(_), _, _) => {
                return Err("check: exec checks run beside the server; start an agent there for them".to_owned());
            }
            (Check::Http(http), Some(status), None) if (100..600).contains(&status) => http.status = Some(status),
            (Check::Http(_), Some(status), None) => return Err(format!("expect-status: {status} is no HTTP status")),
            (Check::Udp { expect, .. }, None, Some(reply)) if !reply.is_empty() => {
                *expect = Some(reply.as_bytes().to_vec());
            }
            (_, None, None) => {}
            (_, Some(_), _) => return Err("expect-status: only for http checks".to_owned()),
            (_, _, Some(_)) => return Err("expect: only for udp checks, and not empty".to_owned()),
        }
        Ok(check)
    }
}

/// The static backends in force and the checker of each.
#[derive(Debug)]
pub struct Statics {
    store: Arc<Store>,
    checkers: HashMap<(ServiceKey, SocketAddr), Checker>,
}

/// The task that checks one static backend; aborted when dropped.
#[derive(Debug)]
struct Checker {
    check: Check,
    schedule: Schedule,
    task: AbortHandle,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl Statics ===

impl Statics {
    /// No static backend yet.
    pub fn new(store: Arc<Store>) -> Self {
        Statics { store, checkers: HashMap::new() }
    }

    /// Makes `services` the static services, in one version. The first check of every new backend (or of
    /// one whose check changed) runs before, so that version already has it in or out of rotation; the
    /// others keep their verdicts. Refused as a whole, with the running state kept, when the store refuses.
    pub async fn apply(&mut self, services: &[StaticService]) -> Result<StaticDiff, StoreError> {
        let starting: Vec<(ServiceKey, SocketAddr, &StaticService)> = services
            .iter()
            .flat_map(|s| s.backends.keys().map(move |&a| (s.key, a, s)))
            .filter(|(key, address, s)| {
                self.checkers.get(&(*key, *address)).is_none_or(|c| c.check != s.check || c.schedule != s.schedule)
            })
            .collect();
        let firsts =
            futures::future::join_all(starting.iter().map(|(_, address, s)| s.check.run(*address, s.schedule.timeout)))
                .await;
        let first: HashMap<(ServiceKey, SocketAddr), Result<(), String>> =
            starting.iter().map(|(k, a, _)| (*k, *a)).zip(firsts).collect();
        let wanted: BTreeMap<ServiceKey, StaticSpec> = services
            .iter()
            .map(|s| {
                let backends = s
                    .backends
                    .iter()
                    .map(|(&address, &weight)| {
                        let health = first.get(&(s.key, address)).map(Result::is_ok);
                        (address, StaticBackend { weight, health })
                    })
                    .collect();
                (s.key, StaticSpec { algorithm: s.algorithm, proxy: s.proxy, backends })
            })
            .collect();
        let diff = self.store.apply_static(&wanted)?;
        self.checkers.retain(|(key, address), _| wanted.get(key).is_some_and(|s| s.backends.contains_key(address)));
        for (key, address, service) in starting {
            let healthy = first.get(&(key, address)).is_some_and(Result::is_ok);
            if let Some(Err(why)) = first.get(&(key, address)) {
                warn!(service = %key, backend = %address, check = %service.check, %why, "static backend failing its check: out of rotation");
            }
            let (check, schedule) = (service.check.clone(), service.schedule);
            let task =
                tokio::spawn(watch_backend(Arc::clone(&self.store), key, address, check.clone(), schedule, healthy));
            let checker = Checker { check, schedule, task: task.abort_handle() };
            self.checkers.insert((key, address), checker);
        }
        Ok(diff)
    }
}

/// Checks one static backend until aborted and records each change of verdict in the store.
async fn watch_backend(
    store: Arc<Store>,
    key: ServiceKey,
    address: SocketAddr,
    check: Check,
    schedule: Schedule,
    healthy: bool,
) {
    let (verdict_tx, mut verdict) = watch::channel(healthy);
    let health = Health::new(healthy, schedule.rise, schedule.fall);
    let label = format!("{key} {address}");
    let follow = check::follow(check, address, schedule, health, verdict_tx, label);
    let record = async {
        while verdict.changed().await.is_ok() {
            let healthy = *verdict.borrow_and_update();
            // Refused only by a broken invariant, which the store has logged.
            let _ = store.set_static_healthy(key, address, healthy);
        }
    };
    tokio::select! {
        () = follow => {}
        () = record => {}
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn services(text: &str) -> Result<Vec<StaticService>, String> {
        let file = ConfigFile::parse(Path::new("c.toml"), text).map_err(|e| e.to_string())?;
        from_file(&file).map_err(|e| e.to_string())
    }

    #[test]
    fn static_services_parse_with_defaults() {
        let parsed = services(
            r#"
            [[service]]
            port = 8443
            backends = ["127.0.0.1:9001", { address = "[::1]:9002", weight = 3 }]

            [[service]]
            protocol = "udp"
            port = 5353
            algorithm = "source_hash"
            check = "udp:ping"
            expect = "pong"
            check-interval = "500ms"
            rise = 1
            fall = 1
            backends = ["127.0.0.1:5300"]

            [[service]]
            port = 80
            check = "http:/health"
            expect-status = 204
            proxy-protocol = "v2"
            accept-proxy = true
            backends = ["127.0.0.1:8080"]
            "#,
        )
        .unwrap();
        assert_eq!(parsed.len(), 3);
        let web = &parsed[0];
        assert_eq!(
            (web.key.to_string(), web.algorithm, web.check.clone()),
            ("tcp:8443".into(), Algorithm::RoundRobin, Check::Tcp)
        );
        assert_eq!(web.schedule, DEFAULT_SCHEDULE);
        assert_eq!(web.backends.values().map(|w| w.get()).collect::<Vec<_>>(), [1, 3]);
        let dns = &parsed[1];
        assert_eq!(dns.check, Check::Udp { send: b"ping".to_vec(), expect: Some(b"pong".to_vec()) });
        assert_eq!(
            (dns.schedule.interval, dns.schedule.rise, dns.algorithm),
            (Duration::from_millis(500), 1, Algorithm::SourceHash)
        );
        assert_eq!(parsed[2].check.to_string(), "http:/health (expect 204)");
        assert_eq!(parsed[2].proxy, ProxyProtocol { send_v2: true, accept: true });
        assert_eq!(parsed[0].proxy, ProxyProtocol::default());
        assert_eq!(services("print-state = true\n").unwrap(), vec![], "no section, no static service");
    }

    #[test]
    fn bad_sections_say_which_and_why() {
        let cases = [
            ("[[service]]\nport = 80\nbackends = []\n", "#1: backends: give at least one"),
            ("[[service]]\nport = 80\nbackends = [\"localhost:80\"]\n", "is not IP:PORT"),
            ("[[service]]\nport = 80\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n", "given twice"),
            ("[[service]]\nport = 80\nbackends = [{ address = \"127.0.0.1:1\", weight = 0 }]\n", "weight 0 is not in"),
            ("[[service]]\nport = 0\nbackends = [\"127.0.0.1:1\"]\n", "port: must be in"),
            ("[[service]]\nprotocol = \"sctp\"\nport = 1\nbackends = [\"127.0.0.1:1\"]\n", "unknown protocol"),
            ("[[service]]\nport = 1\nalgorithm = \"fastest\"\nbackends = [\"127.0.0.1:1\"]\n", "unknown algorithm"),
            ("[[service]]\nport = 1\ncheck = \"exec:true\"\nbackends = [\"127.0.0.1:1\"]\n", "start an agent"),
            ("[[service]]\nport = 1\nexpect-status = 200\nbackends = [\"127.0.0.1:1\"]\n", "only for http"),
            ("[[service]]\nport = 1\ncheck-interval = \"soon\"\nbackends = [\"127.0.0.1:1\"]\n", "check-interval"),
            ("[[service]]\nport = 1\nfall = 0\nbackends = [\"127.0.0.1:1\"]\n", "at least 1"),
            (
                "[[service]]\nport = 1\nproxy-protocol = \"v1\"\nbackends = [\"127.0.0.1:1\"]\n",
                "unknown proxy protocol",
            ),
            (
                "[[service]]\nprotocol = \"udp\"\nport = 1\naccept-proxy = true\nbackends = [\"127.0.0.1:1\"]\n",
                "for TCP services only",
            ),
            ("[[service]]\nport = 1\nbackend = [\"127.0.0.1:1\"]\n", "unknown field `backend`"),
            (
                "[[service]]\nport = 1\nbackends = [\"127.0.0.1:1\"]\n[[service]]\nport = 1\nbackends = [\"127.0.0.1:2\"]\n",
                "#2: tcp:1 is also service #1",
            ),
        ];
        for (text, expected) in cases {
            let error = services(text).unwrap_err();
            assert!(error.contains(expected) && error.starts_with("c.toml"), "{text}: {error}");
        }
    }
}
