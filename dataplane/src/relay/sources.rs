//! Caps on the UDP sessions one frontend keeps per client address and per network prefix (a /24 for
//! IPv4, a /64 for IPv6), across all the frontend's workers.
//!
//! A spoofed flood comes from many addresses of few networks, and each new address would open a session:
//! the frontend's bound alone (`--udp-max-sessions`) lets one network take the whole table from every
//! other. With these caps a network holds at most its share, and clients elsewhere still get in.
//!
//! The counts sit behind one lock per frontend, taken only when a session opens (or is refused) and when
//! it ends, never for a datagram of a session that exists. A [`SourceSlot`] gives its counts back on drop,
//! like a [`contract::limit::Permit`].

use std::{
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use contract::{
    limit::{Throttle, WARN_EVERY},
    sources::{Prefix, SourceCounts},
};
use tokio::time::Instant;

use crate::metrics::Dropped;

/// Per-source and per-prefix caps of one frontend, shared by its workers.
#[derive(Debug)]
pub struct SourceCaps {
    per_source: usize,
    per_prefix: usize,
    /// A std mutex: held for a few map operations, never across an `.await`.
    held: Mutex<Held>,
}

#[derive(Debug)]
struct Held {
    /// Sessions per client address and per prefix.
    counts: SourceCounts,
    /// Refusals are logged at most once per interval for the whole frontend.
    warnings: Throttle,
}

/// One session's place under the caps of its client address and prefix, given back on drop.
#[derive(Debug)]
pub struct SourceSlot {
    caps: Arc<SourceCaps>,
    source: IpAddr,
}

/// Why a new session was refused, and whether the refusal is due to be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapReached {
    /// The cap the session would have gone past.
    pub cap: Cap,
    /// `Some(refusals held back since the last one logged)` when this one may be logged now.
    pub warn: Option<u64>,
}

/// The cap a refused session met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// The client address holds `--udp-max-sessions-per-source` sessions.
    Source {
        /// The client address.
        source: IpAddr,
        /// The cap.
        max: usize,
    },
    /// The client's prefix holds `--udp-max-sessions-per-prefix` sessions.
    Prefix {
        /// The prefix.
        prefix: Prefix,
        /// The cap.
        max: usize,
    },
}

// === impl SourceCaps ===

impl SourceCaps {
    /// At most `per_source` sessions per client address and `per_prefix` per prefix.
    pub fn new(per_source: usize, per_prefix: usize) -> Arc<Self> {
        Arc::new(SourceCaps {
            per_source,
            per_prefix,
            held: Mutex::new(Held { counts: SourceCounts::default(), warnings: Throttle::new(WARN_EVERY) }),
        })
    }

    /// A place for one more session of `ip`, if neither its address nor its prefix is at its cap; a
    /// refusal at `now` says whether it is due to be logged.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<SourceSlot, CapReached> {
        let source = ip.to_canonical();
        let prefix = Prefix::of(source);
        let mut held = self.lock();
        let (by_source, by_prefix) = held.counts.held(source);
        let cap = if by_source >= self.per_source {
            Some(Cap::Source { source, max: self.per_source })
        } else if by_prefix >= self.per_prefix {
            Some(Cap::Prefix { prefix, max: self.per_prefix })
        } else {
            None
        };
        if let Some(cap) = cap {
            return Err(CapReached { cap, warn: held.warnings.admit(now) });
        }
        held.counts.take(source);
        Ok(SourceSlot { caps: Arc::clone(self), source })
    }

    /// Sessions `ip`'s address and `ip`'s prefix hold now.
    #[cfg(test)]
    pub fn held(&self, ip: IpAddr) -> (usize, usize) {
        self.lock().counts.held(ip)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // The counts stay consistent whatever panicked: each change is one map operation.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.caps.lock().counts.give_back(self.source);
    }
}

// === impl Cap ===

impl Cap {
    /// The reason a datagram it refused is counted under.
    pub fn dropped(self) -> Dropped {
        match self {
            Cap::Source { .. } => Dropped::SourceLimit,
            Cap::Prefix { .. } => Dropped::PrefixLimit,
        }
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cap::Source { source, max } => {
                write!(f, "source {source} holds {max} sessions (--udp-max-sessions-per-source)")
            }
            Cap::Prefix { prefix, max } => {
                write!(f, "prefix {prefix} holds {max} sessions (--udp-max-sessions-per-prefix)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_and_a_prefix_hold_at_most_their_caps_and_get_slots_back_on_drop() {
        let caps = SourceCaps::new(2, 3);
        let now = Instant::now();
        let a1 = caps.try_take(ip("10.1.1.1"), now).unwrap();
        let _a2 = caps.try_take(ip("10.1.1.1"), now).unwrap();
        let refused = caps.try_take(ip("10.1.1.1"), now).unwrap_err();
        assert_eq!(refused.cap, Cap::Source { source: ip("10.1.1.1"), max: 2 });
        assert_eq!(refused.cap.dropped(), Dropped::SourceLimit);
        assert_eq!(refused.warn, Some(0), "the first refusal is logged");
        let _b1 = caps.try_take(ip("10.1.1.2"), now).unwrap();
        let refused = caps.try_take(ip("10.1.1.3"), now).unwrap_err();
        assert_eq!(refused.cap, Cap::Prefix { prefix: Prefix::V4([10, 1, 1]), max: 3 });
        assert_eq!(refused.cap.dropped(), Dropped::PrefixLimit);
        assert_eq!(refused.warn, None, "one log line per interval");
        assert_eq!(caps.held(ip("10.1.1.1")), (2, 3));
        // Another prefix has its own count; a mapped address of this one counts in it.
        let _c = caps.try_take(ip("10.1.2.1"), now).unwrap();
        assert!(caps.try_take(ip("::ffff:10.1.1.4"), now).is_err());
        // A session ends: its address and prefix get their slot back.
        drop(a1);
        assert_eq!(caps.held(ip("10.1.1.1")), (1, 2));
        let mapped = caps.try_take(ip("::ffff:10.1.1.1"), now).unwrap();
        assert_eq!(caps.held(ip("10.1.1.1")), (2, 3), "the mapped address is the same source");
        drop(mapped);
        let later = caps.try_take(ip("10.1.1.9"), now + Duration::from_secs(10));
        assert!(later.is_ok());
        let refused = caps.try_take(ip("10.1.1.10"), now + Duration::from_secs(10)).unwrap_err();
        assert_eq!(refused.warn, Some(2), "the next log line says how many were held back");
    }

    #[test]
    fn ipv6_sources_count_per_slash_64() {
        let caps = SourceCaps::new(1, 2);
        let now = Instant::now();
        let _a = caps.try_take(ip("2001:db8::1"), now).unwrap();
        assert!(matches!(caps.try_take(ip("2001:db8::1"), now).unwrap_err().cap, Cap::Source { .. }));
        let _b = caps.try_take(ip("2001:db8::2"), now).unwrap();
        let refused = caps.try_take(ip("2001:db8::ffff:3"), now).unwrap_err();
        assert_eq!(refused.cap.to_string(), "prefix 2001:db8::/64 holds 2 sessions (--udp-max-sessions-per-prefix)");
        assert!(caps.try_take(ip("2001:db8:0:1::3"), now).is_ok(), "the next /64 is another prefix");
    }

    #[test]
    fn the_counts_leave_no_entries_behind_after_a_flood() {
        let caps = SourceCaps::new(1, 1_000);
        let now = Instant::now();
        let slots: Vec<_> = (0..=255u8)
            .flat_map(|c| [1, 2].map(|d| caps.try_take(IpAddr::from([10, 9, c, d]), now).unwrap()))
            .collect();
        assert_eq!(caps.held(ip("10.9.7.1")), (1, 2));
        drop(slots);
        assert!(caps.lock().counts.is_empty(), "no entry left behind (the room given back: contract::sources)");
    }
}
