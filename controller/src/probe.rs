//! Hello probes: the health check of a registration, shared by the JSON channel and the gRPC `Register`
//! stream. A pure state machine driven by the caller's timer, so its timing is unit-tested without sockets.
//!
//! A hello goes out every `interval`; each must be answered within `timeout`; `failures` unanswered hellos
//! in a row end the registration. Any answer (including an unsolicited one) resets the count.

use std::time::Duration;

use contract::model::ProbeOverrides;
use tokio::time::Instant;

/// How a registration is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Time between two hellos.
    pub interval: Duration,
    /// Time to answer one hello.
    pub timeout: Duration,
    /// Missed hellos in a row that end the registration.
    pub failures: u32,
}

// === impl ProbeSettings ===

impl ProbeSettings {
    /// These settings, with what a registration asked for in place of the controller's.
    pub fn with(self, overrides: ProbeOverrides) -> Self {
        ProbeSettings {
            interval: overrides.interval.unwrap_or(self.interval),
            timeout: overrides.timeout.unwrap_or(self.timeout),
            failures: overrides.failures.unwrap_or(self.failures),
        }
    }
}

/// What the caller must do after [`Probe::on_timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeAction {
    /// Nothing yet.
    Wait,
    /// Send hello number `seq`.
    SendHello(u64),
    /// Too many hellos went unanswered: remove the registration and close its channel.
    Expired {
        /// How many in a row.
        misses: u32,
    },
}

/// Probe state of one registration.
#[derive(Debug)]
pub struct Probe {
    settings: ProbeSettings,
    seq: u64,
    next_hello: Instant,
    /// Deadline of the oldest unanswered hello.
    answer_by: Option<Instant>,
    /// When the latest unanswered hello went out.
    sent_at: Option<Instant>,
    misses: u32,
}

// === impl Probe ===

impl Probe {
    /// Starts probing: the first hello goes out one interval from `now`.
    pub fn new(settings: ProbeSettings, now: Instant) -> Self {
        Probe { settings, seq: 0, next_hello: now + settings.interval, answer_by: None, sent_at: None, misses: 0 }
    }

    /// When [`Probe::on_timer`] must next be called.
    pub fn deadline(&self) -> Instant {
        self.answer_by.map_or(self.next_hello, |by| by.min(self.next_hello))
    }

    /// Advances to `now`.
    pub fn on_timer(&mut self, now: Instant) -> ProbeAction {
        if self.answer_by.is_some_and(|by| now >= by) {
            self.answer_by = None;
            self.misses += 1;
            if self.misses >= self.settings.failures {
                return ProbeAction::Expired { misses: self.misses };
            }
        }
        if now >= self.next_hello {
            self.seq += 1;
            self.next_hello = now + self.settings.interval;
            // With a timeout longer than the interval, the oldest outstanding hello keeps its deadline.
            self.answer_by.get_or_insert(now + self.settings.timeout);
            self.sent_at = Some(now);
            return ProbeAction::SendHello(self.seq);
        }
        ProbeAction::Wait
    }

    /// The registration answered (or spoke up unasked): it is alive. Returns the round trip when a hello
    /// was waiting for this answer.
    pub fn on_answer(&mut self, now: Instant) -> Option<Duration> {
        self.answer_by = None;
        self.misses = 0;
        self.sent_at.take().map(|sent| now.saturating_duration_since(sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: ProbeSettings =
        ProbeSettings { interval: Duration::from_millis(100), timeout: Duration::from_millis(50), failures: 3 };

    /// Runs the probe to `until`, answering every hello when `answer` says so; returns the expiry time.
    fn drive(probe: &mut Probe, start: Instant, until: Duration, answer: impl Fn(u64) -> bool) -> Option<Duration> {
        loop {
            let now = probe.deadline();
            if now - start > until {
                return None;
            }
            match probe.on_timer(now) {
                ProbeAction::SendHello(seq) if answer(seq) => {
                    probe.on_answer(now);
                }
                ProbeAction::Expired { misses } => {
                    assert_eq!(misses, 3);
                    return Some(now - start);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn a_silent_registration_expires_after_failures_intervals_plus_timeout() {
        let start = Instant::now();
        let mut probe = Probe::new(SETTINGS, start);
        let expired = drive(&mut probe, start, Duration::from_secs(5), |_| false).unwrap();
        assert_eq!(expired, Duration::from_millis(350));
    }

    #[test]
    fn answers_keep_it_alive_and_reset_the_count() {
        let start = Instant::now();
        let mut probe = Probe::new(SETTINGS, start);
        assert_eq!(drive(&mut probe, start, Duration::from_secs(5), |_| true), None);
        // Two misses, then an answer, then two misses: never three in a row.
        let mut probe = Probe::new(SETTINGS, start);
        assert_eq!(drive(&mut probe, start, Duration::from_secs(5), |seq| seq % 3 == 0), None);
    }

    #[test]
    fn hellos_are_numbered_and_spaced_by_the_interval() {
        let start = Instant::now();
        let mut probe = Probe::new(SETTINGS, start);
        assert_eq!(probe.on_timer(start), ProbeAction::Wait);
        assert_eq!(probe.deadline(), start + SETTINGS.interval);
        let sent = probe.deadline();
        assert_eq!(probe.on_timer(sent), ProbeAction::SendHello(1));
        assert_eq!(probe.on_answer(sent + Duration::from_millis(3)), Some(Duration::from_millis(3)));
        assert_eq!(probe.on_answer(sent + Duration::from_millis(4)), None, "one round trip per hello");
        assert_eq!(probe.deadline(), start + 2 * SETTINGS.interval);
        assert_eq!(probe.on_timer(probe.deadline()), ProbeAction::SendHello(2));
    }
}
