//! The peer table: configured peers and cryptokey routing (destination overlay address →
//! peer; receiver index → peer). Where each peer is on the underlay: `path`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::icmp::in_overlay;
use super::outbox::Source;
use super::session::{Keys, Session};
use super::{lock, MAX_CANDIDATES};
use ward_shared::routes::Prefix;

pub(super) use super::path::{route, Path};

/// A configured peer. Its key and addresses are fixed; changing them makes a new `Peer`.
pub(super) struct Peer {
    pub(super) public_key: [u8; 32],
    pub(super) ipv4: Ipv4Addr,
    pub(super) ipv6: Ipv6Addr,
    pub(super) session: Mutex<Session>,
    pub(super) dropped_bad_source: AtomicU64,
}

/// The peer table. Every index maps to the peer owning it; addresses map to every peer
/// claiming them, in configuration order.
#[derive(Default)]
pub(super) struct Table {
    pub(super) peers: BTreeMap<[u8; 32], Arc<Peer>>,
    pub(super) by_v4: HashMap<Ipv4Addr, Vec<Arc<Peer>>>,
    pub(super) by_v6: HashMap<Ipv6Addr, Vec<Arc<Peer>>>,
    pub(super) by_index: HashMap<u32, Arc<Peer>>,
    /// Routed prefixes and the peers carrying them, longest prefix first.
    pub(super) routes: Vec<(Prefix, Vec<Arc<Peer>>)>,
    /// The overlay's IPv6 prefix (set with the routes): overlay addresses are never routed.
    pub(super) v6: Option<Ipv6Addr>,
}

impl Table {
    pub(super) fn insert(&mut self, peer: Arc<Peer>) {
        self.by_v4.entry(peer.ipv4).or_default().push(peer.clone());
        self.by_v6.entry(peer.ipv6).or_default().push(peer.clone());
        for link in lock(&peer.session).links() {
            self.by_index.insert(link.index, peer.clone());
        }
        self.peers.insert(peer.public_key, peer);
    }

    /// Routes `prefixes` to `peer` (after [`Table::insert`]). Prefixes inside the overlay are
    /// ignored: an overlay address belongs to its own device only.
    pub(super) fn insert_routes(
        &mut self,
        peer: &Arc<Peer>,
        prefixes: &[Prefix],
        v6: Option<Ipv6Addr>,
    ) {
        self.v6 = v6;
        for p in prefixes {
            if !p.is_default() && in_overlay(p.addr(), v6) {
                continue;
            }
            match self.routes.iter_mut().find(|(q, _)| q == p) {
                Some((_, peers)) => peers.push(peer.clone()),
                None => self.routes.push((*p, vec![peer.clone()])),
            }
        }
        self.routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    }

    /// Whether `peer` may send packets from `src`: its own addresses, or a routed prefix it
    /// carries that is the longest match for `src` (and `src` is not an overlay address).
    pub(super) fn may_send_from(
        &self,
        peer: &Arc<Peer>,
        src: IpAddr,
        v6: Option<Ipv6Addr>,
    ) -> bool {
        if src == IpAddr::V4(peer.ipv4) || src == IpAddr::V6(peer.ipv6) {
            return true;
        }
        if in_overlay(src, v6) {
            return false;
        }
        self.routed(src).iter().any(|p| Arc::ptr_eq(p, peer))
    }

    /// The peers carrying the longest routed prefix that holds `dst`.
    fn routed(&self, dst: IpAddr) -> &[Arc<Peer>] {
        self.routes
            .iter()
            .find(|(p, _)| p.contains(dst))
            .map_or(&[], |(_, peers)| peers.as_slice())
    }

    /// The device that holds `key` in this table, if it is not `device_id`: a key mapped to one
    /// peer never moves to another device's entry while the first holds it, whatever a peer
    /// list says, so even a coordinator that leased one key twice cannot cut the holder off.
    pub(super) fn other_holder(&self, key: &[u8; 32], device_id: u64) -> Option<u64> {
        let holder = lock(&self.peers.get(key)?.session).device_id;
        (holder != device_id).then_some(holder)
    }

    /// Rebuilds the index map from the peers' links (after a rotation).
    pub(super) fn reindex(&mut self) {
        self.by_index.clear();
        for peer in self.peers.values() {
            for link in lock(&peer.session).links() {
                self.by_index.insert(link.index, peer.clone());
            }
        }
    }

    /// Whether some peer's previous link uses this local key.
    pub(super) fn uses_local_key(&self, keys: &Arc<Keys>) -> bool {
        self.peers.values().any(|peer| {
            lock(&peer.session)
                .previous
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(&p.link.keys, keys))
        })
    }

    /// The peer that gets packets for `dst`. With several peers claiming it (a peer's old and
    /// new key during its rotation): the one with a usable session whose handshake is the most
    /// recent; if none has a session, the last configured (it gets the handshake). So traffic
    /// never leaves a working session for one that is not up yet.
    pub(super) fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        match self.claimants(dst) {
            [] => None,
            [one] => Some(one),
            many => many
                .iter()
                .enumerate()
                .max_by_key(|(i, p)| (lock(&p.session).outbound_rank(), *i))
                .map(|(_, p)| p),
        }
    }

    /// Every peer claiming `dst`, in configuration order (more than one only during a peer's
    /// rotation). Locks nothing.
    pub(super) fn claimants(&self, dst: IpAddr) -> &[Arc<Peer>] {
        let own = match dst {
            IpAddr::V4(a) => self.by_v4.get(&a),
            IpAddr::V6(a) => self.by_v6.get(&a),
        };
        match own {
            Some(v) => v.as_slice(),
            None if self.routes.is_empty() || in_overlay(dst, self.v6) => &[],
            None => self.routed(dst),
        }
    }
}

/// A direct source in its canonical form (see [`canonical`]).
pub(super) fn canonical_source(src: Source) -> Source {
    match src {
        Source::Udp(a) => Source::Udp(canonical(a)),
        Source::Relay { .. } => src,
    }
}

/// IPv4-mapped IPv6 source addresses (from a dual-stack socket) become plain IPv4.
pub(super) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

pub(super) fn sanitize_candidates(endpoints: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(endpoints.len().min(MAX_CANDIDATES));
    for e in endpoints.iter().map(|e| canonical(*e)) {
        if e.port() == 0 || e.ip().is_unspecified() || out.contains(&e) {
            continue;
        }
        if out.len() == MAX_CANDIDATES {
            break;
        }
        out.push(e);
    }
    out
}
