//! Balancing: which backend of a service takes the next connection.
//!
//! A [`Balancer`] is built once per routing table and is immutable apart from atomics, so picking needs no
//! lock. The pick is a starting index: the TCP relay walks on from it when a backend refuses, so one pick
//! order serves both the first choice and the retries.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::snapshot::Algorithm;

/// The balancing state of one service in one routing table.
#[derive(Debug)]
pub enum Balancer {
    /// See [`RoundRobin`].
    RoundRobin(RoundRobin),
}

/// Each pick takes the next backend in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

// === impl Balancer ===

impl Balancer {
    /// Builds the balancer of `algorithm`, carrying the position of `previous` (the same service in the
    /// table this one replaces) so a snapshot change does not restart the rotation at the first backend.
    pub fn build(algorithm: Algorithm, previous: Option<&Balancer>) -> Self {
        match (algorithm, previous) {
            (Algorithm::RoundRobin, Some(Balancer::RoundRobin(rr))) => {
                Balancer::RoundRobin(RoundRobin::starting_at(rr.next.load(Ordering::Relaxed)))
            }
            (Algorithm::RoundRobin, None) => Balancer::RoundRobin(RoundRobin::default()),
        }
    }

    /// Index of the first backend to try among `len`, or `None` when there is none.
    pub fn pick(&self, len: usize) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(len),
        }
    }
}

// === impl RoundRobin ===

impl RoundRobin {
    fn starting_at(next: usize) -> Self {
        RoundRobin { next: AtomicUsize::new(next) }
    }

    fn pick(&self, len: usize) -> Option<usize> {
        if len == 0 {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_evenly() {
        let b = Balancer::build(Algorithm::RoundRobin, None);
        let mut hits = [0usize; 3];
        for _ in 0..300 {
            hits[b.pick(3).unwrap()] += 1;
        }
        assert_eq!(hits, [100, 100, 100]);
        let picks: Vec<_> = (0..4).map(|_| b.pick(2).unwrap()).collect();
        assert_ne!(picks[0], picks[1]);
        assert_eq!(picks[0], picks[2]);
    }

    #[test]
    fn empty_service_has_no_pick() {
        assert_eq!(Balancer::build(Algorithm::RoundRobin, None).pick(0), None);
    }

    #[test]
    fn rebuild_continues_the_rotation() {
        let old = Balancer::build(Algorithm::RoundRobin, None);
        assert_eq!(old.pick(4), Some(0));
        let new = Balancer::build(Algorithm::RoundRobin, Some(&old));
        assert_eq!(new.pick(4), Some(1));
    }
}
