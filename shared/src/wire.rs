//! The control protocol between a device (`ward daemon`) and `ward-coordinator`.
//!
//! Transport: one QUIC connection (TLS 1.3) per device; the device opens one bidirectional
//! stream and both sides exchange frames on it: a 4-byte big-endian length, then that many
//! bytes of JSON encoding one message. Frames are bounded: [`MAX_DEVICE_FRAME`] from a device,
//! [`MAX_COORDINATOR_FRAME`] from the coordinator. Anything else is a protocol error that closes
//! the stream; it never panics and never allocates more than the bound.
//!
//! ## Versions
//! - 1: first version: enroll, hello, netmap full/delta, certificate renewal, time ping;
//!   netmaps carry the inbound filter (`inbound`) and the reach list (`reach`); leases
//!   (`lease_request`, `lease`, `lease_active`, `rotate_now`, `Peer.leases`,
//!   `Enrolled.lease_key`); posture (`posture`, `denied_flows`, `posture_wants`,
//!   `posture_verdict`); relays in netmaps (`Netmap.relays`, `NetmapDelta.relays`, both
//!   optional, so a device that predates them keeps decoding); relayed paths
//!   (`DeviceUpdate.home_relay`, `Peer.relay`, `relay_ticket_request`, `relay_ticket`; see
//!   [`crate::relay`]), all optional on the wire; coordinated hole punching
//!   (`punch_request`, `punch`), sent only to a side that said it understands them
//!   (`DeviceUpdate.punch`, `Netmap.punch`, both `false` when absent), because a side that
//!   predates them closes the session on a message type it does not know; key-possession proofs
//!   (`lease_request.proof`, optional on the wire but required by the coordinator, and the
//!   error code `key_in_use`); per-session message limits (error code `rate_limited`); flow
//!   records (`flows`, answered by `flows_ack`; see [`crate::flows`]), sent only to a
//!   coordinator whose netmap says `flows`, and the policy version in netmaps
//!   (`Netmap.policy_version`, `NetmapDelta.policy_version`), all optional on the wire; this
//!   device's own entry in a delta when it changed (`NetmapDelta.me`, after a rename), optional
//!   on the wire and ignored by agents that predate it; the candidate inbound filter of a
//!   policy with shadow rules (`Netmap.shadow_filter`, `NetmapDelta.shadow_filter`: absent
//!   means unchanged, `null` means no candidate view any more) and the would-verdict in flow
//!   records (`FlowRecord.shadow`), all optional on the wire and ignored by sides that predate
//!   them; routed prefixes (`DeviceUpdate.advertise_routes`, `DeviceUpdate.advertise_exit_node`,
//!   `SelfInfo.routes`, `Peer.routes`, `FilterRule.dests`; see [`crate::routes`]), all optional
//!   on the wire: a side that predates them routes nothing and forwards nothing;
//!   the DNS domain device names live under (`Netmap.dns_domain`), optional on the wire;
//!   OpenID Connect device sign-in (`login_start` on a connection without a client
//!   certificate, answered by `login_pending`, then `enrolled` or `error` with the code
//!   `login_failed`), sent only by an agent asked for `ward up --login`; the browser sign-in
//!   (authorization code + PKCE on a loopback redirect: `login_start.pkce`, answered by
//!   `login_authorize`, then the device's `login_callback`), optional on the wire and sent
//!   only by an agent asked for it, so a coordinator that predates it answers with the device
//!   grant's `login_pending` (the agent then says so); the device's behaviour risk in its
//!   verdict (`PostureVerdict.risk`), optional on the wire and ignored by agents that predate it;
//!   signing in again on an enrolled device (`sign_in_start` as the first message of a
//!   connection with the device certificate, answered like `login_start`, then `signed_in`),
//!   sent only by an agent asked for `ward up --login` while enrolled: a coordinator that
//!   predates it cannot decode it and closes the connection with a `protocol` error naming the
//!   unknown message, which the agent reports as "this coordinator cannot sign an enrolled
//!   device in again";
//!   the instance's coordinator addresses in full netmaps (`Netmap.coordinators`, replicas the
//!   device fails over to), optional on the wire: absent means "keep the list you have", and
//!   agents that predate it ignore it and keep dialling their one address.
//! - 2: peer sets. A netmap carries each distinct source population of the inbound filter
//!   once (`Netmap.peer_sets`, prefixes aggregated into CIDRs; see [`crate::peerset`]) and
//!   rules name them by id (`FilterRule.source_sets`; `FilterRule.sources` is then empty and
//!   may be absent); a delta carries only the sets that changed (`NetmapDelta.peer_sets`: the
//!   prefixes a set gained and lost, or its whole new content) and the ids that went
//!   (`NetmapDelta.removed_peer_sets`). The device says which version it speaks in `hello`'s
//!   `protocol`; the coordinator speaks every version from [`MIN_PROTOCOL_VERSION`] up and
//!   sends a version-1 device the flat form (every source address in `sources`, no sets), so
//!   an older agent keeps working. A version-2 agent against a coordinator that predates it is
//!   refused with a `protocol` error ("protocol version 2 is not supported"): upgrade the
//!   coordinator first.
//! - 3: reach by reference. A netmap carries what the device may open as grants
//!   (`Netmap.reach_grants`: rule, service, protocol, ports, expiry; one per rule, service and
//!   protocol, whatever the number of destinations) and each granted service's destination
//!   devices once (`Netmap.reach_services`: device ids; their names are the netmap's peers'),
//!   instead of one `reach` entry per destination device, service, protocol and rule; the
//!   device never reaches itself (it leaves its own id out when it expands them,
//!   [`Netmap::reach_view`]). A delta replaces the grants when they changed
//!   (`NetmapDelta.reach_grants`), and carries only the destination lists that changed or are
//!   new (`NetmapDelta.reach_services`, each whole) and the services no grant names any more
//!   (`NetmapDelta.removed_reach_services`). A version-1 or 2 device gets the flat `reach`
//!   list as before. A version-3 agent against a coordinator that predates it is refused with
//!   a `protocol` error ("protocol version 3 is not supported"): upgrade the coordinator first.
//!   Added later to version 3, optional on the wire in both directions: resuming a netmap on
//!   a new session ([`crate::resume`]). A device's `hello` may say what it holds
//!   (`Hello.holding`: a digest per bucket of its peers), and the session's first netmap then
//!   carries only the peers of the buckets that differ (`Netmap.resumed` names them). A
//!   coordinator that predates it ignores the holding and sends whole netmaps; a device that
//!   predates it sends none and is sent whole netmaps.
//! - 4: peers on demand. A coordinator may send a version-4 device only the peers it holds
//!   (`Netmap.on_demand`; decided per session, when the device may reach more peers than the
//!   coordinator lists in full): the device asks for another with `want_peer` (by overlay
//!   address, when it sends to one it has no peer for, or by WireGuard key, when an unknown
//!   key initiates a handshake), and the coordinator answers with a delta that adds the peer
//!   (and adds the device to the peer's netmap if the peer is on demand too) or with
//!   `peer_refused` when policy allows neither direction. A name the device's resolver was
//!   asked for (`by: {"name": LABEL}`: a device's hostname or a service's name) holds that
//!   device, or the devices of that service this device may reach. Changes to a held peer (a new
//!   lease, endpoints, a revocation) reach the device as deltas like any other peer's. A new
//!   session's `hello` names the peers the device holds (`Hello.held_peers`) so a reconnect
//!   keeps them. A version-3 device is always sent every peer. A version-4 agent against a
//!   coordinator that predates it is refused with a `protocol` error ("protocol version 4 is
//!   not supported"): upgrade the coordinator first.
//!
//! - 5: rule lists by edit. A delta may carry what the inbound filter and the reach grants
//!   lost and gained (`NetmapDelta.inbound_edit`, `NetmapDelta.reach_grants_edit`: entries
//!   removed and added, see [`ListEdit`]) instead of the whole new list, so a policy change
//!   that alters one rule sends that rule, not every rule of every device it touches. The
//!   coordinator sends an edit only to a version-5 device, and only when it is shorter than
//!   the list; a version-4 device gets the whole lists as before. An edit that does not fit
//!   the list held (it removes an entry the device does not have) is refused like a delta for
//!   another base: the device reconnects for a full netmap. A version-5 agent against a
//!   coordinator that predates it is refused with a `protocol` error ("protocol version 5 is
//!   not supported"): upgrade the coordinator first.
//!
//! Every message the device sends first (`Enroll`, `Hello`) carries `protocol`; the
//! coordinator refuses a version it does not speak with [`ErrorCode::Protocol`].
//! Fields added later must be `#[serde(default)]` so older messages keep decoding (see the
//! golden tests at the bottom).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::filter::{FilterRule, PortRange, Proto};
use crate::flows::FlowReport;
use crate::keyproof::KeyProof;
use crate::lease::SignedLease;
use crate::names::{DnsDomain, Hostname};
use crate::peerset::{PeerSet, PeerSetChange, PeerSetError};
use crate::posture::{Evaluation, PostureReport, PostureWants};
use crate::relay::SignedTicket;
use crate::resume::{Holding, Resumed};
use crate::routes::Prefix;

pub const PROTOCOL_VERSION: u32 = 5;
/// The oldest version the coordinator still speaks (see the version history above).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Whether the coordinator speaks `version`.
pub fn speaks(version: u32) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}
/// Devices send small messages only.
pub const MAX_DEVICE_FRAME: usize = 64 * 1024;
/// Netmaps for ten thousand peers fit (about 300 bytes each).
pub const MAX_COORDINATOR_FRAME: usize = 8 * 1024 * 1024;
/// The SNI name the coordinator's server certificate carries; devices dial it whatever the address.
pub const COORDINATOR_SERVER_NAME: &str = "coordinator.ward.internal";
/// ALPN protocol id on the QUIC control channel.
pub const ALPN: &[u8] = b"ward-control/1";

/// A stable device number, given by the coordinator at enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(pub u64);

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// A WireGuard public key (x25519), base64 in JSON like `wg` prints it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WgPublicKey(pub [u8; 32]);

impl WgPublicKey {
    pub fn to_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}
impl std::fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WgPublicKey({})", self.to_base64())
    }
}
impl TryFrom<String> for WgPublicKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        use base64::Engine;
        let v = base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|_| "WireGuard key is not base64".to_string())?;
        let arr: [u8; 32] = v
            .try_into()
            .map_err(|_| "WireGuard key is not 32 bytes".to_string())?;
        Ok(Self(arr))
    }
}
impl From<WgPublicKey> for String {
    fn from(k: WgPublicKey) -> String {
        k.to_base64()
    }
}

/// Bytes carried as base64 in JSON (certificates, CSRs).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}
impl TryFrom<String> for Bytes {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Bytes)
            .map_err(|_| "field is not base64".to_string())
    }
}
impl From<Bytes> for String {
    fn from(b: Bytes) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b.0)
    }
}

/// Messages a device sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceMsg {
    /// First and only message on a connection without a client certificate.
    Enroll(EnrollRequest),
    /// First and only message on a connection without a client certificate, instead of
    /// `enroll`: sign in through the coordinator's OpenID provider (device authorization grant).
    LoginStart(LoginStart),
    /// After `login_authorize`: what the provider's redirect brought to the device's loopback
    /// listener, with the PKCE verifier. `enrolled` or `error` follows.
    LoginCallback(LoginCallback),
    /// First and only message on a connection *with* a device certificate, instead of
    /// `hello`: the enrolled device signs in again through the coordinator's OpenID provider
    /// (the certificate names the device). Answered like `login_start` (`login_pending`, or
    /// `login_authorize` then the device's `login_callback`), then `signed_in` or `error`.
    SignInStart(SignInStart),
    /// First message on an authenticated connection.
    Hello(Hello),
    /// The device's WireGuard key or endpoints changed.
    Update(DeviceUpdate),
    /// Ask for a new device certificate for the same identity key.
    RenewCert { csr_der: Bytes },
    /// Clock offset measurement.
    Ping { nonce: u64 },
    /// Ask for a lease on a WireGuard public key this device just generated, with the proof
    /// that it holds the private half ([`crate::keyproof`]). A request without a proof (an
    /// agent that predates it) is refused: the coordinator never leases an unproven key.
    LeaseRequest {
        wg_public_key: WgPublicKey,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proof: Option<KeyProof>,
    },
    /// The device now uses the key of lease `serial`; older leases may be revoked.
    LeaseActive { serial: u64 },
    /// A posture report (on change, and periodically).
    Posture(Box<PostureReport>),
    /// Inbound packets this device's filter refused since the last report, by source.
    DeniedFlows { flows: Vec<DeniedFlow> },
    /// Ask for a relay ticket (answered with `relay_ticket`, or `error`).
    RelayTicketRequest,
    /// This device starts probing `peer`'s direct candidates now: ask the peer to probe back
    /// at once, so both sides send together (hole punching). Never answered; the coordinator
    /// forwards it as `punch` only to a peer both netmaps hold, rate-limited, or drops it.
    /// Sent only to a coordinator whose netmap says `punch`.
    PunchRequest { peer: DeviceId },
    /// Flow records ([`crate::flows`]); answered by `flows_ack` once stored. Sent only to a
    /// coordinator whose netmap says `flows`.
    Flows(FlowReport),
    /// Send me the peer `by` names, if policy lets us talk (protocol 4; only to a coordinator
    /// whose netmap says `on_demand`). Answered by a netmap delta that adds the peer, or by
    /// `peer_refused`.
    WantPeer { by: PeerRef },
}

/// How a device names a peer it has not been sent (protocol 4).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRef {
    /// The overlay address (or an address in a routed prefix) it sends to.
    Addr(IpAddr),
    /// The WireGuard key an unknown handshake initiation came from.
    Key(WgPublicKey),
    /// A name under the Ward domain the device was asked to resolve (its first label, a
    /// device's hostname or a service's name, lowercase): the device, or the devices of the
    /// service this device may reach (at most [`MAX_NAME_PEERS`]).
    Name(Label),
}

/// Most peers one `want_peer` by name holds (a service on many devices).
pub const MAX_NAME_PEERS: usize = 32;

/// One DNS label as a device asks for it: 1 to 63 bytes of ASCII letters, digits and `-`,
/// kept lowercase.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Label(String);

impl Label {
    pub fn parse(s: &str) -> Result<Label, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(Label(s.to_ascii_lowercase()))
        } else {
            Err(format!(
                "not a DNS label: {:?}",
                s.chars().take(70).collect::<String>()
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Label {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Label::parse(&s)
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.0
    }
}

impl std::fmt::Display for PeerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerRef::Addr(a) => write!(f, "{a}"),
            PeerRef::Key(k) => write!(f, "key {}", k.to_base64()),
            PeerRef::Name(l) => write!(f, "name {}", l.as_str()),
        }
    }
}

/// Most peers a device on demand holds at once; past it the coordinator lets go of the peer
/// wanted longest ago (a delta removes it; the device asks again when it needs it).
pub const MAX_HELD_PEERS: usize = 1024;

/// Most entries in a posture verdict's `unavailable` list; the rest are counted.
pub const MAX_UNAVAILABLE: usize = 256;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Most entries in one `denied_flows` message.
pub const MAX_DENIED_FLOWS: usize = 256;

/// New flows from `src` to this device's `proto`/`port` that the inbound filter refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeniedFlow {
    pub src: IpAddr,
    pub proto: Proto,
    pub port: u16,
    pub count: u32,
}

/// The coordinator's judgement of a device's trust, sent to that device (for `ward posture`
/// and `ward status`) whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PostureVerdict {
    /// The report judged; `None` before the first one.
    #[serde(default)]
    pub report_seq: Option<u64>,
    pub evaluated_at_ms: i64,
    /// One entry per requirement in the policy, in name order.
    #[serde(default)]
    pub results: Vec<Evaluation>,
    /// Set while the device is quarantined: why.
    #[serde(default)]
    pub quarantine: Option<String>,
    /// Access the policy would give this device but trust currently withholds: at most
    /// [`MAX_UNAVAILABLE`] entries, one for each withheld service and rule first.
    #[serde(default)]
    pub unavailable: Vec<Unavailable>,
    /// Withheld entries left out of `unavailable` (a quarantined device of a large
    /// organisation would otherwise be told of every service on every device, megabytes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unavailable_more: u64,
    /// The device's behaviour risk, when it has one or the policy caps it (`max_risk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskView>,
}

/// How the failure of a `risk_signin_above` requirement starts: the agent shows the whole line
/// to its user (`ward status`, the log) as the way back to access.
pub const SIGN_IN_AGAIN: &str = "sign in again: ";

impl PostureVerdict {
    /// The first "sign in again: risk N …" failure: access that a fresh sign-in of the
    /// device's user (`ward up --login`) would restore.
    pub fn sign_in_again(&self) -> Option<&str> {
        self.results
            .iter()
            .filter(|e| !e.passed)
            .flat_map(|e| e.failures.iter())
            .find(|f| f.starts_with(SIGN_IN_AGAIN))
            .map(String::as_str)
    }
}

/// A device's behaviour risk as the coordinator judges it now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RiskView {
    /// 0–100, from its recent anomalies (they decay).
    pub score: u8,
    /// The policy's `risk_threshold` (above it the device counts as risky).
    pub threshold: u8,
    /// The lowest `max_risk` of the policy's posture requirements, if any has one.
    #[serde(default)]
    pub max_risk: Option<u8>,
    /// The strongest contributing anomalies (`anomaly ID: reason`), empty at 0.
    #[serde(default)]
    pub reason: String,
}

impl std::fmt::Display for RiskView {
    /// `risk 72 (threshold 40, lowest max_risk 40): anomaly 3: first contact with …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "risk {} (threshold {}", self.score, self.threshold)?;
        if let Some(m) = self.max_risk {
            write!(f, ", lowest max_risk {m}")?;
        }
        write!(f, ")")?;
        if !self.reason.is_empty() {
            write!(f, ": {}", self.reason)?;
        }
        Ok(())
    }
}

impl PostureVerdict {
    /// The verdict for people, a line each: every requirement (`pass`, or `FAIL` followed by
    /// its failed checks, indented), the quarantine, and what is unavailable and why. Both
    /// CLIs (`ward posture`, `ward-coordinator device show`) print this.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.results.is_empty() {
            out.push("requirements: the policy has no posture requirements".to_string());
        }
        for e in &self.results {
            let verdict = if e.passed { "pass" } else { "FAIL" };
            out.push(format!("requirement {:<20} {verdict}", e.requirement));
            out.extend(e.failures.iter().map(|f| format!("    {f}")));
        }
        if let Some(q) = &self.quarantine {
            out.push(format!(
                "QUARANTINED: {q} (only remediation services are reachable)"
            ));
        }
        out.extend(self.unavailable.iter().map(|u| format!("unavailable: {u}")));
        if self.unavailable_more > 0 {
            out.push(format!(
                "unavailable: and {} more on other devices",
                self.unavailable_more
            ));
        }
        if let Some(r) = &self.risk {
            out.push(r.to_string());
        }
        out
    }
}

impl std::fmt::Display for Unavailable {
    /// `db on db1 (rule eng-db): posture "baseline": file /x: missing`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {} (rule {}): {}",
            self.service,
            self.hostname,
            self.rule,
            self.reasons.join("; ")
        )
    }
}

/// A service on a device that is out of reach because of trust, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Unavailable {
    pub service: String,
    pub hostname: Hostname,
    pub rule: String,
    /// `posture "baseline": process osqueryd: not running`, or `quarantined: …`.
    pub reasons: Vec<String>,
}

/// Messages the coordinator sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordinatorMsg {
    Enrolled(Enrolled),
    /// A `login_start` was accepted: the user signs in at `verification_uri` with `user_code`;
    /// `enrolled` (or `error`) follows on the same stream when the sign-in ends.
    LoginPending(LoginPending),
    /// A `login_start` with `pkce` was accepted: the user signs in at `authorize_url`; the
    /// provider redirects the browser to the device's loopback listener with `state`.
    LoginAuthorize(LoginAuthorize),
    /// A `sign_in_start` ended: the same user signed in again and the device's identity facts
    /// were refreshed.
    SignedIn(SignedIn),
    /// The full netmap; replaces whatever the device had.
    Netmap(Netmap),
    /// Changes since netmap `base_seq`.
    NetmapDelta(NetmapDelta),
    CertRenewed {
        cert_der: Bytes,
        not_after_ms: i64,
    },
    Pong {
        nonce: u64,
        coordinator_time_ms: i64,
    },
    /// The lease asked for with `lease_request`.
    Lease {
        lease: SignedLease,
    },
    /// Trust changed: make a new key and get a new lease now.
    RotateNow {
        reason: String,
    },
    /// What the policy's posture requirements need this device to collect.
    PostureWants(PostureWants),
    /// The device's trust as judged now.
    PostureVerdict(PostureVerdict),
    /// The ticket asked for with `relay_ticket_request`: presented to relays.
    RelayTicket {
        ticket: SignedTicket,
    },
    /// Peer `peer` is probing this device's direct candidates now: probe its `endpoints` (its
    /// current candidates, at most [`MAX_ENDPOINTS`]) at once. Sent only to a device whose
    /// update says `punch`.
    Punch {
        peer: DeviceId,
        #[serde(default)]
        endpoints: Vec<SocketAddr>,
    },
    /// The flow report `seq` is stored (or was stored before): the device may forget it.
    FlowsAck {
        seq: u64,
    },
    /// A `want_peer` the coordinator refused: no peer it names may talk with this device
    /// (policy allows neither direction), or it names none.
    PeerRefused {
        by: PeerRef,
        reason: String,
    },
    /// The request was refused; on `Enroll`/`Hello` the coordinator then closes the connection.
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Unknown message type, bad frame, wrong order.
    Protocol,
    /// The token is unknown or its secret is wrong.
    TokenInvalid,
    TokenExpired,
    TokenUsed,
    TokenRevoked,
    /// The token's user is disabled.
    UserDisabled,
    /// Hostname or another field was refused.
    BadRequest,
    /// The device has been revoked.
    DeviceRevoked,
    /// The certificate is not a known device.
    Unauthorized,
    /// The coordinator failed; nothing was granted.
    Internal,
    /// The WireGuard key asked for is (or was recently) leased to another device.
    KeyInUse,
    /// The session sent more messages than any agent needs; it is closed.
    RateLimited,
    /// The OpenID sign-in failed (refused, expired, a token that does not verify, the provider
    /// unreachable); the message says which.
    LoginFailed,
}

/// `ward up --login`: what the device would send in `enroll`, without a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginStart {
    pub protocol: u32,
    pub hostname: String,
    pub os: String,
    /// PKCS#10 request signed by the device's identity key.
    pub csr_der: Bytes,
    /// Sign in with the authorization code flow on a loopback redirect instead of the device
    /// grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkce: Option<LoginPkce>,
}

/// An enrolled device asks to sign in again (`ward up --login` on an enrolled device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignInStart {
    pub protocol: u32,
    /// The browser sign-in instead of the device grant, as in [`LoginStart::pkce`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkce: Option<LoginPkce>,
}

/// The identity facts a successful `sign_in_start` stored for the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedIn {
    pub user: String,
    /// When the user authenticated at the provider (ms since the epoch).
    pub auth_time_ms: i64,
    #[serde(default)]
    pub amr: Vec<String>,
    /// The user's provider groups after the sign-in.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The browser sign-in a device asks for: where its loopback listener is and the S256
/// challenge of a verifier only the device knows until it sends `login_callback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginPkce {
    /// `http://127.0.0.1:PORT/PATH` (see [`crate::oauth::check_loopback_redirect`]).
    pub redirect_uri: String,
    pub code_challenge: String,
}

/// Where the browser sign-in happens, and the `state` the redirect must carry back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginAuthorize {
    pub authorize_url: String,
    pub state: String,
    pub expires_in_secs: u64,
}

/// The redirect's outcome as the device's listener read it: the code (or the provider's
/// error), the `state` it came with, and the PKCE verifier. The verifier is redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginCallback {
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The provider's `error` (e.g. `access_denied`), when there is no code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub code_verifier: String,
}

impl std::fmt::Debug for LoginCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginCallback")
            .field("code", &self.code.as_ref().map(|_| "<redacted>"))
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// Where the user completes the sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginPending {
    pub verification_uri: String,
    /// The URI with the code filled in (when the provider gives one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    pub expires_in_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub protocol: u32,
    /// Hex token id (public part).
    pub token_id: String,
    /// The token secret. Never logged: see the `Debug` impl.
    pub token_secret: TokenSecret,
    /// As the device calls itself; sanitized by the coordinator.
    pub hostname: String,
    pub os: String,
    /// PKCS#10 request signed by the device's identity key (which never leaves the device).
    pub csr_der: Bytes,
}

/// A token secret in transit: base64, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenSecret(pub Bytes);
impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device_id: DeviceId,
    pub hostname: Hostname,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub cert_der: Bytes,
    pub cert_not_after_ms: i64,
    pub ca_der: Bytes,
    /// The coordinator's Ed25519 lease-signing public key, pinned by the device.
    #[serde(default)]
    pub lease_key: Bytes,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub os: String,
    #[serde(default)]
    pub version: String,
    #[serde(flatten)]
    pub update: DeviceUpdate,
    /// What the device holds of its last netmap's peers, so that this session's first netmap
    /// leaves out what it has already ([`crate::resume`]). Absent: it holds nothing (or
    /// predates this), and the first netmap is whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holding: Option<Holding>,
    /// The peers a device on demand holds (protocol 4), to keep on this session (at most
    /// [`MAX_HELD_PEERS`]; the coordinator keeps only those policy still allows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_peers: Vec<DeviceId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DeviceUpdate {
    /// Absent until the data plane is up.
    #[serde(default)]
    pub wg_public_key: Option<WgPublicKey>,
    /// UDP port the WireGuard socket listens on.
    #[serde(default)]
    pub wg_port: u16,
    /// Local interface addresses with `wg_port`, as candidates for peers.
    #[serde(default)]
    pub local_endpoints: Vec<SocketAddr>,
    /// The relay (by name) this device is connected to and receives relayed traffic through;
    /// peers send to it there. `None`: none (yet).
    #[serde(default)]
    pub home_relay: Option<String>,
    /// The device understands `punch` (coordinated hole punching); absent from older devices,
    /// which must not be sent it.
    #[serde(default)]
    pub punch: bool,
    /// Prefixes this device offers to forward to (`ward up --advertise-routes`); the
    /// coordinator stores them, and routes nothing through the device until they are approved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertise_routes: Vec<Prefix>,
    /// This device offers to be an exit node (`ward up --advertise-exit-node`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub advertise_exit_node: bool,
}

/// Most endpoints a device may announce; the rest are ignored.
pub const MAX_ENDPOINTS: usize = 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelfInfo {
    pub device_id: DeviceId,
    pub hostname: Hostname,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The overlay prefixes to route into the TUN.
    pub v6_prefix: Ipv6Addr,
    /// The source address the coordinator saw this device's control connection come from.
    pub observed_addr: Option<SocketAddr>,
    /// The routed prefixes this device is approved to forward to (a subnet router; `0.0.0.0/0`
    /// and `::/0` for an approved exit node). Its data plane accepts inner destinations in
    /// them (and nothing else beyond its own addresses), filtered by `FilterRule.dests` rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Prefix>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub device_id: DeviceId,
    pub hostname: Hostname,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// `None` while the peer has not brought its data plane up.
    #[serde(default)]
    pub wg_public_key: Option<WgPublicKey>,
    /// Candidate underlay endpoints, best first (observed public address first).
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Whether the peer holds a live control session right now.
    #[serde(default)]
    pub online: bool,
    /// The peer's current leases (two during a key rotation); a key without a valid lease is
    /// never configured.
    #[serde(default)]
    pub leases: Vec<SignedLease>,
    /// The relay (by name, one of the netmap's `relays`) where the peer receives relayed
    /// traffic, if it is connected to one.
    #[serde(default)]
    pub relay: Option<String>,
    /// The routed prefixes this device may reach through the peer (a subnet router or exit
    /// node): only those the policy lets this device reach and the peer is approved for.
    /// Packets to them go to this peer; packets from them are accepted from this peer only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Prefix>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Netmap {
    pub seq: u64,
    pub me: SelfInfo,
    #[serde(serialize_with = "peer_json::serialize")]
    pub peers: Vec<Peer>,
    /// Inbound filter: who may open what on this device. Empty means nothing may. Shared
    /// (as are `peer_sets`) so that a device hands its filter to its data plane without a
    /// copy; a delta copies it only while the data plane still holds the old one.
    #[serde(default)]
    pub inbound: Arc<Vec<FilterRule>>,
    /// What this device may reach (for `ward status`; enforcement is at the destination).
    #[serde(default)]
    pub reach: Vec<Reach>,
    /// The relays this device may use (address discovery and forwarding).
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
    /// The coordinator accepts `punch_request`; absent from older coordinators, which must
    /// not be sent it.
    #[serde(default)]
    pub punch: bool,
    /// The coordinator accepts `flows`; absent from older coordinators, which must not be
    /// sent it.
    #[serde(default)]
    pub flows: bool,
    /// The version of the policy this netmap was compiled from (`None` before any policy).
    #[serde(default)]
    pub policy_version: Option<u64>,
    /// The inbound filter of the policy's candidate view, when the policy has shadow rules:
    /// evaluated on each new flow for the flow records (would-allow / would-deny), never
    /// enforced. `None`: no candidate view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_filter: Option<Vec<FilterRule>>,
    /// The DNS domain device names are published under (`HOSTNAME.<domain>`); absent from
    /// older coordinators, whose devices use [`crate::names::DEFAULT_DNS_DOMAIN`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_domain: Option<DnsDomain>,
    /// Every coordinator address of the instance (replicas), the one to dial first first:
    /// the device replaces its stored list with it. Empty (absent from older coordinators):
    /// keep the list it has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coordinators: Vec<String>,
    /// The source populations `inbound` and `shadow_filter` rules name by id (protocol 2;
    /// never sent to a version-1 device, whose rules list every source).
    #[serde(default, skip_serializing_if = "shared_is_empty")]
    pub peer_sets: Arc<Vec<PeerSet>>,
    /// What this device may open elsewhere, by reference (protocol 3; a version-1/2 device
    /// gets `reach` instead): destinations are the service's list in `reach_services`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reach_grants: Vec<ReachGrant>,
    /// The destination devices of each service `reach_grants` names (protocol 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reach_services: Vec<ReachService>,
    /// Set on a session's first netmap when the device's `hello` said what it holds and some
    /// of it is current: `peers` then carries only the peers of the buckets named here, and
    /// the device keeps its own peers of every other bucket ([`crate::resume::merge`]).
    /// Absent: `peers` is every peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Resumed>,
    /// `peers` (and every delta's) are only the peers this device holds (protocol 4): it
    /// asks for another with `want_peer`. Its `peer_sets` then hold only the held peers'
    /// addresses (each as a host prefix), and a delta that brings or takes a peer carries
    /// its addresses' set changes with it. Absent: every peer it may talk with is listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_demand: bool,
}

/// What a device may open on every destination of one service (protocol 3), but itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReachGrant {
    pub service: String,
    pub proto: Proto,
    #[serde(default)]
    pub ports: Vec<PortRange>,
    pub rule: String,
    #[serde(default)]
    pub not_after_ms: Option<i64>,
}

/// The destination devices of one service a device may reach (protocol 3); their names are
/// those of the netmap's peers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReachService {
    pub service: String,
    pub devices: Vec<DeviceId>,
}

/// A relay registered with the coordinator (`ward-coordinator relay add`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RelayInfo {
    pub name: String,
    /// `HOST:PORT` (a name, an IPv4 or a bracketed IPv6 literal) of its UDP port: address
    /// discovery and QUIC (forwarding) on the one port.
    pub addr: String,
}

/// A service this device may reach on one destination device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Reach {
    pub service: String,
    pub device_id: DeviceId,
    pub hostname: Hostname,
    pub proto: Proto,
    #[serde(default)]
    pub ports: Vec<PortRange>,
    pub rule: String,
    #[serde(default)]
    pub not_after_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NetmapDelta {
    pub base_seq: u64,
    pub seq: u64,
    #[serde(
        default,
        serialize_with = "peer_json::serialize",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub upsert: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<DeviceId>,
    /// Replaces the inbound filter when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Vec<FilterRule>>,
    /// Replaces the reach list when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach: Option<Vec<Reach>>,
    /// Replaces the relay list when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relays: Option<Vec<RelayInfo>>,
    /// The policy version, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
    /// This device as the coordinator now knows it, when that changed (an administrator
    /// renamed it, or moved it aside from a name bound to another device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub me: Option<SelfInfo>,
    /// The candidate inbound filter, when it changed: absent = unchanged, `null` = no
    /// candidate view any more, a list = the new candidate filter.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub shadow_filter: Option<Option<Vec<FilterRule>>>,
    /// Peer sets that are new or changed (protocol 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_sets: Vec<PeerSetChange>,
    /// Peer sets no rule names any more (protocol 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_peer_sets: Vec<u32>,
    /// Replaces the reach grants when present (protocol 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach_grants: Option<Vec<ReachGrant>>,
    /// Destination lists that are new or changed, each whole (protocol 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reach_services: Vec<ReachService>,
    /// Services whose destination list no grant needs any more (protocol 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_reach_services: Vec<String>,
    /// The inbound rules removed and added (protocol 5), applied after `inbound` when both
    /// are present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_edit: Option<ListEdit<FilterRule>>,
    /// The reach grants removed and added (protocol 5), applied after `reach_grants` when
    /// both are present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reach_grants_edit: Option<ListEdit<ReachGrant>>,
}

/// What a list of rules lost and gained (protocol 5). The list is a multiset: order carries
/// no meaning (a filter admits a flow when any of its rules does), an entry listed twice
/// in `remove` removes two copies. Applying it removes one held copy of each entry of
/// `remove`, then adds `add`, then sorts. An entry of `remove` the list does not hold means
/// the edit was made for another list: it is refused and nothing changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEdit<T> {
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<T>,
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<T>,
}

impl<T> Default for ListEdit<T> {
    fn default() -> Self {
        ListEdit {
            remove: Vec::new(),
            add: Vec::new(),
        }
    }
}

impl<T: Ord + Clone> ListEdit<T> {
    /// The edit that turns `old` into `new` (as multisets). Entries the two share in place at
    /// either end are skipped without sorting, so a change to one entry of a long list costs
    /// a walk, not a sort of the list.
    pub fn between(old: &[T], new: &[T]) -> ListEdit<T> {
        let head = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        let (old, new) = (&old[head..], &new[head..]);
        let tail = old
            .iter()
            .rev()
            .zip(new.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        let (old, new) = (&old[..old.len() - tail], &new[..new.len() - tail]);
        let mut o: Vec<&T> = old.iter().collect();
        let mut n: Vec<&T> = new.iter().collect();
        o.sort_unstable();
        n.sort_unstable();
        let mut edit = ListEdit::default();
        let (mut i, mut j) = (0, 0);
        while i < o.len() || j < n.len() {
            match (o.get(i), n.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    edit.remove.push((*a).clone());
                    i += 1;
                }
                (Some(a), None) => {
                    edit.remove.push((*a).clone());
                    i += 1;
                }
                (_, Some(b)) => {
                    edit.add.push((*b).clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
        edit
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// How many entries it carries.
    pub fn len(&self) -> usize {
        self.remove.len() + self.add.len()
    }

    /// `list` with this edit applied (sorted), or an error naming how many removed entries
    /// it does not hold; `list` itself is left alone.
    pub fn applied(&self, list: &[T]) -> Result<Vec<T>, WireError> {
        let mut out: Vec<T> = list.to_vec();
        let at = self.positions(&out)?;
        self.apply_at(&mut out, at);
        Ok(out)
    }

    /// Where in `list` the entries to remove are (one held copy each, ascending), or an
    /// error naming how many it does not hold. Nothing changes: [`ListEdit::apply_at`]
    /// then edits the list in place, without a copy of it.
    fn positions(&self, list: &[T]) -> Result<Vec<usize>, WireError> {
        let mut taken = vec![false; list.len()];
        let mut at = Vec::with_capacity(self.remove.len());
        let mut missing = 0usize;
        for r in &self.remove {
            match (0..list.len()).find(|&i| !taken[i] && list[i] == *r) {
                Some(i) => {
                    taken[i] = true;
                    at.push(i);
                }
                None => missing += 1,
            }
        }
        if missing > 0 {
            return Err(WireError::ListEdit {
                missing,
                held: list.len(),
            });
        }
        at.sort_unstable();
        Ok(at)
    }

    /// Removes the entries at `at` (from [`ListEdit::positions`] for this list), adds
    /// `add`, sorts.
    fn apply_at(&self, list: &mut Vec<T>, at: Vec<usize>) {
        for i in at.into_iter().rev() {
            list.swap_remove(i);
        }
        list.extend(self.add.iter().cloned());
        list.sort();
    }

    /// Folds `next` (the edit applied after this one) into this one, so that applying the
    /// result equals applying both in turn: what `next` removes that this one added is not
    /// added at all; the rest of its removals must come from the list itself.
    pub fn then(&mut self, next: &ListEdit<T>) {
        for r in &next.remove {
            match self.add.iter().position(|x| x == r) {
                Some(i) => {
                    self.add.swap_remove(i);
                }
                None => self.remove.push(r.clone()),
            }
        }
        self.add.extend(next.add.iter().cloned());
    }
}

/// Decodes a field that is present (even as `null`) as `Some`: with `#[serde(default)]`, an
/// absent field stays `None`, so `Option<Option<T>>` tells absent, `null` and a value apart.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl Netmap {
    /// Applies a delta. A delta for another base means the device missed one: the caller must
    /// ask for (or wait for) a full netmap, never guess.
    pub fn apply(&mut self, d: &NetmapDelta) -> Result<(), WireError> {
        if d.base_seq != self.seq {
            return Err(WireError::DeltaGap {
                have: self.seq,
                base: d.base_seq,
            });
        }
        // First, as they are the steps that can fail: the netmap stays as it was. An edit is
        // checked against the list it applies to (the delta's whole list when it carries
        // one) and made in place below.
        let inbound_at = match &d.inbound_edit {
            Some(e) => Some(e.positions(d.inbound.as_deref().unwrap_or(&self.inbound))?),
            None => None,
        };
        let grants_at = match &d.reach_grants_edit {
            Some(e) => Some(e.positions(d.reach_grants.as_deref().unwrap_or(&self.reach_grants))?),
            None => None,
        };
        if !d.peer_sets.is_empty() || !d.removed_peer_sets.is_empty() {
            crate::peerset::apply_changes(
                Arc::make_mut(&mut self.peer_sets),
                &d.peer_sets,
                &d.removed_peer_sets,
            )?;
        }
        self.peers.retain(|p| !d.remove.contains(&p.device_id));
        for u in &d.upsert {
            match self.peers.iter_mut().find(|p| p.device_id == u.device_id) {
                Some(p) => *p = u.clone(),
                None => self.peers.push(u.clone()),
            }
        }
        if !self.peers.is_sorted_by_key(|p| p.device_id) {
            self.peers.sort_by_key(|p| p.device_id);
        }
        if let Some(i) = &d.inbound {
            self.inbound = Arc::new(i.clone());
        }
        if let (Some(e), Some(at)) = (&d.inbound_edit, inbound_at) {
            e.apply_at(Arc::make_mut(&mut self.inbound), at);
        }
        if let Some(r) = &d.reach {
            self.reach = r.clone();
        }
        if let Some(g) = &d.reach_grants {
            self.reach_grants = g.clone();
        }
        if let (Some(e), Some(at)) = (&d.reach_grants_edit, grants_at) {
            e.apply_at(&mut self.reach_grants, at);
        }
        self.reach_services
            .retain(|x| !d.removed_reach_services.contains(&x.service));
        for u in &d.reach_services {
            match self
                .reach_services
                .iter_mut()
                .find(|x| x.service == u.service)
            {
                Some(x) => *x = u.clone(),
                None => self.reach_services.push(u.clone()),
            }
        }
        self.reach_services.sort();
        if let Some(r) = &d.relays {
            self.relays = r.clone();
        }
        if d.policy_version.is_some() {
            self.policy_version = d.policy_version;
        }
        if let Some(me) = &d.me {
            self.me = me.clone();
        }
        if let Some(f) = &d.shadow_filter {
            self.shadow_filter = f.clone();
        }
        self.seq = d.seq;
        Ok(())
    }
}

impl Netmap {
    /// What this device may open elsewhere, one entry per destination device, service,
    /// protocol and rule (sorted, deduplicated), whatever the protocol: the flat `reach` of a
    /// version-1/2 netmap, or the grants of a version-3 one expanded over their services'
    /// destination lists (without this device; a destination that is not among the peers has
    /// no name here and is left out). Computed on each call, never held.
    pub fn reach_view(&self) -> Vec<Reach> {
        let me = self.me.device_id;
        let mut out: Vec<Reach> = self.reach.clone();
        if self.reach_grants.is_empty() {
            return out;
        }
        let names: std::collections::HashMap<DeviceId, &Hostname> = self
            .peers
            .iter()
            .map(|p| (p.device_id, &p.hostname))
            .collect();
        for g in &self.reach_grants {
            let Some(list) = self.reach_services.iter().find(|s| s.service == g.service) else {
                continue;
            };
            for id in list.devices.iter().filter(|id| **id != me) {
                let Some(hostname) = names.get(id) else {
                    continue;
                };
                out.push(Reach {
                    service: g.service.clone(),
                    device_id: *id,
                    hostname: (*hostname).clone(),
                    proto: g.proto,
                    ports: g.ports.clone(),
                    rule: g.rule.clone(),
                    not_after_ms: g.not_after_ms,
                });
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

impl NetmapDelta {
    /// A delta from `base_seq` to `base_seq + 1` that changes nothing yet: the starting point
    /// for building one field by field (`NetmapDelta { upsert, ..NetmapDelta::after(seq) }`).
    pub fn after(base_seq: u64) -> Self {
        NetmapDelta {
            base_seq,
            seq: base_seq.saturating_add(1),
            upsert: Vec::new(),
            remove: Vec::new(),
            inbound: None,
            reach: None,
            relays: None,
            policy_version: None,
            me: None,
            shadow_filter: None,
            peer_sets: Vec::new(),
            removed_peer_sets: Vec::new(),
            reach_grants: None,
            reach_services: Vec::new(),
            removed_reach_services: Vec::new(),
            inbound_edit: None,
            reach_grants_edit: None,
        }
    }

    /// Folds `next` (the delta that follows this one) into this one, so that applying the
    /// merged delta equals applying both in turn: how a coordinator keeps one pending change
    /// for a device that reads slowly instead of queueing one delta per change. Its size stays
    /// bounded by one netmap (a peer appears once, in `upsert` or in `remove`). A `next` that
    /// does not follow this one (`next.base_seq != self.seq`) is refused and nothing changes.
    pub fn merge(&mut self, next: NetmapDelta) -> Result<(), WireError> {
        if next.base_seq != self.seq {
            return Err(WireError::DeltaGap {
                have: self.seq,
                base: next.base_seq,
            });
        }
        let (peer_sets, removed_peer_sets) = crate::peerset::merge_changes(
            &self.peer_sets,
            &self.removed_peer_sets,
            &next.peer_sets,
            &next.removed_peer_sets,
        )?;
        // The rule lists: onto a whole list held, an edit is applied; a whole list replaces
        // whatever was held; two edits fold into one. Checked before anything changes.
        let inbound = merge_list(
            &self.inbound,
            &self.inbound_edit,
            &next.inbound,
            &next.inbound_edit,
        )?;
        let grants = merge_list(
            &self.reach_grants,
            &self.reach_grants_edit,
            &next.reach_grants,
            &next.reach_grants_edit,
        )?;
        (self.inbound, self.inbound_edit) = inbound;
        (self.reach_grants, self.reach_grants_edit) = grants;
        self.peer_sets = peer_sets;
        self.removed_peer_sets = removed_peer_sets;
        // A peer removed later is gone whatever was upserted before; a peer upserted later is
        // there as sent then, whatever was removed before (`apply` removes, then upserts).
        self.upsert.retain(|p| !next.remove.contains(&p.device_id));
        for id in next.remove {
            if !self.remove.contains(&id) {
                self.remove.push(id);
            }
        }
        for u in next.upsert {
            self.remove.retain(|id| *id != u.device_id);
            match self.upsert.iter_mut().find(|p| p.device_id == u.device_id) {
                Some(p) => *p = u,
                None => self.upsert.push(u),
            }
        }
        if next.reach.is_some() {
            self.reach = next.reach;
        }
        // As for peers: a list removed later is gone, a list sent later is there as sent.
        self.reach_services
            .retain(|x| !next.removed_reach_services.contains(&x.service));
        for s in next.removed_reach_services {
            if !self.removed_reach_services.contains(&s) {
                self.removed_reach_services.push(s);
            }
        }
        for u in next.reach_services {
            self.removed_reach_services.retain(|s| *s != u.service);
            match self
                .reach_services
                .iter_mut()
                .find(|x| x.service == u.service)
            {
                Some(x) => *x = u,
                None => self.reach_services.push(u),
            }
        }
        if next.relays.is_some() {
            self.relays = next.relays;
        }
        if next.policy_version.is_some() {
            self.policy_version = next.policy_version;
        }
        if next.me.is_some() {
            self.me = next.me;
        }
        if next.shadow_filter.is_some() {
            self.shadow_filter = next.shadow_filter;
        }
        self.seq = next.seq;
        Ok(())
    }
}

/// A held change to one rule list (whole and/or edit) followed by the next one's, as one.
type ListChange<T> = (Option<Vec<T>>, Option<ListEdit<T>>);

fn merge_list<T: Ord + Clone>(
    whole: &Option<Vec<T>>,
    edit: &Option<ListEdit<T>>,
    next_whole: &Option<Vec<T>>,
    next_edit: &Option<ListEdit<T>>,
) -> Result<ListChange<T>, WireError> {
    if next_whole.is_some() {
        return Ok((next_whole.clone(), next_edit.clone()));
    }
    let Some(next_edit) = next_edit else {
        return Ok((whole.clone(), edit.clone()));
    };
    Ok(match (whole, edit) {
        (Some(w), e) => {
            let w = match e {
                Some(e) => e.applied(w)?,
                None => w.clone(),
            };
            (Some(next_edit.applied(&w)?), None)
        }
        (None, Some(e)) => {
            let mut e = e.clone();
            e.then(next_edit);
            (None, Some(e))
        }
        (None, None) => (None, Some(next_edit.clone())),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended in the middle of a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("netmap delta for base {base} but the device has {have}")]
    DeltaGap { have: u64, base: u64 },
    #[error("netmap delta removes {missing} rules the device does not hold (it holds {held})")]
    ListEdit { missing: usize, held: usize },
    #[error("netmap delta does not fit the peer sets held: {0}")]
    PeerSets(#[from] PeerSetError),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // The body is written after four bytes kept for its length: a netmap of thousands of
    // peers is half a megabyte, not worth copying a second time.
    let mut out = vec![0u8; 4];
    // Serializing our own plain structs to JSON cannot fail (no maps with non-string keys).
    if serde_json::to_writer(&mut out, msg).is_err() {
        out.truncate(4);
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Encodes one message as a frame, as [`encode`] does (the same bytes), but writes each peer
/// of a netmap or delta from `cache`: the JSON of a peer is made once and reused for every
/// netmap that lists the peer unchanged. When a thousand devices reconnect at once, each
/// full netmap lists the same thousand peers; without the cache the coordinator serialised
/// every one of them a thousand times.
pub fn encode_with(msg: &CoordinatorMsg, cache: &mut PeerJson) -> Vec<u8> {
    // The JSON is written into a buffer kept from the last encode, then copied once into a
    // frame of its size: a growing frame would be copied at every doubling.
    let mut scratch = std::mem::take(&mut cache.scratch);
    scratch.clear();
    peer_json::CACHE.with(|c| *c.borrow_mut() = Some(std::mem::take(cache)));
    let written = serde_json::to_writer(&mut scratch, msg);
    peer_json::CACHE.with(|c| {
        if let Some(back) = c.borrow_mut().take() {
            *cache = back;
        }
    });
    cache.tick();
    if written.is_err() {
        scratch.clear();
    }
    let mut out = Vec::with_capacity(4 + scratch.len());
    out.extend_from_slice(&(scratch.len() as u32).to_be_bytes());
    out.extend_from_slice(&scratch);
    // A rare huge netmap does not pin its size for good.
    if scratch.capacity() > PeerJson::SCRATCH_KEPT {
        scratch = Vec::new();
    }
    cache.scratch = scratch;
    out
}

/// Each peer's JSON as last written, by device: see [`encode_with`]. An entry is reused only
/// while the peer is equal, field by field, to the one it was made from, so a changed peer
/// is written afresh; a peer with per-device routes is never cached. Entries unused for
/// [`PeerJson::ROUND`] encodes are dropped, so the cache holds about the devices in use.
#[derive(Default)]
pub struct PeerJson {
    peers: rustc_hash::FxHashMap<DeviceId, CachedPeer>,
    /// Encodes since the cache was made; `used` of an entry is this count when it was last
    /// written from.
    encodes: u64,
    /// Peers written from the cache, and written afresh (for tests and tuning).
    pub hits: u64,
    pub misses: u64,
    scratch: Vec<u8>,
}

struct CachedPeer {
    peer: Peer,
    json: Box<serde_json::value::RawValue>,
    used: u64,
    /// SHA-256 of `json`, once asked for ([`PeerJson::digest`]).
    digest: Option<[u8; 32]>,
}

impl PeerJson {
    /// Encodes between sweeps of entries not used since the last sweep.
    pub const ROUND: u64 = 4096;
    /// The largest encode buffer kept between encodes.
    pub const SCRATCH_KEPT: usize = 8 << 20;

    /// Entries held.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    fn tick(&mut self) {
        self.encodes += 1;
        if self.encodes.is_multiple_of(Self::ROUND) {
            let since = self.encodes - Self::ROUND;
            self.peers.retain(|_, c| c.used > since);
        }
    }

    /// The digest of `p`'s JSON ([`crate::resume::peer_digest`]), made once per version of
    /// the peer: a resync of thousands of sessions that list the same peer hashes it once.
    pub fn digest(&mut self, p: &Peer) -> [u8; 32] {
        if self.raw(p).is_none() {
            return crate::resume::peer_digest(p);
        }
        match self.peers.get_mut(&p.device_id) {
            Some(c) => *c
                .digest
                .get_or_insert_with(|| crate::resume::digest_json(c.json.get().as_bytes())),
            None => crate::resume::peer_digest(p),
        }
    }

    /// The JSON of `p`, from the cache or written now; `None` if it cannot be cached.
    fn raw(&mut self, p: &Peer) -> Option<&serde_json::value::RawValue> {
        if !p.routes.is_empty() {
            return None;
        }
        let used = self.encodes + 1;
        let fresh = match self.peers.get(&p.device_id) {
            Some(c) => c.peer != *p,
            None => true,
        };
        if fresh {
            let json = serde_json::value::to_raw_value(p).ok()?;
            self.misses += 1;
            self.peers.insert(
                p.device_id,
                CachedPeer {
                    peer: p.clone(),
                    json,
                    used,
                    digest: None,
                },
            );
        } else {
            self.hits += 1;
        }
        let c = self.peers.get_mut(&p.device_id)?;
        c.used = used;
        Some(&c.json)
    }
}

/// How `Netmap.peers` and `NetmapDelta.upsert` are written: from the [`PeerJson`] cache
/// lent to this thread by [`encode_with`] for the length of one encode, else plainly.
mod peer_json {
    use super::{Peer, PeerJson};
    use serde::ser::{SerializeSeq, Serializer};
    use serde::Serialize;
    use std::cell::RefCell;

    thread_local! {
        pub(super) static CACHE: RefCell<Option<PeerJson>> = const { RefCell::new(None) };
    }

    pub(super) fn serialize<S: Serializer>(peers: &[Peer], s: S) -> Result<S::Ok, S::Error> {
        CACHE.with(|c| {
            // Writing a peer never writes a peer list, so the cache is never borrowed twice;
            // if it were, the peers would be written plainly, as without a cache.
            let Ok(mut guard) = c.try_borrow_mut() else {
                return peers.serialize(s);
            };
            let Some(cache) = guard.as_mut() else {
                return peers.serialize(s);
            };
            let mut seq = s.serialize_seq(Some(peers.len()))?;
            for p in peers {
                match cache.raw(p) {
                    // A `RawValue` is written as the JSON it holds: the cache is lent only to
                    // `encode`, whose serializer is serde_json's.
                    Some(raw) => seq.serialize_element(raw)?,
                    None => seq.serialize_element(p)?,
                }
            }
            seq.end()
        })
    }
}

/// Decodes one frame body.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(body).map_err(|e| WireError::Decode(short_err(&e.to_string())))
}

/// Decodes one frame body as a [`CoordinatorMsg`]: the same messages as
/// `decode::<CoordinatorMsg>` accepts, with the same errors, faster for the large ones.
///
/// serde's derived decoding of an internally tagged enum reads the whole message into a
/// generic tree first (it cannot know the variant before it has seen `type`), then decodes
/// the variant from that tree: for a netmap or a delta, whose peer and set lists make up
/// nearly all of the message, that doubles the work and allocates every element twice. The
/// coordinator writes `type` first ([`encode`]: serde writes an internally tagged enum's tag
/// before its fields), so the variants that carry a struct of their own are read straight into
/// it once the tag is known. Any other message, a tag that is not first, or any error takes
/// the derived path, whose answer (and error text) is then the answer.
pub fn decode_coordinator_msg(body: &[u8]) -> Result<CoordinatorMsg, WireError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    if let Ok(Some(msg)) = serde::Deserializer::deserialize_map(&mut de, TagFirst) {
        if de.end().is_ok() {
            return Ok(msg);
        }
    }
    decode(body)
}

/// The visitor of [`decode_coordinator_msg`]: `Some` for a struct-carrying variant whose tag
/// came first, `None` (or an error) for the derived path to decide.
struct TagFirst;

impl<'de> serde::de::Visitor<'de> for TagFirst {
    type Value = Option<CoordinatorMsg>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a coordinator message")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // Borrowed strings: a key or tag with escapes fails here and takes the derived path.
        if map.next_key::<&str>()? != Some("type") {
            return Ok(None);
        }
        let tag = map.next_value::<&str>()?;
        let rest = serde::de::value::MapAccessDeserializer::new(WithoutTag(map));
        Ok(Some(match tag {
            "netmap" => CoordinatorMsg::Netmap(Netmap::deserialize(rest)?),
            "netmap_delta" => CoordinatorMsg::NetmapDelta(NetmapDelta::deserialize(rest)?),
            "posture_verdict" => CoordinatorMsg::PostureVerdict(PostureVerdict::deserialize(rest)?),
            "posture_wants" => CoordinatorMsg::PostureWants(PostureWants::deserialize(rest)?),
            _ => return Ok(None),
        }))
    }
}

/// The fields after the tag, refusing a second `type` (the derived path calls it a duplicate;
/// the variant's struct would ignore it).
struct WithoutTag<A>(A);

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for WithoutTag<A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let Some(key) = self.0.next_key::<&'de str>()? else {
            return Ok(None);
        };
        if key == "type" {
            return Err(serde::de::Error::duplicate_field("type"));
        }
        seed.deserialize(serde::de::value::BorrowedStrDeserializer::new(key))
            .map(Some)
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(seed)
    }
}

fn short_err(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Incremental frame splitter: push bytes as they arrive, pull whole frames out.
/// Never buffers more than `max + 4` bytes of one frame.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Bytes as they arrive (any split; [`FrameDecoder::wanted`] says how many the current
    /// frame still needs, for bounded reads).
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        // Once the length is known, room for the whole frame (within the bound) at once: a
        // 90 KB netmap arriving in 1 KB pieces is not copied again at every regrowth.
        if let Some(len) = self.declared() {
            let need = 4 + len.min(self.max);
            self.buf.reserve(need.saturating_sub(self.buf.len()));
        }
    }

    /// Next complete frame body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        let Some(len) = self.declared() else {
            return Ok(None);
        };
        if len > self.max {
            return Err(WireError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        if self.buf.len() == 4 + len {
            // Exactly one frame held (reads ask for no more): its buffer becomes the body.
            let mut body = std::mem::take(&mut self.buf);
            body.drain(..4);
            return Ok(Some(body));
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }

    /// Call at end of stream: leftover bytes mean a truncated frame.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = self.declared().map_or(4, |len| len + 4);
        Err(WireError::Truncated {
            have: self.buf.len(),
            want,
        })
    }

    /// How many more bytes are needed for the current frame (at least 1).
    pub fn wanted(&self) -> usize {
        let Some(len) = self.declared() else {
            return 4 - self.buf.len();
        };
        (4 + len.min(self.max))
            .saturating_sub(self.buf.len())
            .max(1)
    }

    /// Where a reader appends the bytes it reads, with room reserved for the
    /// [`FrameDecoder::wanted`] bytes the current frame still needs: reading straight into it
    /// (appending at most `wanted()` bytes, as [`FrameDecoder::push`] would take them) needs no
    /// buffer of the reader's own, so an idle stream holds only the bytes of its frame so far.
    /// Anything but appending breaks the frames.
    pub fn append_buffer(&mut self) -> &mut Vec<u8> {
        let want = self.wanted();
        self.buf.reserve(want);
        &mut self.buf
    }

    /// The current frame's declared body length, once its 4-byte header is in.
    fn declared(&self) -> Option<usize> {
        let h: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        Some(u32::from_be_bytes(h) as usize)
    }
}

/// `skip_serializing_if` for a shared list.
fn shared_is_empty<T>(v: &Arc<Vec<T>>) -> bool {
    v.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u64) -> Peer {
        Peer {
            routes: Default::default(),
            device_id: DeviceId(id),
            hostname: Hostname::parse(&format!("h{id}")).unwrap(),
            user: Some("alice".into()),
            tags: vec![],
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: "fd00::1".parse().unwrap(),
            wg_public_key: Some(WgPublicKey([id as u8; 32])),
            endpoints: vec!["10.0.0.1:51820".parse().unwrap()],
            online: true,
            leases: vec![],
            relay: None,
        }
    }

    /// Device 1, `me`, at 100.64.0.1.
    fn me_one() -> SelfInfo {
        SelfInfo {
            routes: Default::default(),
            device_id: DeviceId(1),
            hostname: Hostname::parse("me").unwrap(),
            ipv4: Ipv4Addr::new(100, 64, 0, 1),
            ipv6: "fd00::1".parse().unwrap(),
            v6_prefix: "fd00::".parse().unwrap(),
            observed_addr: None,
        }
    }

    /// A netmap of sequence 1, policy version 4, with nothing but `me` and `peers`.
    fn netmap_of(me: SelfInfo, peers: Vec<Peer>) -> Netmap {
        Netmap {
            on_demand: false,
            resumed: None,
            seq: 1,
            me,
            peers,
            inbound: vec![].into(),
            reach: vec![],
            relays: vec![],
            punch: true,
            flows: true,
            policy_version: Some(4),
            shadow_filter: None,
            dns_domain: None,
            coordinators: vec![],
            peer_sets: Vec::new().into(),
            reach_grants: Vec::new(),
            reach_services: Vec::new(),
        }
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let msgs = vec![
            DeviceMsg::Ping { nonce: 7 },
            DeviceMsg::Update(DeviceUpdate {
                advertise_exit_node: Default::default(),
                advertise_routes: Default::default(),
                wg_public_key: Some(WgPublicKey([3; 32])),
                wg_port: 51820,
                local_endpoints: vec!["192.168.1.2:51820".parse().unwrap()],
                home_relay: Some("r1".into()),
                punch: true,
            }),
            DeviceMsg::RelayTicketRequest,
            DeviceMsg::PunchRequest { peer: DeviceId(9) },
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode(m));
        }
        let mut dec = FrameDecoder::new(MAX_DEVICE_FRAME);
        let mut got = Vec::new();
        for b in bytes.chunks(3) {
            dec.push(b);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(decode::<DeviceMsg>(&f).unwrap());
            }
        }
        assert_eq!(got, msgs);
        dec.finish().unwrap();
    }

    /// Reads bounded by `wanted` (as the stream readers make them) hand each frame over whole,
    /// a large one arriving in small pieces too, and a declared length over the bound makes
    /// no room beyond it.
    #[test]
    fn bounded_reads_take_each_frame_whole() {
        let big = DeviceMsg::Update(DeviceUpdate {
            local_endpoints: (0..2000u16)
                .map(|i| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 51820)))
                .collect(),
            ..Default::default()
        });
        let msgs = vec![
            DeviceMsg::Ping { nonce: 1 },
            big,
            DeviceMsg::Ping { nonce: 2 },
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(encode).collect();
        let mut dec = FrameDecoder::new(MAX_DEVICE_FRAME);
        let (mut at, mut got) = (0, Vec::new());
        while at < bytes.len() {
            let n = dec.wanted().min(1200).min(bytes.len() - at);
            dec.push(&bytes[at..at + n]);
            at += n;
            if let Some(f) = dec.next_frame().unwrap() {
                got.push(decode::<DeviceMsg>(&f).unwrap());
            }
        }
        assert_eq!(got, msgs);
        dec.finish().unwrap();
        let mut dec = FrameDecoder::new(16);
        dec.push(&u32::MAX.to_be_bytes());
        assert!(dec.buf.capacity() <= 64, "{}", dec.buf.capacity());
        assert!(dec.next_frame().is_err());
    }

    /// Reading straight into the decoder: room for a header while it waits for a frame, for
    /// the frame (within the bound) once its length is known, and the same frames as `push`.
    #[test]
    fn readers_append_into_the_decoder_within_the_frame() {
        let mut dec = FrameDecoder::new(MAX_DEVICE_FRAME);
        let idle = dec.append_buffer().capacity();
        assert!((4..=64).contains(&idle), "{idle} bytes for a header");
        let bytes = [
            encode(&DeviceMsg::Ping { nonce: 1 }),
            encode(&DeviceMsg::Ping { nonce: 2 }),
        ]
        .concat();
        let (mut at, mut got) = (0, Vec::new());
        while at < bytes.len() {
            let n = dec.wanted().min(3).min(bytes.len() - at);
            dec.append_buffer().extend_from_slice(&bytes[at..at + n]);
            at += n;
            if let Some(f) = dec.next_frame().unwrap() {
                got.push(decode::<DeviceMsg>(&f).unwrap());
            }
        }
        assert_eq!(
            got,
            vec![DeviceMsg::Ping { nonce: 1 }, DeviceMsg::Ping { nonce: 2 }]
        );
        dec.append_buffer().extend_from_slice(&500u32.to_be_bytes());
        assert!(dec.append_buffer().capacity() >= 504);
        let mut dec = FrameDecoder::new(16);
        dec.append_buffer()
            .extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(dec.append_buffer().capacity() <= 64);
        assert!(dec.next_frame().is_err());
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&1000u32.to_be_bytes());
        assert_eq!(
            dec.next_frame(),
            Err(WireError::TooLarge { len: 1000, max: 16 })
        );
        let mut dec = FrameDecoder::new(16);
        dec.push(&[0, 0, 0, 10, b'{']);
        assert_eq!(dec.next_frame(), Ok(None));
        assert!(matches!(
            dec.finish(),
            Err(WireError::Truncated { have: 5, want: 14 })
        ));
        assert_eq!(dec.wanted(), 9);
    }

    #[test]
    fn garbage_and_unknown_types_are_errors() {
        assert!(decode::<DeviceMsg>(b"\xff\xfe garbage").is_err());
        assert!(decode::<DeviceMsg>(br#"{"type":"format_disk"}"#).is_err());
        assert!(decode::<DeviceMsg>(br#"{"type":"ping"}"#).is_err());
        let deep = "[".repeat(100_000);
        assert!(decode::<DeviceMsg>(deep.as_bytes()).is_err());
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let m = DeviceMsg::Enroll(EnrollRequest {
            protocol: 1,
            token_id: "0102".into(),
            token_secret: TokenSecret(Bytes(b"supersecret".to_vec())),
            hostname: "x".into(),
            os: "linux".into(),
            csr_der: Bytes(vec![1, 2, 3]),
        });
        let d = format!("{m:?}");
        assert!(
            !d.contains("supersecret") && !d.contains("c3VwZXJzZWNyZXQ"),
            "{d}"
        );
    }

    #[test]
    fn delta_apply() {
        let me = me_one();
        let mut nm = netmap_of(me, vec![peer(2), peer(3)]);
        // The address list is optional on the wire both ways.
        let with: Netmap = decode(
            &encode(&Netmap {
                resumed: None,
                coordinators: vec!["a:1".into(), "b:1".into()],
                ..nm.clone()
            })[4..],
        )
        .unwrap();
        assert_eq!(with.coordinators, ["a:1", "b:1"]);
        let raw = String::from_utf8(encode(&nm)[4..].to_vec()).unwrap();
        assert!(!raw.contains("coordinators"), "{raw}");
        let mut p3 = peer(3);
        p3.online = false;
        let d = NetmapDelta {
            upsert: vec![p3.clone(), peer(4)],
            remove: vec![DeviceId(2)],
            relays: Some(vec![RelayInfo {
                name: "r1".into(),
                addr: "[2001:db8::7]:3478".into(),
            }]),
            ..NetmapDelta::after(1)
        };
        nm.apply(&d).unwrap();
        assert_eq!(
            nm.policy_version,
            Some(4),
            "an absent version keeps the old one"
        );
        assert_eq!(nm.peers, vec![p3, peer(4)]);
        assert_eq!(nm.relays[0].name, "r1");
        assert_eq!(nm.seq, 2);
        assert_eq!(nm.apply(&d), Err(WireError::DeltaGap { have: 2, base: 1 }));
        assert_eq!(
            nm.me.hostname.as_str(),
            "me",
            "an absent `me` keeps the old one"
        );
        // A delta naming this device anew: the new name replaces the old.
        let renamed = r#"{"type":"netmap_delta","base_seq":2,"seq":3,"me":{"device_id":1,"hostname":"me-2","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":"192.0.2.1:4242"}}"#;
        let CoordinatorMsg::NetmapDelta(d) = decode(renamed.as_bytes()).unwrap() else {
            panic!("not a delta")
        };
        nm.apply(&d).unwrap();
        assert_eq!(nm.me.hostname.as_str(), "me-2");
        assert_eq!(nm.seq, 3);
    }

    #[test]
    fn peers_written_from_the_cache_are_the_bytes_a_plain_encode_writes() {
        let me = |id: u64| SelfInfo {
            routes: Default::default(),
            device_id: DeviceId(id),
            hostname: Hostname::parse(&format!("h{id}")).unwrap(),
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: "fd00::1".parse().unwrap(),
            v6_prefix: "fd00::".parse().unwrap(),
            observed_addr: None,
        };
        let netmap = |to: u64, peers: Vec<Peer>| {
            CoordinatorMsg::Netmap(Netmap {
                resumed: None,
                seq: to,
                ..netmap_of(me(to), peers)
            })
        };
        let mut cache = PeerJson::default();
        let all: Vec<Peer> = (1..=6).map(peer).collect();
        // Every device gets the others; each peer is written once, then reused.
        for to in 1..=6u64 {
            let others: Vec<Peer> = all
                .iter()
                .filter(|p| p.device_id.0 != to)
                .cloned()
                .collect();
            let msg = netmap(to, others);
            assert_eq!(encode_with(&msg, &mut cache), encode(&msg));
        }
        assert_eq!((cache.misses, cache.hits, cache.len()), (6, 24, 6));

        // A peer that changed is written afresh, never from its old JSON.
        let mut moved = peer(3);
        moved.endpoints = vec!["192.0.2.9:4000".parse().unwrap()];
        moved.online = false;
        let msg = netmap(1, vec![peer(2), moved.clone()]);
        let bytes = encode_with(&msg, &mut cache);
        assert_eq!(bytes, encode(&msg));
        let CoordinatorMsg::Netmap(back) = decode(&bytes[4..]).unwrap() else {
            panic!("not a netmap")
        };
        assert_eq!(back.peers[1], moved);
        assert_eq!(cache.misses, 7);

        // A delta's peers go through the same cache; a peer with routes of its own (they
        // differ by the device told) is never cached.
        let mut router = peer(4);
        router.routes = vec!["10.1.0.0/16".parse().unwrap()];
        let delta = CoordinatorMsg::NetmapDelta(NetmapDelta {
            upsert: vec![moved, router.clone(), peer(5)],
            ..NetmapDelta::after(1)
        });
        let (m, h) = (cache.misses, cache.hits);
        assert_eq!(encode_with(&delta, &mut cache), encode(&delta));
        assert_eq!((cache.misses - m, cache.hits - h), (0, 2));
        let plain = netmap(9, vec![router]);
        assert_eq!(encode_with(&plain, &mut cache), encode(&plain));

        // Entries no encode used for a whole round are dropped.
        for _ in 0..2 * PeerJson::ROUND {
            encode_with(&netmap(1, vec![peer(2)]), &mut cache);
        }
        assert_eq!(cache.len(), 1, "only the peer still in use stays");
    }

    /// Flow reports and their acknowledgement as first written; they must keep decoding.
    #[test]
    fn golden_flow_messages_decode() {
        let report = r#"{"type":"flows","seq":3,"dropped_records":2,"windows":[{"start_ms":60000,"end_ms":120000,"records":[{"role":"responder","peer":4,"peer_addr":"100.64.0.4","peer_user":"alice","peer_tags":[],"proto":"tcp","port":5432,"verdict":"allowed","rule":"eng-db","policy_version":2,"packets_out":5,"bytes_out":300,"packets_in":6,"bytes_in":9000,"connections":1},{"role":"responder","peer_addr":"100.64.0.9","proto":"tcp","port":22,"verdict":"denied","reason":"no_rule","packets_out":0,"bytes_out":0,"packets_in":3,"bytes_in":180,"connections":3}]}]}"#;
        let DeviceMsg::Flows(r) = decode(report.as_bytes()).unwrap() else {
            panic!("not flows")
        };
        assert_eq!(r.seq, 3);
        let recs = &r.windows[0].records;
        assert_eq!(recs[0].rule.as_deref(), Some("eng-db"));
        assert_eq!(recs[1].peer, None);
        assert_eq!(recs[1].reason, Some(crate::flows::DenyCause::NoRule));
        r.validate().unwrap();

        let ack = r#"{"type":"flows_ack","seq":3}"#;
        assert_eq!(
            decode::<CoordinatorMsg>(ack.as_bytes()).unwrap(),
            CoordinatorMsg::FlowsAck { seq: 3 }
        );
        // A netmap from before flows: no `flows`, no policy version.
        let nm = r#"{"type":"netmap","seq":1,"me":{"device_id":1,"hostname":"a","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null},"peers":[]}"#;
        let CoordinatorMsg::Netmap(nm) = decode(nm.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert!(!nm.flows);
        assert_eq!(nm.policy_version, None);
        assert_eq!(nm.shadow_filter, None);
        assert_eq!(nm.dns_domain, None);
    }

    /// The DNS domain in a netmap as first written.
    #[test]
    fn golden_dns_domain_decodes() {
        let nm = r#"{"type":"netmap","seq":1,"me":{"device_id":1,"hostname":"a","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null},"peers":[],"dns_domain":"corp.example"}"#;
        let CoordinatorMsg::Netmap(nm) = decode(nm.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert_eq!(nm.dns_domain.unwrap().as_str(), "corp.example");
        // A domain that is not one is a protocol error, never a name the device resolves.
        let bad = r#"{"type":"netmap","seq":1,"me":{"device_id":1,"hostname":"a","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null},"peers":[],"dns_domain":"Bad Domain"}"#;
        assert!(decode::<CoordinatorMsg>(bad.as_bytes()).is_err());
    }

    /// A hello that says what the device holds, and a resumed netmap, as first written; a
    /// hello without a holding (older agents) holds nothing.
    #[test]
    fn golden_resume_decodes() {
        let hello = r#"{"type":"hello","protocol":3,"os":"x","holding":{"buckets":"AAAAAAAAAAAAAAAAAAAAAAEBAQEBAQEBAQEBAQEBAQE="}}"#;
        let DeviceMsg::Hello(h) = decode(hello.as_bytes()).unwrap() else {
            panic!("not hello")
        };
        let holding = h.holding.expect("a holding");
        assert_eq!(holding.count(), Ok(2));
        assert_eq!(holding.buckets.0[16..], [1u8; 16]);
        let DeviceMsg::Hello(old) = decode(br#"{"type":"hello","protocol":3,"os":"x"}"#).unwrap()
        else {
            panic!("not hello")
        };
        assert_eq!(old.holding, None);
        let nm = r#"{"type":"netmap","seq":4,"me":{"device_id":1,"hostname":"a","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null},"peers":[],"resumed":{"buckets":2,"sent":[1]}}"#;
        let CoordinatorMsg::Netmap(nm) = decode(nm.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert_eq!(
            nm.resumed,
            Some(Resumed {
                buckets: 2,
                sent: vec![1]
            })
        );
        // Written back the same way; absent when not resumed.
        let again =
            String::from_utf8(encode(&CoordinatorMsg::Netmap(nm.clone()))[4..].to_vec()).unwrap();
        assert!(
            again.contains(r#""resumed":{"buckets":2,"sent":[1]}"#),
            "{again}"
        );
        let whole = Netmap {
            resumed: None,
            ..nm
        };
        let again =
            String::from_utf8(encode(&CoordinatorMsg::Netmap(whole))[4..].to_vec()).unwrap();
        assert!(!again.contains("resumed"), "{again}");
    }

    /// The candidate filter in netmaps and deltas as first written; they must keep decoding,
    /// and a delta tells "unchanged" (absent), "none any more" (`null`) and a new list apart.
    #[test]
    fn golden_shadow_filter_decodes() {
        let nm = r#"{"type":"netmap","seq":1,"me":{"device_id":1,"hostname":"a","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null},"peers":[],"inbound":[],"flows":true,"policy_version":3,"shadow_filter":[{"rule":"web-narrow","service":"web","sources":["100.64.0.2"],"proto":"tcp","ports":[{"lo":8080,"hi":8080}],"not_after_ms":null}]}"#;
        let CoordinatorMsg::Netmap(mut nm) = decode(nm.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        let sf = nm.shadow_filter.clone().unwrap();
        assert_eq!(sf[0].rule, "web-narrow");
        assert_eq!(sf[0].ports, vec![PortRange { lo: 8080, hi: 8080 }]);
        // Unchanged: the delta says nothing about it.
        let d = r#"{"type":"netmap_delta","base_seq":1,"seq":2}"#;
        let CoordinatorMsg::NetmapDelta(d) = decode(d.as_bytes()).unwrap() else {
            panic!("not a delta")
        };
        assert_eq!(d.shadow_filter, None);
        nm.apply(&d).unwrap();
        assert_eq!(nm.shadow_filter.as_ref(), Some(&sf));
        // Replaced by an empty candidate filter.
        let d = r#"{"type":"netmap_delta","base_seq":2,"seq":3,"shadow_filter":[]}"#;
        let CoordinatorMsg::NetmapDelta(d) = decode(d.as_bytes()).unwrap() else {
            panic!("not a delta")
        };
        nm.apply(&d).unwrap();
        assert_eq!(nm.shadow_filter, Some(vec![]));
        // No candidate view any more.
        let d = r#"{"type":"netmap_delta","base_seq":3,"seq":4,"shadow_filter":null}"#;
        let CoordinatorMsg::NetmapDelta(d) = decode(d.as_bytes()).unwrap() else {
            panic!("not a delta")
        };
        assert_eq!(d.shadow_filter, Some(None));
        nm.apply(&d).unwrap();
        assert_eq!(nm.shadow_filter, None);
        // Encoding: no candidate view, no field (older agents see what they always saw);
        // clearing encodes as null.
        let text =
            String::from_utf8(encode(&CoordinatorMsg::Netmap(nm.clone()))[4..].to_vec()).unwrap();
        assert!(!text.contains("shadow_filter"), "{text}");
        let clear = NetmapDelta {
            shadow_filter: Some(None),
            ..NetmapDelta::after(4)
        };
        let text =
            String::from_utf8(encode(&CoordinatorMsg::NetmapDelta(clear.clone()))[4..].to_vec())
                .unwrap();
        assert!(text.contains("\"shadow_filter\":null"), "{text}");
        let CoordinatorMsg::NetmapDelta(back) = decode(text.as_bytes()).unwrap() else {
            panic!("not a delta")
        };
        assert_eq!(back, clear);
    }

    /// The OpenID sign-in messages as first written.
    #[test]
    fn golden_login_messages_decode() {
        let start = r#"{"type":"login_start","protocol":1,"hostname":"laptop","os":"debian","csr_der":"AQID"}"#;
        let DeviceMsg::LoginStart(l) = decode(start.as_bytes()).unwrap() else {
            panic!("not login_start")
        };
        assert_eq!(
            (l.hostname.as_str(), l.csr_der.0.as_slice()),
            ("laptop", &[1u8, 2, 3][..])
        );
        let pending = r#"{"type":"login_pending","verification_uri":"https://idp/device","user_code":"ABCD-EFGH","expires_in_secs":600}"#;
        let CoordinatorMsg::LoginPending(p) = decode(pending.as_bytes()).unwrap() else {
            panic!("not login_pending")
        };
        assert_eq!(p.verification_uri_complete, None);
        assert_eq!(p.user_code, "ABCD-EFGH");
        let failed = r#"{"type":"error","code":"login_failed","message":"token expired"}"#;
        assert!(matches!(
            decode::<CoordinatorMsg>(failed.as_bytes()).unwrap(),
            CoordinatorMsg::Error {
                code: ErrorCode::LoginFailed,
                ..
            }
        ));
        let m = CoordinatorMsg::LoginPending(LoginPending {
            verification_uri: "https://idp/device".into(),
            verification_uri_complete: Some("https://idp/device?user_code=X".into()),
            user_code: "X".into(),
            expires_in_secs: 5,
        });
        assert_eq!(decode::<CoordinatorMsg>(&encode(&m)[4..]).unwrap(), m);
    }

    #[test]
    fn a_verdict_names_the_fresh_sign_in_it_waits_for() {
        let mut v = PostureVerdict::default();
        assert_eq!(v.sign_in_again(), None);
        v.results.push(Evaluation {
            requirement: "watch".into(),
            passed: false,
            failures: vec![
                "firewall: off".into(),
                "sign in again: risk 55 (limit 30 without a fresh sign-in)".into(),
            ],
        });
        assert_eq!(
            v.sign_in_again(),
            Some("sign in again: risk 55 (limit 30 without a fresh sign-in)")
        );
    }

    /// Signing in again on an enrolled device, as first written.
    #[test]
    fn golden_sign_in_again_messages_decode() {
        let start = r#"{"type":"sign_in_start","protocol":1}"#;
        let DeviceMsg::SignInStart(s) = decode(start.as_bytes()).unwrap() else {
            panic!("not sign_in_start")
        };
        assert_eq!((s.protocol, s.pkce), (1, None));
        let browser = r#"{"type":"sign_in_start","protocol":1,"pkce":{"redirect_uri":"http://127.0.0.1:4000/callback","code_challenge":"ch"}}"#;
        let DeviceMsg::SignInStart(s) = decode(browser.as_bytes()).unwrap() else {
            panic!("not sign_in_start")
        };
        assert_eq!(s.pkce.map(|p| p.code_challenge), Some("ch".into()));
        let done = r#"{"type":"signed_in","user":"alice","auth_time_ms":1700000000000,"amr":["pwd"],"groups":["eng"]}"#;
        let CoordinatorMsg::SignedIn(d) = decode(done.as_bytes()).unwrap() else {
            panic!("not signed_in")
        };
        assert_eq!(
            (d.user.as_str(), d.auth_time_ms),
            ("alice", 1_700_000_000_000)
        );
        assert_eq!((d.amr, d.groups), (vec!["pwd".into()], vec!["eng".into()]));
        let bare = r#"{"type":"signed_in","user":"alice","auth_time_ms":1}"#;
        assert!(decode::<CoordinatorMsg>(bare.as_bytes()).is_ok());
        let m = DeviceMsg::SignInStart(SignInStart {
            protocol: PROTOCOL_VERSION,
            pkce: None,
        });
        assert_eq!(decode::<DeviceMsg>(&encode(&m)[4..]).unwrap(), m);
    }

    /// The browser sign-in messages as first written; a `login_start` without `pkce` is the
    /// device grant's.
    #[test]
    fn golden_browser_login_messages_decode() {
        let start = r#"{"type":"login_start","protocol":1,"hostname":"laptop","os":"debian","csr_der":"AQID","pkce":{"redirect_uri":"http://127.0.0.1:4000/callback","code_challenge":"E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"}}"#;
        let DeviceMsg::LoginStart(l) = decode(start.as_bytes()).unwrap() else {
            panic!("not login_start")
        };
        assert_eq!(
            l.pkce.as_ref().map(|p| p.redirect_uri.as_str()),
            Some("http://127.0.0.1:4000/callback")
        );
        let auth = r#"{"type":"login_authorize","authorize_url":"https://idp/auth?x=1","state":"st","expires_in_secs":300}"#;
        let CoordinatorMsg::LoginAuthorize(a) = decode(auth.as_bytes()).unwrap() else {
            panic!("not login_authorize")
        };
        assert_eq!((a.state.as_str(), a.expires_in_secs), ("st", 300));
        let cb = r#"{"type":"login_callback","state":"st","code":"c0de","code_verifier":"v"}"#;
        let DeviceMsg::LoginCallback(c) = decode(cb.as_bytes()).unwrap() else {
            panic!("not login_callback")
        };
        assert_eq!(
            (c.code.as_deref(), c.error.as_deref()),
            (Some("c0de"), None)
        );
        assert!(!format!("{c:?}").contains("c0de"));
        let denied =
            r#"{"type":"login_callback","state":"st","error":"access_denied","code_verifier":"v"}"#;
        let DeviceMsg::LoginCallback(c) = decode(denied.as_bytes()).unwrap() else {
            panic!("not login_callback")
        };
        assert_eq!(c.error.as_deref(), Some("access_denied"));
        let m = DeviceMsg::LoginStart(LoginStart {
            protocol: 1,
            hostname: "h".into(),
            os: "o".into(),
            csr_der: Bytes(vec![1]),
            pkce: None,
        });
        assert!(!String::from_utf8_lossy(&encode(&m)).contains("pkce"));
    }

    /// A version-1 netmap and delta as a version-1 coordinator sent them (every source in
    /// `sources`, no sets) decode, apply and filter as before; a version-2 netmap with peer
    /// sets and a delta that changes one set decode and filter the same flows.
    #[test]
    fn golden_peer_sets_decode_and_filter_like_flat_rules() {
        use crate::filter::{Filter, Verdict};
        let me = r#""me":{"device_id":1,"hostname":"db","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null}"#;
        let v1 = format!(
            r#"{{"type":"netmap","seq":1,{me},"peers":[],"inbound":[{{"rule":"eng","service":"db","sources":["100.64.0.2","100.64.0.3","fd00::2","fd00::3"],"proto":"tcp","ports":[{{"lo":5432,"hi":5432}}],"not_after_ms":null}}]}}"#
        );
        let CoordinatorMsg::Netmap(mut v1) = decode(v1.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert!(v1.peer_sets.is_empty() && v1.inbound[0].source_sets.is_empty());
        let v2 = format!(
            r#"{{"type":"netmap","seq":1,{me},"peers":[],"inbound":[{{"rule":"eng","service":"db","source_sets":[4],"proto":"tcp","ports":[{{"lo":5432,"hi":5432}}],"not_after_ms":null}}],"peer_sets":[{{"id":4,"prefixes":["100.64.0.2/31","fd00::2/127"]}}]}}"#
        );
        let CoordinatorMsg::Netmap(mut v2) = decode(v2.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert!(v2.inbound[0].sources.is_empty());
        let judge = |nm: &Netmap, src: [u8; 4]| {
            let mut f = Filter::new(64);
            f.set_rules_with_sets(nm.inbound.to_vec(), &nm.peer_sets);
            let mut p = vec![0u8; 40];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&40u16.to_be_bytes());
            p[9] = 6;
            p[12..16].copy_from_slice(&src);
            p[16..20].copy_from_slice(&[100, 64, 0, 1]);
            p[22..24].copy_from_slice(&5432u16.to_be_bytes());
            p[32] = 5 << 4;
            p[33] = 0x02;
            f.check_inbound(&p, std::time::Instant::now(), 0) == Verdict::Allow
        };
        for nm in [&v1, &v2] {
            assert!(judge(nm, [100, 64, 0, 2]) && judge(nm, [100, 64, 0, 3]));
            assert!(!judge(nm, [100, 64, 0, 4]));
        }
        // A version-1 delta replaces the flat filter; a version-2 delta adds .4 to set 4 and
        // leaves the rules alone.
        let d1 = r#"{"type":"netmap_delta","base_seq":1,"seq":2,"inbound":[{"rule":"eng","service":"db","sources":["100.64.0.2","100.64.0.3","100.64.0.4"],"proto":"tcp","ports":[{"lo":5432,"hi":5432}],"not_after_ms":null}]}"#;
        let CoordinatorMsg::NetmapDelta(d1) = decode(d1.as_bytes()).unwrap() else {
            panic!("not delta")
        };
        v1.apply(&d1).unwrap();
        let d2 = r#"{"type":"netmap_delta","base_seq":1,"seq":2,"peer_sets":[{"id":4,"add":["100.64.0.4/32"]}]}"#;
        let CoordinatorMsg::NetmapDelta(d2) = decode(d2.as_bytes()).unwrap() else {
            panic!("not delta")
        };
        assert!(d2.inbound.is_none());
        v2.apply(&d2).unwrap();
        for nm in [&v1, &v2] {
            assert!(judge(nm, [100, 64, 0, 4]), "{nm:?}");
            assert!(!judge(nm, [100, 64, 0, 5]));
        }
        // A delta that removes the set leaves the rule naming nothing: it allows nobody.
        let d3 = r#"{"type":"netmap_delta","base_seq":2,"seq":3,"removed_peer_sets":[4]}"#;
        let CoordinatorMsg::NetmapDelta(d3) = decode(d3.as_bytes()).unwrap() else {
            panic!("not delta")
        };
        v2.apply(&d3).unwrap();
        assert!(!judge(&v2, [100, 64, 0, 2]));
        // A change to a set the device does not hold is an error and changes nothing.
        let bad = r#"{"type":"netmap_delta","base_seq":3,"seq":4,"peer_sets":[{"id":4,"remove":["100.64.0.2/32"]}]}"#;
        let CoordinatorMsg::NetmapDelta(bad) = decode(bad.as_bytes()).unwrap() else {
            panic!("not delta")
        };
        let before = v2.clone();
        assert!(matches!(v2.apply(&bad), Err(WireError::PeerSets(_))));
        assert_eq!(v2, before);
        // What a version-2 netmap puts on the wire for sets, as first written.
        let text =
            String::from_utf8(encode(&CoordinatorMsg::Netmap(before))[4..].to_vec()).unwrap();
        assert!(
            text.contains(r#""source_sets":[4]"#) && !text.contains(r#""sources""#),
            "{text}"
        );
        assert!(speaks(1) && speaks(2) && speaks(3) && speaks(4) && speaks(5));
        assert!(!speaks(0) && !speaks(6));
    }

    /// Reach in every version: a version-1/2 netmap's flat `reach` and a version-3 netmap's
    /// grants over destination lists give the same view; a version-3 delta changes grants and
    /// lists, merges, and round-trips.
    #[test]
    fn golden_reach_by_reference_decodes_and_expands_like_flat_reach() {
        let me = r#""me":{"device_id":1,"hostname":"laptop","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null}"#;
        let peers = r#""peers":[{"device_id":2,"hostname":"db1","ipv4":"100.64.0.2","ipv6":"fd00::2"},{"device_id":3,"hostname":"db2","ipv4":"100.64.0.3","ipv6":"fd00::3"}]"#;
        // Versions 1 and 2: one entry per destination, as first written.
        let flat = format!(
            r#"{{"type":"netmap","seq":1,{me},{peers},"reach":[{{"service":"db","device_id":2,"hostname":"db1","proto":"tcp","ports":[{{"lo":5432,"hi":5432}}],"rule":"eng","not_after_ms":null}},{{"service":"db","device_id":3,"hostname":"db2","proto":"tcp","ports":[{{"lo":5432,"hi":5432}}],"rule":"eng","not_after_ms":null}}]}}"#
        );
        let CoordinatorMsg::Netmap(flat) = decode(flat.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert!(flat.reach_grants.is_empty() && flat.reach_services.is_empty());
        assert_eq!(flat.reach_view(), flat.reach);
        let delta = r#"{"type":"netmap_delta","base_seq":1,"seq":2,"reach":[]}"#;
        let CoordinatorMsg::NetmapDelta(d) = decode(delta.as_bytes()).unwrap() else {
            panic!("not delta")
        };
        assert!(d.reach_grants.is_none() && d.reach_services.is_empty());
        let mut f = flat.clone();
        f.apply(&d).unwrap();
        assert!(f.reach_view().is_empty());
        // Version 3: the same reach as one grant over the service's list; the list names this
        // device too (it is one of db's devices), which never reaches itself.
        let v3 = format!(
            r#"{{"type":"netmap","seq":1,{me},{peers},"reach_grants":[{{"service":"db","proto":"tcp","ports":[{{"lo":5432,"hi":5432}}],"rule":"eng","not_after_ms":null}}],"reach_services":[{{"service":"db","devices":[1,2,3]}}]}}"#
        );
        let CoordinatorMsg::Netmap(mut v3) = decode(v3.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert!(v3.reach.is_empty());
        assert_eq!(v3.reach_view(), flat.reach);
        let back: CoordinatorMsg =
            decode(&encode(&CoordinatorMsg::Netmap(v3.clone()))[4..]).unwrap();
        assert_eq!(back, CoordinatorMsg::Netmap(v3.clone()));
        // A delta: db3 joins db (its list is sent whole), ssh is granted on a new list.
        let d2 = r#"{"type":"netmap_delta","base_seq":1,"seq":2,"upsert":[{"device_id":4,"hostname":"db3","ipv4":"100.64.0.4","ipv6":"fd00::4"}],"reach_grants":[{"service":"db","proto":"tcp","ports":[{"lo":5432,"hi":5432}],"rule":"eng"},{"service":"ssh","proto":"tcp","ports":[{"lo":22,"hi":22}],"rule":"ops"}],"reach_services":[{"service":"db","devices":[1,2,3,4]},{"service":"ssh","devices":[2]}]}"#;
        let CoordinatorMsg::NetmapDelta(d2) = decode(d2.as_bytes()).unwrap() else {
            panic!("not delta")
        };
        // Then ssh goes (its list with it), and db's grant moves to another port.
        let d3 = r#"{"type":"netmap_delta","base_seq":2,"seq":3,"reach_grants":[{"service":"db","proto":"tcp","ports":[{"lo":6432,"hi":6432}],"rule":"eng"}],"removed_reach_services":["ssh"]}"#;
        let CoordinatorMsg::NetmapDelta(d3) = decode(d3.as_bytes()).unwrap() else {
            panic!("not delta")
        };
        let mut merged = d2.clone();
        merged.merge(d3.clone()).unwrap();
        let mut one_by_one = v3.clone();
        one_by_one.apply(&d2).unwrap();
        let after2 = one_by_one.reach_view();
        assert_eq!(after2.len(), 4, "{after2:?}");
        assert!(after2
            .iter()
            .any(|r| r.service == "ssh" && r.hostname.as_str() == "db1"));
        assert!(after2
            .iter()
            .any(|r| r.device_id == DeviceId(4) && r.hostname.as_str() == "db3"));
        assert!(after2.iter().all(|r| r.device_id != DeviceId(1)));
        one_by_one.apply(&d3).unwrap();
        v3.apply(&merged).unwrap();
        assert_eq!(v3, one_by_one);
        let view = v3.reach_view();
        assert_eq!(view.len(), 3, "{view:?}");
        assert!(view
            .iter()
            .all(|r| r.service == "db" && r.ports == vec![PortRange { lo: 6432, hi: 6432 }]));
        assert_eq!(v3.reach_services.len(), 1);
        // The delta's wire form, and what a version-3 coordinator never sends a version-2
        // device (the fields are absent when empty).
        let text =
            String::from_utf8(encode(&CoordinatorMsg::NetmapDelta(merged))[4..].to_vec()).unwrap();
        assert!(
            text.contains(r#""removed_reach_services":["ssh"]"#),
            "{text}"
        );
        let text = String::from_utf8(encode(&CoordinatorMsg::Netmap(flat))[4..].to_vec()).unwrap();
        assert!(
            !text.contains("reach_grants") && !text.contains("reach_services"),
            "{text}"
        );
    }

    /// Peers on demand (protocol 4) as first written; a version-3 netmap has no `on_demand`
    /// and lists every peer.
    #[test]
    fn golden_peers_on_demand_decode() {
        let want = r#"{"type":"want_peer","by":{"addr":"100.64.0.9"}}"#;
        let m: DeviceMsg = decode(want.as_bytes()).unwrap();
        assert_eq!(
            m,
            DeviceMsg::WantPeer {
                by: PeerRef::Addr("100.64.0.9".parse().unwrap())
            }
        );
        let want =
            r#"{"type":"want_peer","by":{"key":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="}}"#;
        let m: DeviceMsg = decode(want.as_bytes()).unwrap();
        assert_eq!(
            m,
            DeviceMsg::WantPeer {
                by: PeerRef::Key(WgPublicKey([3; 32]))
            }
        );
        let want = r#"{"type":"want_peer","by":{"name":"DB-1"}}"#;
        let m: DeviceMsg = decode(want.as_bytes()).unwrap();
        assert_eq!(
            m,
            DeviceMsg::WantPeer {
                by: PeerRef::Name(Label::parse("db-1").unwrap())
            }
        );
        let long = "x".repeat(64);
        for bad in ["", "db.ward", "a b", long.as_str()] {
            let text = format!(r#"{{"type":"want_peer","by":{{"name":"{bad}"}}}}"#);
            assert!(decode::<DeviceMsg>(text.as_bytes()).is_err(), "{bad}");
        }
        assert!(decode::<DeviceMsg>(br#"{"type":"want_peer","by":{"host":"db"}}"#).is_err());
        let refused = r#"{"type":"peer_refused","by":{"addr":"fd00::9"},"reason":"policy allows no traffic with 100.64.0.9"}"#;
        let CoordinatorMsg::PeerRefused { by, reason } = decode(refused.as_bytes()).unwrap() else {
            panic!("not peer_refused")
        };
        assert_eq!(by, PeerRef::Addr("fd00::9".parse().unwrap()));
        assert!(reason.contains("policy"));
        let hello = r#"{"type":"hello","protocol":4,"os":"debian 12","held_peers":[2,7]}"#;
        let DeviceMsg::Hello(h) = decode(hello.as_bytes()).unwrap() else {
            panic!("not hello")
        };
        assert_eq!(h.held_peers, vec![DeviceId(2), DeviceId(7)]);
        let me = r#""me":{"device_id":1,"hostname":"laptop","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null}"#;
        let v4 = format!(
            r#"{{"type":"netmap","seq":1,{me},"peers":[{{"device_id":2,"hostname":"db1","ipv4":"100.64.0.2","ipv6":"fd00::2"}}],"on_demand":true}}"#
        );
        let CoordinatorMsg::Netmap(v4) = decode(v4.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert!(v4.on_demand);
        let v3 = format!(r#"{{"type":"netmap","seq":1,{me},"peers":[]}}"#);
        let CoordinatorMsg::Netmap(v3) = decode(v3.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert!(!v3.on_demand);
        let text = String::from_utf8(encode(&CoordinatorMsg::Netmap(v3))[4..].to_vec()).unwrap();
        assert!(!text.contains("on_demand"), "{text}");
        let back: CoordinatorMsg =
            decode(&encode(&CoordinatorMsg::Netmap(v4.clone()))[4..]).unwrap();
        assert_eq!(back, CoordinatorMsg::Netmap(v4));
    }

    /// Version-1 messages as they were first written; they must keep decoding.
    #[test]
    fn golden_v1_messages_decode() {
        let hello = r#"{"type":"hello","protocol":1,"os":"debian 12","wg_public_key":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=","wg_port":51820,"local_endpoints":["192.168.1.2:51820"]}"#;
        let m: DeviceMsg = decode(hello.as_bytes()).unwrap();
        let DeviceMsg::Hello(h) = m else {
            panic!("not hello")
        };
        assert_eq!(h.update.wg_public_key, Some(WgPublicKey([3; 32])));
        assert_eq!(h.version, "");

        let minimal_hello = r#"{"type":"hello","protocol":1,"os":"x"}"#;
        assert!(decode::<DeviceMsg>(minimal_hello.as_bytes()).is_ok());

        let enroll = r#"{"type":"enroll","protocol":1,"token_id":"0102030405060708","token_secret":"CQkJ","hostname":"laptop","os":"debian","csr_der":"AQID"}"#;
        assert!(matches!(
            decode::<DeviceMsg>(enroll.as_bytes()).unwrap(),
            DeviceMsg::Enroll(_)
        ));

        let delta = r#"{"type":"netmap_delta","base_seq":4,"seq":5,"remove":[7]}"#;
        let CoordinatorMsg::NetmapDelta(d) = decode(delta.as_bytes()).unwrap() else {
            panic!("not delta")
        };
        assert_eq!(d.remove, vec![DeviceId(7)]);
        assert!(d.upsert.is_empty());

        // Posture messages as first written.
        let flows = r#"{"type":"denied_flows","flows":[{"src":"100.64.0.9","proto":"tcp","port":22,"count":3}]}"#;
        let DeviceMsg::DeniedFlows { flows } = decode(flows.as_bytes()).unwrap() else {
            panic!("not denied_flows")
        };
        assert_eq!(flows[0].port, 22);
        let report = r#"{"type":"posture","device_id":7,"seq":1800000000000,"collected_at_ms":1800000000000,
            "os":{"at_ms":1,"reading":{"value":{"id":"debian","version":"12","pretty":"Debian GNU/Linux 12"}}},
            "kernel":{"at_ms":1,"reading":{"value":"6.1.0-18-amd64"}},"ward_version":"0.1.0",
            "firewall":{"at_ms":1,"reading":{"error":"nft: not found"}},
            "disk_encryption":{"at_ms":1,"reading":{"value":false}},
            "screen_lock":{"at_ms":1,"reading":{"value":null}},
            "last_package_update_ms":{"at_ms":1,"reading":{"value":1700000000000}},
            "files":{"/etc/ward/ok":{"at_ms":1,"reading":{"value":{"present":true}}}}}"#;
        let DeviceMsg::Posture(r) = decode(report.as_bytes()).unwrap() else {
            panic!("not posture")
        };
        assert_eq!(r.device_id, DeviceId(7));
        assert!(r.firewall.get().is_err());
        assert_eq!(r.screen_lock.get(), Ok(&None));
        assert!(r.processes.is_empty() && r.files["/etc/ward/ok"].get().unwrap().present);
        let verdict = r#"{"type":"posture_verdict","evaluated_at_ms":5,"results":[{"requirement":"baseline","passed":false,"failures":["file /x: missing"]}],"quarantine":null}"#;
        let CoordinatorMsg::PostureVerdict(v) = decode(verdict.as_bytes()).unwrap() else {
            panic!("not verdict")
        };
        assert!(!v.results[0].passed && v.unavailable.is_empty() && v.report_seq.is_none());
        let wants = r#"{"type":"posture_wants","processes":["osqueryd"],"files":[["/x",true]]}"#;
        let CoordinatorMsg::PostureWants(w) = decode(wants.as_bytes()).unwrap() else {
            panic!("not wants")
        };
        assert_eq!(w.files, vec![("/x".to_string(), true)]);
        assert!(w.custom.is_empty());

        // Relayed paths: a hello and a peer without them still decode (no relay), and the
        // new messages as first written.
        assert_eq!(h.update.home_relay, None);
        let CoordinatorMsg::NetmapDelta(d) = decode(
            br#"{"type":"netmap_delta","base_seq":1,"seq":2,"upsert":[{"device_id":3,"hostname":"h3","ipv4":"100.64.0.3","ipv6":"fd00::3","relay":"r1"}]}"#,
        )
        .unwrap() else {
            panic!("not delta")
        };
        assert_eq!(d.upsert[0].relay.as_deref(), Some("r1"));
        assert_eq!(
            decode::<DeviceMsg>(br#"{"type":"relay_ticket_request"}"#).unwrap(),
            DeviceMsg::RelayTicketRequest
        );
        let update = r#"{"type":"update","wg_port":1,"home_relay":"r2"}"#;
        let DeviceMsg::Update(u) = decode(update.as_bytes()).unwrap() else {
            panic!("not update")
        };
        assert_eq!(u.home_relay.as_deref(), Some("r2"));

        // Hole punching: older updates and netmaps say nothing of it (so neither side is sent
        // the new messages), and the new messages as first written.
        assert!(!u.punch && !h.update.punch);
        let nm = r#"{"type":"netmap","seq":1,"me":{"device_id":1,"hostname":"me","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null},"peers":[]}"#;
        let CoordinatorMsg::Netmap(nm) = decode(nm.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        assert!(!nm.punch);
        let u: DeviceMsg = decode(br#"{"type":"update","wg_port":1,"punch":true}"#).unwrap();
        assert!(matches!(
            u,
            DeviceMsg::Update(DeviceUpdate { punch: true, .. })
        ));
        assert_eq!(
            decode::<DeviceMsg>(br#"{"type":"punch_request","peer":7}"#).unwrap(),
            DeviceMsg::PunchRequest { peer: DeviceId(7) }
        );
        assert_eq!(
            decode::<CoordinatorMsg>(
                br#"{"type":"punch","peer":7,"endpoints":["203.0.113.7:51820","[2001:db8::7]:51820"]}"#
            )
            .unwrap(),
            CoordinatorMsg::Punch {
                peer: DeviceId(7),
                endpoints: vec![
                    "203.0.113.7:51820".parse().unwrap(),
                    "[2001:db8::7]:51820".parse().unwrap()
                ],
            }
        );
        assert_eq!(
            encode(&DeviceMsg::PunchRequest { peer: DeviceId(7) })[4..],
            br#"{"type":"punch_request","peer":7}"#[..]
        );
        // A lease request as first written (no proof) still decodes, as a request without one;
        // with a proof it round-trips.
        let lr = r#"{"type":"lease_request","wg_public_key":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="}"#;
        assert_eq!(
            decode::<DeviceMsg>(lr.as_bytes()).unwrap(),
            DeviceMsg::LeaseRequest {
                wg_public_key: WgPublicKey([3; 32]),
                proof: None
            }
        );
        let with = DeviceMsg::LeaseRequest {
            wg_public_key: WgPublicKey([3; 32]),
            proof: Some(KeyProof([4; 32])),
        };
        let bytes = encode(&with);
        assert!(std::str::from_utf8(&bytes[4..])
            .unwrap()
            .contains(r#""proof":"BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=""#));
        assert_eq!(decode::<DeviceMsg>(&bytes[4..]).unwrap(), with);
        assert_eq!(
            decode::<CoordinatorMsg>(br#"{"type":"error","code":"key_in_use","message":"m"}"#)
                .unwrap(),
            CoordinatorMsg::Error {
                code: ErrorCode::KeyInUse,
                message: "m".into()
            }
        );

        let err = r#"{"type":"error","code":"token_used","message":"token already used"}"#;
        assert_eq!(
            decode::<CoordinatorMsg>(err.as_bytes()).unwrap(),
            CoordinatorMsg::Error {
                code: ErrorCode::TokenUsed,
                message: "token already used".into()
            }
        );
    }

    /// Applying deltas one after the other and applying them merged into one give the same
    /// netmap, over many random sequences of upserts, removals and replaced fields.
    /// Version 5: a delta that edits the rule lists (what they lost and gained) decodes as
    /// first written and applies like the whole lists a version-4 delta carries; an edit
    /// made for another list is refused and changes nothing.
    #[test]
    fn golden_rule_list_edits_decode_and_apply_like_whole_lists() {
        let rule = |port: u16| FilterRule {
            rule: "web".into(),
            service: "web".into(),
            sources: Default::default(),
            source_sets: vec![4],
            proto: Proto::Tcp,
            ports: vec![PortRange { lo: port, hi: port }],
            not_after_ms: None,
            dests: vec![],
        };
        let grant = |port: u16| ReachGrant {
            service: "web".into(),
            proto: Proto::Tcp,
            ports: vec![PortRange { lo: port, hi: port }],
            rule: "web".into(),
            not_after_ms: None,
        };
        let nm = r#"{"type":"netmap","seq":1,"me":{"device_id":1,"hostname":"a","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null},"peers":[],"inbound":[{"rule":"web","service":"web","source_sets":[4],"proto":"tcp","ports":[{"lo":80,"hi":80}],"not_after_ms":null},{"rule":"web","service":"web","source_sets":[4],"proto":"tcp","ports":[{"lo":443,"hi":443}],"not_after_ms":null}],"peer_sets":[{"id":4,"prefixes":["100.64.0.2/32"]}],"reach_grants":[{"service":"web","proto":"tcp","ports":[{"lo":80,"hi":80}],"rule":"web","not_after_ms":null}],"reach_services":[{"service":"web","devices":[2]}]}"#;
        let CoordinatorMsg::Netmap(start) = decode(nm.as_bytes()).unwrap() else {
            panic!("not netmap")
        };
        // Version 4: port 80 becomes 8080, both lists sent whole.
        let v4 = r#"{"type":"netmap_delta","base_seq":1,"seq":2,"inbound":[{"rule":"web","service":"web","source_sets":[4],"proto":"tcp","ports":[{"lo":8080,"hi":8080}],"not_after_ms":null},{"rule":"web","service":"web","source_sets":[4],"proto":"tcp","ports":[{"lo":443,"hi":443}],"not_after_ms":null}],"reach_grants":[{"service":"web","proto":"tcp","ports":[{"lo":8080,"hi":8080}],"rule":"web","not_after_ms":null}]}"#;
        // Version 5: the same change as edits.
        let v5 = r#"{"type":"netmap_delta","base_seq":1,"seq":2,"inbound_edit":{"remove":[{"rule":"web","service":"web","source_sets":[4],"proto":"tcp","ports":[{"lo":80,"hi":80}],"not_after_ms":null}],"add":[{"rule":"web","service":"web","source_sets":[4],"proto":"tcp","ports":[{"lo":8080,"hi":8080}],"not_after_ms":null}]},"reach_grants_edit":{"remove":[{"service":"web","proto":"tcp","ports":[{"lo":80,"hi":80}],"rule":"web","not_after_ms":null}],"add":[{"service":"web","proto":"tcp","ports":[{"lo":8080,"hi":8080}],"rule":"web","not_after_ms":null}]}}"#;
        let delta = |text: &str| match decode(text.as_bytes()).unwrap() {
            CoordinatorMsg::NetmapDelta(d) => d,
            other => panic!("not a delta: {other:?}"),
        };
        let (d4, d5) = (delta(v4), delta(v5));
        assert!(d4.inbound_edit.is_none() && d4.reach_grants_edit.is_none());
        assert_eq!(
            d5.inbound_edit,
            Some(ListEdit {
                remove: vec![rule(80)],
                add: vec![rule(8080)]
            })
        );
        assert!(d5.inbound.is_none() && d5.reach_grants.is_none());
        let (mut a, mut b) = (start.clone(), start.clone());
        a.apply(&d4).unwrap();
        b.apply(&d5).unwrap();
        let sorted = |mut v: Vec<FilterRule>| {
            v.sort();
            v
        };
        assert_eq!(sorted(a.inbound.to_vec()), *b.inbound);
        assert_eq!(b.inbound, vec![rule(443), rule(8080)].into());
        assert_eq!(a.reach_grants, b.reach_grants);
        assert_eq!(b.reach_grants, vec![grant(8080)]);
        assert_eq!(a.reach_view(), b.reach_view());
        // What the coordinator makes for the change, and what it writes: the edit alone.
        assert_eq!(
            ListEdit::between(&start.inbound, &a.inbound),
            d5.inbound_edit.clone().unwrap()
        );
        let text =
            String::from_utf8(encode(&CoordinatorMsg::NetmapDelta(d5.clone()))[4..].to_vec())
                .unwrap();
        assert!(!text.contains(r#""inbound":"#), "{text}");
        assert_eq!(delta(&text), d5);
        // The same edit again (the device holds no port-80 rule now): refused, unchanged.
        let mut d = d5.clone();
        d.base_seq = 2;
        d.seq = 3;
        let before = b.clone();
        assert_eq!(
            b.apply(&d),
            Err(WireError::ListEdit {
                missing: 1,
                held: 2
            })
        );
        assert_eq!(b, before);
        // A version-4 delta that carries neither still leaves the lists alone.
        let d = delta(r#"{"type":"netmap_delta","base_seq":2,"seq":3,"policy_version":9}"#);
        b.apply(&d).unwrap();
        assert_eq!(b.inbound, before.inbound);
        assert_eq!(b.reach_grants, before.reach_grants);
    }

    /// An edit between two lists turns the first into the second (as multisets), whatever
    /// they share at their ends, and two edits folded into one apply like both in turn.
    #[test]
    fn an_edit_between_two_lists_applies_to_the_second_and_edits_fold() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let sorted = |mut v: Vec<u8>| {
            v.sort();
            v
        };
        for _ in 0..2000 {
            fn list(rnd: &mut dyn FnMut(u64) -> u64) -> Vec<u8> {
                let n = rnd(8);
                (0..n).map(|_| rnd(5) as u8).collect()
            }
            let (a, b, c) = (list(&mut rnd), list(&mut rnd), list(&mut rnd));
            let ab = ListEdit::between(&a, &b);
            let bc = ListEdit::between(&b, &c);
            assert_eq!(ab.applied(&a).unwrap(), sorted(b.clone()), "{a:?} -> {b:?}");
            // Never more than the entries that differ.
            assert!(ab.len() <= a.len() + b.len());
            let mut folded = ab.clone();
            folded.then(&bc);
            assert_eq!(folded.applied(&a).unwrap(), sorted(c.clone()));
        }
        // One change in a long list: one removal and one addition.
        let a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        b[500] = 5000;
        let e = ListEdit::between(&a, &b);
        assert_eq!(
            (e.remove.as_slice(), e.add.as_slice()),
            (&[500][..], &[5000][..])
        );
        assert!(ListEdit::between(&a, &a).is_empty());
    }

    #[test]
    fn merged_deltas_apply_like_the_sequence() {
        let me = |name: &str| SelfInfo {
            routes: Default::default(),
            device_id: DeviceId(1),
            hostname: Hostname::parse(name).unwrap(),
            ipv4: Ipv4Addr::new(100, 64, 0, 1),
            ipv6: "fd00::1".parse().unwrap(),
            v6_prefix: "fd00::".parse().unwrap(),
            observed_addr: None,
        };
        let start = Netmap {
            on_demand: false,
            resumed: None,
            seq: 7,
            me: me("me"),
            peers: vec![peer(2), peer(3), peer(5)],
            inbound: vec![].into(),
            reach: vec![],
            relays: vec![],
            punch: true,
            flows: true,
            policy_version: Some(1),
            shadow_filter: None,
            dns_domain: None,
            coordinators: vec![],
            peer_sets: vec![crate::peerset::PeerSet {
                id: 1,
                prefixes: vec!["100.64.0.2/32".parse().unwrap()],
            }]
            .into(),
            reach_grants: Vec::new(),
            reach_services: Vec::new(),
        };
        // A small deterministic generator: the same sequences on every run.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for round in 0..500 {
            let mut one_by_one = start.clone();
            let mut merged: Option<NetmapDelta> = None;
            let steps = 1 + rnd(6);
            for step in 0..steps {
                let mut d = NetmapDelta::after(one_by_one.seq);
                // Peer sets as the coordinator changes them: the difference between the sets
                // the device holds and new ones (sets created, dropped, grown and shrunk).
                if rnd(2) == 0 {
                    let old = crate::peerset::book(&one_by_one.peer_sets);
                    let mut new = old.clone();
                    for _ in 0..1 + rnd(3) {
                        let id = 1 + rnd(3) as u32;
                        if rnd(4) == 0 {
                            new.remove(&id);
                            continue;
                        }
                        let set = std::sync::Arc::make_mut(new.entry(id).or_default());
                        let p: crate::routes::Prefix =
                            format!("100.64.0.{}/32", 2 + rnd(6)).parse().unwrap();
                        match set.iter().position(|x| *x == p) {
                            Some(at) => {
                                set.remove(at);
                            }
                            None => {
                                set.push(p);
                                set.sort_unstable();
                            }
                        }
                    }
                    let (changes, removed) = crate::peerset::diff(&old, &new);
                    d.peer_sets = changes;
                    d.removed_peer_sets = removed;
                }
                for _ in 0..rnd(4) {
                    let id = 2 + rnd(6);
                    if rnd(2) == 0 {
                        let mut p = peer(id);
                        p.online = rnd(2) == 0;
                        p.endpoints = vec![format!("10.0.{}.{step}:51820", round % 250)
                            .parse()
                            .unwrap()];
                        // As the coordinator makes them: a peer once per delta.
                        if !d.upsert.iter().any(|x| x.device_id == p.device_id)
                            && !d.remove.contains(&p.device_id)
                        {
                            d.upsert.push(p);
                        }
                    } else if !d.remove.contains(&DeviceId(id))
                        && !d.upsert.iter().any(|x| x.device_id == DeviceId(id))
                    {
                        d.remove.push(DeviceId(id));
                    }
                }
                if rnd(3) == 0 {
                    d.relays = Some(vec![RelayInfo {
                        name: format!("r{step}"),
                        addr: "192.0.2.1:3478".into(),
                    }]);
                }
                if rnd(3) == 0 {
                    d.reach = Some(vec![]);
                }
                // Version-3 reach: grants replaced, destination lists sent or dropped (a list
                // once per delta, as the coordinator makes them).
                if rnd(3) == 0 {
                    d.reach_grants = Some(vec![ReachGrant {
                        service: format!("s{}", rnd(3)),
                        proto: Proto::Tcp,
                        ports: vec![PortRange { lo: 22, hi: 22 }],
                        rule: format!("r{step}"),
                        not_after_ms: None,
                    }]);
                }
                for _ in 0..rnd(3) {
                    let service = format!("s{}", rnd(3));
                    if d.removed_reach_services.contains(&service)
                        || d.reach_services.iter().any(|x| x.service == service)
                    {
                        continue;
                    }
                    if rnd(3) == 0 {
                        d.removed_reach_services.push(service);
                    } else {
                        d.reach_services.push(ReachService {
                            service,
                            devices: (0..1 + rnd(3)).map(|_| DeviceId(1 + rnd(6))).collect(),
                        });
                    }
                }
                // Rule lists (a small universe, so entries repeat): replaced whole, or
                // edited (version 5) from the list the device holds as the coordinator
                // makes edits.
                fn rules(rnd: &mut dyn FnMut(u64) -> u64) -> Vec<FilterRule> {
                    let n = rnd(5);
                    (0..n)
                        .map(|_| FilterRule {
                            rule: format!("r{}", rnd(3)),
                            service: "s".into(),
                            sources: Default::default(),
                            source_sets: vec![1],
                            proto: Proto::Tcp,
                            ports: vec![PortRange {
                                lo: rnd(3) as u16,
                                hi: 100,
                            }],
                            not_after_ms: None,
                            dests: vec![],
                        })
                        .collect()
                }
                match rnd(3) {
                    0 => d.inbound = Some(rules(&mut rnd)),
                    1 => {
                        let new = rules(&mut rnd);
                        d.inbound_edit = Some(ListEdit::between(&one_by_one.inbound, &new))
                    }
                    _ => {}
                }
                fn grants(rnd: &mut dyn FnMut(u64) -> u64) -> Vec<ReachGrant> {
                    let n = rnd(4);
                    (0..n)
                        .map(|_| ReachGrant {
                            service: format!("s{}", rnd(3)),
                            proto: Proto::Udp,
                            ports: vec![PortRange {
                                lo: rnd(2) as u16,
                                hi: 9,
                            }],
                            rule: "r".into(),
                            not_after_ms: None,
                        })
                        .collect()
                }
                if d.reach_grants.is_none() && rnd(3) == 0 {
                    let new = grants(&mut rnd);
                    d.reach_grants_edit = Some(ListEdit::between(&one_by_one.reach_grants, &new));
                }
                if rnd(3) == 0 {
                    d.policy_version = Some(10 + step);
                }
                if rnd(4) == 0 {
                    d.me = Some(me(&format!("me-{step}")));
                }
                match rnd(4) {
                    0 => d.shadow_filter = Some(None),
                    1 => d.shadow_filter = Some(Some(vec![])),
                    _ => {}
                }
                one_by_one.apply(&d).unwrap();
                match &mut merged {
                    None => merged = Some(d),
                    Some(m) => m.merge(d).unwrap(),
                }
            }
            let merged = merged.unwrap();
            let mut at_once = start.clone();
            at_once.apply(&merged).unwrap();
            assert_eq!(at_once, one_by_one, "round {round}: {merged:?}");
            // A peer appears at most once in the merged delta.
            for p in &merged.upsert {
                assert!(!merged.remove.contains(&p.device_id), "{merged:?}");
                assert_eq!(
                    merged
                        .upsert
                        .iter()
                        .filter(|x| x.device_id == p.device_id)
                        .count(),
                    1
                );
            }
        }
    }

    #[test]
    fn a_delta_that_does_not_follow_is_not_merged() {
        let d = |base, seq| NetmapDelta {
            seq,
            upsert: vec![peer(2)],
            ..NetmapDelta::after(base)
        };
        let mut a = d(1, 2);
        assert_eq!(
            a.merge(d(3, 4)),
            Err(WireError::DeltaGap { have: 2, base: 3 })
        );
        assert_eq!(a, d(1, 2), "a refused merge changes nothing");
        a.merge(d(2, 3)).unwrap();
        assert_eq!((a.base_seq, a.seq, a.upsert.len()), (1, 3, 1));
        // A set the held delta drops cannot be changed by difference afterwards: refused,
        // nothing changes (the connection then starts over with a full netmap).
        a.removed_peer_sets = vec![4];
        let before = a.clone();
        let mut next = d(3, 4);
        next.peer_sets = vec![PeerSetChange {
            id: 4,
            prefixes: None,
            add: vec!["100.64.0.9/32".parse().unwrap()],
            remove: vec![],
        }];
        assert_eq!(
            a.merge(next),
            Err(WireError::PeerSets(PeerSetError::Unknown(4)))
        );
        assert_eq!(a, before);
    }

    /// The coordinator-message decoder reads netmaps, deltas and verdicts without serde's
    /// generic tree, and answers exactly as the derived decoder does: the same value for every
    /// message, the same error for every bad one, whatever the order of the fields.
    #[test]
    fn coordinator_messages_decode_alike_either_way() {
        let me = me_one();
        let mut nm = netmap_of(me.clone(), vec![peer(2), peer(3)]);
        nm.peer_sets = Arc::new(vec![PeerSet {
            id: 4,
            prefixes: vec!["100.64.0.0/30".parse().unwrap()],
        }]);
        let delta = NetmapDelta {
            upsert: vec![peer(5)],
            remove: vec![DeviceId(2)],
            me: Some(me),
            shadow_filter: Some(None),
            peer_sets: vec![PeerSetChange {
                id: 4,
                prefixes: None,
                add: vec!["100.64.0.9/32".parse().unwrap()],
                remove: vec!["100.64.0.1/32".parse().unwrap()],
            }],
            removed_peer_sets: vec![7],
            ..NetmapDelta::after(1)
        };
        let verdict = PostureVerdict {
            report_seq: Some(3),
            quarantine: Some("load \"test\"".into()),
            ..PostureVerdict::default()
        };
        let messages = [
            CoordinatorMsg::Netmap(nm),
            CoordinatorMsg::NetmapDelta(delta),
            CoordinatorMsg::PostureVerdict(verdict),
            CoordinatorMsg::PostureWants(PostureWants {
                processes: vec!["sshd".into()],
                ..PostureWants::default()
            }),
            CoordinatorMsg::Pong {
                nonce: 9,
                coordinator_time_ms: 10,
            },
        ];
        let mut texts = Vec::new();
        for m in &messages {
            let body = encode(m)[4..].to_vec();
            assert!(body.starts_with(br#"{"type":""#), "the tag comes first");
            assert_eq!(decode_coordinator_msg(&body).as_ref(), Ok(m));
            texts.push(String::from_utf8(body).unwrap());
        }
        let delta = texts[1].clone();
        let rest = delta.strip_prefix(r#"{"type":"netmap_delta","#).unwrap();
        texts.extend([
            // The tag last, or escaped: the derived path, the same value.
            format!(
                r#"{{{},"type":"netmap_delta"}}"#,
                rest.strip_suffix('}').unwrap()
            ),
            format!(r#"{{"type":"netmap\u005fdelta",{rest}"#),
            // Unknown fields are ignored both ways.
            format!(r#"{{"type":"netmap_delta","later":[1,{{"x":2}}],{rest}"#),
            // Whitespace after the message.
            format!("{delta} \n"),
        ]);
        let bad = [
            format!("{delta}x"),
            format!(r#"{{"type":"netmap_delta","type":"pong",{rest}"#),
            format!(r#"{{"type":"netmap_delta","seq":"1",{rest}"#),
            r#"{"type":"netmap_delta","base_seq":1}"#.to_string(),
            r#"{"type":"netmap_delta","base_seq":1,"seq":2,"remove":[-1]}"#.to_string(),
            r#"{"type":"netmap","seq":1"#.to_string(),
            r#"{"type":"nope"}"#.to_string(),
            r#"{"type":7}"#.to_string(),
            r#"{"type":"posture_verdict"}"#.to_string(),
            "{}".to_string(),
            "[]".to_string(),
            "null".to_string(),
            String::new(),
        ];
        for t in texts.iter().chain(&bad) {
            let fast = decode_coordinator_msg(t.as_bytes());
            assert_eq!(fast, decode::<CoordinatorMsg>(t.as_bytes()), "{t}");
        }
        for t in &texts {
            assert!(decode_coordinator_msg(t.as_bytes()).is_ok(), "{t}");
        }
        for t in &bad {
            assert!(decode_coordinator_msg(t.as_bytes()).is_err(), "{t}");
        }
    }
}
