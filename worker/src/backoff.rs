//! Exponential backoff with jitter for reconnects and report retries.
//!
//! Jitter spreads a fleet of workers that lost the same coordinator at the
//! same instant, so they do not all knock on its door in the same millisecond
//! when it comes back.

use std::time::Duration;

use rand::Rng;

const INITIAL: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

/// 100 ms doubling to 5 s; each delay is drawn from the upper half of the
/// current step ("equal jitter"), so it never collapses to zero.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    step: Duration,
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            step: INITIAL,
            attempt: 0,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(MAX);
        self.attempt += 1;
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// How many delays were handed out since the last reset.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over after a success.
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= INITIAL);
        assert!(delays[1] >= Duration::from_millis(100) && delays[1] <= Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= MAX));
        assert!(delays[9] >= MAX / 2);
        assert_eq!(b.attempt(), 10);
        b.reset();
        assert!(b.next_delay() <= INITIAL);
    }
}
