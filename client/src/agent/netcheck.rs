//! Address discovery through the netmap's relays, free of I/O: which binding requests to send
//! and when, which answers count, and what they say about this device's NAT.
//!
//! A run sends one [`BindingRequest`] (fresh random txid) to every relay, from the WireGuard
//! socket; an answer counts only if it carries the txid of that relay's request in flight and
//! arrives within [`PROBE_TIMEOUT`]. Runs happen when the relay list changes, every
//! [`RUN_INTERVAL`], and when the agent reports a network change. Relay names that are not IP
//! literals are resolved by the driver ([`Netcheck::poll_resolve`] out,
//! [`Netcheck::handle_resolved`] in); the request goes out once the address is known.
//!
//! From the answers: UDP works (any relay answered), the reflexive addresses (distinct observed
//! addresses), and whether the NAT maps by destination (two relays saw different addresses for
//! the same socket). [`candidates`] merges the reflexive addresses with the local ones into the
//! endpoints published to peers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ward_shared::discovery::{BindingRequest, BindingResponse, TxId};
use ward_shared::wire::{RelayInfo, MAX_ENDPOINTS};

/// A relay that has not answered within this long counts as failed for the run.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Discovery is repeated this often (NAT mappings change, relays come and go).
pub const RUN_INTERVAL: Duration = Duration::from_secs(30);

/// What the last exchange with one relay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayReport {
    pub name: String,
    /// `HOST:PORT` as the netmap names it.
    pub addr: String,
    /// This device's address as the relay saw it in the last run (`None` after a failure).
    pub observed: Option<SocketAddr>,
    pub latency: Option<Duration>,
    pub last_success: Option<Instant>,
    /// Why the last run got no answer.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
struct Relay {
    report: RelayReport,
    /// Where requests go; `None` until resolved.
    resolved: Option<SocketAddr>,
    /// Resolution asked of the driver and not yet answered.
    resolving: bool,
    /// The request in flight: its txid and when it was sent.
    pending: Option<(TxId, Instant)>,
    /// The run wants a request sent as soon as the address is known.
    want_send: bool,
}

/// The discovery state machine; one per agent.
#[derive(Debug, Default)]
pub struct Netcheck {
    relays: Vec<Relay>,
    next_run: Option<Instant>,
    /// End of the current run's answer window.
    deadline: Option<Instant>,
    /// The latest time passed in (a network change schedules a run for it: at once).
    last_now: Option<Instant>,
    sends: VecDeque<(SocketAddr, Vec<u8>)>,
    resolves: VecDeque<String>,
}

/// Parses `HOST:PORT` when HOST is an IP literal (`[v6]:port` for IPv6).
fn literal(addr: &str) -> Option<SocketAddr> {
    addr.parse().ok()
}

impl Netcheck {
    /// The netmap's relays: a changed list (names or addresses) starts a run now; an unchanged
    /// one keeps its state.
    pub fn set_relays(&mut self, relays: &[RelayInfo], now: Instant) {
        let same = relays.len() == self.relays.len()
            && relays
                .iter()
                .zip(&self.relays)
                .all(|(a, b)| a.name == b.report.name && a.addr == b.report.addr);
        self.last_now = Some(now);
        if same {
            return;
        }
        let old = std::mem::take(&mut self.relays);
        self.relays = relays
            .iter()
            .map(|r| {
                // A relay still listed keeps what it found (no flapping of the candidates).
                if let Some(kept) = old
                    .iter()
                    .find(|o| o.report.name == r.name && o.report.addr == r.addr)
                {
                    return Relay {
                        pending: None,
                        want_send: false,
                        resolving: false,
                        ..kept.clone()
                    };
                }
                Relay {
                    report: RelayReport {
                        name: r.name.clone(),
                        addr: r.addr.clone(),
                        observed: None,
                        latency: None,
                        last_success: None,
                        error: None,
                    },
                    resolved: literal(&r.addr),
                    resolving: false,
                    pending: None,
                    want_send: false,
                }
            })
            .collect();
        self.deadline = None;
        self.sends.clear();
        self.resolves.clear();
        self.next_run = (!self.relays.is_empty()).then_some(now);
    }

    /// The local network changed (addresses came or went): mappings may have too, so a run
    /// is due at once (at the latest time passed in, which is already past).
    pub fn network_changed(&mut self) {
        if let (false, Some(t)) = (self.relays.is_empty(), self.last_now) {
            self.next_run = Some(t);
        }
    }

    /// Starts a run or ends one whose answer window closed. `random` draws txid bytes.
    pub fn handle_timeout(&mut self, now: Instant, mut random: impl FnMut() -> u64) {
        self.last_now = Some(now);
        if self.deadline.is_some_and(|d| now >= d) {
            self.deadline = None;
            for r in &mut self.relays {
                if r.pending.take().is_some() || r.want_send {
                    r.want_send = false;
                    r.report.observed = None;
                    r.report.latency = None;
                    r.report.error = Some(match r.resolved {
                        Some(_) => format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
                        None => "the relay's name did not resolve".into(),
                    });
                }
            }
        }
        if self.next_run.is_some_and(|t| now >= t) {
            self.next_run = Some(now + RUN_INTERVAL);
            self.deadline = Some(now + PROBE_TIMEOUT);
            for i in 0..self.relays.len() {
                let mut txid = [0u8; 12];
                txid[..8].copy_from_slice(&random().to_le_bytes());
                txid[8..].copy_from_slice(&random().to_le_bytes()[..4]);
                let r = &mut self.relays[i];
                r.pending = None;
                r.want_send = true;
                if literal(&r.report.addr).is_none() && !r.resolving {
                    // Names are resolved afresh each run: the relay may have moved.
                    r.resolving = true;
                    self.resolves.push_back(r.report.addr.clone());
                }
                self.relays[i].pending = Some((txid, now));
                self.send_if_ready(i, now);
            }
        }
    }

    fn send_if_ready(&mut self, i: usize, now: Instant) {
        let r = &mut self.relays[i];
        let (Some(dst), Some((txid, _)), true) = (r.resolved, r.pending, r.want_send) else {
            return;
        };
        if r.resolving && literal(&r.report.addr).is_none() && r.report.last_success.is_none() {
            // First contact waits for a fresh address; later runs use the last one meanwhile.
            return;
        }
        r.want_send = false;
        r.pending = Some((txid, now));
        self.sends
            .push_back((dst, BindingRequest { txid }.encode().to_vec()));
    }

    /// The driver resolved a relay's `HOST:PORT` (or failed to).
    pub fn handle_resolved(
        &mut self,
        addr: &str,
        result: Result<SocketAddr, String>,
        now: Instant,
    ) {
        for i in 0..self.relays.len() {
            let r = &mut self.relays[i];
            if r.report.addr != addr || !r.resolving {
                continue;
            }
            r.resolving = false;
            match &result {
                Ok(a) => r.resolved = Some(*a),
                Err(e) => {
                    if r.resolved.is_none() {
                        r.report.error = Some(format!("resolving {addr}: {e}"));
                    }
                }
            }
            self.send_if_ready(i, now);
        }
    }

    /// A binding response read from the WireGuard socket. Counted only when it comes from the
    /// relay it was sent to with the txid in flight; returns whether the derived facts
    /// (reflexive addresses, mapping) changed.
    pub fn handle_response(
        &mut self,
        from: SocketAddr,
        resp: &BindingResponse,
        now: Instant,
    ) -> bool {
        let before = (self.reflexive(), self.mapping_varies());
        let from = canonical(from);
        let Some(r) = self.relays.iter_mut().find(|r| {
            r.resolved.map(canonical) == Some(from)
                && r.pending.is_some_and(|(t, _)| t == resp.txid)
        }) else {
            return false;
        };
        let Some((_, sent)) = r.pending.take() else {
            return false;
        };
        r.want_send = false;
        r.report.observed = Some(canonical(resp.observed));
        r.report.latency = Some(now.saturating_duration_since(sent));
        r.report.last_success = Some(now);
        r.report.error = None;
        if self
            .relays
            .iter()
            .all(|r| r.pending.is_none() && !r.want_send)
        {
            self.deadline = None;
        }
        before != (self.reflexive(), self.mapping_varies())
    }

    /// Binding requests to send from the WireGuard socket: (relay address, datagram).
    pub fn poll_send(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.sends.pop_front()
    }

    /// A relay `HOST:PORT` the driver must resolve and hand to [`Netcheck::handle_resolved`].
    pub fn poll_resolve(&mut self) -> Option<String> {
        self.resolves.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.next_run, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- what was found -----------------------------------------------------------------

    pub fn relays(&self) -> impl Iterator<Item = &RelayReport> {
        self.relays.iter().map(|r| &r.report)
    }

    /// Whether any relay answered in its last run.
    pub fn udp(&self) -> bool {
        self.relays.iter().any(|r| r.report.observed.is_some())
    }

    /// Distinct addresses the relays saw this device at, in relay order.
    pub fn reflexive(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in self.relays.iter().filter_map(|r| r.report.observed) {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// `Some(true)` when two relays saw the same socket at different addresses (the NAT maps
    /// by destination: a reflexive address is useless to peers); `None` until two relays of
    /// one address family answered.
    pub fn mapping_varies(&self) -> Option<bool> {
        let seen: Vec<SocketAddr> = self
            .relays
            .iter()
            .filter_map(|r| r.report.observed)
            .collect();
        let mut verdict = None;
        for (i, a) in seen.iter().enumerate() {
            for b in &seen[i + 1..] {
                if a.is_ipv4() == b.is_ipv4() {
                    if a != b {
                        return Some(true);
                    }
                    verdict = Some(false);
                }
            }
        }
        verdict
    }
}

/// An IPv4-mapped IPv6 address as IPv4 (a dual-stack socket's view).
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

/// The endpoints published to peers: reflexive addresses first (what a peer behind another NAT
/// can reach), then the local ones, without duplicates, at most [`MAX_ENDPOINTS`].
pub fn candidates(reflexive: &[SocketAddr], local: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(MAX_ENDPOINTS);
    for a in reflexive.iter().chain(local).map(|a| canonical(*a)) {
        if out.len() == MAX_ENDPOINTS {
            break;
        }
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(name: &str, addr: &str) -> RelayInfo {
        RelayInfo {
            name: name.into(),
            addr: addr.into(),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0u64;
        move || {
            n += 1;
            n
        }
    }

    /// Answers every request in the outbox as a relay seeing `observed` would.
    fn answer_all(nc: &mut Netcheck, observed: &[(&str, &str)], at: Instant) -> bool {
        let mut changed = false;
        while let Some((dst, dg)) = nc.poll_send() {
            let req = BindingRequest::decode(&dg).unwrap();
            let obs = observed
                .iter()
                .find(|(r, _)| sa(r) == dst)
                .map(|(_, o)| sa(o))
                .unwrap();
            changed |= nc.handle_response(
                dst,
                &BindingResponse {
                    txid: req.txid,
                    observed: obs,
                },
                at,
            );
        }
        changed
    }

    #[test]
    fn answers_give_reflexive_latency_and_same_mapping() {
        let t0 = Instant::now();
        let mut nc = Netcheck::default();
        nc.set_relays(
            &[
                relay("r1", "198.51.100.1:3478"),
                relay("r2", "198.51.100.2:3478"),
            ],
            t0,
        );
        assert_eq!(nc.poll_timeout(), Some(t0));
        nc.handle_timeout(t0, counter());
        let at = t0 + Duration::from_millis(30);
        let changed = answer_all(
            &mut nc,
            &[
                ("198.51.100.1:3478", "203.0.113.7:51820"),
                ("198.51.100.2:3478", "203.0.113.7:51820"),
            ],
            at,
        );
        assert!(changed);
        assert!(nc.udp());
        assert_eq!(nc.reflexive(), vec![sa("203.0.113.7:51820")]);
        assert_eq!(nc.mapping_varies(), Some(false));
        let r: Vec<_> = nc.relays().collect();
        assert_eq!(r[0].latency, Some(Duration::from_millis(30)));
        assert_eq!(r[0].last_success, Some(at));
        // The run is over: next one in RUN_INTERVAL.
        assert_eq!(nc.poll_timeout(), Some(t0 + RUN_INTERVAL));
    }

    #[test]
    fn different_ports_mean_mapping_varies() {
        let t0 = Instant::now();
        let mut nc = Netcheck::default();
        nc.set_relays(
            &[
                relay("r1", "198.51.100.1:3478"),
                relay("r2", "198.51.100.2:3478"),
            ],
            t0,
        );
        nc.handle_timeout(t0, counter());
        answer_all(
            &mut nc,
            &[
                ("198.51.100.1:3478", "203.0.113.7:40001"),
                ("198.51.100.2:3478", "203.0.113.7:40002"),
            ],
            t0,
        );
        assert_eq!(nc.mapping_varies(), Some(true));
        assert_eq!(nc.reflexive().len(), 2);
    }

    #[test]
    fn one_relay_cannot_tell_the_mapping() {
        let t0 = Instant::now();
        let mut nc = Netcheck::default();
        nc.set_relays(&[relay("r1", "198.51.100.1:3478")], t0);
        nc.handle_timeout(t0, counter());
        answer_all(&mut nc, &[("198.51.100.1:3478", "203.0.113.7:1")], t0);
        assert_eq!(nc.mapping_varies(), None);
        assert!(nc.udp());
    }

    #[test]
    fn no_answer_times_out_after_two_seconds() {
        let t0 = Instant::now();
        let mut nc = Netcheck::default();
        nc.set_relays(&[relay("r1", "198.51.100.1:3478")], t0);
        nc.handle_timeout(t0, counter());
        let (dst, dg) = nc.poll_send().unwrap();
        assert_eq!(nc.poll_timeout(), Some(t0 + PROBE_TIMEOUT));
        nc.handle_timeout(t0 + PROBE_TIMEOUT, counter());
        assert!(!nc.udp());
        let r = nc.relays().next().unwrap();
        assert!(r.error.as_deref().unwrap().contains("no answer"));
        // A late answer to the timed-out request does not count.
        let txid = BindingRequest::decode(&dg).unwrap().txid;
        let late = BindingResponse {
            txid,
            observed: sa("203.0.113.7:1"),
        };
        assert!(!nc.handle_response(dst, &late, t0 + Duration::from_secs(3)));
        assert!(!nc.udp());
    }

    #[test]
    fn wrong_txid_or_source_is_ignored() {
        let t0 = Instant::now();
        let mut nc = Netcheck::default();
        nc.set_relays(&[relay("r1", "198.51.100.1:3478")], t0);
        nc.handle_timeout(t0, counter());
        let (dst, dg) = nc.poll_send().unwrap();
        let txid = BindingRequest::decode(&dg).unwrap().txid;
        let mut forged = txid;
        forged[0] ^= 1;
        let obs = sa("203.0.113.66:6666");
        assert!(!nc.handle_response(
            dst,
            &BindingResponse {
                txid: forged,
                observed: obs
            },
            t0
        ));
        // Right txid from another address (a spoofer that saw the request).
        assert!(!nc.handle_response(
            sa("192.0.2.9:3478"),
            &BindingResponse {
                txid,
                observed: obs
            },
            t0
        ));
        assert!(!nc.udp());
        // The genuine answer still counts, once.
        let real = BindingResponse {
            txid,
            observed: sa("203.0.113.7:1"),
        };
        assert!(nc.handle_response(dst, &real, t0));
        assert!(!nc.handle_response(dst, &real, t0));
        assert_eq!(nc.reflexive(), vec![sa("203.0.113.7:1")]);
    }

    #[test]
    fn names_are_resolved_by_the_driver_before_sending() {
        let t0 = Instant::now();
        let mut nc = Netcheck::default();
        nc.set_relays(&[relay("r1", "relay.example:3478")], t0);
        nc.handle_timeout(t0, counter());
        assert_eq!(nc.poll_resolve().as_deref(), Some("relay.example:3478"));
        assert!(nc.poll_send().is_none());
        nc.handle_resolved("relay.example:3478", Ok(sa("198.51.100.1:3478")), t0);
        let (dst, _) = nc.poll_send().unwrap();
        assert_eq!(dst, sa("198.51.100.1:3478"));
    }

    #[test]
    fn unresolvable_name_reports_an_error() {
        let t0 = Instant::now();
        let mut nc = Netcheck::default();
        nc.set_relays(&[relay("r1", "nowhere.example:3478")], t0);
        nc.handle_timeout(t0, counter());
        nc.handle_resolved("nowhere.example:3478", Err("no such host".into()), t0);
        nc.handle_timeout(t0 + PROBE_TIMEOUT, counter());
        assert!(nc.poll_send().is_none());
        let r = nc.relays().next().unwrap();
        assert!(r.error.is_some());
        assert!(!nc.udp());
    }

    #[test]
    fn periodic_and_network_change_runs() {
        let t0 = Instant::now();
        let mut nc = Netcheck::default();
        let mut rng = counter();
        nc.set_relays(&[relay("r1", "198.51.100.1:3478")], t0);
        nc.handle_timeout(t0, &mut rng);
        let first = nc.poll_send().unwrap();
        nc.handle_timeout(t0 + PROBE_TIMEOUT, &mut rng);
        assert!(nc.poll_send().is_none());
        nc.network_changed();
        assert_eq!(nc.poll_timeout(), Some(t0 + PROBE_TIMEOUT), "due at once");
        let t1 = t0 + Duration::from_secs(5);
        nc.handle_timeout(t1, &mut rng);
        let second = nc.poll_send().unwrap();
        assert_ne!(first.1, second.1, "each request has a fresh txid");
        // The same relay list again changes nothing.
        nc.set_relays(&[relay("r1", "198.51.100.1:3478")], t1);
        assert_eq!(nc.poll_timeout(), Some(t1 + PROBE_TIMEOUT));
        // A relay added keeps the others' findings until the run answers.
        nc.handle_timeout(t1 + PROBE_TIMEOUT, &mut rng);
        let (dst, dg) = {
            nc.handle_timeout(t1 + RUN_INTERVAL, &mut rng);
            nc.poll_send().unwrap()
        };
        let txid = BindingRequest::decode(&dg).unwrap().txid;
        let me = sa("203.0.113.7:1");
        assert!(nc.handle_response(
            dst,
            &BindingResponse { txid, observed: me },
            t1 + RUN_INTERVAL
        ));
        nc.set_relays(
            &[
                relay("r1", "198.51.100.1:3478"),
                relay("r2", "198.51.100.2:3478"),
            ],
            t1 + RUN_INTERVAL,
        );
        assert_eq!(nc.reflexive(), vec![me]);
        // No relays: no runs.
        nc.set_relays(&[], t1);
        assert_eq!(nc.poll_timeout(), None);
    }

    #[test]
    fn candidates_put_reflexive_first_dedupe_and_cap() {
        let refl = [sa("203.0.113.7:51820")];
        let local = [sa("192.168.1.2:51820"), sa("203.0.113.7:51820")];
        assert_eq!(
            candidates(&refl, &local),
            vec![sa("203.0.113.7:51820"), sa("192.168.1.2:51820")]
        );
        let many: Vec<SocketAddr> = (1..40u16)
            .map(|p| SocketAddr::new([10, 0, 0, 1].into(), p))
            .collect();
        let c = candidates(&refl, &many);
        assert_eq!(c.len(), MAX_ENDPOINTS);
        assert_eq!(c[0], refl[0]);
    }
}
