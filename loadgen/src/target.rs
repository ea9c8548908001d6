//! Targets: where load may go, and how requests are shared between several targets.
//!
//! Load is bounded by construction: by default only loopback addresses and the private ranges of test
//! networks are accepted, so a typo cannot aim a load test at somebody else's machine.

use std::net::{IpAddr, SocketAddr};

use crate::error::LoadError;

/// True for 127.0.0.0/8, ::1, and the private ranges test namespaces use (10/8, 172.16/12, 192.168/16,
/// fc00::/7).
pub fn is_test_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Checks every target unless `allow_any`.
pub fn check_targets(targets: &[SocketAddr], allow_any: bool) -> Result<(), LoadError> {
    if targets.is_empty() {
        return Err(LoadError::Config("at least one --target is needed".into()));
    }
    match targets.iter().find(|t| !allow_any && !is_test_address(t.ip())) {
        Some(t) => Err(LoadError::Config(format!(
            "target {t} is not a loopback or private test address (pass --allow-any-target if you mean it)"
        ))),
        None => Ok(()),
    }
}

/// Per-target shares, e.g. `--split 80,20`; `None` means equal shares.
pub fn parse_split(split: Option<&str>, targets: usize) -> Result<Vec<u32>, LoadError> {
    let Some(split) = split else { return Ok(vec![1; targets]) };
    let shares: Vec<u32> = split
        .split(',')
        .map(|s| s.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| LoadError::Config(format!("--split {split:?} is not a list of whole numbers")))?;
    if shares.len() != targets {
        return Err(LoadError::Config(format!("--split has {} shares for {targets} targets", shares.len())));
    }
    if shares.iter().all(|&s| s == 0) {
        return Err(LoadError::Config("--split needs at least one non-zero share".into()));
    }
    Ok(shares)
}

/// Smooth weighted round robin over targets (nginx's algorithm): deterministic, and the shares hold over
/// any window, not just in the long run.
#[derive(Debug, Clone)]
pub struct Splitter {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl Splitter {
    /// A splitter over `shares`.
    pub fn new(shares: &[u32]) -> Self {
        let weights: Vec<i64> = shares.iter().map(|&s| i64::from(s)).collect();
        Splitter { total: weights.iter().sum(), current: vec![0; weights.len()], weights }
    }

    /// The target of the next request.
    pub fn next_target(&mut self) -> usize {
        let mut best = 0;
        for i in 0..self.weights.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        best
    }

    /// How `lanes` connections are shared out, every target with a non-zero share getting at least one.
    pub fn lanes(shares: &[u32], lanes: usize) -> Vec<usize> {
        let total: u64 = shares.iter().map(|&s| u64::from(s)).sum();
        shares
            .iter()
            .map(|&s| {
                if s == 0 {
                    0
                } else {
                    let share = (lanes as u64 * u64::from(s) / total.max(1)) as usize;
                    share.max(1)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_test_addresses_unless_allowed() {
        for ok in ["127.0.0.1:80", "127.9.9.9:1", "[::1]:80", "10.231.1.2:80", "192.168.1.1:80", "172.20.0.1:80"] {
            assert!(check_targets(&[ok.parse().unwrap()], false).is_ok(), "{ok}");
        }
        for bad in ["8.8.8.8:53", "[2001:db8::1]:80", "172.32.0.1:80"] {
            assert!(check_targets(&[bad.parse().unwrap()], false).is_err(), "{bad}");
            assert!(check_targets(&[bad.parse().unwrap()], true).is_ok(), "{bad}");
        }
    }

    #[test]
    fn split_shares_hold_in_every_window() {
        let mut s = Splitter::new(&[80, 20]);
        let picks: Vec<usize> = (0..100).map(|_| s.next_target()).collect();
        assert_eq!(picks.iter().filter(|&&t| t == 0).count(), 80);
        for window in picks.chunks(10) {
            assert_eq!(window.iter().filter(|&&t| t == 1).count(), 2, "{window:?}");
        }
        assert_eq!(Splitter::lanes(&[80, 20], 10), [8, 2]);
        assert_eq!(Splitter::lanes(&[99, 1], 10), [9, 1], "every target gets a lane");
        assert!(parse_split(Some("1,2,3"), 2).is_err());
        assert!(parse_split(Some("a,b"), 2).is_err());
    }
}
