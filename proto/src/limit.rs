//! Bounds on what clients can make a process hold (descriptors, connections, sessions). A [`Limit`] is
//! taken by [`Permit`] and released when the permit drops, like every other resource here; a refusal is
//! counted and logged at most once per interval, so a flood cannot flood the log too.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// How often a refusing limit, a failing accept or a full table logs.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// At most `max` units held at once.
#[derive(Debug)]
pub struct Limit {
    name: &'static str,
    max: usize,
    held: AtomicUsize,
    refused: AtomicU64,
    /// Callers waiting for a unit: only then does a release wake anyone (the common drop stays one atomic).
    waiting: AtomicUsize,
    /// Wakes callers waiting for a unit (a queue).
    released: Notify,
    throttle: Mutex<Throttle>,
}

/// Units of a [`Limit`], given back on drop.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<Limit>,
    units: usize,
}

/// The failed accepts of one listener. Out of descriptors or memory, accept fails again at once until
/// something is freed: each failure waits a moment instead of spinning, and is logged at most once per
/// interval with how many were held back.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: String,
    throttle: Throttle,
}

// === impl AcceptErrors ===

impl AcceptErrors {
    /// The failed accepts of `listener` (a name for logs: "tcp:80", "the JSON control channel").
    pub fn new(listener: impl ToString) -> Self {
        AcceptErrors { listener: listener.to_string(), throttle: Throttle::new(WARN_EVERY) }
    }

    /// Notes `error`, logs it when one is due, and waits before the next accept.
    pub async fn back_off(&mut self, error: &std::io::Error) {
        if let Some(held_back) = self.throttle.admit(Instant::now()) {
            tracing::warn!(listener = %self.listener, %error, repeated = held_back, "accept failed; backing off");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One caller waiting in [`Limit::take_within`], counted out on drop.
struct Waiting<'a>(&'a Limit);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Lets an event through at most once per interval, counting the ones held back: a pure state machine on
/// the caller's clock.
#[derive(Debug, Clone)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

// === impl Limit ===

impl Limit {
    /// `max` units of `name` (a phrase for logs: "client file descriptors").
    pub fn new(name: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Limit {
            name,
            max,
            held: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            released: Notify::new(),
            throttle: Mutex::new(Throttle::new(WARN_EVERY)),
        })
    }

    /// `units` more, if they fit.
    pub fn try_take(self: &Arc<Self>, units: usize) -> Option<Permit> {
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(units).filter(|&total| total <= self.max)
            })
            .ok()
            .map(|_| Permit { limit: Arc::clone(self), units })
    }

    /// `units` more, waiting up to `wait` for others to give theirs back (a queue, like HAProxy's
    /// maxqueue). `None` when the wait is over.
    pub async fn take_within(self: &Arc<Self>, units: usize, wait: Duration) -> Option<Permit> {
        if let Some(permit) = self.try_take(units) {
            return Some(permit);
        }
        if wait.is_zero() {
            return None;
        }
        let deadline = Instant::now() + wait;
        // SeqCst with the release's pair below: either the release sees this waiter, or this waiter's next
        // try sees the release. The guard counts the waiter out however the wait ends (even dropped).
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        loop {
            // Registered before the check, so a release between the two is not missed.
            let released = self.released.notified();
            if let Some(permit) = self.try_take(units) {
                break Some(permit);
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                break self.try_take(units);
            }
        }
    }

    /// Counts one refusal, and logs the refusals of the last interval when one is due.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let due = self.throttle.lock().unwrap_or_else(|e| e.into_inner()).admit(Instant::now());
        if let Some(held_back) = due {
            tracing::warn!(
                limit = self.name,
                max = self.max,
                refused_since_last_warning = held_back + 1,
                "limit reached: refusing"
            );
        }
    }

    /// Units held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Refusals since the start.
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.held.fetch_sub(self.units, Ordering::SeqCst);
        if self.limit.waiting.load(Ordering::SeqCst) > 0 {
            self.limit.released.notify_waiters();
        }
    }
}

// === impl Throttle ===

impl Throttle {
    /// At most one event per `every`.
    pub fn new(every: Duration) -> Self {
        Throttle { every, last: None, held_back: 0 }
    }

    /// `Some(events held back since the last one let through)` when an event at `now` may go through.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now < last + self.every) {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_fit_under_the_limit_and_come_back_on_drop() {
        let limit = Limit::new("things", 3);
        let two = limit.try_take(2).unwrap();
        assert!(limit.try_take(2).is_none());
        let one = limit.try_take(1).unwrap();
        assert_eq!(limit.held(), 3);
        drop(two);
        assert_eq!(limit.held(), 1);
        assert!(limit.try_take(2).is_some());
        drop(one);
        limit.refused();
        assert_eq!(limit.refusals(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_waits_for_a_release_or_its_time() {
        let limit = Limit::new("things", 1);
        let held = limit.try_take(1).unwrap();
        assert!(limit.take_within(1, Duration::from_millis(100)).await.is_none(), "nothing released in time");
        let waiter = tokio::spawn({
            let limit = Arc::clone(&limit);
            async move { limit.take_within(1, Duration::from_secs(5)).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        assert!(waiter.await.unwrap(), "the release lets the queued caller in");
    }

    #[test]
    fn the_throttle_lets_one_event_per_interval_through_and_counts_the_rest() {
        let start = Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.admit(start), Some(0));
        assert_eq!(throttle.admit(start + Duration::from_secs(1)), None);
        assert_eq!(throttle.admit(start + Duration::from_secs(9)), None);
        assert_eq!(throttle.admit(start + Duration::from_secs(10)), Some(2));
        assert_eq!(throttle.admit(start + Duration::from_secs(11)), None);
    }
}
