//! The inbound packet filter: its rule types and the stateful [`Filter`] that enforces them.
//!
//! The coordinator compiles the policy into, for each device, the rules that say which source
//! overlay addresses may open which protocol/ports on it; the device enforces them on every
//! decrypted packet, plus replies to flows it opened itself. What no rule allows is dropped.

use serde::{Deserialize, Serialize};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::flows::{DenyCause, FlowVerdict, Role, ShadowVerdict};
use crate::peerset::{PeerSet, SetBook};
use crate::routes::Prefix;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP echo (IPv4) and ICMPv6 echo.
    Icmp,
}

/// A rule's literal source addresses, immutable and shared: the compiler gives every
/// destination of one rule and service the same list (one allocation, a pointer per rule), so
/// a dense policy costs O(rules × sources) addresses, not O(destinations × sources). On the
/// wire it is a plain list of addresses.
#[derive(Debug, Clone, Eq)]
pub struct Sources(Arc<[IpAddr]>);

// By content, but one shared list is equal to itself at once: sorting a device's rules
// compared the same thousands of addresses element by element (at 10 000 devices under a
// dense policy, most of a compile). `Arc`'s own equality skips the comparison for one
// allocation only when the pointee is sized, so a slice needs it spelled out.
impl PartialEq for Sources {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0[..] == other.0[..]
    }
}

// By content, as equality is.
impl std::hash::Hash for Sources {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0[..].hash(state);
    }
}

impl Ord for Sources {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.0, &other.0) {
            return std::cmp::Ordering::Equal;
        }
        self.0[..].cmp(&other.0[..])
    }
}

impl PartialOrd for Sources {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Sources {
    /// Whether `a` and `b` are the same shared list (not merely equal ones).
    pub fn ptr_eq(a: &Sources, b: &Sources) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// The shared list's address: the same for every clone of one list, and not reused by
    /// another list while a clone is held.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.0).cast::<IpAddr>() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Default for Sources {
    fn default() -> Sources {
        Sources(Arc::from(Vec::new()))
    }
}

impl std::ops::Deref for Sources {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        &self.0
    }
}

impl PartialEq<Vec<IpAddr>> for Sources {
    fn eq(&self, other: &Vec<IpAddr>) -> bool {
        *self.0 == **other
    }
}

impl From<Vec<IpAddr>> for Sources {
    fn from(v: Vec<IpAddr>) -> Sources {
        Sources(Arc::from(v))
    }
}

impl FromIterator<IpAddr> for Sources {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(it: I) -> Sources {
        Sources(it.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Sources {
    type Item = &'a IpAddr;
    type IntoIter = std::slice::Iter<'a, IpAddr>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Serialize for Sources {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.as_ref().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Sources {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sources, D::Error> {
        Vec::<IpAddr>::deserialize(d).map(Sources::from)
    }
}

/// An inclusive port range; a single port has `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

/// One inbound allowance on a device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FilterRule {
    /// The policy rule (or grant) this came from, for counters and explanations.
    pub rule: String,
    /// The service it opens.
    pub service: String,
    /// Overlay addresses of the devices allowed to open flows (literal addresses; protocol 2
    /// netmaps name populations in `source_sets` instead).
    #[serde(default, skip_serializing_if = "Sources::is_empty")]
    pub sources: Sources,
    /// Peer sets ([`crate::peerset::PeerSet`], by id, from the same netmap) whose members may
    /// also open flows. An id the netmap does not hold adds nobody.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_sets: Vec<u32>,
    pub proto: Proto,
    /// Destination ports (TCP/UDP); empty for ICMP.
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Coordinator time (ms since the epoch) after which the rule no longer applies.
    #[serde(default)]
    pub not_after_ms: Option<i64>,
    /// Routed destinations (on a subnet router or exit node): the rule opens flows to
    /// addresses inside these prefixes only, never to the device itself. Empty: the device's
    /// own addresses only, never a routed destination (see [`Filter::set_routed`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dests: Vec<Prefix>,
}

/// The destinations a device accepts from its peers and the sources it sends from: today its
/// own overlay addresses (a /32 and a /128); approved routed prefixes can join them later.
///
/// The data plane drops a decrypted packet whose destination is outside this set (a peer
/// must not use the device as a router into the networks behind it) and a packet from the TUN
/// whose source is outside it (this device must not send with an address it does not own).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalPrefixes {
    prefixes: Vec<(IpAddr, u8)>,
}

impl LocalPrefixes {
    /// The device's own addresses, each as a host prefix.
    pub fn own(addrs: impl IntoIterator<Item = IpAddr>) -> LocalPrefixes {
        LocalPrefixes {
            prefixes: addrs
                .into_iter()
                .map(|a| {
                    let a = canonical_ip(a);
                    (a, if a.is_ipv4() { 32 } else { 128 })
                })
                .collect(),
        }
    }

    /// Adds a routed prefix (`len` is clamped to the family's width; host bits are ignored).
    pub fn add_prefix(&mut self, addr: IpAddr, len: u8) {
        let addr = canonical_ip(addr);
        let width = if addr.is_ipv4() { 32 } else { 128 };
        self.prefixes.push((addr, len.min(width)));
    }

    /// Whether `ip` is inside one of the prefixes (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.prefixes.iter().any(|&(p, len)| match (p, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        })
    }

    /// The destination (`dst: true`) or source address of an IPv4/IPv6 packet, if it has a
    /// whole fixed header.
    pub fn packet_addr(packet: &[u8], dst: bool) -> Option<IpAddr> {
        match packet.first()? >> 4 {
            4 if packet.len() >= 20 => {
                let at = if dst { 16 } else { 12 };
                let b: [u8; 4] = packet.get(at..at + 4)?.try_into().ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(b)))
            }
            6 if packet.len() >= 40 => {
                let at = if dst { 24 } else { 8 };
                let b: [u8; 16] = packet.get(at..at + 16)?.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            }
            _ => None,
        }
    }
}

/// How many flows [`Filter::new`] callers usually allow.
pub const DEFAULT_MAX_FLOWS: usize = 65_536;

/// Idle timeout of an established TCP flow.
pub const TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(300);
/// Idle timeout of a TCP flow this device opened whose handshake has not completed.
pub const TCP_HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle timeout of a flow a peer opened that is not established yet: a TCP handshake not
/// completed by the peer's ACK, a UDP flow this device has not answered.
pub const PEER_HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle timeout of a TCP flow after a FIN or RST.
pub const TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
pub const UDP_TIMEOUT: Duration = Duration::from_secs(30);
pub const ICMP_TIMEOUT: Duration = Duration::from_secs(10);
/// When the table is full of live flows, expired ones are swept at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Most IPv6 extension headers walked before a packet is refused.
const MAX_EXT_HEADERS: usize = 8;

/// The filter's decision on an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny(DenyReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum DenyReason {
    /// No rule allows it and it is not a reply to a flow this device opened.
    #[error("no rule allows it")]
    NoRule,
    /// A rule matched but is past its `not_after_ms`.
    #[error("the rule that allowed it has expired")]
    Expired,
    /// Truncated or inconsistent IP/TCP/UDP/ICMP headers.
    #[error("malformed packet")]
    Malformed,
    /// A non-first fragment (its ports cannot be checked).
    #[error("non-first fragment")]
    Fragment,
    /// A protocol other than TCP, UDP and ICMP echo (and ICMP errors about tracked flows).
    #[error("unsupported protocol")]
    UnsupportedProtocol,
    /// A new flow while the connection table is full of live flows.
    #[error("connection table full")]
    TableFull,
    /// A new flow from a peer that already holds its share of the table in established flows.
    #[error("the peer holds its share of the connection table")]
    PeerQuota,
}

/// Counters since the filter was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterCounters {
    /// Inbound packets that opened a flow under a rule.
    pub allowed_new: u64,
    /// Inbound packets of a tracked flow (replies to our flows, later packets of allowed ones).
    pub allowed_tracked: u64,
    pub denied_no_rule: u64,
    pub denied_expired: u64,
    pub denied_malformed: u64,
    pub denied_fragment: u64,
    pub denied_unsupported: u64,
    pub denied_table_full: u64,
    /// New flows refused because their peer already held its share of the table.
    pub denied_peer_quota: u64,
    /// Half-open flows peers opened, evicted to make room for new flows.
    pub evicted_half_open: u64,
    /// Outbound flows that could not be recorded because the table was full (their replies
    /// will be denied).
    pub outbound_untracked: u64,
    /// Tracked flows cut because no rule allows them any more.
    pub flows_revoked: u64,
}

/// Traffic counted for flow records: packets and bytes each way (`out`: sent by this device)
/// and flows (connections) started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub connections: u64,
}

impl FlowCounts {
    fn is_zero(&self) -> bool {
        *self == FlowCounts::default()
    }

    /// Adds `o` (saturating).
    pub fn add(&mut self, o: &FlowCounts) {
        self.packets_out = self.packets_out.saturating_add(o.packets_out);
        self.bytes_out = self.bytes_out.saturating_add(o.bytes_out);
        self.packets_in = self.packets_in.saturating_add(o.packets_in);
        self.bytes_in = self.bytes_in.saturating_add(o.bytes_in);
        self.connections = self.connections.saturating_add(o.connections);
    }
}

/// What a [`FlowSample`] counts: the other end's address, this device's role, the protocol,
/// the destination port (ICMP: the echo request's type), and the verdict with the rule that
/// allowed it (inbound flows: the [`FilterRule::rule`] that opened it; `None` for flows this
/// device opened) or the reason it was denied.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    pub remote: IpAddr,
    pub role: Role,
    pub proto: Proto,
    pub port: u16,
    pub verdict: FlowVerdict,
    pub rule: Option<Arc<str>>,
    pub reason: Option<DenyCause>,
    /// The candidate rules' verdict (see [`Filter::set_shadow_rules`]): for flows peers opened
    /// and new flows denied by the rules, when candidate rules are set; else `None`.
    pub shadow: Option<ShadowVerdict>,
}

/// Traffic of one kind of flow since the last [`Filter::take_samples`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSample {
    pub key: SampleKey,
    pub counts: FlowCounts,
}

/// Most distinct samples kept between two [`Filter::take_samples`] calls for flows that left
/// the table and for denied packets; past it, new kinds are counted in
/// [`Filter::take_samples`]'s dropped count instead.
pub const MAX_PENDING_SAMPLES: usize = 16_384;

/// Samples for flow records, kept by the filter between harvests (bounded).
#[derive(Debug, Default)]
struct Pending {
    samples: HashMap<SampleKey, FlowCounts>,
    /// Samples that found no room, since the last harvest.
    dropped: u64,
}

impl Pending {
    fn add(&mut self, key: SampleKey, c: &FlowCounts) {
        if c.is_zero() {
            return;
        }
        if let Some(have) = self.samples.get_mut(&key) {
            have.add(c);
        } else if self.samples.len() < MAX_PENDING_SAMPLES {
            self.samples.insert(key, *c);
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }
}

/// The stateful inbound packet filter of one device.
///
/// Drive it with every IP packet this device sends ([`Filter::handle_outbound`], which records
/// the flow so replies pass) and every decrypted packet from a peer
/// ([`Filter::check_inbound`]); replace the rules with [`Filter::set_rules`] whenever the
/// netmap changes. Time comes in as `now` (for idle timeouts) and as coordinator time in ms (for
/// rule expiry); the filter reads no clock and draws no random numbers (the hash seed is passed
/// to [`Filter::with_seed`]).
///
/// An inbound packet passes iff a rule allows it right now (source address, protocol,
/// destination port; ICMP: echo requests) — the flow is then tracked — or it belongs to a
/// tracked flow: a reply to one this device opened (TCP/UDP reversed 5-tuple, ICMP echo id), a
/// later packet of a flow a still-valid rule allowed, or an ICMP error about a tracked flow.
/// Non-first fragments, other protocols and malformed headers are denied.
///
/// The flow table is bounded ([`FlowLimits`]) so that no peer can fill it for others: flows
/// peers open may use all but `reserved_local` slots (those are for flows this device opens),
/// one peer (source address) may hold at most `per_peer` of them, and a peer's flow gets the
/// long idle timeout only once established (TCP: the peer's ACK completed the handshake;
/// UDP/ICMP: this device answered). Until then it is half-open: it lives
/// [`PEER_HALF_OPEN_TIMEOUT`] and is the first to go when room is needed — a peer at its quota
/// evicts its own oldest half-open flow, and when the peers' part or the whole table is full,
/// expired flows are swept and then the peer holding the most flows loses its oldest half-open
/// one. Flows this device opened are never evicted. When no flow can go, the new flow is
/// denied (fail closed).
///
/// Flow accounting: each tracked flow counts its packets and bytes each way in its table entry
/// (no other lookup per packet); denied packets are counted by kind. [`Filter::take_samples`]
/// harvests both (and what flows that left the table had counted) as [`FlowSample`]s.
///
/// Candidate rules ([`Filter::set_shadow_rules`], the policy's shadow view) are never
/// enforced: they are matched once when a peer's flow enters the table (and once per new flow
/// the rules deny), and the would-verdict rides along in the flow's samples. Packets of a
/// tracked flow never look at them.
pub struct Filter {
    rules: Vec<FilterRule>,
    /// The routed prefixes this device forwards to: rules without `dests` never open flows to
    /// addresses inside them.
    routed: Vec<Prefix>,
    /// Candidate rules and their index by source; `None`: no candidate view.
    shadow: Option<(Vec<FilterRule>, SourceIndex)>,
    /// `rules[i].rule`, shared by the samples that name it.
    rule_names: Vec<Arc<str>>,
    pending: Pending,
    by_source: SourceIndex,
    /// The peer sets the rules (and candidate rules) name, by id.
    sets: SetBook,
    /// Seeds the source indexes' hash.
    seed: u64,
    flows: HashMap<FlowKey, Flow, Seeded>,
    max_flows: usize,
    limits: FlowLimits,
    /// Per peer (source address): the flows it opened, in insertion order (keys may be stale:
    /// checked when popped), and how many it holds now.
    peers: HashMap<IpAddr, PeerFlows, Seeded>,
    /// Flows peers opened (the sum of `peers[..].count`).
    peer_flows: usize,
    last_sweep: Option<Instant>,
    counters: FilterCounters,
    /// New flows refused since the last [`Filter::take_denied`], by (source, proto, port);
    /// at most [`MAX_DENIED_LOG`] entries (a flood only bumps counts of known entries).
    denied: BTreeMap<(IpAddr, Proto, u16), u32>,
}

/// Most distinct refused flows remembered between two [`Filter::take_denied`] calls.
pub const MAX_DENIED_LOG: usize = 1024;

/// How the flow table is shared (see [`Filter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Most flows tracked in all.
    pub max_flows: usize,
    /// Slots only flows this device opens may use.
    pub reserved_local: usize,
    /// Most flows one peer (source address) may hold.
    pub per_peer: usize,
}

impl FlowLimits {
    /// The default sharing of a table of `max_flows`: a quarter reserved for this device's own
    /// flows, and one peer at most an eighth of the rest (for 65 536: 16 384 reserved, 6 144
    /// per peer).
    pub fn for_table(max_flows: usize) -> FlowLimits {
        let max_flows = max_flows.max(1);
        let reserved_local = max_flows / 4;
        FlowLimits {
            max_flows,
            reserved_local,
            per_peer: ((max_flows - reserved_local) / 8).max(1),
        }
    }
}

#[derive(Debug, Default)]
struct PeerFlows {
    count: usize,
    order: VecDeque<FlowKey>,
}

impl Filter {
    /// A filter with no rules (default deny) and room for `max_flows` tracked flows.
    pub fn new(max_flows: usize) -> Self {
        Self::with_seed(max_flows, 0)
    }

    /// Like [`Filter::new`], with a seed for the table's hash (pass a random one so remote
    /// parties cannot aim for hash collisions).
    pub fn with_seed(max_flows: usize, seed: u64) -> Self {
        Self::with_limits(FlowLimits::for_table(max_flows), seed)
    }

    /// Like [`Filter::with_seed`], with the table's sharing given.
    pub fn with_limits(limits: FlowLimits, seed: u64) -> Self {
        let limits = FlowLimits {
            max_flows: limits.max_flows.max(1),
            reserved_local: limits
                .reserved_local
                .min(limits.max_flows.saturating_sub(1)),
            per_peer: limits.per_peer.max(1),
        };
        Filter {
            rules: Vec::new(),
            routed: Vec::new(),
            shadow: None,
            rule_names: Vec::new(),
            pending: Pending::default(),
            by_source: SourceIndex::new(Seeded(seed)),
            sets: SetBook::new(),
            seed,
            flows: HashMap::with_hasher(Seeded(seed ^ 0x9e37_79b9_7f4a_7c15)),
            max_flows: limits.max_flows,
            limits,
            peers: HashMap::with_hasher(Seeded(seed ^ 0x5851_f42d_4c95_7f2d)),
            peer_flows: 0,
            last_sweep: None,
            counters: FilterCounters::default(),
            denied: BTreeMap::new(),
        }
    }

    /// Replaces the rules. Tracked flows that peers opened and that no rule allows any more are
    /// cut (a revoked grant ends established connections too); flows this device opened stay.
    /// Rules naming peer sets use the sets last given to [`Filter::set_rules_with_sets`].
    pub fn set_rules(&mut self, rules: Vec<FilterRule>) {
        // Counts so far belong to the rules that allowed them: move them out first.
        self.collect_flows();
        let by_source = index_sources(&rules, &self.sets, Seeded(self.seed));
        self.rule_names = rules.iter().map(|r| Arc::from(r.rule.as_str())).collect();
        self.rules = rules;
        self.by_source = by_source;
        let mut revoked = 0;
        let keys: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| matches!(f.origin, Origin::Remote { .. }))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let m = self.match_rules(k.remote, k.local, k.proto, k.local_port, None);
            let Some(f) = self.flows.get_mut(&k) else {
                continue;
            };
            match m {
                RuleMatch::Allowed { not_after_ms, rule }
                | RuleMatch::ExpiredOnly { not_after_ms, rule } => {
                    f.origin = Origin::Remote { not_after_ms };
                    f.rule = rule;
                }
                RuleMatch::None => {
                    f.origin = Origin::Revoked;
                    revoked += 1;
                }
            }
        }
        self.counters.flows_revoked += revoked;
    }

    /// Replaces the rules and the peer sets they (and the candidate rules) name, as one step:
    /// a netmap's `inbound` with its `peer_sets`. A rule naming a set not in `sets` gets no
    /// sources from it (it allows nothing more).
    pub fn set_rules_with_sets(&mut self, rules: Vec<FilterRule>, sets: &[PeerSet]) {
        let sets = crate::peerset::book(sets);
        if sets != self.sets {
            self.sets = sets;
            // The candidate rules name the same sets.
            let shadow = self.shadow.take().map(|(r, _)| r);
            self.set_shadow_rules(shadow);
        }
        self.set_rules(rules);
    }

    /// The peer sets set by [`Filter::set_rules_with_sets`].
    pub fn peer_sets(&self) -> &SetBook {
        &self.sets
    }

    /// Replaces the routed prefixes this device forwards to (its approved routes). Rules
    /// without `dests` stop applying to addresses inside them; flows peers opened are judged
    /// again, as by [`Filter::set_rules`].
    pub fn set_routed(&mut self, routed: Vec<Prefix>) {
        if self.routed == routed {
            return;
        }
        self.routed = routed;
        let rules = std::mem::take(&mut self.rules);
        self.set_rules(rules);
    }

    /// The routed prefixes set by [`Filter::set_routed`].
    pub fn routed(&self) -> &[Prefix] {
        &self.routed
    }

    /// Replaces the candidate rules (`None`: no candidate view). They allow nothing; flows
    /// peers opened are judged against them again (their counts so far keep the old verdict),
    /// and new flows are judged when they start.
    pub fn set_shadow_rules(&mut self, rules: Option<Vec<FilterRule>>) {
        self.collect_flows();
        self.shadow = rules.map(|r| {
            let ix = index_sources(&r, &self.sets, Seeded(self.seed));
            (r, ix)
        });
        let keys: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| !matches!(f.origin, Origin::Local))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let v = self.shadow_verdict(k.remote, k.local, k.proto, k.local_port, None);
            if let Some(f) = self.flows.get_mut(&k) {
                f.shadow = v;
            }
        }
    }

    /// The candidate rules, if any.
    pub fn shadow_rules(&self) -> Option<&[FilterRule]> {
        self.shadow.as_ref().map(|(r, _)| r.as_slice())
    }

    /// What the candidate rules say about `src` opening `proto`/`port` here (`None`: no
    /// candidate rules). With `coord_ms`, expired candidate rules do not allow.
    fn shadow_verdict(
        &self,
        src: IpAddr,
        dst: IpAddr,
        proto: Proto,
        port: u16,
        coord_ms: Option<i64>,
    ) -> Option<ShadowVerdict> {
        let (rules, ix) = self.shadow.as_ref()?;
        Some(
            match match_in(rules, ix, &self.routed, src, dst, proto, port, coord_ms) {
                RuleMatch::Allowed { .. } => ShadowVerdict::WouldAllow,
                RuleMatch::ExpiredOnly { .. } | RuleMatch::None => ShadowVerdict::WouldDeny,
            },
        )
    }

    /// The current rules.
    pub fn rules(&self) -> &[FilterRule] {
        &self.rules
    }

    /// An IP packet this device is sending: records its flow so the replies pass.
    pub fn handle_outbound(&mut self, packet: &[u8], now: Instant) {
        self.handle_outbound_run(packet, now, 1, packet.len() as u64);
    }

    /// Like [`Filter::handle_outbound`] for a run of `packets` packets of `bytes` in all whose
    /// flow-relevant headers are those of `packet`: the flow is recorded once, the traffic
    /// counted in full.
    pub fn handle_outbound_run(&mut self, packet: &[u8], now: Instant, packets: u64, bytes: u64) {
        let Ok(p) = parse_packet(packet, true) else {
            // An ICMP error about a packet of a tracked flow (a port unreachable, a
            // fragmentation needed) is that flow's traffic: counted with it, nothing else.
            if let Some(f) = outbound_error_flow(packet).and_then(|k| self.flows.get_mut(&k)) {
                if f.expires > now && !matches!(f.origin, Origin::Revoked) {
                    f.counts.packets_out = f.counts.packets_out.saturating_add(packets);
                    f.counts.bytes_out = f.counts.bytes_out.saturating_add(bytes);
                }
            }
            return;
        };
        let (key, tcp_flags, may_open) = match p.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let syn_only = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
                (key(Proto::Tcp, p.src, sport, p.dst, dport), flags, syn_only)
            }
            L4::Udp { sport, dport } => (key(Proto::Udp, p.src, sport, p.dst, dport), 0, true),
            L4::Echo { request, id } => (
                key(Proto::Icmp, p.src, id, p.dst, echo_dir(!request)),
                0,
                request,
            ),
            L4::IcmpError { .. } => return,
        };
        if let Some(f) = self.flows.get_mut(&key) {
            if f.expires > now {
                f.counts.packets_out = f.counts.packets_out.saturating_add(packets);
                f.counts.bytes_out = f.counts.bytes_out.saturating_add(bytes);
                if !matches!(f.origin, Origin::Revoked) {
                    f.seen_out = true;
                    let from_opener = matches!(f.origin, Origin::Local);
                    f.touch(key.proto, tcp_flags, now, from_opener);
                }
                return;
            }
        }
        let counts = FlowCounts {
            packets_out: packets,
            bytes_out: bytes,
            connections: u64::from(may_open),
            ..FlowCounts::default()
        };
        if !may_open {
            // Not a flow's first packet (e.g. the rest of one that idled out): counted as a
            // flow this device initiated, not tracked.
            let k = self.sample_key_of(&key, Role::Initiator, NO_RULE);
            self.pending.add(k, &counts);
            return;
        }
        let flow = Flow {
            origin: Origin::Local,
            expires: now,
            seen_in: false,
            seen_out: true,
            closing: false,
            established: false,
            rule: NO_RULE,
            counts,
            shadow: None,
        };
        if self.insert(key, flow, tcp_flags, now).is_err() {
            self.counters.outbound_untracked += 1;
            let k = self.sample_key_of(&key, Role::Initiator, NO_RULE);
            self.pending.add(k, &counts);
        }
    }

    /// A decrypted packet from a peer (its inner source already checked against the peer).
    pub fn check_inbound(
        &mut self,
        packet: &[u8],
        now: Instant,
        coordinator_now_ms: i64,
    ) -> Verdict {
        let v = self.decide(packet, now, coordinator_now_ms);
        if let Verdict::Deny(reason) = v {
            self.log_denied(packet, reason, coordinator_now_ms);
        }
        let c = &mut self.counters;
        match v {
            Verdict::Allow => {}
            Verdict::Deny(DenyReason::NoRule) => c.denied_no_rule += 1,
            Verdict::Deny(DenyReason::Expired) => c.denied_expired += 1,
            Verdict::Deny(DenyReason::Malformed) => c.denied_malformed += 1,
            Verdict::Deny(DenyReason::Fragment) => c.denied_fragment += 1,
            Verdict::Deny(DenyReason::UnsupportedProtocol) => c.denied_unsupported += 1,
            Verdict::Deny(DenyReason::TableFull) => c.denied_table_full += 1,
            Verdict::Deny(DenyReason::PeerQuota) => c.denied_peer_quota += 1,
        }
        v
    }

    /// The refused new flows since the last call (for scan detection at the coordinator).
    pub fn take_denied(&mut self) -> Vec<crate::wire::DeniedFlow> {
        std::mem::take(&mut self.denied)
            .into_iter()
            .map(|((src, proto, port), count)| crate::wire::DeniedFlow {
                src,
                proto,
                port,
                count,
            })
            .collect()
    }

    /// A packet from a peer that this device drops, with why, for the flow records: `packet`
    /// is the decrypted IP packet; `remote` the address it is counted against (the peer's own
    /// address when its inner source is spoofed; else the packet's source).
    pub fn note_dropped_inbound(&mut self, packet: &[u8], remote: Option<IpAddr>, why: DenyCause) {
        let Some((src, proto, port)) = sample_target(packet, false) else {
            return;
        };
        let target = (remote.unwrap_or(src), proto, port);
        self.add_denied(target, Role::Responder, why, None, packet);
    }

    /// A packet this device tried to send and dropped (no peer holds the destination), with
    /// why, for the flow records.
    pub fn note_dropped_outbound(&mut self, packet: &[u8], why: DenyCause) {
        let Some((dst, proto, port)) = sample_target(packet, true) else {
            return;
        };
        let k = SampleKey {
            remote: dst,
            role: Role::Initiator,
            proto,
            port,
            verdict: FlowVerdict::Denied,
            rule: None,
            reason: Some(why),
            shadow: None,
        };
        let c = FlowCounts {
            packets_out: 1,
            bytes_out: packet.len() as u64,
            connections: 1,
            ..FlowCounts::default()
        };
        self.pending.add(k, &c);
    }

    fn add_denied(
        &mut self,
        (remote, proto, port): (IpAddr, Proto, u16),
        role: Role,
        why: DenyCause,
        shadow: Option<ShadowVerdict>,
        packet: &[u8],
    ) {
        let k = SampleKey {
            remote: canonical_ip(remote),
            role,
            proto,
            port,
            verdict: FlowVerdict::Denied,
            rule: None,
            reason: Some(why),
            shadow,
        };
        let c = FlowCounts {
            packets_in: 1,
            bytes_in: packet.len() as u64,
            connections: 1,
            ..FlowCounts::default()
        };
        self.pending.add(k, &c);
    }

    /// The traffic counted since the last call, as samples (each kind once), and how many
    /// samples were dropped because [`MAX_PENDING_SAMPLES`] was reached. Walks the flow table
    /// (call it every few seconds, not per packet).
    pub fn take_samples(&mut self) -> (Vec<FlowSample>, u64) {
        self.collect_flows();
        let pending = std::mem::take(&mut self.pending);
        let samples = pending
            .samples
            .into_iter()
            .map(|(key, counts)| FlowSample { key, counts })
            .collect();
        (samples, pending.dropped)
    }

    /// Moves every tracked flow's counts into the pending samples.
    fn collect_flows(&mut self) {
        let (flows, pending, names) = (&mut self.flows, &mut self.pending, &self.rule_names);
        for (k, f) in flows.iter_mut() {
            retire(pending, names, k, f);
        }
    }

    fn sample_key_of(&self, k: &FlowKey, role: Role, rule: u32) -> SampleKey {
        sample_key(&self.rule_names, k, role, rule)
    }

    fn log_denied(&mut self, packet: &[u8], reason: DenyReason, coord_ms: i64) {
        let cause = match reason {
            DenyReason::NoRule => DenyCause::NoRule,
            DenyReason::Expired => DenyCause::Expired,
            DenyReason::Malformed | DenyReason::Fragment | DenyReason::UnsupportedProtocol => {
                DenyCause::Malformed
            }
            DenyReason::TableFull | DenyReason::PeerQuota => DenyCause::Other,
        };
        if let Some((src, proto, port)) = sample_target(packet, false) {
            // A new flow the rules refused: would the candidate rules have let it start? (Only
            // what could start a flow: TCP/UDP, ICMP echo requests.)
            let opens = match proto {
                Proto::Icmp => port == echo_request_type(src),
                Proto::Tcp | Proto::Udp => true,
            };
            let shadow = if opens && matches!(reason, DenyReason::NoRule | DenyReason::Expired) {
                let dst = LocalPrefixes::packet_addr(packet, true).unwrap_or(src);
                self.shadow_verdict(src, dst, proto, port, Some(coord_ms))
            } else {
                None
            };
            self.add_denied((src, proto, port), Role::Responder, cause, shadow, packet);
        }
        if !matches!(reason, DenyReason::NoRule | DenyReason::Expired) {
            return;
        }
        let Ok(p) = parse_packet(packet, false) else {
            return;
        };
        let (proto, port) = match p.l4 {
            L4::Tcp { dport, .. } => (Proto::Tcp, dport),
            L4::Udp { dport, .. } => (Proto::Udp, dport),
            L4::Echo { .. } => (Proto::Icmp, 0),
            L4::IcmpError { .. } => return,
        };
        let key = (p.src, proto, port);
        if let Some(n) = self.denied.get_mut(&key) {
            *n = n.saturating_add(1);
        } else if self.denied.len() < MAX_DENIED_LOG {
            self.denied.insert(key, 1);
        }
    }

    /// Drops every flow idle past its timeout. Optional: lookups ignore expired flows and a full
    /// table sweeps itself, but a periodic call keeps memory low.
    pub fn expire(&mut self, now: Instant) {
        let (peers, peer_flows) = (&mut self.peers, &mut self.peer_flows);
        let (pending, names) = (&mut self.pending, &self.rule_names);
        self.flows.retain(|k, f| {
            let keep = f.expires > now;
            if !keep {
                retire(pending, names, k, f);
                forget(peers, peer_flows, k, f);
            }
            keep
        });
        self.last_sweep = Some(now);
    }

    /// Tracked flows (including expired ones not yet swept, and cut flows remembered so that
    /// this device's own packets cannot reopen them).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn counters(&self) -> FilterCounters {
        self.counters
    }

    fn decide(&mut self, packet: &[u8], now: Instant, coord_ms: i64) -> Verdict {
        let p = match parse_packet(packet, false) {
            Ok(p) => p,
            Err(r) => return Verdict::Deny(r),
        };
        let (key, tcp_flags, rule_port, may_open) = match p.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => (
                key(Proto::Tcp, p.dst, dport, p.src, sport),
                flags,
                dport,
                true,
            ),
            L4::Udp { sport, dport } => {
                (key(Proto::Udp, p.dst, dport, p.src, sport), 0, dport, true)
            }
            L4::Echo { request, id } => (
                key(Proto::Icmp, p.dst, id, p.src, echo_dir(request)),
                0,
                0,
                request,
            ),
            L4::IcmpError { inner } => {
                // About a packet this device sent: the embedded header is ours, outbound. It
                // is counted with that flow (no new flow, no connection).
                let from_remote = inner.remote == canonical_ip(p.src);
                match self.flows.get_mut(&inner) {
                    Some(f)
                        if from_remote
                            && f.expires > now
                            && !matches!(f.origin, Origin::Revoked) =>
                    {
                        f.counts.packets_in = f.counts.packets_in.saturating_add(1);
                        f.counts.bytes_in = f.counts.bytes_in.saturating_add(packet.len() as u64);
                        self.counters.allowed_tracked += 1;
                        return Verdict::Allow;
                    }
                    _ => return Verdict::Deny(DenyReason::NoRule),
                }
            }
        };
        let mut tombstone = false;
        if let Some(f) = self.flows.get_mut(&key) {
            if f.expires > now {
                let valid = match f.origin {
                    Origin::Local => true,
                    Origin::Remote { not_after_ms } => match not_after_ms {
                        Some(t) => coord_ms < t,
                        None => true,
                    },
                    Origin::Revoked => false,
                };
                if valid && (may_open || matches!(f.origin, Origin::Local)) {
                    f.counts.packets_in = f.counts.packets_in.saturating_add(1);
                    f.counts.bytes_in = f.counts.bytes_in.saturating_add(packet.len() as u64);
                    f.seen_in = true;
                    let from_opener = !matches!(f.origin, Origin::Local);
                    f.touch(key.proto, tcp_flags, now, from_opener);
                    self.counters.allowed_tracked += 1;
                    return Verdict::Allow;
                }
                tombstone = true;
            }
        }
        if !may_open {
            return Verdict::Deny(DenyReason::NoRule);
        }
        match self.match_rules(key.remote, key.local, key.proto, rule_port, Some(coord_ms)) {
            RuleMatch::Allowed { not_after_ms, rule } => {
                let shadow = self.shadow_verdict(
                    key.remote,
                    key.local,
                    key.proto,
                    rule_port,
                    Some(coord_ms),
                );
                let flow = Flow {
                    shadow,
                    origin: Origin::Remote { not_after_ms },
                    expires: now,
                    seen_in: true,
                    seen_out: false,
                    closing: false,
                    established: false,
                    rule,
                    counts: FlowCounts {
                        packets_in: 1,
                        bytes_in: packet.len() as u64,
                        connections: 1,
                        ..FlowCounts::default()
                    },
                };
                match self.insert(key, flow, tcp_flags, now) {
                    Ok(()) => {
                        self.counters.allowed_new += 1;
                        Verdict::Allow
                    }
                    Err(reason) => Verdict::Deny(reason),
                }
            }
            m @ (RuleMatch::ExpiredOnly { .. } | RuleMatch::None) => {
                let expired = matches!(m, RuleMatch::ExpiredOnly { .. });
                if let Some(f) = self.flows.get_mut(&key) {
                    if tombstone || matches!(f.origin, Origin::Remote { .. }) {
                        // Keep the cut flow remembered while the peer keeps trying.
                        f.origin = Origin::Revoked;
                        f.touch(key.proto, tcp_flags, now, true);
                    }
                }
                Verdict::Deny(if expired {
                    DenyReason::Expired
                } else {
                    DenyReason::NoRule
                })
            }
        }
    }

    /// Which rules allow `src` to open `proto`/`port` here. With `coord_ms`, expired rules do
    /// not allow; without, expiry is ignored. `not_after_ms` is the latest of the matching
    /// rules (`None` if one never expires).
    fn match_rules(
        &self,
        src: IpAddr,
        dst: IpAddr,
        proto: Proto,
        port: u16,
        coord_ms: Option<i64>,
    ) -> RuleMatch {
        match_in(
            &self.rules,
            &self.by_source,
            &self.routed,
            src,
            dst,
            proto,
            port,
            coord_ms,
        )
    }

    /// Inserts (or replaces) a flow, making room as the type's doc says; the reason it was
    /// refused otherwise.
    fn insert(
        &mut self,
        key: FlowKey,
        mut flow: Flow,
        tcp_flags: u8,
        now: Instant,
    ) -> Result<(), DenyReason> {
        if let Some(mut old) = self.flows.remove(&key) {
            retire(&mut self.pending, &self.rule_names, &key, &mut old);
            forget(&mut self.peers, &mut self.peer_flows, &key, &old);
        }
        let owner = owner_of(&key, &flow);
        if let Some(peer) = owner {
            let held = self.peers.get(&peer).map_or(0, |p| p.count);
            if held >= self.limits.per_peer && !self.evict_from(peer, now) {
                return Err(DenyReason::PeerQuota);
            }
            let peer_room = self.max_flows - self.limits.reserved_local;
            while self.peer_flows >= peer_room {
                if !self.make_room(now) {
                    return Err(DenyReason::TableFull);
                }
            }
        }
        while self.flows.len() >= self.max_flows {
            if !self.make_room(now) {
                return Err(DenyReason::TableFull);
            }
        }
        flow.touch(key.proto, tcp_flags, now, true);
        self.flows.insert(key, flow);
        if let Some(peer) = owner {
            self.peer_flows += 1;
            let p = self.peers.entry(peer).or_default();
            p.count += 1;
            p.order.push_back(key);
            if p.order.len() > 2 * p.count + 64 {
                // Drop the keys of flows that are gone, so the queue stays near the count.
                let flows = &self.flows;
                p.order
                    .retain(|k| flows.get(k).is_some_and(|f| owner_of(k, f) == Some(peer)));
            }
        }
        Ok(())
    }

    /// Frees one slot: sweeps expired flows (at most every [`SWEEP_INTERVAL`]), else evicts a
    /// half-open flow of the peer holding the most. False if nothing could go.
    fn make_room(&mut self, now: Instant) -> bool {
        let due = self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL);
        if due {
            let before = self.flows.len();
            self.expire(now);
            if self.flows.len() < before {
                return true;
            }
        }
        let mut by_size: Vec<(usize, IpAddr)> =
            self.peers.iter().map(|(ip, p)| (p.count, *ip)).collect();
        by_size.sort_unstable_by(|a, b| b.cmp(a));
        by_size
            .into_iter()
            .any(|(_, peer)| self.evict_from(peer, now))
    }

    /// Evicts `peer`'s oldest flow that is half-open, cut or expired. False if it has none.
    fn evict_from(&mut self, peer: IpAddr, now: Instant) -> bool {
        loop {
            let Some(key) = self.peers.get_mut(&peer).and_then(|p| p.order.pop_front()) else {
                return false;
            };
            let Some(f) = self.flows.get(&key) else {
                continue;
            };
            if owner_of(&key, f) != Some(peer) {
                continue;
            }
            let evictable =
                f.expires <= now || !f.established || matches!(f.origin, Origin::Revoked);
            if !evictable {
                // Established flows stay until they idle out; it leaves the queue for good.
                continue;
            }
            if let Some(mut old) = self.flows.remove(&key) {
                retire(&mut self.pending, &self.rule_names, &key, &mut old);
                forget(&mut self.peers, &mut self.peer_flows, &key, &old);
                self.counters.evicted_half_open += 1;
                return true;
            }
        }
    }
}

/// The peer that opened a flow (`None`: this device opened it).
fn owner_of(key: &FlowKey, flow: &Flow) -> Option<IpAddr> {
    match flow.origin {
        Origin::Local => None,
        Origin::Remote { .. } | Origin::Revoked => Some(key.remote),
    }
}

/// Bookkeeping for a flow that left the table.
fn forget(
    peers: &mut HashMap<IpAddr, PeerFlows, Seeded>,
    peer_flows: &mut usize,
    key: &FlowKey,
    flow: &Flow,
) {
    let Some(peer) = owner_of(key, flow) else {
        return;
    };
    *peer_flows = peer_flows.saturating_sub(1);
    if let Some(p) = peers.get_mut(&peer) {
        p.count = p.count.saturating_sub(1);
        if p.count == 0 {
            peers.remove(&peer);
        }
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter")
            .field("rules", &self.rules.len())
            .field("flows", &self.flows.len())
            .field("max_flows", &self.max_flows)
            .field("limits", &self.limits)
            .field("peer_flows", &self.peer_flows)
            .field("counters", &self.counters)
            .finish()
    }
}

/// The first matching rule's index (`NO_RULE`: none).
enum RuleMatch {
    Allowed {
        not_after_ms: Option<i64>,
        rule: u32,
    },
    ExpiredOnly {
        not_after_ms: Option<i64>,
        rule: u32,
    },
    None,
}

/// A flow no rule index names (this device opened it).
const NO_RULE: u32 = u32::MAX;

/// Rule indices by source: exact (canonical) addresses, and the wider prefixes of peer sets
/// by prefix, with the prefix lengths present per family (a lookup masks the source once per
/// length: no allocation, a handful of hash probes).
struct SourceIndex {
    exact: HashMap<IpAddr, Vec<u32>, Seeded>,
    nets: HashMap<Prefix, Vec<u32>, Seeded>,
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

impl SourceIndex {
    fn new(hasher: Seeded) -> SourceIndex {
        SourceIndex {
            exact: HashMap::with_hasher(hasher.clone()),
            nets: HashMap::with_hasher(hasher),
            v4_lens: Vec::new(),
            v6_lens: Vec::new(),
        }
    }

    /// The indices of the rules whose sources hold `src` (ascending per part; a rule may
    /// appear more than once).
    fn get(&self, src: IpAddr) -> impl Iterator<Item = u32> + '_ {
        let src = canonical_ip(src);
        let lens = if src.is_ipv4() {
            &self.v4_lens
        } else {
            &self.v6_lens
        };
        self.exact.get(&src).into_iter().flatten().copied().chain(
            lens.iter()
                .filter_map(move |l| self.nets.get(&Prefix::new(src, *l)))
                .flatten()
                .copied(),
        )
    }
}

fn push_index(v: &mut Vec<u32>, i: u32) {
    if v.last() != Some(&i) {
        v.push(i);
    }
}

/// Indexes `rules` by source address, resolving the peer sets they name in `sets`.
fn index_sources(rules: &[FilterRule], sets: &SetBook, hasher: Seeded) -> SourceIndex {
    let mut ix = SourceIndex::new(hasher);
    for (i, r) in rules.iter().enumerate() {
        let Ok(i) = u32::try_from(i) else { break };
        for s in &r.sources {
            push_index(ix.exact.entry(canonical_ip(*s)).or_default(), i);
        }
        for id in &r.source_sets {
            // An unknown id adds nobody (fail closed).
            for p in sets.get(id).into_iter().flat_map(|v| v.iter()) {
                let host = if p.is_ipv4() { 32 } else { 128 };
                if p.len() == host {
                    push_index(ix.exact.entry(p.addr()).or_default(), i);
                } else {
                    push_index(ix.nets.entry(*p).or_default(), i);
                    let lens = if p.is_ipv4() {
                        &mut ix.v4_lens
                    } else {
                        &mut ix.v6_lens
                    };
                    if !lens.contains(&p.len()) {
                        lens.push(p.len());
                    }
                }
            }
        }
    }
    ix
}

/// Which of `rules` allow `src` to open `proto`/`port`. With `coord_ms`, expired rules do not
/// allow; without, expiry is ignored. `not_after_ms` is the latest of the matching rules
/// (`None` if one never expires).
#[allow(clippy::too_many_arguments)]
fn match_in(
    rules: &[FilterRule],
    by_source: &SourceIndex,
    routed: &[Prefix],
    src: IpAddr,
    dst: IpAddr,
    proto: Proto,
    port: u16,
    coord_ms: Option<i64>,
) -> RuleMatch {
    let mut best: Option<Option<i64>> = None;
    let mut expired: Option<Option<i64>> = None;
    let (mut best_rule, mut expired_rule) = (NO_RULE, NO_RULE);
    for i in by_source.get(src) {
        let Some(r) = rules.get(i as usize) else {
            continue;
        };
        if r.proto != proto || (proto != Proto::Icmp && !r.ports.iter().any(|x| x.contains(port))) {
            continue;
        }
        // A routed rule opens its routed destinations only; a device rule never opens one.
        let dst_ok = if r.dests.is_empty() {
            !routed.iter().any(|p| p.contains(dst))
        } else {
            r.dests.iter().any(|p| p.contains(dst))
        };
        if !dst_ok {
            continue;
        }
        let live = match (r.not_after_ms, coord_ms) {
            (Some(t), Some(now)) => now < t,
            _ => true,
        };
        let (slot, first) = if live {
            (&mut best, &mut best_rule)
        } else {
            (&mut expired, &mut expired_rule)
        };
        if *first == NO_RULE || i < *first {
            *first = i;
        }
        *slot = Some(match (*slot, r.not_after_ms) {
            (None, n) => n,
            (Some(None), _) | (Some(_), None) => None,
            (Some(Some(a)), Some(b)) => Some(a.max(b)),
        });
    }
    match (best, expired) {
        (Some(not_after_ms), _) => RuleMatch::Allowed {
            not_after_ms,
            rule: best_rule,
        },
        (None, Some(not_after_ms)) => RuleMatch::ExpiredOnly {
            not_after_ms,
            rule: expired_rule,
        },
        (None, None) => RuleMatch::None,
    }
}

/// Moves a flow's counts (if any) into the pending samples and zeroes them.
fn retire(pending: &mut Pending, names: &[Arc<str>], k: &FlowKey, f: &mut Flow) {
    if f.counts.is_zero() {
        return;
    }
    let role = match f.origin {
        Origin::Local => Role::Initiator,
        Origin::Remote { .. } | Origin::Revoked => Role::Responder,
    };
    let mut key = sample_key(names, k, role, f.rule);
    key.shadow = f.shadow;
    pending.add(key, &f.counts);
    f.counts = FlowCounts::default();
}

fn sample_key(names: &[Arc<str>], k: &FlowKey, role: Role, rule: u32) -> SampleKey {
    let port = match (k.proto, role) {
        (Proto::Icmp, _) => echo_request_type(k.remote),
        (_, Role::Initiator) => k.remote_port,
        (_, Role::Responder) => k.local_port,
    };
    SampleKey {
        remote: k.remote,
        role,
        proto: k.proto,
        port,
        verdict: FlowVerdict::Allowed,
        rule: names.get(rule as usize).cloned(),
        reason: None,
        shadow: None,
    }
}

/// The ICMP type of an echo request to or from `addr` (8, ICMPv6: 128).
fn echo_request_type(addr: IpAddr) -> u16 {
    if canonical_ip(addr).is_ipv4() {
        8
    } else {
        128
    }
}

/// The other end (`dst`: the destination; else the source), protocol and destination port
/// (ICMP: type) of a packet, as far as its headers can be read: for flow records of packets
/// that are dropped. `None` if not even the IP header and protocol are known.
fn sample_target(packet: &[u8], dst: bool) -> Option<(IpAddr, Proto, u16)> {
    let other = canonical_ip(LocalPrefixes::packet_addr(packet, dst)?);
    if let Ok(p) = parse_packet(packet, dst) {
        let (proto, port) = match p.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => (
                if matches!(p.l4, L4::Tcp { .. }) {
                    Proto::Tcp
                } else {
                    Proto::Udp
                },
                dport,
            ),
            L4::Echo { request, .. } => {
                let t = echo_request_type(other);
                let reply = if t == 8 { 0 } else { 129 };
                (Proto::Icmp, if request { t } else { reply })
            }
            L4::IcmpError { .. } => (Proto::Icmp, if other.is_ipv4() { 3 } else { 1 }),
        };
        return Some((other, proto, port));
    }
    let next = match packet.first()? >> 4 {
        4 => *packet.get(9)?,
        _ => *packet.get(6)?,
    };
    let proto = match next {
        6 => Proto::Tcp,
        17 => Proto::Udp,
        1 | 58 => Proto::Icmp,
        _ => return None,
    };
    Some((other, proto, 0))
}

/// A flow from this device's point of view (the same key for both directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: Proto,
    local: IpAddr,
    remote: IpAddr,
    /// TCP/UDP local port; ICMP echo identifier.
    local_port: u16,
    remote_port: u16,
}

fn key(proto: Proto, local: IpAddr, local_port: u16, remote: IpAddr, remote_port: u16) -> FlowKey {
    FlowKey {
        proto,
        local: canonical_ip(local),
        remote: canonical_ip(remote),
        local_port,
        remote_port,
    }
}

/// ICMP echo flows carry who sent the request in the key's remote port: 0 for this device's
/// requests, 1 for a peer's (so a peer cannot ride on an echo id this device used).
fn echo_dir(peer_requested: bool) -> u16 {
    u16::from(peer_requested)
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[derive(Debug, Clone, Copy)]
enum Origin {
    /// This device opened it: replies pass.
    Local,
    /// A peer opened it under a rule valid until `not_after_ms`.
    Remote { not_after_ms: Option<i64> },
    /// A peer's flow that no rule allows any more: remembered so this device's own packets on
    /// it do not reopen it as a local flow.
    Revoked,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    origin: Origin,
    expires: Instant,
    seen_in: bool,
    seen_out: bool,
    closing: bool,
    /// TCP: the opener acknowledged the answer (handshake complete); UDP/ICMP: answered.
    established: bool,
    /// The first rule that allowed a peer's flow (an index into the rules; `NO_RULE`: none).
    rule: u32,
    /// Traffic not yet harvested for flow records.
    counts: FlowCounts,
    /// Peers' flows: the candidate rules' verdict when the flow started (or when they were
    /// last replaced); `None` without candidate rules and for this device's own flows.
    shadow: Option<ShadowVerdict>,
}

impl Flow {
    /// A packet of the flow passed: `from_opener` is whether it went the way the flow was
    /// opened (outbound for this device's flows, inbound for a peer's).
    fn touch(&mut self, proto: Proto, tcp_flags: u8, now: Instant, from_opener: bool) {
        let answered = self.seen_in && self.seen_out;
        let peer_opened = !matches!(self.origin, Origin::Local);
        let timeout = match proto {
            Proto::Tcp => {
                if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                    self.closing = true;
                }
                let completes = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK;
                if answered && from_opener && completes {
                    self.established = true;
                }
                if self.closing {
                    TCP_CLOSING_TIMEOUT
                } else if self.established {
                    TCP_ESTABLISHED_TIMEOUT
                } else if peer_opened {
                    PEER_HALF_OPEN_TIMEOUT
                } else {
                    TCP_HALF_OPEN_TIMEOUT
                }
            }
            Proto::Udp | Proto::Icmp => {
                if answered {
                    self.established = true;
                }
                match proto {
                    Proto::Icmp => ICMP_TIMEOUT,
                    _ if self.established || !peer_opened => UDP_TIMEOUT,
                    _ => PEER_HALF_OPEN_TIMEOUT,
                }
            }
        };
        self.expires = now + timeout;
    }
}

/// SipHash keyed by a seed: deterministic for a given seed, no OS randomness.
#[derive(Debug, Clone)]
struct Seeded(u64);

impl BuildHasher for Seeded {
    type Hasher = DefaultHasher;
    fn build_hasher(&self) -> DefaultHasher {
        let mut h = DefaultHasher::new();
        h.write_u64(self.0);
        h
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

struct Parsed {
    src: IpAddr,
    dst: IpAddr,
    l4: L4,
}

enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Echo {
        request: bool,
        id: u16,
    },
    /// An ICMP error; `inner` is the flow of the packet it is about, as this device sent it.
    IcmpError {
        inner: FlowKey,
    },
}

/// Parses the headers the filter needs. `embedded_ok`: whether ICMP errors are parsed (not for
/// packets embedded in an ICMP error, and not needed outbound).
fn parse_packet(p: &[u8], outbound: bool) -> Result<Parsed, DenyReason> {
    let (src, dst, proto, l4) = ip_header(p, false)?;
    let l4 = match proto {
        6 => {
            if l4.len() < 20 {
                return Err(DenyReason::Malformed);
            }
            L4::Tcp {
                sport: be16(l4, 0),
                dport: be16(l4, 2),
                flags: l4[13],
            }
        }
        17 => {
            if l4.len() < 8 {
                return Err(DenyReason::Malformed);
            }
            L4::Udp {
                sport: be16(l4, 0),
                dport: be16(l4, 2),
            }
        }
        1 | 58 => {
            if l4.len() < 8 {
                return Err(DenyReason::Malformed);
            }
            let v6 = proto == 58;
            let ty = l4[0];
            match (v6, ty) {
                (false, 8) | (true, 128) => L4::Echo {
                    request: true,
                    id: be16(l4, 4),
                },
                (false, 0) | (true, 129) => L4::Echo {
                    request: false,
                    id: be16(l4, 4),
                },
                (false, 3 | 11 | 12) | (true, 1..=4) if !outbound => L4::IcmpError {
                    inner: embedded_flow(&l4[8..], v6)?,
                },
                _ => return Err(DenyReason::UnsupportedProtocol),
            }
        }
        _ => return Err(DenyReason::UnsupportedProtocol),
    };
    Ok(Parsed { src, dst, l4 })
}

/// For an ICMP error this device sends (about a TCP or UDP packet it received), the flow of
/// that packet, keyed as this device keys it; `None` for anything else.
fn outbound_error_flow(p: &[u8]) -> Option<FlowKey> {
    let (_, _, proto, l4) = ip_header(p, false).ok()?;
    let v6 = proto == 58;
    let error = matches!((proto, l4.first()?), (1, 3 | 11 | 12) | (58, 1..=4));
    if !error || l4.len() < 8 {
        return None;
    }
    // The embedded packet came from the other end: its source is the remote side.
    let k = embedded_flow(&l4[8..], v6).ok()?;
    matches!(k.proto, Proto::Tcp | Proto::Udp).then_some(FlowKey {
        proto: k.proto,
        local: k.remote,
        remote: k.local,
        local_port: k.remote_port,
        remote_port: k.local_port,
    })
}

/// The flow of the (truncated) packet inside an ICMP error, keyed as this device sent it.
fn embedded_flow(p: &[u8], v6: bool) -> Result<FlowKey, DenyReason> {
    if (p.first().map(|b| b >> 4) == Some(6)) != v6 {
        return Err(DenyReason::Malformed);
    }
    let (src, dst, proto, l4) = ip_header(p, true)?;
    if l4.len() < 8 {
        return Err(DenyReason::Malformed);
    }
    match proto {
        6 => Ok(key(Proto::Tcp, src, be16(l4, 0), dst, be16(l4, 2))),
        17 => Ok(key(Proto::Udp, src, be16(l4, 0), dst, be16(l4, 2))),
        1 | 58 if l4[0] == 8 || l4[0] == 128 => Ok(key(Proto::Icmp, src, be16(l4, 4), dst, 0)),
        _ => Err(DenyReason::UnsupportedProtocol),
    }
}

/// (source, destination, protocol, transport bytes). `truncated_ok`: the packet may be cut
/// short of its total length (as inside ICMP errors).
fn ip_header(p: &[u8], truncated_ok: bool) -> Result<(IpAddr, IpAddr, u8, &[u8]), DenyReason> {
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            if p.len() < 20 {
                return Err(DenyReason::Malformed);
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(be16(p, 2));
            if ihl < 20 || ihl > p.len() || total < ihl || (total > p.len() && !truncated_ok) {
                return Err(DenyReason::Malformed);
            }
            let frag = be16(p, 6);
            if frag & 0x1fff != 0 {
                return Err(DenyReason::Fragment);
            }
            let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
            let end = total.min(p.len());
            Ok((src, dst, p[9], &p[ihl..end]))
        }
        Some(6) => {
            if p.len() < 40 {
                return Err(DenyReason::Malformed);
            }
            let total = 40 + usize::from(be16(p, 4));
            if total > p.len() && !truncated_ok {
                return Err(DenyReason::Malformed);
            }
            let end = total.min(p.len());
            let mut src = [0u8; 16];
            src.copy_from_slice(&p[8..24]);
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&p[24..40]);
            let mut next = p[6];
            let mut off = 40;
            for _ in 0..MAX_EXT_HEADERS {
                match next {
                    0 | 43 | 60 => {
                        if off + 8 > end {
                            return Err(DenyReason::Malformed);
                        }
                        next = p[off];
                        off += (usize::from(p[off + 1]) + 1) * 8;
                    }
                    44 => {
                        if off + 8 > end {
                            return Err(DenyReason::Malformed);
                        }
                        if be16(p, off + 2) >> 3 != 0 {
                            return Err(DenyReason::Fragment);
                        }
                        next = p[off];
                        off += 8;
                    }
                    _ => {
                        if off > end {
                            return Err(DenyReason::Malformed);
                        }
                        return Ok((
                            IpAddr::V6(Ipv6Addr::from(src)),
                            IpAddr::V6(Ipv6Addr::from(dst)),
                            next,
                            &p[off..end],
                        ));
                    }
                }
            }
            Err(DenyReason::UnsupportedProtocol)
        }
        _ => Err(DenyReason::Malformed),
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[cfg(test)]
pub(crate) mod tests;
