//! Running a load: open loop (requests at a fixed rate, each timed from its *intended* start, so a slow
//! target shows up as queueing delay instead of being hidden by coordinated omission), closed loop (each
//! connection sends its next request when the last one returns), and bulk (long streams, throughput).
//!
//! Every lane records into its own histogram and timeline; they are merged at the end, so the request path
//! shares nothing but two progress counters.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Mutex, mpsc},
    task::JoinSet,
    time::Instant,
};

use crate::{
    error::ErrorKind,
    target::Splitter,
    workload::{Lane, Workload},
};

/// Open or closed loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `rate` requests per second, whatever the target does.
    Open {
        /// Requests per second.
        rate: f64,
    },
    /// Each connection back to back.
    Closed,
}

/// One run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// What a request is.
    pub workload: Workload,
    /// Where requests go.
    pub targets: Vec<SocketAddr>,
    /// Share of each target.
    pub shares: Vec<u32>,
    /// Open or closed loop.
    pub mode: Mode,
    /// Connections (lanes) in all.
    pub connections: usize,
    /// How long requests are started.
    pub duration: Duration,
    /// Longest a request may take.
    pub timeout: Duration,
}

/// Everything one lane (or a whole run) measured.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Latency of successful requests, in microseconds.
    pub latency: Histogram<u64>,
    /// Successful requests.
    pub ok: u64,
    /// Failed requests by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Bytes received (request workloads) or sent (bulk).
    pub bytes: u64,
    /// One entry per second of the run.
    pub seconds: Vec<Second>,
}

/// One second of a run.
#[derive(Debug, Clone, Default)]
pub struct Second {
    /// Successful requests.
    pub ok: u64,
    /// Failed requests.
    pub errors: u64,
    /// Bytes.
    pub bytes: u64,
    /// Latency in that second, coarser than the run's.
    pub latency: Option<Histogram<u64>>,
}

/// Live counters for the progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    /// Successful requests so far.
    pub ok: AtomicU64,
    /// Failed requests so far.
    pub errors: AtomicU64,
    /// Microseconds from the start to the latest answer so far, across every lane.
    last_answer_us: AtomicU64,
    /// Longest time between two answers so far, in microseconds.
    longest_gap_us: AtomicU64,
}

/// What a run measured, per target and in all.
#[derive(Debug)]
pub struct Outcome {
    /// Merged over every target.
    pub total: Recorder,
    /// Per target, in `targets` order.
    pub per_target: Vec<Recorder>,
    /// Wall time from the first request to the last answer.
    pub elapsed: Duration,
    /// The run's `--duration`: rates are per second of it (answers that straggle past the end, up to one
    /// timeout, must not dilute them).
    pub duration: Duration,
    /// Longest time in which no request was answered, between the first answer and the last (none: no
    /// two answers, or a bulk run).
    pub longest_gap: Option<Duration>,
}

const MAX_LATENCY_US: u64 = 3_600_000_000;

// === impl Recorder ===

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant bounds are valid"),
            ok: 0,
            errors: BTreeMap::new(),
            bytes: 0,
            seconds: Vec::new(),
        }
    }
}

impl Recorder {
    /// Records one request that ended at `at` (relative to the run's start) after `latency`.
    pub fn record(&mut self, at: Duration, latency: Duration, result: Result<u64, ErrorKind>) {
        let second = second_of(&mut self.seconds, at);
        match result {
            Ok(bytes) => {
                let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_US).clamp(1, MAX_LATENCY_US);
                self.ok += 1;
                self.bytes += bytes;
                let _ = self.latency.record(us);
                second.ok += 1;
                second.bytes += bytes;
                let hist = second.latency.get_or_insert_with(|| {
                    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("constant bounds are valid")
                });
                let _ = hist.record(us);
            }
            Err(kind) => {
                *self.errors.entry(kind).or_default() += 1;
                second.errors += 1;
            }
        }
    }

    /// Records bytes moved at `at` (bulk).
    pub fn record_bytes(&mut self, at: Duration, bytes: u64) {
        self.bytes += bytes;
        second_of(&mut self.seconds, at).bytes += bytes;
    }

    /// Adds `other` into this one.
    pub fn merge(&mut self, other: &Recorder) {
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        self.bytes += other.bytes;
        for (kind, n) in &other.errors {
            *self.errors.entry(*kind).or_default() += n;
        }
        if self.seconds.len() < other.seconds.len() {
            self.seconds.resize_with(other.seconds.len(), Second::default);
        }
        for (mine, theirs) in self.seconds.iter_mut().zip(&other.seconds) {
            mine.ok += theirs.ok;
            mine.errors += theirs.errors;
            mine.bytes += theirs.bytes;
            if let Some(h) = &theirs.latency {
                match &mut mine.latency {
                    Some(m) => {
                        let _ = m.add(h);
                    }
                    None => mine.latency = Some(h.clone()),
                }
            }
        }
    }

    /// Failed requests of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The entry of the second `at` falls in, created as needed.
fn second_of(seconds: &mut Vec<Second>, at: Duration) -> &mut Second {
    let index = usize::try_from(at.as_secs()).unwrap_or(usize::MAX).min(86_400);
    if seconds.len() <= index {
        seconds.resize_with(index + 1, Second::default);
    }
    &mut seconds[index]
}

/// Runs a request workload.
pub async fn run(config: &RunConfig, progress: Arc<Progress>) -> Outcome {
    let start = Instant::now();
    let end = start + config.duration;
    let lanes_per_target = Splitter::lanes(&config.shares, config.connections.max(1));
    let mut tasks = JoinSet::new();
    let mut queues = Vec::new();
    for (index, (&target, &lanes)) in config.targets.iter().zip(&lanes_per_target).enumerate() {
        let (tx, rx) = mpsc::unbounded_channel::<Instant>();
        let rx = Arc::new(Mutex::new(rx));
        queues.push(tx);
        for _ in 0..lanes {
            let lane = Lane::new(target, config.workload.clone());
            let (mode, timeout, progress, rx) = (config.mode, config.timeout, Arc::clone(&progress), Arc::clone(&rx));
            tasks.spawn(async move {
                let recorder = match mode {
                    Mode::Open { .. } => open_lane(lane, rx, start, end, timeout, &progress).await,
                    Mode::Closed => closed_lane(lane, start, end, timeout, &progress).await,
                };
                (index, recorder)
            });
        }
    }
    if let Mode::Open { rate } = config.mode {
        let shares = config.shares.clone();
        let (start, end) = (start.into_std(), end.into_std());
        // A thread of its own: the runtime's timer ticks in milliseconds, and every tick of lateness in
        // starting a request would be counted as the target's latency. A thread's sleep is tens of
        // microseconds late at worst.
        let scheduler = std::thread::spawn(move || schedule(rate, start, end, &shares, &queues));
        let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    } else {
        drop(queues);
    }
    let mut outcome = collect(tasks, config.targets.len(), start, config.duration).await;
    outcome.longest_gap = progress.longest_gap();
    outcome
}

/// Issues intended start times at `rate` until `end`, spreading them over targets by share.
fn schedule(
    rate: f64,
    start: std::time::Instant,
    end: std::time::Instant,
    shares: &[u32],
    queues: &[mpsc::UnboundedSender<Instant>],
) {
    let mut splitter = Splitter::new(shares);
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut sent: u32 = 0;
    loop {
        let intended = start + interval * sent;
        if intended >= end {
            return;
        }
        let now = std::time::Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let _ = queues[splitter.next_target()].send(Instant::from_std(intended));
        sent = sent.saturating_add(1);
    }
}

async fn open_lane(
    mut lane: Lane,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>,
    start: Instant,
    end: Instant,
    timeout: Duration,
    progress: &Progress,
) -> Recorder {
    let mut recorder = Recorder::default();
    loop {
        let Some(intended) = queue.lock().await.recv().await else { break };
        let now = Instant::now();
        // Past the end plus one timeout, a request still queued has failed: it could not be answered in time.
        if now > end + timeout {
            recorder.record(now - start, now - intended, Err(ErrorKind::Timeout));
            progress.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let result = one(&mut lane, timeout).await;
        let done = Instant::now();
        count(progress, done - start, &result);
        recorder.record(done - start, done - intended, result);
    }
    recorder
}

async fn closed_lane(mut lane: Lane, start: Instant, end: Instant, timeout: Duration, progress: &Progress) -> Recorder {
    let mut recorder = Recorder::default();
    while Instant::now() < end {
        let began = Instant::now();
        let result = one(&mut lane, timeout).await;
        let done = Instant::now();
        count(progress, done - start, &result);
        recorder.record(done - start, done - began, result);
        if matches!(result, Err(ErrorKind::Connect)) {
            // A refused connection returns at once: do not spin on it.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    recorder
}

async fn one(lane: &mut Lane, timeout: Duration) -> Result<u64, ErrorKind> {
    match tokio::time::timeout(timeout, lane.request()).await {
        Ok(result) => result,
        Err(_) => {
            lane.reset();
            Err(ErrorKind::Timeout)
        }
    }
}

/// Counts a request that ended `at` after the start; an answer also measures the time since the
/// previous answer of any lane (two atomic operations, shared by every lane).
fn count(progress: &Progress, at: Duration, result: &Result<u64, ErrorKind>) {
    if result.is_err() {
        progress.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    progress.ok.fetch_add(1, Ordering::Relaxed);
    let now = u64::try_from(at.as_micros()).unwrap_or(u64::MAX).max(1);
    let previous = progress.last_answer_us.fetch_max(now, Ordering::Relaxed);
    if previous > 0 && now > previous {
        progress.longest_gap_us.fetch_max(now - previous, Ordering::Relaxed);
    }
}

impl Progress {
    /// Longest time between two answers so far.
    pub fn longest_gap(&self) -> Option<Duration> {
        let gap = self.longest_gap_us.load(Ordering::Relaxed);
        (gap > 0).then(|| Duration::from_micros(gap))
    }
}

async fn collect(mut tasks: JoinSet<(usize, Recorder)>, targets: usize, start: Instant, duration: Duration) -> Outcome {
    let mut per_target = vec![Recorder::default(); targets];
    while let Some(done) = tasks.join_next().await {
        if let Ok((index, recorder)) = done {
            per_target[index].merge(&recorder);
        }
    }
    let mut total = Recorder::default();
    for recorder in &per_target {
        total.merge(recorder);
    }
    Outcome { total, per_target, elapsed: start.elapsed(), duration, longest_gap: None }
}

/// Runs `streams` long TCP streams per target for `duration`, writing as fast as the path allows (and
/// reading back whatever the server answers, so an echo server works as a sink).
pub async fn run_bulk(targets: &[SocketAddr], streams: usize, duration: Duration, progress: Arc<Progress>) -> Outcome {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = JoinSet::new();
    for (index, &target) in targets.iter().enumerate() {
        for _ in 0..streams.max(1) {
            let progress = Arc::clone(&progress);
            tasks.spawn(async move { (index, bulk_stream(target, start, end, &progress).await) });
        }
    }
    collect(tasks, targets.len(), start, duration).await
}

async fn bulk_stream(target: SocketAddr, start: Instant, end: Instant, progress: &Progress) -> Recorder {
    let mut recorder = Recorder::default();
    let stream = match TcpStream::connect(target).await {
        Ok(stream) => stream,
        Err(error) => {
            recorder.record(start.elapsed(), Duration::ZERO, Err(ErrorKind::of(&error)));
            progress.errors.fetch_add(1, Ordering::Relaxed);
            return recorder;
        }
    };
    let (mut reader, mut writer) = stream.into_split();
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 256 * 1024];
        while let Ok(n) = reader.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let chunk = vec![0x5a_u8; 256 * 1024];
    while Instant::now() < end {
        match tokio::time::timeout_at(end, writer.write_all(&chunk)).await {
            Ok(Ok(())) => {
                recorder.record_bytes(start.elapsed(), chunk.len() as u64);
                progress.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                recorder.record(start.elapsed(), Duration::ZERO, Err(ErrorKind::of(&error)));
                progress.errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(_) => break,
        }
    }
    let _ = writer.shutdown().await;
    drain.abort();
    recorder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_is_between_answers_of_any_lane_and_ignores_errors() {
        let progress = Progress::default();
        assert_eq!(progress.longest_gap(), None);
        let ms = Duration::from_millis;
        count(&progress, ms(10), &Ok(1));
        count(&progress, ms(15), &Ok(1));
        // Another lane's answer that is reported late never shortens or lengthens a gap.
        count(&progress, ms(12), &Ok(1));
        count(&progress, ms(30), &Err(ErrorKind::Closed));
        count(&progress, ms(40), &Ok(1));
        count(&progress, ms(41), &Ok(1));
        assert_eq!(progress.longest_gap(), Some(ms(25)));
        assert_eq!((progress.ok.load(Ordering::Relaxed), progress.errors.load(Ordering::Relaxed)), (5, 1));
    }
}
