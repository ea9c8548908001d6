//! Balancing: which backend of a service takes the next connection (TCP) or session (UDP).
//!
//! A [`Balancer`] is built once per routing table and is immutable apart from atomics, so picking takes no
//! lock. Loads are the backend's connections on this node plus, for the load-aware algorithms, the other
//! nodes' last reported counts (cluster-wide least connections). The pick is a starting index: the TCP relay
//! walks on from it when a backend refuses, so one pick order serves the first choice and the retries.
//!
//! Hashes use fixed seeds and hash addresses only, so every node builds the same Maglev table from the same
//! snapshot and sends a client to the same backend without sharing anything.

use std::{
    cell::Cell,
    hash::{BuildHasher, RandomState},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use contract::model::{Algorithm, Weight};

use crate::stats::BackendStats;

/// One backend in rotation.
#[derive(Debug)]
pub struct RouteBackend {
    /// Where it listens.
    pub address: SocketAddr,
    /// Relative weight.
    pub weight: Weight,
    /// Its live counters on this node.
    pub stats: Arc<BackendStats>,
}

/// The balancing state of one service in one routing table.
#[derive(Debug)]
pub enum Balancer {
    /// Each pick takes the next backend in turn.
    RoundRobin(AtomicUsize),
    /// nginx's smooth weighted round robin, precomputed as one cycle of indices.
    WeightedRoundRobin {
        /// One cycle: each backend index as often as its (reduced) weight, interleaved.
        cycle: Vec<u32>,
        /// Position in the cycle.
        next: AtomicUsize,
    },
    /// Fewest connections per unit of weight, cluster-wide; ties rotate.
    LeastConnections(AtomicUsize),
    /// Weighted random.
    Random,
    /// Two distinct random backends, the less loaded (per unit of weight) wins.
    PowerOfTwo,
    /// Maglev lookup table over the client's address.
    SourceHash(Maglev),
    /// The lowest reported load combined with connections per unit of weight; ties rotate.
    LeastLoad(AtomicUsize),
}

/// A Maglev lookup table: entry `hash(client) % len` names the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
}

/// Maglev table size: prime, and the same whatever the number of backends (a size that followed the count
/// would remap nearly every client when a backend leaves). 100 entries per backend up to 655 backends.
const MAGLEV_SIZE: usize = 65_537;

/// Largest cycle of smooth WRR; larger weight sums are scaled down (keeping the ratios within rounding).
const MAX_WRR_CYCLE: u64 = 65_536;

// === impl Balancer ===

impl Balancer {
    /// Builds the balancer of `algorithm` over `backends` (in snapshot order), carrying the rotation of
    /// `previous` (the same service in the table this one replaces).
    pub fn build(algorithm: Algorithm, backends: &[RouteBackend], previous: Option<&Balancer>) -> Self {
        let carried = || AtomicUsize::new(previous.map_or(0, Balancer::position));
        match algorithm {
            Algorithm::RoundRobin => Balancer::RoundRobin(carried()),
            Algorithm::WeightedRoundRobin => {
                let weights: Vec<u64> = backends.iter().map(|b| u64::from(b.weight.get())).collect();
                Balancer::WeightedRoundRobin { cycle: smooth_cycle(&weights), next: carried() }
            }
            Algorithm::LeastConnections => Balancer::LeastConnections(carried()),
            Algorithm::LeastLoad => Balancer::LeastLoad(carried()),
            Algorithm::Random => Balancer::Random,
            Algorithm::PowerOfTwo => Balancer::PowerOfTwo,
            Algorithm::SourceHash => {
                let addrs: Vec<_> = backends.iter().map(|b| b.address).collect();
                Balancer::SourceHash(Maglev::new(&addrs))
            }
        }
    }

    fn position(&self) -> usize {
        match self {
            Balancer::RoundRobin(next)
            | Balancer::LeastConnections(next)
            | Balancer::LeastLoad(next)
            | Balancer::WeightedRoundRobin { next, .. } => next.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Index of the first backend to try for a client at `client`, or `None` when there is none.
    pub fn pick(&self, backends: &[RouteBackend], client: IpAddr) -> Option<usize> {
        let len = backends.len();
        if len == 0 {
            return None;
        }
        Some(match self {
            Balancer::RoundRobin(next) => next.fetch_add(1, Ordering::Relaxed) % len,
            Balancer::WeightedRoundRobin { cycle, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % cycle.len().max(1);
                cycle.get(i).map_or(0, |&b| b as usize) % len
            }
            Balancer::LeastConnections(next) => least_loaded(backends, next.fetch_add(1, Ordering::Relaxed)),
            Balancer::Random => weighted_random(backends),
            Balancer::PowerOfTwo => {
                let (a, b) = two_distinct(len);
                if lighter(&backends[b], &backends[a]) { b } else { a }
            }
            Balancer::SourceHash(maglev) => maglev.lookup(client) % len,
            Balancer::LeastLoad(next) => least_cost(backends, next.fetch_add(1, Ordering::Relaxed)),
        })
    }
}

/// True when `a` carries strictly less load per unit of weight than `b`.
fn lighter(a: &RouteBackend, b: &RouteBackend) -> bool {
    u128::from(a.load()) * u128::from(b.weight.get()) < u128::from(b.load()) * u128::from(a.weight.get())
}

/// The least loaded backend per unit of weight; among equals, the first from `start` on, so ties rotate.
fn least_loaded(backends: &[RouteBackend], start: usize) -> usize {
    let len = backends.len();
    let mut best = start % len;
    for step in 1..len {
        let i = (start + step) % len;
        if lighter(&backends[i], &backends[best]) {
            best = i;
        }
    }
    best
}

/// How much a reported load weighs against connections in [`least_cost`]: a server at 1000 ‰ costs
/// `1 + LOAD_FACTOR` times what an idle one does for the same connections.
const LOAD_FACTOR: u128 = 4;

/// `least_load`: the backend of least `(connections + 1) × (1 + LOAD_FACTOR × load) / weight`, connections
/// cluster-wide and load as reported (a backend without a fresh report counts as the average of those
/// with one, so it is judged by its connections). Without any report it is least connections. Among equals,
/// the first from `start` on, so ties rotate.
fn least_cost(backends: &[RouteBackend], start: usize) -> usize {
    let reports: Vec<u32> = backends.iter().filter_map(|b| b.stats.reported()).collect();
    let average =
        if reports.is_empty() { 0 } else { reports.iter().map(|&r| u64::from(r)).sum::<u64>() / reports.len() as u64 };
    let cost = |b: &RouteBackend| {
        let load = u128::from(b.stats.reported().map_or(average, u64::from));
        (u128::from(b.load()) + 1) * (1000 + LOAD_FACTOR * load)
    };
    let len = backends.len();
    let mut best = start % len;
    let mut best_cost = cost(&backends[best]);
    for step in 1..len {
        let i = (start + step) % len;
        let c = cost(&backends[i]);
        // Per unit of weight, without division: c / w_i < best / w_best.
        if c * u128::from(backends[best].weight.get()) < best_cost * u128::from(backends[i].weight.get()) {
            (best, best_cost) = (i, c);
        }
    }
    best
}

fn weighted_random(backends: &[RouteBackend]) -> usize {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight.get())).sum();
    let mut r = random() % total.max(1);
    for (i, b) in backends.iter().enumerate() {
        let w = u64::from(b.weight.get());
        if r < w {
            return i;
        }
        r -= w;
    }
    backends.len() - 1
}

/// Two different indices below `len` (the same one only when `len` is 1).
fn two_distinct(len: usize) -> (usize, usize) {
    if len < 2 {
        return (0, 0);
    }
    let a = (random() % len as u64) as usize;
    let mut b = (random() % (len as u64 - 1)) as usize;
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// One cycle of smooth weighted round robin (nginx): every backend appears as often as its weight, spread
/// out rather than in runs.
fn smooth_cycle(weights: &[u64]) -> Vec<u32> {
    let gcd = weights.iter().copied().fold(0, gcd);
    let mut weights: Vec<i64> = weights.iter().map(|w| i64::try_from(w / gcd.max(1)).unwrap_or(1)).collect();
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    if total > MAX_WRR_CYCLE {
        for w in &mut weights {
            *w = ((*w as u64 * MAX_WRR_CYCLE / total).max(1)) as i64;
        }
    }
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += weights[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            best as u32
        })
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

// === impl Maglev ===

impl Maglev {
    /// The table of `backends` (in a stable order): the same input builds the same table on every node.
    pub fn new(backends: &[std::net::SocketAddr]) -> Self {
        let n = backends.len();
        if n == 0 {
            return Maglev { table: Vec::new() };
        }
        let size = MAGLEV_SIZE;
        let prefs: Vec<(u64, u64)> = backends
            .iter()
            .map(|addr| {
                let key = addr_bytes(addr);
                let offset = hash(0x5157_4954_4348_424f, &key) % size as u64;
                let skip = hash(0x4152_4400_4d41_474c, &key) % (size as u64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut table = vec![u32::MAX; size];
        let mut next = vec![0u64; n];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in prefs.iter().enumerate() {
                let mut slot = ((offset + next[i] * skip) % size as u64) as usize;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % size as u64) as usize;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev { table }
    }

    /// The backend index of `client`.
    pub fn lookup(&self, client: IpAddr) -> usize {
        if self.table.is_empty() {
            return 0;
        }
        // A dual-stack frontend sees IPv4 clients as ::ffff:a.b.c.d; hash them as the IPv4 address they are,
        // as a node bound to an IPv4 address does.
        let key = match client.to_canonical() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        self.table[(hash(0x434c_4945_4e54_0001, &key) % self.table.len() as u64) as usize] as usize
    }
}

fn addr_bytes(addr: &std::net::SocketAddr) -> Vec<u8> {
    let mut bytes = match addr.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    bytes
}

/// FNV-1a with a seed, finished with splitmix64: stable across processes, builds and machines (std's
/// hashers promise none of that).
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(h)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A fast per-thread random number (xorshift64*, seeded from the process's random hasher keys).
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

// === impl RouteBackend ===

impl RouteBackend {
    /// Its load for the load-aware algorithms: connections here plus the other nodes' last report.
    pub fn load(&self) -> u64 {
        self.stats.active() + self.stats.remote()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr},
        sync::Arc,
    };

    use proptest::prelude::*;

    use super::*;
    use crate::stats::BackendStats;

    fn backends(weights: &[u32]) -> Vec<RouteBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| RouteBackend {
                address: SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 80)),
                weight: Weight::new(weight.into()).unwrap(),
                stats: Arc::new(BackendStats::default()),
            })
            .collect()
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)))
    }

    #[test]
    fn least_load_follows_reports_and_is_least_connections_without_them() {
        let list = backends(&[1, 1, 1]);
        let balancer = Balancer::build(Algorithm::LeastLoad, &list, None);
        let picks = |n: u32| -> Vec<usize> { (0..n).map(|i| balancer.pick(&list, client(i)).unwrap()).collect() };
        // No report: the fewest connections, ties rotating.
        let _held = list[0].stats.open();
        assert!(picks(6).iter().all(|&p| p != 0), "the busy one is avoided");
        // Reports: the least loaded server, although it holds a connection.
        list[0].stats.set_reported(Some(100));
        list[1].stats.set_reported(Some(900));
        list[2].stats.set_reported(Some(800));
        assert!(picks(6).iter().all(|&p| p == 0), "{:?}", picks(6));
        // Loads swap: so do the picks.
        list[0].stats.set_reported(Some(950));
        list[1].stats.set_reported(Some(50));
        assert!(picks(6).iter().all(|&p| p == 1));
        // A backend without a report counts as the average of the others (500): between the two.
        list[2].stats.set_reported(None);
        assert!(picks(6).iter().all(|&p| p == 1));
        list[1].stats.set_reported(Some(990));
        assert!(picks(6).iter().all(|&p| p == 2), "{:?}", picks(6));
        // Enough connections outweigh a low load: 7 connections at 100 cost more than 1 at 900.
        let list = backends(&[1, 1]);
        let balancer = Balancer::build(Algorithm::LeastLoad, &list, None);
        list[0].stats.set_reported(Some(100));
        list[1].stats.set_reported(Some(900));
        list[0].stats.set_remote(6);
        assert_eq!(balancer.pick(&list, client(0)), Some(1));
    }

    proptest! {
        /// Backends out of rotation (removed, draining, unhealthy) are not in the list a balancer is built
        /// over, so "never picks them" is: every pick names a backend of that list.
        #[test]
        fn every_pick_is_a_backend_in_rotation(weights in prop::collection::vec(1u32..20, 0..12), seed in 0u32..1000) {
            let list = backends(&weights);
            for algorithm in Algorithm::ALL {
                let balancer = Balancer::build(algorithm, &list, None);
                for i in 0..50 {
                    let pick = balancer.pick(&list, client(seed + i));
                    if list.is_empty() {
                        prop_assert_eq!(pick, None);
                    } else {
                        prop_assert!(pick.is_some_and(|p| p < list.len()), "{algorithm:?}");
                    }
                }
            }
        }

        #[test]
        fn two_choices_are_distinct(len in 2usize..64) {
            for _ in 0..100 {
                let (a, b) = two_distinct(len);
                prop_assert!(a != b && a < len && b < len);
            }
        }
    }

    #[test]
    fn weights_are_respected_within_two_percent_over_100k_picks() {
        let weights = [5, 1, 3, 1];
        let list = backends(&weights);
        let total: u32 = weights.iter().sum();
        for algorithm in [Algorithm::WeightedRoundRobin, Algorithm::Random] {
            let balancer = Balancer::build(algorithm, &list, None);
            let mut hits = [0u32; 4];
            for i in 0..100_000 {
                hits[balancer.pick(&list, client(i)).unwrap()] += 1;
            }
            for (i, &w) in weights.iter().enumerate() {
                let expected = f64::from(w) / f64::from(total);
                let share = f64::from(hits[i]) / 100_000.0;
                // Smooth WRR is exact: within 2 % of the share. Random is statistical: within 2 % of all
                // picks (over 20 standard deviations here; an unweighted pick would be 15 points off).
                let tolerance = match algorithm {
                    Algorithm::Random => 0.02,
                    _ => 0.02 * expected,
                };
                assert!((share - expected).abs() <= tolerance, "{algorithm:?} backend {i}: {share} vs {expected}");
            }
        }
    }

    /// With 5:1:1 the first backend takes 5/7 of the picks, more than the 2/3 that runs of at most two
    /// allow, so runs of three are unavoidable where one cycle of seven meets the next. Within a cycle the
    /// smooth order keeps every run to two (`a a b a c a a`), where plain weighted round robin would send
    /// five in a row.
    #[test]
    fn smooth_wrr_interleaves() {
        let list = backends(&[5, 1, 1]);
        let balancer = Balancer::build(Algorithm::WeightedRoundRobin, &list, None);
        let picks: Vec<usize> = (0..700).map(|i| balancer.pick(&list, client(i)).unwrap()).collect();
        for cycle in picks.chunks(7) {
            let longest = cycle.chunk_by(|a, b| a == b).map(<[usize]>::len).max().unwrap();
            assert!(longest <= 2, "a backend picked {longest} times in a row within a cycle: {cycle:?}");
        }
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 500);
    }

    #[test]
    fn least_connections_counts_other_nodes_and_weights() {
        let list = backends(&[1, 1, 2]);
        let balancer = Balancer::build(Algorithm::LeastConnections, &list, None);
        let _local: Vec<_> = (0..2).map(|_| list[0].stats.open()).collect();
        list[1].stats.set_remote(3);
        // Loads per weight: 2/1, 3/1, 0/2: the third.
        assert_eq!(balancer.pick(&list, client(0)), Some(2));
        let _more: Vec<_> = (0..8).map(|_| list[2].stats.open()).collect();
        // 2/1, 3/1, 8/2=4: the first.
        assert_eq!(balancer.pick(&list, client(0)), Some(0));
    }

    #[test]
    fn power_of_two_prefers_the_lighter_of_its_two() {
        let list = backends(&[1, 1]);
        let _busy: Vec<_> = (0..5).map(|_| list[0].stats.open()).collect();
        let balancer = Balancer::build(Algorithm::PowerOfTwo, &list, None);
        assert!((0..100).all(|i| balancer.pick(&list, client(i)) == Some(1)));
    }

    #[test]
    fn maglev_shares_are_even_and_identical_everywhere() {
        for n in [2usize, 3, 5, 10, 20] {
            let addrs: Vec<SocketAddr> = backends(&vec![1; n]).iter().map(|b| b.address).collect();
            let table = Maglev::new(&addrs);
            assert_eq!(table, Maglev::new(&addrs), "two independently built tables are identical");
            let mut hits = vec![0u32; n];
            let keys = 100_000u32;
            for i in 0..keys {
                hits[table.lookup(client(i))] += 1;
            }
            let fair = 1.0 / n as f64;
            for (i, &h) in hits.iter().enumerate() {
                let share = f64::from(h) / f64::from(keys);
                assert!((share - fair).abs() <= 0.05 * fair, "n={n} backend {i}: {share} vs {fair}");
            }
        }
    }

    #[test]
    fn removing_one_backend_moves_few_keys() {
        for n in [3usize, 5, 10, 20] {
            let addrs: Vec<SocketAddr> = backends(&vec![1; n]).iter().map(|b| b.address).collect();
            let before = Maglev::new(&addrs);
            let removed = n / 2;
            let rest: Vec<SocketAddr> =
                addrs.iter().copied().enumerate().filter(|&(i, _)| i != removed).map(|(_, a)| a).collect();
            let after = Maglev::new(&rest);
            let keys = 50_000u32;
            let moved = (0..keys)
                .filter(|&i| {
                    let old = addrs[before.lookup(client(i))];
                    let new = rest[after.lookup(client(i))];
                    old != new
                })
                .count();
            let moved = moved as f64 / f64::from(keys);
            assert!(moved <= 1.0 / n as f64 + 0.02, "n={n}: {moved} of keys moved");
        }
    }

    #[test]
    fn rebuild_continues_the_rotation() {
        let list = backends(&[1, 1, 1, 1]);
        let old = Balancer::build(Algorithm::RoundRobin, &list, None);
        assert_eq!(old.pick(&list, client(0)), Some(0));
        let new = Balancer::build(Algorithm::RoundRobin, &list, Some(&old));
        assert_eq!(new.pick(&list, client(0)), Some(1));
    }

    #[test]
    fn round_robin_cycles_evenly() {
        let list = backends(&[1, 7, 1]);
        let b = Balancer::build(Algorithm::RoundRobin, &list, None);
        let mut hits = [0usize; 3];
        for i in 0..300 {
            hits[b.pick(&list, client(i)).unwrap()] += 1;
        }
        assert_eq!(hits, [100, 100, 100], "round robin ignores weights");
    }
}
