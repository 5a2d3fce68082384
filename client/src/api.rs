//! The local API between `ward` (the CLI) and `ward daemon`: one JSON request line, one JSON
//! response line (`ward_runtime::rpc::Envelope`), over a Unix socket (mode 0600). Never a TCP
//! listener: a web page must not be able to reach it.
//!
//! The views below are what `ward status --json` and `ward posture --json` print: their field
//! names are an interface (scripts parse them) and must not change.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use ward_shared::posture::{PostureReport, PostureWants};
use ward_shared::wire::{PostureVerdict, Unavailable};

pub const MAX_API_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Up {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        hostname: Option<String>,
        /// Routes to advertise, and the exit node to use.
        #[serde(default)]
        routes: crate::agent::routes::RouteOptions,
    },
    /// `ward up --login`: start signing in through the coordinator's OpenID provider; the
    /// answer is where the user completes it ([`LoginView`]).
    LoginStart {
        /// HOST:PORT of the coordinator.
        coordinator: String,
        /// Hex SHA-256 of the coordinator's CA certificate (pinned, as a token would).
        ca_sha256: String,
        #[serde(default)]
        hostname: Option<String>,
        /// Sign in in a browser (authorization code + PKCE on the CLI's loopback listener)
        /// instead of with the device grant.
        #[serde(default)]
        pkce: Option<ward_shared::wire::LoginPkce>,
    },
    /// The browser sign-in's redirect, as the CLI's loopback listener read it (with the PKCE
    /// verifier): passed on to the coordinator.
    LoginCallback {
        callback: ward_shared::wire::LoginCallback,
    },
    /// The browser sign-in failed on the CLI's side (a wrong `state`, a timeout): drop it.
    LoginAbort,
    /// Wait for the sign-in started by `login_start` to end; answered like `up`.
    LoginWait,
    Down,
    Status,
    /// This device's posture signals and the coordinator's verdict.
    Posture,
    /// What address discovery through the relays found.
    Netcheck,
}

impl Request {
    /// The command's name, for refusals and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Up { .. } => "up",
            Request::LoginStart { .. } => "login_start",
            Request::LoginCallback { .. } => "login_callback",
            Request::LoginAbort => "login_abort",
            Request::LoginWait => "login_wait",
            Request::Down => "down",
            Request::Status => "status",
            Request::Posture => "posture",
            Request::Netcheck => "netcheck",
        }
    }

    /// Whether the request changes the device (only root may send those).
    pub fn changes_state(&self) -> bool {
        match self {
            Request::Up { .. }
            | Request::LoginStart { .. }
            | Request::LoginCallback { .. }
            | Request::LoginAbort
            | Request::LoginWait
            | Request::Down => true,
            Request::Status | Request::Posture | Request::Netcheck => false,
        }
    }
}

/// The daemon's answer to any request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Up(UpView),
    Login(LoginView),
    Down(DownView),
    Status(Box<StatusView>),
    Posture(Box<PostureView>),
    Netcheck(NetcheckView),
}

/// `ward up`: the device as enrolled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpView {
    pub hostname: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub device_id: u64,
    /// After `ward up --login` on an enrolled device: the identity facts the coordinator
    /// stored for the sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_in: Option<ward_shared::wire::SignedIn>,
}

/// `ward up --login`: where the user signs in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginView {
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    pub expires_in_secs: u64,
    /// A browser sign-in: where it happens and the `state` the redirect must carry (the
    /// device-grant fields are then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser: Option<ward_shared::wire::LoginAuthorize>,
}

/// `ward down`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownView {
    pub state: State,
}

/// The daemon's state as people see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    NeedsLogin,
    Stopped,
    Connecting,
    Connected,
    Revoked,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::NeedsLogin => "needs-login",
            State::Stopped => "stopped",
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Revoked => "revoked",
        })
    }
}

/// `ward status`: before enrollment only `state` and `peers` (empty) are present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub state: State,
    pub peers: Vec<PeerView>,
    #[serde(flatten)]
    pub device: Option<DeviceView>,
}

/// This device, once enrolled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub device_id: u64,
    pub hostname: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The coordinator address in use (or dialled next while disconnected).
    pub coordinator: String,
    /// Every coordinator address this device knows, in failover order (empty from a daemon
    /// that predates the list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coordinators: Vec<String>,
    /// This device's lease on its current key.
    pub lease: Option<OwnLeaseView>,
    /// The current WireGuard public key (base64).
    pub key: String,
    pub key_age_secs: Option<u64>,
    pub rotations: u64,
    pub clock_warning: Option<String>,
    pub clock_offset_ms: Option<i64>,
    pub quarantine: Option<String>,
    pub unavailable: Vec<Unavailable>,
    /// Withheld entries left out of `unavailable` (it lists at most
    /// [`ward_shared::wire::MAX_UNAVAILABLE`]).
    #[serde(default)]
    pub unavailable_more: u64,
    /// This device's behaviour risk as the coordinator judges it (when it has one, or the
    /// policy caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<ward_shared::wire::RiskView>,
    /// "sign in again: risk N …" while access waits for a fresh sign-in of the device's user
    /// (`risk_signin_above`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in_again: Option<String>,
    /// What this device may reach.
    pub reach: Vec<ReachView>,
    /// Who may reach this device.
    pub inbound: Vec<InboundView>,
    pub connected_secs: Option<u64>,
    pub last_error: Option<String>,
    /// The TUN interface, UDP port and data-plane public key; `None` without a data plane.
    pub tun: Option<String>,
    pub port: Option<u16>,
    pub public_key: Option<String>,
    pub counters: Option<CountersView>,
    /// The relay this device receives relayed traffic through (published to peers); `None`
    /// while no relay connection is up.
    #[serde(default)]
    pub home_relay: Option<String>,
    /// The control session's transport: `quic`, or `tcp` (TLS over TCP, where UDP does not get
    /// through); `None` while it is down.
    #[serde(default)]
    pub control_transport: Option<String>,
    /// Each relay link that is up, by relay name: `quic` or `tcp`.
    #[serde(default)]
    pub relay_transports: BTreeMap<String, String>,
    /// The QUIC relay links whose relayed datagrams go in plain UDP now (bound), by name.
    #[serde(default)]
    pub relay_udp_bound: Vec<String>,
    /// Plain-UDP bind attempts or refreshes that went unanswered (the link went or stayed on
    /// QUIC datagrams), over all relay links since the daemon started.
    #[serde(default)]
    pub relay_udp_fallbacks: u64,
    /// Flow records kept for the coordinator; `None` while stopped.
    #[serde(default)]
    pub flow_log: Option<FlowLogView>,
    /// Device names in DNS: the mode, this device's name, the resolver's addresses.
    #[serde(default)]
    pub dns: Option<DnsView>,
    /// The exit node this device sends its internet traffic through (`ward up --exit-node`);
    /// `None` when none is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_node: Option<ExitNodeView>,
    /// The netmap lists only the peers this device asked for (peers on demand): the others
    /// are fetched when traffic needs them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_demand: bool,
}

/// The chosen exit node (`ward status`): whether the netmap lets this device use it and
/// whether it answers. Internet traffic goes into the tunnel either way (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitNodeView {
    /// The exit node's hostname, as given to `ward up --exit-node`.
    pub name: String,
    /// The netmap has the exit node with a default route for this device (approved, granted
    /// by the policy, its lease valid).
    pub allowed: bool,
    /// It is allowed and its WireGuard session answers (a handshake on a direct or relayed
    /// path).
    pub reachable: bool,
    /// The path to it when reachable (`direct ADDR`, `relay NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// One line for people: in use, or why internet traffic is blocked.
    pub text: String,
}

/// The device's resolver (`ward status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsView {
    /// `resolved`, `resolv.conf` or `off`.
    pub mode: String,
    /// This device's name (`HOSTNAME.<domain>`), once the domain is known.
    pub name: Option<String>,
    pub domain: String,
    /// Where the resolver listens (port 53 on the overlay addresses).
    pub listen: Vec<SocketAddr>,
    /// The previous resolvers, where other names are forwarded.
    pub upstreams: Vec<SocketAddr>,
    pub queries: u64,
    pub dropped: u64,
    /// Why the host's resolver configuration could not be set, if it could not.
    pub error: Option<String>,
}

/// The flow log (records of what the data plane allowed and denied, reported in windows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogView {
    /// The coordinator takes flow reports (its netmap says so).
    pub enabled: bool,
    pub window_ms: u64,
    /// Distinct records in the window being filled.
    pub window_records: u64,
    /// Reports, and the records in them, not yet acknowledged by the coordinator.
    pub spool_reports: u64,
    pub spool_records: u64,
    /// Records dropped because a cap was hit (window, spool, data-plane samples), cumulative.
    pub flow_records_dropped: u64,
    pub reports_sent: u64,
    pub reports_acked: u64,
    pub last_acked_seq: Option<u64>,
    pub next_seq: u64,
    /// Windows reported early because of a burst of new outgoing flows (a scan).
    #[serde(default)]
    pub early_reports: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnLeaseView {
    pub serial: u64,
    pub expires_in_secs: i64,
    pub ttl_secs: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReachView {
    pub service: String,
    pub hostname: String,
    pub device_id: u64,
    /// `tcp/22`, `udp/*`, `icmp`.
    pub ports: String,
    pub rule: String,
    pub expires_in_secs: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundView {
    pub service: String,
    /// Peer hostnames (or addresses of unknown sources).
    pub from: Vec<String>,
    pub ports: String,
    pub rule: String,
    pub expires_in_secs: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub device_id: u64,
    pub hostname: String,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub online: bool,
    pub public_key: Option<String>,
    pub endpoints: Vec<SocketAddr>,
    /// Where the last authenticated packet came from.
    pub endpoint: Option<SocketAddr>,
    /// The path MTU to that endpoint, as the kernel knows it (ICMP too-big included).
    pub path_mtu: Option<u16>,
    pub reachable: bool,
    /// The path traffic to this peer takes now.
    pub path: PathView,
    /// The path for people: `direct 1.2.3.4:51820`, `relay r1`, `connecting`,
    /// `unreachable: …`.
    #[serde(default)]
    pub path_text: String,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub dropped_bad_source: u64,
    /// The peer's newest lease.
    pub lease_serial: Option<u64>,
    pub lease_expires_in_secs: Option<i64>,
    pub key_age_secs: Option<i64>,
    /// The peer's DNS name, when this device may reach it (and so resolves it).
    #[serde(default)]
    pub dns_name: Option<String>,
}

/// A peer's path: `{"kind": "direct", "addr": "…"}`, `{"kind": "relay", "relay": "NAME"}` or
/// `{"kind": "none"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PathView {
    None,
    Direct { addr: SocketAddr },
    Relay { relay: String },
}

impl std::fmt::Display for PathView {
    /// `direct ADDR`, `relay NAME` or `-`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathView::None => f.write_str("-"),
            PathView::Direct { addr } => write!(f, "direct {addr}"),
            PathView::Relay { relay } => write!(f, "relay {relay}"),
        }
    }
}

/// Data-plane counters (monotonic since start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountersView {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub dropped_no_route: u64,
    pub dropped_no_endpoint: u64,
    pub dropped_bad_source: u64,
    pub dropped_garbage: u64,
    pub dropped_bad_tun_packet: u64,
    pub dropped_filter_no_rule: u64,
    pub dropped_filter_expired: u64,
    pub dropped_filter_other: u64,
    /// Decrypted packets not addressed to this device (a peer reaching past it).
    #[serde(default)]
    pub dropped_wrong_destination: u64,
    /// Packets from the TUN with a source this device does not own.
    #[serde(default)]
    pub dropped_wrong_source: u64,
    pub icmp_unreachable_sent: u64,
    /// Peers on demand: packets held while their peer was asked for, held packets dropped
    /// (bounds, waiting too long, refused), held packets sent once the peer came, peers asked
    /// for.
    #[serde(default)]
    pub held_for_peer: u64,
    #[serde(default)]
    pub held_dropped: u64,
    #[serde(default)]
    pub held_replayed: u64,
    #[serde(default)]
    pub peer_wants: u64,
    /// Path MTU: packets too big for their path, ICMP too-big sent, MTU changes, failed sends.
    pub path: crate::dataplane::PathMtuCounters,
    /// Address discovery on the WireGuard socket: requests sent, responses received,
    /// malformed and dropped (inbox full) responses.
    #[serde(default)]
    pub discovery: crate::dataplane::DiscoveryCounters,
}

/// `ward posture`: the latest collection, the coordinator's verdict and what it asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostureView {
    pub report: Option<PostureReport>,
    pub verdict: Option<PostureVerdict>,
    pub wants: PostureWants,
    /// Custom checks configured on this device.
    pub custom_checks: Vec<String>,
}

/// `ward netcheck`: what address discovery through the netmap's relays found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetcheckView {
    /// Some relay answered a binding request from the WireGuard socket.
    pub udp: bool,
    /// Distinct public addresses the relays saw this device at (published to peers first).
    pub reflexive: Vec<SocketAddr>,
    /// Two relays saw the same socket at different addresses (the NAT maps by destination, so
    /// a direct path needs a relay); `None` until two relays answered.
    pub mapping_varies_by_dest: Option<bool>,
    pub relays: Vec<RelayCheckView>,
    /// The connected relay with the lowest RTT, where peers send relayed traffic for this
    /// device.
    #[serde(default)]
    pub home_relay: Option<String>,
    /// The control session's transport (`quic` or `tcp`); `None` while it is down.
    #[serde(default)]
    pub control_transport: Option<String>,
}

/// One relay's last discovery exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayCheckView {
    pub name: String,
    /// `HOST:PORT` as the netmap names it.
    pub addr: String,
    pub latency_ms: Option<u64>,
    /// This device's address as the relay saw it.
    pub observed: Option<SocketAddr>,
    /// Why the last attempt got no answer.
    pub error: Option<String>,
    /// The relay connection (QUIC, forwarding): `up`, `connecting` (or reconnecting) or
    /// `idle` (no ticket yet).
    #[serde(default)]
    pub connection: String,
    /// QUIC RTT of the live connection.
    #[serde(default)]
    pub rtt_ms: Option<u64>,
    /// Why the connection last failed.
    #[serde(default)]
    pub connection_error: Option<String>,
    /// The live connection's transport: `quic`, or `tcp` where UDP does not get through.
    #[serde(default)]
    pub transport: Option<String>,
    /// Relayed datagrams on this QUIC link go in plain UDP (bound), not as QUIC datagrams.
    #[serde(default)]
    pub plain_udp: bool,
}

/// Sends one request to the local agent.
pub async fn call<T: serde::de::DeserializeOwned>(socket: &Path, req: &Request) -> Result<T> {
    ward_runtime::rpc::call(
        socket,
        ward_runtime::rpc::Peer {
            name: "the ward daemon",
            hint: "is `ward daemon` running?",
        },
        req,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_before_enrollment_has_only_state_and_peers() {
        let v = StatusView {
            state: State::NeedsLogin,
            peers: vec![],
            device: None,
        };
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j, serde_json::json!({"state": "needs-login", "peers": []}));
        let back: StatusView = serde_json::from_value(j).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn status_fields_keep_their_names() {
        let v = StatusView {
            state: State::Connected,
            peers: vec![],
            device: Some(DeviceView {
                device_id: 3,
                hostname: "alice".into(),
                ipv4: Ipv4Addr::new(100, 64, 0, 3),
                ipv6: "fd00::3".parse().unwrap(),
                coordinator: "c:7443".into(),
                coordinators: vec![],
                lease: Some(OwnLeaseView {
                    serial: 4,
                    expires_in_secs: 10,
                    ttl_secs: 20,
                }),
                key: "k".into(),
                key_age_secs: Some(1),
                rotations: 2,
                clock_warning: None,
                clock_offset_ms: Some(5),
                quarantine: None,
                unavailable: vec![],
                unavailable_more: 0,
                risk: None,
                sign_in_again: None,
                reach: vec![],
                inbound: vec![],
                connected_secs: None,
                last_error: None,
                tun: None,
                port: None,
                public_key: None,
                counters: None,
                home_relay: Some("r1".into()),
                control_transport: Some("tcp".into()),
                relay_transports: [("r1".to_string(), "tcp".to_string())].into(),
                relay_udp_bound: vec![],
                relay_udp_fallbacks: 0,
                flow_log: None,
                dns: None,
                exit_node: None,
                on_demand: false,
            }),
        };
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["control_transport"], "tcp");
        assert_eq!(j["relay_transports"]["r1"], "tcp");
        let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "clock_offset_ms",
                "clock_warning",
                "connected_secs",
                "control_transport",
                "coordinator",
                "counters",
                "device_id",
                "dns",
                "flow_log",
                "home_relay",
                "hostname",
                "inbound",
                "ipv4",
                "ipv6",
                "key",
                "key_age_secs",
                "last_error",
                "lease",
                "peers",
                "port",
                "public_key",
                "quarantine",
                "reach",
                "relay_transports",
                "relay_udp_bound",
                "relay_udp_fallbacks",
                "rotations",
                "state",
                "tun",
                "unavailable",
                "unavailable_more",
            ]
        );
        assert_eq!(j["state"], "connected");
        assert_eq!(j["lease"]["ttl_secs"], 20);
        assert_eq!(j["home_relay"], "r1");
        let back: StatusView = serde_json::from_value(j).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn peer_paths_have_a_kind() {
        let direct = PathView::Direct {
            addr: "192.0.2.1:51820".parse().unwrap(),
        };
        let relay = PathView::Relay { relay: "r1".into() };
        assert_eq!(
            serde_json::to_value(&direct).unwrap(),
            serde_json::json!({"kind": "direct", "addr": "192.0.2.1:51820"})
        );
        assert_eq!(
            serde_json::to_value(&relay).unwrap(),
            serde_json::json!({"kind": "relay", "relay": "r1"})
        );
        assert_eq!(
            serde_json::to_value(PathView::None).unwrap(),
            serde_json::json!({"kind": "none"})
        );
        assert_eq!(direct.to_string(), "direct 192.0.2.1:51820");
        assert_eq!(relay.to_string(), "relay r1");
        assert_eq!(PathView::None.to_string(), "-");
        for v in [direct, relay, PathView::None] {
            let back: PathView = serde_json::from_value(serde_json::to_value(&v).unwrap()).unwrap();
            assert_eq!(back, v);
        }
    }
}
