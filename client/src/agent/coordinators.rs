//! Which coordinator address to dial next, and when.
//!
//! A device knows every address of its instance's coordinators (replicas): the enrollment
//! token's list first, then whatever full netmaps carry. It dials the address that last gave
//! it a working session; when that fails (refused, timed out, the session broke) it moves to
//! the next address in the list, wrapping around, waiting a fully jittered backoff
//! ([`super::backoff`]) between attempts so that the devices of a failed replica spread out
//! over the others. A certificate rejection is the coordinator's verdict on this device, which
//! every replica shares: the device retries the same address instead of moving on.
//!
//! I/O-free: time is the caller's (the agent turns waits into deadlines), randomness a `u64`.

use std::time::Duration;

use ward_shared::token::MAX_COORDINATORS;

use super::backoff::Backoff;

#[derive(Debug)]
pub struct Coordinators {
    /// In the order to try; never empty once the driver gave one address.
    addrs: Vec<String>,
    /// The address dialled now (or last).
    current: Option<String>,
    /// The last address that gave a working session.
    preferred: Option<String>,
    backoff: Backoff,
}

/// How a session attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The address did not answer or the session broke: try the next address.
    Unreachable,
    /// The coordinator refused this device's certificate (or closed the session on it with a
    /// verdict): every replica says the same, so retry this address after the backoff.
    Refused,
    /// The coordinator revoked this device: this address, at least 30 s later.
    Revoked,
}

impl Coordinators {
    /// `addrs` in the order to try (duplicates and empty strings dropped, at most
    /// [`MAX_COORDINATORS`]); `preferred`, when it is one of them, is dialled first.
    pub fn new(addrs: Vec<String>, preferred: Option<String>) -> Self {
        let addrs = clean(addrs);
        let preferred = preferred.filter(|p| addrs.contains(p));
        let current = preferred.clone().or_else(|| addrs.first().cloned());
        Self {
            addrs,
            current,
            preferred,
            backoff: Backoff::default(),
        }
    }

    /// The address to dial now (`None` only before any address is known).
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Every known address, in the order they are tried.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The last address that gave a working session.
    pub fn preferred(&self) -> Option<&str> {
        self.preferred.as_deref()
    }

    /// Failed attempts since the last working session.
    pub fn failures(&self) -> u32 {
        self.backoff.failures()
    }

    /// The session on [`Coordinators::current`] works (its first netmap arrived): remember the
    /// address, start the backoff afresh. `true` when the preferred address changed.
    pub fn connected(&mut self) -> bool {
        self.backoff.reset();
        let changed = self.preferred != self.current;
        self.preferred = self.current.clone();
        changed
    }

    /// The attempt or session on the current address ended: picks the address for the next
    /// attempt and returns the wait before it (`random`: any uniform `u64`).
    pub fn failed(&mut self, ending: Ending, random: u64) -> Duration {
        if ending == Ending::Unreachable {
            self.current = self.next_after(self.current.as_deref());
        }
        self.backoff.next_wait(ending == Ending::Revoked, random)
    }

    /// The list a netmap carried replaces the known one (an empty list changes nothing).
    /// The session in progress stays where it is; the next attempt after it fails picks from
    /// the new list. `true` when the list changed.
    pub fn learn(&mut self, addrs: &[String]) -> bool {
        let addrs = clean(addrs.to_vec());
        if addrs.is_empty() || addrs == self.addrs {
            return false;
        }
        self.addrs = addrs;
        if self
            .preferred
            .as_ref()
            .is_some_and(|p| !self.addrs.contains(p))
        {
            self.preferred = None;
        }
        if self.current.is_none() {
            self.current = self.addrs.first().cloned();
        }
        true
    }

    /// The address after `addr` in the list, wrapping; the first one when `addr` is not in it
    /// (any more).
    fn next_after(&self, addr: Option<&str>) -> Option<String> {
        let pos = addr.and_then(|a| self.addrs.iter().position(|x| x == a));
        match pos {
            Some(i) => self.addrs.get((i + 1) % self.addrs.len()).cloned(),
            None => self
                .preferred
                .clone()
                .or_else(|| self.addrs.first().cloned()),
        }
    }
}

fn clean(addrs: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in addrs {
        let a = a.trim().to_string();
        if !a.is_empty() && !out.contains(&a) && out.len() < MAX_COORDINATORS {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::backoff::{BACKOFF_MAX, BACKOFF_MIN, REVOKED_RETRY};

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tries_the_preferred_address_first_then_the_others_in_order() {
        let mut c = Coordinators::new(list(&["a:1", "b:1", "c:1"]), Some("b:1".into()));
        assert_eq!(c.current(), Some("b:1"));
        let mut seen = Vec::new();
        for _ in 0..4 {
            c.failed(Ending::Unreachable, 0);
            seen.push(c.current().unwrap_or_default().to_string());
        }
        assert_eq!(seen, ["c:1", "a:1", "b:1", "c:1"]);
        // A preferred address that is not in the list is ignored.
        let c = Coordinators::new(list(&["a:1", "b:1"]), Some("z:1".into()));
        assert_eq!(c.current(), Some("a:1"));
        assert_eq!(c.preferred(), None);
        // Duplicates and blanks are dropped.
        let c = Coordinators::new(list(&["a:1", " ", "a:1", "b:1"]), None);
        assert_eq!(c.addrs(), list(&["a:1", "b:1"]));
    }

    #[test]
    fn a_working_session_makes_its_address_preferred_and_resets_the_backoff() {
        let mut c = Coordinators::new(list(&["a:1", "b:1"]), None);
        assert!(c.connected());
        assert!(!c.connected());
        assert_eq!(c.preferred(), Some("a:1"));
        // a fails: b, with the first window.
        assert!(c.failed(Ending::Unreachable, u64::MAX) <= BACKOFF_MIN);
        assert_eq!(c.current(), Some("b:1"));
        // b fails too: the window grows.
        assert_eq!(c.failed(Ending::Unreachable, u64::MAX), BACKOFF_MIN * 2);
        assert_eq!(c.current(), Some("a:1"));
        assert_eq!(c.failed(Ending::Unreachable, u64::MAX), BACKOFF_MIN * 4);
        assert_eq!(c.current(), Some("b:1"));
        assert_eq!(c.failures(), 3);
        // b works now: preferred, backoff from the start.
        assert!(c.connected());
        assert_eq!(c.preferred(), Some("b:1"));
        assert_eq!(c.failures(), 0);
        assert_eq!(c.failed(Ending::Unreachable, u64::MAX), BACKOFF_MIN);
        assert_eq!(c.current(), Some("a:1"));
    }

    #[test]
    fn waits_stay_within_bounds_and_grow_to_the_cap() {
        let mut c = Coordinators::new(list(&["a:1", "b:1"]), None);
        let mut state = 7u64;
        let mut max_seen = Duration::ZERO;
        for _ in 0..50 {
            let w = c.failed(Ending::Unreachable, crate::agent::next_random(&mut state));
            assert!(w <= BACKOFF_MAX, "{w:?}");
            max_seen = max_seen.max(w);
        }
        // Over 50 draws with the window at 10 s, some wait is well past the first window.
        assert!(max_seen > Duration::from_secs(5), "{max_seen:?}");
    }

    #[test]
    fn refusal_and_revocation_stay_on_the_same_address() {
        let mut c = Coordinators::new(list(&["a:1", "b:1"]), None);
        c.failed(Ending::Refused, 0);
        assert_eq!(c.current(), Some("a:1"));
        assert_eq!(c.failed(Ending::Revoked, 0), REVOKED_RETRY);
        assert_eq!(c.current(), Some("a:1"));
    }

    #[test]
    fn a_learned_list_replaces_the_old_one() {
        let mut c = Coordinators::new(list(&["a:1", "b:1"]), None);
        c.connected();
        // Same list, empty list: no change.
        assert!(!c.learn(&list(&["a:1", "b:1"])));
        assert!(!c.learn(&[]));
        // a is gone: the session on a keeps going, the next attempt goes to the new list.
        assert!(c.learn(&list(&["c:1", "b:1"])));
        assert_eq!(c.addrs(), list(&["c:1", "b:1"]));
        assert_eq!(c.preferred(), None);
        assert_eq!(c.current(), Some("a:1"));
        c.failed(Ending::Unreachable, 0);
        assert_eq!(c.current(), Some("c:1"));
        c.failed(Ending::Unreachable, 0);
        assert_eq!(c.current(), Some("b:1"));
        // The preferred address survives a list that keeps it.
        c.connected();
        assert!(c.learn(&list(&["b:1", "d:1"])));
        assert_eq!(c.preferred(), Some("b:1"));
        // An agent that knew nothing takes the first learned address.
        let mut empty = Coordinators::new(Vec::new(), None);
        assert_eq!(empty.current(), None);
        assert!(empty.learn(&list(&["x:1"])));
        assert_eq!(empty.current(), Some("x:1"));
    }
}
