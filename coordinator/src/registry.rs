//! The coordinator's I/O-free core: which devices are live, which hold a control session, and
//! what each session must be told.
//!
//! ```text
//! driver loop:
//!   on store change      -> registry.handle_device_upserted(dev) / handle_device_removed(id, why)
//!                           / handle_relays(list)
//!   on session events    -> handle_session_opened / handle_session_update / handle_session_closed
//!   then, until None     -> registry.poll_output() -> Send{conn, msg} | Close{conn, ..}
//! ```
//!
//! Netmaps are computed lazily in `poll_output` after any change, and each session gets only
//! the difference from what it was last sent (a full netmap the first time); a device whose
//! access did not change receives nothing. Who may see whom comes from the compiled policy
//! (`ward_shared::policy`): no policy, or an empty one, means no peers at all (default deny).
//! Time-bound rules and grants make the core ask to be woken at their expiry
//! (`poll_timeout`); the driver then calls `handle_time`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ward_shared::addr::AddressPools;
use ward_shared::filter::{FilterRule, Proto};
use ward_shared::lease::SignedLease;
use ward_shared::names::{Hostname, Name};
use ward_shared::peerset::{self, Factored};
use ward_shared::policy::{
    self, Compiled, DirDevice, DirUser, Directory, Grant, Policy, ReachDest, ReachGrant,
};
use ward_shared::posture::{self, PostureReport, PostureWants};
use ward_shared::routes::{overlaps_overlay, Prefix, MAX_ADVERTISED_ROUTES};
use ward_shared::wire::{
    CoordinatorMsg, DeniedFlow, DeviceId, DeviceUpdate, ErrorCode, ListEdit, Netmap, NetmapDelta,
    Peer, PeerRef, PostureVerdict, ReachService, RelayInfo, RiskView, SelfInfo, WgPublicKey,
    MAX_DENIED_FLOWS, MAX_ENDPOINTS, MAX_NAME_PEERS, PROTOCOL_VERSION,
};

use crate::behaviour::{AckError, Anomaly, Config as BehaviourConfig, Detector, Label};
use crate::model::{Device, User};
use crate::trust::{Change, Decision, RemoteTrust, ReportError, TrustBook};

mod held;
mod on_demand;
mod withheld;
use held::HeldLeases;
use on_demand::{Held, PeerMode};
use ward_shared::wire::MAX_HELD_PEERS;

/// While netmaps are pending, one due verdict goes out after this many sessions' netmap
/// changes: verdicts wait for the netmaps (peers first, and a quarantined device's verdict
/// costs a compile), but a stream of changes that keeps the queue from emptying must not
/// keep a device from learning it was quarantined. The sessions whose trust changed are
/// produced first ([`Registry::trust_changed_first`]), so their verdicts are due early.
pub const VERDICT_EVERY: usize = 32;

/// How often reports are re-judged for age and overdue failures (ms).
pub const TRUST_TICK_MS: i64 = 1000;

/// Leases kept per device: the current one and the one it is rotating to.
pub const MAX_LEASES: usize = 2;

/// How long a WireGuard key stays bound to the device that held it after its lease was
/// replaced or revoked: no other device may lease it meanwhile.
pub const KEY_HOLD_MS: i64 = 24 * 3600 * 1000;
/// Retired keys remembered (the oldest are forgotten first beyond this).
const MAX_RETIRED_KEYS: usize = 65_536;
/// Refreshes kept in the views log, and devices named in it at most.
const VIEWS_LOG_GENS: usize = 256;
const VIEWS_LOG_IDS: usize = 65_536;

/// Why a lease request was refused before any lease was issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRefusal {
    #[error("this WireGuard key is leased to another device")]
    KeyInUse { holder: DeviceId },
    #[error("the device is not allowed on the network")]
    NotLive,
}

impl LeaseRefusal {
    /// The code the device is sent.
    pub fn code(&self) -> ErrorCode {
        match self {
            LeaseRefusal::KeyInUse { .. } => ErrorCode::KeyInUse,
            LeaseRefusal::NotLive => ErrorCode::DeviceRevoked,
        }
    }
}

/// A control connection, numbered by the driver.
pub type ConnId = u64;

/// Punch requests one device may have forwarded per [`PUNCH_WINDOW_MS`]…
pub const PUNCH_PER_WINDOW: u32 = 20;
/// …per this window (ms).
pub const PUNCH_WINDOW_MS: i64 = 10_000;
/// At most one punch from one device to the same peer this often (ms).
pub const PUNCH_PAIR_GAP_MS: i64 = 1_000;

/// Why a punch request was not forwarded (each counted in [`PunchCounters`]). The requester
/// is told nothing: it never waits for an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PunchRefused {
    #[error("the requester has no session on that connection")]
    NoSession,
    #[error("the two devices are not in each other's netmap")]
    NotPeers,
    #[error("the peer is offline or does not understand punches")]
    PeerUnavailable,
    #[error("the requester sent too many punch requests")]
    RequesterLimited,
    #[error("the requester punched this peer too recently")]
    PairLimited,
}

/// Punch requests forwarded and dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PunchCounters {
    pub forwarded: u64,
    pub not_peers: u64,
    pub peer_unavailable: u64,
    pub requester_limited: u64,
    pub pair_limited: u64,
}

// `Send` carries a whole message (a netmap inline); outputs are drained one at a time right
// after each input, so the few hundred bytes per queued output are cheaper than a box per send.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Output {
    Send {
        conn: ConnId,
        msg: CoordinatorMsg,
    },
    /// Send the error, then close the connection.
    Close {
        conn: ConnId,
        code: ErrorCode,
        reason: String,
    },
    /// What a device advertises as routable changed (store it for `device routes`).
    RoutesAdvertised {
        device: DeviceId,
        routes: Vec<Prefix>,
    },
    /// A device's posture results changed (audit it, keep it).
    PostureChanged {
        device: DeviceId,
        change: Change,
        report: Option<Box<PostureReport>>,
    },
    /// A trust rule wants the device quarantined (store it, audit it, then call
    /// `handle_device_upserted` with the quarantined device).
    Quarantine {
        device: DeviceId,
        reason: String,
    },
    /// The behaviour detector raised an anomaly (store it, audit it).
    Anomaly(Box<crate::behaviour::Anomaly>),
    /// The home relay of a session held here changed (record it for the other replicas).
    HomeRelay {
        device: DeviceId,
        relay: Option<String>,
    },
    /// This replica, holding the device's session, judged its trust differently from the
    /// stored row: store it (audited) so the other replicas judge the device's peers by it.
    TrustDecided {
        device: DeviceId,
        decision: Decision,
    },
    /// The device's risk crossed the policy's `risk_threshold`, up (`above`) or back down
    /// (audit it).
    RiskCrossed {
        device: DeviceId,
        score: u8,
        threshold: u8,
        above: bool,
        reason: String,
    },
    /// The device lost its access (revoked, its user disabled): relays must refuse its tickets
    /// and drop its connections.
    DeviceRevoked {
        device: DeviceId,
    },
    /// Denied flows `reporter` reported here, as accusations against their sources (source,
    /// proto, port): store them for the other replicas' trust books, bounded per source and
    /// reporter within the scan window (`window_ms`). A failed write loses only evidence.
    ScanEvidence {
        reporter: DeviceId,
        flows: Vec<(DeviceId, Proto, u16)>,
        at_ms: i64,
        window_ms: i64,
    },
}

/// One denied flow another replica stored as evidence against `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEvidence {
    pub source: DeviceId,
    pub reporter: DeviceId,
    pub proto: Proto,
    pub port: u16,
    pub at_ms: i64,
}

#[derive(Debug)]
struct Session {
    conn: ConnId,
    observed: SocketAddr,
    /// The protocol version the device speaks: from 2 its filter names peer sets, version 1
    /// gets every source address in every rule; from 3 its reach is grants and destination
    /// lists, versions 1 and 2 get one entry per destination.
    protocol: u32,
    /// What this session was last sent.
    sent: Option<Sent>,
    wants_sent: Option<PostureWants>,
    verdict_sent: Option<PostureVerdict>,
    /// The registered relay this device last said it receives relayed traffic through (kept
    /// only while the session lasts; peers see it as `Peer.relay`).
    home_relay: Option<String>,
    /// The device understands `punch` (its last update said so).
    punch: bool,
    /// Punch requests forwarded in the window that started at `punch_window_ms`.
    punch_window_ms: i64,
    punch_in_window: u32,
    /// When a punch from this device to each peer was last forwarded (peers only, so bounded
    /// by the netmap).
    punch_last: BTreeMap<DeviceId, i64>,
    /// Every peer, or only those it holds (protocol 4; decided at its first netmap).
    peers: PeerMode,
    /// The held peers changed: the next netmap compares every held peer with what was sent.
    held_changed: bool,
    /// `want_peer` messages in the window that started at `want_window_ms`.
    want_window_ms: i64,
    wants_in_window: u32,
}

#[derive(Debug)]
struct Sent {
    seq: u64,
    /// The name this device was last told is its own.
    hostname: Hostname,
    /// The routes this device was last told it forwards.
    routes: Vec<Prefix>,
    /// Each peer as last sent: the shared view (one allocation per peer state, not one per
    /// session) and the routes this device reaches through it.
    peers: BTreeMap<DeviceId, SentPeer>,
    /// The `views` generation `peers` was last brought up to date with.
    views_gen: u64,
    /// The inbound filter, the candidate inbound filter (policies with shadow rules) and the
    /// peer sets they name, as sent (no sets for a version-1 device).
    filter: Factored,
    /// The compile the filter and `reach` sent came from: this device's `reach` is read from
    /// it (not copied per session), and while it is the current compile nothing derived from
    /// the compile can have changed for this session.
    compiled: Arc<Compiled>,
    relays: Vec<RelayInfo>,
    policy_version: Option<u64>,
    /// The filter was narrowed ahead of a compile ([`Registry::narrow_out`]): the next
    /// netmap change factors it afresh even if the compile is the same.
    narrowed: bool,
    /// On demand: the filter's sets before they were cut down to the held peers' addresses
    /// (`filter.sets`, what the device was sent), kept to cut them again when the held peers
    /// change. Shared with every session of the same populations.
    full_sets: Option<peerset::SetBook>,
    /// On demand (reach by reference): each reachable service's destinations among the held
    /// peers, as sent (a service's whole list names thousands of devices at 10 000 dense).
    held_lists: Option<BTreeMap<String, Vec<DeviceId>>>,
}

/// Each destination list's members as a bit set over device ids, made once per list (and
/// dropped with the compile): a session on demand tests each peer it holds against every list
/// it reaches, and a binary search of a list of 10 000 named destinations was a cache miss at
/// every step, for each of 10 000 sessions. The cache keeps each list alive, so a list's
/// address is never reused for another while it is cached.
#[derive(Debug, Default)]
struct ListMembers {
    lists: HashMap<usize, MemberBits>,
    /// Whether two lists name the same devices, by the pair's addresses: after a compile
    /// every session compares what it was sent with the new lists, the same few pairs of
    /// 10 000-entry lists for each of 10 000 sessions. The pair is held, as above.
    same: HashMap<(usize, usize), SameLists>,
}

/// A compared pair of lists (held) and whether they name the same devices.
type SameLists = (Arc<[ReachDest]>, Arc<[ReachDest]>, bool);

/// A cached list (held so its address stays its own) and its members' bits (`None`: an id
/// too large for bits; searched instead).
type MemberBits = (Arc<[ReachDest]>, Option<Vec<u64>>);

impl ListMembers {
    /// Ids above this are looked up by binary search instead (a bit set would be too large).
    const MAX_BIT: u64 = 1 << 22;

    fn clear(&mut self) {
        self.lists.clear();
        self.same.clear();
    }

    /// [`same_devices`], each pair of lists compared once.
    fn same_devices(&mut self, a: &Arc<[ReachDest]>, b: &Arc<[ReachDest]>) -> bool {
        if Arc::ptr_eq(a, b) {
            return true;
        }
        let key = (
            Arc::as_ptr(a).cast::<ReachDest>() as usize,
            Arc::as_ptr(b).cast::<ReachDest>() as usize,
        );
        self.same
            .entry(key)
            .or_insert_with(|| (Arc::clone(a), Arc::clone(b), same_devices(a, b)))
            .2
    }

    fn contains(&mut self, list: &Arc<[ReachDest]>, id: DeviceId) -> bool {
        let mut found = false;
        self.each_member(list, std::slice::from_ref(&id), |_| found = true);
        found
    }

    /// Calls `f` with each of `ids` that is in `list`, in order.
    fn each_member(
        &mut self,
        list: &Arc<[ReachDest]>,
        ids: &[DeviceId],
        mut f: impl FnMut(DeviceId),
    ) {
        let key = Arc::as_ptr(list).cast::<ReachDest>() as usize;
        let (_, bits) = self
            .lists
            .entry(key)
            .or_insert_with(|| (Arc::clone(list), member_bits(list)));
        for &id in ids {
            let member = match bits {
                Some(bits) if id.0 <= Self::MAX_BIT => {
                    let i = id.0 as usize;
                    bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
                }
                _ => list.binary_search_by(|d| d.device_id.cmp(&id)).is_ok(),
            };
            if member {
                f(id);
            }
        }
    }
}

/// `list`'s device ids as bits, or `None` when one is too large for a bit set.
fn member_bits(list: &[ReachDest]) -> Option<Vec<u64>> {
    let max = list.iter().map(|d| d.device_id.0).max()?;
    if max > ListMembers::MAX_BIT {
        return None;
    }
    let mut bits = vec![0u64; max as usize / 64 + 1];
    for d in list {
        let i = d.device_id.0 as usize;
        bits[i / 64] |= 1 << (i % 64);
    }
    Some(bits)
}

/// Each service's destinations among `held` (sorted): what a device on demand is told of the
/// services it may reach (it names only destinations it holds as peers anyway).
fn held_reach_lists(
    grants: &[Arc<ReachGrant>],
    held: &[DeviceId],
    members: &mut ListMembers,
) -> BTreeMap<String, Vec<DeviceId>> {
    reach_lists(grants)
        .into_iter()
        .map(|(service, l)| {
            let mut devices = Vec::new();
            members.each_member(l, held, |id| devices.push(id));
            // Held for as long as the session is up: no slack from growing.
            devices.shrink_to_fit();
            (service.to_string(), devices)
        })
        .collect()
}

/// [`held_reach_lists`] for `held` after a new compile, from the lists a session was last
/// given (`old`): a service whose list comes out the same keeps its entry (no allocation, and
/// nothing sent), so a compile that leaves most services alone costs their membership tests,
/// not a new map a session. `before`, when given, is the grants `old` was made from for the
/// same `held`: a service whose list names the same devices as before keeps its entry without
/// its membership tests (the pair of lists is compared once for every session). Returns the
/// new lists, those that changed or are new, and the services no longer listed.
fn reheld_reach_lists(
    grants: &[Arc<ReachGrant>],
    held: &[DeviceId],
    members: &mut ListMembers,
    mut old: BTreeMap<String, Vec<DeviceId>>,
    before: Option<&[Arc<ReachGrant>]>,
) -> (
    BTreeMap<String, Vec<DeviceId>>,
    Vec<ReachService>,
    Vec<String>,
) {
    let before = before.map(reach_lists);
    let mut new = BTreeMap::new();
    let mut changed = Vec::new();
    let mut devices = Vec::new();
    for (service, l) in reach_lists(grants) {
        let same_list = before
            .as_ref()
            .and_then(|b| b.get(service))
            .is_some_and(|was| members.same_devices(was, l));
        if same_list {
            if let Some((k, kept)) = old.remove_entry(service) {
                new.insert(k, kept);
                continue;
            }
        }
        devices.clear();
        members.each_member(l, held, |id| devices.push(id));
        match old.remove_entry(service) {
            Some((k, kept)) if kept == devices => {
                new.insert(k, kept);
            }
            _ => {
                let list = devices.clone();
                changed.push(ReachService {
                    service: service.to_string(),
                    devices: list.clone(),
                });
                new.insert(service.to_string(), list);
            }
        }
    }
    (new, changed, old.into_keys().collect())
}

/// [`held_reach_lists`] brought up to date in place after the held peers gained `gained` and
/// lost `lost` (`held` is what it gave for the same grants); the services whose lists
/// changed.
fn recut_reach_lists<'a>(
    grants: &'a [Arc<ReachGrant>],
    held: &mut BTreeMap<String, Vec<DeviceId>>,
    gained: &[DeviceId],
    lost: &[DeviceId],
    members: &mut ListMembers,
) -> BTreeSet<&'a str> {
    let mut changed = BTreeSet::new();
    if gained.is_empty() && lost.is_empty() {
        return changed;
    }
    // A service's grants share its list: each list is searched once.
    let mut seen: Vec<*const [ReachDest]> = Vec::new();
    for g in grants {
        let service = g.service.as_str();
        let list_ptr = Arc::as_ptr(&g.devices);
        if seen.contains(&list_ptr) {
            continue;
        }
        seen.push(list_ptr);
        let Some(list) = held.get_mut(service) else {
            continue;
        };
        let before = list.len();
        list.retain(|d| !lost.contains(d));
        let mut touched = list.len() != before;
        for id in gained {
            if members.contains(&g.devices, *id) {
                if let Err(i) = list.binary_search(id) {
                    list.insert(i, *id);
                    touched = true;
                }
            }
        }
        if touched {
            changed.insert(service);
            // A list grown one insert at a time keeps up to half its room empty.
            if list.capacity() > list.len() + list.len() / 4 + 4 {
                list.shrink_to_fit();
            }
        }
    }
    changed
}

/// The overlay addresses of `peers`: the only sources a device holding just these peers can
/// receive from.
fn held_addrs<'a>(peers: impl Iterator<Item = &'a Peer>) -> Vec<IpAddr> {
    let mut addrs = Vec::with_capacity(2 * peers.size_hint().0);
    for p in peers {
        addrs.extend([IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)]);
    }
    addrs
}

/// A peer as a session was last told it.
#[derive(Debug)]
struct SentPeer {
    view: Arc<Peer>,
    routes: Vec<Prefix>,
}

impl Sent {
    /// The reach grants this device was last sent (flat, expanded, before protocol 3).
    fn reach<'a>(&'a self, id: &DeviceId) -> &'a [Arc<ReachGrant>] {
        self.compiled
            .devices
            .get(id)
            .map(|a| a.reach.as_slice())
            .unwrap_or(&[])
    }
}

#[derive(Debug)]
pub struct Registry {
    pools: AddressPools,
    devices: BTreeMap<DeviceId, Device>,
    sessions: BTreeMap<DeviceId, Session>,
    users: BTreeMap<String, User>,
    grants: Vec<Grant>,
    /// The relays every device is told about, in the store's order.
    relays: Vec<RelayInfo>,
    /// Each live device's valid leases, oldest first (two while it rotates).
    leases: HeldLeases,
    /// Keys whose lease was replaced or revoked: who held them, and since when (ms).
    retired_keys: BTreeMap<WgPublicKey, (DeviceId, i64)>,
    /// `None`: no policy applied yet, which allows nothing.
    policy: Option<Policy>,
    /// The stored version of `policy` (netmaps carry it; flow records name it).
    policy_version: Option<u64>,
    /// Shared with every session's `Sent` (and admin snapshots) instead of copied.
    compiled: Arc<Compiled>,
    /// Each live device as peers see it (without per-viewer routes), kept between recomputes
    /// so that a peer whose state did not change is the same allocation: sessions hold these,
    /// and an unchanged peer is recognised by pointer.
    views: BTreeMap<DeviceId, Arc<Peer>>,
    /// Devices presumed online after this process started, until their session is back or
    /// `presumed_until_ms` ([`Registry::presume_online`]).
    presumed: BTreeSet<DeviceId>,
    presumed_until_ms: Option<i64>,
    /// Counts the refreshes that changed `views`; `views_changed` holds the devices whose
    /// view the latest one replaced, added or dropped (sorted). A session last produced at
    /// the generation before, from the same compile, differs from what it was sent only in
    /// those peers: it is brought up to date without walking all its peers.
    views_gen: u64,
    views_changed: Vec<DeviceId>,
    /// The latest refreshes' changed devices by generation, oldest first (at most
    /// [`VIEWS_LOG_GENS`] refreshes and [`VIEWS_LOG_IDS`] devices): a session produced a few
    /// generations ago (it waited in the queue while changes kept coming) is brought up to
    /// date from their union, not by walking all its peers.
    views_log: VecDeque<(u64, Vec<DeviceId>)>,
    /// Per router device, the prefixes it serves (as of the last recompute).
    served: BTreeMap<DeviceId, Vec<Prefix>>,
    /// The posture requirements devices are asked to collect (as of the last recompute).
    wants: PostureWants,
    /// Sessions the current recompute has not produced messages for yet (in order).
    pending: VecDeque<DeviceId>,
    /// Sessions whose verdict is due: computed once no netmap is pending (a quarantined
    /// device's verdict compiles the policy again, and no peer waits on that).
    verdicts: BTreeSet<DeviceId>,
    /// Sessions produced since a verdict was last sent while netmaps were pending: under a
    /// steady stream of changes the pending queue may never empty, so every
    /// [`VERDICT_EVERY`] productions one due verdict goes out anyway.
    produced_since_verdict: usize,
    /// The compile's shared source lists, aggregated into prefixes once for every session
    /// factored (cleared with each new compile).
    aggregated: peerset::Aggregated,
    /// The compile's destination lists as bit sets (cleared with each new compile).
    list_members: ListMembers,
    /// What one factored inbound list lost and gained to become another, by the two lists'
    /// allocations (held, so an address is never reused while its entry lives): thousands of
    /// sessions move from one of a few dozen shared lists to another (cleared with each new
    /// compile).
    inbound_edits: InboundEdits,
    /// What `compiled` was compiled from; `None` forces a compile.
    compiled_for: Option<CompiledFor>,
    /// Bumped by every new policy (so a cached compile is never reused across policies).
    policy_gen: u64,
    /// Policy compiles since start (a recompute whose inputs did not change skips it).
    compiles: u64,
    /// The compile a policy apply's check made, for the generation it came with; the first
    /// compile of that generation uses it if it was made from the same directory.
    handover: Option<(u64, PolicyCompile)>,
    /// Compiles taken over from a policy apply's check instead of made here.
    compiles_reused: u64,
    now_ms: i64,
    outputs: VecDeque<Output>,
    /// Something the compile reads may have changed: the next output recomputes everything.
    dirty: bool,
    /// What last set `dirty` (for the log).
    dirty_why: &'static str,
    /// Full recomputes since start (every view refreshed, every session looked at).
    recomputes: u64,
    /// Set by the last [`Registry::prepare_netmaps`]: the devices whose access its compile
    /// changed (empty when it kept the compile), or `None` when it cannot tell (a compile
    /// handed over by a policy check): then every session is brought up to date.
    compile_changed: Option<BTreeSet<DeviceId>>,
    /// Sessions a full recompute found already up to date with the new compile (their
    /// access, peers' views and everything else a netmap carries unchanged), since start.
    sessions_carried: u64,
    /// Devices whose peer view (or own session) changed in nothing the compile reads: the
    /// next output refreshes only their views ([`Registry::touch`]).
    touched: BTreeSet<DeviceId>,
    /// Devices left the network since the last recompute: their peers are told from the
    /// last compile before the next one is made.
    departed: bool,
    /// Devices quarantined since the last recompute: every other session's filter loses
    /// their addresses before the next compile is made ([`Registry::narrow_out`]).
    quarantined_now: BTreeSet<DeviceId>,
    trust: TrustBook,
    trust_tick_ms: i64,
    /// Leases dropped at their expiry since start (revoked ones are not counted).
    leases_expired: u64,
    /// Devices whose verdict must be recomputed and, if different, sent.
    verdict_dirty: BTreeSet<DeviceId>,
    /// Per device, the posture requirements that rules applying to it name.
    needed: BTreeMap<DeviceId, BTreeSet<String>>,
    punch_counters: PunchCounters,
    /// Per-device behaviour baselines, anomalies and risk.
    behaviour: Detector,
    /// Devices whose behaviour risk is above 0 (re-judged every second as it decays).
    risk_live: BTreeSet<DeviceId>,
    risk_tick_ms: i64,
    /// The DNS domain sent in every full netmap (set once at start).
    dns_domain: ward_shared::names::DnsDomain,
    coordinators: Vec<String>,
    /// Per device: the prefixes it advertises and those an administrator approved.
    routes: BTreeMap<DeviceId, DeviceRoutes>,
    /// Users the identity provider took access away from, and why: their devices stay on the
    /// network but lose every rule that reached them through the user.
    suspended: BTreeMap<String, String>,
    /// Devices whose session another live replica of this instance holds, and its home relay
    /// there (peers see them online, and reach them through that relay).
    remote_sessions: BTreeMap<DeviceId, RemoteSession>,
    /// A version-4 session whose device may talk with more peers than this is sent only the
    /// peers it holds ([`Registry::handle_want_peer`]).
    on_demand_above: usize,
    /// Each live device's overlay addresses (what `want_peer` names).
    by_addr: BTreeMap<IpAddr, DeviceId>,
    want_counters: WantCounters,
    /// The sessions on demand holding each peer (the reverse of their held sets), and the
    /// sessions sent every peer: a change to one device concerns its holders and the full
    /// sessions among its peers, not every session its access names.
    holders: BTreeMap<DeviceId, BTreeSet<DeviceId>>,
    full: BTreeSet<DeviceId>,
    /// Sessions brought up to date one by one (their netmap compared with what was sent).
    produced: u64,
}

/// A version-4 session whose device may talk with more peers than this is sent only the peers
/// it holds, unless `serve --peers-on-demand-above` says otherwise.
pub const DEFAULT_ON_DEMAND_ABOVE: usize = 256;
/// Most `want_peer` messages one session has answered in a second; more are dropped (the
/// agent asks again a second later).
const WANTS_PER_SECOND: u32 = 64;

/// Why a `want_peer` got no peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WantRefused {
    #[error("the requester has no session on that connection")]
    NoSession,
    #[error("the session is sent every peer it may talk with")]
    NotOnDemand,
    #[error("the requester sent too many want_peer messages")]
    Limited,
    #[error("no device the requester may talk with has that address, key or name")]
    NotAllowed,
}

/// `want_peer` messages answered, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WantCounters {
    pub granted: u64,
    pub refused: u64,
    pub limited: u64,
    /// Held peers let go to stay within `MAX_HELD_PEERS`.
    pub evicted: u64,
}

/// A device session another replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSession {
    pub replica: String,
    pub home_relay: Option<String>,
}

/// A policy's compile made outside the registry (a `policy apply`'s check, which compiles the
/// candidate against [`Registry::directory_for`] to run its tests and list its changes): the
/// compile ([`policy::compile`], no routes), the directory and the coordinator time it was made
/// from. The registry takes it instead of compiling again when its own directory is the same and
/// no expiry lies between the two moments ([`policy::same_at`]); otherwise it compiles.
#[derive(Debug, Clone)]
pub struct PolicyCompile {
    pub compiled: Arc<Compiled>,
    pub directory: Arc<Directory>,
    pub at_ms: i64,
}

/// The inputs a compile depended on: the same policy, directory and routers before the
/// compile's next expiry give the same result, so a recompute that only changed sessions
/// (opens, closes, endpoints, leases) skips the compile.
#[derive(Debug)]
struct CompiledFor {
    policy_gen: u64,
    directory: Directory,
    routers: Vec<policy::Router>,
}

/// A device's routed prefixes as the store holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DeviceRoutes {
    advertised: BTreeSet<Prefix>,
    approved: BTreeSet<Prefix>,
}

impl Registry {
    /// The coordinator addresses full netmaps carry (devices fail over among them).
    pub fn set_coordinators(&mut self, addrs: Vec<String>) {
        self.coordinators = addrs;
    }

    /// A new coordinator address list while sessions are open: only full netmaps carry it,
    /// so every session is sent one (deltas continue from it). Returns how many sessions
    /// that is (none when the list did not change).
    pub fn handle_coordinators(&mut self, addrs: Vec<String>) -> usize {
        if addrs == self.coordinators {
            return 0;
        }
        self.coordinators = addrs;
        let mut n = 0;
        for s in self.sessions.values_mut() {
            if s.sent.take().is_some() {
                n += 1;
            }
        }
        self.mark_dirty("coordinators");
        n
    }

    /// Sets the DNS domain device names are published under (sent in full netmaps).
    pub fn set_dns_domain(&mut self, domain: ward_shared::names::DnsDomain) {
        self.dns_domain = domain;
    }

    /// Starts from the store's devices and users, the current policy and grants.
    pub fn new(
        pools: AddressPools,
        devices: impl IntoIterator<Item = Device>,
        users: impl IntoIterator<Item = User>,
        policy: Option<Policy>,
        grants: Vec<Grant>,
        leases: Vec<SignedLease>,
        now_ms: i64,
    ) -> Self {
        let mut behaviour = Detector::new(BehaviourConfig::default());
        if let Some(p) = &policy {
            behaviour.set_learning_ms(p.trust.behaviour_learning_ms as i64);
            behaviour.set_threshold(p.trust.risk_threshold);
        }
        Self {
            leases: HeldLeases::new(leases, MAX_LEASES),
            retired_keys: BTreeMap::new(),
            pools,
            devices: devices
                .into_iter()
                .filter(Device::is_live)
                .map(|d| (d.id, d))
                .collect(),
            sessions: BTreeMap::new(),
            users: users.into_iter().map(|u| (u.name.clone(), u)).collect(),
            grants,
            relays: Vec::new(),
            dns_domain: Default::default(),
            coordinators: Vec::new(),
            policy,
            policy_version: None,
            compiled: Arc::new(Compiled::default()),
            views: BTreeMap::new(),
            presumed: BTreeSet::new(),
            presumed_until_ms: None,
            views_gen: 0,
            views_changed: Vec::new(),
            views_log: VecDeque::new(),
            served: BTreeMap::new(),
            wants: PostureWants::default(),
            pending: VecDeque::new(),
            verdicts: BTreeSet::new(),
            produced_since_verdict: 0,
            aggregated: peerset::Aggregated::default(),
            list_members: ListMembers::default(),
            inbound_edits: InboundEdits::default(),
            compiled_for: None,
            policy_gen: 0,
            compiles: 0,
            handover: None,
            compiles_reused: 0,
            now_ms,
            outputs: VecDeque::new(),
            dirty: true,
            dirty_why: "start",
            compile_changed: None,
            sessions_carried: 0,
            recomputes: 0,
            touched: BTreeSet::new(),
            departed: false,
            quarantined_now: BTreeSet::new(),
            trust: TrustBook::default(),
            trust_tick_ms: now_ms,
            leases_expired: 0,
            verdict_dirty: BTreeSet::new(),
            needed: BTreeMap::new(),
            punch_counters: PunchCounters::default(),
            behaviour,
            risk_live: BTreeSet::new(),
            risk_tick_ms: now_ms,
            routes: BTreeMap::new(),
            suspended: BTreeMap::new(),
            remote_sessions: BTreeMap::new(),
            on_demand_above: DEFAULT_ON_DEMAND_ABOVE,
            by_addr: BTreeMap::new(),
            want_counters: WantCounters::default(),
            holders: BTreeMap::new(),
            full: BTreeSet::new(),
            produced: 0,
        }
        .with_addresses()
    }

    fn with_addresses(mut self) -> Self {
        self.by_addr = self
            .devices
            .values()
            .flat_map(|d| [(IpAddr::V4(d.ipv4), d.id), (IpAddr::V6(d.ipv6), d.id)])
            .collect();
        self
    }

    /// Version-4 sessions whose device may talk with more than `n` peers (0: every version-4
    /// session, whatever its peers) are sent only the peers they hold. Decided at a session's
    /// first netmap: a device whose peers grow past `n` later is on demand from its next
    /// session.
    pub fn set_peers_on_demand_above(&mut self, n: usize) {
        self.on_demand_above = n;
    }

    /// Sessions brought up to date one by one since start.
    pub fn sessions_produced(&self) -> u64 {
        self.produced
    }

    /// `want_peer` messages answered so far.
    pub fn want_counters(&self) -> WantCounters {
        self.want_counters
    }

    /// How many peers each on-demand session holds (for metrics): sessions, held peers.
    pub fn held_peers(&self) -> (usize, usize) {
        self.sessions
            .values()
            .filter_map(|s| s.peers.held())
            .fold((0, 0), |(n, h), held| (n + 1, h + held.len()))
    }

    /// Just after this process started: the devices whose sessions the process before this
    /// one held when it ended (`held`) are shown online to their peers until their session
    /// is back or `grace_ms` passed. Without this, a restart showed every device offline to
    /// its peers and then, one device at a time, online again: a delta to each online peer
    /// per returning device, for a flag that only `ward status` shows. A device that does
    /// not come back within the grace goes offline then. `online` decides nothing (no
    /// access, no key, no path): it is what peers display.
    pub fn presume_online(&mut self, held: impl IntoIterator<Item = DeviceId>, grace_ms: i64) {
        self.presumed = held
            .into_iter()
            .filter(|id| self.devices.contains_key(id) && !self.sessions.contains_key(id))
            .collect();
        self.presumed_until_ms =
            (!self.presumed.is_empty()).then(|| self.now_ms.saturating_add(grace_ms));
        let ids: Vec<DeviceId> = self.presumed.iter().copied().collect();
        for id in ids {
            self.touch(id);
        }
    }

    /// Devices still presumed online (none once the grace has passed).
    pub fn presumed_online(&self) -> usize {
        self.presumed.len()
    }

    /// A device signed in (again) at the identity provider, or (`None`) its sign-in is
    /// forgotten. Requirements with `max_auth_age`/`amr` are judged again at once.
    pub fn handle_sign_in(&mut self, id: DeviceId, sign_in: Option<crate::oidc::core::SignIn>) {
        if self.trust.set_sign_in(id, sign_in) && self.devices.contains_key(&id) {
            self.verdict_dirty.insert(id);
            self.reevaluate(id);
        }
    }

    /// The identity provider took `user`'s access away (`Some(why)`) or gave it back
    /// (`None`). The user's devices stay enrolled and connected: the rules that reached them
    /// through the user go (or come back) at the next flush, and on loss each device is
    /// rotated, so nothing authorized under its old identity survives.
    pub fn handle_identity(&mut self, user: &str, suspended: Option<String>) {
        let changed = match &suspended {
            Some(why) => {
                self.suspended
                    .insert(user.to_string(), why.clone())
                    .as_ref()
                    != Some(why)
            }
            None => self.suspended.remove(user).is_some(),
        };
        if !changed {
            return;
        }
        self.mark_dirty("identity");
        let ids: Vec<DeviceId> = self
            .devices
            .values()
            .filter(|d| d.user.as_deref() == Some(user))
            .map(|d| d.id)
            .collect();
        for id in ids {
            self.verdict_dirty.insert(id);
            if let Some(why) = &suspended {
                self.handle_rotate(id, &format!("identity: {why}"));
            }
        }
        self.refresh_needed();
    }

    /// Why the identity provider took `user`'s access away, if it did.
    pub fn suspended(&self, user: &str) -> Option<&str> {
        self.suspended.get(user).map(String::as_str)
    }

    /// Replaces every device's advertised and approved routes (at start, and after an
    /// administrator approved or revoked some). Netmaps follow at the next flush.
    pub fn handle_routes(&mut self, rows: Vec<crate::store::RouteRow>) {
        let mut map: BTreeMap<DeviceId, DeviceRoutes> = BTreeMap::new();
        for r in rows {
            let e = map.entry(r.device).or_default();
            if r.advertised {
                e.advertised.insert(r.prefix);
            }
            if r.approved {
                e.approved.insert(r.prefix);
            }
        }
        if map != self.routes {
            self.routes = map;
            self.mark_dirty("routes");
        }
    }

    /// [`Registry::routers`] over the current directory.
    pub fn current_routers(&self) -> Vec<policy::Router> {
        self.routers(&self.directory())
    }

    /// The routes each live device forwards now: advertised, and approved by an administrator
    /// or by the policy's `[auto_approvers]`; never a prefix overlapping the overlay pools
    /// (default routes only as an exit node: `0.0.0.0/0` and `::/0`).
    pub fn routers(&self, dir: &Directory) -> Vec<policy::Router> {
        let mut out = Vec::new();
        for (id, r) in &self.routes {
            if r.advertised.is_empty() {
                continue;
            }
            let Some(dev) = dir.devices.iter().find(|d| d.id == *id && d.live) else {
                continue;
            };
            let adv: Vec<Prefix> = r.advertised.iter().copied().collect();
            let exit_offered = adv.iter().any(Prefix::is_default);
            let (mut auto, auto_exit) = match &self.policy {
                Some(p) => {
                    policy::auto_approved(p, dir, dev, &adv, exit_offered, self.pools.v6_prefix)
                }
                None => (Vec::new(), false),
            };
            let mut routes: Vec<Prefix> = adv
                .iter()
                .copied()
                .filter(|p| {
                    let approved =
                        r.approved.contains(p) || auto.contains(p) || (p.is_default() && auto_exit);
                    approved && (p.is_default() || !overlaps_overlay(p, self.pools.v6_prefix))
                })
                .collect();
            auto.clear();
            routes.sort();
            if !routes.is_empty() {
                out.push(policy::Router { id: *id, routes });
            }
        }
        out
    }

    /// The stored version of the policy in force (`None`: none, or it does not parse); sent
    /// in netmaps, and in a delta when it changes. Set it before [`Registry::handle_policy`].
    pub fn handle_policy_version(&mut self, version: Option<u64>) {
        if self.policy_version != version {
            self.policy_version = version;
            self.mark_dirty("policy version");
        }
    }

    /// A stored policy version is in force: applied here (with the compile its check made) or
    /// read from the change feed (applied on another replica, or this replica's own apply read
    /// back). The version already in force, with the same policy, changes nothing: no second
    /// compile, no re-judging, no session queued. Returns whether it was taken.
    pub fn handle_policy_applied(
        &mut self,
        policy: Policy,
        version: u64,
        compile: Option<PolicyCompile>,
    ) -> bool {
        if self.policy_version == Some(version) && self.policy.as_ref() == Some(&policy) {
            return false;
        }
        self.handle_policy_version(Some(version));
        self.handle_policy_compiled(policy, compile);
        true
    }

    /// A new policy was applied: every device is judged against its requirements.
    pub fn handle_policy(&mut self, policy: Policy) {
        self.handle_policy_compiled(policy, None);
    }

    /// A new policy was applied, with the compile its check made (if any): the next compile
    /// uses it when it was made from the directory the registry has then.
    pub fn handle_policy_compiled(&mut self, policy: Policy, compile: Option<PolicyCompile>) {
        self.behaviour
            .set_learning_ms(policy.trust.behaviour_learning_ms as i64);
        self.behaviour.set_threshold(policy.trust.risk_threshold);
        self.policy = Some(policy);
        self.policy_gen += 1;
        self.handover = compile.map(|c| (self.policy_gen, c));
        self.mark_dirty("policy");
        self.refresh_needed();
        let ids: Vec<DeviceId> = self.devices.keys().copied().collect();
        for id in ids {
            self.reevaluate(id);
        }
    }

    /// A device's posture report, from its own session `conn`. Refused reports change nothing.
    pub fn handle_posture(
        &mut self,
        id: DeviceId,
        conn: ConnId,
        report: PostureReport,
        now_ms: i64,
    ) -> Result<(), ReportError> {
        self.now_ms = self.now_ms.max(now_ms);
        if self.sessions.get(&id).map(|s| s.conn) != Some(conn) {
            return Ok(());
        }
        let needed = self.needed.get(&id).cloned().unwrap_or_default();
        let change =
            self.trust
                .handle_report(id, report, self.policy.as_ref(), &needed, self.now_ms)?;
        if let Some(c) = change {
            self.trust_changed(id, c);
        }
        self.poll_decision(id);
        Ok(())
    }

    /// `reporter`'s inbound filter refused these flows. Sources are matched to devices by
    /// overlay address; unknown sources are ignored, and so are flows the reporter's own
    /// inbound rules (as compiled here) would have let through: the coordinator knows what that
    /// filter denies, so a claim it contradicts is fabricated. What remains is only an
    /// accusation; the trust book quarantines on several independent reporters, never one.
    pub fn handle_denied_flows(&mut self, reporter: DeviceId, flows: &[DeniedFlow], now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(trust) = self.policy.as_ref().map(|p| p.trust.clone()) else {
            return;
        };
        let by_addr: BTreeMap<IpAddr, DeviceId> = self
            .devices
            .values()
            .flat_map(|d| [(IpAddr::V4(d.ipv4), d.id), (IpAddr::V6(d.ipv6), d.id)])
            .collect();
        let mut by_src: BTreeMap<DeviceId, Vec<_>> = BTreeMap::new();
        // Only a device that may receive from the source can have refused its packets: a
        // device cannot get a stranger quarantined by naming it.
        let Some(access) = self.compiled.devices.get(&reporter) else {
            return;
        };
        for f in flows.iter().take(MAX_DENIED_FLOWS) {
            let Some(src) = by_addr.get(&f.src) else {
                continue;
            };
            if *src == reporter || !access.peers.contains(src) {
                continue;
            }
            if inbound_allows(&access.inbound, f, self.now_ms) {
                continue;
            }
            by_src.entry(*src).or_default().push((f.proto, f.port));
        }
        // With a scan threshold, the evidence is shared: every replica's trust book takes it
        // (the store's `scan_evidence`), so the replica judging the source sees the reporters
        // whose sessions are elsewhere, and keeps the evidence when the source moves.
        if trust.scan_denied_flows.is_some() && !by_src.is_empty() {
            self.outputs.push_back(Output::ScanEvidence {
                reporter,
                flows: by_src
                    .iter()
                    .flat_map(|(src, v)| v.iter().map(|(p, port)| (*src, *p, *port)))
                    .collect(),
                at_ms: self.now_ms,
                window_ms: trust.scan_window_ms as i64,
            });
        }
        for (src, v) in by_src {
            let quarantined = self.is_quarantined(src);
            let found =
                self.trust
                    .handle_denied(src, reporter, v, &trust, quarantined, self.now_ms);
            self.scan_found(src, found);
        }
    }

    /// Denied-flow evidence another replica stored (from reporters whose sessions it holds),
    /// oldest first. Counted in the trust book from when it was reported, with the same
    /// bounds as reports received here; sources this registry does not know are ignored.
    pub fn handle_remote_denied(&mut self, evidence: &[ScanEvidence], now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(trust) = self.policy.as_ref().map(|p| p.trust.clone()) else {
            return;
        };
        // One trust-book call per (source, reporter, time): a stored report is one group.
        let mut groups: BTreeMap<(DeviceId, DeviceId, i64), Vec<(Proto, u16)>> = BTreeMap::new();
        for e in evidence {
            if e.source == e.reporter || !self.devices.contains_key(&e.source) {
                continue;
            }
            groups
                .entry((e.source, e.reporter, e.at_ms))
                .or_default()
                .push((e.proto, e.port));
        }
        let mut ordered: Vec<_> = groups.into_iter().collect();
        ordered.sort_by_key(|((_, _, at), _)| *at);
        for ((src, reporter, at), flows) in ordered {
            let quarantined = self.is_quarantined(src);
            let found = self.trust.handle_denied_at(
                src,
                reporter,
                flows,
                &trust,
                quarantined,
                at,
                self.now_ms,
            );
            self.scan_found(src, found);
        }
    }

    /// Judges the evidence against `src` again (its session came here, or no other replica
    /// holds it any more): the replica that deferred to the holder acts now.
    fn rejudge_scan(&mut self, src: DeviceId) {
        let Some(trust) = self.policy.as_ref().map(|p| p.trust.clone()) else {
            return;
        };
        let quarantined = self.is_quarantined(src);
        let found = self.trust.judge_scan(src, &trust, quarantined, self.now_ms);
        self.scan_found(src, found);
    }

    /// Denied flows the trust book remembers against `src` (bounded; for tests and status).
    pub fn denied_remembered(&self, src: DeviceId) -> usize {
        self.trust.denied_count(src)
    }

    fn is_quarantined(&self, id: DeviceId) -> bool {
        self.devices
            .get(&id)
            .is_some_and(|d| d.quarantine.is_some())
    }

    /// A corroborated scan: quarantine the source, and raise its risk.
    fn scan_found(&mut self, src: DeviceId, reason: Option<String>) {
        let Some(reason) = reason else {
            return;
        };
        // The corroborated scan is also one of the behaviour detectors: its risk counts
        // against `max_risk` like any other anomaly.
        let a = self
            .behaviour
            .handle_denied_burst(src, &reason, self.now_ms);
        self.outputs.push_back(Output::Anomaly(Box::new(a)));
        self.outputs.push_back(Output::Quarantine {
            device: src,
            reason,
        });
        self.refresh_risk(src);
    }

    /// A stored flow report from `reporter`: each window feeds the reporter's own baseline and
    /// can raise only the reporter's own risk (see [`crate::behaviour`]).
    pub fn handle_flows(
        &mut self,
        reporter: DeviceId,
        report: &ward_shared::flows::FlowReport,
        now_ms: i64,
    ) {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.devices.contains_key(&reporter) {
            return;
        }
        let names: BTreeMap<IpAddr, String> = self
            .devices
            .values()
            .flat_map(|d| {
                let h = d.hostname.to_string();
                [(IpAddr::V4(d.ipv4), h.clone()), (IpAddr::V6(d.ipv6), h)]
            })
            .collect();
        let name = |_: Option<DeviceId>, a: IpAddr| names.get(&a).cloned().unwrap_or(a.to_string());
        let groups = self.behaviour_groups(reporter);
        self.behaviour.set_groups(reporter, groups);
        for w in &report.windows {
            if let Some(a) = self.behaviour.handle_window(
                reporter,
                w.start_ms,
                w.end_ms,
                &w.records,
                &name,
                self.now_ms,
            ) {
                self.outputs.push_back(Output::Anomaly(Box::new(a)));
            }
        }
        self.refresh_risk(reporter);
    }

    /// An admin's label on an anomaly: `expected` teaches the baseline and drops its risk,
    /// `malicious` keeps it (and quarantines under `quarantine_malicious`).
    pub fn handle_anomaly_ack(&mut self, id: u64, label: Label) -> Result<Anomaly, AckError> {
        let a = self.behaviour.acknowledge(id, label)?;
        self.refresh_risk(a.device);
        let quarantine = self
            .policy
            .as_ref()
            .is_some_and(|p| p.trust.quarantine_malicious);
        let quarantined = self
            .devices
            .get(&a.device)
            .is_some_and(|d| d.quarantine.is_some());
        if label == Label::Malicious && quarantine && !quarantined {
            self.outputs.push_back(Output::Quarantine {
                device: a.device,
                reason: format!("anomaly {} acknowledged as malicious: {}", a.id, a.reason),
            });
        }
        Ok(a)
    }

    /// Anomalies (of one device, or all) raised at or after `since_ms`.
    pub fn anomalies(&self, device: Option<DeviceId>, since_ms: i64) -> Vec<Anomaly> {
        self.behaviour.anomalies(device, since_ms)
    }

    /// The device's behaviour risk (0–100) and why.
    pub fn risk(&self, id: DeviceId) -> (u8, String) {
        let (r, why) = self.trust.risk(id);
        (r, why.to_string())
    }

    /// The groups a device's behaviour is compared with: its tags (`tag:NAME`) and its user's
    /// groups (`group:NAME`, from the directory and from the policy's `[groups]`).
    fn behaviour_groups(&self, id: DeviceId) -> Vec<String> {
        let Some(d) = self.devices.get(&id) else {
            return Vec::new();
        };
        let mut out: Vec<String> = d
            .tags
            .iter()
            .map(|t| {
                let t = t.to_string();
                if t.starts_with("tag:") {
                    t
                } else {
                    format!("tag:{t}")
                }
            })
            .collect();
        if let Some(u) = &d.user {
            if let Some(user) = self.users.get(u) {
                out.extend(user.groups.iter().map(|g| format!("group:{g}")));
            }
            if let Some(p) = &self.policy {
                out.extend(
                    p.groups
                        .iter()
                        .filter(|(_, g)| g.members.iter().any(|m| &m.value == u))
                        .map(|(n, _)| format!("group:{n}")),
                );
            }
        }
        out
    }

    /// Every group baseline as stored (name, JSON).
    pub fn behaviour_group_snapshots(&self) -> Vec<(String, String)> {
        self.behaviour.group_snapshots()
    }

    /// Stored group baselines, after a restart; the reasons for refused ones are returned.
    pub fn restore_behaviour_groups(&mut self, groups: Vec<(String, String)>) -> Vec<String> {
        groups
            .into_iter()
            .filter_map(|(n, s)| {
                self.behaviour
                    .restore_group(&n, &s)
                    .err()
                    .map(|e| format!("group baseline {n}: {e}"))
            })
            .collect()
    }

    /// Every device whose behaviour risk is above 0: the score and why.
    pub fn risks(&self) -> BTreeMap<DeviceId, (u8, String)> {
        self.devices
            .keys()
            .map(|id| (*id, self.risk(*id)))
            .filter(|(_, r)| r.0 > 0)
            .collect()
    }

    /// Requirements each device fails for want of a sign-in newer than its risk's rise
    /// (`risk_signin_above`), with the "sign in again" reason.
    pub fn sign_in_asks(&self) -> BTreeMap<DeviceId, BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for id in self.devices.keys() {
            let asks: BTreeMap<String, String> = self
                .trust
                .failures(*id)
                .into_iter()
                .filter_map(|(req, why)| {
                    why.into_iter()
                        .find(|w| w.starts_with(crate::trust::SIGN_IN_AGAIN))
                        .map(|w| (req, w))
                })
                .collect();
            if !asks.is_empty() {
                out.insert(*id, asks);
            }
        }
        out
    }

    pub fn behaviour_labels(&self) -> crate::behaviour::Labels {
        self.behaviour.labels()
    }

    /// Every device's baseline snapshot (to store).
    pub fn behaviour_snapshots(&self) -> Vec<(DeviceId, String)> {
        self.behaviour
            .devices()
            .into_iter()
            .filter_map(|id| Some((id, self.behaviour.snapshot(id)?)))
            .collect()
    }

    /// Stored baselines and anomalies, after a restart. A damaged baseline is skipped (the
    /// device learns afresh); the reasons are returned for the log.
    pub fn restore_behaviour(
        &mut self,
        baselines: Vec<(DeviceId, String)>,
        anomalies: Vec<Anomaly>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for (id, snap) in baselines {
            if let Err(e) = self.behaviour.restore(id, &snap) {
                errors.push(format!("baseline of {id}: {e}"));
            }
        }
        let ids: BTreeSet<DeviceId> = anomalies.iter().map(|a| a.device).collect();
        for a in anomalies {
            self.behaviour.restore_anomaly(a);
        }
        for id in ids {
            self.refresh_risk(id);
        }
        errors
    }

    /// Re-reads the device's risk from the detector; a change re-judges its requirements
    /// (`max_risk`) and may quarantine (`quarantine_above_risk`).
    fn refresh_risk(&mut self, id: DeviceId) {
        let r = self.behaviour.risk(id, self.now_ms);
        if r.score > 0 {
            self.risk_live.insert(id);
        } else {
            self.risk_live.remove(&id);
        }
        let before = self.trust.risk(id).0;
        if !self.trust.set_risk(id, r.score, &r.reason, self.now_ms) {
            return;
        }
        if let Some(t) = self.policy.as_ref().map(|p| p.trust.risk_threshold) {
            if (before > t) != (r.score > t) {
                self.outputs.push_back(Output::RiskCrossed {
                    device: id,
                    score: r.score,
                    threshold: t,
                    above: r.score > t,
                    reason: r.reason.clone(),
                });
            }
        }
        self.verdict_dirty.insert(id);
        self.reevaluate(id);
        let quarantined = self
            .devices
            .get(&id)
            .is_some_and(|d| d.quarantine.is_some());
        let reason = match &self.policy {
            Some(p) => self.trust.overdue_risk(id, &p.trust, quarantined),
            None => None,
        };
        if let Some(reason) = reason {
            self.outputs
                .push_back(Output::Quarantine { device: id, reason });
        }
    }

    /// Whether the device gets the policy's shorter lease TTL, and that TTL.
    pub fn risky_lease_ttl_ms(&self, id: DeviceId) -> Option<u64> {
        let p = self.policy.as_ref()?;
        let ttl = p.trust.risky_lease_ttl_ms?;
        let quarantined = self
            .devices
            .get(&id)
            .is_some_and(|d| d.quarantine.is_some());
        self.trust
            .risky(id, &p.trust, quarantined, self.now_ms)
            .then_some(ttl)
    }

    /// The device's latest report, its evaluation and what trust withholds (for admins).
    pub fn trust_view(&self, id: DeviceId) -> PostureVerdict {
        self.verdict(id)
    }

    /// The directory as a candidate policy would see it: each device's latest report judged
    /// against the candidate's requirements (for `policy check`/`apply` diffs).
    pub fn directory_for(&self, candidate: &Policy) -> Directory {
        let mut d = self.directory();
        for dev in &mut d.devices {
            let mut evals =
                posture::evaluate_all(candidate, self.trust.report(dev.id), self.now_ms);
            self.trust
                .judge_identity(dev.id, &mut evals, candidate, self.now_ms);
            dev.posture_passed = evals
                .iter()
                .filter(|e| e.passed)
                .map(|e| e.requirement.clone())
                .collect();
            dev.posture_failures = evals
                .into_iter()
                .filter(|e| !e.passed)
                .map(|e| (e.requirement, e.failures))
                .collect();
        }
        d
    }

    pub fn posture_report(&self, id: DeviceId) -> Option<&PostureReport> {
        self.trust.report(id)
    }

    fn reevaluate(&mut self, id: DeviceId) {
        let needed = self.needed.get(&id).cloned().unwrap_or_default();
        if let Some(c) = self
            .trust
            .reevaluate(id, self.policy.as_ref(), &needed, self.now_ms)
        {
            self.trust_changed(id, c);
        }
        self.poll_decision(id);
    }

    /// A verdict this replica must store for the others, if any.
    fn poll_decision(&mut self, id: DeviceId) {
        if let Some(decision) = self.trust.poll_decision(id) {
            self.outputs.push_back(Output::TrustDecided {
                device: id,
                decision,
            });
        }
    }

    /// Another replica stored its verdict on a device (it holds, or held, the device's
    /// session). While that replica holds the session, the device's peers here are judged by
    /// it.
    pub fn handle_remote_trust(&mut self, id: DeviceId, remote: RemoteTrust) {
        if !self.devices.contains_key(&id) {
            return;
        }
        self.trust.handle_remote(id, remote);
        self.verdict_dirty.insert(id);
        self.reevaluate(id);
    }

    /// Every device session other live replicas hold now (from the sessions table). A device
    /// held elsewhere is online for its peers here, with that replica's home relay, and is
    /// judged by that replica's stored verdict.
    pub fn handle_remote_sessions(&mut self, sessions: BTreeMap<DeviceId, RemoteSession>) {
        if sessions == self.remote_sessions {
            return;
        }
        let ids: Vec<DeviceId> = self.devices.keys().copied().collect();
        for id in ids {
            let holder = sessions.get(&id).map(|s| s.replica.clone());
            if self.trust.handle_holder(id, holder) {
                self.verdict_dirty.insert(id);
                self.reevaluate(id);
                self.rejudge_scan(id);
            }
        }
        self.remote_sessions = sessions;
        self.mark_dirty("remote sessions");
    }

    /// Devices whose session another live replica holds (and this one does not).
    pub fn online_elsewhere(&self) -> Vec<DeviceId> {
        self.remote_sessions
            .keys()
            .filter(|id| !self.sessions.contains_key(id))
            .copied()
            .collect()
    }

    /// Whether the device's session is held here or by another live replica, or the device
    /// is presumed online while it reconnects after this process started
    /// ([`Registry::presume_online`]): what its peers are told.
    pub fn is_online_anywhere(&self, id: DeviceId) -> bool {
        self.sessions.contains_key(&id)
            || self.remote_sessions.contains_key(&id)
            || self.presumed.contains(&id)
    }

    /// Which requirements matter to which device (depends on the policy and the directory,
    /// not on posture).
    fn refresh_needed(&mut self) {
        self.needed = match &self.policy {
            Some(p) if !p.postures.is_empty() => {
                policy::requirements_by_device(p, &self.directory())
            }
            _ => BTreeMap::new(),
        };
    }

    fn trust_changed(&mut self, id: DeviceId, change: Change) {
        self.mark_dirty("trust");
        self.verdict_dirty.insert(id);
        if change.narrowed() {
            // Nothing authorized under the old trust state may survive: a new key.
            self.handle_rotate(
                id,
                &format!(
                    "posture changed: {} now failing",
                    change.withdrawn.join(", ")
                ),
            );
        }
        // Another replica's verdict was audited and stored there.
        if self.trust.judged_remotely(id) {
            return;
        }
        self.outputs.push_back(Output::PostureChanged {
            device: id,
            report: self.trust.report(id).cloned().map(Box::new),
            change,
        });
    }

    /// What this device's trust currently withholds, and why.
    fn verdict(&self, id: DeviceId) -> PostureVerdict {
        let quarantine = self
            .devices
            .get(&id)
            .and_then(|d| d.quarantine.as_ref())
            .map(|q| q.reason.clone());
        let failures = self.trust.failures(id);
        let suspended = self
            .devices
            .get(&id)
            .and_then(|d| d.user.as_deref())
            .and_then(|u| Some((u, self.suspended.get(u)?)));
        let (mut unavailable, mut unavailable_more) = (Vec::new(), 0);
        if let (Some(p), true) = (
            &self.policy,
            !failures.is_empty() || quarantine.is_some() || suspended.is_some(),
        ) {
            // What the device would reach if it met every requirement, were not quarantined
            // and its user had not lost access at the identity provider, minus what it reaches
            // now.
            let mut dir = self.directory();
            for d in dir.devices.iter_mut().filter(|d| d.id == id) {
                d.posture_passed = p.postures.keys().cloned().collect();
                d.quarantined = false;
            }
            if let Some((user, _)) = suspended {
                for u in dir.users.iter_mut().filter(|u| u.name == user) {
                    u.suspended = None;
                }
            }
            let ideal = policy::reach_grants_of(p, &dir, id, self.now_ms);
            let have: &[Arc<policy::ReachGrant>] = self
                .compiled
                .devices
                .get(&id)
                .map(|a| a.reach.as_slice())
                .unwrap_or_default();
            let reasons_for = |service: &str, rule_name: &str| {
                let mut reasons = Vec::new();
                if let Some(rule) = p.rules.iter().find(|x| x.name == rule_name) {
                    for q in &rule.posture {
                        if let Some(f) = failures.get(&q.value) {
                            reasons.push(format!("posture {:?}: {}", q.value, f.join("; ")));
                        }
                    }
                }
                if let Some((user, why)) = suspended {
                    let through_user = p.rules.iter().any(|x| {
                        x.name == rule_name
                            && x.from.iter().any(|sel| {
                                matches!(
                                    sel.value,
                                    policy::Selector::User(_) | policy::Selector::Group(_)
                                )
                            })
                    });
                    if through_user {
                        reasons.push(format!(
                            "identity: user {user} has no access from the identity provider: {why}"
                        ));
                    }
                }
                let remediation = p.services.get(service).is_some_and(|s| s.remediation);
                if let (Some(q), false) = (&quarantine, remediation) {
                    reasons.push(format!("quarantined: {q}"));
                }
                reasons
            };
            (unavailable, unavailable_more) = withheld::withheld(
                &ideal,
                have,
                id,
                ward_shared::wire::MAX_UNAVAILABLE,
                reasons_for,
            );
        }
        let (score, reason) = self.trust.risk(id);
        let risk = self.policy.as_ref().and_then(|p| {
            let max_risk = p.postures.values().filter_map(|q| q.max_risk).min();
            (score > 0 || max_risk.is_some()).then(|| RiskView {
                score,
                threshold: p.trust.risk_threshold,
                max_risk,
                reason: reason.to_string(),
            })
        });
        PostureVerdict {
            report_seq: self.trust.report(id).map(|r| r.seq),
            evaluated_at_ms: self.now_ms,
            results: self.trust.evaluations(id).to_vec(),
            quarantine,
            unavailable,
            unavailable_more,
            risk,
        }
    }

    /// The set of active just-in-time grants changed.
    pub fn handle_grants(&mut self, grants: Vec<Grant>) {
        self.grants = grants;
        self.mark_dirty("grants");
    }

    /// The registered relays (all of them, as stored). Every session's netmap carries the list;
    /// a different list is pushed to every session as a delta, the same list sends nothing.
    /// A removed relay is no device's home relay any more.
    pub fn handle_relays(&mut self, relays: Vec<RelayInfo>) {
        if relays != self.relays {
            for (id, s) in self.sessions.iter_mut() {
                if let Some(h) = &s.home_relay {
                    if !relays.iter().any(|r| &r.name == h) {
                        s.home_relay = None;
                        self.outputs.push_back(Output::HomeRelay {
                            device: *id,
                            relay: None,
                        });
                    }
                }
            }
            self.relays = relays;
            self.mark_dirty("relays");
        }
    }

    /// Whether a relay of this name is registered.
    pub fn has_relay(&self, name: &str) -> bool {
        self.relays.iter().any(|r| r.name == name)
    }

    /// A user was added or changed (groups, disabled).
    pub fn handle_user(&mut self, user: User) {
        self.users.insert(user.name.clone(), user);
        self.mark_dirty("user");
    }

    /// Time passes; at a rule's, grant's or lease's expiry the netmaps are recomputed; every
    /// second, reports are re-judged (they age out) and overdue failures quarantine.
    pub fn handle_time(&mut self, now_ms: i64) {
        if now_ms - self.trust_tick_ms >= TRUST_TICK_MS && self.trust_matters() {
            self.trust_tick_ms = now_ms;
            self.now_ms = self.now_ms.max(now_ms);
            let ids: Vec<DeviceId> = self.devices.keys().copied().collect();
            for id in ids {
                self.reevaluate(id);
                let quarantined = self
                    .devices
                    .get(&id)
                    .is_some_and(|d| d.quarantine.is_some());
                let needed = self.needed.get(&id).cloned().unwrap_or_default();
                let reason = match &self.policy {
                    Some(p) => self
                        .trust
                        .overdue_failure(id, p, &needed, quarantined, now_ms),
                    None => None,
                };
                if let Some(reason) = reason {
                    self.outputs
                        .push_back(Output::Quarantine { device: id, reason });
                }
            }
        }
        if now_ms - self.risk_tick_ms >= TRUST_TICK_MS && !self.risk_live.is_empty() {
            self.risk_tick_ms = now_ms;
            self.now_ms = self.now_ms.max(now_ms);
            let ids: Vec<DeviceId> = self.risk_live.iter().copied().collect();
            for id in ids {
                self.refresh_risk(id);
            }
        }
        if let Some(t) = self.compiled.next_expiry_ms {
            if now_ms >= t {
                self.mark_dirty("expiry");
            }
        }
        for (id, n) in self.leases.expire(now_ms) {
            self.touch(id);
            self.leases_expired += n as u64;
        }
        if self.presumed_until_ms.is_some_and(|t| now_ms >= t) {
            self.presumed_until_ms = None;
            for id in std::mem::take(&mut self.presumed) {
                self.touch(id);
            }
        }
        self.now_ms = now_ms;
    }

    /// Policy compiles since start: recomputes that changed only sessions reuse the last one.
    pub fn compiles(&self) -> u64 {
        self.compiles
    }

    /// Full recomputes since start ([`Registry::compiles`] counts those that compiled).
    pub fn recomputes(&self) -> u64 {
        self.recomputes
    }

    /// Sessions that full recomputes found up to date with the new compile and did not
    /// produce, since start ([`Registry::queue_concerned`]).
    pub fn sessions_carried(&self) -> u64 {
        self.sessions_carried
    }

    /// Compiles taken over from a policy apply's check (not counted in [`Registry::compiles`]).
    pub fn compiles_reused(&self) -> u64 {
        self.compiles_reused
    }

    /// Leases that reached their expiry while held here, since start (for metrics).
    pub fn leases_expired(&self) -> u64 {
        self.leases_expired
    }

    /// When the driver must call `handle_time` next (coordinator wall clock, ms).
    pub fn poll_timeout(&self) -> Option<i64> {
        let lease = self.leases.next_end();
        let trust = self
            .trust_matters()
            .then_some(self.trust_tick_ms + TRUST_TICK_MS);
        let risk = (!self.risk_live.is_empty()).then_some(self.risk_tick_ms + TRUST_TICK_MS);
        [
            self.compiled.next_expiry_ms,
            lease,
            trust,
            risk,
            self.presumed_until_ms,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the policy has posture requirements to re-judge as time passes.
    fn trust_matters(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| !p.postures.is_empty())
    }

    /// Whether device `id` may be leased `key`: it must be live, and the key must not be held
    /// (under a lease, or retired from one within [`KEY_HOLD_MS`]) by another device. Asked
    /// before a lease is issued; the proof of possession is checked by the lease issuer.
    pub fn check_lease_request(&self, id: DeviceId, key: &WgPublicKey) -> Result<(), LeaseRefusal> {
        if !self.devices.contains_key(&id) {
            return Err(LeaseRefusal::NotLive);
        }
        match self.key_holder(key) {
            Some(holder) if holder != id => Err(LeaseRefusal::KeyInUse { holder }),
            _ => Ok(()),
        }
    }

    /// The newest lease `id` holds on `key` (not revoked), if any: a lease request for a key
    /// that still has a fresh lease may be answered with it (`leases::reusable`).
    pub fn current_lease(&self, id: DeviceId, key: &WgPublicKey) -> Option<SignedLease> {
        self.leases
            .of(id)
            .iter()
            .rev()
            .find(|l| &l.lease.wg_public_key == key)
            .cloned()
    }

    /// A lease was issued: peers learn the new key (alongside the old one) at once. A lease on
    /// a key another device holds is never applied (whatever let it be issued), so no peer
    /// ever maps one device's key to another.
    pub fn handle_lease(&mut self, lease: SignedLease) {
        let id = lease.lease.device_id;
        if !self.devices.contains_key(&id) {
            return;
        }
        if self
            .key_holder(&lease.lease.wg_public_key)
            .is_some_and(|h| h != id)
        {
            return;
        }
        // Replicas learn a lease both from the replica that issued it and from the change
        // feed: the same serial twice is one lease.
        let Some(dropped) = self.leases.insert(lease, MAX_LEASES) else {
            return;
        };
        self.retire(id, dropped);
        self.touch(id);
    }

    /// Leases were revoked (rotation finished, or trust withdrawn).
    pub fn handle_leases_revoked(&mut self, id: DeviceId, serials: &[u64]) {
        if let Some(gone) = self.leases.remove_serials(id, serials) {
            self.retire(id, gone);
            self.touch(id);
        }
    }

    /// The device that holds `key`: under a kept lease, or retired from one recently.
    fn key_holder(&self, key: &WgPublicKey) -> Option<DeviceId> {
        self.leases.holder(key).or_else(|| {
            self.retired_keys
                .get(key)
                .filter(|(_, at)| self.now_ms.saturating_sub(*at) < KEY_HOLD_MS)
                .map(|(id, _)| *id)
        })
    }

    /// Remembers the keys of leases `id` no longer holds, so no other device takes them soon.
    fn retire(&mut self, id: DeviceId, leases: Vec<SignedLease>) {
        let now = self.now_ms;
        for l in leases {
            self.retired_keys.insert(l.lease.wg_public_key, (id, now));
        }
        if self.retired_keys.len() > MAX_RETIRED_KEYS {
            self.retired_keys
                .retain(|_, (_, at)| now.saturating_sub(*at) < KEY_HOLD_MS);
        }
        while self.retired_keys.len() > MAX_RETIRED_KEYS {
            let Some(oldest) = self
                .retired_keys
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.retired_keys.remove(&oldest);
        }
    }

    /// Ask a device to rotate its key now (trust changed).
    pub fn handle_rotate(&mut self, id: DeviceId, reason: &str) -> bool {
        let Some(s) = self.sessions.get(&id) else {
            return false;
        };
        self.outputs.push_back(Output::Send {
            conn: s.conn,
            msg: CoordinatorMsg::RotateNow {
                reason: reason.to_string(),
            },
        });
        true
    }

    /// The relay each connected device last said it receives relayed traffic through.
    pub fn home_relays(&self) -> BTreeMap<DeviceId, String> {
        self.sessions
            .iter()
            .filter_map(|(id, s)| s.home_relay.clone().map(|r| (*id, r)))
            .collect()
    }

    /// The directory the policy compiles against.
    pub fn directory(&self) -> Directory {
        let mut d = directory(&self.devices, &self.users, &self.grants);
        for u in &mut d.users {
            u.suspended = self.suspended.get(&u.name).cloned();
        }
        // A suspended user the directory does not list still loses its devices' user rules.
        for (name, why) in &self.suspended {
            if !d.users.iter().any(|u| &u.name == name) {
                d.users.push(DirUser {
                    name: name.clone(),
                    groups: Vec::new(),
                    disabled: false,
                    suspended: Some(why.clone()),
                });
            }
        }
        for dev in &mut d.devices {
            dev.posture_passed = self.trust.passed(dev.id);
            dev.posture_failures = self.trust.failures(dev.id);
        }
        d
    }

    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    pub fn compiled(&self) -> &Arc<Compiled> {
        &self.compiled
    }

    /// A device was enrolled or changed. A device that is no longer live is removed.
    pub fn handle_device_upserted(&mut self, mut dev: Device) {
        // While this registry holds the device's session, that session's contact (the
        // endpoints it reported plus the address observed for it, its key, when it was last
        // heard) is fresher than any stored row, which is written in batches and may lag.
        if self.sessions.contains_key(&dev.id) {
            if let Some(old) = self.devices.get(&dev.id) {
                dev.endpoints = old.endpoints.clone();
                dev.wg_public_key = old.wg_public_key;
                dev.last_seen_ms = dev.last_seen_ms.max(old.last_seen_ms);
            }
        }
        if !dev.is_live() {
            let why = if dev.user_disabled {
                "the device's user has been disabled"
            } else {
                "the device has been revoked"
            };
            self.handle_device_removed(dev.id, why);
            return;
        }
        let was = self.devices.get(&dev.id).map(|d| d.quarantine.is_some());
        let now = dev.quarantine.is_some();
        let id = dev.id;
        // A row that changed only where the compile does not read (its key, endpoints, when
        // it was last seen: a lease issued, read back from the store) refreshes its view;
        // anything else compiles again.
        let compile_reads_same = self
            .devices
            .get(&id)
            .is_some_and(|old| dir_device(old) == dir_device(&dev));
        if let Some(old) = self.devices.get(&id) {
            self.by_addr.remove(&IpAddr::V4(old.ipv4));
            self.by_addr.remove(&IpAddr::V6(old.ipv6));
        }
        self.by_addr.insert(IpAddr::V4(dev.ipv4), id);
        self.by_addr.insert(IpAddr::V6(dev.ipv6), id);
        self.devices.insert(id, dev);
        if compile_reads_same {
            self.touch(id);
        } else {
            self.mark_dirty("device");
        }
        if was != Some(now) {
            self.verdict_dirty.insert(id);
        }
        if was == Some(false) && now {
            self.quarantined_now.insert(id);
        }
        if was.is_some() && was != Some(now) {
            self.trust.handle_quarantine_changed(id, self.now_ms);
            if now {
                self.handle_rotate(id, "quarantined");
            }
        }
        if was.is_none() {
            self.reevaluate(id);
        }
    }

    /// A device lost its right to be on the network: its session is closed at once and it
    /// disappears from every other netmap.
    pub fn handle_device_removed(&mut self, id: DeviceId, reason: &str) {
        let was = self.devices.remove(&id);
        let was_live = was.is_some();
        if let Some(d) = was {
            self.by_addr.remove(&IpAddr::V4(d.ipv4));
            self.by_addr.remove(&IpAddr::V6(d.ipv6));
        }
        let mut changed = was_live | self.presumed.remove(&id);
        if let Some(gone) = self.leases.remove_device(id) {
            changed = true;
            self.retire(id, gone);
        }
        self.trust.remove(id);
        self.behaviour.remove(id);
        self.risk_live.remove(&id);
        for holder in self.holders.remove(&id).unwrap_or_default() {
            changed = true;
            if let Some(PeerMode::OnDemand(h)) =
                self.sessions.get_mut(&holder).map(|s| &mut s.peers)
            {
                h.release(id);
            }
        }
        if let Some(s) = self.sessions.remove(&id) {
            changed = true;
            self.unindex(id, &s.peers);
            self.outputs.push_back(Output::Close {
                conn: s.conn,
                code: ErrorCode::DeviceRevoked,
                reason: reason.to_string(),
            });
        }
        if was_live {
            self.outputs.push_back(Output::DeviceRevoked { device: id });
            self.departed = true;
        }
        // A removal this registry has already taken (the store's row read back after the
        // admin's notice, a second replica's report) changes nothing: compiling again would
        // cost every session a recompute (about a second at 10 000 dense sessions).
        if changed {
            self.mark_dirty("device removed");
        }
    }

    /// An authenticated device speaking this coordinator's protocol said hello: see
    /// [`Registry::handle_session_opened_speaking`].
    pub fn handle_session_opened(
        &mut self,
        id: DeviceId,
        conn: ConnId,
        observed: SocketAddr,
        update: DeviceUpdate,
    ) -> Result<(), ErrorCode> {
        self.handle_session_opened_speaking(id, conn, observed, update, PROTOCOL_VERSION)
    }

    /// An authenticated device said hello, speaking `protocol` (which shapes its netmaps). A
    /// previous session of the same device is closed (the newest connection wins, as after a
    /// roam).
    pub fn handle_session_opened_speaking(
        &mut self,
        id: DeviceId,
        conn: ConnId,
        observed: SocketAddr,
        update: DeviceUpdate,
        protocol: u32,
    ) -> Result<(), ErrorCode> {
        self.handle_session_opened_holding(id, conn, observed, update, protocol, Vec::new())
    }

    /// As [`Registry::handle_session_opened_speaking`], for a device that says which peers it
    /// holds (`hello`'s `held_peers`, protocol 4): kept if its session is on demand.
    pub fn handle_session_opened_holding(
        &mut self,
        id: DeviceId,
        conn: ConnId,
        observed: SocketAddr,
        update: DeviceUpdate,
        protocol: u32,
        held_peers: Vec<DeviceId>,
    ) -> Result<(), ErrorCode> {
        if !self.devices.contains_key(&id) {
            return Err(ErrorCode::DeviceRevoked);
        }
        // A dual-stack listener sees IPv4 devices as IPv4-mapped IPv6 (`[::ffff:a.b.c.d]`);
        // peers must get the plain IPv4 address, the same one relays report.
        let observed = SocketAddr::new(observed.ip().to_canonical(), observed.port());
        if let Some(old) = self.sessions.insert(
            id,
            Session {
                conn,
                observed,
                protocol,
                sent: None,
                wants_sent: None,
                verdict_sent: None,
                home_relay: None,
                punch: false,
                punch_window_ms: self.now_ms,
                punch_in_window: 0,
                punch_last: BTreeMap::new(),
                peers: PeerMode::Undecided(held_peers),
                held_changed: false,
                want_window_ms: self.now_ms,
                wants_in_window: 0,
            },
        ) {
            self.unindex(id, &old.peers);
            if old.conn != conn {
                self.outputs.push_back(Output::Close {
                    conn: old.conn,
                    code: ErrorCode::Protocol,
                    reason: "replaced by a newer connection of the same device".into(),
                });
            }
        }
        let trust_before = self.trust_inputs(id);
        // Online now by its own session: closing it takes it offline.
        self.presumed.remove(&id);
        self.apply_update(id, update);
        self.touch(id);
        self.trust.set_held(id, true);
        // Evidence gathered while another replica held the session is judged here now.
        self.rejudge_scan(id);
        // Taken over from another replica: the device keeps the risk judged there.
        let carried = self
            .trust
            .remote(id)
            .filter(|r| r.risk > 0)
            .map(|r| (r.risk, r.risk_reason.clone(), r.updated_ms));
        if let Some((score, reason, at)) = carried {
            if let Some(a) = self
                .behaviour
                .handle_carried_risk(id, score, &reason, at, self.now_ms)
            {
                self.outputs.push_back(Output::Anomaly(Box::new(a)));
                self.refresh_risk(id);
            }
        }
        self.reevaluate(id);
        self.compile_if_trust_moved(id, trust_before);
        Ok(())
    }

    pub fn handle_session_update(&mut self, id: DeviceId, conn: ConnId, update: DeviceUpdate) {
        if self.sessions.get(&id).map(|s| s.conn) != Some(conn) {
            return;
        }
        self.apply_update(id, update);
        self.touch(id);
    }

    pub fn handle_session_closed(&mut self, id: DeviceId, conn: ConnId) {
        if self.sessions.get(&id).map(|s| s.conn) == Some(conn) {
            let trust_before = self.trust_inputs(id);
            if let Some(s) = self.sessions.remove(&id) {
                self.unindex(id, &s.peers);
            }
            self.touch(id);
            self.trust.set_held(id, false);
            self.reevaluate(id);
            self.compile_if_trust_moved(id, trust_before);
        }
    }

    /// What the compile reads of device `id`'s trust.
    fn trust_inputs(&self, id: DeviceId) -> (BTreeSet<String>, BTreeMap<String, Vec<String>>) {
        (self.trust.passed(id), self.trust.failures(id))
    }

    /// A session opening or closing changes who judges the device; should that change what
    /// the compile reads of its trust (whether or not the trust book reported it as a
    /// change), everything is recomputed, not only its peer view.
    fn compile_if_trust_moved(
        &mut self,
        id: DeviceId,
        before: (BTreeSet<String>, BTreeMap<String, Vec<String>>),
    ) {
        if self.trust_inputs(id) != before {
            self.mark_dirty("trust inputs");
        }
    }

    /// Device `id`'s peer view may have changed (its leases, endpoints, home relay, or
    /// whether it is online: nothing the compile reads), or its own session did: the next
    /// output refreshes that view and brings every session up to date, without compiling.
    /// Anything the compile reads sets `dirty` instead ([`Registry::mark_dirty`]).
    fn touch(&mut self, id: DeviceId) {
        self.touched.insert(id);
    }

    /// Something the compile reads may have changed (`why`, for the log): the next output
    /// recomputes everything.
    fn mark_dirty(&mut self, why: &'static str) {
        self.dirty = true;
        self.dirty_why = why;
    }

    /// The highest posture report number the store has for this device (accepted on any
    /// replica): older reports are refused as replays.
    pub fn handle_posture_floor(&mut self, id: DeviceId, seq: u64) {
        if self.devices.contains_key(&id) {
            self.trust.handle_seq_floor(id, seq);
        }
    }

    /// Another replica of this instance now holds the device's session: the local one is
    /// stale (the device reconnected elsewhere) and is closed, so one replica serves it.
    pub fn handle_session_moved(&mut self, id: DeviceId) {
        if let Some(s) = self.sessions.remove(&id) {
            self.unindex(id, &s.peers);
            self.outputs.push_back(Output::Close {
                conn: s.conn,
                code: ErrorCode::Protocol,
                reason: "the device's session moved to another coordinator replica".into(),
            });
            self.mark_dirty("session moved");
            self.trust.set_held(id, false);
            self.reevaluate(id);
        }
    }

    /// Device `from` (on connection `conn`) starts probing `peer`'s direct candidates and
    /// asks for the peer to probe back now: forwarded as `punch` with `from`'s current
    /// candidates, only if each is in the netmap last sent to the other, the peer is online
    /// and understands it, and neither the requester's budget ([`PUNCH_PER_WINDOW`] per
    /// [`PUNCH_WINDOW_MS`]) nor the pair's gap ([`PUNCH_PAIR_GAP_MS`]) is spent. Refusals are
    /// counted and otherwise silent.
    pub fn handle_punch_request(
        &mut self,
        from: DeviceId,
        conn: ConnId,
        peer: DeviceId,
        now_ms: i64,
    ) -> Result<(), PunchRefused> {
        let result = self.punch(from, conn, peer, now_ms);
        let c = &mut self.punch_counters;
        match result {
            Ok(()) => c.forwarded += 1,
            Err(PunchRefused::NoSession | PunchRefused::NotPeers) => c.not_peers += 1,
            Err(PunchRefused::PeerUnavailable) => c.peer_unavailable += 1,
            Err(PunchRefused::RequesterLimited) => c.requester_limited += 1,
            Err(PunchRefused::PairLimited) => c.pair_limited += 1,
        }
        result
    }

    /// A device on demand asks for the peer `by` names. The peer is held for it (and it for
    /// the peer, when the peer is on demand too) and both netmaps are brought up to date at
    /// once, the peer's first, so that the peer knows the device before its handshake arrives.
    /// Refused (a `peer_refused` goes back) when no device the requester may talk with has
    /// that address or key: unknown and not allowed read alike, so a device learns nothing
    /// about addresses it may not reach. Past [`WANTS_PER_SECOND`] the want is dropped.
    pub fn handle_want_peer(
        &mut self,
        from: DeviceId,
        conn: ConnId,
        by: PeerRef,
        now_ms: i64,
    ) -> Result<Vec<DeviceId>, WantRefused> {
        let result = self.want_peer(from, conn, &by, now_ms);
        let c = &mut self.want_counters;
        match result {
            Ok(_) => c.granted += 1,
            Err(WantRefused::Limited) => c.limited += 1,
            Err(WantRefused::NoSession) => {}
            Err(WantRefused::NotAllowed | WantRefused::NotOnDemand) => {
                c.refused += 1;
                if self.sessions.get(&from).is_some_and(|s| s.conn == conn) {
                    let reason = match result {
                        Err(WantRefused::NotOnDemand) => {
                            "this session is sent every peer it may talk with".into()
                        }
                        _ => format!("policy allows no traffic between this device and {by}"),
                    };
                    self.outputs.push_back(Output::Send {
                        conn,
                        msg: CoordinatorMsg::PeerRefused { by, reason },
                    });
                }
            }
        }
        result
    }

    fn want_peer(
        &mut self,
        from: DeviceId,
        conn: ConnId,
        by: &PeerRef,
        now_ms: i64,
    ) -> Result<Vec<DeviceId>, WantRefused> {
        let Some(me) = self.sessions.get_mut(&from).filter(|s| s.conn == conn) else {
            return Err(WantRefused::NoSession);
        };
        if me.peers.held().is_none() {
            return Err(WantRefused::NotOnDemand);
        }
        if now_ms.saturating_sub(me.want_window_ms) >= 1_000 {
            me.want_window_ms = now_ms;
            me.wants_in_window = 0;
        }
        if me.wants_in_window >= WANTS_PER_SECOND {
            return Err(WantRefused::Limited);
        }
        me.wants_in_window += 1;
        // Judge against the compile that reflects every change so far.
        self.up_to_date_now();
        let access = self.compiled.devices.get(&from);
        let allowed = |t: &DeviceId| *t != from && access.is_some_and(|a| a.peers.contains(t));
        let targets: Vec<DeviceId> = match by {
            PeerRef::Addr(ip) => self
                .by_addr
                .get(&ip.to_canonical())
                .copied()
                .or_else(|| {
                    // An address in a prefix a router serves this device.
                    access.and_then(|a| {
                        a.routes
                            .iter()
                            .find(|(_, ps)| ps.iter().any(|p| p.contains(*ip)))
                            .map(|(r, _)| *r)
                    })
                })
                .filter(allowed)
                .into_iter()
                .collect(),
            PeerRef::Key(k) => self.leases.holder(k).filter(allowed).into_iter().collect(),
            PeerRef::Name(label) => {
                // As the device's resolver answers: a service's devices (that this device may
                // reach) before a device of that name.
                let grants = access.map_or(&[][..], |a| a.reach.as_slice());
                let of_service: BTreeSet<DeviceId> = grants
                    .iter()
                    .filter(|g| g.service.eq_ignore_ascii_case(label.as_str()))
                    .flat_map(|g| g.devices.iter().map(|d| d.device_id))
                    .filter(allowed)
                    .collect();
                let ids = if of_service.is_empty() {
                    grants
                        .iter()
                        .flat_map(|g| g.devices.iter())
                        .filter(|d| d.hostname.as_str().eq_ignore_ascii_case(label.as_str()))
                        .map(|d| d.device_id)
                        .filter(allowed)
                        .collect()
                } else {
                    of_service
                };
                ids.into_iter().take(MAX_NAME_PEERS).collect()
            }
        };
        if targets.is_empty() {
            return Err(WantRefused::NotAllowed);
        }
        for &target in &targets {
            self.hold(target, from);
            self.hold(from, target);
        }
        for &target in &targets {
            if self.sessions.get(&target).is_some_and(|s| s.sent.is_some()) {
                self.netmap_for(target);
            }
        }
        self.netmap_for(from);
        Ok(targets)
    }

    /// Session `holder` (if on demand) holds `peer` now, and lets go of the peer it wanted
    /// longest ago past its bound.
    fn hold(&mut self, holder: DeviceId, peer: DeviceId) {
        let Some(s) = self.sessions.get_mut(&holder) else {
            return;
        };
        let PeerMode::OnDemand(h) = &mut s.peers else {
            return;
        };
        s.held_changed = true;
        let evicted = h.hold(peer);
        self.holders.entry(peer).or_default().insert(holder);
        if let Some(e) = evicted {
            self.want_counters.evicted += 1;
            Self::unhold(&mut self.holders, holder, e);
        }
    }

    fn unhold(
        holders: &mut BTreeMap<DeviceId, BTreeSet<DeviceId>>,
        holder: DeviceId,
        peer: DeviceId,
    ) {
        if let Some(set) = holders.get_mut(&peer) {
            set.remove(&holder);
            if set.is_empty() {
                holders.remove(&peer);
            }
        }
    }

    /// Session `id` (mode `mode`) is gone: it holds nothing and is no full session.
    fn unindex(&mut self, id: DeviceId, mode: &PeerMode) {
        self.full.remove(&id);
        if let Some(h) = mode.held() {
            for p in h.ids() {
                Self::unhold(&mut self.holders, id, *p);
            }
        }
    }

    /// The sessions a change to `p` (access `a`) can concern through their peers: the full
    /// sessions among its peers and the sessions on demand that hold it (or, for a router,
    /// every peer: sessions on demand reach routers without holding them).
    fn concerned_by(&self, p: DeviceId, a: &policy::DeviceAccess, out: &mut BTreeSet<DeviceId>) {
        if self.served.contains_key(&p) {
            out.extend(a.peers.iter());
            return;
        }
        if self.full.len() < a.peers.len() {
            out.extend(self.full.iter().filter(|s| a.peers.contains(s)));
        } else {
            out.extend(a.peers.iter().filter(|s| self.full.contains(s)));
        }
        if let Some(h) = self.holders.get(&p) {
            out.extend(h.iter().filter(|s| a.peers.contains(s)));
        }
    }

    /// Brings the compile and every session's netmap up to date now (for a decision that must
    /// see every change so far: a punch, a want). The narrowing passes are skipped: the
    /// recompute that follows gives every session the exact result at once.
    fn up_to_date_now(&mut self) {
        if self.dirty {
            self.dirty = false;
            self.departed = false;
            self.quarantined_now.clear();
            self.recompute();
        } else if !self.touched.is_empty() {
            self.recompute_touched();
        }
        self.finish_pending();
    }

    /// Punch requests forwarded and dropped so far.
    pub fn punch_counters(&self) -> PunchCounters {
        self.punch_counters
    }

    fn punch(
        &mut self,
        from: DeviceId,
        conn: ConnId,
        peer: DeviceId,
        now_ms: i64,
    ) -> Result<(), PunchRefused> {
        // Judge against netmaps that reflect every change so far.
        self.up_to_date_now();
        let in_netmap = |s: &Session, who: DeviceId| {
            s.sent
                .as_ref()
                .is_some_and(|sent| sent.peers.contains_key(&who))
        };
        let Some(me) = self.sessions.get(&from).filter(|s| s.conn == conn) else {
            return Err(PunchRefused::NoSession);
        };
        if from == peer || !in_netmap(me, peer) {
            return Err(PunchRefused::NotPeers);
        }
        let Some(target) = self.sessions.get(&peer) else {
            return Err(PunchRefused::PeerUnavailable);
        };
        if !in_netmap(target, from) {
            return Err(PunchRefused::NotPeers);
        }
        if !target.punch {
            return Err(PunchRefused::PeerUnavailable);
        }
        let target_conn = target.conn;
        let endpoints = self
            .devices
            .get(&from)
            .map(|d| d.endpoints.clone())
            .unwrap_or_default();
        let Some(me) = self.sessions.get_mut(&from) else {
            return Err(PunchRefused::NoSession);
        };
        if now_ms.saturating_sub(me.punch_window_ms) >= PUNCH_WINDOW_MS {
            me.punch_window_ms = now_ms;
            me.punch_in_window = 0;
        }
        if me.punch_in_window >= PUNCH_PER_WINDOW {
            return Err(PunchRefused::RequesterLimited);
        }
        if me
            .punch_last
            .get(&peer)
            .is_some_and(|t| now_ms.saturating_sub(*t) < PUNCH_PAIR_GAP_MS)
        {
            return Err(PunchRefused::PairLimited);
        }
        me.punch_in_window += 1;
        me.punch_last.insert(peer, now_ms);
        // Peers that left the netmap since need no entry.
        if let Some(sent) = &me.sent {
            me.punch_last.retain(|k, _| sent.peers.contains_key(k));
        }
        self.outputs.push_back(Output::Send {
            conn: target_conn,
            msg: CoordinatorMsg::Punch {
                peer: from,
                endpoints,
            },
        });
        Ok(())
    }

    /// Next thing the driver must do.
    ///
    /// Outputs already queued (a revoked device's close, leases, verdicts) go out before a
    /// recompute, so they never wait on a compile. When devices were quarantined, every other
    /// session's filter first loses their addresses ([`Registry::narrow_out`]); when devices
    /// left the network, every session is first brought to the last compile without them (a
    /// device without a view is nobody's peer), which only removes peers and costs a
    /// comparison per peer; the compile that follows brings the rest (filters, peer sets).
    pub fn poll_output(&mut self) -> Option<Output> {
        loop {
            if let Some(out) = self.outputs.pop_front() {
                return Some(out);
            }
            if self.dirty {
                if self.narrow_first() {
                    continue;
                }
                self.dirty = false;
                self.recompute();
            } else if !self.touched.is_empty() {
                self.recompute_touched();
            }
            if self.produced_since_verdict >= VERDICT_EVERY {
                if let Some(id) = self.verdicts.pop_first() {
                    self.produced_since_verdict = 0;
                    self.send_verdict(id);
                    continue;
                }
            }
            if let Some(id) = self.pending.pop_front() {
                self.produce(id);
                self.produced_since_verdict += 1;
                if self.pending.is_empty() {
                    self.pending_done();
                }
                continue;
            }
            let id = self.verdicts.pop_first()?;
            self.produced_since_verdict = 0;
            self.send_verdict(id);
        }
    }

    /// Whether [`Registry::poll_output`] has anything left to give.
    pub fn has_work(&self) -> bool {
        self.dirty
            || !self.touched.is_empty()
            || !self.outputs.is_empty()
            || !self.pending.is_empty()
            || !self.verdicts.is_empty()
    }

    /// Brings the compile up to date with every change so far (the narrowing passes first),
    /// leaving the sessions' netmap changes to [`Registry::poll_output`].
    pub fn settle(&mut self) {
        if !self.dirty {
            if !self.touched.is_empty() {
                self.recompute_touched();
            }
            return;
        }
        self.narrow_now();
        self.dirty = false;
        self.recompute();
    }

    /// Runs the narrowing passes that are due ([`Registry::poll_output`]); their messages wait
    /// in the queue ([`Registry::poll_queued`]).
    pub fn narrow_now(&mut self) {
        if self.dirty {
            while self.narrow_first() {}
        }
    }

    /// The next output already queued, without recomputing or producing anything.
    pub fn poll_queued(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// One of the passes that only narrow and run before a compile, if one is due (devices
    /// quarantined, then devices departed); whether one ran.
    fn narrow_first(&mut self) -> bool {
        if !self.quarantined_now.is_empty() {
            let ids = std::mem::take(&mut self.quarantined_now);
            self.narrow_out(&ids);
            return true;
        }
        if std::mem::take(&mut self.departed) {
            self.refresh_views();
            let ids: Vec<DeviceId> = self.sessions.keys().copied().collect();
            for id in ids {
                self.netmap_for(id);
            }
            return true;
        }
        false
    }

    pub fn online_ids(&self) -> Vec<DeviceId> {
        self.sessions.keys().copied().collect()
    }

    pub fn is_online(&self, id: DeviceId) -> bool {
        self.sessions.contains_key(&id)
    }

    fn apply_update(&mut self, id: DeviceId, mut update: DeviceUpdate) {
        if !self.devices.contains_key(&id) {
            return;
        }
        // Every update carries the full advertisement: none named means none.
        let mut adv: BTreeSet<Prefix> = update
            .advertise_routes
            .iter()
            .copied()
            .filter(|p| !p.is_default())
            .take(MAX_ADVERTISED_ROUTES)
            .collect();
        if update.advertise_exit_node {
            adv.insert(Prefix::V4_DEFAULT);
            adv.insert(Prefix::V6_DEFAULT);
        }
        let entry = self.routes.entry(id).or_default();
        if entry.advertised != adv {
            entry.advertised = adv.clone();
            // Routers are an input of the compile.
            self.mark_dirty("update");
            self.outputs.push_back(Output::RoutesAdvertised {
                device: id,
                routes: adv.into_iter().collect(),
            });
        }
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        update.local_endpoints.truncate(MAX_ENDPOINTS);
        if update.wg_public_key.is_some() {
            dev.wg_public_key = update.wg_public_key;
        }
        // Every update carries the device's full state: no home relay named means none. A
        // name that is not registered is ignored (peers could not reach it there).
        let home = update
            .home_relay
            .filter(|h| self.relays.iter().any(|r| &r.name == h));
        if let Some(s) = self.sessions.get_mut(&id) {
            // A new session starts with none (its claim row too): only a change is news.
            if s.home_relay != home {
                self.outputs.push_back(Output::HomeRelay {
                    device: id,
                    relay: home.clone(),
                });
            }
            s.home_relay = home;
            s.punch = update.punch;
        }
        let observed = self.sessions.get(&id).map(|s| s.observed);
        let mut eps = Vec::new();
        // The address the coordinator saw, with the WireGuard port: right for devices on the
        // open network, and for NATs that keep the source port.
        if let (Some(o), true) = (observed, update.wg_port != 0) {
            eps.push(SocketAddr::new(o.ip(), update.wg_port));
        }
        for e in update.local_endpoints {
            if !eps.contains(&e) && !e.ip().is_unspecified() && !e.ip().is_loopback() {
                eps.push(e);
            }
        }
        eps.truncate(MAX_ENDPOINTS);
        dev.endpoints = eps;
    }

    fn peer_view(&self, d: &Device) -> Peer {
        let leases = self.leases.of(d.id).to_vec();
        Peer {
            routes: Default::default(),
            device_id: d.id,
            hostname: d.hostname.clone(),
            user: d.user.clone(),
            tags: names(&d.tags),
            ipv4: d.ipv4,
            ipv6: d.ipv6,
            // Peers only ever configure leased keys; the newest is the one to prefer.
            wg_public_key: leases.last().map(|l| l.lease.wg_public_key),
            endpoints: d.endpoints.clone(),
            online: self.is_online_anywhere(d.id),
            leases,
            relay: match self.sessions.get(&d.id) {
                Some(s) => s.home_relay.clone(),
                None => self
                    .remote_sessions
                    .get(&d.id)
                    .and_then(|s| s.home_relay.clone())
                    .filter(|h| self.relays.iter().any(|r| &r.name == h)),
            },
        }
    }

    /// Starts a recompute: the compile and the peer views brought up to date, and every
    /// session queued for its netmap change, posture wants and verdict. Those are produced one
    /// session at a time as outputs are taken ([`Registry::poll_output`]), so a change that
    /// reaches every session holds one session's messages here at a time, not every
    /// session's (a policy change's delta to 1 000 sessions was all built before the first
    /// was sent).
    fn recompute(&mut self) {
        tracing::trace!(why = self.dirty_why, "full recompute");
        self.recomputes += 1;
        // Every view is refreshed below.
        self.touched.clear();
        let (before, before_gen) = (Arc::clone(&self.compiled), self.views_gen);
        self.prepare_netmaps();
        self.wants = self.policy.as_ref().map(posture::wants).unwrap_or_default();
        // Sessions still waiting keep their places, ahead of the rest.
        let waiting: BTreeSet<DeviceId> = self.pending.iter().copied().collect();
        match self.compile_changed.take() {
            Some(changed) => self.queue_concerned(changed, &before, before_gen, &waiting),
            None => {
                let rest: Vec<DeviceId> = self
                    .sessions
                    .keys()
                    .filter(|id| !waiting.contains(id))
                    .copied()
                    .collect();
                self.pending.extend(rest);
            }
        }
        self.trust_changed_first();
    }

    /// Moves the sessions of devices whose trust changed (a verdict due: quarantined,
    /// released, a posture check failed or passed) to the front of the queue, keeping the
    /// order of the rest. Their verdict is queued when their netmap is produced and goes out
    /// within [`VERDICT_EVERY`] productions after it, so a quarantined device learns why in
    /// about the time of that many sessions, not after every other session's change (at
    /// 10 000 sessions, seconds). Their peers were told first (the narrowing pass). Trust
    /// changes are few, so the rest keep their places among themselves.
    fn trust_changed_first(&mut self) {
        if self.verdict_dirty.is_empty() || self.pending.len() < 2 {
            return;
        }
        let dirty = &self.verdict_dirty;
        let (first, rest): (VecDeque<DeviceId>, VecDeque<DeviceId>) =
            self.pending.drain(..).partition(|id| dirty.contains(id));
        self.pending = first;
        self.pending.extend(rest);
    }

    /// After a compile that changed the access of `changed` only: queues the sessions that
    /// can differ from what they were sent, and marks every other session up to date with
    /// the new compile and views without producing it. A session is left alone when it was
    /// up to date with the compile before (`before`, views generation `before_gen`, not
    /// narrowed), its own access did not change, no peer it has or may have changed its view,
    /// and nothing else its netmap carries moved (relays, policy version, its name and
    /// routes, the posture wants, its verdict). So a trust change to one device (a
    /// quarantine, a failed posture check, a departure) costs the sessions it concerns,
    /// not every session. The compile's peer relation is symmetric (property-tested in
    /// `ward_shared::policy`), so a device whose peers changed is itself in `changed`.
    fn queue_concerned(
        &mut self,
        changed: BTreeSet<DeviceId>,
        before: &Arc<Compiled>,
        before_gen: u64,
        waiting: &BTreeSet<DeviceId>,
    ) {
        let changed_views: &[DeviceId] = if self.views_gen == before_gen {
            &[]
        } else {
            &self.views_changed
        };
        let compiled = &self.compiled;
        let mut concerned = changed;
        concerned.extend(self.verdict_dirty.iter().copied());
        concerned.extend(changed_views.iter().copied());
        // A device whose view changed and that the compile does not know is looked for in
        // every session's sent peers.
        let mut unknown = Vec::new();
        for p in changed_views {
            match compiled.devices.get(p) {
                Some(a) => self.concerned_by(*p, a, &mut concerned),
                None => unknown.push(*p),
            }
        }
        let no_routes: Vec<Prefix> = Vec::new();
        let mut carried = 0u64;
        for (id, s) in &mut self.sessions {
            if waiting.contains(id) {
                continue;
            }
            let settled = !concerned.contains(id)
                && s.verdict_sent.is_some()
                && s.wants_sent.as_ref() == Some(&self.wants)
                && s.sent.as_mut().is_some_and(|sent| {
                    let current = Arc::ptr_eq(&sent.compiled, before)
                        && !sent.narrowed
                        && sent.views_gen == before_gen;
                    let rest_same = sent.relays == self.relays
                        && sent.policy_version == self.policy_version
                        && sent.routes == *self.served.get(id).unwrap_or(&no_routes)
                        && self
                            .devices
                            .get(id)
                            .is_some_and(|d| d.hostname == sent.hostname);
                    let holds = unknown.iter().any(|p| sent.peers.contains_key(p));
                    let settled = current && rest_same && !holds;
                    if settled {
                        sent.compiled = Arc::clone(compiled);
                        sent.views_gen = self.views_gen;
                    }
                    settled
                });
            if settled {
                carried += 1;
            } else {
                self.pending.push_back(*id);
            }
        }
        self.sessions_carried += carried;
    }

    /// A recompute for changes the compile does not read ([`Registry::touch`]): only the
    /// touched devices' views are refreshed, and only the sessions that can differ from what
    /// they were sent are queued: the touched devices' own, those with a verdict due or
    /// still pending, those not brought up to date with the current compile and views, and
    /// those that hold or may hold a changed peer. Every other session already has what a
    /// full recompute would give it and is marked as up to date with the new views, so the
    /// cost of a key rotation or a device coming online follows the sessions it concerns,
    /// not every session.
    fn recompute_touched(&mut self) {
        let ids = std::mem::take(&mut self.touched);
        let before_gen = self.views_gen;
        let mut changed = Vec::new();
        for &id in &ids {
            let fresh = self.devices.get(&id).map(|d| self.peer_view(d));
            match fresh {
                Some(view) => {
                    if self.views.get(&id).is_some_and(|kept| **kept == view) {
                        continue;
                    }
                    self.views.insert(id, Arc::new(view));
                    changed.push(id);
                }
                None => {
                    if self.views.remove(&id).is_some() {
                        changed.push(id);
                    }
                }
            }
        }
        self.views_moved(changed);
        let changed: &[DeviceId] = if self.views_gen == before_gen {
            &[]
        } else {
            &self.views_changed
        };
        // Sessions still waiting keep their places, ahead of the newly concerned ones: a
        // stream of changes must not keep sending the first sessions while the last wait.
        let mut queue = std::mem::take(&mut self.pending);
        let waiting: BTreeSet<DeviceId> = queue.iter().copied().collect();
        let (compiled, views_gen) = (&self.compiled, self.views_gen);
        // A session up to date with the current compile holds (or may hold) a peer only if
        // that compile makes them peers, and the compile's peer relation is symmetric (held
        // to that by the property tests of `ward_shared::policy`): the sessions that can hold
        // a changed peer are that peer's own peers, found from the changed few instead of by
        // looking at every session. A changed device the compile does not know is looked
        // for in every session's sent peers.
        let mut concerned: BTreeSet<DeviceId> = ids;
        concerned.extend(self.verdict_dirty.iter().copied());
        let mut unknown = Vec::new();
        for p in changed {
            match compiled.devices.get(p) {
                Some(a) => self.concerned_by(*p, a, &mut concerned),
                None => unknown.push(*p),
            }
        }
        // All three are sorted by device id: one merge, no lookups per session.
        let mut waiting = waiting.into_iter().peekable();
        let mut named = concerned.into_iter().peekable();
        for (id, s) in &mut self.sessions {
            while waiting.next_if(|w| w < id).is_some() {}
            while named.next_if(|w| w < id).is_some() {}
            if waiting.next_if_eq(id).is_some() {
                continue;
            }
            let concerned = named.next_if_eq(id).is_some()
                || match &mut s.sent {
                    None => true,
                    Some(sent) => {
                        let current = sent.views_gen == before_gen
                            && Arc::ptr_eq(&sent.compiled, compiled)
                            && !sent.narrowed;
                        let holds = unknown.iter().any(|p| sent.peers.contains_key(p));
                        if current && !holds {
                            sent.views_gen = views_gen;
                        }
                        !current || holds
                    }
                };
            if concerned {
                queue.push_back(*id);
            }
        }
        self.pending = queue;
        self.trust_changed_first();
    }

    /// Produces every session's messages still pending (for a decision that must see every
    /// netmap as sent, such as a punch).
    fn finish_pending(&mut self) {
        while let Some(id) = self.pending.pop_front() {
            self.produce(id);
        }
        self.pending_done();
        while let Some(id) = self.verdicts.pop_first() {
            self.send_verdict(id);
        }
    }

    /// The last pending session was produced.
    fn pending_done(&mut self) {
        // Verdicts marked for sessions produced since are kept for the next recompute.
        let sessions = &self.sessions;
        self.verdict_dirty.retain(|id| sessions.contains_key(id));
    }

    /// One session's netmap change and its posture wants when they changed; its verdict is
    /// queued when due (sent after every pending netmap).
    fn produce(&mut self, id: DeviceId) {
        self.produced += 1;
        self.netmap_for(id);
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.verdict_sent.is_none() || self.verdict_dirty.remove(&id) {
            self.verdicts.insert(id);
        }
        if s.wants_sent.as_ref() != Some(&self.wants) {
            s.wants_sent = Some(self.wants.clone());
            self.outputs.push_back(Output::Send {
                conn: s.conn,
                msg: CoordinatorMsg::PostureWants(self.wants.clone()),
            });
        }
    }

    /// A session's verdict, sent when it changed.
    fn send_verdict(&mut self, id: DeviceId) {
        if !self.sessions.contains_key(&id) {
            return;
        }
        let v = self.verdict(id);
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let same = s.verdict_sent.as_ref().is_some_and(|o| {
            o.results == v.results
                && o.quarantine == v.quarantine
                && o.unavailable == v.unavailable
                && o.report_seq == v.report_seq
        });
        if !same {
            s.verdict_sent = Some(v.clone());
            self.outputs.push_back(Output::Send {
                conn: s.conn,
                msg: CoordinatorMsg::PostureVerdict(v),
            });
        }
    }

    fn prepare_netmaps(&mut self) {
        self.compile_changed = Some(BTreeSet::new());
        let dir = self.directory();
        let routers = match &self.policy {
            Some(_) => self.routers(&dir),
            None => Vec::new(),
        };
        let unchanged = self.compiled_for.as_ref().is_some_and(|c| {
            c.policy_gen == self.policy_gen
                && c.directory == dir
                && c.routers == routers
                && self.compiled.next_expiry_ms.is_none_or(|t| self.now_ms < t)
        });
        if !unchanged {
            self.aggregated.clear();
            self.list_members.clear();
            self.inbound_edits.clear();
            // Which requirements apply where depends on the same inputs as the compile.
            self.refresh_needed();
            let handover = self.handover.take();
            let handed = match (&self.policy, handover) {
                (Some(p), Some((gen, h)))
                    if gen == self.policy_gen
                        && *h.directory == dir
                        && policy::same_at(p, &dir, h.at_ms, self.now_ms) =>
                {
                    Some(h.compiled)
                }
                (_, Some((_, h))) => {
                    tracing::debug!(
                        differs = %directory_difference(&h.directory, &dir),
                        "the policy check's compile is stale: compiling again"
                    );
                    None
                }
                _ => None,
            };
            self.compile_changed = None;
            self.compiled = match (&self.policy, handed) {
                // Routes are added to the check's compile; without routers there are none to add.
                (Some(p), Some(c)) => {
                    self.compiles_reused += 1;
                    if routers.is_empty() {
                        c
                    } else {
                        let mut c = Arc::unwrap_or_clone(c);
                        policy::compile_routes(
                            p,
                            &dir,
                            &routers,
                            self.pools.v6_prefix,
                            self.now_ms,
                            &mut c,
                        );
                        Arc::new(c)
                    }
                }
                (Some(p), None) => {
                    self.compiles += 1;
                    let mut c = policy::compile(p, &dir, self.now_ms);
                    policy::compile_routes(
                        p,
                        &dir,
                        &routers,
                        self.pools.v6_prefix,
                        self.now_ms,
                        &mut c,
                    );
                    self.compile_changed = Some(policy::carry_over(&mut c, &self.compiled));
                    Arc::new(c)
                }
                (None, _) => {
                    self.compiles += 1;
                    Arc::new(Compiled::default())
                }
            };
            self.compiled_for = Some(CompiledFor {
                policy_gen: self.policy_gen,
                directory: dir,
                routers: routers.clone(),
            });
        }
        self.served = routers.into_iter().map(|r| (r.id, r.routes)).collect();
        self.refresh_views();
    }

    /// The netmap or delta that brings session `id` to the current compile and peer views
    /// (nothing when it has them).
    fn netmap_for(&mut self, id: DeviceId) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if matches!(s.peers, PeerMode::Undecided(_)) && self.compiles + self.compiles_reused == 0 {
            // Nothing compiled yet (the pass that brings sessions to the last compile before
            // the first): the mode is decided by the compile that follows, which produces it.
            return;
        }
        let mut mode = std::mem::take(&mut s.peers);
        if matches!(mode, PeerMode::Full) && s.protocol >= 4 {
            // A session sent every peer while it had few (a device that came up before most
            // of the devices it may reach) goes on demand once they are well past the bound:
            // every peer of thousands would not fit a frame. It gets a whole netmap on demand,
            // holding the peers it had (up to the bound; beyond that it asks again).
            let peers = self.compiled.devices.get(&id).map_or(0, |a| a.peers.len());
            if peers > self.on_demand_above.saturating_mul(2) {
                let had: Vec<DeviceId> = s
                    .sent
                    .as_ref()
                    .map(|sent| sent.peers.keys().copied().collect())
                    .unwrap_or_default();
                let held = Held::new(if had.len() <= MAX_HELD_PEERS {
                    had
                } else {
                    Vec::new()
                });
                for p in held.ids() {
                    self.holders.entry(*p).or_default().insert(id);
                }
                self.full.remove(&id);
                s.sent = None;
                tracing::info!(device = %id, peers, "session switched to peers on demand");
                mode = PeerMode::OnDemand(held);
            }
        }
        if let PeerMode::Undecided(hint) = &mut mode {
            // Decided once, at the session's first netmap: a session's mode never changes
            // under the device.
            let peers = self.compiled.devices.get(&id).map_or(0, |a| a.peers.len());
            let above = self.on_demand_above;
            mode = if s.protocol >= 4 && (above == 0 || peers > above) {
                let held = Held::new(std::mem::take(hint));
                for p in held.ids() {
                    self.holders.entry(*p).or_default().insert(id);
                }
                PeerMode::OnDemand(held)
            } else {
                self.full.insert(id);
                PeerMode::Full
            };
        }
        self.netmap_for_mode(id, &mode);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.peers = mode;
        }
    }

    /// [`Registry::netmap_for`] with the session's peer mode taken out of it.
    fn netmap_for_mode(&mut self, id: DeviceId, mode: &PeerMode) {
        let held = mode.held();
        let compile_pending = self.dirty;
        let compiled = Arc::clone(&self.compiled);
        let relays = &self.relays;
        let policy_version = self.policy_version;
        let no_routes: Vec<Prefix> = Vec::new();
        let no_inbound: Vec<FilterRule> = Vec::new();
        let no_reach: Vec<Arc<ReachGrant>> = Vec::new();
        {
            let Some(me) = self.devices.get(&id) else {
                return;
            };
            let access = compiled.devices.get(&id);
            // The peers this device may have now, by reference: (id, view, routes through it).
            // Nothing is cloned for a session whose view did not change, so a recompute over
            // N sessions that changes little costs pointer comparisons, not N full netmaps'
            // copies or comparisons.
            let views = &self.views;
            let (views_gen, views_log) = (self.views_gen, &self.views_log);
            // On demand: the held peers and the routers this device reaches routes through,
            // those policy allows; in id order like the compile's peer set.
            let wanted = access.into_iter().flat_map(|a| {
                let ids: Box<dyn Iterator<Item = DeviceId> + '_> = match held {
                    None => Box::new(a.peers.iter()),
                    // Held ids are in order already: without routes, no set to merge them.
                    Some(h) if a.routes.is_empty() => {
                        Box::new(h.ids().copied().filter(|p| a.peers.contains(p)))
                    }
                    Some(h) => Box::new(
                        h.ids()
                            .chain(a.routes.keys())
                            .copied()
                            .collect::<BTreeSet<DeviceId>>()
                            .into_iter()
                            .filter(|p| a.peers.contains(p)),
                    ),
                };
                ids.filter(move |p| *p != id).filter_map(|p| {
                    views
                        .get(&p)
                        .map(|v| (p, v, a.routes.get(&p).unwrap_or(&no_routes)))
                })
            });
            let holds = |a: &policy::DeviceAccess, p: &DeviceId| {
                held.is_none_or(|h| h.contains(p) || a.routes.contains_key(p))
            };
            let inbound: &[FilterRule] =
                access.map(|a| a.inbound.as_slice()).unwrap_or(&no_inbound);
            let reach = access.map(|a| &a.reach).unwrap_or(&no_reach);
            let shadow_filter = access.and_then(|a| a.shadow_inbound.as_ref());
            let my_routes = self.served.get(&id).unwrap_or(&no_routes);
            let Some(session) = self.sessions.get_mut(&id) else {
                return;
            };
            // Reach by reference (grants and destination lists) from version 3.
            let by_ref = session.protocol >= 3;
            // The filter as this device's protocol carries it: peer sets (ids kept from what
            // it holds) from version 2, flat rules before. Only a new compile can change it.
            // A narrowed filter is kept while the compile that follows its narrowing is still
            // pending (the compile it came from still lets the quarantined devices in).
            let same_compile = session.sent.as_ref().is_some_and(|s| {
                Arc::ptr_eq(&s.compiled, &compiled) && (!s.narrowed || compile_pending)
            });
            // On demand, the sets are cut down to the held peers' addresses: a session's
            // netmap then grows with its rules and the peers it holds, not with the devices
            // its rules name (at 10 000 dense devices, thousands of prefixes a set).
            let on_demand = held.is_some();
            let filter = if same_compile {
                None
            } else if session.protocol >= 2 {
                // Ids are matched against the full sets the device's were cut from (put in
                // their place for the factoring, then put back).
                let cut = session.sent.as_mut().and_then(|s| {
                    let full = s.full_sets.as_ref()?;
                    Some(std::mem::replace(&mut s.filter.sets, full.clone()))
                });
                let (shadow, prev) = (
                    shadow_filter.map(Vec::as_slice),
                    session.sent.as_ref().map(|s| &s.filter),
                );
                let f = match access {
                    Some(a) => {
                        peerset::factor_shared(&a.inbound, shadow, prev, &mut self.aggregated)
                    }
                    None => peerset::factor_with(inbound, shadow, prev, &mut self.aggregated),
                };
                if let (Some(cut), Some(s)) = (cut, session.sent.as_mut()) {
                    s.filter.sets = cut;
                }
                Some(f)
            } else {
                Some(Factored {
                    inbound: Arc::new(inbound.to_vec()),
                    shadow: shadow_filter.cloned(),
                    sets: peerset::SetBook::new(),
                })
            };
            match &mut session.sent {
                None => {
                    let Some(mut filter) = filter else {
                        return; // unreachable: a session with nothing sent has no compile
                    };
                    let want: BTreeMap<DeviceId, SentPeer> = wanted
                        .map(|(p, v, routes)| {
                            (
                                p,
                                SentPeer {
                                    view: Arc::clone(v),
                                    routes: routes.clone(),
                                },
                            )
                        })
                        .collect();
                    let held_lists = (on_demand && by_ref).then(|| {
                        let ids: Vec<DeviceId> = want.keys().copied().collect();
                        held_reach_lists(reach, &ids, &mut self.list_members)
                    });
                    let full_sets = on_demand.then(|| {
                        let addrs = held_addrs(want.values().map(|p| &*p.view));
                        let cut = peerset::restrict(&filter.sets, &addrs);
                        std::mem::replace(&mut filter.sets, cut)
                    });
                    let msg = CoordinatorMsg::Netmap(Netmap {
                        resumed: None,
                        on_demand: held.is_some(),
                        seq: 1,
                        me: SelfInfo {
                            routes: my_routes.clone(),
                            device_id: id,
                            hostname: me.hostname.clone(),
                            ipv4: me.ipv4,
                            ipv6: me.ipv6,
                            v6_prefix: self.pools.v6_prefix,
                            observed_addr: Some(session.observed),
                        },
                        peers: want.values().map(SentPeer::to_peer).collect(),
                        inbound: Arc::clone(&filter.inbound),
                        reach: if by_ref {
                            Vec::new()
                        } else {
                            policy::expand_reach(reach, id)
                        },
                        relays: relays.clone(),
                        punch: true,
                        flows: true,
                        policy_version,
                        shadow_filter: filter.shadow.clone(),
                        dns_domain: Some(self.dns_domain.clone()),
                        coordinators: self.coordinators.clone(),
                        peer_sets: Arc::new(
                            filter
                                .sets
                                .iter()
                                .map(|(id, prefixes)| peerset::PeerSet {
                                    id: *id,
                                    prefixes: prefixes.to_vec(),
                                })
                                .collect(),
                        ),
                        reach_grants: if by_ref {
                            wire_grants(reach)
                        } else {
                            Vec::new()
                        },
                        reach_services: match &held_lists {
                            Some(lists) => lists
                                .iter()
                                .map(|(service, devices)| ReachService {
                                    service: service.clone(),
                                    devices: devices.clone(),
                                })
                                .collect(),
                            None if by_ref => reach_lists(reach)
                                .into_iter()
                                .map(|(service, l)| wire_list(service, l))
                                .collect(),
                            None => Vec::new(),
                        },
                    });
                    session.sent = Some(Sent {
                        seq: 1,
                        hostname: me.hostname.clone(),
                        routes: my_routes.clone(),
                        peers: want,
                        views_gen,
                        filter,
                        compiled: Arc::clone(&compiled),
                        relays: relays.clone(),
                        policy_version,
                        narrowed: false,
                        full_sets,
                        held_lists,
                    });
                    self.outputs.push_back(Output::Send {
                        conn: session.conn,
                        msg,
                    });
                }
                Some(sent) => {
                    let mut upsert: Vec<(Arc<Peer>, &Vec<Prefix>)> = Vec::new();
                    let mut remove: Vec<DeviceId> = Vec::new();
                    // Same compile, and the refreshes since still logged: only the peers they
                    // changed can differ from what was sent (three lookups each; when they
                    // are more than half the peers, one merge over all of them is cheaper).
                    let walk = access
                        .map_or(0, |a| match held {
                            None => a.peers.len(),
                            Some(h) => h.len() + a.routes.len(),
                        })
                        .max(sent.peers.len());
                    let held_changed = std::mem::take(&mut session.held_changed);
                    let since = if same_compile && !held_changed {
                        views_changed_since(views_log, sent.views_gen, views_gen, (walk / 2).max(8))
                    } else {
                        None
                    };
                    if let Some(changed) = since {
                        for p in changed {
                            let want = access
                                .filter(|a| p != id && a.peers.contains(&p) && holds(a, &p))
                                .and_then(|a| {
                                    let routes = a.routes.get(&p).unwrap_or(&no_routes);
                                    views.get(&p).map(|v| (v, routes))
                                });
                            let had = sent.peers.get(&p);
                            match want {
                                Some((v, routes)) if !had.is_some_and(|s| s.same(v, routes)) => {
                                    upsert.push((Arc::clone(v), routes));
                                }
                                Some(_) => {}
                                None if had.is_some() => remove.push(p),
                                None => {}
                            }
                        }
                    } else {
                        // Both sides are sorted by device id (the compile's peer set, the
                        // sent map): one merge, no lookups or sets per peer.
                        let mut old = sent.peers.iter().peekable();
                        for (p, v, routes) in wanted {
                            while let Some((k, _)) = old.next_if(|(k, _)| **k < p) {
                                remove.push(*k);
                            }
                            let same = old
                                .next_if(|(k, _)| **k == p)
                                .is_some_and(|(_, s)| s.same(v, routes));
                            if !same {
                                upsert.push((Arc::clone(v), routes));
                            }
                        }
                        remove.extend(old.map(|(k, _)| *k));
                    }
                    sent.views_gen = views_gen;
                    let mut filter = filter;
                    // On demand, the sets cut anew for the held peers when the filter itself
                    // is unchanged.
                    let mut held_sets: Option<peerset::SetBook> = None;
                    // Their changes, when worked out with them.
                    let mut held_changes: Option<Vec<peerset::PeerSetChange>> = None;
                    if on_demand && (filter.is_some() || held_changed) {
                        let full = match &filter {
                            Some(f) => f.sets.clone(),
                            None => sent.full_sets.clone().unwrap_or_default(),
                        };
                        let gained = held_addrs(
                            upsert
                                .iter()
                                .filter(|(v, _)| !sent.peers.contains_key(&v.device_id))
                                .map(|(v, _)| &**v),
                        );
                        let lost = held_addrs(
                            remove
                                .iter()
                                .filter_map(|k| sent.peers.get(k))
                                .map(|p| &*p.view),
                        );
                        // The same full sets: only the peers gained and lost can change the
                        // cut (a want costs its own addresses, not every held peer's).
                        let recut = filter
                            .is_none()
                            .then(|| peerset::recut(&full, &sent.filter.sets, &gained, &lost));
                        let (cut, changes) = match recut.flatten() {
                            Some((cut, changes)) => (cut, Some(changes)),
                            None => {
                                let remove: BTreeSet<&DeviceId> = remove.iter().collect();
                                let addrs = held_addrs(
                                    sent.peers
                                        .iter()
                                        .filter(|(k, _)| !remove.contains(k))
                                        .map(|(_, p)| &*p.view)
                                        .chain(upsert.iter().map(|(v, _)| &**v)),
                                );
                                // A new compile: the sets whose populations it left alone
                                // (the same interned allocation) are cut again from what
                                // was sent. A cut that did not fit its full sets (the
                                // same compile, `recut` refused it) is made afresh.
                                let cut = match (&filter, &sent.full_sets) {
                                    (Some(_), Some(prev_full)) => peerset::restrict_reusing(
                                        &full,
                                        &addrs,
                                        (prev_full, &sent.filter.sets),
                                        &gained,
                                        &lost,
                                        &mut self.aggregated,
                                    ),
                                    _ => peerset::restrict(&full, &addrs),
                                };
                                (cut, None)
                            }
                        };
                        match &mut filter {
                            Some(f) => f.sets = cut,
                            None if cut != sent.filter.sets => {
                                held_sets = Some(cut);
                                held_changes = changes;
                            }
                            None => {}
                        }
                        sent.full_sets = Some(full);
                    }
                    let (inbound_changed, sets_changed, reach_changed, shadow_changed) =
                        match &filter {
                            None => (false, held_sets.is_some(), false, false),
                            Some(f) => (
                                !self
                                    .inbound_edits
                                    .between(&sent.filter.inbound, &f.inbound)
                                    .is_empty(),
                                sent.filter.sets != f.sets,
                                // Version 3 learns destination names from its peers;
                                // a flat list carries them, so a rename changes it.
                                if by_ref {
                                    !same_grants(sent.reach(&id), reach, &mut self.list_members)
                                } else {
                                    sent.reach(&id) != reach.as_slice()
                                },
                                sent.filter.shadow != f.shadow,
                            ),
                        };
                    // Version 3: the grants when their terms changed, and the destination lists
                    // that are new or changed (by pointer, then by device ids), never expanded.
                    let (grants_changed, lists, removed_lists) = if by_ref && reach_changed {
                        let old = reach_lists(sent.reach(&id));
                        let new = reach_lists(reach);
                        let grants_changed = !sent
                            .reach(&id)
                            .iter()
                            .map(|g| grant_terms(g))
                            .eq(reach.iter().map(|g| grant_terms(g)));
                        // On demand, the lists are cut for the held peers below instead.
                        let lists: Vec<ReachService> = if on_demand {
                            Vec::new()
                        } else {
                            new.iter()
                                .filter(|(k, l)| {
                                    old.get(*k)
                                        .is_none_or(|o| !self.list_members.same_devices(o, l))
                                })
                                .map(|(service, l)| wire_list(service, l))
                                .collect()
                        };
                        let removed: Vec<String> = old
                            .keys()
                            .filter(|k| !new.contains_key(*k))
                            .map(|k| k.to_string())
                            .collect();
                        (grants_changed, lists, removed)
                    } else {
                        (false, Vec::new(), Vec::new())
                    };
                    // Version 5: what the grants lost and gained (from those sent, which the
                    // session's compile still holds here).
                    let grants_edit = (grants_changed && session.protocol >= 5)
                        .then(|| grants_edit(sent.reach(&id), reach));
                    // On demand, the lists as cut for the held peers, when they or the compile
                    // changed.
                    let (lists, removed_lists) =
                        if on_demand && by_ref && (filter.is_some() || held_changed) {
                            let mut held = sent.held_lists.take().unwrap_or_default();
                            let result = if filter.is_none() {
                                // The same lists: only the peers gained and lost can change them,
                                // and only the lists they change are sent.
                                let gained: Vec<DeviceId> = upsert
                                    .iter()
                                    .map(|(v, _)| v.device_id)
                                    .filter(|k| !sent.peers.contains_key(k))
                                    .collect();
                                let changed = recut_reach_lists(
                                    reach,
                                    &mut held,
                                    &gained,
                                    &remove,
                                    &mut self.list_members,
                                );
                                let lists: Vec<ReachService> = changed
                                    .into_iter()
                                    .filter_map(|service| {
                                        let devices = held.get(service)?.clone();
                                        Some(ReachService {
                                            service: service.to_string(),
                                            devices,
                                        })
                                    })
                                    .collect();
                                (lists, Vec::new())
                            } else {
                                let removing: BTreeSet<&DeviceId> = remove.iter().collect();
                                let mut ids: Vec<DeviceId> = sent
                                    .peers
                                    .keys()
                                    .filter(|k| !removing.contains(k))
                                    .copied()
                                    .chain(upsert.iter().map(|(v, _)| v.device_id))
                                    .collect();
                                ids.sort_unstable();
                                ids.dedup();
                                // The lists held were made from the last compile's grants for
                                // the peers held then: when these are the same peers, a list
                                // naming the same devices as before keeps its entry.
                                let same_peers = ids.len() == sent.peers.len()
                                    && ids.iter().zip(sent.peers.keys()).all(|(a, b)| a == b);
                                let was = Arc::clone(&sent.compiled);
                                let before = same_peers
                                    .then(|| was.devices.get(&id).map(|a| a.reach.as_slice()))
                                    .flatten();
                                let (new, lists, removed) = reheld_reach_lists(
                                    reach,
                                    &ids,
                                    &mut self.list_members,
                                    std::mem::take(&mut held),
                                    before,
                                );
                                held = new;
                                (lists, removed)
                            };
                            sent.held_lists = Some(held);
                            result
                        } else if on_demand && by_ref {
                            (Vec::new(), Vec::new())
                        } else {
                            (lists, removed_lists)
                        };
                    let reach_changed = if by_ref {
                        grants_changed || !lists.is_empty() || !removed_lists.is_empty()
                    } else {
                        reach_changed
                    };
                    let relays_changed = sent.relays != *relays;
                    let me_changed = sent.hostname != me.hostname || sent.routes != *my_routes;
                    let version_changed = sent.policy_version != policy_version;
                    if !same_compile {
                        // What the filter and reach now come from, changed or not (the old
                        // compile is freed once no session refers to it).
                        sent.compiled = Arc::clone(&compiled);
                        sent.narrowed = false;
                    }
                    if upsert.is_empty()
                        && remove.is_empty()
                        && !inbound_changed
                        && !sets_changed
                        && !reach_changed
                        && !relays_changed
                        && !me_changed
                        && !version_changed
                        && !shadow_changed
                    {
                        return;
                    }
                    let new_sets = held_sets.as_ref().or(filter.as_ref().map(|f| &f.sets));
                    let (set_changes, removed_sets) = match new_sets {
                        Some(_) if held_changes.is_some() => {
                            (held_changes.take().unwrap_or_default(), Vec::new())
                        }
                        // A session's cut sets are its own: not worth remembering the diff.
                        Some(n) if sets_changed && on_demand => peerset::diff(&sent.filter.sets, n),
                        Some(n) if sets_changed => self.aggregated.diff(&sent.filter.sets, n),
                        _ => (Vec::new(), Vec::new()),
                    };
                    let base = sent.seq;
                    sent.seq += 1;
                    for k in &remove {
                        sent.peers.remove(k);
                    }
                    let upsert: Vec<Peer> = upsert
                        .into_iter()
                        .map(|(view, routes)| {
                            let sp = SentPeer {
                                view,
                                routes: routes.clone(),
                            };
                            let peer = sp.to_peer();
                            sent.peers.insert(peer.device_id, sp);
                            peer
                        })
                        .collect();
                    let new_filter =
                        filter.filter(|_| inbound_changed || sets_changed || shadow_changed);
                    // Version 5: the rules a list lost and gained, when fewer than the list.
                    let by_edit = session.protocol >= 5;
                    let (inbound, inbound_edit) = match new_filter.as_ref() {
                        Some(f) if inbound_changed => {
                            let edit = by_edit
                                .then(|| {
                                    self.inbound_edits
                                        .between(&sent.filter.inbound, &f.inbound)
                                        .clone()
                                })
                                .filter(|e| e.len() < f.inbound.len());
                            match edit {
                                Some(e) => (None, Some(e)),
                                None => (Some(f.inbound.to_vec()), None),
                            }
                        }
                        _ => (None, None),
                    };
                    let (reach_grants, reach_grants_edit) = match grants_edit {
                        _ if !grants_changed => (None, None),
                        Some(edit) if edit.len() < reach.len() => (None, Some(edit)),
                        _ => (Some(wire_grants(reach)), None),
                    };
                    let msg = CoordinatorMsg::NetmapDelta(NetmapDelta {
                        base_seq: base,
                        seq: base + 1,
                        upsert,
                        remove,
                        inbound,
                        inbound_edit,
                        reach_grants_edit,
                        reach: (reach_changed && !by_ref).then(|| policy::expand_reach(reach, id)),
                        relays: relays_changed.then(|| relays.clone()),
                        policy_version: if version_changed {
                            policy_version
                        } else {
                            None
                        },
                        me: me_changed.then(|| SelfInfo {
                            routes: my_routes.clone(),
                            device_id: id,
                            hostname: me.hostname.clone(),
                            ipv4: me.ipv4,
                            ipv6: me.ipv6,
                            v6_prefix: self.pools.v6_prefix,
                            observed_addr: Some(session.observed),
                        }),
                        shadow_filter: new_filter
                            .as_ref()
                            .filter(|_| shadow_changed)
                            .map(|f| f.shadow.clone()),
                        peer_sets: set_changes,
                        removed_peer_sets: removed_sets,
                        reach_grants,
                        reach_services: lists,
                        removed_reach_services: removed_lists,
                    });
                    sent.hostname = me.hostname.clone();
                    if me_changed {
                        sent.routes = my_routes.clone();
                    }

                    sent.policy_version = policy_version;
                    if let Some(f) = new_filter {
                        sent.filter = f;
                    }
                    if let Some(sets) = held_sets {
                        sent.filter.sets = sets;
                    }
                    if relays_changed {
                        sent.relays = relays.clone();
                    }
                    self.outputs.push_back(Output::Send {
                        conn: session.conn,
                        msg,
                    });
                }
            }
        }
    }

    /// Takes newly quarantined devices out of every other session's inbound filter at once,
    /// from what each session was sent, ahead of the compile that follows. A quarantine
    /// otherwise reached the last peers only after a compile and a re-factoring of every
    /// session's filter (about 1.5 s at 1 000 dense sessions); this pass costs a lookup per
    /// peer set. The compile then brings the exact result: a remediation service lets the
    /// device in again, the peers it no longer reaches drop it. Until then the device is
    /// narrowed a little more than the policy says, never less.
    fn narrow_out(&mut self, ids: &BTreeSet<DeviceId>) {
        let gone: Vec<IpAddr> = ids
            .iter()
            .filter_map(|id| self.devices.get(id))
            .filter(|d| d.quarantine.is_some())
            .flat_map(|d| [IpAddr::V4(d.ipv4), IpAddr::V6(d.ipv6)])
            .collect();
        if gone.is_empty() {
            return;
        }
        let holds = |r: &FilterRule| r.sources.iter().any(|a| gone.contains(&a.to_canonical()));
        // Shared sets (the full sets, and the filter's own when the session is not on demand)
        // are narrowed once for every session that holds them (by allocation; `None`: it
        // holds none of the addresses) and interned, so the sessions keep sharing them. A
        // session on demand holds its filter's sets cut for it alone: those are narrowed
        // where they are, without a memo or an interning that no other session would find.
        // Either way the change is what the narrowing removed and split, never a comparison
        // of the old set with the new.
        // Each entry holds the set it was made from, so no other set takes its address
        // while the pass runs.
        type Memo = (
            Arc<Vec<Prefix>>,
            Option<Arc<(Arc<Vec<Prefix>>, peerset::Narrowed)>>,
        );
        let mut shared: std::collections::HashMap<usize, Memo> = std::collections::HashMap::new();
        let mut narrow_shared = |prefixes: &Arc<Vec<Prefix>>, agg: &mut peerset::Aggregated| {
            let (_, narrowed) = shared
                .entry(Arc::as_ptr(prefixes) as usize)
                .or_insert_with(|| {
                    let narrowed = peerset::without_changes(prefixes, &gone).map(|mut n| {
                        let set = agg.intern(std::mem::take(&mut n.kept));
                        Arc::new((set, n))
                    });
                    (Arc::clone(prefixes), narrowed)
                });
            narrowed.clone()
        };
        for (id, s) in &mut self.sessions {
            if ids.contains(id) {
                continue;
            }
            let Some(sent) = s.sent.as_mut() else {
                continue;
            };
            let cut = sent.full_sets.is_some();
            let mut sets: Option<peerset::SetBook> = None;
            let mut peer_sets = Vec::new();
            for (set, prefixes) in &sent.filter.sets {
                let (new, change) = if cut {
                    let Some(n) = peerset::without_changes(prefixes, &gone) else {
                        continue;
                    };
                    let change = peerset::change(*set, &n.kept, &n.added, &n.removed);
                    (Arc::new(n.kept), change)
                } else {
                    let Some(n) = narrow_shared(prefixes, &mut self.aggregated) else {
                        continue;
                    };
                    let (kept, n) = &*n;
                    (
                        Arc::clone(kept),
                        peerset::change(*set, kept, &n.added, &n.removed),
                    )
                };
                sets.get_or_insert_with(|| sent.filter.sets.clone())
                    .insert(*set, new);
                peer_sets.extend(change);
            }
            // On demand, the full sets the filter's are cut from lose the devices too, or a
            // change of the held peers before the compile would cut them back in.
            if let Some(full) = sent.full_sets.as_mut() {
                for prefixes in full.values_mut() {
                    if let Some(n) = narrow_shared(prefixes, &mut self.aggregated) {
                        *prefixes = Arc::clone(&n.0);
                    }
                }
            }
            // Literal sources: a version-1 device's flat rules.
            let inbound = sent.filter.inbound.iter().any(holds).then(|| {
                sent.filter
                    .inbound
                    .iter()
                    .map(|r| FilterRule {
                        sources: r
                            .sources
                            .iter()
                            .copied()
                            .filter(|a| !gone.contains(&a.to_canonical()))
                            .collect(),
                        ..r.clone()
                    })
                    .collect::<Vec<FilterRule>>()
            });
            if sets.is_none() && inbound.is_none() {
                continue;
            }
            let base = sent.seq;
            sent.seq += 1;
            sent.narrowed = true;
            if let Some(new) = sets {
                sent.filter.sets = new;
            }
            if let Some(rules) = &inbound {
                sent.filter.inbound = Arc::new(rules.clone());
            }
            self.outputs.push_back(Output::Send {
                conn: s.conn,
                msg: CoordinatorMsg::NetmapDelta(NetmapDelta {
                    base_seq: base,
                    seq: base + 1,
                    inbound,
                    peer_sets,
                    ..NetmapDelta::default()
                }),
            });
        }
    }

    /// Brings `views` up to date: each live device's view built afresh and, when equal to
    /// the one kept, the kept allocation reused (so sessions that hold it see it unchanged by
    /// pointer). One comparison per device per recompute, not one per session and peer.
    fn refresh_views(&mut self) {
        let fresh: Vec<(DeviceId, Peer)> = self
            .devices
            .values()
            .map(|d| (d.id, self.peer_view(d)))
            .collect();
        let mut views = BTreeMap::new();
        let mut changed = Vec::new();
        for (id, view) in fresh {
            let kept = self.views.remove(&id).filter(|k| **k == view);
            if kept.is_none() {
                changed.push(id);
            }
            views.insert(id, kept.unwrap_or_else(|| Arc::new(view)));
        }
        // What is left was dropped.
        changed.extend(self.views.keys().copied());
        changed.sort_unstable();
        self.views = views;
        self.views_moved(changed);
    }

    /// A refresh changed the views of `changed` (sorted): a new generation, logged.
    fn views_moved(&mut self, changed: Vec<DeviceId>) {
        if changed.is_empty() {
            return;
        }
        self.views_gen += 1;
        self.views_log.push_back((self.views_gen, changed.clone()));
        let mut ids: usize = self.views_log.iter().map(|(_, c)| c.len()).sum();
        while self.views_log.len() > 1
            && (self.views_log.len() > VIEWS_LOG_GENS || ids > VIEWS_LOG_IDS)
        {
            if let Some((_, c)) = self.views_log.pop_front() {
                ids -= c.len();
            }
        }
        self.views_changed = changed;
    }
}

/// The devices whose views changed after generation `since` up to `now`, sorted, when the
/// log still covers every one of those refreshes and they are at most `limit`; `None`
/// otherwise (walk all peers). Refreshes naming more than four times `limit` in all are
/// given up on before any is copied, so a session far behind pays little to learn it.
fn views_changed_since(
    log: &VecDeque<(u64, Vec<DeviceId>)>,
    since: u64,
    now: u64,
    limit: usize,
) -> Option<Vec<DeviceId>> {
    if since >= now {
        return Some(Vec::new());
    }
    let oldest = log.front()?.0;
    if since.saturating_add(1) < oldest {
        return None;
    }
    let named: usize = log
        .iter()
        .rev()
        .take_while(|(g, _)| *g > since)
        .map(|(_, c)| c.len())
        .sum();
    if named > limit.saturating_mul(4) {
        return None;
    }
    let mut out: Vec<DeviceId> = log
        .iter()
        .filter(|(g, _)| *g > since)
        .flat_map(|(_, c)| c.iter().copied())
        .collect();
    out.sort_unstable();
    out.dedup();
    (out.len() <= limit).then_some(out)
}

/// Whether two reach lists are the same: by pointer for grants a compile shares, then by
/// terms and destination ids (a destination's name reaches devices with its peer entry).
fn same_grants(a: &[Arc<ReachGrant>], b: &[Arc<ReachGrant>], lists: &mut ListMembers) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            Arc::ptr_eq(x, y)
                || (grant_terms(x) == grant_terms(y) && lists.same_devices(&x.devices, &y.devices))
        })
}

/// A grant without its destinations: what `NetmapDelta.reach_grants` carries.
fn grant_terms(
    g: &ReachGrant,
) -> (
    &str,
    ward_shared::filter::Proto,
    &[ward_shared::filter::PortRange],
    &str,
    Option<i64>,
) {
    (&g.service, g.proto, &g.ports, &g.rule, g.not_after_ms)
}

/// Whether two destination lists name the same devices.
fn same_devices(a: &Arc<[ReachDest]>, b: &Arc<[ReachDest]>) -> bool {
    Arc::ptr_eq(a, b)
        || (a.len() == b.len()
            && a.iter()
                .zip(b.iter())
                .all(|(x, y)| x.device_id == y.device_id))
}

/// The destination list of each service the grants name (one per service: a compile shares
/// it between the service's grants).
fn reach_lists(grants: &[Arc<ReachGrant>]) -> BTreeMap<&str, &Arc<[ReachDest]>> {
    grants
        .iter()
        .map(|g| (g.service.as_str(), &g.devices))
        .collect()
}

fn wire_list(service: &str, l: &Arc<[ReachDest]>) -> ReachService {
    ReachService {
        service: service.to_string(),
        devices: l.iter().map(|d| d.device_id).collect(),
    }
}

fn wire_grants(grants: &[Arc<ReachGrant>]) -> Vec<ward_shared::wire::ReachGrant> {
    grants
        .iter()
        .map(|g| ward_shared::wire::ReachGrant {
            service: g.service.clone(),
            proto: g.proto,
            ports: g.ports.clone(),
            rule: g.rule.clone(),
            not_after_ms: g.not_after_ms,
        })
        .collect()
}

/// Edits between factored inbound lists, remembered by the lists' allocations (see
/// `Registry::inbound_edits`).
#[derive(Debug, Default)]
struct InboundEdits {
    by_ptr: HashMap<(usize, usize), InboundEdit>,
}

/// (old list, new list, the edit between them): the lists are held so that their addresses,
/// the key, are not reused while the entry lives.
type InboundEdit = (
    Arc<Vec<FilterRule>>,
    Arc<Vec<FilterRule>>,
    ListEdit<FilterRule>,
);

impl InboundEdits {
    fn clear(&mut self) {
        self.by_ptr.clear();
    }

    /// The edit that turns `old` into `new` (empty when they are equal), made once per pair.
    fn between(
        &mut self,
        old: &Arc<Vec<FilterRule>>,
        new: &Arc<Vec<FilterRule>>,
    ) -> &ListEdit<FilterRule> {
        let key = (Arc::as_ptr(old) as usize, Arc::as_ptr(new) as usize);
        &self
            .by_ptr
            .entry(key)
            .or_insert_with(|| {
                let edit = if Arc::ptr_eq(old, new) {
                    ListEdit::default()
                } else {
                    ListEdit::between(old, new)
                };
                (Arc::clone(old), Arc::clone(new), edit)
            })
            .2
    }
}

/// What the wire grants of `old` lost and gained to become those of `new`: the grants the
/// two lists share in place at either end are skipped by their terms before any is converted.
fn grants_edit(
    old: &[Arc<ReachGrant>],
    new: &[Arc<ReachGrant>],
) -> ListEdit<ward_shared::wire::ReachGrant> {
    let same = |(a, b): &(&Arc<ReachGrant>, &Arc<ReachGrant>)| grant_terms(a) == grant_terms(b);
    let head = old.iter().zip(new).take_while(same).count();
    let (old, new) = (&old[head..], &new[head..]);
    let tail = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take_while(same)
        .count();
    ListEdit::between(
        &wire_grants(&old[..old.len() - tail]),
        &wire_grants(&new[..new.len() - tail]),
    )
}

impl SentPeer {
    /// Whether this is `view` with `routes`: by pointer for an unchanged view, by value
    /// otherwise (a view rebuilt equal is the same peer).
    fn same(&self, view: &Arc<Peer>, routes: &[Prefix]) -> bool {
        self.routes.as_slice() == routes
            && (Arc::ptr_eq(&self.view, view) || same_peer(&self.view, view, &self.view.routes))
    }

    /// The peer as the wire carries it to this device.
    fn to_peer(&self) -> Peer {
        let mut p = Peer::clone(&self.view);
        p.routes = self.routes.clone();
        p
    }
}

/// Whether `sent` (a peer as a device was last told it) equals `view` with `routes` as its
/// routed prefixes, without building that peer. Every field is named, so a new one cannot be
/// forgotten here.
fn same_peer(sent: &Peer, view: &Peer, routes: &[Prefix]) -> bool {
    let Peer {
        device_id,
        hostname,
        user,
        tags,
        ipv4,
        ipv6,
        wg_public_key,
        endpoints,
        online,
        leases,
        relay,
        routes: sent_routes,
    } = sent;
    sent_routes.as_slice() == routes
        && *device_id == view.device_id
        && *hostname == view.hostname
        && *user == view.user
        && *tags == view.tags
        && *ipv4 == view.ipv4
        && *ipv6 == view.ipv6
        && *wg_public_key == view.wg_public_key
        && *endpoints == view.endpoints
        && *online == view.online
        && *leases == view.leases
        && *relay == view.relay
}

/// The policy's view of users, devices and grants.
pub fn directory(
    devices: &BTreeMap<DeviceId, Device>,
    users: &BTreeMap<String, User>,
    grants: &[Grant],
) -> Directory {
    Directory {
        users: users
            .values()
            .map(|u| DirUser {
                name: u.name.clone(),
                groups: names(&u.groups),
                disabled: u.disabled,
                suspended: None,
            })
            .collect(),
        devices: devices.values().map(dir_device).collect(),
        grants: grants.to_vec(),
    }
}

/// What the policy reads of one device (its posture comes from the trust state).
fn dir_device(d: &Device) -> DirDevice {
    DirDevice {
        id: d.id,
        hostname: d.hostname.to_string(),
        user: d.user.clone(),
        tags: names(&d.tags),
        ipv4: d.ipv4,
        ipv6: d.ipv6,
        live: d.is_live(),
        posture_passed: Default::default(),
        posture_failures: Default::default(),
        quarantined: d.quarantine.is_some(),
        name_bound: d.name_bound,
    }
}

/// The first difference between two directories, for the log ("device 7: posture_passed").
fn directory_difference(a: &Directory, b: &Directory) -> String {
    if a.users != b.users {
        return "users".into();
    }
    if a.grants != b.grants {
        return "grants".into();
    }
    if a.devices.len() != b.devices.len() {
        return format!("device count {} and {}", a.devices.len(), b.devices.len());
    }
    for (x, y) in a.devices.iter().zip(&b.devices) {
        let field = if x.id != y.id {
            "id"
        } else if x.live != y.live {
            "live"
        } else if x.posture_passed != y.posture_passed {
            "posture_passed"
        } else if x.posture_failures != y.posture_failures {
            "posture_failures"
        } else if x.quarantined != y.quarantined {
            "quarantined"
        } else if x != y {
            "names or addresses"
        } else {
            continue;
        };
        return format!("device {}: {field}", x.id.0);
    }
    "nothing".into()
}

/// Names as the policy compiler and the wire take them.
fn names(n: &[Name]) -> Vec<String> {
    n.iter().map(|x| x.to_string()).collect()
}

/// Whether these inbound rules let `f` through (a rule for its source, protocol and port that
/// has not expired).
fn inbound_allows(rules: &[FilterRule], f: &DeniedFlow, now_ms: i64) -> bool {
    rules.iter().any(|r| {
        r.proto == f.proto
            && r.sources.contains(&f.src)
            && (f.proto == Proto::Icmp || r.ports.iter().any(|p| p.contains(f.port)))
            && r.not_after_ms.is_none_or(|t| t > now_ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grant to `service` over devices `ids` (hostnames `h<id>`).
    fn reach_grant(service: &str, ids: &[u64]) -> Arc<ReachGrant> {
        Arc::new(ReachGrant {
            service: service.into(),
            proto: Proto::Tcp,
            ports: vec![],
            rule: "r".into(),
            not_after_ms: None,
            devices: ids
                .iter()
                .map(|i| ReachDest {
                    device_id: DeviceId(*i),
                    hostname: Hostname::parse(&format!("h{i}")).unwrap(),
                })
                .collect(),
        })
    }

    fn device_ids(v: &[u64]) -> Vec<DeviceId> {
        v.iter().map(|i| DeviceId(*i)).collect()
    }

    /// A device on demand is told each service's destinations among the peers it holds;
    /// after a compile, a service whose list comes out the same keeps its entry and is not
    /// sent, a changed or new one is sent, and one no longer granted is named as removed:
    /// what comparing a fresh [`held_reach_lists`] with the old one gives. Given the grants
    /// the lists were made from, a list naming the same devices is not even searched.
    #[test]
    fn held_lists_after_a_compile_keep_what_did_not_change() {
        let (grant, ids) = (reach_grant, device_ids);
        let mut members = ListMembers::default();
        let held = ids(&[1, 2, 3, 9]);
        let before = [grant("a", &[1, 2, 5]), grant("b", &[3]), grant("c", &[4])];
        let given = held_reach_lists(&before, &held, &mut members);
        let kept_a = given["a"].as_ptr();
        // a: the same members held; b: gone; c: gains device 9; d: new.
        let after = [
            grant("a", &[1, 2, 6]),
            grant("c", &[4, 9]),
            grant("d", &[3]),
        ];
        let (new, changed, removed) = reheld_reach_lists(&after, &held, &mut members, given, None);
        assert_eq!(new, held_reach_lists(&after, &held, &mut members));
        assert_eq!(
            new["a"].as_ptr(),
            kept_a,
            "an unchanged list is kept, not rebuilt"
        );
        let sent: Vec<(&str, Vec<DeviceId>)> = changed
            .iter()
            .map(|l| (l.service.as_str(), l.devices.clone()))
            .collect();
        assert_eq!(sent, vec![("c", ids(&[9])), ("d", ids(&[3]))]);
        assert_eq!(removed, vec!["b".to_string()]);
        // Nothing changed: nothing sent, nothing removed.
        let (again, changed, removed) =
            reheld_reach_lists(&after, &held, &mut members, new.clone(), None);
        assert_eq!(again, new);
        assert!(changed.is_empty() && removed.is_empty());

        // Given the grants the lists were made from, a list naming the same devices as before
        // (a new allocation) is kept without a membership test; a changed list is searched;
        // the result is what the lists made afresh would be.
        let mut members = ListMembers::default();
        let given = held_reach_lists(&before, &held, &mut members);
        let kept_a = given["a"].as_ptr();
        let after = [grant("a", &[1, 2, 5]), after[1].clone(), after[2].clone()];
        let (new, changed, removed) =
            reheld_reach_lists(&after, &held, &mut members, given, Some(&before));
        assert_eq!(
            new,
            held_reach_lists(&after, &held, &mut ListMembers::default())
        );
        assert_eq!(new["a"].as_ptr(), kept_a, "an unchanged list is kept");
        let list_key = |g: &Arc<ReachGrant>| Arc::as_ptr(&g.devices).cast::<ReachDest>() as usize;
        assert!(
            !members.lists.contains_key(&list_key(&after[0])),
            "a list naming the same devices is not searched"
        );
        assert!(
            members.lists.contains_key(&list_key(&after[1])),
            "a changed list is searched"
        );
        let services: Vec<&str> = changed.iter().map(|l| l.service.as_str()).collect();
        assert_eq!(services, vec!["c", "d"]);
        assert_eq!(removed, vec!["b".to_string()]);
    }

    fn dev(id: u64) -> Device {
        crate::model::test_device(id)
    }

    /// Everyone in group eng may reach every eng device on any port.
    fn open_policy() -> Policy {
        policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.all]
devices = ["group:eng"]
ports = ["tcp/*", "udp/*", "icmp"]
[[rules]]
from = ["group:eng"]
to = ["all"]
"#,
            "test.toml",
        )
        .unwrap()
    }

    fn reg(ids: &[u64]) -> Registry {
        Registry::new(
            AddressPools::from_random([0; 5]),
            ids.iter().map(|i| dev(*i)),
            [],
            Some(open_policy()),
            vec![],
            vec![],
            0,
        )
    }

    /// Netmap traffic only (posture wants and verdicts have their own tests).
    fn drain(r: &mut Registry) -> Vec<Output> {
        std::iter::from_fn(|| r.poll_output())
            .filter(|o| {
                !matches!(
                    o,
                    Output::Send {
                        msg: CoordinatorMsg::PostureWants(_) | CoordinatorMsg::PostureVerdict(_),
                        ..
                    }
                )
            })
            .collect()
    }

    /// A session for each of `ids` (connection id `id × 10`), all from one address.
    fn open_sessions(r: &mut Registry, ids: &[u64]) {
        for &id in ids {
            r.handle_session_opened(
                DeviceId(id),
                id * 10,
                addr("10.0.0.1:1"),
                DeviceUpdate::default(),
            )
            .unwrap();
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Devices 1 and 2 (alice, group eng) see each other; device 3 belongs to bob, whom the
    /// policy gives nothing, so it is in nobody's netmap. All online; 2 and 3 understand punches.
    fn punch_registry() -> Registry {
        let mut bob = dev(3);
        bob.user = Some("bob".into());
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), dev(2), bob],
            [],
            Some(open_policy()),
            vec![],
            vec![],
            0,
        );
        for id in 1..=3u64 {
            r.handle_session_opened(
                DeviceId(id),
                10 + id,
                addr(&format!("203.0.113.{id}:4000")),
                DeviceUpdate {
                    wg_port: 51820,
                    local_endpoints: vec![addr(&format!("192.168.{id}.2:51820"))],
                    punch: id != 1,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        drain(&mut r);
        r
    }

    fn punches(out: &[Output]) -> Vec<(ConnId, DeviceId, Vec<SocketAddr>)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    conn,
                    msg: CoordinatorMsg::Punch { peer, endpoints },
                } => Some((*conn, *peer, endpoints.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn punch_requests_reach_allowed_peers_only_and_are_rate_limited() {
        let mut r = punch_registry();
        // Netmaps say the coordinator takes punch requests.
        let mut r0 = reg(&[1]);
        r0.handle_session_opened(DeviceId(1), 1, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        assert!(drain(&mut r0).iter().any(|o| matches!(
            o,
            Output::Send { msg: CoordinatorMsg::Netmap(nm), .. } if nm.punch
        )));

        // 1 → 2: forwarded to 2's connection with 1's current candidates.
        assert_eq!(
            r.handle_punch_request(DeviceId(1), 11, DeviceId(2), 1_000),
            Ok(())
        );
        assert_eq!(
            punches(&drain(&mut r)),
            vec![(
                12,
                DeviceId(1),
                vec![addr("203.0.113.1:51820"), addr("192.168.1.2:51820")]
            )]
        );
        // Not in each other's netmap (either way round): dropped, nothing sent to the third
        // device.
        assert_eq!(
            r.handle_punch_request(DeviceId(1), 11, DeviceId(3), 1_000),
            Err(PunchRefused::NotPeers)
        );
        assert_eq!(
            r.handle_punch_request(DeviceId(3), 13, DeviceId(2), 1_000),
            Err(PunchRefused::NotPeers)
        );
        // Not on the requester's current connection, or to itself.
        assert_eq!(
            r.handle_punch_request(DeviceId(1), 99, DeviceId(2), 1_000),
            Err(PunchRefused::NoSession)
        );
        assert_eq!(
            r.handle_punch_request(DeviceId(2), 12, DeviceId(2), 1_000),
            Err(PunchRefused::NotPeers)
        );
        // A peer that does not understand punches is never sent one.
        assert_eq!(
            r.handle_punch_request(DeviceId(2), 12, DeviceId(1), 1_000),
            Err(PunchRefused::PeerUnavailable)
        );
        assert!(punches(&drain(&mut r)).is_empty());

        // The same pair again within the gap: dropped; after it: forwarded.
        assert_eq!(
            r.handle_punch_request(DeviceId(1), 11, DeviceId(2), 1_000 + PUNCH_PAIR_GAP_MS - 1),
            Err(PunchRefused::PairLimited)
        );
        let t = 1_000 + PUNCH_PAIR_GAP_MS;
        assert_eq!(
            r.handle_punch_request(DeviceId(1), 11, DeviceId(2), t),
            Ok(())
        );
        let c = r.punch_counters();
        assert_eq!(c.not_peers, 4, "{c:?}");
        assert_eq!(c.peer_unavailable, 1, "{c:?}");
        assert_eq!(c.pair_limited, 1, "{c:?}");
        assert_eq!(c.forwarded, 2, "{c:?}");
        // Revoked from the policy: no longer peers, no longer punched.
        r.handle_device_removed(DeviceId(2), "revoked");
        drain(&mut r);
        assert!(r
            .handle_punch_request(DeviceId(1), 11, DeviceId(2), t + PUNCH_WINDOW_MS)
            .is_err());
    }

    #[test]
    fn one_device_cannot_make_the_coordinator_flood_its_peers() {
        let n = u64::from(PUNCH_PER_WINDOW) + 5;
        let mut r = reg(&(1..=n).collect::<Vec<_>>());
        for id in 1..=n {
            let update = DeviceUpdate {
                punch: true,
                ..Default::default()
            };
            r.handle_session_opened(DeviceId(id), id, addr("10.0.0.1:1"), update)
                .unwrap();
        }
        drain(&mut r);
        // Every peer once, all within one window: the budget runs out.
        let results: Vec<_> = (2..=n)
            .map(|p| r.handle_punch_request(DeviceId(1), 1, DeviceId(p), 5_000))
            .collect();
        let ok = results.iter().filter(|x| x.is_ok()).count();
        assert_eq!(ok as u32, PUNCH_PER_WINDOW);
        assert!(results[ok..]
            .iter()
            .all(|x| *x == Err(PunchRefused::RequesterLimited)));
        assert_eq!(punches(&drain(&mut r)).len() as u32, PUNCH_PER_WINDOW);
        assert_eq!(
            r.punch_counters().requester_limited,
            n - 1 - u64::from(PUNCH_PER_WINDOW)
        );
        // Other devices keep their own budgets; the next window restores this one's.
        assert_eq!(
            r.handle_punch_request(DeviceId(2), 2, DeviceId(1), 5_000),
            Ok(())
        );
        assert_eq!(
            r.handle_punch_request(DeviceId(1), 1, DeviceId(n), 5_000 + PUNCH_WINDOW_MS),
            Ok(())
        );
    }

    /// Sessions opening, updating and closing reuse the compiled policy; a device joining, a
    /// new policy or a rule's expiry compile again, and the netmaps stay right either way.
    #[test]
    fn session_changes_reuse_the_compile_and_directory_changes_redo_it() {
        let mut r = reg(&[1, 2, 3]);
        drain(&mut r);
        let base = r.compiles();
        open_sessions(&mut r, &[1, 2, 3]);
        r.handle_session_update(
            DeviceId(2),
            20,
            DeviceUpdate {
                wg_port: 51820,
                ..Default::default()
            },
        );
        let out = drain(&mut r);
        assert_eq!(r.compiles(), base, "sessions alone do not compile");
        // Device 1 was told about device 2's endpoint all the same.
        let sees_endpoint = told_about(&out, 2).iter().any(|p| !p.endpoints.is_empty());
        assert!(sees_endpoint, "{out:?}");
        // A new device is a directory change: compiled again, and peers hear of it.
        r.handle_device_upserted(dev(4));
        let out = drain(&mut r);
        assert_eq!(r.compiles(), base + 1);
        assert!(
            out.iter().any(|o| matches!(o,
            Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) }
                if d.upsert.iter().any(|p| p.device_id == DeviceId(4)))),
            "{out:?}"
        );
        // Nothing changed: nothing compiled, nothing sent.
        r.handle_session_closed(DeviceId(9), 90);
        r.dirty = true;
        assert!(drain(&mut r).is_empty());
        assert_eq!(r.compiles(), base + 1);
        // The same policy applied again is a new policy: compiled again.
        r.handle_policy(open_policy());
        drain(&mut r);
        assert_eq!(r.compiles(), base + 2);
    }

    /// A stored row read back with a new key, endpoints or last-seen time (a lease issued,
    /// seen through the change feed) changes no compile input: it refreshes the device's view
    /// without compiling, and a peer without a session of its own there still hears of it.
    /// A changed tag is a compile input: compiled again.
    #[test]
    fn a_row_changed_outside_the_compile_inputs_refreshes_its_view_only() {
        let mut r = reg(&[1, 2, 3]);
        open_sessions(&mut r, &[1, 3]);
        drain(&mut r);
        let (base, full) = (r.compiles(), r.recomputes());
        let mut row = r.devices[&DeviceId(2)].clone();
        row.endpoints = vec![addr("192.0.2.7:41641")];
        row.last_seen_ms += 1_000;
        r.handle_device_upserted(row.clone());
        let out = drain(&mut r);
        assert_eq!(
            r.recomputes(),
            full,
            "a contact change is no full recompute"
        );
        let told = out.iter().any(|o| {
            matches!(o, Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) }
                if d.upsert.iter().any(|p| p.device_id == DeviceId(2)
                    && p.endpoints == vec![addr("192.0.2.7:41641")]))
        });
        assert!(told, "{out:?}");
        // The same row again: nothing to send.
        r.handle_device_upserted(row.clone());
        assert!(drain(&mut r).is_empty());
        assert_eq!(r.recomputes(), full);
        row.tags.push(Name::parse("tag", "db").unwrap());
        r.handle_device_upserted(row);
        drain(&mut r);
        assert_eq!(r.recomputes(), full + 1, "a tag is a compile input");
        assert_eq!(r.compiles(), base + 1);
    }

    /// A policy apply's check hands its compile over with the policy: the registry uses it
    /// (no compile of its own) when it was made from the registry's directory, and it equals a
    /// fresh compile. One made from another directory, across a rule's expiry, or for a policy
    /// that a newer one replaced is not used: the registry compiles.
    #[test]
    fn a_policy_checks_compile_is_used_only_when_it_matches() {
        let mut r = reg(&[1, 2, 3]);
        drain(&mut r);
        open_sessions(&mut r, &[1, 2, 3]);
        drain(&mut r);
        let handed = |p: &Policy, dir: Directory, at_ms: i64| PolicyCompile {
            compiled: Arc::new(policy::compile(p, &dir, at_ms)),
            directory: Arc::new(dir),
            at_ms,
        };
        let fresh = |r: &Registry| {
            let p = r.policy.as_ref().unwrap();
            let dir = r.directory();
            let mut c = policy::compile(p, &dir, r.now_ms);
            policy::compile_routes(p, &dir, &[], r.pools.v6_prefix, r.now_ms, &mut c);
            c
        };
        let counts = |r: &Registry| (r.compiles(), r.compiles_reused());

        // Made by the check from the directory as judged under the candidate: used as is.
        let p = open_policy();
        let c = handed(&p, r.directory_for(&p), r.now_ms);
        let (compiles, reused) = counts(&r);
        r.handle_policy_compiled(p.clone(), Some(c.clone()));
        drain(&mut r);
        assert_eq!(
            counts(&r),
            (compiles, reused + 1),
            "taken over, not compiled"
        );
        assert!(Arc::ptr_eq(r.compiled(), &c.compiled));
        assert_eq!(**r.compiled(), fresh(&r), "the same as a fresh compile");
        assert!(!r.compiled().devices[&DeviceId(1)].peers.is_empty());

        // Made from another directory (device 3 missing): compiled again, device 3 included.
        let mut other = r.directory_for(&p);
        other.devices.retain(|d| d.id != DeviceId(3));
        let c = handed(&p, other, r.now_ms);
        r.handle_policy_compiled(p.clone(), Some(c.clone()));
        drain(&mut r);
        assert_eq!(counts(&r), (compiles + 1, reused + 1), "compiled");
        assert!(!Arc::ptr_eq(r.compiled(), &c.compiled));
        assert_eq!(**r.compiled(), fresh(&r));
        assert!(r.compiled().devices.contains_key(&DeviceId(3)));

        // Made after a rule's expiry that the registry has not reached: compiled again, and
        // the rule is in force.
        let expiring = policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.all]
devices = ["group:eng"]
ports = ["tcp/*"]
[[rules]]
from = ["group:eng"]
to = ["all"]
expires = "2030-01-01T00:00:00Z"
"#,
            "test.toml",
        )
        .unwrap();
        let after = 1_893_456_000_001;
        assert!(r.now_ms < after);
        let c = handed(&expiring, r.directory_for(&expiring), after);
        assert!(c.compiled.devices.values().all(|a| a.peers.is_empty()));
        r.handle_policy_compiled(expiring.clone(), Some(c));
        drain(&mut r);
        assert_eq!(counts(&r), (compiles + 2, reused + 1), "compiled");
        assert_eq!(**r.compiled(), fresh(&r));
        assert!(!r.compiled().devices[&DeviceId(1)].peers.is_empty());

        // A matching compile for a policy that a newer one replaced before the recompute.
        let c = handed(&p, r.directory_for(&p), r.now_ms);
        r.handle_policy_compiled(p.clone(), Some(c.clone()));
        r.handle_policy(expiring);
        drain(&mut r);
        assert_eq!(counts(&r), (compiles + 3, reused + 1), "compiled");
        assert!(!Arc::ptr_eq(r.compiled(), &c.compiled));
        assert_eq!(**r.compiled(), fresh(&r));
    }

    /// A policy version read back from the change feed after it was applied here (or read
    /// twice) is not compiled, judged or pushed again; a new version, or the same version
    /// with another text, is.
    #[test]
    fn the_policy_version_in_force_again_changes_nothing() {
        let mut r = reg(&[1, 2, 3]);
        drain(&mut r);
        open_sessions(&mut r, &[1, 2, 3]);
        drain(&mut r);
        let p = open_policy();
        assert!(r.handle_policy_applied(p.clone(), 7, None));
        let out = drain(&mut r);
        assert!(!out.is_empty(), "a new version goes out");
        let compiles = r.compiles();
        assert!(!r.handle_policy_applied(p.clone(), 7, None));
        assert!(drain(&mut r).is_empty(), "nothing goes out again");
        assert_eq!(r.compiles(), compiles, "not compiled again");
        assert!(r.handle_policy_applied(p.clone(), 8, None));
        drain(&mut r);
        assert_eq!(r.compiles(), compiles + 1, "a new version is compiled");
        let mut other = p;
        other.rules.clear();
        assert!(r.handle_policy_applied(other, 8, None));
        drain(&mut r);
        assert_eq!(r.compiles(), compiles + 2, "another text is compiled");
    }

    /// Sessions hold one shared copy of each peer's state and of the compile (memory grows
    /// with devices plus sessions, not with sessions × peers); a peer's change replaces its
    /// one copy, and a new compile replaces the old one in every session and frees it.
    #[test]
    fn peers_and_the_compile_are_shared_not_copied_per_session() {
        let mut r = reg(&[1, 2, 3]);
        drain(&mut r);
        open_sessions(&mut r, &[1, 2, 3]);
        drain(&mut r);
        let held = |r: &Registry, who: u64, peer: u64| {
            Arc::clone(
                &r.sessions[&DeviceId(who)].sent.as_ref().unwrap().peers[&DeviceId(peer)].view,
            )
        };
        let three = held(&r, 1, 3);
        assert!(
            Arc::ptr_eq(&three, &held(&r, 2, 3)),
            "one copy of peer 3 for both sessions"
        );
        assert!(Arc::ptr_eq(&three, &r.views[&DeviceId(3)]));
        for id in 1..=3 {
            let sent = r.sessions[&DeviceId(id)].sent.as_ref().unwrap();
            assert!(Arc::ptr_eq(&sent.compiled, r.compiled()), "session {id}");
        }
        // A change to peer 3 is one new copy, sent to both, and the old one is let go.
        r.handle_session_update(
            DeviceId(3),
            30,
            DeviceUpdate {
                wg_port: 51820,
                ..Default::default()
            },
        );
        let out = drain(&mut r);
        let upserts: Vec<&Peer> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send {
                    msg: CoordinatorMsg::NetmapDelta(d),
                    ..
                } => Some(&d.upsert),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(upserts.len(), 2, "{out:?}");
        assert!(upserts
            .iter()
            .all(|p| p.device_id == DeviceId(3) && !p.endpoints.is_empty()));
        let new_three = held(&r, 1, 3);
        assert!(!Arc::ptr_eq(&three, &new_three) && Arc::ptr_eq(&new_three, &held(&r, 2, 3)));
        assert_eq!(
            Arc::strong_count(&three),
            1,
            "only this test holds the old state"
        );
        assert!(
            Arc::ptr_eq(&held(&r, 1, 2), &held(&r, 3, 2)),
            "peer 2 unchanged, still shared"
        );
        // A new policy: every session moves to the new compile; the old one is freed.
        let old = Arc::downgrade(r.compiled());
        r.handle_policy(open_policy());
        assert!(drain(&mut r).is_empty(), "the same access: nothing to send");
        assert!(old.upgrade().is_none(), "no session keeps the old compile");
        for id in 1..=3 {
            let sent = r.sessions[&DeviceId(id)].sent.as_ref().unwrap();
            assert!(Arc::ptr_eq(&sent.compiled, r.compiled()), "session {id}");
        }
    }

    /// A rule's expiry is a compile input even when nothing else changes: the cached compile
    /// is not reused past it, and the peers go away.
    #[test]
    fn a_rule_expiry_compiles_again() {
        let mut r = reg(&[1, 2]);
        let mut p = open_policy();
        p.rules[0].expires_ms = Some(5_000);
        r.handle_policy(p);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        assert!(
            out.iter().any(|o| matches!(o,
            Output::Send { conn: 10, msg: CoordinatorMsg::Netmap(nm) } if nm.peers.len() == 1)),
            "{out:?}"
        );
        let before = r.compiles();
        r.handle_time(4_000);
        drain(&mut r);
        assert_eq!(
            r.compiles(),
            before,
            "before the expiry nothing is compiled"
        );
        r.handle_time(5_000);
        let out = drain(&mut r);
        assert_eq!(r.compiles(), before + 1);
        assert!(out.iter().any(|o| matches!(o,
            Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) } if d.remove == vec![DeviceId(2)])), "{out:?}");
    }

    /// The full netmap sent to `conn` among `out`.
    fn netmap(out: &[Output], conn: ConnId) -> Netmap {
        out.iter()
            .find_map(|o| match o {
                Output::Send {
                    conn: c,
                    msg: CoordinatorMsg::Netmap(nm),
                } if *c == conn => Some(nm.clone()),
                _ => None,
            })
            .expect("a netmap for the connection")
    }

    /// The deltas sent to `conn` among `out`, in order.
    fn deltas(out: &[Output], conn: ConnId) -> Vec<NetmapDelta> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    conn: c,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } if *c == conn => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    /// A policy change that alters one rule's ports: a version-5 device is sent that rule
    /// out and the new one in, for its filter and for its grants; a version-4 device both
    /// lists whole. Both end with the filter and grants a fresh netmap has.
    #[test]
    fn a_changed_rule_reaches_v5_devices_as_an_edit_and_v4_devices_as_whole_lists() {
        let text = |port: u16| {
            let mut t = String::from("[groups]\neng = [\"alice\"]\n");
            for i in 1..=8 {
                let p = if i == 3 { port } else { 1000 + i };
                t.push_str(&format!(
                    "[services.s{i}]\ndevices = [\"group:eng\"]\nports = [\"tcp/{p}\"]\n\
                     [[rules]]\nname = \"r{i}\"\nfrom = [\"group:eng\"]\nto = [\"s{i}\"]\n"
                ));
            }
            policy::parse(t.as_bytes(), "test.toml").unwrap()
        };
        // Device 1 speaks version 4, device 2 version 5.
        let open = |r: &mut Registry, conns: [ConnId; 2]| {
            for ((id, protocol), conn) in [(1, 4), (2, 5)].into_iter().zip(conns) {
                r.handle_session_opened_speaking(
                    DeviceId(id),
                    conn,
                    addr(&format!("10.0.0.{id}:1")),
                    DeviceUpdate::default(),
                    protocol,
                )
                .unwrap();
            }
            drain(r)
        };
        let mut r = reg(&[1, 2, 3]);
        r.handle_policy(text(22));
        let out = open(&mut r, [10, 11]);
        let (mut v4, mut v5) = (netmap(&out, 10), netmap(&out, 11));
        assert_eq!(v5.inbound.len(), 8, "{:?}", v5.inbound);
        assert_eq!(v5.reach_grants.len(), 8, "{:?}", v5.reach_grants);
        r.handle_policy(text(2222));
        let out = drain(&mut r);
        let (d4, d5) = (deltas(&out, 10).remove(0), deltas(&out, 11).remove(0));
        assert!(
            d4.inbound_edit.is_none() && d4.reach_grants_edit.is_none(),
            "{d4:?}"
        );
        assert_eq!(d4.inbound.as_ref().map(Vec::len), Some(8));
        assert_eq!(d4.reach_grants.as_ref().map(Vec::len), Some(8));
        assert!(d5.inbound.is_none() && d5.reach_grants.is_none(), "{d5:?}");
        let edit = d5.inbound_edit.clone().unwrap();
        assert_eq!((edit.remove.len(), edit.add.len()), (1, 1), "{edit:?}");
        assert_eq!(
            edit.remove[0].ports,
            vec![ward_shared::filter::PortRange { lo: 22, hi: 22 }]
        );
        assert_eq!(
            edit.add[0].ports,
            vec![ward_shared::filter::PortRange { lo: 2222, hi: 2222 }]
        );
        let grants = d5.reach_grants_edit.clone().unwrap();
        assert_eq!(
            (grants.remove.len(), grants.add.len()),
            (1, 1),
            "{grants:?}"
        );
        assert_eq!(grants.add[0].rule, "r3");
        let bytes = |d: &NetmapDelta| {
            ward_shared::wire::encode(&CoordinatorMsg::NetmapDelta(d.clone())).len()
        };
        assert!(
            bytes(&d5) * 3 < bytes(&d4),
            "{} vs {}",
            bytes(&d5),
            bytes(&d4)
        );
        v4.apply(&d4).unwrap();
        v5.apply(&d5).unwrap();
        // What a fresh session of each version is sent now.
        for (id, conn) in [(1, 10), (2, 11)] {
            r.handle_session_closed(DeviceId(id), conn);
        }
        drain(&mut r);
        let out = open(&mut r, [20, 21]);
        let sorted = |mut v: Vec<FilterRule>| {
            v.sort();
            v
        };
        let (f4, f5) = (netmap(&out, 20), netmap(&out, 21));
        assert_eq!(sorted(v4.inbound.to_vec()), sorted(f4.inbound.to_vec()));
        assert_eq!(*v5.inbound, sorted(f5.inbound.to_vec()));
        let mut g5 = f5.reach_grants.clone();
        g5.sort();
        assert_eq!(v5.reach_grants, g5);
        assert_eq!(v4.reach_grants, f4.reach_grants);
        assert_eq!(v5.reach_view(), f5.reach_view());
    }

    /// A version-2 device gets its sources as peer sets and a device joining the group as a
    /// one-prefix set change; a version-1 device gets the same sources flat, and the whole
    /// filter again.
    #[test]
    fn netmaps_carry_peer_sets_to_v2_devices_and_flat_sources_to_v1() {
        let mut r = reg(&[1, 2, 3, 4, 5]);
        r.handle_session_opened_speaking(
            DeviceId(3),
            12,
            addr("10.0.0.3:1"),
            DeviceUpdate::default(),
            3,
        )
        .unwrap();
        r.handle_session_opened_speaking(
            DeviceId(1),
            10,
            addr("10.0.0.1:1"),
            DeviceUpdate::default(),
            2,
        )
        .unwrap();
        r.handle_session_opened_speaking(
            DeviceId(2),
            11,
            addr("10.0.0.2:1"),
            DeviceUpdate::default(),
            1,
        )
        .unwrap();
        let out = drain(&mut r);
        let full = |conn: ConnId| {
            out.iter()
                .find_map(|o| match o {
                    Output::Send {
                        conn: c,
                        msg: CoordinatorMsg::Netmap(nm),
                    } if *c == conn => Some(nm.clone()),
                    _ => None,
                })
                .unwrap()
        };
        let (v2, v1, v3) = (full(10), full(11), full(12));
        // Reach: flat for versions 1 and 2, grants over one destination list for version 3,
        // each the compile's reach for that device.
        let flat_reach =
            |r: &Registry, id: u64| r.compiled().devices[&DeviceId(id)].reach_flat(DeviceId(id));
        assert_eq!(v2.reach, flat_reach(&r, 1));
        assert_eq!(v1.reach, flat_reach(&r, 2));
        assert_eq!(v2.reach.len(), 4 * 3, "4 other devices x tcp, udp, icmp");
        assert!(v1.reach_grants.is_empty() && v2.reach_grants.is_empty());
        assert!(v3.reach.is_empty());
        assert_eq!(v3.reach_grants.len(), 3, "{:?}", v3.reach_grants);
        assert_eq!(v3.reach_services.len(), 1);
        assert_eq!(
            v3.reach_services[0].devices,
            [1, 2, 3, 4, 5].map(DeviceId).to_vec()
        );
        assert_eq!(v3.reach_view(), flat_reach(&r, 3));
        let as_flat = Netmap {
            resumed: None,
            reach: v3.reach_view(),
            reach_grants: vec![],
            reach_services: vec![],
            ..v3.clone()
        };
        let (v3_bytes, flat_bytes) = (
            ward_shared::wire::encode(&CoordinatorMsg::Netmap(v3.clone())).len(),
            ward_shared::wire::encode(&CoordinatorMsg::Netmap(as_flat)).len(),
        );
        assert!(v3_bytes < flat_bytes, "{v3_bytes} < {flat_bytes}");
        // Sessions hold the compile's grants, not copies: one grant for all sources.
        let grants = |r: &Registry, id: u64| {
            let s = r.sessions[&DeviceId(id)].sent.as_ref().unwrap();
            s.reach(&DeviceId(id)).to_vec()
        };
        assert!(Arc::ptr_eq(&grants(&r, 1)[0], &grants(&r, 3)[0]));
        assert!(!v2.inbound.is_empty() && v2.inbound.iter().all(|r| r.sources.is_empty()));
        assert_eq!(v2.peer_sets.len(), 1, "one population: {:?}", v2.peer_sets);
        assert!(v1.peer_sets.is_empty() && v1.inbound.iter().all(|r| r.source_sets.is_empty()));
        // Expanded, device 1's v2 filter names exactly the flat sources the compiler gave it.
        let flat = &**r.compiled().devices[&DeviceId(1)].inbound;
        assert_eq!(&peerset::expand(&v2.inbound, &v2.peer_sets, 1 << 16), flat);
        assert_eq!(*v1.inbound, *r.compiled().devices[&DeviceId(2)].inbound);

        // Device 6 joins: device 1 learns one new prefix per family, its rules unchanged.
        let mut six = dev(6);
        six.ipv4 = std::net::Ipv4Addr::new(100, 64, 0, 9);
        six.ipv6 = "fd00::9".parse().unwrap();
        r.handle_device_upserted(six);
        let out = drain(&mut r);
        let delta = |conn: ConnId| {
            out.iter()
                .find_map(|o| match o {
                    Output::Send {
                        conn: c,
                        msg: CoordinatorMsg::NetmapDelta(d),
                    } if *c == conn => Some(d.clone()),
                    _ => None,
                })
                .unwrap()
        };
        let (d2, d1, d3) = (delta(10), delta(11), delta(12));
        // Version 3: the grants are unchanged, the one destination list is sent again; never
        // a flat list. Versions 1 and 2: the flat list again.
        assert!(d3.reach.is_none() && d3.reach_grants.is_none(), "{d3:?}");
        assert_eq!(d3.reach_services.len(), 1, "{d3:?}");
        assert!(d3.reach_services[0].devices.contains(&DeviceId(6)));
        let mut v3 = v3;
        v3.apply(&d3).unwrap();
        assert_eq!(v3.reach_view(), flat_reach(&r, 3));
        assert_eq!(d2.reach.as_ref(), Some(&flat_reach(&r, 1)));
        assert!(d2.reach_grants.is_none() && d2.reach_services.is_empty());
        assert_eq!(d1.reach.as_ref(), Some(&flat_reach(&r, 2)));
        assert!(d2.inbound.is_none(), "{d2:?}");
        assert_eq!(d2.peer_sets.len(), 1);
        assert_eq!(d2.peer_sets[0].id, v2.peer_sets[0].id);
        assert_eq!(
            d2.peer_sets[0].add,
            vec![
                "100.64.0.9/32".parse().unwrap(),
                "fd00::9/128".parse().unwrap()
            ]
        );
        let mut v2 = v2;
        v2.apply(&d2).unwrap();
        let flat = &**r.compiled().devices[&DeviceId(1)].inbound;
        assert_eq!(&peerset::expand(&v2.inbound, &v2.peer_sets, 1 << 16), flat);
        let inbound = d1.inbound.unwrap();
        assert!(inbound
            .iter()
            .all(|r| r.sources.contains(&"100.64.0.9".parse().unwrap())));
        let v1_bytes = ward_shared::wire::encode(&CoordinatorMsg::NetmapDelta(NetmapDelta {
            inbound: Some(inbound),
            ..d2.clone()
        }))
        .len();
        let v2_bytes = ward_shared::wire::encode(&CoordinatorMsg::NetmapDelta(d2)).len();
        assert!(v2_bytes < v1_bytes, "{v2_bytes} < {v1_bytes}");

        // A policy change that moves a port: version 3 gets the grants again (no list, no
        // flat entries); the other versions the flat list.
        r.handle_policy(
            policy::parse(
                br#"
[groups]
eng = ["alice"]
[services.all]
devices = ["group:eng"]
ports = ["tcp/22"]
[[rules]]
from = ["group:eng"]
to = ["all"]
"#,
                "test.toml",
            )
            .unwrap(),
        );
        let out = drain(&mut r);
        let delta_of = |conn: ConnId| {
            out.iter()
                .find_map(|o| match o {
                    Output::Send {
                        conn: c,
                        msg: CoordinatorMsg::NetmapDelta(d),
                    } if *c == conn => Some(d.clone()),
                    _ => None,
                })
                .unwrap()
        };
        let p3 = delta_of(12);
        assert!(
            p3.reach.is_none()
                && p3.reach_services.is_empty()
                && p3.removed_reach_services.is_empty(),
            "{p3:?}"
        );
        assert_eq!(p3.reach_grants.as_ref().map(Vec::len), Some(1));
        v3.apply(&p3).unwrap();
        assert_eq!(v3.reach_view(), flat_reach(&r, 3));
        assert_eq!(v3.reach_view().len(), 5, "5 other devices x tcp/22");
        assert_eq!(delta_of(10).reach.as_ref(), Some(&flat_reach(&r, 1)));
    }

    #[test]
    fn new_coordinator_addresses_reach_open_sessions_in_a_full_netmap_then_deltas_go_on() {
        let mut r = reg(&[1, 2]);
        r.set_coordinators(vec!["a.example:7443".into()]);
        for (id, conn) in [(1, 10), (2, 11)] {
            r.handle_session_opened(
                DeviceId(id),
                conn,
                addr(&format!("10.0.0.{id}:4000")),
                DeviceUpdate {
                    wg_port: 51820,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        drain(&mut r);
        assert_eq!(
            r.handle_coordinators(vec!["a.example:7443".into()]),
            0,
            "the same list sends nothing"
        );
        assert!(drain(&mut r).is_empty());
        let list: Vec<String> = vec!["b.example:7443".into(), "a.example:7443".into()];
        assert_eq!(r.handle_coordinators(list.clone()), 2);
        let out = drain(&mut r);
        let mut told = BTreeSet::new();
        for o in &out {
            let Output::Send {
                conn,
                msg: CoordinatorMsg::Netmap(nm),
            } = o
            else {
                panic!("only full netmaps are sent: {o:?}")
            };
            assert_eq!(nm.coordinators, list);
            assert_eq!(nm.peers.len(), 1, "the netmap is whole, peers included");
            told.insert(*conn);
        }
        assert_eq!(told, BTreeSet::from([10, 11]));
        // Deltas continue from the new full netmap.
        r.handle_session_closed(DeviceId(2), 11);
        let out = drain(&mut r);
        assert!(
            out.iter().any(|o| matches!(o,
                Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) } if d.base_seq == 1)),
            "{out:?}"
        );
    }

    /// Sessions a churn test opens and closes, and the netmap each holds from its deltas.
    /// Outputs queued for a session before it closed may still come out; a driver drops them
    /// with the connection (`closed`).
    #[derive(Default)]
    struct Churn {
        held: BTreeMap<ConnId, Netmap>,
        conn_of: BTreeMap<u64, ConnId>,
        closed: BTreeSet<ConnId>,
        last_conn: ConnId,
    }

    impl Churn {
        /// Opens a session of `dev` unless it has one.
        fn open(&mut self, r: &mut Registry, dev: u64) {
            if self.conn_of.contains_key(&dev) {
                return;
            }
            self.last_conn += 1;
            r.handle_session_opened(
                DeviceId(dev),
                self.last_conn,
                addr(&format!("10.0.0.{dev}:4000")),
                DeviceUpdate {
                    wg_port: 51820,
                    ..Default::default()
                },
            )
            .unwrap();
            self.conn_of.insert(dev, self.last_conn);
        }

        /// The device closes its session.
        fn close(&mut self, r: &mut Registry, dev: u64) {
            if let Some(c) = self.conn_of.get(&dev).copied() {
                r.handle_session_closed(DeviceId(dev), c);
                self.gone(dev);
            }
        }

        /// The registry closed the device's session (a revocation).
        fn gone(&mut self, dev: u64) {
            if let Some(c) = self.conn_of.remove(&dev) {
                self.held.remove(&c);
                self.closed.insert(c);
            }
        }

        fn take(&mut self, r: &mut Registry, n: usize) {
            take_netmaps(r, &mut self.held, &self.closed, n);
        }
    }

    /// Takes up to `n` outputs, keeping each open session's netmap as its deltas build it
    /// (outputs for closed connections are dropped, as a driver drops them).
    fn take_netmaps(
        r: &mut Registry,
        held: &mut BTreeMap<ConnId, Netmap>,
        closed: &BTreeSet<ConnId>,
        n: usize,
    ) {
        for _ in 0..n {
            let Some(o) = r.poll_output() else { break };
            if let Output::Send { conn, msg } = o {
                if closed.contains(&conn) {
                    continue;
                }
                match msg {
                    CoordinatorMsg::Netmap(nm) => {
                        held.insert(conn, nm);
                    }
                    CoordinatorMsg::NetmapDelta(d) => {
                        let nm = held.get_mut(&conn).expect("a delta after a netmap");
                        nm.apply(&d).expect("the delta applies");
                    }
                    _ => {}
                }
            }
        }
    }

    /// The peers device `dev`'s session (connection `c`) holds from its deltas, and those a
    /// fresh session of the device is sent now (its session is closed and opened again).
    fn held_and_fresh(
        r: &mut Registry,
        held: &mut BTreeMap<ConnId, Netmap>,
        closed: &BTreeSet<ConnId>,
        dev: u64,
        c: ConnId,
    ) -> (Vec<Peer>, Vec<Peer>) {
        let got = held.get(&c).map(|nm| nm.peers.clone()).unwrap_or_default();
        r.handle_session_closed(DeviceId(dev), c);
        take_netmaps(r, held, closed, usize::MAX);
        r.handle_session_opened(
            DeviceId(dev),
            c,
            addr(&format!("10.0.0.{dev}:4000")),
            DeviceUpdate {
                wg_port: 51820,
                ..Default::default()
            },
        )
        .unwrap();
        held.remove(&c);
        take_netmaps(r, held, closed, usize::MAX);
        let fresh = held.get(&c).map(|nm| nm.peers.clone()).unwrap_or_default();
        (got, fresh)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the order of churn (sessions opening and closing, endpoints changing, a
        /// device revoked) and
        /// however many outputs are taken between changes (sessions left pending across
        /// recomputes), every session's netmap built from its deltas has the peers a fresh
        /// session would be sent.
        #[test]
        fn deltas_keep_every_session_equal_to_a_fresh_netmap(
            steps in proptest::collection::vec((0u8..4, 1u64..6, 0u16..4, 0usize..8), 1..30)
        ) {
            let mut r = reg(&[1, 2, 3, 4, 5]);
            let mut ch = Churn::default();
            let mut removed: BTreeSet<u64> = BTreeSet::new();
            for (what, dev, port, outputs) in steps {
                match what {
                    0 if !removed.contains(&dev) => ch.open(&mut r, dev),
                    1 => ch.close(&mut r, dev),
                    3 if dev == 5 => {
                        // A revocation: the session is closed by the registry.
                        r.handle_device_removed(DeviceId(dev), "revoked");
                        removed.insert(dev);
                        ch.gone(dev);
                    }
                    _ => {
                        if let Some(&c) = ch.conn_of.get(&dev) {
                            r.handle_session_update(
                                DeviceId(dev),
                                c,
                                DeviceUpdate {
                                    wg_port: 51820 + port,
                                    local_endpoints: vec![addr(&format!("192.168.1.{dev}:{}", 51820 + port))],
                                    ..Default::default()
                                },
                            );
                        }
                    }
                }
                ch.take(&mut r, outputs);
            }
            ch.take(&mut r, usize::MAX);
            for (dev, c) in ch.conn_of.clone() {
                let (got, fresh) = held_and_fresh(&mut r, &mut ch.held, &ch.closed, dev, c);
                proptest::prop_assert_eq!(got, fresh, "device {}", dev);
            }
        }
    }

    /// Applies a netmap or delta output to what each connection holds.
    fn apply_output(held: &mut BTreeMap<ConnId, Netmap>, o: &Output) {
        match o {
            Output::Send {
                conn,
                msg: CoordinatorMsg::Netmap(nm),
            } => {
                held.insert(*conn, nm.clone());
            }
            Output::Send {
                conn,
                msg: CoordinatorMsg::NetmapDelta(d),
            } => held
                .get_mut(conn)
                .expect("a netmap first")
                .apply(d)
                .expect("applies"),
            _ => {}
        }
    }

    /// Device `id` under an admin's quarantine.
    fn quarantined(id: u64) -> Device {
        let mut d = dev(id);
        d.quarantine = Some(crate::store::Quarantine {
            since_ms: 0,
            reason: "test".into(),
            automatic: false,
        });
        d
    }

    /// A destination list's members are found by bit set, and past the bit set's bound by
    /// search: either way exactly the list's devices.
    #[test]
    fn list_members_are_exactly_the_list_s_devices() {
        let dest = |id: u64| ReachDest {
            device_id: DeviceId(id),
            hostname: Hostname::parse(&format!("h{id}")).unwrap(),
        };
        let big = ListMembers::MAX_BIT + 5;
        let small: Arc<[ReachDest]> = [1, 64, 65, 200].map(dest).into();
        let wide: Arc<[ReachDest]> = [3, big].map(dest).into();
        let empty: Arc<[ReachDest]> = Vec::new().into();
        let mut m = ListMembers::default();
        for id in 0..300 {
            assert_eq!(
                m.contains(&small, DeviceId(id)),
                [1, 64, 65, 200].contains(&id),
                "{id}"
            );
        }
        assert!(!m.contains(&small, DeviceId(big)));
        assert!(m.contains(&wide, DeviceId(3)) && m.contains(&wide, DeviceId(big)));
        assert!(!m.contains(&wide, DeviceId(4)));
        assert!(!m.contains(&empty, DeviceId(1)));
        m.clear();
        assert!(m.contains(&small, DeviceId(65)));
        // Two lists compared by the devices they name, once a pair.
        let twin: Arc<[ReachDest]> = [1, 64, 65, 200].map(dest).into();
        for _ in 0..2 {
            assert!(m.same_devices(&small, &small) && m.same_devices(&small, &twin));
            assert!(!m.same_devices(&small, &wide) && !m.same_devices(&wide, &small));
        }
        assert_eq!(
            m.same.len(),
            3,
            "the pair of one list with itself is not kept"
        );
    }

    /// A quarantined device that the policy would let reach every service on 200 devices is
    /// told what is withheld in a verdict of bounded size: at most `MAX_UNAVAILABLE` entries,
    /// one for each withheld service and rule first, and the rest counted (at 10 000 devices
    /// the whole list would be megabytes, more than a device accepts in one frame).
    #[test]
    fn a_verdict_lists_withheld_access_up_to_a_bound_and_counts_the_rest() {
        let p = policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.ssh]
devices = ["group:eng"]
ports = ["tcp/22"]
[services.web]
devices = ["group:eng"]
ports = ["tcp/443"]
[[rules]]
name = "ssh"
from = ["group:eng"]
to = ["ssh"]
[[rules]]
name = "web"
from = ["group:eng"]
to = ["web"]
"#,
            "test.toml",
        )
        .unwrap();
        let devices = (1..=200).map(|i| if i == 1 { quarantined(1) } else { dev(i) });
        let r = Registry::new(
            AddressPools::from_random([0; 5]),
            devices,
            [],
            Some(p),
            vec![],
            vec![],
            0,
        );
        let v = r.trust_view(DeviceId(1));
        let max = ward_shared::wire::MAX_UNAVAILABLE;
        assert_eq!(v.unavailable.len(), max);
        // 199 other devices, two services each.
        assert_eq!(v.unavailable.len() as u64 + v.unavailable_more, 2 * 199);
        for svc in ["ssh", "web"] {
            assert!(
                v.unavailable
                    .iter()
                    .any(|u| u.service == svc && u.rule == svc),
                "{svc} is named among the kept entries"
            );
        }
        assert!(
            v.unavailable.windows(2).all(|w| w[0] < w[1]),
            "sorted, once each"
        );
        assert!(v.lines().iter().any(|l| l.contains("and 142 more")));
    }

    /// Two teams of three devices, each team the other's stranger: a change to one device
    /// concerns its own team's sessions only.
    fn two_teams() -> Registry {
        teams_under(
            br#"
[groups]
a = ["alice"]
b = ["bob"]
[services.a]
devices = ["group:a"]
ports = ["tcp/22"]
[services.b]
devices = ["group:b"]
ports = ["tcp/22"]
[[rules]]
from = ["group:a"]
to = ["a"]
[[rules]]
from = ["group:b"]
to = ["b"]
"#,
        )
    }

    /// Devices 1–3 of alice (group a) and 4–6 of bob (group b), under `policy`.
    fn teams_under(policy: &[u8]) -> Registry {
        let team = |id: u64| {
            let mut d = dev(id);
            d.user = Some(if id <= 3 { "alice" } else { "bob" }.into());
            d
        };
        let p = policy::parse(policy, "test.toml").unwrap();
        Registry::new(
            AddressPools::from_random([0; 5]),
            (1..=6).map(team),
            [],
            Some(p),
            vec![],
            vec![],
            0,
        )
    }

    fn lease_until(id: u64, key: u8, serial: u64, not_after_ms: i64) -> SignedLease {
        let mut l = lease_on(id, [key; 32], serial);
        l.lease.not_after_ms = not_after_ms;
        l
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        /// Changes that the compile does not read (sessions opening and closing, endpoints,
        /// leases issued, revoked and running out, a device's row read back with a new
        /// last-seen time and endpoints) refresh only the views they touch and
        /// queue only the sessions they concern; whatever their order, and however many
        /// outputs are taken between them, every session's netmap built from its deltas has
        /// exactly the peers (keys, leases, endpoints, online) a fresh session would be sent,
        /// and nothing was compiled again.
        #[test]
        fn changes_outside_the_compile_keep_every_session_equal_to_a_fresh_netmap(
            steps in proptest::collection::vec((0u8..7, 1u64..7, 0u16..4, 0usize..8), 1..40)
        ) {
            let mut r = two_teams();
            drain(&mut r);
            let compiles = r.compiles();
            let mut ch = Churn::default();
            let (mut serial, mut now): (u64, i64) = (0, 0);
            for (what, dev, x, outputs) in steps {
                match what {
                    0 => ch.open(&mut r, dev),
                    1 => ch.close(&mut r, dev),
                    2 => {
                        if let Some(&c) = ch.conn_of.get(&dev) {
                            r.handle_session_update(
                                DeviceId(dev),
                                c,
                                DeviceUpdate {
                                    wg_port: 51820 + x,
                                    local_endpoints: vec![addr(&format!("192.168.1.{dev}:{}", 51820 + x))],
                                    ..Default::default()
                                },
                            );
                        }
                    }
                    3 => {
                        // A rotation's new lease, on a key of this device's own.
                        serial += 1;
                        let key = u8::try_from(dev * 16 + serial % 16).unwrap();
                        r.handle_lease(lease_until(dev, key, serial, now + 1_000 + i64::from(x) * 1_000));
                    }
                    4 => {
                        // The rotation ends: the device's oldest lease is revoked.
                        let oldest = r.leases.of(DeviceId(dev)).first().map(|l| l.lease.serial);
                        if let Some(s) = oldest {
                            r.handle_leases_revoked(DeviceId(dev), &[s]);
                        }
                    }
                    5 => {
                        // Time passes: leases run out.
                        now += 1_000;
                        r.handle_time(now);
                    }
                    _ => {
                        // The device's row read back from the store (the change feed after
                        // a lease): a newer last-seen time and stored endpoints.
                        if let Some(d) = r.devices.get(&DeviceId(dev)) {
                            let mut row = d.clone();
                            row.last_seen_ms += 1_000;
                            row.endpoints = vec![addr(&format!("172.16.0.{dev}:{}", 41000 + x))];
                            r.handle_device_upserted(row);
                        }
                    }
                }
                ch.take(&mut r, outputs);
            }
            ch.take(&mut r, usize::MAX);
            proptest::prop_assert_eq!(r.compiles(), compiles, "nothing the compile reads changed");
            for (dev, c) in ch.conn_of.clone() {
                let (got, fresh) = held_and_fresh(&mut r, &mut ch.held, &ch.closed, dev, c);
                proptest::prop_assert_eq!(got, fresh, "device {}", dev);
            }
        }
    }

    /// Two teams of three devices, each reaching its own team, and team a reaching team b's
    /// remediation service (open to quarantined devices).
    fn two_teams_with_remediation() -> Registry {
        teams_under(
            br#"
[groups]
a = ["alice"]
b = ["bob"]
[services.a]
devices = ["group:a"]
ports = ["tcp/22"]
[services.b]
devices = ["group:b"]
ports = ["tcp/22"]
[services.fix]
devices = ["group:b"]
ports = ["tcp/443"]
remediation = true
[[rules]]
from = ["group:a"]
to = ["a", "fix"]
[[rules]]
from = ["group:b"]
to = ["b"]
"#,
        )
    }

    /// Which of `addrs` each inbound rule of `nm` admits, by rule, service, protocol and
    /// ports: the filter's meaning, whatever peer sets carry it.
    fn admitted(
        nm: &Netmap,
        addrs: &[IpAddr],
    ) -> BTreeSet<(
        String,
        String,
        String,
        Vec<ward_shared::filter::PortRange>,
        IpAddr,
    )> {
        let sets: BTreeMap<u32, &Vec<Prefix>> =
            nm.peer_sets.iter().map(|s| (s.id, &s.prefixes)).collect();
        let mut out = BTreeSet::new();
        for r in nm.inbound.iter() {
            for a in addrs {
                let by_set = r
                    .source_sets
                    .iter()
                    .any(|id| sets.get(id).is_some_and(|p| peerset::contains(p, *a)));
                if r.sources.contains(a) || by_set {
                    out.insert((
                        r.rule.clone(),
                        r.service.clone(),
                        format!("{:?}", r.proto),
                        r.ports.clone(),
                        *a,
                    ));
                }
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        /// Changes the compile reads (devices quarantined and released, devices revoked),
        /// mixed with sessions opening and closing and endpoints changing, in any order and
        /// with any number of outputs taken between them: the sessions a recompute leaves
        /// alone as already up to date, and those it brings up to date, all hold what a fresh
        /// session would be sent: the same peers, and a filter admitting exactly the same
        /// devices to the same services.
        #[test]
        fn trust_changes_keep_every_session_equal_to_a_fresh_netmap(
            steps in proptest::collection::vec((0u8..6, 1u64..7, 0u16..4, 0usize..8), 1..40)
        ) {
            let mut r = two_teams_with_remediation();
            drain(&mut r);
            let addrs: Vec<IpAddr> = r
                .devices
                .values()
                .flat_map(|d| [IpAddr::V4(d.ipv4), IpAddr::V6(d.ipv6)])
                .collect();
            let mut ch = Churn::default();
            let mut removed: BTreeSet<u64> = BTreeSet::new();
            for (what, dev, x, outputs) in steps {
                match what {
                    0 if !removed.contains(&dev) => ch.open(&mut r, dev),
                    1 => ch.close(&mut r, dev),
                    2 | 3 => {
                        // Quarantined (2) or released (3).
                        if let Some(d) = r.devices.get(&DeviceId(dev)) {
                            let mut row = d.clone();
                            row.quarantine = (what == 2).then(|| crate::model::Quarantine {
                                since_ms: 1,
                                reason: "test".into(),
                                automatic: false,
                            });
                            r.handle_device_upserted(row);
                        }
                    }
                    4 if dev == 6 || dev == 3 => {
                        r.handle_device_removed(DeviceId(dev), "revoked");
                        removed.insert(dev);
                        ch.gone(dev);
                    }
                    _ => {
                        if let Some(&c) = ch.conn_of.get(&dev) {
                            r.handle_session_update(
                                DeviceId(dev),
                                c,
                                DeviceUpdate {
                                    wg_port: 51820 + x,
                                    ..Default::default()
                                },
                            );
                        }
                    }
                }
                ch.take(&mut r, outputs);
            }
            ch.take(&mut r, usize::MAX);
            for (dev, c) in ch.conn_of.clone() {
                let got = ch.held.get(&c).map(|nm| admitted(nm, &addrs)).unwrap_or_default();
                let (got_peers, fresh_peers) = held_and_fresh(&mut r, &mut ch.held, &ch.closed, dev, c);
                let fresh = ch.held.get(&c).map(|nm| admitted(nm, &addrs)).unwrap_or_default();
                proptest::prop_assert_eq!(got_peers, fresh_peers, "device {}", dev);
                proptest::prop_assert_eq!(got, fresh, "device {}", dev);
            }
        }
    }

    /// A quarantine concerns the sessions whose access it changes: the other team's sessions
    /// are found up to date with the new compile and not produced.
    #[test]
    fn a_quarantine_leaves_the_other_teams_sessions_alone() {
        let mut r = two_teams();
        open_sessions(&mut r, &[1, 2, 3, 4, 5, 6]);
        drain(&mut r);
        let carried = r.sessions_carried();
        let mut row = r.devices[&DeviceId(1)].clone();
        row.quarantine = Some(crate::model::Quarantine {
            since_ms: 1,
            reason: "test".into(),
            automatic: false,
        });
        r.handle_device_upserted(row);
        let out = drain(&mut r);
        assert_eq!(r.sessions_carried() - carried, 3, "team b's three sessions");
        let told: BTreeSet<ConnId> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send { conn, .. } => Some(*conn),
                _ => None,
            })
            .collect();
        assert!(told.is_subset(&BTreeSet::from([10, 20, 30])), "{told:?}");
        assert!(told.contains(&20) && told.contains(&30), "{told:?}");
    }

    /// A key rotation reaches the sessions that hold the device as a peer and no other: the
    /// other team's sessions get nothing and are not produced at all.
    #[test]
    fn a_rotation_concerns_only_the_sessions_holding_the_device() {
        let mut r = two_teams();
        open_sessions(&mut r, &[1, 2, 3, 4, 5, 6]);
        drain(&mut r);
        r.handle_lease(lease_until(1, 9, 1, 600_000));
        r.recompute_touched();
        let queued: Vec<DeviceId> = r.pending.iter().copied().collect();
        assert_eq!(queued, [DeviceId(1), DeviceId(2), DeviceId(3)]);
        let out = drain(&mut r);
        let told: BTreeSet<ConnId> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send {
                    conn,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } if d.upsert.iter().any(|p| p.device_id == DeviceId(1)) => Some(*conn),
                _ => None,
            })
            .collect();
        assert_eq!(told, BTreeSet::from([20, 30]), "{out:?}");
        assert!(
            !out.iter().any(|o| matches!(
                o,
                Output::Send {
                    conn: 40 | 50 | 60,
                    ..
                }
            )),
            "{out:?}"
        );
        // The other team's sessions were marked up to date: the next change to one of them
        // is still judged from the changed peers alone.
        let gen = r.views_gen;
        assert!([4, 5, 6].iter().all(|d| r.sessions[&DeviceId(*d)]
            .sent
            .as_ref()
            .is_some_and(|s| s.views_gen == gen)));
    }

    #[test]
    fn the_views_log_answers_for_the_refreshes_it_still_holds() {
        let ids = |v: &[u64]| v.iter().map(|i| DeviceId(*i)).collect::<Vec<_>>();
        let mut r = reg(&[1, 2, 3]);
        let start = r.views_gen;
        r.views_moved(ids(&[2, 3]));
        r.views_moved(Vec::new());
        r.views_moved(ids(&[1, 3]));
        let now = r.views_gen;
        assert_eq!(now, start + 2, "an empty refresh is no generation");
        const ALL: usize = usize::MAX / 8;
        let log = &r.views_log;
        assert_eq!(views_changed_since(log, now, now, ALL), Some(Vec::new()));
        assert_eq!(
            views_changed_since(log, now - 1, now, ALL),
            Some(ids(&[1, 3]))
        );
        assert_eq!(
            views_changed_since(log, now - 2, now, ALL),
            Some(ids(&[1, 2, 3]))
        );
        // More changed devices than the session's limit: walk its peers instead.
        assert_eq!(
            views_changed_since(log, now - 2, now, 3),
            Some(ids(&[1, 2, 3]))
        );
        assert_eq!(views_changed_since(log, now - 2, now, 2), None);
        assert_eq!(views_changed_since(log, now - 2, now, 0), None);
        // Beyond the log's bound the oldest refreshes are forgotten: a session that old
        // walks all its peers.
        for i in 0..VIEWS_LOG_GENS as u64 {
            r.views_moved(ids(&[i % 3 + 1]));
        }
        assert_eq!(r.views_log.len(), VIEWS_LOG_GENS);
        assert!(views_changed_since(&r.views_log, now, r.views_gen, ALL).is_some());
        assert_eq!(
            views_changed_since(&r.views_log, now - 1, r.views_gen, ALL),
            None
        );
        assert!(views_changed_since(&r.views_log, r.views_gen - 5, r.views_gen, ALL).is_some());
        // A refresh naming more devices than the bound is kept alone.
        r.views_moved((1..=VIEWS_LOG_IDS as u64 + 1).map(DeviceId).collect());
        assert_eq!(r.views_log.len(), 1);
        assert_eq!(
            views_changed_since(&r.views_log, r.views_gen - 2, r.views_gen, ALL),
            None
        );
    }

    /// What device 1's session (connection 10) was sent about `peer`, per netmap or delta
    /// that names it, in order.
    fn told_about(out: &[Output], peer: u64) -> Vec<&Peer> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    conn: 10,
                    msg: CoordinatorMsg::Netmap(nm),
                } => nm.peers.iter().find(|p| p.device_id.0 == peer),
                Output::Send {
                    conn: 10,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } => d.upsert.iter().find(|p| p.device_id.0 == peer),
                _ => None,
            })
            .collect()
    }

    /// `online` as device 1's session was told it about `peer`.
    fn told_online(out: &[Output], peer: u64) -> Vec<bool> {
        told_about(out, peer).iter().map(|p| p.online).collect()
    }

    #[test]
    fn devices_held_before_a_restart_stay_online_while_they_reconnect() {
        let now = 1_000_000;
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [1, 2, 3, 4].map(dev),
            [],
            Some(open_policy()),
            vec![],
            vec![],
            now,
        );
        // The process before held 1, 2 and 4 (and 9, a device no longer live), not 3.
        r.presume_online([1, 2, 4, 9].map(DeviceId), 120_000);
        assert_eq!(r.presumed_online(), 3);
        assert_eq!(r.poll_timeout(), Some(now + 120_000));
        open_sessions(&mut r, &[1]);
        let out = drain(&mut r);
        assert_eq!(
            told_online(&out, 2),
            [true],
            "presumed online in the first netmap"
        );
        assert_eq!(told_online(&out, 3), [false], "not held before: offline");
        assert_eq!(told_online(&out, 4), [true]);

        // 2 comes back: nothing to tell 1 about it.
        open_sessions(&mut r, &[2]);
        let out = drain(&mut r);
        assert!(told_online(&out, 2).is_empty(), "{out:?}");
        assert_eq!(r.presumed_online(), 1);

        // 2 leaves again: by its own session, so offline at once.
        r.handle_session_closed(DeviceId(2), 20);
        assert_eq!(told_online(&drain(&mut r), 2), [false]);

        // 4 never came back: offline when the grace ends, not before.
        r.handle_time(now + 119_000);
        assert!(told_online(&drain(&mut r), 4).is_empty());
        r.handle_time(now + 120_000);
        assert_eq!(told_online(&drain(&mut r), 4), [false]);
        assert_eq!(r.presumed_online(), 0);
        assert!(!r.is_online_anywhere(DeviceId(4)));
    }

    #[test]
    fn a_presumed_device_that_is_revoked_is_gone_not_online() {
        let now = 1_000_000;
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [1, 2].map(dev),
            [],
            Some(open_policy()),
            vec![],
            vec![],
            now,
        );
        r.presume_online([1, 2].map(DeviceId), 120_000);
        open_sessions(&mut r, &[1]);
        drain(&mut r);
        r.handle_device_removed(DeviceId(2), "revoked");
        let out = drain(&mut r);
        assert!(
            out.iter().any(|o| matches!(o, Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) } if d.remove.contains(&DeviceId(2)))),
            "{out:?}"
        );
        assert!(!r.is_online_anywhere(DeviceId(2)));
    }

    #[test]
    fn a_revocation_read_back_from_the_store_recomputes_nothing() {
        let mut r = reg(&[1, 2, 3]);
        open_sessions(&mut r, &[1, 2, 3]);
        drain(&mut r);
        r.handle_device_removed(DeviceId(3), "revoked");
        let out = drain(&mut r);
        assert!(
            out.iter().any(|o| matches!(o, Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) } if d.remove.contains(&DeviceId(3)))),
            "{out:?}"
        );
        let recomputes = r.recomputes();
        // The revoked row comes back (the change feed), and the notice twice: nothing to do.
        let mut row = dev(3);
        row.status = crate::model::DeviceStatus::Revoked;
        row.revoked_ms = Some(1);
        r.handle_device_upserted(row);
        r.handle_device_removed(DeviceId(3), "revoked");
        assert_eq!(drain(&mut r), vec![]);
        assert_eq!(
            r.recomputes(),
            recomputes,
            "nothing changed, nothing compiled"
        );
        // A removal that does change something still compiles.
        r.handle_device_removed(DeviceId(2), "revoked");
        assert!(!drain(&mut r).is_empty());
        assert_eq!(r.recomputes(), recomputes + 1);
    }

    #[test]
    fn full_netmap_then_deltas() {
        let mut r = reg(&[1, 2, 3]);
        r.handle_session_opened(
            DeviceId(1),
            10,
            addr("10.0.0.1:4000"),
            DeviceUpdate {
                wg_port: 51820,
                ..Default::default()
            },
        )
        .unwrap();
        let out = drain(&mut r);
        assert_eq!(out.len(), 1);
        let Output::Send {
            conn: 10,
            msg: CoordinatorMsg::Netmap(nm),
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!(
            nm.peers.iter().map(|p| p.device_id.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(nm.peers.iter().all(|p| !p.online));
        assert_eq!(
            nm.dns_domain.as_ref().map(|d| d.as_str()),
            Some(ward_shared::names::DEFAULT_DNS_DOMAIN),
            "the full netmap carries the DNS domain"
        );

        // Device 2 comes online: device 1 gets a delta with 2 online and its endpoint.
        r.handle_session_opened(
            DeviceId(2),
            11,
            addr("10.0.0.2:5000"),
            DeviceUpdate {
                wg_port: 51820,
                local_endpoints: vec![addr("192.168.1.5:51820"), addr("0.0.0.0:1")],
                ..Default::default()
            },
        )
        .unwrap();
        let out = drain(&mut r);
        let delta = out
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    conn: 10,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } => Some(d.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(delta.base_seq, 1);
        assert_eq!(delta.upsert.len(), 1);
        assert!(delta.upsert[0].online);
        assert_eq!(
            delta.upsert[0].endpoints,
            vec![addr("10.0.0.2:51820"), addr("192.168.1.5:51820")]
        );
        // Nothing changed: nothing sent.
        r.handle_session_update(
            DeviceId(2),
            11,
            DeviceUpdate {
                wg_port: 51820,
                local_endpoints: vec![addr("192.168.1.5:51820")],
                ..Default::default()
            },
        );
        assert!(drain(&mut r).is_empty());
    }

    #[test]
    fn a_stored_row_does_not_replace_the_contact_of_a_live_session() {
        let mut r = reg(&[1, 2]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        r.handle_session_opened(
            DeviceId(2),
            11,
            addr("10.0.0.2:5000"),
            DeviceUpdate {
                wg_port: 51820,
                local_endpoints: vec![addr("192.168.1.5:51820")],
                ..Default::default()
            },
        )
        .unwrap();
        drain(&mut r);
        let live = r.devices[&DeviceId(2)].endpoints.clone();
        assert_eq!(
            live,
            vec![addr("10.0.0.2:51820"), addr("192.168.1.5:51820")]
        );
        // The stored row lags behind the session (contact is written in batches).
        let mut stale = r.devices[&DeviceId(2)].clone();
        stale.endpoints.clear();
        r.handle_device_upserted(stale);
        assert_eq!(r.devices[&DeviceId(2)].endpoints, live);
        // Without a session here, the stored row is all this registry knows.
        r.handle_session_closed(DeviceId(2), 11);
        let mut stored = r.devices[&DeviceId(2)].clone();
        stored.endpoints = vec![addr("10.9.9.9:51820")];
        r.handle_device_upserted(stored);
        assert_eq!(
            r.devices[&DeviceId(2)].endpoints,
            vec![addr("10.9.9.9:51820")]
        );
    }

    #[test]
    fn a_mapped_observed_address_is_given_to_peers_as_ipv4() {
        let mut r = reg(&[1, 2]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        drain(&mut r);
        r.handle_session_opened(
            DeviceId(2),
            11,
            addr("[::ffff:10.0.0.2]:5000"),
            DeviceUpdate {
                wg_port: 51820,
                // The reflexive address a relay reported: the same endpoint, not a second one.
                local_endpoints: vec![addr("10.0.0.2:51820"), addr("192.168.1.5:51820")],
                ..Default::default()
            },
        )
        .unwrap();
        let eps = drain(&mut r)
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    conn: 10,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } => Some(d.upsert[0].endpoints.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(eps, vec![addr("10.0.0.2:51820"), addr("192.168.1.5:51820")]);
    }

    #[test]
    fn relays_reach_every_session_once() {
        let mut r = reg(&[1, 2, 3]);
        for (id, conn) in [(1, 10), (2, 11)] {
            r.handle_session_opened(
                DeviceId(id),
                conn,
                addr("10.0.0.1:1"),
                DeviceUpdate::default(),
            )
            .unwrap();
        }
        drain(&mut r);
        let relays = vec![RelayInfo {
            name: "r1".into(),
            addr: "relay.example.com:3478".into(),
        }];
        r.handle_relays(relays.clone());
        let out = drain(&mut r);
        let mut got: Vec<ConnId> = out
            .iter()
            .map(|o| match o {
                Output::Send {
                    conn,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } => {
                    assert_eq!(d.relays.as_ref(), Some(&relays), "{d:?}");
                    assert!(d.upsert.is_empty() && d.remove.is_empty());
                    assert!(d.inbound.is_none() && d.reach.is_none());
                    *conn
                }
                o => panic!("{o:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(got, vec![10, 11]);
        // The same list again: nothing to send.
        r.handle_relays(relays.clone());
        assert!(drain(&mut r).is_empty());
        // A device connecting later gets the list in its full netmap.
        r.handle_session_opened(DeviceId(3), 12, addr("10.0.0.3:1"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        let full = out
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    conn: 12,
                    msg: CoordinatorMsg::Netmap(nm),
                } => Some(nm.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(full.relays, relays);
        // Other devices' deltas about device 3 do not repeat the relay list.
        for o in &out {
            if let Output::Send {
                msg: CoordinatorMsg::NetmapDelta(d),
                ..
            } = o
            {
                assert!(d.relays.is_none(), "{d:?}");
            }
        }
        // Removing the last relay sends the empty list.
        r.handle_relays(vec![]);
        let out = drain(&mut r);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|o| matches!(o,
            Output::Send { msg: CoordinatorMsg::NetmapDelta(d), .. } if d.relays == Some(vec![]))));
    }

    #[test]
    fn revocation_closes_session_and_removes_from_peers() {
        let mut r = reg(&[1, 2]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        r.handle_session_opened(DeviceId(2), 11, addr("10.0.0.2:1"), DeviceUpdate::default())
            .unwrap();
        drain(&mut r);
        r.handle_device_removed(DeviceId(2), "the device has been revoked");
        let out = drain(&mut r);
        assert!(out.contains(&Output::Close {
            conn: 11,
            code: ErrorCode::DeviceRevoked,
            reason: "the device has been revoked".into()
        }));
        assert!(out.iter().any(|o| matches!(o, Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) } if d.remove == vec![DeviceId(2)])));
        // A revoked device cannot open a session.
        assert_eq!(
            r.handle_session_opened(DeviceId(2), 12, addr("10.0.0.2:1"), DeviceUpdate::default()),
            Err(ErrorCode::DeviceRevoked)
        );
        // A disabled user's device is removed too.
        let mut d1 = dev(1);
        d1.user_disabled = true;
        r.handle_device_upserted(d1);
        let out = drain(&mut r);
        assert!(matches!(&out[0], Output::Close { conn: 10, .. }));
    }

    #[test]
    fn peers_hear_of_a_revocation_before_the_compile_that_follows_it() {
        let mut r = reg(&[1, 2, 3]);
        open_sessions(&mut r, &[1, 2, 3]);
        drain(&mut r);
        let compiles = r.compiles;
        r.handle_device_removed(DeviceId(2), "the device has been revoked");
        let mut told = BTreeSet::new();
        let mut closed = false;
        while told.len() < 2 {
            let o = r.poll_output().expect("the peers are told");
            match o {
                Output::Close { conn: 20, .. } => closed = true,
                Output::Send {
                    conn,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } if d.remove == vec![DeviceId(2)] => {
                    assert!(closed, "the revoked session is closed first");
                    told.insert(conn);
                }
                _ => {}
            }
        }
        assert_eq!(told, BTreeSet::from([10, 30]));
        assert_eq!(r.compiles, compiles, "told before compiling");
        // The compile follows, and removes nothing twice.
        let rest = drain(&mut r);
        assert_eq!(r.compiles, compiles + 1);
        assert!(!rest.iter().any(|o| matches!(o, Output::Send { msg: CoordinatorMsg::NetmapDelta(d), .. } if !d.remove.is_empty())), "{rest:?}");
    }

    #[test]
    fn a_quarantined_device_s_peers_are_told_before_its_verdict_is_worked_out() {
        let mut r = reg(&[1, 2, 3]);
        open_sessions(&mut r, &[1, 2, 3]);
        std::iter::from_fn(|| r.poll_output()).for_each(drop);
        let mut q = dev(2);
        q.quarantine = Some(crate::store::Quarantine {
            since_ms: 0,
            reason: "test".into(),
            automatic: false,
        });
        r.handle_device_upserted(q);
        let out: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        let at = |f: &dyn Fn(&Output) -> bool| out.iter().position(f);
        let verdict = at(&|o| matches!(o, Output::Send { conn: 20, msg: CoordinatorMsg::PostureVerdict(v) } if v.quarantine.is_some()))
            .expect("the quarantined device is told why");
        for conn in [10, 30] {
            // The peers may still reach it; it is no source of theirs any more.
            let told = at(&|o| matches!(o, Output::Send { conn: c, msg: CoordinatorMsg::NetmapDelta(d) } if *c == conn && !d.peer_sets.is_empty()))
                .unwrap_or_else(|| panic!("no delta for {conn}: {out:?}"));
            assert!(
                told < verdict,
                "peer {conn} told at {told}, the verdict at {verdict}: {out:?}"
            );
        }
    }

    /// Under a stream of changes that keeps netmaps pending (an endpoint change with every
    /// output taken), a quarantined device still learns its verdict, after a bounded number
    /// of other sessions' netmap changes.
    #[test]
    fn a_verdict_goes_out_while_changes_keep_netmaps_pending() {
        let ids: Vec<u64> = (1..=40).collect();
        let mut r = reg(&ids);
        open_sessions(&mut r, &ids);
        std::iter::from_fn(|| r.poll_output()).for_each(drop);
        let mut q = dev(2);
        q.quarantine = Some(crate::store::Quarantine {
            since_ms: 0,
            reason: "test".into(),
            automatic: false,
        });
        r.handle_device_upserted(q);
        let mut told_at = None;
        for step in 0..5_000u16 {
            let d = 3 + u64::from(step % 38);
            r.handle_session_update(
                DeviceId(d),
                d * 10,
                DeviceUpdate {
                    wg_port: 40_000 + step,
                    ..Default::default()
                },
            );
            let Some(o) = r.poll_output() else {
                break;
            };
            if matches!(&o, Output::Send { conn: 20, msg: CoordinatorMsg::PostureVerdict(v) } if v.quarantine.is_some())
            {
                told_at = Some(step);
                break;
            }
        }
        let step = told_at.expect("the quarantined device is told, changes or not");
        assert!(step < 2_000, "told after {step} outputs");
    }

    /// A quarantined device is produced first by the compile that follows its peers'
    /// narrowing, so it learns why within [`VERDICT_EVERY`] other sessions' changes, not
    /// after every session's (it has the highest id of 80: last in id order).
    #[test]
    fn a_quarantined_device_learns_its_verdict_ahead_of_the_other_sessions_changes() {
        let p = policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.all]
devices = ["group:eng"]
ports = ["tcp/*"]
[services.patch]
devices = ["group:eng"]
ports = ["tcp/8530"]
remediation = true
[[rules]]
from = ["group:eng"]
to = ["all", "patch"]
"#,
            "test.toml",
        )
        .unwrap();
        let ids: Vec<u64> = (1..=80).collect();
        let mut r = reg(&ids);
        r.handle_policy(p);
        open_sessions(&mut r, &ids);
        std::iter::from_fn(|| r.poll_output()).for_each(drop);
        let compiles = r.compiles;
        let mut q = dev(80);
        q.quarantine = Some(crate::store::Quarantine {
            since_ms: 0,
            reason: "test".into(),
            automatic: false,
        });
        r.handle_device_upserted(q);
        let (mut before_verdict, mut after_compile, mut told) = (0, 0, false);
        while let Some(o) = r.poll_output() {
            match o {
                Output::Send {
                    conn: 800,
                    msg: CoordinatorMsg::PostureVerdict(v),
                } if v.quarantine.is_some() => told = true,
                Output::Send {
                    msg: CoordinatorMsg::NetmapDelta(_),
                    ..
                } if r.compiles > compiles => {
                    after_compile += 1;
                    if !told {
                        before_verdict += 1;
                    }
                }
                _ => {}
            }
        }
        assert!(told, "the quarantined device is told why");
        assert!(
            after_compile > VERDICT_EVERY + 1,
            "the compile changes {after_compile} sessions: too few to tell the order"
        );
        assert!(
            before_verdict <= VERDICT_EVERY + 1,
            "{before_verdict} of the compile's {after_compile} changes went out before the verdict"
        );
    }

    /// A quarantined device leaves every peer's filter in the first message each peer gets,
    /// before any compile; the compile that follows lets it back into the remediation service
    /// only, and each peer's filter ends where a fresh session's would be.
    #[test]
    fn a_quarantine_is_enforced_by_every_peer_before_the_compile() {
        let p = policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.all]
devices = ["group:eng"]
ports = ["tcp/*"]
[services.patch]
devices = ["group:eng"]
ports = ["tcp/8530"]
remediation = true
[[rules]]
from = ["group:eng"]
to = ["all", "patch"]
"#,
            "test.toml",
        )
        .unwrap();
        let mut r = reg(&[1, 2, 3]);
        r.handle_policy(p);
        open_sessions(&mut r, &[1, 2, 3]);
        let mut held: BTreeMap<ConnId, Netmap> = BTreeMap::new();
        for o in drain(&mut r) {
            apply_output(&mut held, &o);
        }
        let q: IpAddr = "100.64.0.2".parse().unwrap();
        // Which services of `conn` let the quarantined device in.
        let lets_in = |held: &BTreeMap<ConnId, Netmap>, conn: ConnId| -> BTreeSet<String> {
            let nm = &held[&conn];
            let sets = peerset::book(&nm.peer_sets);
            nm.inbound
                .iter()
                .filter(|r| peerset::rule_has_source(r, &sets, q))
                .map(|r| r.service.clone())
                .collect()
        };
        for conn in [10, 30] {
            assert_eq!(
                lets_in(&held, conn),
                BTreeSet::from(["all".into(), "patch".into()])
            );
        }
        r.handle_device_upserted(quarantined(2));
        let mut first: BTreeMap<ConnId, BTreeSet<String>> = BTreeMap::new();
        let mut compiled_before_told = false;
        for o in drain(&mut r) {
            if let Output::Send {
                conn: 20,
                msg: CoordinatorMsg::NetmapDelta(_),
            } = &o
            {
                // The quarantined device's own narrowing comes from the compile.
                compiled_before_told |= first.len() < 2;
            }
            apply_output(&mut held, &o);
            if let Output::Send {
                conn: c @ (10 | 30),
                msg: CoordinatorMsg::NetmapDelta(_),
            } = &o
            {
                first.entry(*c).or_insert_with(|| lets_in(&held, *c));
            }
        }
        assert!(
            !compiled_before_told,
            "a compile's delta came before a peer was told"
        );
        for conn in [10, 30] {
            assert_eq!(
                first.get(&conn),
                Some(&BTreeSet::new()),
                "peer {conn}'s first delta"
            );
            assert_eq!(
                lets_in(&held, conn),
                BTreeSet::from(["patch".into()]),
                "peer {conn} at the end"
            );
        }
        // The same filter a fresh session of peer 1 is given.
        let kept = held[&10].clone();
        r.handle_session_closed(DeviceId(1), 10);
        for o in drain(&mut r) {
            apply_output(&mut held, &o);
        }
        open_sessions(&mut r, &[1]);
        for o in drain(&mut r) {
            apply_output(&mut held, &o);
        }
        let fresh = &held[&10];
        let expand = |nm: &Netmap| peerset::expand(&nm.inbound, &nm.peer_sets, 1 << 16);
        assert_eq!(expand(&kept), expand(fresh));
    }

    /// A quarantine and a departure in one batch: the pass that takes the departed device out
    /// of every session runs between the quarantine's narrowing and the compile, and must not
    /// give the quarantined device back its access from the compile made before it.
    #[test]
    fn a_departure_after_a_quarantine_does_not_widen_before_the_compile() {
        let p = policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.all]
devices = ["group:eng"]
ports = ["tcp/*"]
[[rules]]
from = ["group:eng"]
to = ["all"]
"#,
            "test.toml",
        )
        .unwrap();
        let mut r = reg(&[1, 2, 3, 4]);
        r.handle_policy(p);
        open_sessions(&mut r, &[1, 2, 3, 4]);
        let mut held: BTreeMap<ConnId, Netmap> = BTreeMap::new();
        for o in drain(&mut r) {
            apply_output(&mut held, &o);
        }
        let q: IpAddr = "100.64.0.2".parse().unwrap();
        let lets_in = |held: &BTreeMap<ConnId, Netmap>, conn: ConnId| -> bool {
            let nm = &held[&conn];
            let sets = peerset::book(&nm.peer_sets);
            nm.inbound
                .iter()
                .any(|r| peerset::rule_has_source(r, &sets, q))
        };
        assert!(lets_in(&held, 10) && lets_in(&held, 30));
        r.handle_device_upserted(quarantined(2));
        r.handle_device_removed(DeviceId(4), "revoked");
        let mut closed: BTreeSet<ConnId> = BTreeSet::new();
        for o in drain(&mut r) {
            apply_output(&mut held, &o);
            for conn in [10, 30] {
                if let Output::Send { conn: c, .. } = &o {
                    if *c == conn && !lets_in(&held, conn) {
                        closed.insert(conn);
                    }
                }
                assert!(
                    !(closed.contains(&conn) && lets_in(&held, conn)),
                    "session {conn} let the quarantined device in again: {o:?}"
                );
            }
        }
        assert_eq!(closed, BTreeSet::from([10, 30]));
    }

    /// A device that calls itself `ci-runner` gets nothing from `device:ci-runner` rules; once
    /// the real server enrolls with a token binding that name (and the first device is moved
    /// aside), the server gets the access and the other device still none.
    #[test]
    fn device_rules_follow_bound_names_not_self_chosen_ones() {
        let p = policy::parse(
            br#"
[services.artifacts]
devices = ["tag:store"]
ports = ["tcp/443"]
[[rules]]
from = ["device:ci-runner"]
to = ["artifacts"]
"#,
            "test.toml",
        )
        .unwrap();
        let squatter = Device {
            hostname: ward_shared::names::Hostname::parse("ci-runner").unwrap(),
            name_bound: false,
            ..dev(1)
        };
        let store = Device {
            tags: vec![Name::parse("tag", "store").unwrap()],
            user: None,
            ..dev(2)
        };
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [squatter.clone(), store],
            [],
            Some(p),
            vec![],
            vec![],
            0,
        );
        let peers = |r: &Registry, id: u64| {
            r.compiled()
                .devices
                .get(&DeviceId(id))
                .map(|a| a.peers.clone())
                .unwrap_or_default()
        };
        drain(&mut r);
        assert!(peers(&r, 2).is_empty() && r.compiled().devices.contains_key(&DeviceId(2)));
        assert!(peers(&r, 1).is_empty(), "{:?}", peers(&r, 1));
        assert!(!peers(&r, 2).contains(&DeviceId(1)));
        // The bound enrollment: the squatter moves to ci-runner-2, the server is ci-runner.
        r.handle_device_upserted(Device {
            hostname: ward_shared::names::Hostname::parse("ci-runner-2").unwrap(),
            ..squatter
        });
        r.handle_device_upserted(Device {
            hostname: ward_shared::names::Hostname::parse("ci-runner").unwrap(),
            name_bound: true,
            ..dev(3)
        });
        drain(&mut r);
        assert!(peers(&r, 3).contains(&DeviceId(2)));
        assert!(peers(&r, 1).is_empty());
    }

    /// A device whose name changes under it (moved aside from a bound name, or renamed) is
    /// told its new name in a delta; one whose name stays is not told again.
    #[test]
    fn a_device_moved_aside_is_told_its_new_name() {
        let squatter = Device {
            hostname: Hostname::parse("ci-runner").unwrap(),
            name_bound: false,
            ..dev(1)
        };
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [squatter.clone(), dev(2)],
            [],
            Some(open_policy()),
            vec![],
            vec![],
            0,
        );
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        assert!(matches!(
            &out[..],
            [Output::Send { msg: CoordinatorMsg::Netmap(nm), .. }, ..] if nm.me.hostname.as_str() == "ci-runner"
        ));
        r.handle_device_upserted(Device {
            hostname: Hostname::parse("ci-runner-2").unwrap(),
            ..squatter.clone()
        });
        let me: Vec<_> = drain(&mut r)
            .into_iter()
            .filter_map(|o| match o {
                Output::Send {
                    conn: 10,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } => d.me,
                _ => None,
            })
            .collect();
        assert_eq!(me.len(), 1, "{me:?}");
        assert_eq!(me[0].hostname.as_str(), "ci-runner-2");
        assert_eq!(me[0].device_id, DeviceId(1));
        assert_eq!(me[0].ipv4, squatter.ipv4);
        assert_eq!(me[0].observed_addr, Some(addr("10.0.0.1:1")));
        // Another change to the device that leaves its name: no `me`.
        r.handle_device_upserted(Device {
            hostname: Hostname::parse("ci-runner-2").unwrap(),
            last_seen_ms: 5,
            ..squatter
        });
        assert!(drain(&mut r).iter().all(|o| !matches!(
            o,
            Output::Send { msg: CoordinatorMsg::NetmapDelta(d), .. } if d.me.is_some()
        )));
    }

    #[test]
    fn no_policy_means_no_peers_and_no_inbound() {
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), dev(2)],
            [],
            None,
            vec![],
            vec![],
            0,
        );
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        let Output::Send {
            msg: CoordinatorMsg::Netmap(nm),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert!(nm.peers.is_empty());
        assert!(nm.inbound.is_empty());
        // An empty policy is no different.
        r.handle_policy(policy::parse(b"", "empty.toml").unwrap());
        assert!(drain(&mut r).is_empty(), "nothing changed, nothing sent");
        // The open policy gives a delta with the peer and the inbound rules.
        r.handle_policy(open_policy());
        let out = drain(&mut r);
        let Output::Send {
            msg: CoordinatorMsg::NetmapDelta(d),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!(d.upsert.len(), 1);
        assert!(d.inbound.as_ref().is_some_and(|i| !i.is_empty()));
    }

    /// Netmaps ask for flow records and name the policy version; a delta carries the version
    /// only when it changed, even when nothing else did.
    #[test]
    fn netmaps_carry_flows_and_the_policy_version() {
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), dev(2)],
            [],
            Some(open_policy()),
            vec![],
            vec![],
            0,
        );
        r.handle_policy_version(Some(4));
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        let Output::Send {
            msg: CoordinatorMsg::Netmap(nm),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert!(nm.flows);
        assert_eq!(nm.policy_version, Some(4));
        // The same policy applied again as version 5: only the version moves.
        r.handle_policy_version(Some(5));
        r.handle_policy(open_policy());
        let out = drain(&mut r);
        let Output::Send {
            msg: CoordinatorMsg::NetmapDelta(d),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!(d.policy_version, Some(5));
        assert!(d.upsert.is_empty() && d.inbound.is_none());
        // A change that is not the policy's leaves the version out.
        r.handle_device_removed(DeviceId(2), "gone");
        let out = drain(&mut r);
        let Some(d) = out.iter().find_map(|o| match o {
            Output::Send {
                msg: CoordinatorMsg::NetmapDelta(d),
                ..
            } => Some(d),
            _ => None,
        }) else {
            panic!("{out:?}")
        };
        assert_eq!(d.remove, vec![DeviceId(2)]);
        assert_eq!(d.policy_version, None);
    }

    /// A policy with shadow rules gives every device its candidate filter beside the enforced
    /// one (the shadow rule adds nothing enforced); a policy without them clears it by delta.
    #[test]
    fn netmaps_carry_the_candidate_filter_and_a_delta_clears_it() {
        let shadowed = policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.all]
devices = ["group:eng"]
ports = ["tcp/*", "udp/*", "icmp"]
[services.web]
devices = ["group:eng"]
ports = ["tcp/443"]
[[rules]]
from = ["group:eng"]
to = ["all"]
shadow_remove = true
[[rules]]
name = "web-only"
from = ["group:eng"]
to = ["web"]
shadow = true
"#,
            "test.toml",
        )
        .unwrap();
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), dev(2)],
            [],
            Some(open_policy()),
            vec![],
            vec![],
            0,
        );
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        let Output::Send {
            msg: CoordinatorMsg::Netmap(nm),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!(nm.shadow_filter, None, "no shadow rules, no candidate view");
        r.handle_policy(shadowed);
        let out = drain(&mut r);
        let Output::Send {
            msg: CoordinatorMsg::NetmapDelta(d),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert!(
            d.inbound.iter().flatten().all(|f| f.rule != "web-only"),
            "a shadow rule is never enforced"
        );
        let sf = d.shadow_filter.clone().flatten().unwrap();
        assert!(sf.iter().all(|f| f.rule == "web-only"), "{sf:?}");
        assert!(!sf.is_empty());
        r.handle_policy(open_policy());
        let out = drain(&mut r);
        let Output::Send {
            msg: CoordinatorMsg::NetmapDelta(d),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!(d.shadow_filter, Some(None));
    }

    fn report(dev: u64, seq: u64, at: i64, marker: bool) -> PostureReport {
        PostureReport::unknown(DeviceId(dev), seq, at).with_file("/m", marker)
    }

    /// alice (1) reaches db (2) on 5432 only with an mfa sign-in (rule "mfa-db") and on 80
    /// through her user (rule "web"). A token device fails, a password sign-in fails with the
    /// methods named, an mfa sign-in passes; the provider suspending alice keeps her device
    /// connected but takes every user rule away (rotated, explained), and giving it back
    /// restores them at once, without a reconnect.
    #[test]
    fn identity_signals_and_identity_loss_narrow_without_disconnecting() {
        let t0 = 1_800_000_000_000;
        let mut db = dev(2);
        db.user = None;
        db.tags = vec![Name::parse("tag", "db").unwrap()];
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), db],
            [],
            Some(
                policy::parse(
                    br#"
[posture.mfa]
amr = ["mfa"]
[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]
[services.web]
devices = ["tag:db"]
ports = ["tcp/80"]
[[rules]]
name = "mfa-db"
from = ["alice"]
to = ["db"]
posture = ["mfa"]
[[rules]]
name = "web"
from = ["alice"]
to = ["web"]
"#,
                    "t.toml",
                )
                .unwrap(),
            ),
            vec![],
            vec![],
            t0,
        );
        for (id, conn) in [(1, 10), (2, 20)] {
            r.handle_session_opened(
                DeviceId(id),
                conn,
                addr("10.0.0.1:1"),
                DeviceUpdate::default(),
            )
            .unwrap();
        }
        r.handle_posture(DeviceId(1), 10, report(1, 1, t0, true), t0)
            .unwrap();
        let _ = drain(&mut r);
        let ports = |r: &Registry| -> Vec<u16> {
            let mut v: Vec<u16> = r
                .compiled()
                .devices
                .get(&DeviceId(2))
                .map(|a| {
                    a.inbound
                        .iter()
                        .flat_map(|f| f.ports.iter().map(|p| p.lo))
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        assert_eq!(ports(&r), vec![80], "no sign-in: the mfa rule fails closed");
        let v = r.trust_view(DeviceId(1));
        let u = v.unavailable.iter().find(|u| u.rule == "mfa-db").unwrap();
        assert!(u.reasons[0].contains("enrolled with a token"), "{u:?}");
        let pwd = crate::oidc::core::SignIn {
            auth_time_ms: t0,
            amr: vec!["pwd".into()],
        };
        r.handle_sign_in(DeviceId(1), Some(pwd));
        let _ = drain(&mut r);
        assert_eq!(ports(&r), vec![80]);
        let v = r.trust_view(DeviceId(1));
        let u = v.unavailable.iter().find(|u| u.rule == "mfa-db").unwrap();
        assert!(
            u.reasons[0].contains("amr: sign-in used [pwd], the rule needs mfa"),
            "{u:?}"
        );
        let mfa = crate::oidc::core::SignIn {
            auth_time_ms: t0,
            amr: vec!["pwd".into(), "otp".into(), "mfa".into()],
        };
        r.handle_sign_in(DeviceId(1), Some(mfa));
        let _ = drain(&mut r);
        assert_eq!(ports(&r), vec![80, 5432]);
        // The provider suspends alice: still connected, both rules gone, rotated.
        r.handle_identity(
            "alice",
            Some("deactivated at the identity provider (SCIM)".into()),
        );
        let out = drain(&mut r);
        assert_eq!(ports(&r), Vec::<u16>::new());
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send {
                conn: 10,
                msg: CoordinatorMsg::RotateNow { .. }
            }
        )));
        assert!(!out.iter().any(|o| matches!(o, Output::Close { .. })));
        assert!(r.sessions.contains_key(&DeviceId(1)));
        let v = r.trust_view(DeviceId(1));
        assert!(
            v.unavailable
                .iter()
                .any(|u| u.rule == "web"
                    && u.reasons.iter().any(|x| x.contains("identity: user alice"))),
            "{v:?}"
        );
        // The same news twice is no news.
        r.handle_identity(
            "alice",
            Some("deactivated at the identity provider (SCIM)".into()),
        );
        assert!(drain(&mut r).is_empty());
        // Given back: restored at the next flush.
        r.handle_identity("alice", None);
        let _ = drain(&mut r);
        assert_eq!(ports(&r), vec![80, 5432]);
    }

    /// alice (1) may reach db (2) on 5432 only while her behaviour risk is at most 40; a burst
    /// of new destinations in her own flow report takes it away, `expected` gives it back, and
    /// db's word about alice changes nothing.
    #[test]
    fn behaviour_risk_above_max_risk_narrows_access_until_acknowledged() {
        use ward_shared::flows::{FlowRecord, FlowReport, FlowVerdict, FlowWindow, Role};
        let t0 = 1_800_000_000_000;
        let mut db = dev(2);
        db.user = None;
        db.tags = vec![Name::parse("tag", "db").unwrap()];
        let db_addr = IpAddr::V4(db.ipv4);
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), db],
            [],
            Some(
                policy::parse(
                    br#"
[posture.calm]
max_risk = 40
[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]
[services.web]
devices = ["tag:db"]
ports = ["tcp/80"]
[[rules]]
name = "gated"
from = ["alice"]
to = ["db"]
posture = ["calm"]
[[rules]]
name = "open"
from = ["alice"]
to = ["web"]
[trust]
behaviour_learning = "1s"
"#,
                    "t.toml",
                )
                .unwrap(),
            ),
            vec![],
            vec![],
            t0,
        );
        for (id, conn) in [(1, 10), (2, 20)] {
            r.handle_session_opened(
                DeviceId(id),
                conn,
                addr("10.0.0.1:1"),
                DeviceUpdate::default(),
            )
            .unwrap();
        }
        r.handle_posture(DeviceId(1), 10, report(1, 1, t0, true), t0)
            .unwrap();
        let _ = drain(&mut r);
        let ports = |r: &Registry| -> Vec<u16> {
            let mut v: Vec<u16> = r.compiled().devices[&DeviceId(2)]
                .inbound
                .iter()
                .flat_map(|f| f.ports.iter().map(|p| p.lo))
                .collect();
            v.sort();
            v
        };
        assert_eq!(ports(&r), vec![80, 5432]);
        let rec = |role: Role, peer: IpAddr, port: u16| FlowRecord {
            role,
            peer: None,
            peer_addr: peer,
            peer_user: None,
            peer_tags: vec![],
            proto: Proto::Tcp,
            port,
            verdict: FlowVerdict::Allowed,
            rule: None,
            policy_version: None,
            reason: None,
            packets_out: 10,
            bytes_out: 1000,
            packets_in: 10,
            bytes_in: 1000,
            connections: 1,
            shadow: None,
        };
        let flows = |seq: u64, start: i64, records: Vec<FlowRecord>| FlowReport {
            seq,
            windows: vec![FlowWindow {
                start_ms: start,
                end_ms: start + 1000,
                records,
            }],
            dropped_records: 0,
        };
        // Learning: alice uses db.
        r.handle_flows(
            DeviceId(1),
            &flows(1, t0, vec![rec(Role::Initiator, db_addr, 5432)]),
            t0 + 1000,
        );
        // db claims alice flooded it: only db's own baseline hears that.
        let lies: Vec<FlowRecord> = (1..200)
            .map(|p| rec(Role::Responder, IpAddr::V4(dev(1).ipv4), p))
            .collect();
        r.handle_flows(DeviceId(2), &flows(1, t0, vec![]), t0 + 1000);
        r.handle_flows(DeviceId(2), &flows(2, t0 + 2000, lies), t0 + 3000);
        assert_eq!(r.risk(DeviceId(1)).0, 0);
        let _ = drain(&mut r);
        assert_eq!(ports(&r), vec![80, 5432]);
        // Watching: alice opens connections to six addresses she never used.
        let burst: Vec<FlowRecord> = (1..=6)
            .map(|i| rec(Role::Initiator, IpAddr::from([100, 64, 9, i]), 22))
            .collect();
        r.handle_flows(DeviceId(1), &flows(2, t0 + 2000, burst), t0 + 3000);
        let out = drain(&mut r);
        let anomaly = out
            .iter()
            .find_map(|o| match o {
                Output::Anomaly(a) => Some(a.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(anomaly.device, DeviceId(1));
        assert_eq!(ports(&r), vec![80], "the gated rule is withdrawn");
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send {
                conn: 10,
                msg: CoordinatorMsg::RotateNow { .. }
            }
        )));
        let why = &r.trust.failures(DeviceId(1))["calm"][0];
        assert!(
            why.starts_with("risk ")
                && why.contains("is above the 40 allowed: anomaly")
                && why.contains("first contact with"),
            "{why}"
        );
        // An admin says it was expected: the risk goes, the access comes back.
        r.handle_anomaly_ack(anomaly.id, Label::Expected).unwrap();
        let _ = drain(&mut r);
        assert_eq!(r.risk(DeviceId(1)).0, 0);
        assert_eq!(ports(&r), vec![80, 5432]);
        assert!(r.handle_anomaly_ack(anomaly.id, Label::Malicious).is_err());
    }

    /// alice (1) may reach db (2) on 5432 only while she has /m, and on 80 always.
    /// alice (device 1) may reach db's 5432 only with the `marker` posture.
    fn gated_registry(t0: i64) -> Registry {
        let mut db = dev(2);
        db.user = None;
        db.tags = vec![Name::parse("tag", "db").unwrap()];
        let p = policy::parse(
            br#"
[posture.marker]
files = [{ path = "/m" }]
[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]
[services.web]
devices = ["tag:db"]
ports = ["tcp/80"]
[[rules]]
name = "gated"
from = ["alice"]
to = ["db"]
posture = ["marker"]
[[rules]]
name = "open"
from = ["alice"]
to = ["web"]
"#,
            "t.toml",
        )
        .unwrap();
        Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), db],
            [],
            Some(p),
            vec![],
            vec![],
            t0,
        )
    }

    fn db_ports(r: &Registry) -> Vec<u16> {
        let mut v: Vec<u16> = r.compiled().devices[&DeviceId(2)]
            .inbound
            .iter()
            .flat_map(|f| f.ports.iter().map(|p| p.lo))
            .collect();
        v.sort();
        v
    }

    fn stored(marker: bool) -> RemoteTrust {
        let e = ward_shared::posture::Evaluation {
            requirement: "marker".into(),
            passed: marker,
            failures: if marker {
                vec![]
            } else {
                vec!["file /m: missing".into()]
            },
        };
        RemoteTrust::parse("r2", &serde_json::to_string(&[e]).unwrap(), 0, "", 1)
    }

    #[test]
    fn a_device_held_by_another_replica_is_judged_here_by_its_stored_verdict() {
        let t0 = 1_800_000_000_000;
        let mut r = gated_registry(t0);
        // db's session is here; alice's is on replica r2.
        r.handle_session_opened(DeviceId(2), 20, addr("10.0.0.2:1"), DeviceUpdate::default())
            .unwrap();
        let _ = drain(&mut r);
        assert_eq!(db_ports(&r), vec![80], "no verdict anywhere: closed");
        r.handle_remote_sessions(
            [(
                DeviceId(1),
                RemoteSession {
                    replica: "r2".into(),
                    home_relay: None,
                },
            )]
            .into(),
        );
        r.handle_remote_trust(DeviceId(1), stored(true));
        let out: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        assert_eq!(db_ports(&r), vec![80, 5432]);
        // db is told alice is online (held on r2), and nothing is stored or audited here.
        let online = out.iter().any(|o| match o {
            Output::Send {
                conn: 20,
                msg: CoordinatorMsg::NetmapDelta(d),
            } => d
                .upsert
                .iter()
                .any(|p| p.device_id == DeviceId(1) && p.online),
            _ => false,
        });
        assert!(online, "{out:?}");
        assert!(
            !out.iter().any(|o| match o {
                Output::TrustDecided { .. } => true,
                Output::PostureChanged { change, .. } => !change.newly_passed.is_empty(),
                _ => false,
            }),
            "{out:?}"
        );
        // r2's verdict turns to failing: db loses 5432 here at once, and keeps it lost as
        // time passes (the per-second re-judging keeps r2's verdict).
        r.handle_remote_trust(DeviceId(1), stored(false));
        let _ = drain(&mut r);
        assert_eq!(db_ports(&r), vec![80]);
        r.handle_remote_trust(DeviceId(1), stored(true));
        r.handle_time(t0 + 5_000);
        let _ = drain(&mut r);
        assert_eq!(db_ports(&r), vec![80, 5432]);
        // r2 stops holding alice's session (it died, or she left): its verdict no longer
        // counts, and she is offline.
        r.handle_remote_sessions(BTreeMap::new());
        let _ = drain(&mut r);
        assert_eq!(db_ports(&r), vec![80]);
        // An unreadable stored verdict never opens anything.
        r.handle_remote_sessions(
            [(
                DeviceId(1),
                RemoteSession {
                    replica: "r2".into(),
                    home_relay: None,
                },
            )]
            .into(),
        );
        r.handle_remote_trust(DeviceId(1), RemoteTrust::parse("r2", "garbage", 0, "", 2));
        let _ = drain(&mut r);
        assert_eq!(db_ports(&r), vec![80]);
    }

    #[test]
    fn a_device_taking_its_session_to_another_replica_keeps_its_risk() {
        let t0 = 1_800_000_000_000;
        let mut r = gated_registry(t0);
        // Replica r2 judged device 1's risk 60 a minute ago; the device connects here now.
        let mut risky = stored(true);
        risky.risk = 60;
        risky.risk_reason = "anomaly 3: fan-out".into();
        risky.updated_ms = t0 - 60_000;
        r.handle_remote_trust(DeviceId(1), risky.clone());
        r.handle_time(t0);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let out: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        let carried: Vec<&Anomaly> = out
            .iter()
            .filter_map(|o| match o {
                Output::Anomaly(a) => Some(a.as_ref()),
                _ => None,
            })
            .collect();
        assert_eq!(carried.len(), 1, "{out:?}");
        assert!(carried[0].reason.contains("fan-out"));
        let (score, why) = r.risk(DeviceId(1));
        assert!((55..=60).contains(&score), "{score} {why}");
        // Its first report here stores the risk it kept, not zero.
        r.handle_posture(DeviceId(1), 10, report(1, 1, t0, true), t0)
            .unwrap();
        let stored_risk = std::iter::from_fn(|| r.poll_output()).find_map(|o| match o {
            Output::TrustDecided { decision, .. } => Some(decision.risk),
            _ => None,
        });
        assert!(stored_risk.is_some_and(|s| s >= 55), "{stored_risk:?}");
        // Reconnecting here again carries nothing more: the risk is already here.
        r.handle_session_closed(DeviceId(1), 10);
        r.handle_session_opened(DeviceId(1), 11, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        assert!(!std::iter::from_fn(|| r.poll_output()).any(|o| matches!(o, Output::Anomaly(_))));
    }

    #[test]
    fn the_replica_holding_a_session_stores_its_verdict_changes() {
        let t0 = 1_800_000_000_000;
        let mut r = gated_registry(t0);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let decided = |r: &mut Registry| -> Vec<bool> {
            std::iter::from_fn(|| r.poll_output())
                .filter_map(|o| match o {
                    Output::TrustDecided { device, decision } => {
                        assert_eq!(device, DeviceId(1));
                        Some(decision.evaluations.iter().all(|e| e.passed))
                    }
                    _ => None,
                })
                .collect()
        };
        assert!(
            decided(&mut r).is_empty(),
            "no report yet: nothing to store"
        );
        r.handle_posture(DeviceId(1), 10, report(1, 1, t0, true), t0)
            .unwrap();
        assert_eq!(decided(&mut r), [true]);
        r.handle_posture(DeviceId(1), 10, report(1, 2, t0 + 1000, true), t0 + 1000)
            .unwrap();
        assert!(decided(&mut r).is_empty(), "no change: nothing to store");
        r.handle_posture(DeviceId(1), 10, report(1, 3, t0 + 2000, false), t0 + 2000)
            .unwrap();
        assert_eq!(decided(&mut r), [false]);
        // The session moved to another replica: this one stores nothing more.
        r.handle_session_moved(DeviceId(1));
        r.handle_time(t0 + 600_000);
        assert!(decided(&mut r).is_empty());
    }

    #[test]
    fn posture_change_narrows_access_rotates_and_explains() {
        let t0 = 1_800_000_000_000;
        let mut db = dev(2);
        db.user = None;
        db.tags = vec![Name::parse("tag", "db").unwrap()];
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), db],
            [],
            Some(
                policy::parse(
                    br#"
[posture.marker]
files = [{ path = "/m" }]
[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]
[services.web]
devices = ["tag:db"]
ports = ["tcp/80"]
[[rules]]
name = "gated"
from = ["alice"]
to = ["db"]
posture = ["marker"]
[[rules]]
name = "open"
from = ["alice"]
to = ["web"]
"#,
                    "t.toml",
                )
                .unwrap(),
            ),
            vec![],
            vec![],
            t0,
        );
        for (id, conn) in [(1, 10), (2, 20)] {
            r.handle_session_opened(
                DeviceId(id),
                conn,
                addr("10.0.0.1:1"),
                DeviceUpdate::default(),
            )
            .unwrap();
        }
        let all: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        let wants = all.iter().find_map(|o| match o {
            Output::Send {
                conn: 10,
                msg: CoordinatorMsg::PostureWants(w),
            } => Some(w.clone()),
            _ => None,
        });
        assert_eq!(wants.unwrap().files, vec![("/m".to_string(), false)]);
        let ports = |r: &Registry| -> Vec<u16> {
            let mut v: Vec<u16> = r.compiled().devices[&DeviceId(2)]
                .inbound
                .iter()
                .flat_map(|f| f.ports.iter().map(|p| p.lo))
                .collect();
            v.sort();
            v
        };
        // No report yet: only the posture-free service.
        assert_eq!(ports(&r), vec![80]);
        // A report from another device's session, and a replay, are refused.
        assert!(r
            .handle_posture(DeviceId(1), 10, report(2, 1, t0, true), t0)
            .is_err());
        r.handle_posture(DeviceId(1), 10, report(1, 5, t0, true), t0)
            .unwrap();
        assert!(r
            .handle_posture(DeviceId(1), 10, report(1, 5, t0, true), t0)
            .is_err());
        let out: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        assert_eq!(ports(&r), vec![80, 5432]);
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send {
                conn: 20,
                msg: CoordinatorMsg::NetmapDelta(_)
            }
        )));
        // The file disappears: db's filter loses 5432, alice rotates and is told why.
        r.handle_posture(DeviceId(1), 10, report(1, 6, t0 + 1000, false), t0 + 1000)
            .unwrap();
        let out: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        assert_eq!(ports(&r), vec![80]);
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send {
                conn: 10,
                msg: CoordinatorMsg::RotateNow { .. }
            }
        )));
        assert!(out.iter().any(|o| matches!(
            o,
            Output::PostureChanged {
                device: DeviceId(1),
                ..
            }
        )));
        let verdict = out
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    conn: 10,
                    msg: CoordinatorMsg::PostureVerdict(v),
                } => Some(v.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(verdict.unavailable.len(), 1);
        assert_eq!(verdict.unavailable[0].service, "db");
        assert!(
            verdict.unavailable[0].reasons[0].contains("/m"),
            "{:?}",
            verdict.unavailable
        );
        // Quarantine: web goes too; release brings it back.
        let mut q = dev(1);
        q.quarantine = Some(crate::store::Quarantine {
            since_ms: t0,
            reason: "test".into(),
            automatic: false,
        });
        r.handle_device_upserted(q);
        let out: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
        assert!(ports(&r).is_empty());
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send {
                conn: 10,
                msg: CoordinatorMsg::RotateNow { .. }
            }
        )));
        r.handle_device_upserted(dev(1));
        let _ = drain(&mut r);
        assert_eq!(ports(&r), vec![80]);
        // Reports age out: a fresh passing report, then silence past the maximum age.
        r.handle_posture(DeviceId(1), 10, report(1, 7, t0 + 2000, true), t0 + 2000)
            .unwrap();
        let _ = drain(&mut r);
        assert_eq!(ports(&r), vec![80, 5432]);
        r.handle_time(t0 + 2000 + ward_shared::posture::DEFAULT_MAX_REPORT_AGE_MS as i64 + 1);
        let _ = drain(&mut r);
        assert_eq!(ports(&r), vec![80]);
    }

    /// Device 1's view of device 2 from the latest netmap or delta sent to conn 10.
    fn peer2_relay(out: &[Output]) -> Option<Option<String>> {
        out.iter().rev().find_map(|o| match o {
            Output::Send {
                conn: 10,
                msg: CoordinatorMsg::NetmapDelta(d),
            } => d
                .upsert
                .iter()
                .find(|p| p.device_id == DeviceId(2))
                .map(|p| p.relay.clone()),
            Output::Send {
                conn: 10,
                msg: CoordinatorMsg::Netmap(nm),
            } => nm
                .peers
                .iter()
                .find(|p| p.device_id == DeviceId(2))
                .map(|p| p.relay.clone()),
            _ => None,
        })
    }

    fn with_relays(ids: &[u64], names: &[&str]) -> Registry {
        let mut r = reg(ids);
        r.handle_relays(
            names
                .iter()
                .map(|n| RelayInfo {
                    name: n.to_string(),
                    addr: format!("{n}.example:3478"),
                })
                .collect(),
        );
        r
    }

    fn home(name: Option<&str>) -> DeviceUpdate {
        DeviceUpdate {
            wg_port: 51820,
            home_relay: name.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn published_home_relay_reaches_peers_as_a_delta() {
        let mut r = with_relays(&[1, 2], &["r1", "r2"]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), home(None))
            .unwrap();
        drain(&mut r);
        // In the hello: peers see it with the device online.
        r.handle_session_opened(DeviceId(2), 11, addr("10.0.0.2:1"), home(Some("r1")))
            .unwrap();
        assert_eq!(peer2_relay(&drain(&mut r)), Some(Some("r1".into())));
        // A change in an update is a delta; the same one again sends nothing.
        r.handle_session_update(DeviceId(2), 11, home(Some("r2")));
        assert_eq!(peer2_relay(&drain(&mut r)), Some(Some("r2".into())));
        r.handle_session_update(DeviceId(2), 11, home(Some("r2")));
        assert!(drain(&mut r).is_empty());
        // An update without one (updates are always complete) clears it.
        r.handle_session_update(DeviceId(2), 11, home(None));
        assert_eq!(peer2_relay(&drain(&mut r)), Some(None));
        // An update from a stale connection changes nothing.
        r.handle_session_update(DeviceId(2), 99, home(Some("r1")));
        assert!(drain(&mut r).is_empty());
        // A device connecting later sees it in its full netmap.
        r.handle_session_update(DeviceId(2), 11, home(Some("r1")));
        drain(&mut r);
        r.handle_session_opened(DeviceId(1), 12, addr("10.0.0.1:1"), home(None))
            .unwrap();
        let out = drain(&mut r);
        let full = out.iter().find_map(|o| match o {
            Output::Send {
                conn: 12,
                msg: CoordinatorMsg::Netmap(nm),
            } => Some(nm.peers[0].relay.clone()),
            _ => None,
        });
        assert_eq!(full, Some(Some("r1".into())));
    }

    #[test]
    fn a_device_held_by_another_replica_is_online_with_its_home_relay_there() {
        let mut r = with_relays(&[1, 2], &["r-a"]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let _ = drain(&mut r);
        let held = |relay: Option<&str>| -> BTreeMap<DeviceId, RemoteSession> {
            [(
                DeviceId(2),
                RemoteSession {
                    replica: "r2".into(),
                    home_relay: relay.map(String::from),
                },
            )]
            .into()
        };
        r.handle_remote_sessions(held(Some("r-a")));
        let out = drain(&mut r);
        assert_eq!(peer2_relay(&out), Some(Some("r-a".to_string())));
        // A relay this replica does not know is not passed on.
        r.handle_remote_sessions(held(Some("nowhere")));
        assert_eq!(peer2_relay(&drain(&mut r)), Some(None));
        assert_eq!(r.online_elsewhere(), [DeviceId(2)]);
        r.handle_remote_sessions(BTreeMap::new());
        let _ = drain(&mut r);
        assert!(r.online_elsewhere().is_empty());
    }

    #[test]
    fn a_home_relay_change_here_is_recorded_for_the_other_replicas() {
        let mut r = with_relays(&[1, 2], &["r-a"]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let relays = |r: &mut Registry| -> Vec<Option<String>> {
            std::iter::from_fn(|| r.poll_output())
                .filter_map(|o| match o {
                    Output::HomeRelay { device, relay } => {
                        assert_eq!(device, DeviceId(1));
                        Some(relay)
                    }
                    _ => None,
                })
                .collect()
        };
        assert!(
            relays(&mut r).is_empty(),
            "a new session has none: nothing to record"
        );
        r.handle_session_update(DeviceId(1), 10, home(Some("r-a")));
        assert_eq!(relays(&mut r), [Some("r-a".to_string())]);
        r.handle_session_update(DeviceId(1), 10, home(Some("r-a")));
        assert!(relays(&mut r).is_empty());
        r.handle_relays(vec![]);
        assert_eq!(relays(&mut r), [None]);
    }

    #[test]
    fn unknown_home_relays_are_ignored() {
        let mut r = with_relays(&[1, 2], &["r1"]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), home(None))
            .unwrap();
        drain(&mut r);
        r.handle_session_opened(DeviceId(2), 11, addr("10.0.0.2:1"), home(Some("nope")))
            .unwrap();
        assert_eq!(peer2_relay(&drain(&mut r)), Some(None));
        let long = "x".repeat(10_000);
        r.handle_session_update(DeviceId(2), 11, home(Some(&long)));
        assert!(drain(&mut r).is_empty(), "still none: nothing to send");
        r.handle_session_update(DeviceId(2), 11, home(Some("r1")));
        assert_eq!(peer2_relay(&drain(&mut r)), Some(Some("r1".into())));
        // Switching to an unknown one is the same as naming none.
        r.handle_session_update(DeviceId(2), 11, home(Some("R1")));
        assert_eq!(peer2_relay(&drain(&mut r)), Some(None));
    }

    #[test]
    fn session_end_clears_the_home_relay() {
        let mut r = with_relays(&[1, 2], &["r1"]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), home(None))
            .unwrap();
        r.handle_session_opened(DeviceId(2), 11, addr("10.0.0.2:1"), home(Some("r1")))
            .unwrap();
        drain(&mut r);
        r.handle_session_closed(DeviceId(2), 11);
        let out = drain(&mut r);
        assert_eq!(peer2_relay(&out), Some(None));
        // Reconnecting without one: still none (it is not remembered across sessions).
        r.handle_session_opened(DeviceId(2), 13, addr("10.0.0.2:1"), home(None))
            .unwrap();
        assert_eq!(peer2_relay(&drain(&mut r)), Some(None));
    }

    #[test]
    fn relay_removal_clears_home_relays_naming_it() {
        let mut r = with_relays(&[1, 2, 3], &["r1", "r2"]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), home(None))
            .unwrap();
        r.handle_session_opened(DeviceId(2), 11, addr("10.0.0.2:1"), home(Some("r1")))
            .unwrap();
        r.handle_session_opened(DeviceId(3), 12, addr("10.0.0.3:1"), home(Some("r2")))
            .unwrap();
        drain(&mut r);
        r.handle_relays(vec![RelayInfo {
            name: "r2".into(),
            addr: "r2.example:3478".into(),
        }]);
        let out = drain(&mut r);
        assert_eq!(peer2_relay(&out), Some(None));
        // Device 3's home relay is still registered: peers are not told anything about it.
        let d3_changed = out.iter().any(|o| {
            matches!(o, Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) }
                if d.upsert.iter().any(|p| p.device_id == DeviceId(3)))
        });
        assert!(!d3_changed);
        // Adding r1 back does not restore it: the device publishes it again if it is still
        // connected there.
        r.handle_relays(vec![
            RelayInfo {
                name: "r1".into(),
                addr: "r1.example:3478".into(),
            },
            RelayInfo {
                name: "r2".into(),
                addr: "r2.example:3478".into(),
            },
        ]);
        assert_eq!(peer2_relay(&drain(&mut r)), None);
    }

    #[test]
    fn a_device_losing_access_is_announced_for_relays() {
        let mut r = reg(&[1, 2]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        drain(&mut r);
        r.handle_device_removed(DeviceId(2), "the device has been revoked");
        let out = drain(&mut r);
        assert!(out.contains(&Output::DeviceRevoked {
            device: DeviceId(2)
        }));
        // Once is enough: removing it again announces nothing.
        r.handle_device_removed(DeviceId(2), "the device has been revoked");
        assert!(!drain(&mut r).contains(&Output::DeviceRevoked {
            device: DeviceId(2)
        }));
        // A disabled user's device, too.
        let mut d1 = dev(1);
        d1.user_disabled = true;
        r.handle_device_upserted(d1);
        assert!(drain(&mut r).contains(&Output::DeviceRevoked {
            device: DeviceId(1)
        }));
    }

    fn flow(src: u64, proto: Proto, port: u16) -> DeniedFlow {
        DeniedFlow {
            src: IpAddr::V4(dev(src).ipv4),
            proto,
            port,
            count: 1,
        }
    }

    fn quarantines(out: &[Output]) -> Vec<(DeviceId, String)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Quarantine { device, reason } => Some((*device, reason.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn denied_flows_quarantine_only_on_corroborated_accusations() {
        let p = policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.web]
devices = ["group:eng"]
ports = ["tcp/80"]
[[rules]]
from = ["group:eng"]
to = ["web"]
[trust]
scan_denied_flows = 4
"#,
            "t.toml",
        )
        .unwrap();
        let mut r = reg(&[1, 2, 3]);
        r.handle_policy(p);
        drain(&mut r);
        // Device 2 accuses device 1 of many ports: alone, it is never enough.
        let many: Vec<DeniedFlow> = (1000..1200).map(|p| flow(1, Proto::Tcp, p)).collect();
        r.handle_denied_flows(DeviceId(2), &many, 10);
        assert!(quarantines(&drain(&mut r)).is_empty());
        // Device 3 claims flows its own filter lets through (tcp/80 from device 1): fabricated,
        // so they corroborate nothing.
        r.handle_denied_flows(DeviceId(3), &[flow(1, Proto::Tcp, 80)], 11);
        assert!(quarantines(&drain(&mut r)).is_empty());
        // Device 3 independently saw denied flows from device 1 too: quarantine, naming both.
        let more: Vec<DeniedFlow> = (20..22).map(|p| flow(1, Proto::Tcp, p)).collect();
        r.handle_denied_flows(DeviceId(3), &more, 12);
        let q = quarantines(&drain(&mut r));
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!(q[0].0, DeviceId(1));
        assert!(q[0].1.ends_with("reported by d2, d3"), "{}", q[0].1);
    }

    fn lease_on(id: u64, key: [u8; 32], serial: u64) -> SignedLease {
        let d = dev(id);
        ward_shared::lease::Lease {
            device_id: d.id,
            wg_public_key: WgPublicKey(key),
            ipv4: d.ipv4,
            ipv6: d.ipv6,
            not_before_ms: 0,
            not_after_ms: 600_000,
            serial,
        }
        .sign(&ed25519_dalek::SigningKey::from_bytes(&[3; 32]))
    }

    /// The device that device `viewer`'s latest netmap maps `key` to.
    fn key_owner_seen_by(out: &[Output], conn: ConnId, key: [u8; 32]) -> Option<DeviceId> {
        out.iter().rev().find_map(|o| match o {
            Output::Send {
                conn: c,
                msg: CoordinatorMsg::Netmap(nm),
            } if *c == conn => nm
                .peers
                .iter()
                .find(|p| p.leases.iter().any(|l| l.lease.wg_public_key.0 == key))
                .map(|p| p.device_id),
            Output::Send {
                conn: c,
                msg: CoordinatorMsg::NetmapDelta(d),
            } if *c == conn => d
                .upsert
                .iter()
                .find(|p| p.leases.iter().any(|l| l.lease.wg_public_key.0 == key))
                .map(|p| p.device_id),
            _ => None,
        })
    }

    #[test]
    fn a_key_held_by_one_device_is_never_leased_to_another() {
        let mut r = reg(&[1, 2, 3]);
        r.handle_session_opened(DeviceId(3), 13, addr("10.0.0.3:1"), DeviceUpdate::default())
            .unwrap();
        drain(&mut r);
        let victim_key = [7; 32];
        r.handle_lease(lease_on(1, victim_key, 1));
        let out = drain(&mut r);
        assert_eq!(key_owner_seen_by(&out, 13, victim_key), Some(DeviceId(1)));
        // Device 2 copies device 1's key from its netmap: refused before issue, by name.
        assert_eq!(
            r.check_lease_request(DeviceId(2), &WgPublicKey(victim_key)),
            Err(LeaseRefusal::KeyInUse {
                holder: DeviceId(1)
            })
        );
        assert_eq!(
            LeaseRefusal::KeyInUse {
                holder: DeviceId(1)
            }
            .code(),
            ErrorCode::KeyInUse
        );
        // Its own key, or a fresh one, is fine; so is device 1 asking again.
        assert_eq!(
            r.check_lease_request(DeviceId(1), &WgPublicKey(victim_key)),
            Ok(())
        );
        assert_eq!(
            r.check_lease_request(DeviceId(2), &WgPublicKey([8; 32])),
            Ok(())
        );
        // Even if a lease on it were issued anyway, peers never see the key under device 2.
        r.handle_lease(lease_on(2, victim_key, 2));
        let out = drain(&mut r);
        assert_ne!(key_owner_seen_by(&out, 13, victim_key), Some(DeviceId(2)));
        // After device 1 rotates away from the key, it stays bound to device 1 for a while.
        r.handle_lease(lease_on(1, [9; 32], 3));
        r.handle_leases_revoked(DeviceId(1), &[1]);
        drain(&mut r);
        assert_eq!(
            r.check_lease_request(DeviceId(2), &WgPublicKey(victim_key)),
            Err(LeaseRefusal::KeyInUse {
                holder: DeviceId(1)
            })
        );
        r.handle_time(KEY_HOLD_MS + 1);
        assert_eq!(
            r.check_lease_request(DeviceId(2), &WgPublicKey(victim_key)),
            Ok(())
        );
        // A device that is not live gets nothing.
        assert_eq!(
            r.check_lease_request(DeviceId(9), &WgPublicKey([10; 32])),
            Err(LeaseRefusal::NotLive)
        );
    }

    #[test]
    fn the_lease_offered_again_is_the_newest_unrevoked_one_on_that_key() {
        let mut r = reg(&[1, 2, 3]);
        r.handle_session_opened(DeviceId(3), 13, addr("10.0.0.3:1"), DeviceUpdate::default())
            .unwrap();
        r.handle_lease(lease_on(1, [7; 32], 1));
        r.handle_lease(lease_on(1, [8; 32], 2));
        drain(&mut r);
        let serial = |l: Option<SignedLease>| l.map(|l| l.lease.serial);
        assert_eq!(
            serial(r.current_lease(DeviceId(1), &WgPublicKey([7; 32]))),
            Some(1)
        );
        assert_eq!(
            serial(r.current_lease(DeviceId(1), &WgPublicKey([8; 32]))),
            Some(2)
        );
        assert_eq!(
            serial(r.current_lease(DeviceId(2), &WgPublicKey([7; 32]))),
            None
        );
        // Offered again, the same lease changes nothing the peers hold: no delta.
        r.handle_lease(lease_on(1, [8; 32], 2));
        assert!(drain(&mut r).is_empty());
        r.handle_leases_revoked(DeviceId(1), &[1]);
        drain(&mut r);
        assert_eq!(
            serial(r.current_lease(DeviceId(1), &WgPublicKey([7; 32]))),
            None
        );
    }

    #[test]
    fn newer_session_replaces_older() {
        let mut r = reg(&[1]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        r.handle_session_opened(DeviceId(1), 11, addr("10.0.0.1:2"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        assert!(matches!(&out[0], Output::Close { conn: 10, .. }));
        assert!(matches!(
            &out[1],
            Output::Send {
                conn: 11,
                msg: CoordinatorMsg::Netmap(_)
            }
        ));
        // The stale connection closing does not end the new session.
        r.handle_session_closed(DeviceId(1), 10);
        assert!(r.is_online(DeviceId(1)));
    }

    #[test]
    fn a_session_moved_to_another_replica_is_closed_here() {
        let mut r = reg(&[1, 2]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        drain(&mut r);
        r.handle_session_moved(DeviceId(1));
        let out = drain(&mut r);
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Close { conn: 10, reason, .. } if reason.contains("another coordinator replica"))));
        assert!(!r.is_online(DeviceId(1)));
        // A device with no session here: nothing happens.
        r.handle_session_moved(DeviceId(2));
        assert!(drain(&mut r).is_empty());
    }

    #[test]
    fn the_same_lease_learned_twice_is_one_lease() {
        let mut r = reg(&[1]);
        r.handle_lease(lease_on(1, [7; 32], 1));
        r.handle_lease(lease_on(1, [7; 32], 1));
        assert_eq!(r.leases.of(DeviceId(1)).len(), 1);
    }

    /// A routed service reaches its client only through an approved router: advertising alone
    /// routes nothing; approval gives the client the prefix through the router and the router
    /// its routes and `dests` rule; revocation takes both back in one delta each.
    #[test]
    fn routed_prefixes_follow_approval() {
        let p = policy::parse(
            br#"
[services.legacy-db]
routes = ["10.20.5.10/32"]
ports = ["tcp/5432"]
[[rules]]
from = ["alice"]
to = ["legacy-db"]
"#,
            "routes.toml",
        )
        .unwrap();
        let mut r = Registry::new(
            AddressPools::from_random([0; 5]),
            [dev(1), dev(2)],
            [],
            Some(p),
            vec![],
            vec![],
            0,
        );
        let net: Prefix = "10.20.0.0/16".parse().unwrap();
        let db: Prefix = "10.20.5.10/32".parse().unwrap();
        let adv = DeviceUpdate {
            advertise_routes: vec![net, "100.64.0.0/16".parse().unwrap()],
            ..DeviceUpdate::default()
        };
        r.handle_session_opened(DeviceId(2), 20, addr("10.0.0.2:1"), adv)
            .unwrap();
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::RoutesAdvertised { device, routes }
            if *device == DeviceId(2) && routes.contains(&net))));
        let netmap = |out: &[Output], conn: ConnId| {
            out.iter()
                .find_map(|o| match o {
                    Output::Send {
                        conn: c,
                        msg: CoordinatorMsg::Netmap(nm),
                    } if *c == conn => Some(nm.clone()),
                    _ => None,
                })
                .unwrap()
        };
        assert!(
            netmap(&out, 10).peers.is_empty(),
            "advertised but not approved"
        );
        assert!(netmap(&out, 20).me.routes.is_empty());
        let row = |prefix: Prefix, approved: bool| crate::store::RouteRow {
            device: DeviceId(2),
            prefix,
            advertised: true,
            approved,
        };
        // The overlay-overlapping prefix is never approved, even if the store says so.
        r.handle_routes(vec![
            row(net, true),
            row("100.64.0.0/16".parse().unwrap(), true),
        ]);
        let out = drain(&mut r);
        let delta = |out: &[Output], conn: ConnId| {
            out.iter()
                .find_map(|o| match o {
                    Output::Send {
                        conn: c,
                        msg: CoordinatorMsg::NetmapDelta(d),
                    } if *c == conn => Some(d.clone()),
                    _ => None,
                })
                .unwrap()
        };
        let d1 = delta(&out, 10);
        assert_eq!(d1.upsert.len(), 1);
        assert_eq!(d1.upsert[0].device_id, DeviceId(2));
        assert_eq!(d1.upsert[0].routes, vec![db]);
        let d2 = delta(&out, 20);
        assert_eq!(d2.me.as_ref().unwrap().routes, vec![net]);
        let rules = d2.inbound.unwrap();
        assert!(rules.iter().any(|f| f.dests == vec![db]));
        assert_eq!(d2.upsert.len(), 1, "the router learns its client as a peer");
        // Revoked: the client loses the router, the router its routes.
        r.handle_routes(vec![row(net, false)]);
        let out = drain(&mut r);
        assert_eq!(delta(&out, 10).remove, vec![DeviceId(2)]);
        assert!(delta(&out, 20).me.unwrap().routes.is_empty());
    }

    mod on_demand;
}
