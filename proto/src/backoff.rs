//! Reconnect policy shared by every client of the contract (data-plane nodes, agents): capped exponential
//! backoff with jitter, so many clients that lost the controller at once do not return in lockstep.

use std::{
    hash::{BuildHasher, RandomState},
    time::Duration,
};

/// Exponential backoff, each delay jittered between half and all of the current step.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    seed: RandomState,
    attempt: u64,
}

impl Backoff {
    /// Starts at `min`, doubles per attempt, never waits more than `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max, step: min, seed: RandomState::new(), attempt: 0 }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt += 1;
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        // Jitter spreads the reconnects of many nodes after a controller restart.
        let fraction = (self.seed.hash_one(self.attempt) % 1000) as f64 / 1000.0;
        step.mul_f64(0.5 + fraction / 2.0)
    }

    /// Back to `min`, after a success.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for d in &delays {
            assert!(*d <= Duration::from_secs(2), "{d:?}");
        }
        assert!(delays[7] >= Duration::from_secs(1), "capped step, at least half of it: {:?}", delays[7]);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
