//! The policy language and its compiler (I/O-free).
//!
//! A policy is a human-written TOML file (see `docs/policy.md`): groups of users, named posture
//! requirements, services (ports on sets of devices), rules (who may reach which services) and
//! tests (what must be allowed or denied). Nothing is allowed that no rule allows; an empty file
//! allows nothing.
//!
//! - [`parse`] turns bytes into a validated [`Policy`] or a [`PolicyError`] naming file, line and
//!   column. Input is bounded (size, counts, nesting) before the TOML parser sees it.
//! - [`warnings`] lists references to users, tags and devices the directory does not know (they
//!   may enroll later, so they are not errors).
//! - [`compile`] turns a policy plus the [`Directory`] (users, live devices, just-in-time grants)
//!   into per-device access: peers, inbound filter rules and the reach list.
//! - [`run_tests`] checks the policy's `[[tests]]`; a policy is applicable only if all pass.
//! - Shadow rules ([`RuleMode`]): a rule marked `shadow = true` is a candidate, compiled into
//!   [`DeviceAccess::shadow_inbound`] only (never enforced); `shadow_remove = true` keeps a rule
//!   enforced but drops it from the candidate view. Peers evaluate the candidate view on live
//!   traffic and report would-allow / would-deny in their flow records.
//! - [`explain`] says why a source may or may not reach a destination; [`diff`] says what access
//!   changes between two compilations.
//!
//! Time is passed in as `now_ms` (coordinator time, ms since the Unix epoch). A rule or grant with
//! an expiry `T` applies while `now_ms < T`.

mod compile;
mod explain;
mod parse;
mod peers;
mod routed;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::filter::{FilterRule, PortRange, Proto};
use crate::names::Hostname;
use crate::routes::Prefix;
use crate::wire::{DeviceId, Reach};

pub use compile::{
    carry_over, compile, reach_grants_of, reach_of, requirements_by_device, run_tests, same_at,
    TestOutcome,
};
pub use explain::{
    diff, diff_bounded, explain, AccessChange, CandidateVerdict, ChangeKind, DeviceExplanation,
    Explanation, Miss,
};
pub use parse::parse;
pub use peers::{PeerMask, Peers};
pub use routed::{
    auto_approved, carriers, compile_routes, explain_routed, RoutedExplanation, Router,
};

/// Largest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;
/// Most rules, services, tests, groups or posture requirements in one policy (each).
pub const MAX_ITEMS: usize = 10_000;
/// Deepest nesting of arrays, tables and dotted keys.
pub const MAX_NESTING: usize = 32;

/// A position in the policy file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A policy that cannot be used, with where and why: `policy.toml:12:5: group "eng" is not
/// defined`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub file: String,
    /// `None` when the error is about the whole file (too large, too many rules).
    pub pos: Option<Pos>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(f, "{}:{}:{}: {}", self.file, p.line, p.column, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Something worth telling the admin that does not make the policy unusable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyWarning {
    pub file: String,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: warning: {}",
            self.file, self.pos.line, self.pos.column, self.message
        )
    }
}

/// A parsed, validated policy. Every name a rule refers to (group, service, posture) exists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// The file name used in messages.
    pub file: String,
    /// Group name → member user names (the directory's groups are added at compile time).
    pub groups: BTreeMap<String, Group>,
    pub postures: BTreeMap<String, Posture>,
    pub services: BTreeMap<String, Service>,
    pub rules: Vec<Rule>,
    pub tests: Vec<PolicyTest>,
    /// `[trust]`: automatic quarantine and risk-adapted lease lifetimes.
    pub trust: Trust,
    /// `[auto_approvers]`: which devices get their advertised routes approved without an
    /// administrator.
    pub auto_approvers: AutoApprovers,
}

/// `[auto_approvers]`: advertised routes approved on their own. A device matching one of a
/// prefix's selectors gets every advertised route inside that prefix approved; one matching
/// `exit_node` gets its exit-node offer approved. Nothing else is approved without
/// `ward-coordinator device routes NAME --approve`; a prefix that overlaps the overlay pools is
/// never approved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AutoApprovers {
    pub routes: Vec<(Located<Prefix>, Vec<Located<Selector>>)>,
    pub exit_node: Vec<Located<Selector>>,
}

/// `[trust]`: how the coordinator reacts to risk on its own, without an admin. Every automatic
/// reaction is off unless its key is set; the section only ever narrows access (quarantine,
/// shorter leases), never widens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// A device failing a posture requirement that some rule needs for longer than this is
    /// quarantined automatically (`quarantine_after_failing`). `None`: never automatically.
    pub quarantine_after_failing_ms: Option<u64>,
    /// A source device whose denied flows (distinct destination device + protocol + port) within
    /// `scan_window_ms` reach this count is quarantined automatically: it is probing the network
    /// (`scan_denied_flows`). `None`: never automatically.
    pub scan_denied_flows: Option<u32>,
    /// The sliding window for `scan_denied_flows` (`scan_window`, default 60 s).
    pub scan_window_ms: u64,
    /// Lease TTL for a device that failed a posture check or was quarantined recently
    /// (`risky_lease_ttl`): a risky device has to come back for a fresh decision sooner.
    /// `None`: the normal TTL.
    pub risky_lease_ttl_ms: Option<u64>,
    /// …until it has been clean (all posture checks passing, not quarantined) this long
    /// (`clean_after`, default 30 min).
    pub clean_after_ms: u64,
    /// Behaviour risk (0–100) above which a device counts as risky: `risky_lease_ttl` applies
    /// (`risk_threshold`, default 40).
    pub risk_threshold: u8,
    /// A device whose behaviour risk goes above this is quarantined automatically
    /// (`quarantine_above_risk`). `None`: never automatically.
    pub quarantine_above_risk: Option<u8>,
    /// An anomaly an admin acknowledges as malicious quarantines its device
    /// (`quarantine_malicious`, default off).
    pub quarantine_malicious: bool,
    /// How long a device's behaviour is only learned before anomalies are raised
    /// (`behaviour_learning`, default 7 days).
    pub behaviour_learning_ms: u64,
}

impl Trust {
    /// `scan_window` when the policy does not set it.
    pub const DEFAULT_SCAN_WINDOW_MS: u64 = 60_000;
    /// `clean_after` when the policy does not set it.
    pub const DEFAULT_CLEAN_AFTER_MS: u64 = 30 * 60_000;
    /// `risk_threshold` when the policy does not set it.
    pub const DEFAULT_RISK_THRESHOLD: u8 = 40;
    /// `behaviour_learning` when the policy does not set it.
    pub const DEFAULT_BEHAVIOUR_LEARNING_MS: u64 = 7 * 86_400_000;
}

/// Not derived: the windows have non-zero defaults, so `Policy::default()` (no policy) gets the
/// same values as a policy file without a `[trust]` section.
impl Default for Trust {
    fn default() -> Self {
        Self {
            quarantine_after_failing_ms: None,
            scan_denied_flows: None,
            scan_window_ms: Self::DEFAULT_SCAN_WINDOW_MS,
            risky_lease_ttl_ms: None,
            clean_after_ms: Self::DEFAULT_CLEAN_AFTER_MS,
            risk_threshold: Self::DEFAULT_RISK_THRESHOLD,
            quarantine_above_risk: None,
            quarantine_malicious: false,
            behaviour_learning_ms: Self::DEFAULT_BEHAVIOUR_LEARNING_MS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub pos: Pos,
    pub members: Vec<Located<String>>,
}

/// A value with the position it was written at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Located<T> {
    pub value: T,
    pub pos: Pos,
}

/// Who or what a rule's `from` or a service's `devices` names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    /// `user:U` or a bare `U`: every device of the user.
    User(String),
    /// `group:G`: every device of every user in the group.
    Group(String),
    /// `tag:T`: every device carrying the tag.
    Tag(String),
    /// `device:HOSTNAME`: one device.
    Device(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::User(u) => write!(f, "user:{u}"),
            Selector::Group(g) => write!(f, "group:{g}"),
            Selector::Tag(t) => write!(f, "tag:{t}"),
            Selector::Device(d) => write!(f, "device:{d}"),
        }
    }
}

/// What a service opens, per protocol. Port ranges are sorted and do not overlap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePorts {
    pub tcp: Vec<PortRange>,
    pub udp: Vec<PortRange>,
    /// ICMP echo (v4 and v6).
    pub icmp: bool,
}

impl ServicePorts {
    /// Whether `proto`/`port` is open (`port` is ignored for ICMP).
    pub fn allows(&self, proto: Proto, port: u16) -> bool {
        match proto {
            Proto::Tcp => self.tcp.iter().any(|r| r.contains(port)),
            Proto::Udp => self.udp.iter().any(|r| r.contains(port)),
            Proto::Icmp => self.icmp,
        }
    }

    /// (proto, ranges) pairs for the protocols this service opens, in a fixed order.
    pub fn by_proto(&self) -> Vec<(Proto, Vec<PortRange>)> {
        let mut v = Vec::new();
        if !self.tcp.is_empty() {
            v.push((Proto::Tcp, self.tcp.clone()));
        }
        if !self.udp.is_empty() {
            v.push((Proto::Udp, self.udp.clone()));
        }
        if self.icmp {
            v.push((Proto::Icmp, Vec::new()));
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub pos: Pos,
    pub devices: Vec<Located<Selector>>,
    /// Routed destinations (`routes = ["10.20.5.10/32"]`): reached through whichever approved
    /// subnet router covers them; `0.0.0.0/0` / `::/0` mean the internet through an exit node.
    pub routes: Vec<Located<Prefix>>,
    pub ports: ServicePorts,
    /// Reachable by quarantined devices.
    pub remediation: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Given, or `rule #N (line L)`.
    pub name: String,
    pub pos: Pos,
    pub from: Vec<Located<Selector>>,
    pub to: Vec<Located<String>>,
    pub posture: Vec<Located<String>>,
    /// Coordinator time (ms) from which the rule no longer applies.
    pub expires_ms: Option<i64>,
    /// Enforced, a candidate only (`shadow = true`), or enforced but left out of the candidate
    /// view (`shadow_remove = true`).
    pub mode: RuleMode,
}

/// How a rule takes part in the two views of a policy: the enforced view (what the filters
/// enforce, what `[[tests]]` judge) and the candidate view (enforced rules without the
/// `shadow_remove` ones, plus the `shadow` ones; grants count in both). Peers evaluate the
/// candidate view on live traffic without enforcing it and report would-allow / would-deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum RuleMode {
    /// In both views.
    #[default]
    Enforced,
    /// `shadow = true`: only in the candidate view; never enforced, never puts a peer in a
    /// netmap.
    Shadow,
    /// `shadow_remove = true`: enforced, but absent from the candidate view.
    ShadowRemove,
}

impl RuleMode {
    /// Whether a rule of this mode is in `view`.
    pub fn in_view(self, view: View) -> bool {
        match (self, view) {
            (RuleMode::Enforced, _) => true,
            (RuleMode::Shadow, View::Enforced) | (RuleMode::ShadowRemove, View::Candidate) => false,
            (RuleMode::Shadow, View::Candidate) | (RuleMode::ShadowRemove, View::Enforced) => true,
        }
    }
}

/// Which view of a policy to compile or explain (see [`RuleMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    Enforced,
    Candidate,
}

impl Policy {
    /// Whether the policy has a candidate view that differs from the enforced one: some rule
    /// is `shadow` or `shadow_remove`.
    pub fn has_shadow(&self) -> bool {
        self.rules.iter().any(|r| r.mode != RuleMode::Enforced)
    }

    /// How many rules are `shadow` and how many `shadow_remove`.
    pub fn shadow_counts(&self) -> (usize, usize) {
        let n = |m: RuleMode| self.rules.iter().filter(|r| r.mode == m).count();
        (n(RuleMode::Shadow), n(RuleMode::ShadowRemove))
    }
}

/// A named posture requirement (`[posture.NAME]`). Parsed and validated here; evaluated by
/// [`crate::posture::evaluate`]. A device meets it only if every check set here passes on a fresh
/// report; a check that is not set is not looked at.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Posture {
    pub name: String,
    pub pos: Pos,
    /// `debian>=12`, `macos`, `windows>=10.0.19045`: alternatives, any one suffices.
    pub os: Vec<OsRequirement>,
    pub firewall: Option<bool>,
    pub disk_encryption: Option<bool>,
    /// Process names that must be running.
    pub processes: Vec<String>,
    pub files: Vec<FileRequirement>,
    pub min_ward_version: Option<String>,
    /// Reports (and each signal in them) older than this do not count;
    /// `None`: [`crate::posture::DEFAULT_MAX_REPORT_AGE_MS`].
    pub max_report_age_ms: Option<u64>,
    /// Custom check name → what its JSON output must satisfy: `true` (its `"pass"` is `true`)
    /// or an object (per key: numbers are minimums, anything else must be equal, objects
    /// recurse). The parser accepts nothing else at the top level.
    pub custom: BTreeMap<String, serde_json::Value>,
    /// The screen locks itself (`screen_lock`). A device without a desktop session has nothing
    /// to lock and passes either way.
    pub screen_lock: Option<bool>,
    /// The package database changed at most this long ago (`max_package_age`): a proxy for
    /// "security updates are being installed".
    pub max_package_age_ms: Option<u64>,
    /// Kernel version bound (`kernel = ">=6.1"`; a bare version means `>=`), compared against the
    /// numeric prefix of `uname -r`.
    pub kernel: Option<(VersionOp, String)>,
    /// The device's behaviour risk (0–100, from its recent anomalies) must be at most this
    /// (`max_risk`). Judged by the coordinator, which alone knows the risk; `None`: not looked at.
    pub max_risk: Option<u8>,
    /// Above this behaviour risk (0–100) the device keeps the requirement only with a sign-in
    /// at the identity provider newer than the moment its risk rose above it
    /// (`risk_signin_above`): a fresh sign-in of the same user restores access before the risk
    /// decays. Judged by the coordinator like `max_risk`, which stays the hard cut; `None`:
    /// not looked at.
    pub risk_signin_above: Option<u8>,
    /// The device's sign-in at the identity provider is at most this old (`max_auth_age`).
    /// Judged by the coordinator from the device's sign-in record; a device enrolled with a
    /// token (no sign-in) fails it. `None`: not looked at.
    pub max_auth_age_ms: Option<u64>,
    /// Authentication methods (`amr`): any one of them must be in the device's sign-in
    /// (`amr = ["mfa", "hwk"]`). Judged like `max_auth_age`; empty: not looked at.
    pub amr: Vec<String>,
}

impl Posture {
    /// Whether this requirement asks anything of the device's sign-in.
    pub fn needs_sign_in(&self) -> bool {
        self.max_auth_age_ms.is_some() || !self.amr.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsRequirement {
    pub name: String,
    /// `None`: any version.
    pub version: Option<(VersionOp, String)>,
}

/// As written in the policy: `debian>=12`, `macos`.
impl fmt::Display for OsRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some((op, v)) => write!(f, "{}{op}{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionOp {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
}

impl VersionOp {
    /// Whether `have` compared with the required version (`have.cmp(required)`) satisfies it.
    pub fn holds(self, have_vs_required: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::{Equal, Greater, Less};
        match self {
            VersionOp::Ge => have_vs_required != Less,
            VersionOp::Gt => have_vs_required == Greater,
            VersionOp::Le => have_vs_required != Greater,
            VersionOp::Lt => have_vs_required == Less,
            VersionOp::Eq => have_vs_required == Equal,
        }
    }
}

impl fmt::Display for VersionOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VersionOp::Ge => ">=",
            VersionOp::Gt => ">",
            VersionOp::Le => "<=",
            VersionOp::Lt => "<",
            VersionOp::Eq => "=",
        })
    }
}

/// A file that must exist, optionally with exact contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRequirement {
    pub path: String,
    /// `None`: presence is enough (and the device is not asked to hash it).
    pub sha256: Option<[u8; 32]>,
}

/// One `[[tests]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    pub pos: Pos,
    pub from: TestSource,
    pub allow: Vec<Located<Target>>,
    pub deny: Vec<Located<Target>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestSource {
    User(String),
    Device(String),
}

impl fmt::Display for TestSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestSource::User(u) => f.write_str(u),
            TestSource::Device(d) => write!(f, "device:{d}"),
        }
    }
}

/// `SERVICE:PORT[/PROTO]`, or `SERVICE` for ICMP echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub proto: Proto,
    /// 0 for ICMP.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Proto::Icmp => write!(f, "{} (icmp)", self.service),
            p => write!(f, "{}:{}/{}", self.service, self.port, proto_name(p)),
        }
    }
}

/// Who exists, as the coordinator knows it; input to [`compile`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Directory {
    pub users: Vec<DirUser>,
    pub devices: Vec<DirDevice>,
    pub grants: Vec<Grant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirUser {
    pub name: String,
    pub groups: Vec<String>,
    pub disabled: bool,
    /// The identity provider took the user's access away (SCIM, back-channel logout, a refused
    /// refresh), and why. The user's devices stay on the network, but no user or group
    /// selector names them: every rule that reached them through the user goes, while rules
    /// by tag or bound device name stay.
    pub suspended: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirDevice {
    pub id: DeviceId,
    pub hostname: String,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Active and its user enabled. Devices that are not live appear nowhere in the output.
    pub live: bool,
    /// Names of the posture requirements this device currently meets.
    pub posture_passed: BTreeSet<String>,
    /// For requirements this device does not meet: the failed checks, one line each
    /// ("disk_encryption: root filesystem is not on dm-crypt"), for explanations.
    pub posture_failures: BTreeMap<String, Vec<String>>,
    pub quarantined: bool,
    /// Whether an administrator bound the hostname (a token's `--hostname`, `device approve`,
    /// `device rename`). Only a bound name is matched by `device:NAME` selectors; a self-chosen
    /// one is a display name and grants nothing.
    pub name_bound: bool,
}

/// Just-in-time access: compiled like a rule named `grant:<id>` that expires at `not_after_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    /// A user name or `device:HOST`.
    pub from: String,
    /// A service name.
    pub to: String,
    pub not_after_ms: i64,
    pub reason: Option<String>,
}

/// The result of [`compile`]: what each live device may do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Compiled {
    pub devices: BTreeMap<DeviceId, DeviceAccess>,
    /// The earliest rule or grant expiry after `now_ms`: compile again then.
    pub next_expiry_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceAccess {
    /// Devices it may exchange packets with, in either direction. Symmetric: `b` is among
    /// `a`'s peers exactly when `a` is among `b`'s (the registry relies on it).
    pub peers: Peers,
    /// Who may open what on it (sorted, deduplicated). Shared by every device with the same
    /// rules: a dense policy gives thousands of devices a few distinct lists.
    pub inbound: Arc<Vec<FilterRule>>,
    /// What it may open elsewhere, by reference (sorted, deduplicated): each grant is shared
    /// by every source device of its rule, and its destination list by every grant of its
    /// service. [`DeviceAccess::reach_flat`] gives the flat list (one entry per destination).
    pub reach: Vec<Arc<ReachGrant>>,
    /// Who may open what on it in the policy's candidate view (sorted, deduplicated); `None`
    /// when the policy has no `shadow` or `shadow_remove` rule. Evaluated, never enforced.
    pub shadow_inbound: Option<Vec<FilterRule>>,
    /// Routed prefixes it may reach, by the router peer that carries them
    /// ([`compile_routes`]; empty from [`compile`] alone).
    pub routes: BTreeMap<DeviceId, Vec<Prefix>>,
}

impl DeviceAccess {
    /// What device `me` (the device this access is of) may open elsewhere, one entry per
    /// destination device, service and protocol (sorted, deduplicated): the grants expanded,
    /// without `me` itself.
    pub fn reach_flat(&self, me: DeviceId) -> Vec<Reach> {
        expand_reach(&self.reach, me)
    }
}

/// One destination device of a service's reach list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReachDest {
    pub device_id: DeviceId,
    pub hostname: Hostname,
}

/// What the sources of one rule may open on one service, for one protocol: built once per
/// (rule, service, protocol) by [`compile`] and shared by every source device of the rule.
/// `devices` is the service's live destinations (those with a usable name), built once per
/// service and shared by all its grants; a source that is itself one of them does not reach
/// itself ([`expand_reach`] leaves it out).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReachGrant {
    pub service: String,
    pub proto: Proto,
    pub ports: Vec<PortRange>,
    pub rule: String,
    pub not_after_ms: Option<i64>,
    /// Sorted by device id, no duplicates.
    pub devices: Arc<[ReachDest]>,
}

impl ReachGrant {
    /// Whether a source device `me` reaches anything through this grant (a destination other
    /// than itself).
    pub fn reaches_beyond(&self, me: DeviceId) -> bool {
        self.devices.iter().any(|d| d.device_id != me)
    }
}

/// The flat reach list of device `me` from its grants: one [`Reach`] per destination device
/// (never `me`), service, protocol and rule; sorted, deduplicated. O(grants x destinations):
/// for protocol-1/2 devices, explanations and diffs, not for holding.
pub fn expand_reach(grants: &[Arc<ReachGrant>], me: DeviceId) -> Vec<Reach> {
    let mut out: Vec<Reach> = grants
        .iter()
        .flat_map(|g| {
            g.devices
                .iter()
                .filter(move |d| d.device_id != me)
                .map(move |d| Reach {
                    service: g.service.clone(),
                    device_id: d.device_id,
                    hostname: d.hostname.clone(),
                    proto: g.proto,
                    ports: g.ports.clone(),
                    rule: g.rule.clone(),
                    not_after_ms: g.not_after_ms,
                })
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// References to users, tags and devices that the directory does not know: not errors (they may
/// enroll later), but likely typos.
pub fn warnings(p: &Policy, d: &Directory) -> Vec<PolicyWarning> {
    let users: BTreeSet<&str> = d.users.iter().map(|u| u.name.as_str()).collect();
    let tags: BTreeSet<&str> = d
        .devices
        .iter()
        .flat_map(|x| x.tags.iter().map(String::as_str))
        .collect();
    let hosts: BTreeSet<&str> = d.devices.iter().map(|x| x.hostname.as_str()).collect();
    let bound: BTreeSet<&str> = d
        .devices
        .iter()
        .filter(|x| x.name_bound)
        .map(|x| x.hostname.as_str())
        .collect();
    let mut out = Vec::new();
    let check = |sel: &Located<Selector>, out: &mut Vec<PolicyWarning>| {
        let msg = match &sel.value {
            Selector::User(u) if !users.contains(u.as_str()) => format!("unknown user {u:?}"),
            Selector::Tag(t) if !tags.contains(t.as_str()) => {
                format!("no device carries tag {t:?}")
            }
            Selector::Device(h) if !hosts.contains(h.as_str()) => {
                format!("unknown device {h:?}")
            }
            Selector::Device(h) if !bound.contains(h.as_str()) => format!(
                "device name {h:?} is self-chosen and names nothing; bind it with `device approve` or a token's --hostname"
            ),
            _ => return,
        };
        out.push(PolicyWarning {
            file: p.file.clone(),
            pos: sel.pos,
            message: msg,
        });
    };
    for g in p.groups.values() {
        for m in &g.members {
            let sel = Located {
                value: Selector::User(m.value.clone()),
                pos: m.pos,
            };
            check(&sel, &mut out);
        }
    }
    for s in p.services.values() {
        for sel in &s.devices {
            check(sel, &mut out);
        }
    }
    for r in &p.rules {
        for sel in &r.from {
            check(sel, &mut out);
        }
    }
    for t in &p.tests {
        let sel = match &t.from {
            TestSource::User(u) => Selector::User(u.clone()),
            TestSource::Device(h) => Selector::Device(h.clone()),
        };
        check(
            &Located {
                value: sel,
                pos: t.pos,
            },
            &mut out,
        );
    }
    out.sort();
    out.dedup();
    out
}

pub(crate) fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    }
}

/// `tcp/22`, `tcp/8000-8080`, `udp/*`, `icmp`.
pub fn format_ports(proto: Proto, ports: &[PortRange]) -> String {
    if proto == Proto::Icmp {
        return "icmp".into();
    }
    let name = proto_name(proto);
    let parts: Vec<String> = ports
        .iter()
        .map(|r| match (r.lo, r.hi) {
            (0, u16::MAX) | (1, u16::MAX) => format!("{name}/*"),
            (lo, hi) if lo == hi => format!("{name}/{lo}"),
            (lo, hi) => format!("{name}/{lo}-{hi}"),
        })
        .collect();
    parts.join(",")
}
