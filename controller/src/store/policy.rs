//! What the store lets clients make it hold: the ports services may use and the bounds on registrations.
//! The configuration builds these from flags; the store checks every change against them.

use std::{fmt, str::FromStr};

use crate::error::ConfigError;

/// Bounds on what clients may make the store hold, each refused with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    /// Live registrations from one source address.
    pub registrations_per_source: usize,
    /// Backends one registration may hold.
    pub backends_per_registration: usize,
    /// Services (frontends on every node) in total.
    pub services: usize,
    /// Services the registrations of one source address may create.
    pub services_per_source: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            registrations_per_source: 64,
            backends_per_registration: 256,
            services: 4096,
            services_per_source: 256,
        }
    }
}

/// A set of port ranges, e.g. `80,8000-8999`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRanges(Vec<(u16, u16)>);

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
        let refused = "8000-80".parse::<PortRanges>().unwrap_err().to_string();
        assert!(refused.ends_with("e.g. 80,8000-8999"), "{refused}");
    }
}
