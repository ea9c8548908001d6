//! The doors' tables of open connections: who holds how many (in all, per source address, per /24 or /64
//! prefix), and what each connection is doing. A connection that does nothing cannot hold a door: it has
//! `--first-request-timeout` to make its first request and `--idle-connection-timeout` between requests,
//! and when a door is full a newcomer takes the place of its oldest connection without a request in
//! flight. Connections with requests in flight (registrations, node streams, event watches) are never
//! evicted: only the caps per source and per prefix bound them, so holding a door with them takes many
//! source addresses in many prefixes.

use std::{
    collections::HashMap,
    fmt,
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    time::Duration,
};

use contract::{
    limit::{Throttle, WARN_EVERY},
    sources::{Prefix, SourceCounts},
};
use futures::task::AtomicWaker;
use tokio::time::Instant;

use crate::metrics::DoorReadout;

/// How long a connection of a door may stay without a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorTimeouts {
    /// From accept to the first request (`--first-request-timeout`).
    pub first_request: Duration,
    /// With no request in flight, after the last one ended (`--idle-connection-timeout`; the JSON channel
    /// keeps its own `--json-idle-timeout`).
    pub idle: Duration,
}

/// How the process's file-descriptor limit is shared: the control plane's caps come first, so that clients
/// who exhaust their share never lock out the JSON channel, gRPC or admin HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdShares {
    /// Open JSON control connections.
    pub json: usize,
    /// Open gRPC connections (agents, nodes, operators).
    pub grpc: usize,
    /// Open admin HTTP connections.
    pub admin: usize,
    /// Descriptors the embedded node's clients may hold.
    pub clients: usize,
}

/// The caps of one door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorCaps {
    /// Connections in all.
    pub max: usize,
    /// Connections of one source address.
    pub per_source: usize,
    /// Connections of one /24 (IPv4) or /64 (IPv6).
    pub per_prefix: usize,
}

/// A door's table of open connections.
#[derive(Debug)]
pub struct Door {
    /// `json`, `grpc` or `admin`: the label of its series.
    name: &'static str,
    /// A phrase for logs: "gRPC connections".
    what: &'static str,
    caps: DoorCaps,
    timeouts: DoorTimeouts,
    table: Mutex<Table>,
    refused: AtomicU64,
    evicted: AtomicU64,
    timed_out: AtomicU64,
    throttle: Mutex<Throttle>,
}

/// The open connections, by id, and how many each source and prefix holds.
#[derive(Debug, Default)]
struct Table {
    next: u64,
    open: HashMap<u64, Arc<Activity>>,
    by_peer: HashMap<SocketAddr, u64>,
    /// Connections per source address and per /24 or /64.
    counts: SourceCounts,
}

/// Which cap a newcomer ran into: the narrowest full one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Its source address holds its share.
    Source(usize),
    /// Its /24 or /64 holds its share.
    Prefix(usize),
    /// The door holds all it may.
    Door(usize),
}

/// What one connection is doing, shared by its stream, its requests and its door.
#[derive(Debug)]
pub struct Activity {
    id: u64,
    peer: SocketAddr,
    accepted: Instant,
    in_flight: AtomicUsize,
    first_seen: AtomicBool,
    /// When the last request ended, in nanoseconds from `accepted`.
    last_ended: AtomicU64,
    evicted: AtomicBool,
    /// The task that reads the connection: woken when a request ends or the connection is evicted.
    reader: AtomicWaker,
}

/// A connection's place in its door, given back on drop.
#[derive(Debug)]
pub struct Slot {
    door: Arc<Door>,
    activity: Arc<Activity>,
}

/// One request in flight on a connection, counted out on drop.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

// === impl Door ===

impl Door {
    /// A door named `name` ("grpc") holding `what` ("gRPC connections") within `caps`.
    pub fn new(name: &'static str, what: &'static str, caps: DoorCaps, timeouts: DoorTimeouts) -> Arc<Self> {
        Arc::new(Door {
            name,
            what,
            caps,
            timeouts,
            table: Mutex::default(),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            throttle: Mutex::new(Throttle::new(WARN_EVERY)),
        })
    }

    /// A place for a connection from `peer`: when a cap it would pass is full, the oldest connection
    /// without a request in flight under that cap is evicted for it; `Err` when every one there has one.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Slot, Full> {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let (ip, prefix) = (peer.ip(), Prefix::of(peer.ip()));
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (by_source, by_prefix) = table.counts.held(ip);
        let full = if by_source >= self.caps.per_source {
            Some(Full::Source(self.caps.per_source))
        } else if by_prefix >= self.caps.per_prefix {
            Some(Full::Prefix(self.caps.per_prefix))
        } else if table.open.len() >= self.caps.max {
            Some(Full::Door(self.caps.max))
        } else {
            None
        };
        if let Some(full) = full {
            // The victim is under the narrowest full cap, so every wider one gets a place back too.
            let victim = table
                .open
                .values()
                .filter(|a| match full {
                    Full::Source(_) => a.peer.ip() == ip,
                    Full::Prefix(_) => Prefix::of(a.peer.ip()) == prefix,
                    Full::Door(_) => true,
                })
                .filter(|a| a.in_flight.load(Ordering::SeqCst) == 0)
                // Ties (accepted together) go to the first accepted.
                .min_by_key(|a| (a.idle_since(), a.id))
                .map(|a| a.id);
            let Some(victim) = victim.and_then(|id| table.remove(id)) else {
                drop(table);
                self.refused.fetch_add(1, Ordering::Relaxed);
                self.note("full, every connection has a request in flight: refusing", full);
                return Err(full);
            };
            victim.evicted.store(true, Ordering::SeqCst);
            victim.reader.wake();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        table.next += 1;
        let activity = Arc::new(Activity {
            id: table.next,
            peer,
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            first_seen: AtomicBool::new(false),
            last_ended: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        });
        table.insert(Arc::clone(&activity));
        drop(table);
        if let Some(full) = full {
            self.note("full: evicted the connection idle the longest for a newcomer", full);
        }
        Ok(Slot { door: Arc::clone(self), activity })
    }

    /// Logs a refusal or an eviction when one is due (at most once per interval).
    fn note(&self, what: &str, full: Full) {
        if let Some(held_back) = self.throttle.lock().unwrap_or_else(|e| e.into_inner()).admit(Instant::now()) {
            tracing::warn!(
                door = self.what,
                %full,
                refused = self.refused.load(Ordering::Relaxed),
                evicted = self.evicted.load(Ordering::Relaxed),
                timed_out = self.timed_out.load(Ordering::Relaxed),
                since_last_warning = held_back + 1,
                "{what}"
            );
        }
    }

    /// A request starts on the connection from `peer`, if it is one of this door's.
    pub fn enter(&self, peer: SocketAddr) -> Option<InFlight> {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let activity = table.by_peer.get(&peer).and_then(|id| table.open.get(id))?;
        Some(activity.enter())
    }

    /// The door's name, the label of its series.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its caps.
    pub fn caps(&self) -> DoorCaps {
        self.caps
    }

    /// Its timeouts.
    pub fn timeouts(&self) -> DoorTimeouts {
        self.timeouts
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).open.len()
    }

    /// Newcomers refused since the start (every connection under their cap had a request in flight).
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections evicted for a newcomer since the start.
    pub fn evictions(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Connections closed for making no request in time since the start.
    pub fn timeouts_fired(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Counts a connection closed for its silence.
    pub fn timed_out(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

impl DoorReadout for Door {
    fn name(&self) -> &'static str {
        Door::name(self)
    }

    fn open(&self) -> usize {
        Door::open(self)
    }

    fn refusals(&self) -> u64 {
        Door::refusals(self)
    }

    fn evictions(&self) -> u64 {
        Door::evictions(self)
    }

    fn timeouts_fired(&self) -> u64 {
        Door::timeouts_fired(self)
    }
}

// === impl Table ===

impl Table {
    fn insert(&mut self, activity: Arc<Activity>) {
        self.counts.take(activity.peer.ip());
        self.by_peer.insert(activity.peer, activity.id);
        self.open.insert(activity.id, activity);
    }

    /// Takes connection `id` out of the counts (evicted, or closed), once.
    fn remove(&mut self, id: u64) -> Option<Arc<Activity>> {
        let activity = self.open.remove(&id)?;
        if self.by_peer.get(&activity.peer) == Some(&id) {
            self.by_peer.remove(&activity.peer);
        }
        self.counts.give_back(activity.peer.ip());
        Some(activity)
    }
}

// === impl Full ===

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Full::Source(n) => write!(f, "its source address holds {n} connections"),
            Full::Prefix(n) => write!(f, "its /24 (or /64) holds {n} connections"),
            Full::Door(n) => write!(f, "{n} connections are open"),
        }
    }
}

// === impl Activity ===

impl Activity {
    /// Counts a request in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.first_seen.store(true, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    /// Since when the connection has had no request in flight (its accept, or the end of its last one).
    fn idle_since(&self) -> Instant {
        self.accepted + Duration::from_nanos(self.last_ended.load(Ordering::SeqCst))
    }

    /// When the connection is to be closed for its silence: `None` while a request is in flight.
    pub fn deadline(&self, timeouts: &DoorTimeouts) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(match self.first_seen.load(Ordering::SeqCst) {
            false => self.accepted + timeouts.first_request,
            true => self.idle_since() + timeouts.idle,
        })
    }

    /// True once it has made a request.
    pub fn first_seen(&self) -> bool {
        self.first_seen.load(Ordering::SeqCst)
    }

    /// When it was accepted.
    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    /// True once a newcomer took its place.
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::SeqCst)
    }

    /// The reading task is to be woken on the next request end or eviction.
    pub fn register_reader(&self, waker: &std::task::Waker) {
        self.reader.register(waker);
    }

    /// Resolves once a newcomer took the connection's place.
    pub async fn evicted(&self) {
        poll_fn(|cx| {
            self.reader.register(cx.waker());
            if self.is_evicted() { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
    }
}

// === impl InFlight ===

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let since_accept = Instant::now().saturating_duration_since(activity.accepted);
        activity.last_ended.store(u64::try_from(since_accept.as_nanos()).unwrap_or(u64::MAX), Ordering::SeqCst);
        if activity.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Its idle timer starts now: the reader arms it.
            activity.reader.wake();
        }
    }
}

// === impl Slot ===

impl Slot {
    /// What the connection is doing.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Its door.
    pub fn door(&self) -> &Arc<Door> {
        &self.door
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.door.table.lock().unwrap_or_else(|e| e.into_inner()).remove(self.activity.id);
    }
}

// === impl DoorCaps ===

impl DoorCaps {
    /// The caps of a door of `max` connections: a thirty-second of it per source address (4 to 64), an
    /// eighth per prefix (at least a source's share, at most 512). Holding a door with requests in flight
    /// then takes at least 16 source addresses in 8 prefixes, 32 in 8 on a larger limit.
    pub fn of(max: usize) -> Self {
        let per_source = (max / 32).clamp(4, 64).min(max);
        let per_prefix = (max / 8).clamp(per_source, 512.max(per_source)).min(max);
        DoorCaps { max, per_source, per_prefix }
    }
}

// === impl FdShares ===

impl FdShares {
    /// Descriptors kept for everything else: listeners, upstream connections of probes, logs, the runtime.
    const SPARE: usize = 64;

    /// The shares of `limit` when `open` descriptors are in use already. Under nofile 1024, the doors get
    /// 64, 64 and 32: their caps per source (4) then make 16 source addresses (8 for admin HTTP) needed to
    /// hold one with requests in flight, and idle connections cannot hold them at all.
    pub fn split(limit: usize, open: usize) -> Self {
        let json = (limit / 16).max(16);
        let grpc = (limit / 16).max(16);
        let admin = (limit / 64).max(32);
        let clients = limit.saturating_sub(open + json + grpc + admin + Self::SPARE);
        FdShares { json, grpc, admin, clients }
    }

    /// The shares of this process's limit.
    pub fn current() -> Self {
        FdShares::split(contract::process::fd_limit(), contract::process::open_fds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: DoorTimeouts =
        DoorTimeouts { first_request: Duration::from_secs(5), idle: Duration::from_secs(60) };

    fn peer(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_door_evicts_the_connection_idle_the_longest_and_never_one_in_flight() {
        let door = Door::new("test", "test connections", DoorCaps { max: 3, per_source: 3, per_prefix: 3 }, TIMEOUTS);
        let first = door.admit(peer("127.0.0.1", 1)).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = door.admit(peer("127.0.1.1", 2)).unwrap();
        let third = door.admit(peer("127.0.2.1", 3)).unwrap();
        let busy = door.enter(peer("127.0.0.1", 1)).unwrap();
        // The first is busy: the second, idle since its accept, is the oldest idle one.
        let fourth = door.admit(peer("127.0.3.1", 4)).unwrap();
        assert!(second.activity().is_evicted() && !first.activity().is_evicted() && !third.activity().is_evicted());
        assert_eq!((door.open(), door.evictions()), (3, 1));
        drop(second);
        assert_eq!(door.open(), 3, "an evicted connection was counted out already");
        let _fifth = door.admit(peer("127.0.4.1", 5)).unwrap();
        assert!(third.activity().is_evicted());
        let _sixth = door.admit(peer("127.0.5.1", 6)).unwrap();
        assert!(fourth.activity().is_evicted());
        // Once its request ends, the first is idle again, and the longest.
        drop(busy);
        let _in_flight = [door.enter(peer("127.0.4.1", 5)).unwrap(), door.enter(peer("127.0.5.1", 6)).unwrap()];
        let _seventh = door.admit(peer("127.0.6.1", 7)).unwrap();
        assert!(first.activity().is_evicted());
        let _also_in_flight = door.enter(peer("127.0.6.1", 7)).unwrap();
        assert_eq!(door.admit(peer("127.0.7.1", 8)).unwrap_err(), Full::Door(3), "every one is busy");
        assert_eq!(door.refusals(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_source_or_prefix_evicts_among_its_own() {
        let door = Door::new("test", "test connections", DoorCaps { max: 10, per_source: 2, per_prefix: 3 }, TIMEOUTS);
        let a1 = door.admit(peer("10.0.0.1", 1)).unwrap();
        let b1 = door.admit(peer("10.0.1.1", 1)).unwrap();
        let a2 = door.admit(peer("10.0.0.1", 2)).unwrap();
        let _a3 = door.admit(peer("10.0.0.1", 3)).unwrap();
        assert!(a1.activity().is_evicted() && !b1.activity().is_evicted(), "the source's own oldest");
        let _c1 = door.admit(peer("10.0.0.2", 1)).unwrap();
        let _c2 = door.admit(peer("10.0.0.2", 2)).unwrap();
        assert!(a2.activity().is_evicted() && !b1.activity().is_evicted(), "the prefix's own oldest");
        assert_eq!(door.open(), 4);
        // IPv6: a /64 is one prefix.
        let v6 = Door::new("test", "test connections", DoorCaps { max: 10, per_source: 2, per_prefix: 2 }, TIMEOUTS);
        let x = v6.admit(peer("2001:db8::1", 1)).unwrap();
        let _y = v6.admit(peer("2001:db8::2", 1)).unwrap();
        let _z = v6.admit(peer("2001:db8::3", 1)).unwrap();
        assert!(x.activity().is_evicted());
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_run_before_the_first_request_and_between_requests_only() {
        let door = Door::new("test", "test connections", DoorCaps::of(64), TIMEOUTS);
        let slot = door.admit(peer("127.0.0.1", 1)).unwrap();
        let start = slot.activity().accepted();
        assert_eq!(slot.activity().deadline(&TIMEOUTS), Some(start + TIMEOUTS.first_request));
        let request = door.enter(peer("127.0.0.1", 1)).unwrap();
        assert_eq!(slot.activity().deadline(&TIMEOUTS), None, "a request in flight holds the connection");
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(request);
        let ended = Instant::now();
        assert_eq!(slot.activity().deadline(&TIMEOUTS), Some(ended + TIMEOUTS.idle));
    }

    #[test]
    fn caps_and_shares_leave_every_door_needing_many_sources() {
        assert_eq!(DoorCaps::of(64), DoorCaps { max: 64, per_source: 4, per_prefix: 8 });
        assert_eq!(DoorCaps::of(1250), DoorCaps { max: 1250, per_source: 39, per_prefix: 156 });
        assert_eq!(DoorCaps::of(100_000).per_source, 64);
        assert_eq!(DoorCaps::of(100_000).per_prefix, 512);
        assert_eq!(DoorCaps::of(2), DoorCaps { max: 2, per_source: 2, per_prefix: 2 });
        let small = FdShares::split(1024, 20);
        assert_eq!((small.json, small.grpc, small.admin), (64, 64, 32));
        assert!(small.clients >= 700, "{small:?}");
        for max in [small.json, small.grpc] {
            let caps = DoorCaps::of(max);
            assert!(max / caps.per_source >= 16 && max / caps.per_prefix >= 8, "{caps:?}");
        }
    }
}
