//! Clock offset between this device and the coordinator, measured with ping/pong: leases and
//! posture stamps are judged in coordinator time, so a device with a wrong clock still agrees
//! with its peers on when a lease ends.

use std::time::Instant;

/// The latest offset (coordinator time minus device time, ms) and the ping in flight.
#[derive(Debug, Default)]
pub struct ClockOffset {
    offset_ms: Option<i64>,
    /// (nonce, sent at, device wall clock ms when sent)
    in_flight: Option<(u64, Instant, i64)>,
}

impl ClockOffset {
    /// The offset, once one pong has been answered.
    pub fn offset_ms(&self) -> Option<i64> {
        self.offset_ms
    }

    /// A ping with `nonce` leaves now; an earlier unanswered ping is forgotten.
    pub fn ping_sent(&mut self, nonce: u64, now: Instant, unix_ms: i64) {
        self.in_flight = Some((nonce, now, unix_ms));
    }

    /// A pong arrived: the new offset if it answers the ping in flight (half the round trip is
    /// assumed to be the way back). Any other pong is ignored.
    pub fn handle_pong(
        &mut self,
        nonce: u64,
        coordinator_time_ms: i64,
        now: Instant,
    ) -> Option<i64> {
        let (n, sent, sent_ms) = self.in_flight.take()?;
        if n != nonce {
            return None;
        }
        let rtt =
            i64::try_from(now.saturating_duration_since(sent).as_millis()).unwrap_or(i64::MAX);
        // The coordinator's stamp is remote input: saturate rather than overflow.
        let offset = coordinator_time_ms.saturating_sub(sent_ms.saturating_add(rtt / 2));
        self.offset_ms = Some(offset);
        Some(offset)
    }

    /// The session ended: a pong can no longer arrive.
    pub fn forget_ping(&mut self) {
        self.in_flight = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn offset_is_measured_from_half_the_round_trip() {
        let t0 = Instant::now();
        let mut c = ClockOffset::default();
        assert_eq!(c.offset_ms(), None);
        c.ping_sent(7, t0, 1_000_000);
        // A pong for another nonce is ignored (and the ping is given up, as before).
        assert_eq!(
            c.handle_pong(8, 1_060_000, t0 + Duration::from_millis(100)),
            None
        );
        c.ping_sent(9, t0, 1_000_000);
        // The coordinator stamped 1_060_050 halfway through a 100 ms round trip: +60 s.
        assert_eq!(
            c.handle_pong(9, 1_060_050, t0 + Duration::from_millis(100)),
            Some(60_000)
        );
        assert_eq!(c.offset_ms(), Some(60_000));
        // A second pong for the same ping changes nothing.
        assert_eq!(c.handle_pong(9, 0, t0 + Duration::from_millis(200)), None);
        assert_eq!(c.offset_ms(), Some(60_000));
    }

    #[test]
    fn extreme_coordinator_stamps_saturate() {
        let t0 = Instant::now();
        let mut c = ClockOffset::default();
        c.ping_sent(1, t0, i64::MAX - 5);
        assert_eq!(c.handle_pong(1, i64::MIN, t0), Some(i64::MIN));
        c.ping_sent(2, t0, i64::MIN + 5);
        assert_eq!(c.handle_pong(2, i64::MAX, t0), Some(i64::MAX));
    }
}
