//! Address blocks (`--json-allow`): which sources a door lets in.

use std::{fmt, net::IpAddr, str::FromStr};

/// A set of address blocks, e.g. `10.0.0.0/8,127.0.0.1/32,::1/128`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrList(Vec<(IpAddr, u8)>);

// === impl CidrList ===

impl CidrList {
    /// True when `ip` is in one of the blocks (an IPv4 address seen as `::ffff:a.b.c.d` counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|&(net, len)| match (net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix(u128::from(u32::from(net)) << 96, u128::from(u32::from(ip)) << 96, len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix(u128::from(net), u128::from(ip), len),
            _ => false,
        })
    }
}

/// The longest prefix of `ip`'s family.
fn max_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// True when `a` and `b` agree on their first `len` bits.
fn prefix(a: u128, b: u128, len: u8) -> bool {
    len == 0 || (a ^ b) >> (128 - u32::from(len)) == 0
}

impl FromStr for CidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut blocks = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (ip, len) = part.split_once('/').ok_or_else(|| match part.parse::<IpAddr>() {
                // One address: the block of that address alone.
                Ok(ip) => format!("{part:?} is not ADDRESS/LENGTH, e.g. {ip}/{} for that address alone", max_len(ip)),
                Err(_) => format!("{part:?} is not ADDRESS/LENGTH, e.g. 10.0.0.0/8 or ::1/128"),
            })?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{ip:?} in {part:?} is not an IP address, e.g. 10.0.0.0/8 or ::1/128"))?;
            let max = max_len(ip);
            let len = len.parse::<u8>().ok().filter(|&l| l <= max);
            let len = len.ok_or_else(|| format!("the prefix length of {part:?} is not in 0..={max}"))?;
            // Clients are matched in canonical form, so an IPv4-mapped block is matched as IPv4.
            match ip.to_canonical() {
                IpAddr::V4(v4) if ip.is_ipv6() && len >= 96 => blocks.push((IpAddr::V4(v4), len - 96)),
                _ => blocks.push((ip, len)),
            }
        }
        if blocks.is_empty() {
            return Err(
                "no address block given, e.g. 127.0.0.0/8,::1/128 (or 0.0.0.0/0,::/0 for any source)".to_owned()
            );
        }
        Ok(CidrList(blocks))
    }
}

impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (ip, len)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{ip}/{len}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_lists_parse_and_match() {
        let list: CidrList = "127.0.0.0/30, ::1/128".parse().unwrap();
        for ip in ["127.0.0.1", "127.0.0.3", "::1", "::ffff:127.0.0.2"] {
            assert!(list.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.4", "10.0.0.1", "::2"] {
            assert!(!list.contains(ip.parse().unwrap()), "{ip}");
        }
        let mapped: CidrList = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.contains("10.1.2.3".parse().unwrap()) && !mapped.contains("11.0.0.1".parse().unwrap()));
        let all: CidrList = "0.0.0.0/0,::/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()) && all.contains("2001:db8::1".parse().unwrap()));
        assert_eq!(all.to_string(), "0.0.0.0/0,::/0");
        for bad in ["", "127.0.0.1", "127.0.0.1/33", "::1/129", "nowhere/8", "10.0.0.0/x"] {
            assert!(bad.parse::<CidrList>().is_err(), "{bad}");
        }
        // A refusal shows how to write a block.
        let why = |list: &str| list.parse::<CidrList>().unwrap_err();
        assert_eq!(why("10.0.0.1"), r#""10.0.0.1" is not ADDRESS/LENGTH, e.g. 10.0.0.1/32 for that address alone"#);
        assert!(why("::1").ends_with("e.g. ::1/128 for that address alone"), "{}", why("::1"));
        assert!(why("nowhere/8").ends_with("e.g. 10.0.0.0/8 or ::1/128"), "{}", why("nowhere/8"));
        assert!(why("").contains("e.g. 127.0.0.0/8,::1/128"), "{}", why(""));
    }
}
