//! Reconnect backoff: 250 ms doubling to 5 s, ±20 % jitter, reset after a session that lasted
//! 30 s; at least 30 s after the coordinator said the device is revoked.

use std::time::Duration;

pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Short enough that devices are back within seconds of a coordinator restart.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session this long counts as healthy: the next failure starts from the minimum again.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// A revoked device asks again this rarely at most.
pub const REVOKED_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The wait before the next attempt, after one that lasted `attempt` (from connecting to the
    /// end of the session). `jitter` is drawn from [0.8, 1.2).
    pub fn next_wait(&mut self, attempt: Duration, revoked: bool, jitter: f64) -> Duration {
        if attempt > BACKOFF_RESET_AFTER {
            self.next = BACKOFF_MIN;
        }
        let floor = if revoked {
            REVOKED_RETRY
        } else {
            Duration::ZERO
        };
        let wait = self.next.mul_f64(jitter).max(floor);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets_after_a_long_session() {
        let mut b = Backoff::default();
        let short = Duration::from_secs(1);
        let waits: Vec<u128> = (0..7)
            .map(|_| b.next_wait(short, false, 1.0).as_millis())
            .collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(b.next_wait(short, false, 0.8).as_millis(), 4000);
        assert_eq!(
            b.next_wait(Duration::from_secs(31), false, 1.2).as_millis(),
            300
        );
        assert_eq!(b.next_wait(short, true, 1.0), REVOKED_RETRY);
    }
}
