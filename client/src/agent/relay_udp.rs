//! The device's side of a relay link's plain-UDP data path, I/O-free (time passed in):
//! whether relayed datagrams go to the relay in plain UDP or as QUIC datagrams, and what to
//! send to get and keep a binding, and the plain-UDP data framing ([`frame_data`],
//! [`parse_data`]). Driven by the daemon's relay link task (`daemon/relay_plain.rs`): each
//! QUIC relay link whose relay speaks forwarding version 2 runs one [`PlainUdp`].
//!
//! The exchange (protocol in `ward_shared::relay`): on a version-2 link the device sends
//! `UdpBind` on its QUIC stream; the relay answers `UdpBinding{token, nonce}`; the device
//! sends the confirm `0x01 || token || nonce` in plain UDP from its relay socket (resent every
//! [`CONFIRM_RESEND`] until answered: a lost datagram is normal) and the relay answers
//! `UdpBound` on the stream. Then relayed datagrams go as `0x02 || token || id || WireGuard`.
//!
//! - The confirm not acknowledged within [`BIND_TIMEOUT`] of the request: QUIC datagrams stay
//!   (or come back), and the device tries again after [`RETRY_AFTER`].
//! - Bound, it asks again every [`REFRESH_EVERY`]: the fresh confirm keeps its NAT mapping
//!   open (as WireGuard's keepalive does) and proves the path still carries plain UDP; a
//!   refresh not acknowledged within [`BIND_TIMEOUT`] (the UDP path went silent) falls back to
//!   QUIC datagrams at once, then retries as above.
//! - A binding message that answers nothing asked (a stale nonce, `UdpBound` with no confirm
//!   outstanding) is ignored.

use std::time::{Duration, Instant};
use ward_shared::relay::{split_datagram, UDP_BIND_LEN};

/// First byte of a confirm datagram.
pub const CONFIRM_MARK: u8 = 0x01;
/// First byte of a data datagram.
pub const DATA_MARK: u8 = 0x02;
/// Bytes before the relay header of a data datagram: the mark and the token.
pub const DATA_PREFIX_LEN: usize = 1 + UDP_BIND_LEN;

/// How often an unanswered confirm is sent again.
pub const CONFIRM_RESEND: Duration = Duration::from_millis(250);
/// How long a request has to end in `UdpBound` before the path counts as not working.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a failure the device asks again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How often a bound path is confirmed again (keepalive and liveness).
pub const REFRESH_EVERY: Duration = Duration::from_secs(15);

/// What the driver sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `UdpBind` on the link's QUIC stream.
    Request,
    /// This confirm datagram in plain UDP to the relay.
    Confirm([u8; 1 + 2 * UDP_BIND_LEN]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Not asked yet, or waiting out [`RETRY_AFTER`] after a failure.
    Idle { next: Instant },
    /// `UdpBind` sent at `asked`; confirming once the answer came.
    Binding {
        asked: Instant,
        confirm: Option<([u8; 1 + 2 * UDP_BIND_LEN], Instant)>,
    },
}

/// One relay link's plain-UDP state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainUdp {
    phase: Phase,
    /// The bound token and when the binding was last acknowledged (`Some`: sends go plain).
    bound: Option<([u8; UDP_BIND_LEN], Instant)>,
    /// Attempts that timed out so far (each leaves or keeps the link on QUIC datagrams).
    pub fallbacks: u64,
}

impl PlainUdp {
    /// A version-2 link just welcomed at `now`: asks at once.
    pub fn new(now: Instant) -> Self {
        PlainUdp {
            phase: Phase::Idle { next: now },
            bound: None,
            fallbacks: 0,
        }
    }

    /// The token relayed sends carry in plain UDP; `None`: send QUIC datagrams.
    pub fn token(&self) -> Option<[u8; UDP_BIND_LEN]> {
        self.bound.map(|(t, _)| t)
    }

    /// The relay's `UdpBinding` answer.
    pub fn handle_binding(
        &mut self,
        token: [u8; UDP_BIND_LEN],
        nonce: [u8; UDP_BIND_LEN],
        now: Instant,
    ) -> Option<Action> {
        let Phase::Binding { asked, .. } = self.phase else {
            return None; // nothing asked: stale
        };
        let mut c = [0u8; 1 + 2 * UDP_BIND_LEN];
        c[0] = CONFIRM_MARK;
        c[1..=UDP_BIND_LEN].copy_from_slice(&token);
        c[1 + UDP_BIND_LEN..].copy_from_slice(&nonce);
        self.phase = Phase::Binding {
            asked,
            confirm: Some((c, now)),
        };
        Some(Action::Confirm(c))
    }

    /// The relay's `UdpBound`: sends go plain until the next refresh fails.
    pub fn handle_bound(&mut self, now: Instant) {
        let Phase::Binding {
            confirm: Some((c, _)),
            ..
        } = self.phase
        else {
            return; // no confirm outstanding: stale
        };
        let mut token = [0u8; UDP_BIND_LEN];
        token.copy_from_slice(&c[1..=UDP_BIND_LEN]);
        self.bound = Some((token, now));
        self.phase = Phase::Idle {
            next: now + REFRESH_EVERY,
        };
    }

    /// When [`PlainUdp::handle_timer`] has something to do next: the next request, the
    /// confirm's resend, or the attempt's timeout.
    pub fn poll_timeout(&self) -> Instant {
        match self.phase {
            Phase::Idle { next } => next,
            Phase::Binding { asked, confirm } => {
                // The timeout counts once more than BIND_TIMEOUT has passed.
                let timeout = asked + BIND_TIMEOUT + Duration::from_millis(1);
                confirm.map_or(timeout, |(_, sent)| timeout.min(sent + CONFIRM_RESEND))
            }
        }
    }

    /// What to send now (call at [`PlainUdp::poll_timeout`] and after each event).
    pub fn handle_timer(&mut self, now: Instant) -> Option<Action> {
        match self.phase {
            Phase::Idle { next } if now >= next => {
                self.phase = Phase::Binding {
                    asked: now,
                    confirm: None,
                };
                Some(Action::Request)
            }
            Phase::Idle { .. } => None,
            Phase::Binding { asked, .. } if now.saturating_duration_since(asked) > BIND_TIMEOUT => {
                self.bound = None;
                self.fallbacks = self.fallbacks.saturating_add(1);
                self.phase = Phase::Idle {
                    next: now + RETRY_AFTER,
                };
                None
            }
            Phase::Binding {
                asked,
                confirm: Some((c, sent)),
            } if now.saturating_duration_since(sent) >= CONFIRM_RESEND => {
                self.phase = Phase::Binding {
                    asked,
                    confirm: Some((c, now)),
                };
                Some(Action::Confirm(c))
            }
            Phase::Binding { .. } => None,
        }
    }
}

/// Appends the plain-UDP form of a relayed datagram to `out`: `DATA || token || framed`,
/// where `framed` is the QUIC datagram form (8-byte destination device id, then WireGuard).
pub fn frame_data(out: &mut Vec<u8>, token: &[u8; UDP_BIND_LEN], framed: &[u8]) {
    out.push(DATA_MARK);
    out.extend_from_slice(token);
    out.extend_from_slice(framed);
}

/// Why a datagram received on a relay link's plain-UDP socket was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainDrop {
    /// From another address than the relay's.
    WrongSource,
    /// Not a data datagram (another mark, or shorter than its prefix).
    NotData,
    /// Carries another token than this link's (or the link has none yet).
    WrongToken,
    /// The relay header or the datagram behind it is malformed (empty, too large).
    Malformed,
}

impl PlainDrop {
    pub fn as_str(self) -> &'static str {
        match self {
            PlainDrop::WrongSource => "wrong_source",
            PlainDrop::NotData => "not_data",
            PlainDrop::WrongToken => "wrong_token",
            PlainDrop::Malformed => "malformed",
        }
    }
}

/// One datagram received in plain UDP from the relay: `DATA || token || source device id ||
/// WireGuard`. Returns the source device and the WireGuard datagram if it is a data datagram
/// carrying `token` (`None`: the link has no token) with a well-formed relay header.
pub fn parse_data<'a>(
    d: &'a [u8],
    token: Option<&[u8; UDP_BIND_LEN]>,
) -> Result<(u64, &'a [u8]), PlainDrop> {
    let Some((prefix, framed)) = d.split_at_checked(DATA_PREFIX_LEN) else {
        return Err(PlainDrop::NotData);
    };
    if prefix[0] != DATA_MARK {
        return Err(PlainDrop::NotData);
    }
    let Some(token) = token else {
        return Err(PlainDrop::WrongToken);
    };
    if prefix[1..] != token[..] {
        return Err(PlainDrop::WrongToken);
    }
    let (from, body) = split_datagram(framed).ok_or(PlainDrop::Malformed)?;
    Ok((from.0, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data framing round-trips; anything else is refused with its reason.
    #[test]
    fn data_framing_round_trips_and_refuses_what_is_not_ours() {
        let mut framed = 9u64.to_be_bytes().to_vec();
        framed.extend_from_slice(b"wireguard");
        let mut out = vec![0xaa]; // appended after what is there
        frame_data(&mut out, &T, &framed);
        assert_eq!(out.len(), 1 + DATA_PREFIX_LEN + framed.len());
        let d = &out[1..];
        assert_eq!(d[0], DATA_MARK);
        assert_eq!(&d[1..17], &T);
        assert_eq!(parse_data(d, Some(&T)), Ok((9, &b"wireguard"[..])));
        assert_eq!(parse_data(d, Some(&N1)), Err(PlainDrop::WrongToken));
        assert_eq!(parse_data(d, None), Err(PlainDrop::WrongToken));
        let mut confirm = d.to_vec();
        confirm[0] = CONFIRM_MARK;
        assert_eq!(parse_data(&confirm, Some(&T)), Err(PlainDrop::NotData));
        assert_eq!(parse_data(&d[..5], Some(&T)), Err(PlainDrop::NotData));
        assert_eq!(parse_data(&[], Some(&T)), Err(PlainDrop::NotData));
        // A header with nothing behind it, or a short header.
        assert_eq!(
            parse_data(&d[..DATA_PREFIX_LEN + 8], Some(&T)),
            Err(PlainDrop::Malformed)
        );
        assert_eq!(
            parse_data(&d[..DATA_PREFIX_LEN + 3], Some(&T)),
            Err(PlainDrop::Malformed)
        );
        let mut big = Vec::new();
        frame_data(&mut big, &T, &vec![0u8; 8 + 4096]);
        assert_eq!(parse_data(&big, Some(&T)), Err(PlainDrop::Malformed));
    }

    /// A driver that wakes only at `poll_timeout` misses nothing: just before it, the timer
    /// does nothing; at it, the next step happens (request, resend, timeout, refresh).
    #[test]
    fn the_timer_acts_at_its_poll_timeout_and_not_before() {
        let t0 = Instant::now();
        let mut p = PlainUdp::new(t0);
        let step = |p: &mut PlainUdp| {
            let at = p.poll_timeout();
            let before = p.clone();
            assert_eq!(p.handle_timer(at - Duration::from_millis(1)), None);
            assert_eq!(*p, before, "nothing changes before the poll timeout");
            (at, p.handle_timer(at))
        };
        assert_eq!(step(&mut p), (t0, Some(Action::Request)));
        let Some(Action::Confirm(c)) = p.handle_binding(T, N1, ms(t0, 100)) else {
            panic!("a confirm")
        };
        assert_eq!(
            step(&mut p),
            (ms(t0, 100) + CONFIRM_RESEND, Some(Action::Confirm(c)))
        );
        // Unanswered: resent until the attempt times out, then the next attempt waits.
        let mut resends = 0;
        loop {
            match step(&mut p) {
                (_, Some(Action::Confirm(_))) => resends += 1,
                (at, None) => {
                    assert_eq!(at, t0 + BIND_TIMEOUT + Duration::from_millis(1));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(resends >= 5, "{resends} resends");
        assert_eq!(p.fallbacks, 1);
        let retry = p.poll_timeout();
        assert_eq!(
            retry,
            t0 + BIND_TIMEOUT + Duration::from_millis(1) + RETRY_AFTER
        );
        assert_eq!(step(&mut p), (retry, Some(Action::Request)));
        let Some(Action::Confirm(_)) = p.handle_binding(T, N2, retry) else {
            panic!("a confirm")
        };
        p.handle_bound(retry);
        assert_eq!(step(&mut p), (retry + REFRESH_EVERY, Some(Action::Request)));
    }

    const T: [u8; UDP_BIND_LEN] = [7; UDP_BIND_LEN];
    const N1: [u8; UDP_BIND_LEN] = [1; UDP_BIND_LEN];
    const N2: [u8; UDP_BIND_LEN] = [2; UDP_BIND_LEN];

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Request, confirm (resent while unanswered, carrying token and nonce), bound: sends go
    /// plain with the token.
    #[test]
    fn binds_after_the_confirm_is_acknowledged_resending_it_meanwhile() {
        let t0 = Instant::now();
        let mut p = PlainUdp::new(t0);
        assert_eq!(p.token(), None);
        assert_eq!(p.handle_timer(t0), Some(Action::Request));
        assert_eq!(p.handle_timer(ms(t0, 100)), None, "asked once");
        let Some(Action::Confirm(c)) = p.handle_binding(T, N1, ms(t0, 120)) else {
            panic!("a confirm")
        };
        assert_eq!(c[0], 0x01);
        assert_eq!(&c[1..17], &T);
        assert_eq!(&c[17..], &N1);
        assert_eq!(p.handle_timer(ms(t0, 200)), None);
        assert_eq!(
            p.handle_timer(ms(t0, 380)),
            Some(Action::Confirm(c)),
            "resent"
        );
        assert_eq!(p.token(), None, "not before UdpBound");
        p.handle_bound(ms(t0, 400));
        assert_eq!(p.token(), Some(T));
        assert_eq!(
            p.handle_timer(ms(t0, 700)),
            None,
            "nothing to send while bound"
        );
    }

    /// No `UdpBound` within the timeout: QUIC datagrams stay; asked again after the retry
    /// delay, not before.
    #[test]
    fn an_unacknowledged_confirm_keeps_quic_and_retries_later() {
        let t0 = Instant::now();
        let mut p = PlainUdp::new(t0);
        assert_eq!(p.handle_timer(t0), Some(Action::Request));
        assert!(p.handle_binding(T, N1, ms(t0, 50)).is_some());
        let mut t = 50;
        while t < 2_000 {
            t += 250;
            let _ = p.handle_timer(ms(t0, t));
        }
        assert_eq!(p.handle_timer(ms(t0, 2_100)), None);
        assert_eq!(p.token(), None);
        assert_eq!(p.fallbacks, 1);
        assert_eq!(
            p.handle_timer(ms(t0, 20_000)),
            None,
            "waits out the retry delay"
        );
        assert_eq!(p.handle_timer(ms(t0, 32_200)), Some(Action::Request));
        // A relay that never answers the request at all: the same.
        assert_eq!(p.handle_timer(ms(t0, 34_300)), None);
        assert_eq!(p.token(), None);
    }

    /// Bound, the device confirms again every refresh interval (its NAT mapping stays open);
    /// a refresh left unanswered means the UDP path went silent: back to QUIC at once.
    #[test]
    fn a_silent_path_falls_back_to_quic_and_a_live_one_stays_plain() {
        let t0 = Instant::now();
        let mut p = PlainUdp::new(t0);
        p.handle_timer(t0);
        p.handle_binding(T, N1, t0);
        p.handle_bound(ms(t0, 10));
        assert_eq!(p.handle_timer(ms(t0, 15_000)), None);
        assert_eq!(
            p.handle_timer(ms(t0, 15_010)),
            Some(Action::Request),
            "refresh"
        );
        assert_eq!(p.token(), Some(T), "still plain while refreshing");
        let Some(Action::Confirm(c)) = p.handle_binding(T, N2, ms(t0, 15_050)) else {
            panic!("a confirm")
        };
        assert_eq!(&c[17..], &N2, "the fresh nonce");
        p.handle_bound(ms(t0, 15_060));
        assert_eq!(p.token(), Some(T));
        // The next refresh goes unanswered.
        assert_eq!(p.handle_timer(ms(t0, 30_060)), Some(Action::Request));
        assert_eq!(p.handle_timer(ms(t0, 31_000)), None);
        assert_eq!(p.token(), Some(T));
        assert_eq!(p.handle_timer(ms(t0, 32_100)), None);
        assert_eq!(p.token(), None, "silent: QUIC datagrams again");
        assert_eq!(p.fallbacks, 1);
        assert_eq!(
            p.handle_timer(ms(t0, 62_100)),
            Some(Action::Request),
            "retries"
        );
    }

    /// Binding messages that answer nothing asked change nothing.
    #[test]
    fn unrequested_binding_messages_are_ignored() {
        let t0 = Instant::now();
        let mut p = PlainUdp::new(t0 + Duration::from_secs(1));
        assert_eq!(p.handle_binding(T, N1, t0), None, "nothing asked yet");
        p.handle_bound(t0);
        assert_eq!(p.token(), None, "UdpBound with no confirm outstanding");
        assert_eq!(p.handle_timer(ms(t0, 1_000)), Some(Action::Request));
        p.handle_bound(ms(t0, 1_010));
        assert_eq!(p.token(), None, "UdpBound before the binding answer");
    }
}
