//! The device's protocol core, free of I/O: the control session's state (netmap, clock offset,
//! leases), which peer keys may be configured, continuous key rotation, posture reporting
//! cadence, certificate renewal timing, and which coordinator to reconnect to and when.
//!
//! It opens no socket, reads no clock, spawns nothing and draws no OS randomness: time is
//! passed in as [`Now`], fresh WireGuard keys through [`Agent::provide_key`], and the few random
//! values it needs (ping nonces, backoff jitter) come from a seeded generator. `ward daemon`
//! drives it with tokio and quinn; the whole-system simulations drive it on a fake clock.
//!
//! Sub-modules: [`rotation`] (the rotation states), [`leases`] (peer lease verification and its
//! cache), [`clock`] (offset from ping/pong), [`posture`] (report cadence, one-frame reports),
//! [`cert`] (renewal timing), [`backoff`] (reconnect waits), [`coordinators`] (which
//! coordinator address next: failover among replicas), [`netcheck`] (address discovery
//! through relays, reflexive candidates), [`relays`] (relay tickets, connections and the home
//! relay).

pub mod backoff;
pub mod cert;
pub mod clock;
pub mod coordinators;
pub mod flows;
pub mod leases;
pub mod netcheck;
pub mod posture;
pub mod relay_udp;
pub mod relays;
pub mod rotation;
pub mod routes;

use ed25519_dalek::VerifyingKey;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use ward_shared::discovery::BindingResponse;
use ward_shared::filter::FilterRule;
use ward_shared::lease::SignedLease;
use ward_shared::names::Hostname;
use ward_shared::peerset::PeerSet;
use ward_shared::posture::{PostureReport, PostureWants};
use ward_shared::resume::{self, Holding};
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeniedFlow, DeviceId, DeviceMsg, DeviceUpdate, ErrorCode, Hello,
    Label, Netmap, PeerRef, PostureVerdict, WgPublicKey,
};

use self::flows::{FlowContext, FlowLog, FlowLogConfig, FlowLogState, FlowLogStatus, FLOW_TICK};
use crate::dataplane::{public_key_for, PeerConfig};

pub use backoff::Backoff;
pub use clock::ClockOffset;
pub use coordinators::{Coordinators, Ending};
pub use leases::{leased_peers, LeaseCache, PeerMap};
pub use netcheck::{Netcheck, RelayReport};
pub use posture::{fit_report, PostureCadence};
pub use relays::{ConnState, RelayConn, RelayConnEvent, RelayOut, Relays};
pub use rotation::{rotation_due, Rotation, ROTATION_CONFIRM_MAX, ROTATION_SETTLE};

/// Housekeeping runs on one grid of this step, counted from the agent's start: the re-check of
/// peer leases, relay tickets, flow samples, posture collection, the refresh and a due key
/// rotation all land on its points, so an idle agent wakes once a step rather than once per
/// timer. The earliest configured lease's end is a wake-up of its own, at that instant, with
/// or without a coordinator; the step bounds how late an end is seen when the monotonic clock
/// stood still (a suspended laptop) or the wall clock moved.
pub const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// While a key rotation waits on what only a look can tell (peers moving to the new key, a
/// queued rotation waiting for a spare key), it is looked at this often.
pub const ROTATION_TICK: Duration = Duration::from_millis(250);
/// Endpoints, clock offset and certificate are refreshed this often during a session (a
/// multiple of [`HOUSEKEEPING`], as are the two below).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Posture is collected (and denied flows are reported) this often during a session.
pub const POSTURE_TICK: Duration = Duration::from_secs(1);
/// Most `want_peer` messages sent for one report of the data plane's wants (the data plane
/// itself records at most `WANTS_PER_SEC` a second).
pub const MAX_WANTS_PER_REPORT: usize = 64;

/// The first point of the grid of `step` from `anchor` that comes after `t` (`anchor` itself
/// if `t` is earlier).
fn grid_after(anchor: Instant, t: Instant, step: Duration) -> Instant {
    let Some(since) = t.checked_duration_since(anchor) else {
        return anchor;
    };
    let step_ns = step.as_nanos().max(1);
    let n = since.as_nanos() / step_ns + 1;
    let after = Duration::from_nanos(u64::try_from(n * step_ns).unwrap_or(u64::MAX));
    anchor.checked_add(after).unwrap_or(t + step)
}

/// The time of one input: a monotonic instant for timers, and this device's wall clock (ms
/// since the Unix epoch) from which coordinator time is derived with the measured offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: i64,
}

/// A WireGuard private key; redacted in `Debug`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PrivateKey(pub [u8; 32]);

impl PrivateKey {
    pub fn public(&self) -> WgPublicKey {
        WgPublicKey(public_key_for(&self.0))
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({})", self.public().to_base64())
    }
}

/// What the agent is started with (from the device's state file and options).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: DeviceId,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The coordinator's lease-signing key pinned at enrollment; `None` trusts no peer.
    pub lease_key: Option<VerifyingKey>,
    /// The WireGuard key in use.
    pub private_key: PrivateKey,
    pub cert_not_after_ms: i64,
    /// A posture report is sent at least this often.
    pub posture_interval: Duration,
    /// Sent in `Hello`.
    pub os: String,
    pub version: String,
    /// Seeds ping nonces and backoff jitter.
    pub seed: u64,
    /// Routes this device advertises and the exit node it uses.
    pub routes: routes::RouteOptions,
    /// The protocol version said in `Hello`: [`ward_shared::wire::PROTOCOL_VERSION`] (the load tool says 1 to
    /// act as an agent that predates peer sets).
    pub protocol: u32,
}

/// The connection state shown to people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Connected,
    Revoked,
}

/// What the driver reports from the data plane.
#[derive(Debug, Clone, PartialEq)]
pub enum DataPlaneEvent {
    /// Peers that had a session and have none under the current key yet (0 without a data
    /// plane). Reported before every [`Agent::handle_tick`].
    PeersOnOldKey(usize),
    /// Flows the inbound filter refused since the last report.
    DeniedFlows(Vec<DeniedFlow>),
    /// The data plane started probing these peers' direct candidates (device ids): ask the
    /// coordinator to have each probe back now (`DataPlane::take_punch_requests`).
    PunchWanted(Vec<u64>),
    /// Peers on demand: the data plane holds packets for these peers it has not been sent
    /// (an overlay address it sends to, a key that initiated a handshake): ask the
    /// coordinator for them (`DataPlane::take_wants`).
    PeersWanted(Vec<PeerRef>),
    /// Traffic counted for flow records since the last report, and how many samples the data
    /// plane dropped (`DataPlane::take_flow_samples`).
    FlowSamples {
        samples: Vec<ward_shared::filter::FlowSample>,
        dropped: u64,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Event {
    /// Open a control session to [`Agent::coordinator`], then call [`Agent::handle_connected`]
    /// (or [`Agent::handle_disconnected`] / [`Agent::handle_refused`] if that fails).
    Connect,
    /// Keep the coordinator addresses in the state file (a netmap brought a new list, or a
    /// session worked on another address, which is dialled first from now on, restarts too).
    SaveCoordinators {
        addrs: Vec<String>,
        preferred: Option<String>,
    },
    /// Drop the control session: the agent already counted it as ended.
    CloseSession,
    /// The first netmap of this session arrived.
    Connected { peers: usize },
    /// The session ended; the agent asks for the next one by itself.
    Disconnected { revoked: bool, retry_in: Duration },
    /// Configure exactly these peers in the data plane.
    SetPeers(Vec<PeerConfig>),
    /// A netmap delta changed these devices' entries: each listed device now has exactly
    /// the entries given (none: it is no peer any more); every other peer stays as it was.
    /// [`Agent::configured_peers`] is the whole set after the change.
    UpdatePeers(Vec<(u64, Vec<PeerConfig>)>),
    /// Install this inbound filter in the data plane, with the peer sets its rules (and the
    /// candidate rules) name, as one step.
    SetFilter {
        rules: Arc<Vec<FilterRule>>,
        sets: Arc<Vec<PeerSet>>,
    },
    /// Forward these routed prefixes (this device's approved routes; empty: none), and route
    /// these prefixes into the tunnel (the routed prefixes of every configured peer).
    SetRoutes {
        served: Vec<ward_shared::routes::Prefix>,
        reached: Vec<ward_shared::routes::Prefix>,
    },
    /// Install these candidate rules (the policy's shadow view; `None`: none) in the data
    /// plane's filter: evaluated for flow records, never enforced.
    SetShadowFilter(Option<Vec<FilterRule>>),
    /// Coordinator time minus device time, for the data plane's filter expiry.
    SetClockOffset(i64),
    /// Save the new key in the state file, then move the data plane to it.
    SwitchKey {
        key: PrivateKey,
        lease: Box<SignedLease>,
    },
    /// Save the renewed certificate in the state file.
    SaveCert { cert_der: Bytes, not_after_ms: i64 },
    /// The name the coordinator gives this device (each full netmap, and a delta after an
    /// administrator renamed it or moved it aside from a name bound to another device): keep
    /// it in the state file when it differs, so `ward status` shows it.
    SelfName(Hostname),
    /// Draw a fresh WireGuard key and hand it to [`Agent::provide_key`].
    NeedKey,
    /// Make a certificate request with the identity key and hand it to [`Agent::handle_csr`].
    NeedCsr,
    /// Gather this device's endpoints and hand them to [`Agent::handle_local_update`].
    NeedUpdate,
    /// Take the data plane's denied flows and report them ([`DataPlaneEvent::DeniedFlows`]).
    TakeDeniedFlows,
    /// Take the data plane's flow samples ([`DataPlaneEvent::FlowSamples`]); asked every
    /// [`flows::FLOW_TICK`], in a session or not (records are spooled while the coordinator is
    /// unreachable, and kept within their caps for a coordinator that takes none yet).
    TakeFlowSamples,
    /// Resolve a relay's `HOST:PORT` and hand the result to [`Agent::handle_relay_resolved`].
    ResolveRelay(String),
    /// Send this address-discovery datagram to `dst` from the data plane's UDP socket (the one
    /// the tunnels use, so the mapping learned is theirs); answers come back through
    /// [`Agent::handle_discovery`].
    SendDiscovery { dst: SocketAddr, datagram: Vec<u8> },
    /// Collect posture (off the async threads) and hand the report to
    /// [`Agent::handle_posture`]; skip it if a collection is still running.
    CollectPosture {
        wants: PostureWants,
        seq: u64,
        clock_offset_ms: i64,
    },
    /// Open, close or give a ticket to a relay connection; the driver reports back through
    /// [`Agent::handle_relay_event`].
    Relay(RelayOut),
    /// The relays the data plane may send through (welcomed connections, with the largest
    /// WireGuard datagram each carries).
    SetRelays(Vec<(String, u16)>),
    /// A configured peer is probing this device now (forwarded by the coordinator): have the
    /// data plane burst keepalives to its candidates and `endpoints` at once.
    Punch {
        peer: u64,
        endpoints: Vec<SocketAddr>,
    },
    /// This device's interface addresses changed: have the data plane probe every peer's
    /// direct candidates again (with punch requests).
    NetworkChanged,
    /// Peers on demand (the full netmap's `on_demand`): have the data plane hold packets for
    /// peers it does not have and want them (true), or answer them with ICMP at once (false).
    SetOnDemand(bool),
    /// The coordinator refused a wanted peer: have the data plane drop what it holds for it
    /// (answering held packets with ICMP) and stop wanting it for a while. Never a name
    /// (those are [`Event::RefuseName`]).
    RefusePeer(PeerRef),
    /// The coordinator refused a name the resolver wanted ([`Agent::handle_names_wanted`]):
    /// have the resolver answer the queries it holds for it NXDOMAIN and stop wanting it for
    /// a while (`dns::Resolver::handle_refusal`).
    RefuseName(Label),
}

#[derive(Debug, Clone, Copy)]
enum Link {
    /// Waiting to reconnect.
    Waiting { retry_at: Instant },
    /// `Event::Connect` was given; the driver is opening the session.
    Opening { since: Instant },
    /// In a session.
    Session {
        since: Instant,
        next_rotation: Instant,
        next_refresh: Instant,
        next_posture: Instant,
    },
}

/// The device's protocol state machine. Drive it like this:
///
/// ```text
/// let mut agent = Agent::new(cfg, now);
/// loop {
///     while let Some(ev) = agent.poll_event() { execute(ev) }      // Connect, SetPeers, SwitchKey…
///     while let Some(msg) = agent.poll_transmit() { session.send(msg) }
///     select! {
///         session opened         => agent.handle_connected(update, now),
///         session failed/closed  => agent.handle_disconnected(error, now),
///         msg = session.recv()   => agent.handle_coordinator_msg(msg, now),
///         report = posture done  => agent.handle_posture(report, now),
///         sleep_until(agent.poll_timeout()) => {
///             agent.handle_dataplane_event(PeersOnOldKey(dp.peers_on_old_key()), now);
///             agent.handle_tick(now);
///         }
///     }
/// }
/// ```
///
/// Events the driver answers with an input: `NeedKey` → [`Agent::provide_key`], `NeedCsr` →
/// [`Agent::handle_csr`], `NeedUpdate` → [`Agent::handle_local_update`], `TakeDeniedFlows` and
/// `CollectPosture` → [`Agent::handle_dataplane_event`] / [`Agent::handle_posture`].
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    key: PrivateKey,
    /// The key the next rotation uses; the driver refills it on `Event::NeedKey`.
    spare: Option<PrivateKey>,
    rng: u64,
    link: Link,
    phase: Phase,
    last_error: Option<String>,
    connected_since: Option<Instant>,
    coordinators: Coordinators,
    netmap: Option<Netmap>,
    /// The bucket count of the holding this session's hello carried, until its first netmap.
    holding_sent: Option<u32>,
    /// A resumed netmap did not fit what this agent held: later hellos carry no holding.
    no_resume: bool,
    /// Who the flow log's other ends are, built from `netmap` when flow samples come and kept
    /// until the netmap changes (with thousands of peers, rebuilding it per batch of samples
    /// cost more than everything else the agent does).
    flow_ctx: Option<FlowContext>,
    leases: LeaseCache,
    /// How many times the peers were rebuilt from the whole netmap (`apply_peers`).
    peer_rebuilds: u64,
    clock: ClockOffset,
    own_lease: Option<SignedLease>,
    key_since: Instant,
    rotations: u64,
    rotation: Rotation,
    /// A trust change asked for a rotation while one could not start (no lease yet in this
    /// session, or a rotation already in flight whose key predates the change).
    queued: Option<String>,
    /// `None` until the data plane reported after the last switch.
    old_key_peers: Option<usize>,
    posture: PostureCadence,
    /// The endpoints last sent.
    update: DeviceUpdate,
    /// The driver's last view of this device (key, port, interface addresses), before the
    /// reflexive candidates are added.
    local_update: Option<DeviceUpdate>,
    netcheck: Netcheck,
    relays: Relays,
    /// The relay list last given to the data plane.
    applied_relays: Vec<(String, u16)>,
    /// The peers last handed to the data plane, per device.
    applied_peers: Option<PeerMap>,
    /// Whether the data plane was last put in on-demand mode.
    applied_on_demand: bool,
    /// Peers wanted while the session's first netmap was not in yet: asked for once it is
    /// (if it is on demand), at most [`MAX_WANTS_PER_REPORT`].
    early_wants: Vec<PeerRef>,
    /// Counts the changes of the netmap's inbound rules and peer sets: a full netmap whose
    /// filter differs from the one held, a delta that carries filter changes.
    filter_rev: u64,
    /// The `filter_rev` whose filter the data plane holds (`None`: none of this netmap's).
    /// A number, not a copy: a delta that moves one address of a set held by thousands of
    /// peers costs one copy of the filter (the data plane's), not a comparison and two.
    applied_filter_rev: Option<u64>,
    /// The candidate rules last handed to the data plane (outer `None`: none handed yet).
    applied_shadow: Option<Option<Vec<FilterRule>>>,
    applied_routes: Option<(
        Vec<ward_shared::routes::Prefix>,
        Vec<ward_shared::routes::Prefix>,
    )>,
    /// When the relay tickets want a look ([`Relays::poll_timeout`] as of the last change).
    relay_deadline: Option<Instant>,
    /// The origin of the [`HOUSEKEEPING`] grid.
    anchor: Instant,
    /// When the rotation was last looked at ([`ROTATION_TICK`] counts from it).
    last_rotation_step: Instant,
    /// The next look at peer leases: the earliest configured lease's end, or the next
    /// housekeeping point if that comes first.
    next_expiry: Instant,
    /// Flow records: windows, reports not yet acknowledged.
    flow_log: FlowLog,
    next_flows: Instant,
    transmits: VecDeque<DeviceMsg>,
    events: VecDeque<Event>,
}

impl Agent {
    /// A started agent: it asks for a session at once and for a spare key.
    pub fn new(cfg: AgentConfig, now: Now) -> Self {
        let mut events = VecDeque::new();
        events.push_back(Event::NeedKey);
        events.push_back(Event::Connect);
        Self {
            key: cfg.private_key,
            spare: None,
            rng: cfg.seed,
            link: Link::Opening { since: now.instant },
            phase: Phase::Connecting,
            last_error: None,
            connected_since: None,
            coordinators: Coordinators::new(Vec::new(), None),
            netmap: None,
            holding_sent: None,
            no_resume: false,
            flow_ctx: None,
            leases: LeaseCache::default(),
            peer_rebuilds: 0,
            clock: ClockOffset::default(),
            own_lease: None,
            key_since: now.instant,
            rotations: 0,
            rotation: Rotation::Unleased { requested: false },
            queued: None,
            old_key_peers: None,
            posture: PostureCadence::new(cfg.posture_interval),
            update: DeviceUpdate::default(),
            local_update: None,
            netcheck: Netcheck::default(),
            relays: Relays::default(),
            applied_relays: Vec::new(),
            applied_peers: None,
            applied_on_demand: false,
            early_wants: Vec::new(),
            filter_rev: 0,
            applied_filter_rev: None,
            applied_shadow: None,
            applied_routes: None,
            relay_deadline: None,
            anchor: now.instant,
            last_rotation_step: now.instant,
            // The grid's first points (it starts here).
            next_expiry: now.instant + HOUSEKEEPING,
            flow_log: FlowLog::new(FlowLogConfig::default()),
            next_flows: now.instant + FLOW_TICK,
            transmits: VecDeque::new(),
            events,
            cfg,
        }
    }

    // ---- inputs -------------------------------------------------------------------------

    /// The session the agent asked for is open: say hello with `update` (this device's key,
    /// port and endpoints) and measure the clock offset first (leases are judged in
    /// coordinator time).
    pub fn handle_connected(&mut self, update: DeviceUpdate, now: Now) {
        self.link = Link::Session {
            since: match self.link {
                Link::Opening { since } => since,
                Link::Waiting { .. } | Link::Session { .. } => now.instant,
            },
            next_rotation: self.every(now.instant, HOUSEKEEPING),
            next_refresh: self.every(now.instant, REFRESH_INTERVAL),
            next_posture: now.instant,
        };
        self.rotation = Rotation::Unleased { requested: false };
        self.queued = None;
        self.posture.session_started();
        self.local_update = Some(update.clone());
        let update = self.with_candidates(update);
        self.update = update.clone();
        // What this device holds of its netmap: the first netmap leaves out what is current.
        let holding = self
            .netmap
            .as_ref()
            .filter(|_| !self.no_resume)
            .map(|nm| Holding::of(&nm.peers));
        self.holding_sent = holding.as_ref().and_then(|h| h.count().ok());
        // On demand, the peers held are only those asked for: name them, so this session
        // keeps them (the coordinator keeps those policy still allows).
        let held_peers = self
            .netmap
            .as_ref()
            .filter(|nm| nm.on_demand)
            .map(|nm| {
                let mut ids: Vec<DeviceId> = nm.peers.iter().map(|p| p.device_id).collect();
                ids.sort_unstable();
                ids.dedup();
                ids.truncate(wire::MAX_HELD_PEERS);
                ids
            })
            .unwrap_or_default();
        self.transmits.push_back(DeviceMsg::Hello(Hello {
            held_peers,
            protocol: self.cfg.protocol,
            os: self.cfg.os.clone(),
            version: self.cfg.version.clone(),
            update,
            holding,
        }));
        self.ping(now);
    }

    /// The coordinator addresses this device knows (the state file's list; `preferred`, the
    /// one that last worked, is dialled first). Given once, before the first `Event::Connect`
    /// is carried out.
    pub fn set_coordinators(&mut self, addrs: Vec<String>, preferred: Option<String>) {
        self.coordinators = Coordinators::new(addrs, preferred);
    }

    /// The session failed to open, broke, or was closed by the coordinator (`error: None`):
    /// the next attempt goes to the next coordinator address.
    pub fn handle_disconnected(&mut self, error: Option<String>, now: Now) {
        if matches!(self.link, Link::Waiting { .. }) {
            return;
        }
        let error = error.unwrap_or_else(|| "the coordinator closed the session".into());
        self.end_session(error, Ending::Unreachable, now);
    }

    /// The coordinator refused this device's certificate: every replica would, so the next
    /// attempt goes to the same address (after the backoff).
    pub fn handle_refused(&mut self, error: String, now: Now) {
        if matches!(self.link, Link::Waiting { .. }) {
            return;
        }
        self.end_session(error, Ending::Refused, now);
    }

    /// One message from the coordinator.
    pub fn handle_coordinator_msg(&mut self, msg: CoordinatorMsg, now: Now) {
        if !matches!(self.link, Link::Session { .. }) {
            return;
        }
        match msg {
            CoordinatorMsg::Netmap(mut nm) => {
                let asked = self.holding_sent.take();
                if let Some(r) = nm.resumed.take() {
                    let held = self.netmap.as_ref().map_or(&[][..], |n| &n.peers[..]);
                    let carried = std::mem::take(&mut nm.peers);
                    match resume::merge(held, carried, &r, asked) {
                        Ok(all) => {
                            debug!(
                                buckets = r.buckets,
                                sent = r.sent.len(),
                                peers = all.len(),
                                "netmap resumed from the one held"
                            );
                            nm.peers = all;
                        }
                        Err(e) => {
                            warn!(error = %e, "resumed netmap does not fit the one held; asking for a whole one");
                            self.no_resume = true;
                            return self.protocol_error(format!("resumed netmap: {e}"), now);
                        }
                    }
                }
                debug!(seq = nm.seq, peers = nm.peers.len(), "netmap");
                let first = self.connected_since.is_none();
                if first {
                    self.connected_since = Some(now.instant);
                    info!(
                        peers = nm.peers.len(),
                        coordinator = self.coordinators.current().unwrap_or_default(),
                        "connected to coordinator"
                    );
                    self.events.push_back(Event::Connected {
                        peers: nm.peers.len(),
                    });
                }
                let moved = first && self.coordinators.connected();
                let learned = self.coordinators.learn(&nm.coordinators);
                if moved || learned {
                    self.events.push_back(Event::SaveCoordinators {
                        addrs: self.coordinators.addrs().to_vec(),
                        preferred: self.coordinators.preferred().map(str::to_string),
                    });
                }
                self.phase = Phase::Connected;
                self.last_error = None;
                self.events
                    .push_back(Event::SelfName(nm.me.hostname.clone()));
                let same_filter = self
                    .netmap
                    .as_ref()
                    .is_some_and(|o| o.inbound == nm.inbound && o.peer_sets == nm.peer_sets);
                if !same_filter {
                    self.filter_rev += 1;
                }
                self.netmap = Some(nm);
                self.flow_ctx = None;
                self.leases.invalidate();
                self.apply_peers(now);
                self.apply_on_demand();
                let early = std::mem::take(&mut self.early_wants);
                if !early.is_empty() {
                    self.request_peers(early);
                }
                self.set_relays(now);
                if first {
                    let coord = self.coordinator_ms(now.unix_ms);
                    self.relays.session_started(now.instant, coord);
                    self.drain_relays(now);
                }
            }
            CoordinatorMsg::NetmapDelta(d) => {
                let Some(nm) = self.netmap.as_mut() else {
                    return self.protocol_error("netmap delta before a netmap".into(), now);
                };
                // A gap means a lost update: reconnect for a fresh full netmap.
                let applied = nm.apply(&d);
                self.flow_ctx = None;
                if let Err(e) = applied {
                    return self.protocol_error(e.to_string(), now);
                }
                debug!(
                    seq = d.seq,
                    upsert = d.upsert.len(),
                    remove = d.remove.len(),
                    "netmap delta"
                );
                if let Some(me) = &d.me {
                    info!(hostname = %me.hostname, "the coordinator renamed this device");
                    self.events.push_back(Event::SelfName(me.hostname.clone()));
                }
                self.apply_delta(&d, now);
                self.set_relays(now);
            }
            CoordinatorMsg::Error { code, message } => {
                let revoked = code == ErrorCode::DeviceRevoked || code == ErrorCode::Unauthorized;
                self.events.push_back(Event::CloseSession);
                let ending = if revoked {
                    Ending::Revoked
                } else {
                    Ending::Refused
                };
                self.end_session(message, ending, now);
            }
            CoordinatorMsg::RelayTicket { ticket } => {
                let coord = self.coordinator_ms(now.unix_ms);
                self.relays.handle_ticket(ticket, now.instant, coord);
                self.drain_relays(now);
            }
            CoordinatorMsg::CertRenewed {
                cert_der,
                not_after_ms,
            } => {
                self.cfg.cert_not_after_ms = not_after_ms;
                info!("device certificate renewed");
                self.events.push_back(Event::SaveCert {
                    cert_der,
                    not_after_ms,
                });
                let coord = self.coordinator_ms(now.unix_ms);
                self.relays.cert_renewed(now.instant, coord);
                self.drain_relays(now);
            }
            CoordinatorMsg::Pong {
                nonce,
                coordinator_time_ms,
            } => self.handle_pong(nonce, coordinator_time_ms, now),
            CoordinatorMsg::Lease { lease } => self.handle_lease(lease, now),
            // This agent sends no flow reports yet.
            CoordinatorMsg::FlowsAck { seq } => self.flow_log.handle_ack(seq),
            CoordinatorMsg::RotateNow { reason } => {
                info!(%reason, "coordinator asked for a key rotation");
                if self.rotation == Rotation::Idle && self.spare.is_some() {
                    self.start_rotation(now);
                } else {
                    self.queued = Some(reason);
                }
            }
            CoordinatorMsg::PostureWants(w) => {
                debug!(
                    processes = w.processes.len(),
                    files = w.files.len(),
                    custom = w.custom.len(),
                    "posture wants"
                );
                // Collect and report now rather than at the next periodic report.
                self.posture.set_wants(w);
            }
            CoordinatorMsg::PostureVerdict(v) => {
                if let Some(why) = v.sign_in_again() {
                    warn!(reason = %why, "access needs a fresh sign-in: run `ward up --login`");
                }
                let failing: Vec<&str> = v
                    .results
                    .iter()
                    .filter(|r| !r.passed)
                    .map(|r| r.requirement.as_str())
                    .collect();
                if !failing.is_empty() || v.quarantine.is_some() {
                    info!(?failing, quarantine = ?v.quarantine, unavailable = v.unavailable.len(), "posture verdict: access restricted");
                } else {
                    info!(
                        requirements = v.results.len(),
                        "posture verdict: all requirements met"
                    );
                }
                self.posture.verdict = Some(v);
            }
            CoordinatorMsg::Punch { peer, endpoints } => {
                // Only a peer the data plane has (a leased key in the netmap) is punched; the
                // coordinator checked the pair, this checks it again.
                if !self
                    .configured_peers()
                    .iter()
                    .any(|p| p.device_id == peer.0)
                {
                    debug!(%peer, "punch for a peer that is not configured: ignored");
                    return;
                }
                debug!(%peer, endpoints = endpoints.len(), "peer is punching: probing it back now");
                let mut endpoints = endpoints;
                endpoints.truncate(wire::MAX_ENDPOINTS);
                self.events.push_back(Event::Punch {
                    peer: peer.0,
                    endpoints,
                });
            }
            CoordinatorMsg::PeerRefused { by, reason } => {
                info!(%by, %reason, "the coordinator refused a peer this device asked for");
                // A name was the resolver's want; addresses and keys the data plane's.
                match by {
                    PeerRef::Name(name) => self.events.push_back(Event::RefuseName(name)),
                    by @ (PeerRef::Addr(_) | PeerRef::Key(_)) => {
                        self.events.push_back(Event::RefusePeer(by))
                    }
                }
            }
            CoordinatorMsg::Enrolled(_)
            | CoordinatorMsg::LoginPending(_)
            | CoordinatorMsg::LoginAuthorize(_)
            | CoordinatorMsg::SignedIn(_) => {
                self.protocol_error("unexpected enrollment message on a session".into(), now)
            }
        }
    }

    /// Timers: lease expiry (always), reconnecting, and during a session the rotation steps,
    /// the 10 s refresh (endpoints, clock, certificate) and posture collection.
    pub fn handle_tick(&mut self, now: Now) {
        if self
            .netcheck
            .poll_timeout()
            .is_some_and(|t| now.instant >= t)
        {
            let mut rng = self.rng;
            self.netcheck
                .handle_timeout(now.instant, || next_random(&mut rng));
            self.rng = rng;
            self.drain_netcheck();
            self.publish();
        }
        // Relay tickets (requests, half life, expiry): every tick, which comes at least every
        // HOUSEKEEPING and at the time the tickets asked for.
        let coord = self.coordinator_ms(now.unix_ms);
        if self.relays.handle_timeout(now.instant, coord) {
            self.publish();
        }
        self.drain_relays(now);
        if now.instant >= self.next_expiry {
            // The netmap's own changes apply at once; time only matters at a lease's edge.
            if !self.peers_unchanged(now) {
                self.apply_peers(now);
            }
            self.next_expiry = self.expiry_deadline(now);
        }
        if now.instant >= self.next_flows {
            self.events.push_back(Event::TakeFlowSamples);
            self.flow_log.handle_timeout(coord);
            self.next_flows = self.every(now.instant, FLOW_TICK);
        }
        self.send_flow_reports(now);
        match self.link {
            Link::Waiting { retry_at } if now.instant >= retry_at => {
                self.link = Link::Opening { since: now.instant };
                self.events.push_back(Event::Connect);
            }
            Link::Waiting { .. } | Link::Opening { .. } => {}
            Link::Session {
                since,
                mut next_rotation,
                mut next_refresh,
                mut next_posture,
            } => {
                if now.instant >= next_rotation
                    || self.rotation.deadline().is_some_and(|d| now.instant >= d)
                    || (self.rotation_polled()
                        && now.instant >= self.last_rotation_step + ROTATION_TICK)
                {
                    self.rotation_step(now);
                    self.last_rotation_step = now.instant;
                    next_rotation = self.every(now.instant, HOUSEKEEPING);
                }
                if now.instant >= next_refresh {
                    self.events.push_back(Event::NeedUpdate);
                    self.ping(now);
                    if cert::renewal_due(self.cfg.cert_not_after_ms, now.unix_ms) {
                        self.events.push_back(Event::NeedCsr);
                    }
                    next_refresh = self.every(now.instant, REFRESH_INTERVAL);
                }
                if now.instant >= next_posture {
                    self.events.push_back(Event::TakeDeniedFlows);
                    // Reports carry coordinator time: collect once the offset is known.
                    if let Some(offset) = self.clock.offset_ms() {
                        let seq = self.posture.next_seq(now.unix_ms.saturating_add(offset));
                        self.events.push_back(Event::CollectPosture {
                            wants: self.posture.wants.clone(),
                            seq,
                            clock_offset_ms: offset,
                        });
                    }
                    next_posture = self.every(now.instant, POSTURE_TICK);
                }
                // A rotation step may have ended the session.
                if let Link::Session { .. } = self.link {
                    self.link = Link::Session {
                        since,
                        next_rotation,
                        next_refresh,
                        next_posture,
                    };
                }
            }
        }
    }

    /// A posture collection finished: reported at once if a value changed, else every
    /// interval.
    pub fn handle_posture(&mut self, report: PostureReport, now: Now) {
        let in_session = matches!(self.link, Link::Session { .. });
        if !in_session {
            self.posture.report = Some(report);
            return;
        }
        let seq = report.seq;
        if let Some(msg) = self.posture.handle_report(report, now.instant) {
            debug!(seq, "sending posture report");
            self.transmits.push_back(msg);
        }
    }

    pub fn handle_dataplane_event(&mut self, ev: DataPlaneEvent, now: Now) {
        match ev {
            DataPlaneEvent::FlowSamples { samples, dropped } => {
                let coord = self.coordinator_ms(now.unix_ms);
                let none = FlowContext::default();
                // Only samples need to know who the other ends are.
                let ctx = if samples.is_empty() {
                    &none
                } else {
                    let netmap = &self.netmap;
                    self.flow_ctx.get_or_insert_with(|| {
                        netmap
                            .as_ref()
                            .map(FlowContext::from_netmap)
                            .unwrap_or_default()
                    })
                };
                self.flow_log.add(samples, dropped, ctx, coord);
                self.send_flow_reports(now);
            }
            DataPlaneEvent::PeersOnOldKey(n) => self.old_key_peers = Some(n),
            DataPlaneEvent::DeniedFlows(flows) => {
                if !matches!(self.link, Link::Session { .. }) {
                    return;
                }
                for chunk in flows.chunks(wire::MAX_DENIED_FLOWS) {
                    self.transmits.push_back(DeviceMsg::DeniedFlows {
                        flows: chunk.to_vec(),
                    });
                }
            }
            DataPlaneEvent::PunchWanted(peers) => self.request_punches(&peers),
            DataPlaneEvent::PeersWanted(wants) => self.request_peers(wants),
        }
    }

    /// Names under the Ward domain the resolver was asked for and does not have
    /// (`dns::Resolver::take_wants`): asked for as `want_peer { by: name }` under the same
    /// rules as the data plane's wants (only in a session whose netmap says `on_demand`, each
    /// once, none a held peer already answers). The answer is a delta (the resolver's zone
    /// then has the name) or [`Event::RefuseName`].
    pub fn handle_names_wanted(&mut self, names: Vec<Label>) {
        self.request_peers(names.into_iter().map(PeerRef::Name).collect());
    }

    /// A fresh key for the next rotation (answer to `Event::NeedKey`).
    pub fn provide_key(&mut self, key: PrivateKey) {
        self.spare = Some(key);
    }

    /// This device's key, port and interface endpoints now: sent (with the reflexive
    /// candidates first) if the result changed. Changed interface addresses mean a network
    /// change: address discovery runs again at once.
    pub fn handle_local_update(&mut self, update: DeviceUpdate) {
        if self
            .local_update
            .as_ref()
            .is_some_and(|u| u.local_endpoints != update.local_endpoints)
        {
            debug!("local addresses changed: discovering this device's public address again, probing peers again");
            self.netcheck.network_changed();
            self.events.push_back(Event::NetworkChanged);
        }
        self.local_update = Some(update);
        self.publish();
    }

    /// The driver resolved a relay address asked for by [`Event::ResolveRelay`].
    pub fn handle_relay_resolved(
        &mut self,
        addr: &str,
        result: Result<SocketAddr, String>,
        now: Now,
    ) {
        self.netcheck.handle_resolved(addr, result, now.instant);
        self.drain_netcheck();
    }

    /// A binding response read from the data plane's UDP socket.
    pub fn handle_discovery(&mut self, from: SocketAddr, resp: BindingResponse, now: Now) {
        if self.netcheck.handle_response(from, &resp, now.instant) {
            info!(
                reflexive = ?self.netcheck.reflexive(),
                mapping_varies = ?self.netcheck.mapping_varies(),
                "public address discovered"
            );
            self.publish();
        }
    }

    /// A relay connection's state from the driver (after `Event::Relay`): a change of home
    /// relay is published at once.
    pub fn handle_relay_event(&mut self, report: RelayConnEvent, now: Now) {
        if self.relays.handle_report(report) {
            self.publish();
        }
        self.drain_relays(now);
    }

    /// A certificate request made with the identity key (answer to `Event::NeedCsr`).
    pub fn handle_csr(&mut self, csr_der: Vec<u8>) {
        if matches!(self.link, Link::Session { .. }) {
            self.transmits.push_back(DeviceMsg::RenewCert {
                csr_der: Bytes(csr_der),
            });
        }
    }

    // ---- outputs ------------------------------------------------------------------------

    /// The next message for the coordinator (only while in a session).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<DeviceMsg> {
        self.transmits.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The first point of the housekeeping grid at least `period` (a multiple of
    /// [`HOUSEKEEPING`]) after the last one before `now`: timers set this way share wake-ups.
    fn every(&self, now: Instant, period: Duration) -> Instant {
        grid_after(
            self.anchor,
            now + period.saturating_sub(HOUSEKEEPING),
            HOUSEKEEPING,
        )
    }

    /// When peer leases must be looked at next: when the earliest configured lease ends (in
    /// coordinator time, through the measured clock offset), or the next housekeeping point.
    fn expiry_deadline(&self, now: Now) -> Instant {
        let step = self.every(now.instant, HOUSEKEEPING);
        let coord_now = self.coordinator_ms(now.unix_ms);
        match self.leases.earliest_end_ms().checked_sub(coord_now) {
            // Ended already: `apply_peers` has just dropped it (a look again now would find
            // the same), so the step stands.
            Some(wait) if wait > 0 => {
                let wait = Duration::from_millis(u64::try_from(wait).unwrap_or(u64::MAX));
                now.instant
                    .checked_add(wait)
                    .map_or(step, |end| end.min(step))
            }
            Some(_) | None => step,
        }
    }

    /// A lease change may bring the earliest end forward.
    fn schedule_expiry(&mut self, now: Now) {
        self.next_expiry = self.next_expiry.min(self.expiry_deadline(now));
    }

    /// Whether the rotation waits on something only a look can tell: peers moving to the new
    /// key, or a queued rotation waiting for a spare key.
    fn rotation_polled(&self) -> bool {
        matches!(self.rotation, Rotation::Confirming { .. }) || self.queued.is_some()
    }

    /// When [`Agent::handle_tick`] must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.next_expiry.min(self.next_flows);
        if let Some(r) = self.relay_deadline {
            t = t.min(r);
        }
        match self.link {
            Link::Waiting { retry_at } => t = t.min(retry_at),
            Link::Opening { .. } => {}
            Link::Session {
                next_rotation,
                next_refresh,
                next_posture,
                ..
            } => {
                t = t.min(next_rotation).min(next_refresh).min(next_posture);
                if self.rotation_polled() {
                    t = t.min(self.last_rotation_step + ROTATION_TICK);
                }
                if let Some(n) = self.netcheck.poll_timeout() {
                    t = t.min(n);
                }
                if let Some(d) = self.rotation.deadline() {
                    t = t.min(d);
                }
            }
        }
        t
    }

    // ---- views --------------------------------------------------------------------------

    /// The coordinator address dialled now (`None` before the driver gave any).
    pub fn coordinator(&self) -> Option<&str> {
        self.coordinators.current()
    }

    /// Every coordinator address known, in dialling order, and which worked last.
    pub fn coordinators(&self) -> &Coordinators {
        &self.coordinators
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    pub fn connected_since(&self) -> Option<Instant> {
        self.connected_since
    }
    pub fn netmap(&self) -> Option<&Netmap> {
        self.netmap.as_ref()
    }
    /// Flow-log figures for `ward status`.
    pub fn flow_status(&self) -> FlowLogStatus {
        self.flow_log
            .status(self.netmap.as_ref().is_some_and(|n| n.flows))
    }
    /// Replaces the flow log's configuration and restores its saved state (at start).
    pub fn configure_flows(&mut self, cfg: FlowLogConfig, state: Option<FlowLogState>) {
        self.flow_log = FlowLog::new(cfg);
        if let Some(st) = state {
            self.flow_log.restore(st);
        }
    }
    /// The flow log's state to save now, if it must be (see [`FlowLog::take_dirty`]). Call it
    /// before sending what [`Agent::poll_transmit`] gives.
    pub fn take_flow_state(&mut self, now: Instant) -> Option<FlowLogState> {
        self.flow_log.take_dirty(now).then(|| self.flow_log.state())
    }
    /// Closes the current flow window early (at shutdown) and returns the state to save.
    pub fn close_flow_window(&mut self) -> FlowLogState {
        self.flow_log.close_window();
        self.flow_log.state()
    }
    pub fn clock_offset_ms(&self) -> Option<i64> {
        self.clock.offset_ms()
    }
    /// How many times the peers were rebuilt from the whole netmap: a full netmap, a lease
    /// start or end, a clock offset that crosses one; not a delta, nor a look that finds
    /// nothing changed.
    pub fn peer_rebuilds(&self) -> u64 {
        self.peer_rebuilds
    }
    /// This device's lease on the key in use.
    pub fn own_lease(&self) -> Option<&SignedLease> {
        self.own_lease.as_ref()
    }
    pub fn public_key(&self) -> WgPublicKey {
        self.key.public()
    }
    pub fn key_since(&self) -> Instant {
        self.key_since
    }
    pub fn rotations(&self) -> u64 {
        self.rotations
    }
    pub fn rotation(&self) -> &Rotation {
        &self.rotation
    }
    /// The peers last configured (the data plane's view), in device order.
    pub fn configured_peers(&self) -> Vec<PeerConfig> {
        self.applied_peers
            .iter()
            .flat_map(|m| m.values().flatten().cloned())
            .collect()
    }
    /// When a peer first appeared in the netmap.
    pub fn peer_first_seen(&self, id: DeviceId) -> Option<Instant> {
        self.leases.first_seen(id)
    }
    /// Relay connections, the ticket and the home relay.
    pub fn relays(&self) -> &Relays {
        &self.relays
    }
    /// Address discovery: relays, reflexive addresses, whether the mapping varies.
    pub fn netcheck(&self) -> &Netcheck {
        &self.netcheck
    }
    pub fn posture_wants(&self) -> &PostureWants {
        &self.posture.wants
    }
    pub fn posture_report(&self) -> Option<&PostureReport> {
        self.posture.report.as_ref()
    }
    pub fn posture_verdict(&self) -> Option<&PostureVerdict> {
        self.posture.verdict.as_ref()
    }
    /// Coordinator time at `now` (device time if no offset was measured yet).
    pub fn coordinator_ms(&self, unix_ms: i64) -> i64 {
        unix_ms.saturating_add(self.clock.offset_ms().unwrap_or(0))
    }

    // ---- helpers ------------------------------------------------------------------------

    /// Queues the flow reports due now, in a session whose netmap says `flows`. Records are
    /// kept (within the caps) whatever the coordinator says, so a coordinator upgraded later
    /// gets them, and `ward status` shows them.
    fn send_flow_reports(&mut self, now: Now) {
        let ready = matches!(self.link, Link::Session { .. })
            && self.netmap.as_ref().is_some_and(|n| n.flows);
        if !ready {
            return;
        }
        while let Some(r) = self.flow_log.poll_report(now.instant) {
            debug!(seq = r.seq, "sending flow report");
            self.transmits.push_back(DeviceMsg::Flows(r));
        }
    }

    fn random(&mut self) -> u64 {
        next_random(&mut self.rng)
    }

    /// The netmap's relay list to address discovery (a changed list starts a run).
    fn set_relays(&mut self, now: Now) {
        let coord = self.coordinator_ms(now.unix_ms);
        if let Some(nm) = &self.netmap {
            self.netcheck.set_relays(&nm.relays, now.instant);
            self.relays.set_relays(&nm.relays, now.instant, coord);
        }
        if self.relays.home() != self.update.home_relay.as_deref() {
            self.publish();
        }
        self.drain_relays(now);
    }

    /// The relay state machine's outputs become driver events and coordinator messages.
    fn drain_relays(&mut self, now: Now) {
        if self.relays.poll_ticket_request() && matches!(self.link, Link::Session { .. }) {
            debug!("asking for a relay ticket");
            self.transmits.push_back(DeviceMsg::RelayTicketRequest);
        }
        while let Some(out) = self.relays.poll_out() {
            self.events.push_back(Event::Relay(out));
        }
        let usable = self.relays.usable();
        if usable != self.applied_relays {
            self.applied_relays = usable.clone();
            self.events.push_back(Event::SetRelays(usable));
        }
        let coord = self.coordinator_ms(now.unix_ms);
        self.relay_deadline = self.relays.poll_timeout(now.instant, coord);
    }

    /// Address discovery's requests and resolutions become driver events.
    fn drain_netcheck(&mut self) {
        while let Some(addr) = self.netcheck.poll_resolve() {
            self.events.push_back(Event::ResolveRelay(addr));
        }
        while let Some((dst, datagram)) = self.netcheck.poll_send() {
            self.events
                .push_back(Event::SendDiscovery { dst, datagram });
        }
    }

    /// `update` with the candidate endpoints (reflexive addresses first, then local ones) and
    /// the home relay: the full update, as it is always sent.
    fn with_candidates(&self, mut update: DeviceUpdate) -> DeviceUpdate {
        update.local_endpoints =
            netcheck::candidates(&self.netcheck.reflexive(), &update.local_endpoints);
        update.home_relay = self.relays.home().map(String::from);
        update.advertise_routes = self.cfg.routes.advertise_routes.clone();
        update.advertise_exit_node = self.cfg.routes.advertise_exit_node;
        update
    }

    /// Asks the coordinator to have these peers probe back now: only in a session, only if
    /// the coordinator said it accepts punch requests (an older one would close the session
    /// on them), only for peers in the netmap. Nothing waits for an answer: without one the
    /// data plane's own probes still run.
    fn request_punches(&mut self, peers: &[u64]) {
        if !matches!(self.link, Link::Session { .. }) {
            return;
        }
        let Some(nm) = self.netmap.as_ref().filter(|nm| nm.punch) else {
            return;
        };
        let known: Vec<DeviceId> = peers
            .iter()
            .map(|p| DeviceId(*p))
            .filter(|p| nm.peers.iter().any(|np| np.device_id == *p))
            .collect();
        for peer in known {
            debug!(%peer, "asking the coordinator to have the peer punch back");
            self.transmits.push_back(DeviceMsg::PunchRequest { peer });
        }
    }

    /// Asks the coordinator for the peers the data plane (or, by name, the resolver) wants:
    /// only in a session whose first netmap came and says `on_demand` (a coordinator that did
    /// not say so would close the session on `want_peer`), each once per report, at most
    /// [`MAX_WANTS_PER_REPORT`], and none the netmap already holds (its lease is what keeps it
    /// out of the data plane; asking again would bring the same entry; a name is held when a
    /// held peer has it as its hostname).
    fn request_peers(&mut self, wants: Vec<PeerRef>) {
        if !matches!(self.link, Link::Session { .. }) {
            return;
        }
        if self.connected_since.is_none() {
            // A session whose first netmap is not in yet (a reconnect): kept for it.
            for by in wants {
                if self.early_wants.len() < MAX_WANTS_PER_REPORT && !self.early_wants.contains(&by)
                {
                    self.early_wants.push(by);
                }
            }
            return;
        }
        let Some(nm) = self.netmap.as_ref().filter(|nm| nm.on_demand) else {
            return;
        };
        let held = |by: &PeerRef| {
            nm.peers.iter().any(|p| match by {
                PeerRef::Addr(a) => *a == p.ipv4 || *a == p.ipv6,
                PeerRef::Key(k) => {
                    p.wg_public_key.as_ref() == Some(k)
                        || p.leases.iter().any(|l| l.lease.wg_public_key == *k)
                }
                // A held peer with that hostname: the zone answers the name already.
                PeerRef::Name(l) => p.hostname.as_str().eq_ignore_ascii_case(l.as_str()),
            })
        };
        let mut sent: Vec<PeerRef> = Vec::new();
        for by in wants {
            if sent.len() == MAX_WANTS_PER_REPORT {
                debug!("more peers wanted than one report sends: the rest are asked for later");
                break;
            }
            if sent.contains(&by) || held(&by) {
                continue;
            }
            debug!(%by, "asking the coordinator for a peer");
            sent.push(by);
        }
        self.transmits
            .extend(sent.into_iter().map(|by| DeviceMsg::WantPeer { by }));
    }

    /// Puts the data plane in or out of on-demand mode as the netmap says.
    fn apply_on_demand(&mut self) {
        let on = self.netmap.as_ref().is_some_and(|nm| nm.on_demand);
        if on != self.applied_on_demand {
            info!(on_demand = on, "peers on demand");
            self.applied_on_demand = on;
            self.events.push_back(Event::SetOnDemand(on));
        }
    }

    /// Sends this device's update if it changed (only in a session).
    fn publish(&mut self) {
        if !matches!(self.link, Link::Session { .. }) {
            return;
        }
        let Some(local) = self.local_update.clone() else {
            return;
        };
        let update = self.with_candidates(local);
        if update == self.update {
            return;
        }
        self.update = update.clone();
        self.transmits.push_back(DeviceMsg::Update(update));
    }

    fn ping(&mut self, now: Now) {
        let nonce = self.random();
        self.clock.ping_sent(nonce, now.instant, now.unix_ms);
        self.transmits.push_back(DeviceMsg::Ping { nonce });
    }

    fn handle_pong(&mut self, nonce: u64, coordinator_time_ms: i64, now: Now) {
        let before = self.clock.offset_ms();
        if let Some(offset) = self
            .clock
            .handle_pong(nonce, coordinator_time_ms, now.instant)
        {
            if before.is_none_or(|o| o.saturating_sub(offset).saturating_abs() > 1000)
                && offset.saturating_abs() > 2000
            {
                warn!(
                    offset_ms = offset,
                    "this device's clock differs from the coordinator's; correcting for it"
                );
            }
            self.events.push_back(Event::SetClockOffset(offset));
            // Every ping measures a slightly different offset: the peers are checked again
            // only if coordinator time, so corrected, crossed a lease's start or end.
            if self.peers_unchanged(now) {
                self.schedule_expiry(now);
            } else {
                self.apply_peers(now);
            }
        }
        if self.rotation == (Rotation::Unleased { requested: false }) {
            // First lease of this session, for the key in use.
            self.rotation = Rotation::Unleased { requested: true };
            let request = self.lease_request(&self.key);
            self.transmits.push_back(request);
        }
    }

    /// Whether the applied peers still stand: the netmap is the one they were checked for,
    /// and coordinator time (through the current clock offset) has crossed no lease's start
    /// or end since (see [`LeaseCache::still_valid`]).
    fn peers_unchanged(&self, now: Now) -> bool {
        let coord_now = self.coordinator_ms(now.unix_ms);
        self.netmap
            .as_ref()
            .is_some_and(|nm| self.leases.still_valid(nm, coord_now))
    }

    /// Pushes the netmap's peers into the data plane: one entry per peer key that holds a
    /// valid lease (signature from the pinned coordinator key, for that peer's addresses,
    /// unexpired in coordinator time). A key without a valid lease is never configured.
    fn apply_peers(&mut self, now: Now) {
        let Some(nm) = &self.netmap else { return };
        self.peer_rebuilds += 1;
        let coord_now = self.coordinator_ms(now.unix_ms);
        let mut peers = self
            .leases
            .peers(nm, self.cfg.lease_key.as_ref(), coord_now, now.instant);
        for configs in peers.values_mut() {
            routes::choose_exit(configs, self.cfg.routes.exit_node.as_deref());
        }
        let changed = self.applied_peers.as_ref() != Some(&peers);
        self.applied_peers = Some(peers);
        self.apply_routes();
        // The filter first (see `apply_delta`).
        self.apply_filter();
        if changed {
            self.events
                .push_back(Event::SetPeers(self.configured_peers()));
        }
        self.apply_shadow();
        self.schedule_expiry(now);
    }

    /// After a netmap delta: only the devices it names are checked and handed on (one
    /// peer's new endpoint or lease costs one peer's work, not the whole set's), and the
    /// filter and candidate rules only when it carries them. Whatever the lease cache cannot
    /// answer from its last check (see [`LeaseCache::update`]) goes the full way.
    fn apply_delta(&mut self, d: &ward_shared::wire::NetmapDelta, now: Now) {
        let Some(nm) = &self.netmap else { return };
        let coord_now = self.coordinator_ms(now.unix_ms);
        let changes =
            self.leases
                .update(nm, d, self.cfg.lease_key.as_ref(), coord_now, now.instant);
        // The filter before the peers: rules for sources whose peer is not configured yet
        // admit nothing, while a peer configured before the rules admitting it would have its
        // first packets denied (on demand, a newly held peer's addresses come with it).
        if d.inbound.is_some()
            || d.inbound_edit.is_some()
            || !d.peer_sets.is_empty()
            || !d.removed_peer_sets.is_empty()
        {
            self.filter_rev += 1;
            self.apply_filter();
        }
        let (Some(changes), Some(applied)) = (changes, self.applied_peers.as_mut()) else {
            return self.apply_peers(now);
        };
        let mut updates = Vec::new();
        let mut routes_changed = d.me.is_some();
        for (id, mut configs) in changes {
            routes::choose_exit(&mut configs, self.cfg.routes.exit_node.as_deref());
            let before = applied.get(&id).map(Vec::as_slice).unwrap_or_default();
            if before == configs.as_slice() {
                continue;
            }
            routes_changed |= before.iter().chain(&configs).any(|c| !c.routes.is_empty());
            if configs.is_empty() {
                applied.remove(&id);
            } else {
                applied.insert(id, configs.clone());
            }
            updates.push((id, configs));
        }
        if routes_changed {
            self.apply_routes();
        }
        if !updates.is_empty() {
            self.events.push_back(Event::UpdatePeers(updates));
        }
        if d.shadow_filter.is_some() {
            self.apply_shadow();
        }
        self.schedule_expiry(now);
    }

    /// The prefixes this device serves and those it reaches through the configured peers.
    fn apply_routes(&mut self) {
        let Some(nm) = &self.netmap else { return };
        let mut reached: Vec<ward_shared::routes::Prefix> = self
            .applied_peers
            .iter()
            .flat_map(|m| m.values().flatten())
            .flat_map(|p| p.routes.iter().copied())
            .collect();
        reached.sort();
        reached.dedup();
        let wanted = (nm.me.routes.clone(), reached);
        if self.applied_routes.as_ref() != Some(&wanted) {
            self.events.push_back(Event::SetRoutes {
                served: wanted.0.clone(),
                reached: wanted.1.clone(),
            });
            self.applied_routes = Some(wanted);
        }
    }

    /// Hands the netmap's filter to the data plane unless it holds this revision already
    /// (most calls change nothing).
    fn apply_filter(&mut self) {
        let Some(nm) = &self.netmap else { return };
        if self.applied_filter_rev != Some(self.filter_rev) {
            self.events.push_back(Event::SetFilter {
                rules: Arc::clone(&nm.inbound),
                sets: Arc::clone(&nm.peer_sets),
            });
            self.applied_filter_rev = Some(self.filter_rev);
        }
    }

    fn apply_shadow(&mut self) {
        let Some(nm) = &self.netmap else { return };
        if self.applied_shadow.as_ref() != Some(&nm.shadow_filter) {
            let sf = nm.shadow_filter.clone();
            self.events.push_back(Event::SetShadowFilter(sf.clone()));
            self.applied_shadow = Some(sf);
        }
    }

    /// The coordinator broke the protocol: end the session; the next one starts afresh.
    fn protocol_error(&mut self, error: String, now: Now) {
        self.events.push_back(Event::CloseSession);
        self.end_session(error, Ending::Unreachable, now);
    }

    fn end_session(&mut self, error: String, ending: Ending, now: Now) {
        self.early_wants.clear();
        let revoked = ending == Ending::Revoked;
        self.connected_since = None;
        self.last_error = Some(error);
        self.clock.forget_ping();
        self.transmits.clear();
        self.flow_log.session_ended();
        self.rotation = Rotation::Unleased { requested: false };
        self.queued = None;
        self.relays.session_ended();
        if revoked {
            // No relay may carry this device's traffic any more.
            self.relays.clear();
            self.drain_relays(now);
            // Leave the network: no peers, no tunnels.
            self.phase = Phase::Revoked;
            self.netmap = None;
            self.flow_ctx = None;
            self.leases.clear();
            self.own_lease = None;
            self.applied_peers = Some(PeerMap::new());
            // The empty filter below is no netmap's: the next netmap installs its own.
            self.applied_filter_rev = None;
            self.applied_routes = Some((Vec::new(), Vec::new()));
            self.events.push_back(Event::SetRoutes {
                served: Vec::new(),
                reached: Vec::new(),
            });
            self.events.push_back(Event::SetPeers(Vec::new()));
            self.events.push_back(Event::SetFilter {
                rules: Arc::default(),
                sets: Arc::default(),
            });
            if self.applied_shadow.as_ref().is_some_and(Option::is_some) {
                self.events.push_back(Event::SetShadowFilter(None));
            }
            self.applied_shadow = Some(None);
            self.apply_on_demand();
        } else {
            self.phase = Phase::Connecting;
        }
        let from = self.coordinators.current().map(str::to_string);
        let random = self.random();
        let retry_in = self.coordinators.failed(ending, random);
        if from.as_deref() != self.coordinators.current() {
            info!(
                from = from.unwrap_or_default(),
                to = self.coordinators.current().unwrap_or_default(),
                retry_in_ms = retry_in.as_millis() as u64,
                "control session lost; trying the next coordinator address"
            );
        }
        self.link = Link::Waiting {
            retry_at: now.instant + retry_in,
        };
        self.events
            .push_back(Event::Disconnected { revoked, retry_in });
    }
}

/// splitmix64: enough for nonces, txids and jitter, reproducible from the seed.
pub(crate) fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
