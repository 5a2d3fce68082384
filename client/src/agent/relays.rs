//! Relayed paths at the device, free of I/O: the relay ticket's lifecycle, which relays to hold
//! a connection to, their state as the driver reports it, and the home relay.
//!
//! - **Tickets.** A request is due after a session's first netmap that lists relays (and when
//!   relays first appear), when half of the held ticket's life is spent (in coordinator time),
//!   and after a certificate renewal; at most one request per [`TICKET_REQUEST_GAP`], and a
//!   due request that got no answer is repeated after that gap.
//! - **Connections.** One per relay in the netmap, opened once a valid ticket is held
//!   ([`RelayOut::Connect`]; the driver reconnects on its own with backoff and reports every
//!   state change through [`RelayConnEvent`]). A fresh ticket goes to every relay
//!   ([`RelayOut::Ticket`]; the driver presents it on a live connection and on reconnects). A
//!   relay that leaves the netmap, or a ticket that expires without a fresh one, closes the
//!   connections ([`RelayOut::Disconnect`]).
//! - **Home relay.** The connected relay with the lowest QUIC RTT; another one replaces it only
//!   when better by more than [`HOME_SWITCH_RATIO`] and [`HOME_SWITCH_MIN`], or when the home
//!   relay goes down. The agent publishes it in every `DeviceUpdate`.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::{debug, info};

use ward_shared::relay::SignedTicket;
use ward_shared::wire::RelayInfo;

/// Ticket requests are at least this far apart.
pub const TICKET_REQUEST_GAP: Duration = Duration::from_secs(10);
/// Another relay becomes home only when its RTT is lower than the home relay's by more than
/// this fraction of the home relay's RTT…
pub const HOME_SWITCH_RATIO: f64 = 0.2;
/// …and by more than this.
pub const HOME_SWITCH_MIN: Duration = Duration::from_millis(5);

/// A relay connection's state as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayConnEvent {
    /// Welcomed by the relay: datagrams flow. `max_datagram` is the largest WireGuard datagram
    /// the connection carries now.
    Up {
        relay: String,
        rtt: Duration,
        max_datagram: u16,
    },
    /// A fresh RTT (and datagram size) measured on a live connection.
    Rtt {
        relay: String,
        rtt: Duration,
        max_datagram: u16,
    },
    /// The connection failed or closed; the driver retries on its own.
    Down { relay: String, error: String },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum RelayOut {
    /// Hold a connection to relay `relay` at `addr` (`HOST:PORT`), presenting `ticket`.
    Connect {
        relay: String,
        addr: String,
        ticket: SignedTicket,
    },
    /// Close the connection to `relay` and stop reconnecting.
    Disconnect { relay: String },
    /// Present this fresh ticket to `relay` (now if connected, and on every reconnect).
    Ticket { relay: String, ticket: SignedTicket },
}

/// A relay connection's state, for status views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Not asked for: no valid ticket yet.
    Idle,
    /// Asked of the driver, not welcomed yet (or reconnecting after `last_error`).
    Connecting,
    Up {
        rtt: Duration,
        max_datagram: u16,
    },
}

/// One relay of the netmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConn {
    pub name: String,
    pub addr: String,
    pub state: ConnState,
    pub last_error: Option<String>,
}

/// The relay state machine; one per agent. Inputs: [`Relays::set_relays`],
/// [`Relays::session_started`], [`Relays::cert_renewed`], [`Relays::handle_ticket`],
/// [`Relays::handle_report`], [`Relays::handle_timeout`]. Outputs: [`Relays::poll_out`],
/// [`Relays::poll_ticket_request`], [`Relays::poll_timeout`], and the views.
#[derive(Debug, Default)]
pub struct Relays {
    relays: BTreeMap<String, RelayConn>,
    ticket: Option<SignedTicket>,
    /// A request is wanted regardless of the held ticket (session start, renewal).
    want_ticket: bool,
    last_request: Option<Instant>,
    /// Whether requests may be sent (in a session).
    in_session: bool,
    request_out: bool,
    home: Option<String>,
    out: VecDeque<RelayOut>,
}

impl Relays {
    /// The netmap's relay list (called on every netmap and delta): new relays are connected
    /// (once a ticket is held), removed ones disconnected, moved ones reconnected.
    pub fn set_relays(&mut self, list: &[RelayInfo], now: Instant, coord_ms: i64) {
        let had_none = self.relays.is_empty();
        let gone: Vec<String> = self
            .relays
            .iter()
            .filter(|(n, r)| !list.iter().any(|i| &i.name == *n && i.addr == r.addr))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            debug!(relay = %name, "relay left the netmap (or moved): disconnecting");
            self.relays.remove(&name);
            self.out.push_back(RelayOut::Disconnect { relay: name });
        }
        let ticket = self.valid_ticket(coord_ms).cloned();
        for i in list {
            if self.relays.contains_key(&i.name) {
                continue;
            }
            let mut conn = RelayConn {
                name: i.name.clone(),
                addr: i.addr.clone(),
                state: ConnState::Idle,
                last_error: None,
            };
            if let Some(t) = &ticket {
                conn.state = ConnState::Connecting;
                self.out.push_back(RelayOut::Connect {
                    relay: i.name.clone(),
                    addr: i.addr.clone(),
                    ticket: t.clone(),
                });
            }
            self.relays.insert(i.name.clone(), conn);
        }
        if had_none && !self.relays.is_empty() {
            // Relays first appeared: a ticket is needed.
            self.want_ticket = true;
        }
        self.choose_home();
        self.handle_timeout(now, coord_ms);
    }

    /// A control session's first netmap arrived: ask for a fresh ticket (if there are relays).
    pub fn session_started(&mut self, now: Instant, coord_ms: i64) {
        self.in_session = true;
        self.want_ticket = true;
        self.handle_timeout(now, coord_ms);
    }

    /// The control session ended: no requests until the next one.
    pub fn session_ended(&mut self) {
        self.in_session = false;
        self.request_out = false;
    }

    /// The device certificate was renewed: ask for a ticket again.
    pub fn cert_renewed(&mut self, now: Instant, coord_ms: i64) {
        self.want_ticket = true;
        self.handle_timeout(now, coord_ms);
    }

    /// The device left the network (revoked): drop the ticket and every connection.
    pub fn clear(&mut self) {
        for name in self.relays.keys() {
            self.out.push_back(RelayOut::Disconnect {
                relay: name.clone(),
            });
        }
        self.relays.clear();
        self.ticket = None;
        self.want_ticket = false;
        self.home = None;
    }

    /// A ticket from the coordinator: held, and given to every relay (idle ones connect now).
    pub fn handle_ticket(&mut self, ticket: SignedTicket, now: Instant, coord_ms: i64) {
        let t = &ticket.ticket;
        if t.not_after_ms <= coord_ms || t.not_after_ms <= t.not_before_ms {
            debug!(serial = t.serial, "relay ticket already expired: ignored");
            return;
        }
        self.want_ticket = false;
        if self.ticket.as_ref() == Some(&ticket) {
            // The coordinator answers a request soon after the last with the same ticket.
            debug!(serial = t.serial, "relay ticket unchanged");
            return;
        }
        debug!(serial = t.serial, "relay ticket");
        for r in self.relays.values_mut() {
            match r.state {
                ConnState::Idle => {
                    r.state = ConnState::Connecting;
                    self.out.push_back(RelayOut::Connect {
                        relay: r.name.clone(),
                        addr: r.addr.clone(),
                        ticket: ticket.clone(),
                    });
                }
                ConnState::Connecting | ConnState::Up { .. } => {
                    self.out.push_back(RelayOut::Ticket {
                        relay: r.name.clone(),
                        ticket: ticket.clone(),
                    })
                }
            }
        }
        self.ticket = Some(ticket);
        self.handle_timeout(now, coord_ms);
    }

    /// A connection's state from the driver. Reports for relays not (or no longer) asked for
    /// are ignored. Returns whether the home relay changed.
    pub fn handle_report(&mut self, report: RelayConnEvent) -> bool {
        match report {
            RelayConnEvent::Up {
                relay,
                rtt,
                max_datagram,
            }
            | RelayConnEvent::Rtt {
                relay,
                rtt,
                max_datagram,
            } => {
                let Some(r) = self.relays.get_mut(&relay) else {
                    return false;
                };
                if r.state == ConnState::Idle {
                    return false;
                }
                if !matches!(r.state, ConnState::Up { .. }) {
                    info!(%relay, rtt_ms = rtt.as_millis() as u64, "relay connected");
                }
                r.state = ConnState::Up { rtt, max_datagram };
                r.last_error = None;
            }
            RelayConnEvent::Down { relay, error } => {
                let Some(r) = self.relays.get_mut(&relay) else {
                    return false;
                };
                if r.state == ConnState::Idle {
                    return false;
                }
                if matches!(r.state, ConnState::Up { .. }) {
                    info!(%relay, %error, "relay connection lost; reconnecting");
                }
                r.state = ConnState::Connecting;
                r.last_error = Some(error);
            }
        }
        self.choose_home()
    }

    /// Ticket requests and expiry. Returns whether the home relay changed.
    pub fn handle_timeout(&mut self, now: Instant, coord_ms: i64) -> bool {
        let mut changed = false;
        if self
            .ticket
            .as_ref()
            .is_some_and(|t| t.ticket.not_after_ms <= coord_ms)
        {
            info!("relay ticket expired without a fresh one: closing relay connections");
            self.ticket = None;
            for r in self.relays.values_mut() {
                if r.state != ConnState::Idle {
                    r.state = ConnState::Idle;
                    r.last_error = Some("ticket expired".into());
                    self.out.push_back(RelayOut::Disconnect {
                        relay: r.name.clone(),
                    });
                }
            }
            changed = self.choose_home();
        }
        if self.in_session
            && !self.relays.is_empty()
            && self.ticket_due(coord_ms)
            && self
                .last_request
                .is_none_or(|t| now >= t + TICKET_REQUEST_GAP)
        {
            self.last_request = Some(now);
            self.request_out = true;
        }
        changed
    }

    /// Whether a `relay_ticket_request` must be sent now (taken once per request).
    #[must_use]
    pub fn poll_ticket_request(&mut self) -> bool {
        std::mem::take(&mut self.request_out)
    }

    #[must_use]
    pub fn poll_out(&mut self) -> Option<RelayOut> {
        self.out.pop_front()
    }

    /// When [`Relays::handle_timeout`] must run next: the next allowed request while one is
    /// due, the ticket's half life, its expiry. `coord_ms` is coordinator time at `now`.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant, coord_ms: i64) -> Option<Instant> {
        let at_coord = |ms: i64| {
            now + Duration::from_millis(u64::try_from(ms.saturating_sub(coord_ms)).unwrap_or(0))
        };
        let mut t: Option<Instant> = None;
        let mut add = |x: Instant| t = Some(t.map_or(x, |t: Instant| t.min(x)));
        if let Some(tk) = &self.ticket {
            add(at_coord(tk.ticket.not_after_ms));
        }
        if self.in_session && !self.relays.is_empty() {
            if self.ticket_due(coord_ms) {
                add(self.last_request.map_or(now, |l| l + TICKET_REQUEST_GAP));
            } else if let Some(tk) = &self.ticket {
                add(at_coord(half_life(tk)));
            }
        }
        t
    }

    // ---- views --------------------------------------------------------------------------

    /// The home relay published in `DeviceUpdate.home_relay`.
    pub fn home(&self) -> Option<&str> {
        self.home.as_deref()
    }

    pub fn ticket(&self) -> Option<&SignedTicket> {
        self.ticket.as_ref()
    }

    pub fn conns(&self) -> impl Iterator<Item = &RelayConn> {
        self.relays.values()
    }

    /// Whether `name` is one of the netmap's relays.
    pub fn knows(&self, name: &str) -> bool {
        self.relays.contains_key(name)
    }

    /// Relays with a welcomed connection and the datagram size each carries (for the data
    /// plane's `set_relays`), by name.
    pub fn usable(&self) -> Vec<(String, u16)> {
        self.relays
            .values()
            .filter_map(|r| match r.state {
                ConnState::Up { max_datagram, .. } => Some((r.name.clone(), max_datagram)),
                ConnState::Idle | ConnState::Connecting => None,
            })
            .collect()
    }

    // ---- helpers ------------------------------------------------------------------------

    fn valid_ticket(&self, coord_ms: i64) -> Option<&SignedTicket> {
        self.ticket
            .as_ref()
            .filter(|t| t.ticket.not_after_ms > coord_ms)
    }

    fn ticket_due(&self, coord_ms: i64) -> bool {
        self.want_ticket
            || self
                .ticket
                .as_ref()
                .is_none_or(|t| coord_ms >= half_life(t))
    }

    /// The connected relay with the lowest RTT, with hysteresis. Returns whether it changed.
    fn choose_home(&mut self) -> bool {
        let rtt_of = |name: &str| match self.relays.get(name).map(|r| &r.state) {
            Some(ConnState::Up { rtt, .. }) => Some(*rtt),
            _ => None,
        };
        // Lowest RTT, ties broken by name (the map's order): deterministic.
        let best = self
            .relays
            .values()
            .filter_map(|r| match r.state {
                ConnState::Up { rtt, .. } => Some((rtt, r.name.clone())),
                ConnState::Idle | ConnState::Connecting => None,
            })
            .min();
        let current = self.home.as_deref().and_then(|h| rtt_of(h).map(|r| (r, h)));
        let next = match (current, best) {
            (_, None) => None,
            (None, Some((_, b))) => Some(b),
            (Some((home_rtt, home)), Some((best_rtt, b))) => {
                let gain = home_rtt.saturating_sub(best_rtt);
                if gain > HOME_SWITCH_MIN
                    && gain.as_secs_f64() > home_rtt.as_secs_f64() * HOME_SWITCH_RATIO
                {
                    Some(b)
                } else {
                    Some(home.to_string())
                }
            }
        };
        if next == self.home {
            return false;
        }
        info!(from = ?self.home, to = ?next, "home relay");
        self.home = next;
        true
    }
}

/// Coordinator time at which half of the ticket's life is spent.
fn half_life(t: &SignedTicket) -> i64 {
    let t = &t.ticket;
    t.not_before_ms
        .saturating_add(t.not_after_ms.saturating_sub(t.not_before_ms) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_shared::relay::Ticket;
    use ward_shared::wire::{Bytes, DeviceId};

    fn info(name: &str, addr: &str) -> RelayInfo {
        RelayInfo {
            name: name.into(),
            addr: addr.into(),
        }
    }

    fn ticket(serial: u64, nb: i64, na: i64) -> SignedTicket {
        SignedTicket {
            ticket: Ticket {
                device_id: DeviceId(1),
                cert_identity: [0; 32],
                not_before_ms: nb,
                not_after_ms: na,
                serial,
            },
            signature: Bytes(vec![0; 64]),
        }
    }

    fn drain(r: &mut Relays) -> Vec<RelayOut> {
        std::iter::from_fn(|| r.poll_out()).collect()
    }

    fn up(r: &mut Relays, name: &str, ms: u64) -> bool {
        r.handle_report(RelayConnEvent::Up {
            relay: name.into(),
            rtt: Duration::from_millis(ms),
            max_datagram: 1300,
        })
    }

    fn rtt(r: &mut Relays, name: &str, ms: u64) -> bool {
        r.handle_report(RelayConnEvent::Rtt {
            relay: name.into(),
            rtt: Duration::from_millis(ms),
            max_datagram: 1300,
        })
    }

    /// Two relays, a session and a ticket valid 0..600 000: both connecting.
    fn connected_pair(t0: Instant) -> Relays {
        let mut r = Relays::default();
        r.set_relays(&[info("r1", "a:1"), info("r2", "b:1")], t0, 0);
        r.session_started(t0, 0);
        assert!(r.poll_ticket_request());
        r.handle_ticket(ticket(1, 0, 600_000), t0, 0);
        drain(&mut r);
        r
    }

    #[test]
    fn a_ticket_is_asked_for_once_a_session_has_relays_and_connects_them() {
        let t0 = Instant::now();
        let mut r = Relays::default();
        r.session_started(t0, 0);
        assert!(!r.poll_ticket_request(), "no relays, no request");
        r.set_relays(&[info("r1", "a:1"), info("r2", "b:1")], t0, 0);
        assert!(r.poll_ticket_request());
        assert!(!r.poll_ticket_request(), "taken once");
        assert!(drain(&mut r).is_empty(), "no connection without a ticket");
        assert!(r.conns().all(|c| c.state == ConnState::Idle));
        r.handle_ticket(ticket(1, 0, 600_000), t0, 0);
        let out = drain(&mut r);
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0], RelayOut::Connect { relay, addr, ticket }
            if relay == "r1" && addr == "a:1" && ticket.ticket.serial == 1));
        assert!(matches!(&out[1], RelayOut::Connect { relay, .. } if relay == "r2"));
        // Held and not due before its half life.
        assert!(!r.poll_ticket_request());
        assert_eq!(r.poll_timeout(t0, 0), Some(t0 + Duration::from_secs(300)));
    }

    #[test]
    fn requests_are_ten_seconds_apart_and_repeat_while_unanswered() {
        let t0 = Instant::now();
        let mut r = Relays::default();
        r.set_relays(&[info("r1", "a:1")], t0, 0);
        r.session_started(t0, 0);
        assert!(r.poll_ticket_request());
        // A renewal right after: not before the gap.
        r.cert_renewed(t0 + Duration::from_secs(1), 1_000);
        assert!(!r.poll_ticket_request());
        assert_eq!(
            r.poll_timeout(t0 + Duration::from_secs(1), 1_000),
            Some(t0 + TICKET_REQUEST_GAP)
        );
        r.handle_timeout(t0 + Duration::from_millis(9_999), 9_999);
        assert!(!r.poll_ticket_request());
        r.handle_timeout(t0 + TICKET_REQUEST_GAP, 10_000);
        assert!(r.poll_ticket_request());
        // Unanswered: again after another gap.
        r.handle_timeout(t0 + 2 * TICKET_REQUEST_GAP, 20_000);
        assert!(r.poll_ticket_request());
        // Outside a session: never.
        r.session_ended();
        r.handle_timeout(t0 + 4 * TICKET_REQUEST_GAP, 40_000);
        assert!(!r.poll_ticket_request());
    }

    #[test]
    fn half_life_renewal_and_certificate_renewal_ask_again_and_fresh_tickets_reach_every_relay() {
        let t0 = Instant::now();
        let mut r = connected_pair(t0);
        assert!(up(&mut r, "r1", 10));
        let at = |s: u64| t0 + Duration::from_secs(s);
        r.handle_timeout(at(299), 299_000);
        assert!(!r.poll_ticket_request());
        r.handle_timeout(at(300), 300_000);
        assert!(r.poll_ticket_request(), "half of the ticket's life spent");
        r.handle_ticket(ticket(2, 300_000, 900_000), at(301), 301_000);
        let out = drain(&mut r);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out
            .iter()
            .all(|o| matches!(o, RelayOut::Ticket { ticket, .. } if ticket.ticket.serial == 2)));
        // A certificate renewal asks again (after the gap).
        r.cert_renewed(at(320), 320_000);
        assert!(r.poll_ticket_request());
        r.handle_ticket(ticket(3, 320_000, 920_000), at(321), 321_000);
        assert!(!r.poll_ticket_request());
        assert_eq!(r.ticket().map(|t| t.ticket.serial), Some(3));
        assert_eq!(drain(&mut r).len(), 2);
        // The same ticket again (asked too soon after the last): nothing to present.
        r.cert_renewed(at(331), 331_000);
        assert!(r.poll_ticket_request());
        r.handle_ticket(ticket(3, 320_000, 920_000), at(331), 331_000);
        assert!(drain(&mut r).is_empty());
        r.handle_timeout(at(345), 345_000);
        assert!(!r.poll_ticket_request(), "answered: not asked again");
        // An already expired ticket is not taken.
        r.handle_ticket(ticket(4, 0, 1_000), at(322), 322_000);
        assert_eq!(r.ticket().map(|t| t.ticket.serial), Some(3));
    }

    #[test]
    fn an_expired_ticket_closes_the_connections_until_a_fresh_one() {
        let t0 = Instant::now();
        let mut r = connected_pair(t0);
        up(&mut r, "r1", 10);
        r.session_ended();
        let end = t0 + Duration::from_secs(600);
        assert_eq!(r.poll_timeout(t0, 0), Some(end));
        assert!(r.handle_timeout(end, 600_000), "the home relay is gone");
        assert_eq!(r.home(), None);
        let out = drain(&mut r);
        assert_eq!(
            out,
            vec![
                RelayOut::Disconnect { relay: "r1".into() },
                RelayOut::Disconnect { relay: "r2".into() }
            ]
        );
        assert!(r.usable().is_empty());
        // A late report from the driver changes nothing.
        assert!(!up(&mut r, "r1", 10));
        r.session_started(end, 600_000);
        assert!(r.poll_ticket_request());
        r.handle_ticket(ticket(2, 600_000, 1_200_000), end, 600_000);
        assert_eq!(
            drain(&mut r)
                .iter()
                .filter(|o| matches!(o, RelayOut::Connect { .. }))
                .count(),
            2
        );
    }

    #[test]
    fn home_is_the_lowest_rtt_with_hysteresis() {
        let t0 = Instant::now();
        let mut r = connected_pair(t0);
        assert_eq!(r.home(), None);
        assert!(up(&mut r, "r2", 40));
        assert_eq!(r.home(), Some("r2"));
        // 35 ms is better by 12.5 %: not enough.
        assert!(!up(&mut r, "r1", 35));
        assert_eq!(r.home(), Some("r2"));
        // 31 ms: better by 22.5 % and 9 ms: switch.
        assert!(rtt(&mut r, "r1", 31));
        assert_eq!(r.home(), Some("r1"));
        // Small RTTs: 20 % is not enough without 5 ms.
        assert!(!rtt(&mut r, "r1", 6));
        assert!(!rtt(&mut r, "r2", 2));
        assert_eq!(r.home(), Some("r1"));
        assert!(rtt(&mut r, "r1", 10));
        assert_eq!(r.home(), Some("r2"), "8 ms better and 80 %");
        // The home relay goes down: the other one, whatever its RTT.
        assert!(!rtt(&mut r, "r1", 500));
        assert!(r.handle_report(RelayConnEvent::Down {
            relay: "r2".into(),
            error: "timed out".into()
        }));
        assert_eq!(r.home(), Some("r1"));
        assert_eq!(r.usable(), vec![("r1".to_string(), 1300)]);
        // And none when all are down.
        assert!(r.handle_report(RelayConnEvent::Down {
            relay: "r1".into(),
            error: "x".into()
        }));
        assert_eq!(r.home(), None);
        let c = r.conns().next().unwrap();
        assert_eq!(c.state, ConnState::Connecting);
        assert_eq!(c.last_error.as_deref(), Some("x"));
    }

    #[test]
    fn equal_rtts_pick_by_name() {
        let t0 = Instant::now();
        let mut r = connected_pair(t0);
        up(&mut r, "r2", 10);
        up(&mut r, "r1", 10);
        assert_eq!(r.home(), Some("r2"), "the first one stays");
        let mut r = connected_pair(t0);
        r.handle_report(RelayConnEvent::Up {
            relay: "r1".into(),
            rtt: Duration::from_millis(10),
            max_datagram: 1200,
        });
        assert_eq!(r.home(), Some("r1"));
    }

    #[test]
    fn removed_and_moved_relays_are_disconnected_and_the_home_moves() {
        let t0 = Instant::now();
        let mut r = connected_pair(t0);
        up(&mut r, "r1", 10);
        up(&mut r, "r2", 50);
        assert_eq!(r.home(), Some("r1"));
        r.set_relays(&[info("r2", "b:1")], t0, 1_000);
        assert_eq!(r.home(), Some("r2"));
        assert_eq!(
            drain(&mut r),
            vec![RelayOut::Disconnect { relay: "r1".into() }]
        );
        assert!(!r.knows("r1"));
        // A report about the removed relay is ignored.
        assert!(!up(&mut r, "r1", 1));
        // r2 moves: reconnected at the new address.
        r.set_relays(&[info("r2", "c:1")], t0, 2_000);
        let out = drain(&mut r);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], RelayOut::Disconnect { relay: "r2".into() });
        assert!(
            matches!(&out[1], RelayOut::Connect { relay, addr, .. } if relay == "r2" && addr == "c:1")
        );
        assert_eq!(r.home(), None);
        // Revocation: everything goes.
        up(&mut r, "r2", 5);
        r.clear();
        assert_eq!(
            drain(&mut r),
            vec![RelayOut::Disconnect { relay: "r2".into() }]
        );
        assert_eq!(r.home(), None);
        assert!(r.ticket().is_none());
    }
}
