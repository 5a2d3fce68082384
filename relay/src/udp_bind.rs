//! The I/O-free core of a plain-UDP relay data path: which UDP source address may send a
//! device connection's datagrams, and where that device's datagrams go, without QUIC per
//! packet. Driven by [`crate::udp_path`] (the relay's socket and the device streams) for
//! connections whose `Hello` said forwarding version 2.
//!
//! The idea: QUIC (already authenticated: device certificate and ticket checked by
//! [`crate::forward::Forwarder`]) stays the control channel. Over it a device asks for a UDP
//! binding; the relay answers with the connection's *token* (random, [`TOKEN_LEN`] bytes, one
//! per connection for its lifetime) and a fresh single-use *nonce*. The device then sends a
//! confirm datagram `CONFIRM || token || nonce` in plain UDP from the socket it will relay
//! through; the relay binds the confirm's source address to the connection. Data datagrams are
//! `DATA || token || 8-byte device id || WireGuard datagram`, both ways (towards the relay the
//! id names the destination, from it the source, exactly as the QUIC datagram header does, so
//! the forwarding core routes them unchanged; the relay rewrites token and id in place).
//!
//! Why this resists spoofing:
//! - An address is bound only by a confirm that carries the nonce the relay sent over the
//!   encrypted QUIC link, once: an off-path sender knows neither token nor nonce; an on-path
//!   observer who saw a confirm cannot replay it (the nonce is spent), and one who races the
//!   device with a copy from another address gains what dropping the device's packets gives it
//!   already (WireGuard authenticates every packet end to end; the relay sees ciphertext).
//! - A data datagram is accepted only from the bound address of its token: another device's
//!   token replayed from a different address, or a datagram whose source is spoofed to a
//!   different address, is dropped and counted, never forwarded, and changes no binding.
//! - Nothing received in plain UDP moves a binding except a valid confirm; a device whose NAT
//!   mapping changed asks for a new nonce over QUIC and confirms again.
//!
//! Drive loop ([`crate::udp_path`]; every call under the forwarding lock, beside
//! [`Forwarder`]):
//!
//! ```text
//! a welcomed connection asks over QUIC → handle_bind_request(conn, random token, random nonce, now)
//!                                          → send (token, nonce) back over QUIC
//! each plain-UDP datagram               → handle_udp(bindings, forwarder, src, &mut buf, clock)
//!                                          → Bound (tell the device over QUIC) | Udp(addr): send buf
//!                                            | Quic(conn): send buf[DATA_PREFIX_LEN..] | Dropped
//! a QUIC datagram routed to `to`        → route(to): Some((addr, token)) → send it in plain UDP
//! a connection ended (handle_closed, poll_close, a revocation) → handle_closed(conn)
//! every ~250 ms                         → handle_timer(now)
//! ```
//!
//! A connection the driver forgets to report closed fails closed: its datagrams meet the
//! forwarding core's checks, which refuse a connection it no longer holds.
//!
//! Memory is bounded by the connections (one entry each, capped by
//! [`crate::forward::Limits::max_connections`]) and one outstanding nonce per connection.

use crate::forward::{Clock, ConnId, Drop, Forwarder};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Bytes of a binding token.
pub const TOKEN_LEN: usize = 16;
/// Bytes of a confirm nonce.
pub const NONCE_LEN: usize = 16;
/// How long a nonce sent over QUIC stays good for its confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// First byte of a confirm datagram. Both marks have the two top bits clear: no QUIC packet
/// starts so (long headers set 0x80, short headers the fixed bit 0x40, which a peer clears
/// only if the relay's endpoint advertised `grease_quic_bit`), nor a discovery datagram (0xFF).
pub const CONFIRM_MARK: u8 = 0x01;
/// First byte of a data datagram.
pub const DATA_MARK: u8 = 0x02;
/// Bytes before the device id in a data datagram (mark and token).
pub const DATA_PREFIX_LEN: usize = 1 + TOKEN_LEN;

/// A binding token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; TOKEN_LEN]);

/// A confirm nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonce(pub [u8; NONCE_LEN]);

/// A plain-UDP datagram, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpMessage<'a> {
    Confirm {
        token: Token,
        nonce: Nonce,
    },
    /// `rest` is the device id header and the WireGuard datagram.
    Data {
        token: Token,
        rest: &'a [u8],
    },
}

/// Why a plain-UDP datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpDrop {
    /// Neither mark, or shorter than its message.
    Garbage,
    /// No connection holds the token.
    UnknownToken,
    /// A confirm whose nonce is not the connection's outstanding one (none outstanding, a
    /// spent one, or a wrong one).
    BadNonce,
    /// A confirm whose nonce is older than [`CONFIRM_TIMEOUT`].
    NonceExpired,
    /// A data datagram for a connection that has no bound address yet.
    NotBound,
    /// A data datagram from an address other than its token's bound one.
    WrongSource,
}

impl UdpDrop {
    pub const ALL: [UdpDrop; 6] = [
        UdpDrop::Garbage,
        UdpDrop::UnknownToken,
        UdpDrop::BadNonce,
        UdpDrop::NonceExpired,
        UdpDrop::NotBound,
        UdpDrop::WrongSource,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UdpDrop::Garbage => "garbage",
            UdpDrop::UnknownToken => "unknown_token",
            UdpDrop::BadNonce => "bad_nonce",
            UdpDrop::NonceExpired => "nonce_expired",
            UdpDrop::NotBound => "not_bound",
            UdpDrop::WrongSource => "wrong_source",
        }
    }

    fn index(self) -> usize {
        UdpDrop::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }
}

/// Parses a plain-UDP datagram; `Err(Garbage)` for anything else.
pub fn parse(datagram: &[u8]) -> Result<UdpMessage<'_>, UdpDrop> {
    let (&mark, rest) = datagram.split_first().ok_or(UdpDrop::Garbage)?;
    let token = rest
        .get(..TOKEN_LEN)
        .and_then(|t| <[u8; TOKEN_LEN]>::try_from(t).ok())
        .map(Token)
        .ok_or(UdpDrop::Garbage)?;
    let rest = &rest[TOKEN_LEN..];
    match mark {
        CONFIRM_MARK => {
            let nonce = <[u8; NONCE_LEN]>::try_from(rest).map_err(|_| UdpDrop::Garbage)?;
            Ok(UdpMessage::Confirm {
                token,
                nonce: Nonce(nonce),
            })
        }
        DATA_MARK if !rest.is_empty() => Ok(UdpMessage::Data { token, rest }),
        _ => Err(UdpDrop::Garbage),
    }
}

/// Counters of a [`Bindings`] table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindStats {
    /// Confirms that bound (or re-bound) an address.
    pub bound: u64,
    /// Datagrams dropped, by [`UdpDrop::ALL`] index.
    pub dropped: [u64; 6],
}

impl BindStats {
    pub fn dropped(&self, d: UdpDrop) -> u64 {
        self.dropped[d.index()]
    }
}

#[derive(Debug)]
struct Entry {
    conn: ConnId,
    addr: Option<SocketAddr>,
    /// The outstanding nonce and when it was sent.
    pending: Option<(Nonce, Instant)>,
}

/// The binding table: a token per device connection that asked for one, its bound source
/// address, its outstanding nonce.
#[derive(Debug, Default)]
pub struct Bindings {
    by_token: HashMap<Token, Entry>,
    by_conn: HashMap<ConnId, Token>,
    stats: BindStats,
}

/// A fresh token collided with another connection's (one chance in 2^128): the driver draws
/// another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTaken;

impl Bindings {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connection `conn` (welcomed: its ticket checked) asked over QUIC for a UDP binding.
    /// `fresh_token` and `fresh_nonce` are random bytes the driver drew; the answer (sent back
    /// over QUIC) is the connection's token (the one it got first, kept for its lifetime) and
    /// the nonce its confirm must carry, which replaces any outstanding one.
    pub fn handle_bind_request(
        &mut self,
        conn: ConnId,
        fresh_token: Token,
        fresh_nonce: Nonce,
        now: Instant,
    ) -> Result<(Token, Nonce), TokenTaken> {
        let token = match self.by_conn.get(&conn) {
            Some(&t) => t,
            None => {
                if self.by_token.contains_key(&fresh_token) {
                    return Err(TokenTaken);
                }
                self.by_token.insert(
                    fresh_token,
                    Entry {
                        conn,
                        addr: None,
                        pending: None,
                    },
                );
                self.by_conn.insert(conn, fresh_token);
                fresh_token
            }
        };
        if let Some(e) = self.by_token.get_mut(&token) {
            e.pending = Some((fresh_nonce, now));
        }
        Ok((token, fresh_nonce))
    }

    /// A confirm from `src`: binds `src` to the token's connection if `nonce` is its
    /// outstanding, unexpired nonce (spent either way once it matched).
    pub fn handle_confirm(
        &mut self,
        token: Token,
        nonce: Nonce,
        src: SocketAddr,
        now: Instant,
    ) -> Result<ConnId, UdpDrop> {
        let r = self.confirm(token, nonce, src, now);
        match r {
            Ok(_) => self.stats.bound = self.stats.bound.saturating_add(1),
            Err(d) => self.count(d),
        }
        r
    }

    fn confirm(
        &mut self,
        token: Token,
        nonce: Nonce,
        src: SocketAddr,
        now: Instant,
    ) -> Result<ConnId, UdpDrop> {
        let e = self.by_token.get_mut(&token).ok_or(UdpDrop::UnknownToken)?;
        let (want, sent) = e.pending.ok_or(UdpDrop::BadNonce)?;
        if !same_bytes(&want.0, &nonce.0) {
            return Err(UdpDrop::BadNonce);
        }
        e.pending = None;
        if now.saturating_duration_since(sent) > CONFIRM_TIMEOUT {
            return Err(UdpDrop::NonceExpired);
        }
        e.addr = Some(src);
        Ok(e.conn)
    }

    /// A data datagram from `src` with `token`: the connection it belongs to if `src` is the
    /// token's bound address; dropped (and counted) otherwise.
    pub fn check_data(&mut self, token: Token, src: SocketAddr) -> Result<ConnId, UdpDrop> {
        let r = match self.by_token.get(&token) {
            None => Err(UdpDrop::UnknownToken),
            Some(Entry { addr: None, .. }) => Err(UdpDrop::NotBound),
            Some(Entry {
                addr: Some(a),
                conn,
                ..
            }) if *a == src => Ok(*conn),
            Some(_) => Err(UdpDrop::WrongSource),
        };
        if let Err(d) = r {
            self.count(d);
        }
        r
    }

    /// Counts a datagram [`parse`] refused.
    pub fn handle_garbage(&mut self) {
        self.count(UdpDrop::Garbage);
    }

    /// Where datagrams for `conn` go in plain UDP, and the token they carry: `None` while it
    /// has no bound address (they go over its QUIC link).
    pub fn route(&self, conn: ConnId) -> Option<(SocketAddr, Token)> {
        let token = self.by_conn.get(&conn)?;
        let addr = self.by_token.get(token)?.addr?;
        Some((addr, *token))
    }

    /// The connection ended: its token is void.
    pub fn handle_closed(&mut self, conn: ConnId) {
        if let Some(t) = self.by_conn.remove(&conn) {
            self.by_token.remove(&t);
        }
    }

    /// Forgets nonces older than [`CONFIRM_TIMEOUT`].
    pub fn handle_timer(&mut self, now: Instant) {
        for e in self.by_token.values_mut() {
            if e.pending
                .is_some_and(|(_, sent)| now.saturating_duration_since(sent) > CONFIRM_TIMEOUT)
            {
                e.pending = None;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_conn.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }

    pub fn stats(&self) -> BindStats {
        self.stats
    }

    fn count(&mut self, d: UdpDrop) {
        let i = d.index();
        self.stats.dropped[i] = self.stats.dropped[i].saturating_add(1);
    }
}

/// What the relay does with one plain-UDP datagram ([`handle_udp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpOutcome {
    /// A confirm bound its source to this connection (tell the device over QUIC).
    Bound(ConnId),
    /// A data datagram to send on in plain UDP: the whole buffer, rewritten in place
    /// (`DATA || destination's token || source device id || WireGuard datagram`).
    Udp(SocketAddr),
    /// A data datagram for a destination without a bound address: send
    /// `buf[DATA_PREFIX_LEN..]` (`source device id || WireGuard datagram`, the QUIC datagram
    /// format) on its QUIC link.
    Quic(ConnId),
    /// Not forwarded, counted here or in the forwarding core.
    Dropped(Dropped),
}

/// Why [`handle_udp`] did not forward a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Before routing: garbage, unknown token, wrong source, bad nonce ([`Bindings::stats`]).
    Binding(UdpDrop),
    /// By the forwarding core: ticket, rate, destination, size ([`Forwarder::stats`]).
    Forwarding(Drop),
}

/// One plain-UDP datagram `buf` from `src`: a confirm binds; a data datagram passes its
/// token's binding (its source must be the bound one), then the same checks as a QUIC
/// datagram of that connection ([`Forwarder::handle_datagram`]: ticket, rate, destination,
/// size), and is rewritten in place for its destination. Nothing that fails a check is
/// forwarded.
pub fn handle_udp(
    bindings: &mut Bindings,
    fwd: &mut Forwarder,
    src: SocketAddr,
    buf: &mut [u8],
    now: Clock,
) -> UdpOutcome {
    let (token, nonce) = match parse(buf) {
        Err(d) => {
            bindings.count(d);
            return UdpOutcome::Dropped(Dropped::Binding(d));
        }
        Ok(UdpMessage::Confirm { token, nonce }) => (token, Some(nonce)),
        Ok(UdpMessage::Data { token, .. }) => (token, None),
    };
    if let Some(nonce) = nonce {
        return match bindings.handle_confirm(token, nonce, src, now.at) {
            Ok(conn) => UdpOutcome::Bound(conn),
            Err(d) => UdpOutcome::Dropped(Dropped::Binding(d)),
        };
    }
    let from = match bindings.check_data(token, src) {
        Ok(c) => c,
        Err(d) => return UdpOutcome::Dropped(Dropped::Binding(d)),
    };
    let Some(body) = buf.get_mut(DATA_PREFIX_LEN..) else {
        bindings.count(UdpDrop::Garbage); // parse checked the length; never happens
        return UdpOutcome::Dropped(Dropped::Binding(UdpDrop::Garbage));
    };
    let to = match fwd.handle_datagram(from, body, now) {
        Ok(to) => to,
        Err(d) => return UdpOutcome::Dropped(Dropped::Forwarding(d)),
    };
    match bindings.route(to) {
        Some((addr, t)) => {
            buf[1..DATA_PREFIX_LEN].copy_from_slice(&t.0);
            UdpOutcome::Udp(addr)
        }
        None => UdpOutcome::Quic(to),
    }
}

/// Compares two nonces in time independent of where they differ.
fn same_bytes(a: &[u8; NONCE_LEN], b: &[u8; NONCE_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|e| panic!("test address {s}: {e}"))
    }

    fn confirm_bytes(t: Token, n: Nonce) -> Vec<u8> {
        let mut v = vec![CONFIRM_MARK];
        v.extend_from_slice(&t.0);
        v.extend_from_slice(&n.0);
        v
    }

    /// Two bound devices: conn 1 at a, conn 2 at b.
    fn two_bound(now: Instant) -> (Bindings, Token, Token) {
        let mut b = Bindings::new();
        let (t1, n1) = b
            .handle_bind_request(ConnId(1), Token([1; 16]), Nonce([11; 16]), now)
            .unwrap_or_else(|_| panic!("fresh table"));
        let (t2, n2) = b
            .handle_bind_request(ConnId(2), Token([2; 16]), Nonce([22; 16]), now)
            .unwrap_or_else(|_| panic!("fresh table"));
        assert_eq!(
            b.handle_confirm(t1, n1, addr("192.0.2.1:5000"), now),
            Ok(ConnId(1))
        );
        assert_eq!(
            b.handle_confirm(t2, n2, addr("198.51.100.2:6000"), now),
            Ok(ConnId(2))
        );
        (b, t1, t2)
    }

    /// A confirm with the nonce sent over QUIC binds its source address; data from there is
    /// the connection's, and the connection's datagrams are routed there with its token.
    #[test]
    fn confirm_binds_source_and_data_from_it_is_accepted() {
        let now = Instant::now();
        let (mut b, t1, _) = two_bound(now);
        assert_eq!(b.check_data(t1, addr("192.0.2.1:5000")), Ok(ConnId(1)));
        assert_eq!(b.route(ConnId(1)), Some((addr("192.0.2.1:5000"), t1)));
        assert_eq!(b.stats().bound, 2);
        assert_eq!(b.stats().dropped, [0; 6]);
    }

    /// Spoofed sources: a datagram with a valid token from any other address (another port of
    /// the same host included) is dropped, counted, and does not move the binding.
    #[test]
    fn spoofed_source_is_dropped_and_binding_stays() {
        let now = Instant::now();
        let (mut b, t1, _) = two_bound(now);
        for spoof in ["203.0.113.9:5000", "192.0.2.1:5001", "[2001:db8::1]:5000"] {
            assert_eq!(b.check_data(t1, addr(spoof)), Err(UdpDrop::WrongSource));
        }
        assert_eq!(b.stats().dropped(UdpDrop::WrongSource), 3);
        assert_eq!(b.route(ConnId(1)), Some((addr("192.0.2.1:5000"), t1)));
    }

    /// Another device's token replayed from the replaying device's own (bound) address, or
    /// from a fresh one, is not accepted as either device's traffic.
    #[test]
    fn another_devices_token_from_a_different_address_is_dropped() {
        let now = Instant::now();
        let (mut b, t1, t2) = two_bound(now);
        // Device 1 (at 192.0.2.1:5000) sends with device 2's token.
        assert_eq!(
            b.check_data(t2, addr("192.0.2.1:5000")),
            Err(UdpDrop::WrongSource)
        );
        assert_eq!(
            b.check_data(t1, addr("198.51.100.2:6000")),
            Err(UdpDrop::WrongSource)
        );
        assert_eq!(b.stats().dropped(UdpDrop::WrongSource), 2);
        assert_eq!(b.route(ConnId(2)), Some((addr("198.51.100.2:6000"), t2)));
    }

    /// A confirm is single use: replayed (from anywhere) after it bound, it is refused and
    /// the binding stays where the first one put it.
    #[test]
    fn replayed_confirm_cannot_rebind() {
        let now = Instant::now();
        let mut b = Bindings::new();
        let (t, n) = b
            .handle_bind_request(ConnId(7), Token([7; 16]), Nonce([77; 16]), now)
            .unwrap_or_else(|_| panic!("fresh table"));
        assert_eq!(
            b.handle_confirm(t, n, addr("192.0.2.7:1000"), now),
            Ok(ConnId(7))
        );
        assert_eq!(
            b.handle_confirm(t, n, addr("203.0.113.66:1000"), now),
            Err(UdpDrop::BadNonce)
        );
        assert_eq!(b.route(ConnId(7)), Some((addr("192.0.2.7:1000"), t)));
    }

    /// A wrong nonce spends nothing and binds nothing; the right one still works after it.
    /// A nonce replaced by a newer request, or older than the timeout, does not bind.
    #[test]
    fn wrong_stale_or_replaced_nonce_does_not_bind() {
        let now = Instant::now();
        let mut b = Bindings::new();
        let (t, n) = b
            .handle_bind_request(ConnId(3), Token([3; 16]), Nonce([33; 16]), now)
            .unwrap_or_else(|_| panic!("fresh table"));
        let mut wrong = n;
        wrong.0[15] ^= 1;
        let a = addr("192.0.2.3:3000");
        assert_eq!(b.handle_confirm(t, wrong, a, now), Err(UdpDrop::BadNonce));
        assert_eq!(b.route(ConnId(3)), None);
        assert_eq!(b.check_data(t, a), Err(UdpDrop::NotBound));
        // A newer request replaces the nonce (same token).
        let (t_again, n2) = b
            .handle_bind_request(ConnId(3), Token([99; 16]), Nonce([44; 16]), now)
            .unwrap_or_else(|_| panic!("own token"));
        assert_eq!(t_again, t);
        assert_eq!(b.handle_confirm(t, n, a, now), Err(UdpDrop::BadNonce));
        let late = now + CONFIRM_TIMEOUT + Duration::from_millis(1);
        assert_eq!(b.handle_confirm(t, n2, a, late), Err(UdpDrop::NonceExpired));
        // Expired is spent too.
        assert_eq!(b.handle_confirm(t, n2, a, now), Err(UdpDrop::BadNonce));
        assert_eq!(b.route(ConnId(3)), None);
        // The timer forgets a stale nonce.
        let (_, n3) = b
            .handle_bind_request(ConnId(3), Token([98; 16]), Nonce([55; 16]), now)
            .unwrap_or_else(|_| panic!("own token"));
        b.handle_timer(late);
        assert_eq!(b.handle_confirm(t, n3, a, now), Err(UdpDrop::BadNonce));
        let (_, n4) = b
            .handle_bind_request(ConnId(3), Token([97; 16]), Nonce([66; 16]), now)
            .unwrap_or_else(|_| panic!("own token"));
        assert_eq!(b.handle_confirm(t, n4, a, now), Ok(ConnId(3)));
    }

    /// Garbage, unknown tokens and a closed connection's token are all dropped and counted.
    #[test]
    fn garbage_and_unknown_tokens_are_dropped() {
        let now = Instant::now();
        let (mut b, t1, _) = two_bound(now);
        for g in [
            &[][..],
            &[DATA_MARK][..],
            &[DATA_MARK; 17][..],
            &[0xC0, 0, 0, 0, 1][..],
            &[0xFF; 40][..],
            &confirm_bytes(t1, Nonce([0; 16]))[..20],
        ] {
            assert_eq!(parse(g), Err(UdpDrop::Garbage), "{g:?}");
        }
        let mut long_confirm = confirm_bytes(t1, Nonce([0; 16]));
        long_confirm.push(0);
        assert_eq!(parse(&long_confirm), Err(UdpDrop::Garbage));
        let a = addr("192.0.2.1:5000");
        assert_eq!(
            b.check_data(Token([0xAB; 16]), a),
            Err(UdpDrop::UnknownToken)
        );
        assert_eq!(
            b.handle_confirm(Token([0xAB; 16]), Nonce([11; 16]), a, now),
            Err(UdpDrop::UnknownToken)
        );
        b.handle_closed(ConnId(1));
        assert_eq!(b.check_data(t1, a), Err(UdpDrop::UnknownToken));
        assert_eq!(b.route(ConnId(1)), None);
        assert_eq!(b.len(), 1);
        assert_eq!(b.stats().dropped(UdpDrop::UnknownToken), 3);
    }

    /// What the parser accepts is exactly the two messages.
    #[test]
    fn parse_confirm_and_data() {
        let t = Token([5; 16]);
        let n = Nonce([6; 16]);
        assert_eq!(
            parse(&confirm_bytes(t, n)),
            Ok(UdpMessage::Confirm { token: t, nonce: n })
        );
        let mut d = vec![DATA_MARK];
        d.extend_from_slice(&t.0);
        d.extend_from_slice(&[9, 9, 9]);
        assert_eq!(
            parse(&d),
            Ok(UdpMessage::Data {
                token: t,
                rest: &[9, 9, 9]
            })
        );
    }

    /// A fresh token equal to another connection's is refused (the driver draws again).
    #[test]
    fn colliding_token_is_refused() {
        let now = Instant::now();
        let mut b = Bindings::new();
        assert!(b
            .handle_bind_request(ConnId(1), Token([1; 16]), Nonce([1; 16]), now)
            .is_ok());
        assert_eq!(
            b.handle_bind_request(ConnId(2), Token([1; 16]), Nonce([2; 16]), now),
            Err(TokenTaken)
        );
        assert_eq!(b.len(), 1);
    }

    mod routing {
        #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
        use super::super::*;
        use crate::forward::Limits;
        use ed25519_dalek::SigningKey;
        use ward_shared::relay::{
            split_datagram, DeviceToRelay, Ticket, RELAY_PROTOCOL_VERSION, TICKET_TTL_MS,
        };
        use ward_shared::wire::DeviceId;

        const T0_MS: i64 = 1_700_000_000_000;

        struct H {
            f: Forwarder,
            b: Bindings,
            key: SigningKey,
            now: Clock,
        }

        impl H {
            fn new() -> Self {
                let key = SigningKey::from_bytes(&[7; 32]);
                let now = Clock {
                    at: Instant::now(),
                    unix_ms: T0_MS,
                };
                let mut f = Forwarder::new(Limits::default());
                f.handle_welcome(key.verifying_key(), &[], now);
                H {
                    f,
                    b: Bindings::new(),
                    key,
                    now,
                }
            }

            /// Device `n` connected over QUIC (ticket checked), token [n; 16].
            fn join(&mut self, n: u8) -> ConnId {
                let c = self.f.handle_connect(self.now).unwrap();
                let ticket = Ticket {
                    device_id: DeviceId(u64::from(n)),
                    cert_identity: [n; 32],
                    not_before_ms: T0_MS,
                    not_after_ms: T0_MS + TICKET_TTL_MS,
                    serial: u64::from(n),
                }
                .sign(&self.key);
                let hello = DeviceToRelay::Hello {
                    protocol: RELAY_PROTOCOL_VERSION,
                    ticket,
                };
                self.f.handle_hello(c, [n; 32], &hello, self.now).unwrap();
                c
            }

            /// Device `n` joined and bound at `addr` through a confirm datagram.
            fn join_bound(&mut self, n: u8, addr: SocketAddr) -> ConnId {
                let c = self.join(n);
                let (t, nonce) = self
                    .b
                    .handle_bind_request(c, Token([n; 16]), Nonce([n ^ 0x55; 16]), self.now.at)
                    .unwrap();
                let mut confirm = super::confirm_bytes(t, nonce);
                assert_eq!(self.udp(addr, &mut confirm), UdpOutcome::Bound(c));
                c
            }

            fn udp(&mut self, src: SocketAddr, buf: &mut [u8]) -> UdpOutcome {
                handle_udp(&mut self.b, &mut self.f, src, buf, self.now)
            }
        }

        fn data(token: [u8; 16], to: u64, body: &[u8]) -> Vec<u8> {
            let mut v = vec![DATA_MARK];
            v.extend_from_slice(&token);
            v.extend_from_slice(&to.to_be_bytes());
            v.extend_from_slice(body);
            v
        }

        fn addr(s: &str) -> SocketAddr {
            super::addr(s)
        }

        /// Bound to bound: the datagram goes to the destination's address carrying the
        /// destination's token and the source's id; to a device without a binding it goes over
        /// QUIC in the QUIC datagram format.
        #[test]
        fn data_is_rewritten_for_the_destination() {
            let mut h = H::new();
            let _a = h.join_bound(1, addr("192.0.2.1:5000"));
            let b = h.join_bound(2, addr("198.51.100.2:6000"));
            let c = h.join(3);
            let mut d = data([1; 16], 2, b"ciphertext");
            assert_eq!(
                h.udp(addr("192.0.2.1:5000"), &mut d),
                UdpOutcome::Udp(addr("198.51.100.2:6000"))
            );
            assert_eq!(d, data([2; 16], 1, b"ciphertext"));
            let mut d = data([2; 16], 3, b"to c");
            assert_eq!(
                h.udp(addr("198.51.100.2:6000"), &mut d),
                UdpOutcome::Quic(c)
            );
            assert_eq!(
                split_datagram(&d[DATA_PREFIX_LEN..]),
                Some((DeviceId(2), &b"to c"[..]))
            );
            assert_eq!(h.f.stats().datagrams_relayed, 2);
            assert_eq!(h.b.route(b).map(|r| r.0), Some(addr("198.51.100.2:6000")));
        }

        /// A spoofed source with a valid token, another device's token from the sender's own
        /// address, garbage and unknown tokens: none is forwarded, none reaches the
        /// forwarding core's counters, and the buffer is left as it came.
        #[test]
        fn spoofed_replayed_and_garbage_datagrams_are_not_forwarded() {
            let mut h = H::new();
            let a = h.join_bound(1, addr("192.0.2.1:5000"));
            let b = h.join_bound(2, addr("198.51.100.2:6000"));
            let cases: [(&str, Vec<u8>, UdpDrop); 4] = [
                (
                    "203.0.113.9:5000",
                    data([1; 16], 2, b"x"),
                    UdpDrop::WrongSource,
                ),
                (
                    "192.0.2.1:5000",
                    data([2; 16], 1, b"x"),
                    UdpDrop::WrongSource,
                ),
                (
                    "192.0.2.1:5000",
                    data([9; 16], 2, b"x"),
                    UdpDrop::UnknownToken,
                ),
                ("192.0.2.1:5000", vec![0x40, 1, 2, 3], UdpDrop::Garbage),
            ];
            for (src, mut d, why) in cases {
                let before = d.clone();
                assert_eq!(
                    h.udp(addr(src), &mut d),
                    UdpOutcome::Dropped(Dropped::Binding(why)),
                    "{src}"
                );
                assert_eq!(d, before);
            }
            assert_eq!(h.f.stats().datagrams_relayed, 0);
            assert_eq!(h.b.stats().dropped(UdpDrop::WrongSource), 2);
            // The bindings did not move.
            assert_eq!(h.b.route(a).map(|r| r.0), Some(addr("192.0.2.1:5000")));
            assert_eq!(h.b.route(b).map(|r| r.0), Some(addr("198.51.100.2:6000")));
        }

        /// A bound device's datagram still passes the forwarding core: to an unknown device
        /// it is dropped there, from a connection the core closed too; once the bindings
        /// hear of the close its token is void.
        #[test]
        fn forwarding_checks_still_apply() {
            let mut h = H::new();
            let a = h.join_bound(1, addr("192.0.2.1:5000"));
            let mut d = data([1; 16], 77, b"x");
            assert_eq!(
                h.udp(addr("192.0.2.1:5000"), &mut d),
                UdpOutcome::Dropped(Dropped::Forwarding(Drop::UnknownDestination))
            );
            h.f.handle_closed(a);
            // Not yet reported closed to the bindings: the forwarding core refuses it.
            let mut d = data([1; 16], 77, b"x");
            assert_eq!(
                h.udp(addr("192.0.2.1:5000"), &mut d),
                UdpOutcome::Dropped(Dropped::Forwarding(Drop::NoTicket))
            );
            h.b.handle_closed(a);
            let mut d = data([1; 16], 77, b"x");
            assert_eq!(
                h.udp(addr("192.0.2.1:5000"), &mut d),
                UdpOutcome::Dropped(Dropped::Binding(UdpDrop::UnknownToken))
            );
        }
    }
}
