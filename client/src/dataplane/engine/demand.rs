//! Peers on demand (protocol 4): what the engine holds while it waits for a peer the
//! coordinator has not sent yet, and the wants it asks for them with.
//!
//! With on-demand mode on (`Core::set_on_demand`), a TUN packet to an overlay address no peer
//! claims is held (at most [`HELD_PER_DST`] per destination, the oldest dropped beyond that;
//! at most [`MAX_HELD_DSTS`] destinations, a further one is not held) for [`HELD_TTL`], and a
//! want `PeerRef::Addr(dst)` is recorded, at most once per [`WANT_INTERVAL`] per address. A
//! handshake initiation from a key no peer has is held the same way (one per key, the newest,
//! [`MAX_HELD_KEYS`] keys) with a want `PeerRef::Key`. Wants are recorded at most
//! [`WANTS_PER_SEC`] a second in all, whatever the traffic (an initiation flood with fresh
//! keys included), so the coordinator's per-session limits are never at risk.
//!
//! The driver takes the wants (`Core::take_wants`) for the agent, which asks the coordinator.
//! When `Core::set_peers` installs a peer, what was held for it is handled again as if it had
//! just arrived (`Demand::take_routable`, `Demand::take_known`). When the coordinator refuses
//! (`Core::refuse`), what was held is dropped (held TUN packets are answered with ICMP
//! "administratively prohibited") and for [`REFUSAL_HOLD`] packets to that address get the ICMP
//! at once and no new want.
//!
//! Everything here is bounded by a constant; time is passed in. The lock around [`Demand`] is
//! a leaf: nothing else is locked while it is held.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ward_shared::wire::{PeerRef, WgPublicKey};

use super::outbox::Source;

/// Most TUN packets held per destination; a further one drops the oldest.
pub const HELD_PER_DST: usize = 4;
/// Most destinations with held packets; packets to a further one are not held.
pub const MAX_HELD_DSTS: usize = 64;
/// Most unknown keys with a held handshake initiation.
pub const MAX_HELD_KEYS: usize = 64;
/// How long a held packet waits for its peer.
pub const HELD_TTL: Duration = Duration::from_secs(3);
/// The same peer is asked for at most this often.
pub const WANT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a refusal stands: packets to a refused address get the ICMP at once, no want.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(10);
/// Most wants recorded per second in all.
pub const WANTS_PER_SEC: u32 = 64;
/// Most refusals remembered (the one ending first makes room).
const MAX_REFUSALS: usize = 256;
/// Most wants waiting to be taken.
const MAX_PENDING_WANTS: usize = MAX_HELD_DSTS + MAX_HELD_KEYS;

/// What became of a packet offered to [`Demand::hold_packet`] or [`Demand::hold_init`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    /// Held; `dropped` older ones made room, `wanted` a want was recorded.
    Held { dropped: u64, wanted: bool },
    /// Not held: the bound on destinations (or keys) is reached; `dropped` expired ones
    /// went while looking for room.
    Full { dropped: u64 },
    /// Not held: the coordinator refused this peer a moment ago.
    Refused,
}

/// TUN packets waiting for the peer that owns their destination.
struct HeldDst {
    packets: VecDeque<(Instant, Vec<u8>)>,
    /// When this address was last asked for (`None`: not yet).
    wanted_at: Option<Instant>,
}

/// A handshake initiation from a key no peer has, with where it came from.
struct HeldInit {
    at: Instant,
    from: Source,
    datagram: Vec<u8>,
    wanted_at: Option<Instant>,
}

/// What is held for peers on demand, the wants not yet taken, and recent refusals.
#[derive(Default)]
pub(super) struct Demand {
    dsts: BTreeMap<IpAddr, HeldDst>,
    keys: BTreeMap<[u8; 32], HeldInit>,
    /// Refused peers and when each refusal ends.
    refused: BTreeMap<PeerRef, Instant>,
    wants: Vec<PeerRef>,
    /// The wants rate window: its start and the wants recorded in it.
    window: Option<(Instant, u32)>,
}

impl Demand {
    /// Holds a copy of `packet` for `dst`; records a want if one is due.
    pub(super) fn hold_packet(&mut self, dst: IpAddr, packet: &[u8], now: Instant) -> Hold {
        if self.is_refused(&PeerRef::Addr(dst), now) {
            return Hold::Refused;
        }
        let mut dropped = self.expire_dst(dst, now);
        if !self.dsts.contains_key(&dst) && self.dsts.len() >= MAX_HELD_DSTS {
            dropped += self.expire(now);
            if self.dsts.len() >= MAX_HELD_DSTS {
                return Hold::Full { dropped };
            }
        }
        let held = self.dsts.entry(dst).or_insert_with(|| HeldDst {
            packets: VecDeque::with_capacity(HELD_PER_DST),
            wanted_at: None,
        });
        if held.packets.len() >= HELD_PER_DST {
            held.packets.pop_front();
            dropped += 1;
        }
        held.packets.push_back((now, packet.to_vec()));
        let due = want_due(held.wanted_at, now);
        let wanted = due && self.want(PeerRef::Addr(dst), now);
        if wanted {
            if let Some(h) = self.dsts.get_mut(&dst) {
                h.wanted_at = Some(now);
            }
        }
        Hold::Held { dropped, wanted }
    }

    /// Holds a handshake initiation from the unknown `key` (the newest replaces an older one);
    /// records a want if one is due.
    pub(super) fn hold_init(
        &mut self,
        key: [u8; 32],
        from: Source,
        datagram: &[u8],
        now: Instant,
    ) -> Hold {
        let by = PeerRef::Key(WgPublicKey(key));
        if self.is_refused(&by, now) {
            return Hold::Refused;
        }
        // The newest initiation replaces an older one (it is the one the peer retransmits).
        let old = self.keys.remove(&key);
        let mut dropped = u64::from(old.is_some());
        let wanted_at = old.and_then(|h| h.wanted_at);
        if self.keys.len() >= MAX_HELD_KEYS {
            dropped += self.expire(now);
            if self.keys.len() >= MAX_HELD_KEYS {
                return Hold::Full { dropped };
            }
        }
        let wanted = want_due(wanted_at, now) && self.want(by, now);
        self.keys.insert(
            key,
            HeldInit {
                at: now,
                from,
                datagram: datagram.to_vec(),
                wanted_at: if wanted { Some(now) } else { wanted_at },
            },
        );
        Hold::Held { dropped, wanted }
    }

    /// Whether the coordinator refused `by` less than [`REFUSAL_HOLD`] ago.
    pub(super) fn is_refused(&self, by: &PeerRef, now: Instant) -> bool {
        self.refused.get(by).is_some_and(|until| now < *until)
    }

    /// The coordinator refused `by`: remembered for [`REFUSAL_HOLD`]; returns the TUN packets
    /// held for it (for the ICMP replies) and how many held datagrams were dropped besides.
    /// A refusal by name is the resolver's business, not the engine's: ignored here.
    pub(super) fn refuse(&mut self, by: PeerRef, now: Instant) -> (Vec<Vec<u8>>, u64) {
        if matches!(by, PeerRef::Name(_)) {
            return (Vec::new(), 0);
        }
        self.refused.retain(|_, until| now < *until);
        if !self.refused.contains_key(&by) && self.refused.len() >= MAX_REFUSALS {
            let first = self
                .refused
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(r, _)| r.clone());
            if let Some(r) = first {
                self.refused.remove(&r);
            }
        }
        self.refused.insert(by.clone(), now + REFUSAL_HOLD);
        self.wants.retain(|w| *w != by);
        match by {
            PeerRef::Addr(a) => {
                let packets = self
                    .dsts
                    .remove(&a)
                    .map(|h| h.packets.into_iter().map(|(_, p)| p).collect())
                    .unwrap_or_default();
                (packets, 0)
            }
            PeerRef::Key(k) => (Vec::new(), u64::from(self.keys.remove(&k.0).is_some())),
            // Returned above: the engine never holds anything by name.
            PeerRef::Name(_) => (Vec::new(), 0),
        }
    }

    /// Takes the TUN packets held for destinations `routes` now has a peer for, oldest first
    /// per destination, with how many had expired (dropped).
    pub(super) fn take_routable(
        &mut self,
        now: Instant,
        routes: impl Fn(IpAddr) -> bool,
    ) -> (Vec<Vec<u8>>, u64) {
        let dropped = self.expire(now);
        let ready: Vec<IpAddr> = self.dsts.keys().copied().filter(|d| routes(*d)).collect();
        let mut packets = Vec::new();
        for dst in ready {
            if let Some(h) = self.dsts.remove(&dst) {
                packets.extend(h.packets.into_iter().map(|(_, p)| p));
            }
        }
        (packets, dropped)
    }

    /// Takes the handshake initiations held for keys `known` now has a peer for.
    pub(super) fn take_known(
        &mut self,
        known: impl Fn(&[u8; 32]) -> bool,
    ) -> Vec<(Source, Vec<u8>)> {
        let ready: Vec<[u8; 32]> = self.keys.keys().copied().filter(|k| known(k)).collect();
        ready
            .into_iter()
            .filter_map(|k| self.keys.remove(&k))
            .map(|h| (h.from, h.datagram))
            .collect()
    }

    /// The wants recorded since the last call.
    pub(super) fn take_wants(&mut self) -> Vec<PeerRef> {
        std::mem::take(&mut self.wants)
    }

    /// Drops what is held longer than [`HELD_TTL`]; returns how many packets went.
    pub(super) fn expire(&mut self, now: Instant) -> u64 {
        let mut dropped = 0;
        let dsts: Vec<IpAddr> = self.dsts.keys().copied().collect();
        for dst in dsts {
            dropped += self.expire_dst(dst, now);
        }
        let before = self.keys.len();
        self.keys
            .retain(|_, h| now.saturating_duration_since(h.at) < HELD_TTL);
        dropped + (before - self.keys.len()) as u64
    }

    /// Whether nothing is held and no want waits (nothing for `set_peers` to replay).
    pub(super) fn is_idle(&self) -> bool {
        self.dsts.is_empty() && self.keys.is_empty() && self.wants.is_empty()
    }

    /// Drops everything held and every want (on-demand mode off); returns how many held
    /// packets went.
    pub(super) fn clear(&mut self) -> u64 {
        let n = self.dsts.values().map(|h| h.packets.len()).sum::<usize>() + self.keys.len();
        self.dsts.clear();
        self.keys.clear();
        self.wants.clear();
        n as u64
    }

    /// Drops `dst`'s expired packets (its entry with them if none is left).
    fn expire_dst(&mut self, dst: IpAddr, now: Instant) -> u64 {
        let Some(h) = self.dsts.get_mut(&dst) else {
            return 0;
        };
        let mut dropped = 0;
        while h
            .packets
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= HELD_TTL)
        {
            h.packets.pop_front();
            dropped += 1;
        }
        if h.packets.is_empty() {
            self.dsts.remove(&dst);
        }
        dropped
    }

    /// Records a want for `by` if the rate and the pending list allow; whether it did.
    fn want(&mut self, by: PeerRef, now: Instant) -> bool {
        let (start, count) = match self.window {
            Some((start, count))
                if now.saturating_duration_since(start) < Duration::from_secs(1) =>
            {
                (start, count)
            }
            _ => (now, 0),
        };
        if count >= WANTS_PER_SEC {
            self.window = Some((start, count));
            return false;
        }
        if !self.wants.contains(&by) {
            if self.wants.len() >= MAX_PENDING_WANTS {
                return false;
            }
            self.wants.push(by);
        }
        self.window = Some((start, count + 1));
        true
    }
}

/// Whether a peer last asked for at `wanted_at` may be asked for again.
fn want_due(wanted_at: Option<Instant>, now: Instant) -> bool {
    wanted_at.is_none_or(|t| now.saturating_duration_since(t) >= WANT_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    fn dst(i: u16) -> IpAddr {
        let [hi, lo] = i.to_be_bytes();
        IpAddr::V4(Ipv4Addr::new(100, 64, hi, lo))
    }

    fn from() -> Source {
        Source::Udp(SocketAddr::from(([192, 0, 2, 1], 51820)))
    }

    #[test]
    fn wants_are_capped_per_second_in_all_and_held_keys_are_bounded() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        let mut wanted = 0;
        // Keys and addresses share the rate: 64 keys, then addresses.
        for k in 0..=MAX_HELD_KEYS as u8 {
            match d.hold_init([k; 32], from(), b"init", t0) {
                Hold::Held { wanted: w, .. } => wanted += u32::from(w),
                Hold::Full { dropped } => {
                    assert_eq!((k, dropped), (MAX_HELD_KEYS as u8, 0), "the 65th key")
                }
                Hold::Refused => panic!("nothing refused"),
            }
        }
        assert_eq!(wanted, WANTS_PER_SEC);
        let Hold::Held { wanted: false, .. } = d.hold_packet(dst(1), b"p", t0) else {
            panic!("held, but no want left this second");
        };
        assert_eq!(d.take_wants().len(), WANTS_PER_SEC as usize);
        // The next second: the address is asked for at its next packet.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            d.hold_packet(dst(1), b"p", t1),
            Hold::Held {
                dropped: 0,
                wanted: true
            }
        );
        // The keys expire with their initiations, and so does the packet held at t0 (not the
        // one held at t1).
        assert_eq!(d.expire(t0 + HELD_TTL), MAX_HELD_KEYS as u64 + 1);
        assert!(d.keys.is_empty());
        assert_eq!(d.dsts.get(&dst(1)).map(|h| h.packets.len()), Some(1));
    }

    #[test]
    fn refusals_are_remembered_for_a_while_and_bounded() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        for i in 0..=MAX_REFUSALS as u16 {
            let _ = d.refuse(PeerRef::Addr(dst(i)), t0 + Duration::from_millis(i.into()));
        }
        assert_eq!(d.refused.len(), MAX_REFUSALS);
        let now = t0 + Duration::from_secs(1);
        assert!(
            !d.is_refused(&PeerRef::Addr(dst(0)), now),
            "the first made room"
        );
        assert!(d.is_refused(&PeerRef::Addr(dst(1)), now));
        assert_eq!(d.hold_packet(dst(1), b"p", now), Hold::Refused);
        let later = t0 + REFUSAL_HOLD + Duration::from_secs(1);
        assert!(matches!(
            d.hold_packet(dst(1), b"p", later),
            Hold::Held { wanted: true, .. }
        ));
    }

    #[test]
    fn a_refusal_by_name_is_not_the_engines_business() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        let _ = d.hold_packet(dst(1), b"p", t0);
        let by = PeerRef::Name(ward_shared::wire::Label::parse("db").unwrap());
        assert_eq!(d.refuse(by.clone(), t0), (Vec::new(), 0));
        assert!(!d.is_refused(&by, t0));
        assert!(d.refused.is_empty());
        assert_eq!(
            d.take_wants(),
            vec![PeerRef::Addr(dst(1))],
            "wants untouched"
        );
    }
}
