//! Reconnect backoff with full jitter: the n-th failure in a row waits a uniformly random time
//! in `[0, min(10 s, 200 ms × 2ⁿ⁻¹)]`, so the devices of a coordinator that just failed spread
//! their reconnects over the window instead of arriving at another replica all at once. A
//! session that delivered its netmap resets it; a revoked device waits at least 30 s.
//!
//! I/O-free: the randomness is a `u64` the caller draws from its seeded generator.

use std::time::Duration;

/// The first failure's window.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// The widest window: devices are back within seconds of a coordinator restart.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A revoked device asks again this rarely at most.
pub const REVOKED_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Backoff {
    /// Failures since the last working session.
    failures: u32,
}

impl Backoff {
    /// The window the next failure draws its wait from.
    pub fn window(&self) -> Duration {
        let doublings = self.failures.min(16);
        BACKOFF_MIN
            .saturating_mul(1u32 << doublings)
            .min(BACKOFF_MAX)
    }

    /// One more failure: the wait before the next attempt, drawn from the current window with
    /// `random` (any `u64`, uniform); at least [`REVOKED_RETRY`] when `revoked`.
    pub fn next_wait(&mut self, revoked: bool, random: u64) -> Duration {
        let window = self.window();
        self.failures = self.failures.saturating_add(1);
        // The top 53 bits as a fraction in [0, 1].
        let frac = (random >> 11) as f64 / ((1u64 << 53) - 1) as f64;
        let wait = window.mul_f64(frac);
        if revoked {
            wait.max(REVOKED_RETRY)
        } else {
            wait
        }
    }

    /// A session worked: the next failure starts from the smallest window again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let mut windows = Vec::new();
        for _ in 0..9 {
            windows.push(b.window().as_millis());
            // The largest draw lands on the window's edge, never past it.
            let w = b.window();
            assert_eq!(b.next_wait(false, u64::MAX), w);
        }
        assert_eq!(
            windows,
            [200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]
        );
        // Many failures never overflow.
        for _ in 0..100 {
            assert!(b.next_wait(false, u64::MAX) <= BACKOFF_MAX);
        }
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_wait(false, u64::MAX), BACKOFF_MIN);
        assert_eq!(b.next_wait(false, 0), Duration::ZERO);
        assert_eq!(b.next_wait(true, 0), REVOKED_RETRY);
    }

    #[test]
    fn full_jitter_spreads_waits_over_the_window() {
        // 1000 devices failing at the same moment with the window at 6.4 s: the draws cover
        // the window evenly (each tenth gets 6–14 %), none outside it.
        let mut state = 42u64;
        let mut buckets = [0u32; 10];
        for _ in 0..1000 {
            let mut b = Backoff { failures: 5 };
            let w = b.window();
            let wait = b.next_wait(false, crate::agent::next_random(&mut state));
            assert!(wait <= w);
            let i = ((wait.as_secs_f64() / w.as_secs_f64()) * 10.0) as usize;
            buckets[i.min(9)] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!((60..=140).contains(n), "tenth {i} got {n}: {buckets:?}");
        }
    }
}
