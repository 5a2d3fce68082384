//! WireGuard sessions with one peer, and the loss-free rotation of this device's key.
//!
//! A peer's [`Session`] holds its *current* link (a `Tunn` under this device's current key)
//! and, across a rotation, its *previous* link (the `Tunn` under the older key): the previous
//! link keeps carrying outbound traffic until the current one has a session, keeps decrypting
//! what the peer still sends under the old session, and is dropped [`PREVIOUS_GRACE`] after
//! the current link took over. [`Core::rotate_key`] starts a rotation; [`KeyRing`] keeps the
//! older keys that a previous link still uses (their handshakes are still answered).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::super::probe::Prober;
use super::outbox::Outbox;
use super::peers::Path;
use super::{
    lock, write, Core, FAST_PROBE_PERIOD, MSG_HANDSHAKE_INIT, PREVIOUS_GRACE, PROBE_INTERVAL_FAST,
};

/// Handshake initiations per second accepted before cookies are demanded (all peers together).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

impl Core {
    /// Switches this device to a new static key without interrupting traffic. Peers must
    /// already know the new key (the coordinator pushes it before the device switches).
    ///
    /// Every peer gets a new `Tunn` under the new key and a handshake initiation at once
    /// (written to `out`). Its old `Tunn`, if it has a session, becomes the previous link: it
    /// keeps carrying outbound packets until the new handshake completes, decrypts what the peer
    /// still sends under the old session, and is dropped [`PREVIOUS_GRACE`] after the new
    /// session is up. A rotation while an earlier one is still pending keeps whichever old link
    /// carries traffic.
    pub fn rotate_key(&self, private_key: [u8; 32], now: Instant, out: &mut Outbox) {
        let mut table = write(&self.table);
        let mut ring = write(&self.keys);
        let keys = Arc::new(Keys::new(private_key));
        if keys.public == ring.current.public {
            return;
        }
        let mut used: HashSet<u32> = table.by_index.keys().copied().collect();
        let mut sent = 0;
        for peer in table.peers.values() {
            let index = self.alloc_index(&used);
            used.insert(index);
            let link = Link::new(&keys, peer.public_key, self.persistent_keepalive, index);
            let mut s = lock(&peer.session);
            let old = std::mem::replace(&mut s.link, link);
            // The old link stays as the previous one: it carries traffic if it has a session,
            // and it answers handshakes to the old key from a peer that has not learned the new
            // one. But an earlier previous link that carries traffic (the last rotation's new
            // link never came up) is worth more than an old link without a session.
            let earlier_works = s
                .previous
                .as_ref()
                .is_some_and(|p| p.outbound && p.link.has_session());
            if old.has_session() || !earlier_works {
                s.previous = Some(Previous {
                    link: old,
                    outbound: true,
                    retire_at: None,
                });
            }
            tracing::debug!(
                host = %s.hostname,
                kept_previous = s.previous.is_some(),
                "local key rotated for peer"
            );
            s.fast_probe_until = now + FAST_PROBE_PERIOD;
            sent += self.probe(&mut s, now, out);
        }
        let mut older = vec![ring.current.clone()];
        older.extend(ring.older.iter().cloned());
        older.retain(|k| table.uses_local_key(k));
        *ring = Arc::new(KeyRing {
            current: keys,
            older,
        });
        drop(ring);
        table.reindex();
        drop(table);
        self.counters
            .handshake_initiations_sent
            .fetch_add(sent, Ordering::Relaxed);
    }
}

/// Runs a `Tunn`'s timers; returns the datagram it wants sent (length, is a handshake
/// initiation), already written at the start of `buf`. Without a session, the core's own
/// probing decides when initiations go out (on `now`, to every candidate), so boringtun's
/// retransmissions are dropped.
pub(super) fn timer_output(
    tunn: &mut Tunn,
    buf: &mut [u8],
    had_session: bool,
) -> Option<(usize, bool)> {
    match tunn.update_timers(buf) {
        TunnResult::WriteToNetwork(p) => {
            let is_init = p.first() == Some(&MSG_HANDSHAKE_INIT);
            (!is_init || had_session).then_some((p.len(), is_init))
        }
        TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => None,
        TunnResult::Err(e) => {
            tracing::trace!(?e, "update_timers");
            None
        }
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => None,
    }
}

/// A static key pair of this device and the handshake rate limiter keyed by it (mac1 depends
/// on the public key).
pub(super) struct Keys {
    pub(super) private: StaticSecret,
    pub(super) public: PublicKey,
    /// Verifies mac1 and rate-limits handshake initiations before the (expensive) anonymous
    /// parse that finds the initiating peer.
    pub(super) limiter: RateLimiter,
}

impl Keys {
    pub(super) fn new(private_key: [u8; 32]) -> Keys {
        let private = StaticSecret::from(private_key);
        let public = PublicKey::from(&private);
        Keys {
            limiter: RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT),
            private,
            public,
        }
    }
}

/// This device's current key and the older ones that some peer's previous link still uses.
pub(super) struct KeyRing {
    pub(super) current: Arc<Keys>,
    /// Newest first.
    pub(super) older: Vec<Arc<Keys>>,
}

impl KeyRing {
    /// The current key first.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<Keys>> + '_ {
        std::iter::once(&self.current).chain(self.older.iter())
    }
}

/// One `Tunn` with a peer under one of this device's local keys.
pub(super) struct Link {
    pub(super) tunn: Tunn,
    /// 24-bit receiver index given to the `Tunn`.
    pub(super) index: u32,
    /// The local key the `Tunn` uses.
    pub(super) keys: Arc<Keys>,
    /// When (on the core's clock) this link last completed a handshake.
    pub(super) established_at: Option<Instant>,
}

impl Link {
    pub(super) fn new(
        keys: &Arc<Keys>,
        peer_public: [u8; 32],
        persistent_keepalive: Option<u16>,
        index: u32,
    ) -> Link {
        Link {
            tunn: Tunn::new(
                keys.private.clone(),
                PublicKey::from(peer_public),
                None,
                persistent_keepalive,
                index,
                None,
            ),
            index,
            keys: keys.clone(),
            established_at: None,
        }
    }

    /// Has a session packets can be sent on.
    pub(super) fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }
}

/// The link under this device's previous key, kept across a rotation.
pub(super) struct Previous {
    pub(super) link: Link,
    /// Carries outbound traffic while it has a session and the current link has none yet;
    /// answers the peer's handshakes to the old key. Once false, it only decrypts.
    pub(super) outbound: bool,
    /// When it is dropped; set once the current link has a session.
    pub(super) retire_at: Option<Instant>,
}

/// Which link of a peer a datagram is for.
pub(super) enum LinkSelector {
    /// A handshake initiation to this local key.
    LocalKey(Arc<Keys>),
    /// A message carrying this receiver index.
    Index(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Current,
    Previous,
}

pub(super) struct Session {
    /// The link under this device's current key.
    pub(super) link: Link,
    pub(super) previous: Option<Previous>,
    pub(super) device_id: u64,
    pub(super) hostname: String,
    pub(super) path: Path,
    pub(super) next_probe: Instant,
    pub(super) fast_probe_until: Instant,
    /// Active path-MTU probing of the peer's direct path (see `dataplane::probe`).
    pub(super) mtu_probe: Prober,
}

impl Session {
    /// The link outbound packets are encrypted on: the previous one while it carries traffic
    /// and has a session, else the current one.
    pub(super) fn outbound_link(&self) -> &Link {
        match &self.previous {
            Some(p) if p.outbound && p.link.has_session() => &p.link,
            _ => &self.link,
        }
    }

    /// How good this entry is for outbound traffic: a usable session first, then the most
    /// recent handshake.
    pub(super) fn outbound_rank(&self) -> (bool, Option<Instant>) {
        let link = self.outbound_link();
        (link.has_session(), link.established_at)
    }

    pub(super) fn links(&self) -> impl Iterator<Item = &Link> + '_ {
        std::iter::once(&self.link).chain(self.previous.as_ref().map(|p| &p.link))
    }

    /// The link a datagram is for, if it still exists. A previous link answers handshakes only
    /// while it carries the outbound traffic, so a peer never moves back to it.
    pub(super) fn select(&self, to: &LinkSelector) -> Option<Slot> {
        match to {
            LinkSelector::LocalKey(k) => {
                if Arc::ptr_eq(&self.link.keys, k) {
                    Some(Slot::Current)
                } else {
                    self.previous
                        .as_ref()
                        .filter(|p| p.outbound && Arc::ptr_eq(&p.link.keys, k))
                        .map(|_| Slot::Previous)
                }
            }
            LinkSelector::Index(i) => {
                if self.link.index == *i {
                    Some(Slot::Current)
                } else {
                    self.previous
                        .as_ref()
                        .filter(|p| p.link.index == *i)
                        .map(|_| Slot::Previous)
                }
            }
        }
    }

    /// After an authenticated packet on the current link: once it has a session, outbound
    /// moves to it and the previous link's grace period starts.
    pub(super) fn promote_if_ready(&mut self, now: Instant) {
        let Some(p) = &mut self.previous else { return };
        if p.outbound && self.link.has_session() {
            tracing::debug!(host = %self.hostname, "outbound moved to the new key's session");
            p.outbound = false;
            p.retire_at = Some(now + PREVIOUS_GRACE);
        }
    }

    /// Outgoing traffic wants this peer: probe it at the fast rate for a while.
    pub(super) fn want_peer(&mut self, now: Instant) {
        let until = now + FAST_PROBE_PERIOD;
        if self.fast_probe_until < until {
            self.fast_probe_until = until;
        }
        let fast = now + PROBE_INTERVAL_FAST;
        if self.next_probe > fast {
            self.next_probe = fast;
        }
    }
}
