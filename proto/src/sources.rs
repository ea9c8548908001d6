//! Counts per source address and per network prefix: what caps "per source" and "per /24 or /64" are
//! kept with, for the controller's doors and a node's UDP sessions alike. A flood comes from many addresses
//! of few networks; a cap per prefix bounds what one network can take.

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// The network a client address counts in for caps per prefix: its /24 for IPv4 (an IPv4-mapped IPv6
/// address is IPv4 here, as a dual-stack socket reports IPv4 clients that way) and its /64 for IPv6, the
/// smallest network a site is usually given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefix {
    /// The first three octets of an IPv4 address.
    V4([u8; 3]),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

/// How many units (connections, sessions) each source address and each prefix holds. Addresses are
/// counted in their canonical form: an IPv4-mapped address is its IPv4 address.
#[derive(Debug, Default)]
pub struct SourceCounts {
    sources: HashMap<IpAddr, usize>,
    prefixes: HashMap<Prefix, usize>,
}

// === impl Prefix ===

impl Prefix {
    /// The prefix `ip` counts in.
    pub fn of(ip: IpAddr) -> Prefix {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                Prefix::V4([a, b, c])
            }
            IpAddr::V6(v6) => {
                let [a, b, c, d, ..] = v6.segments();
                Prefix::V6(u64::from(a) << 48 | u64::from(b) << 32 | u64::from(c) << 16 | u64::from(d))
            }
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Prefix::V4([a, b, c]) => write!(f, "{}/24", Ipv4Addr::new(a, b, c, 0)),
            Prefix::V6(bits) => write!(f, "{}/64", Ipv6Addr::from_bits(u128::from(bits) << 64)),
        }
    }
}

// === impl SourceCounts ===

impl SourceCounts {
    /// Units `ip`'s address and `ip`'s prefix hold now.
    pub fn held(&self, ip: IpAddr) -> (usize, usize) {
        let ip = ip.to_canonical();
        let count = |n: Option<&usize>| n.copied().unwrap_or(0);
        (count(self.sources.get(&ip)), count(self.prefixes.get(&Prefix::of(ip))))
    }

    /// One unit more for `ip` and its prefix.
    pub fn take(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        *self.sources.entry(ip).or_insert(0) += 1;
        *self.prefixes.entry(Prefix::of(ip)).or_insert(0) += 1;
    }

    /// One unit less for `ip` and its prefix (taken before with [`SourceCounts::take`]).
    pub fn give_back(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        release(&mut self.sources, ip);
        release(&mut self.prefixes, Prefix::of(ip));
    }

    /// True when no address holds anything.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.prefixes.is_empty()
    }
}

/// One count less for `key`; a key at zero leaves the map, and a map emptied after a flood gives its
/// room back.
fn release<K: Eq + Hash>(counts: &mut HashMap<K, usize>, key: K) {
    if let Some(count) = counts.get_mut(&key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(&key);
            if counts.capacity() > 64 && counts.len() < counts.capacity() / 4 {
                counts.shrink_to(counts.len() * 2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn prefixes_are_the_slash_24_of_ipv4_even_mapped_and_the_slash_64_of_ipv6() {
        assert_eq!(Prefix::of(ip("192.0.2.7")), Prefix::V4([192, 0, 2]));
        assert_eq!(Prefix::of(ip("192.0.2.7")), Prefix::of(ip("192.0.2.250")));
        assert_ne!(Prefix::of(ip("192.0.2.7")), Prefix::of(ip("192.0.3.7")));
        assert_eq!(Prefix::of(ip("::ffff:192.0.2.9")), Prefix::V4([192, 0, 2]), "mapped IPv4 is IPv4");
        assert_eq!(Prefix::of(ip("2001:db8:1:2:aaaa::1")), Prefix::V6(0x2001_0db8_0001_0002));
        assert_eq!(Prefix::of(ip("2001:db8:1:2:aaaa::1")), Prefix::of(ip("2001:db8:1:2:ffff:1:2:3")));
        assert_ne!(Prefix::of(ip("2001:db8:1:2::1")), Prefix::of(ip("2001:db8:1:3::1")));
        // ::1 is not a mapped address: it is IPv6, in ::/64.
        assert_eq!(Prefix::of(ip("::1")), Prefix::V6(0));
        assert_eq!(Prefix::of(ip("198.51.100.20")).to_string(), "198.51.100.0/24");
        assert_eq!(Prefix::of(ip("2001:db8:1:2:aaaa::1")).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn counts_go_back_to_empty_and_mapped_addresses_are_their_ipv4() {
        let mut counts = SourceCounts::default();
        counts.take(ip("192.0.2.7"));
        counts.take(ip("::ffff:192.0.2.7"));
        counts.take(ip("192.0.2.8"));
        assert_eq!(counts.held(ip("192.0.2.7")), (2, 3));
        counts.give_back(ip("192.0.2.7"));
        counts.give_back(ip("::ffff:192.0.2.7"));
        counts.give_back(ip("192.0.2.8"));
        assert_eq!(counts.held(ip("192.0.2.7")), (0, 0));
        assert!(counts.is_empty());
    }

    #[test]
    fn a_flood_leaves_no_entries_behind_and_its_room_is_given_back() {
        let mut counts = SourceCounts::default();
        let flood: Vec<IpAddr> = (0..=255u8).flat_map(|c| [1, 2].map(|d| IpAddr::from([10, 9, c, d]))).collect();
        flood.iter().for_each(|&ip| counts.take(ip));
        assert_eq!(counts.held(ip("10.9.7.1")), (1, 2));
        flood.iter().for_each(|&ip| counts.give_back(ip));
        assert!(counts.is_empty());
        assert!(counts.sources.capacity() <= 64, "room given back: {}", counts.sources.capacity());
        assert!(counts.prefixes.capacity() <= 64, "room given back: {}", counts.prefixes.capacity());
    }
}
