//! Moving the bytes of a TCP connection: one pump per direction, both until each side has closed its
//! half.
//!
//! A pump starts every burst (the bytes a readiness event brings) by reading into its worker thread's
//! buffer and writing straight on, so a connection waiting for its next request holds no buffer at all.
//! Once a read fills that buffer, the direction is a bulk one and moves on through splice(2): socket →
//! pipe → socket, the bytes never entering user space. Pipes come from the node's [`PipePool`], bounded in
//! number and taken only while bytes are in flight; when the pool is empty, or the kernel refuses splice
//! for these sockets, the pump keeps copying through the thread's buffer.
//!
//! Half-closes pass through as before: the end of one direction shuts down the writing half of the other
//! side, and the connection ends when both directions have.

use std::{
    cell::RefCell,
    io,
    net::Shutdown,
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use contract::limit::{Limit, Permit};
use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};

/// Size of each worker thread's copy buffer; a read that fills it marks the direction as bulk.
const BUFFER: usize = 64 * 1024;

thread_local! {
    /// Borrowed for one synchronous read-and-write, never across an `.await`.
    static COPY: RefCell<Vec<u8>> = RefCell::new(vec![0; BUFFER]);
}

/// The node's pipes for splice(2).
#[derive(Debug)]
pub struct PipePool {
    /// Pipes not in use, all empty.
    free: Mutex<Vec<Pipe>>,
    /// Bounds the pipes in existence (in use or free).
    count: Arc<Limit>,
    /// The descriptors of the node's clients: each pipe takes two from that share.
    fds: Arc<Limit>,
    /// Capacity asked of each new pipe, in bytes (the kernel may grant less).
    size: usize,
    counters: PumpCounters,
}

/// What the pumps of a node have moved, and how.
#[derive(Debug, Default)]
struct PumpCounters {
    spliced: AtomicU64,
    copied: AtomicU64,
    pool_empty: AtomicU64,
    splice_refused: AtomicU64,
    leased: AtomicUsize,
}

/// The pumps' counters at one moment, for the node's admin API.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PumpStats {
    /// Bytes moved by splice(2).
    pub spliced_bytes: u64,
    /// Bytes copied through a worker's buffer.
    pub copied_bytes: u64,
    /// Times a bulk burst found no pipe and was copied instead.
    pub pipe_pool_empty: u64,
    /// Times the kernel refused splice for a connection's sockets.
    pub splice_refused: u64,
    /// Pipes in existence now.
    pub pipes: usize,
    /// Pipes a connection holds now (bytes in flight through it).
    pub pipes_in_use: usize,
    /// Most pipes at once.
    pub pipes_max: usize,
}

#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    _count: Permit,
    _fds: Permit,
}

/// A pipe taken from the pool for one burst. Back in the pool when dropped empty; closed when dropped
/// with bytes in it (a connection that ended mid-burst), so no pooled pipe ever holds stale bytes.
struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    /// Bytes in the pipe.
    pending: usize,
}

/// How a burst ended.
enum Burst {
    /// The source has nothing more for now.
    Drained,
    /// The source closed its writing half.
    Closed,
}

// === impl PipePool ===

impl PipePool {
    /// A pool of at most `max` pipes of `size` bytes each, their descriptors taken from `fds`. With `max`
    /// zero every connection copies.
    pub fn new(max: usize, size: usize, fds: Arc<Limit>) -> Self {
        PipePool {
            free: Mutex::new(Vec::new()),
            count: Limit::new("splice pipes", max),
            fds,
            size,
            counters: PumpCounters::default(),
        }
    }

    /// The counters now.
    pub fn stats(&self) -> PumpStats {
        let c = &self.counters;
        PumpStats {
            spliced_bytes: c.spliced.load(Ordering::Relaxed),
            copied_bytes: c.copied.load(Ordering::Relaxed),
            pipe_pool_empty: c.pool_empty.load(Ordering::Relaxed),
            splice_refused: c.splice_refused.load(Ordering::Relaxed),
            pipes: self.count.held(),
            pipes_in_use: c.leased.load(Ordering::Relaxed),
            pipes_max: self.count.max(),
        }
    }

    /// A free pipe, or a new one while the bound and the descriptor share allow.
    fn lease(&self) -> Option<Lease<'_>> {
        let pooled = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let pipe = pooled.or_else(|| self.create());
        if pipe.is_none() {
            self.counters.pool_empty.fetch_add(1, Ordering::Relaxed);
        }
        let lease = pipe.map(|pipe| Lease { pool: self, pipe: Some(pipe), pending: 0 });
        if lease.is_some() {
            self.counters.leased.fetch_add(1, Ordering::Relaxed);
        }
        lease
    }

    fn create(&self) -> Option<Pipe> {
        let count = self.count.try_take(1)?;
        let fds = self.fds.try_take(2)?;
        let (read, write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).ok()?;
        // A smaller pipe than asked still works, with more calls per burst.
        let size = i32::try_from(self.size).unwrap_or(i32::MAX);
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size));
        Some(Pipe { read, write, _count: count, _fds: fds })
    }
}

// === impl Lease ===

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.counters.leased.fetch_sub(1, Ordering::Relaxed);
        if let Some(pipe) = self.pipe.take()
            && self.pending == 0
        {
            self.pool.free.lock().unwrap_or_else(|e| e.into_inner()).push(pipe);
        }
    }
}

impl Lease<'_> {
    fn pipe(&self) -> io::Result<&Pipe> {
        self.pipe.as_ref().ok_or_else(|| io::Error::other("pipe already returned"))
    }
}

/// Moves both directions between `client` and `upstream` until both are closed. Each byte moved is added,
/// as it is written, to `counters` and `moved` (client → upstream first), so they hold what went through
/// even when the connection fails.
pub async fn both_ways(
    client: &TcpStream,
    upstream: &TcpStream,
    pool: &PipePool,
    counters: [&Counter; 2],
    moved: [&mut u64; 2],
) -> io::Result<()> {
    let [up, down] = moved;
    let up = Moved { total: up, counter: counters[0] };
    let down = Moved { total: down, counter: counters[1] };
    tokio::try_join!(pump(client, upstream, pool, up), pump(upstream, client, pool, down)).map(|_| ())
}

/// Where a pump counts the bytes it writes: the connection's own total and its backend's series.
struct Moved<'a> {
    total: &'a mut u64,
    counter: &'a Counter,
}

impl Moved<'_> {
    fn add(&mut self, n: usize) {
        *self.total += n as u64;
        self.counter.inc_by(n as u64);
    }
}

/// Moves `from` → `to` until `from` closes its writing half, then closes `to`'s.
async fn pump(from: &TcpStream, to: &TcpStream, pool: &PipePool, mut moved: Moved<'_>) -> io::Result<()> {
    let mut bulk = false;
    let mut splice_works = true;
    loop {
        from.readable().await?;
        let burst = match (bulk && splice_works).then(|| pool.lease()).flatten() {
            Some(mut lease) => match splice_burst(from, to, &mut lease, pool, &mut moved).await {
                // Refused with the pipe empty: nothing is lost by copying from now on.
                Err(error) if lease.pending == 0 && refuses_splice(&error) => {
                    pool.counters.splice_refused.fetch_add(1, Ordering::Relaxed);
                    splice_works = false;
                    continue;
                }
                burst => burst?,
            },
            None => copy_burst(from, to, pool, &mut moved, &mut bulk).await?,
        };
        if let Burst::Closed = burst {
            match SockRef::from(to).shutdown(Shutdown::Write) {
                Err(error) if error.kind() != io::ErrorKind::NotConnected => return Err(error),
                _ => return Ok(()),
            }
        }
    }
}

/// splice(2) from `from` into the pipe, then on into `to`, until `from` runs dry or closes.
async fn splice_burst(
    from: &TcpStream,
    to: &TcpStream,
    lease: &mut Lease<'_>,
    pool: &PipePool,
    moved: &mut Moved<'_>,
) -> io::Result<Burst> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let pipe = lease.pipe()?;
        let filled = from.try_io(Interest::READABLE, || Ok(splice(from, None, &pipe.write, None, pool.size, flags)?));
        match filled {
            Ok(0) => return Ok(Burst::Closed),
            Ok(n) => lease.pending = n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(error) => return Err(error),
        }
        while lease.pending > 0 {
            let pipe = lease.pipe()?;
            let sent = to.try_io(Interest::WRITABLE, || Ok(splice(&pipe.read, None, to, None, lease.pending, flags)?));
            match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    lease.pending -= n;
                    moved.add(n);
                    pool.counters.spliced.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(error) => return Err(error),
            }
        }
    }
}

/// Reads from `from` through the thread's buffer and writes on to `to`, until `from` runs dry or closes.
/// A read that fills the buffer sets `bulk` and ends the burst, so the rest goes through splice.
async fn copy_burst(
    from: &TcpStream,
    to: &TcpStream,
    pool: &PipePool,
    moved: &mut Moved<'_>,
    bulk: &mut bool,
) -> io::Result<Burst> {
    loop {
        // What `to` could not take at once leaves the thread's buffer as an owned copy.
        let step = COPY.with_borrow_mut(|buf| -> io::Result<(usize, Option<Vec<u8>>)> {
            let n = from.try_read(buf)?;
            let mut written = 0;
            while written < n {
                match to.try_write(&buf[written..n]) {
                    Ok(w) => written += w,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) => return Err(error),
                }
            }
            Ok((n, (written < n).then(|| buf[written..n].to_vec())))
        });
        let (n, rest) = match step {
            Ok((0, _)) => return Ok(Burst::Closed),
            Ok(step) => step,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(error) => return Err(error),
        };
        if let Some(rest) = rest {
            write_all(to, &rest).await?;
        }
        moved.add(n);
        pool.counters.copied.fetch_add(n as u64, Ordering::Relaxed);
        if n == BUFFER {
            *bulk = true;
            return Ok(Burst::Drained);
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// True for the errors splice(2) gives for sockets it cannot serve (not for a connection's failure).
fn refuses_splice(error: &io::Error) -> bool {
    matches!(error.raw_os_error().map(Errno::from_raw), Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP))
}
