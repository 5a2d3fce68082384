//! The device's data plane: TUN ⇄ cryptokey routing ⇄ WireGuard (boringtun `noise::Tunn`) ⇄ UDP.
//!
//! Layout (I/O-free core, thin driver):
//!
//! - [`engine`]: [`Core`], the protocol logic, with its drive loop documented on the type. No
//!   sockets, no clock reads of its own (time is passed in as `now`), no threads. It owns the
//!   peer table (one `Tunn` per peer key, two while this device's own key rotates), does the
//!   cryptokey routing, the inner-source check, the inbound filter, endpoint selection
//!   (candidates, roaming), the handshake probing and the loss-free key rotation. Its outputs go
//!   into caller-provided buffers ([`Outbox`] for UDP datagrams, a `&mut [u8]` for a decrypted
//!   IP packet). It is `Sync`, and nothing the two hot paths share is locked per packet (a
//!   peer's own `Tunn` is locked once per run of its packets in a batch), so they run in
//!   parallel on the machine's two cores.
//! - [`pmtu`]: I/O-free path MTU per destination (learned from the kernel by the driver), the
//!   check that an inner packet fits its peer's path, and the ICMP too-big errors that tell the
//!   inner stack when it does not.
//! - `udp`: one UDP socket with batched I/O (UDP GSO via `sendmmsg` + `UDP_SEGMENT`, UDP GRO via
//!   `recvmmsg` + `UDP_GRO`, with fallbacks). Every datagram has DF set; GSO segments are sized
//!   to the destination's path MTU; refused sends are counted by reason.
//! - `tun`: TUN creation with virtio-net offload (TSO in, GRO-coalesced writes out), addresses,
//!   routes, and their removal.
//! - `relay`: the bounded queue of datagrams the engine routes through a relay, taken by the
//!   daemon ([`DataPlane::take_relay_outbound`]); datagrams arriving through relays come in
//!   through [`DataPlane::handle_relayed`].
//! - [`discovery`]: address-discovery answers (binding responses from relays) share the UDP
//!   socket; the receive path sets them aside by their first byte, before WireGuard, into a
//!   bounded inbox the agent drains; requests leave from the same socket.
//! - `driver`: three OS threads: TUN → encrypt → UDP, UDP → decrypt → TUN, and timers.
//!
//! This module must not depend on the agent's control plane (quinn, the coordinator protocol):
//! the agent tells it who the peers are through [`DataPlane::set_peers`].

pub mod discovery;
mod driver;
pub mod engine;
pub mod pmtu;
pub mod probe;
mod relay;
mod tun;
mod udp;

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ward_shared::filter::{FilterCounters, FilterRule, LocalPrefixes};
use ward_shared::peerset::PeerSet;
use ward_shared::routes::Prefix;
use ward_shared::wire::PeerRef;

pub use self::discovery::DiscoveryCounters;
pub use self::engine::{Batch, Core, CoreConfig, Outbox, Transmit};
pub use self::pmtu::PathMtuCounters;
pub(crate) use self::relay::{RelayQueue, RELAY_QUEUE};
pub use self::relay::{RelayReceiver, RelayTransmit};
use ward_shared::discovery::BindingResponse;

/// TUN MTU: a 1500-byte underlay minus the worst-case WireGuard overhead (IPv6 40 + UDP 8 +
/// WireGuard data header 16 + tag 16).
pub const TUN_MTU: u16 = 1420;

/// Default TUN interface name.
pub const DEFAULT_TUN_NAME: &str = "ward0";

/// Persistent keepalive interval, so a device behind NAT keeps its mapping open.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;

/// What the data plane needs to start.
#[derive(Clone)]
pub struct DataPlaneConfig {
    /// TUN interface name (e.g. [`DEFAULT_TUN_NAME`]).
    pub tun_name: String,
    /// UDP port to listen on; 0 picks any free port.
    pub port: u16,
    /// This device's WireGuard (x25519) private key.
    pub private_key: [u8; 32],
    /// This device's overlay IPv4 address (assigned as a /32).
    pub ipv4: Ipv4Addr,
    /// This device's overlay IPv6 address (assigned as a /128).
    pub ipv6: Ipv6Addr,
    /// The coordinator's IPv6 ULA /48, routed into the TUN.
    pub v6_prefix: Ipv6Addr,
}

impl fmt::Debug for DataPlaneConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataPlaneConfig")
            .field("tun_name", &self.tun_name)
            .field("port", &self.port)
            .field("private_key", &"<redacted>")
            .field("ipv4", &self.ipv4)
            .field("ipv6", &self.ipv6)
            .field("v6_prefix", &self.v6_prefix)
            .finish()
    }
}

/// One peer this device may exchange packets with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub device_id: u64,
    pub hostname: String,
    /// The peer's WireGuard public key.
    pub public_key: [u8; 32],
    /// The peer's overlay IPv4 address (/32): the only IPv4 source it may use inside the tunnel.
    pub ipv4: Ipv4Addr,
    /// The peer's overlay IPv6 address (/128): the only IPv6 source it may use inside the tunnel.
    pub ipv6: Ipv6Addr,
    /// Candidate underlay endpoints, probed with handshake initiations until one answers.
    pub endpoints: Vec<SocketAddr>,
    /// The peer's home relay (the netmap's `Peer.relay`): while no direct path works and this
    /// device is connected to it (see [`DataPlane::set_relays`]), traffic goes through it.
    pub relay: Option<String>,
    /// Routed prefixes reached through the peer (a subnet router or this device's chosen exit
    /// node): packets to them go to it, and it may send from them (and only it: the longest
    /// prefix decides, as for destinations). Addresses inside the overlay never count.
    pub routes: Vec<Prefix>,
}

/// The path a peer's traffic takes, for `ward status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStatus {
    /// No path yet (probing the candidates).
    None,
    /// Straight to this underlay address.
    Direct(SocketAddr),
    /// Through the relay with this name.
    Relay(String),
}

/// Per-peer state for `ward status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub device_id: u64,
    /// The endpoint the last authenticated packet came from, if any.
    pub endpoint: Option<SocketAddr>,
    /// Age of the handshake of the session outbound traffic uses, if there is one.
    pub last_handshake: Option<Duration>,
    /// Plaintext bytes received from / sent to this device, summed over its keys' `Tunn`s
    /// (those still present: a dropped key's bytes leave the sum).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Authenticated packets whose inner source address was not this peer's.
    pub dropped_bad_source: u64,
    /// The path MTU to the endpoint (outer IP packet size), once learned.
    pub path_mtu: Option<u16>,
    /// The path the peer's traffic takes now.
    pub path: PathStatus,
}

/// Data-plane wide counters (monotonic since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataPlaneCounters {
    /// IP packets encrypted and sent to a peer.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// IP packets decrypted, checked and handed to the TUN.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets from the TUN whose destination no peer owns.
    pub dropped_no_route: u64,
    /// Packets from the TUN for a peer with no known or candidate endpoint.
    pub dropped_no_endpoint: u64,
    /// Authenticated packets whose inner source was not the sending peer's address.
    pub dropped_bad_source: u64,
    /// Datagrams that were not valid WireGuard for a configured peer (garbage, truncated,
    /// unknown key or index, failed authentication, replays).
    pub dropped_garbage: u64,
    /// Malformed packets read from the TUN (not IPv4/IPv6).
    pub dropped_bad_tun_packet: u64,
    /// Handshake initiations sent (all candidates counted).
    pub handshake_initiations_sent: u64,
    /// Decrypted packets the inbound filter refused: no rule allows them (and they are not
    /// replies to this device's flows).
    pub dropped_filter_no_rule: u64,
    /// Decrypted packets whose only matching rule (or grant) has expired.
    pub dropped_filter_expired: u64,
    /// Decrypted packets refused as malformed, non-first fragments, unsupported protocols, or
    /// because the connection table was full.
    pub dropped_filter_other: u64,
    /// Decrypted packets whose destination is not one of this device's own addresses (a peer
    /// trying to reach past this device); dropped before the filter.
    pub dropped_wrong_destination: u64,
    /// Packets from the TUN whose source is not one of this device's own addresses; dropped
    /// before encryption.
    pub dropped_wrong_source: u64,
    /// ICMP "administratively prohibited" errors written back to the TUN for overlay
    /// destinations without a peer.
    pub icmp_unreachable_sent: u64,
    /// Path changes (direct ⇄ relayed, or to another direct address), over all peers.
    pub path_switches: u64,
    /// Encrypted keepalives sent to direct candidates while relayed (hole punching).
    pub direct_probes_sent: u64,
    /// WireGuard datagrams queued for a relay.
    pub relay_tx_datagrams: u64,
    /// WireGuard datagrams that arrived through a relay.
    pub relay_rx_datagrams: u64,
    /// Datagrams for a relay dropped because the relay queue was full.
    pub relay_dropped_queue_full: u64,
    /// Datagrams that arrived through a relay this data plane is not connected to.
    pub relay_dropped_unknown: u64,
    /// Peer entries ignored because their key is held by another device's entry.
    pub peer_key_conflicts: u64,
    /// Peers on demand: TUN packets and handshake initiations held while their peer was
    /// asked for.
    pub held_for_peer: u64,
    /// Held packets dropped: past the bounds (the oldest), waiting too long, refused, or not
    /// held because too many destinations were waiting.
    pub held_dropped: u64,
    /// Held packets handled once their peer arrived.
    pub held_replayed: u64,
    /// Peers asked for (wants recorded for the coordinator).
    pub peer_wants: u64,
}

/// A running data plane: the TUN interface, the UDP socket and the threads that move packets.
///
/// Dropping it without [`DataPlane::shutdown`] stops the threads too; the kernel removes the
/// TUN (with its addresses and routes) when the last descriptor closes.
pub struct DataPlane {
    core: Arc<Core>,
    driver: Option<driver::Driver>,
    local_port: u16,
    discovery: Arc<discovery::Inbox>,
    relay: Arc<relay::RelayQueue>,
    punch_ready: Arc<tokio::sync::Notify>,
    wants_ready: Arc<tokio::sync::Notify>,
}

impl DataPlane {
    /// Creates the TUN (replacing a leftover one with the same name), binds the UDP socket and
    /// starts the packet threads. Must be called inside a tokio runtime.
    pub async fn start(cfg: DataPlaneConfig) -> anyhow::Result<DataPlane> {
        let core = Arc::new(Core::new(
            CoreConfig {
                private_key: cfg.private_key,
                persistent_keepalive: Some(PERSISTENT_KEEPALIVE_SECS),
                v6_prefix: Some(cfg.v6_prefix),
            },
            rand::random(),
        ));
        // Before any packet flows: only this device's own addresses are accepted as inbound
        // destinations and outbound sources.
        core.set_local_prefixes(LocalPrefixes::own([cfg.ipv4.into(), cfg.ipv6.into()]));
        core.set_own_ipv4(cfg.ipv4);
        let discovery = Arc::new(discovery::Inbox::default());
        let relay = Arc::new(relay::RelayQueue::new(relay::RELAY_QUEUE));
        let punch_ready = Arc::new(tokio::sync::Notify::new());
        let wants_ready = Arc::new(tokio::sync::Notify::new());
        let driver = tokio::task::spawn_blocking({
            let (core, discovery, relay) = (core.clone(), discovery.clone(), relay.clone());
            let wake = driver::Wake {
                punch: punch_ready.clone(),
                wants: wants_ready.clone(),
            };
            move || driver::Driver::start(&cfg, core, discovery, relay, wake)
        })
        .await
        .context("data plane start task")??;
        let local_port = driver.local_port();
        Ok(DataPlane {
            core,
            driver: Some(driver),
            local_port,
            discovery,
            relay,
            punch_ready,
            wants_ready,
        })
    }

    /// The UDP port peers should send to.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// This device's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.core.public_key()
    }

    /// Replaces the peer set. Unchanged peers (same key and addresses) keep their sessions;
    /// removed peers are refused from the moment this returns; new peers are handshaken at once,
    /// and what was held for them (peers on demand) is sent.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        let mut out = Outbox::new();
        self.core.set_peers(peers, Instant::now(), &mut out);
        if let Some(driver) = &self.driver {
            driver.send(&out);
        }
    }

    /// Switches to a new WireGuard private key (after a lease for its public key arrived and
    /// peers were told about it): every peer is handshaken under the new key at once, while
    /// the old sessions keep carrying traffic until then (no loss). See [`Core::rotate_key`].
    pub fn rotate_key(&self, private_key: [u8; 32]) {
        let mut out = Outbox::new();
        self.core.rotate_key(private_key, Instant::now(), &mut out);
        if let Some(driver) = &self.driver {
            driver.send(&out);
        }
    }

    /// Replaces the inbound filter (the netmap's `inbound`). Until it is first called, and
    /// whenever it is empty, peers cannot open anything on this device; replies to flows this
    /// device opened still pass. Established flows that no rule allows any more are cut.
    pub fn set_filter(&self, rules: Vec<FilterRule>) {
        self.core.set_filter(rules);
    }

    /// Replaces the inbound filter and the peer sets its rules name, as one step (the netmap's
    /// `inbound` and `peer_sets`); see [`engine::Core::set_filter_with_sets`].
    pub fn set_filter_with_sets(&self, rules: Vec<FilterRule>, sets: &[PeerSet]) {
        self.core.set_filter_with_sets(rules, sets);
    }

    /// Replaces the candidate rules (the netmap's `shadow_filter`): never enforced; new flows
    /// from peers are judged against them for the flow records' would-allow / would-deny.
    /// Replaces the routed prefixes this device forwards to (see [`engine::Core::set_routes`]).
    pub fn set_routes(&self, routes: Vec<Prefix>) {
        self.core.set_routes(routes);
    }

    pub fn set_shadow_filter(&self, rules: Option<Vec<FilterRule>>) {
        self.core.set_shadow_filter(rules);
    }

    /// Sets coordinator time minus local wall-clock time (ms), measured by the control
    /// channel; rule expiry is judged on local wall clock + this offset.
    pub fn set_clock_offset_ms(&self, offset: i64) {
        self.core.set_clock_offset_ms(offset);
    }

    /// Refused new inbound flows since the last call.
    pub fn take_denied_flows(&self) -> Vec<ward_shared::wire::DeniedFlow> {
        self.core.take_denied_flows()
    }

    /// See [`engine::Core::take_flow_samples`].
    pub fn take_flow_samples(&self) -> (Vec<ward_shared::filter::FlowSample>, u64) {
        self.core.take_flow_samples()
    }

    /// The inbound filter's own counters (allowed new/tracked, denied by reason, revoked flows).
    pub fn filter_counters(&self) -> FilterCounters {
        self.core.filter_counters()
    }

    /// Per-peer status, one per device (a rotating peer has two keys), ordered by device id.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.core.status()
    }

    /// Peers still on a session under the previous local key (see [`Core::peers_on_old_key`]).
    pub fn peers_on_old_key(&self) -> usize {
        self.core.peers_on_old_key()
    }

    pub fn counters(&self) -> DataPlaneCounters {
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        DataPlaneCounters {
            relay_tx_datagrams: g(&self.relay.sent),
            relay_rx_datagrams: g(&self.relay.received),
            relay_dropped_queue_full: g(&self.relay.dropped_full),
            relay_dropped_unknown: g(&self.relay.dropped_unknown_relay),
            ..self.core.counters()
        }
    }

    /// Relays this device has a live, welcomed connection to, with the largest WireGuard
    /// datagram each carries now. Only these are used to send; a peer whose home relay is
    /// not among them is reached directly only.
    pub fn set_relays(&self, relays: Vec<(String, u16)>) {
        self.core.set_relays(relays, Instant::now());
    }

    /// The queue of datagrams to send through relays: taken once by the daemon (later calls
    /// get `None`). Bounded; when it is full the data plane drops and counts
    /// ([`DataPlaneCounters::relay_dropped_queue_full`]).
    pub fn take_relay_outbound(&self) -> Option<RelayReceiver> {
        self.relay.take_receiver()
    }

    /// A WireGuard datagram that arrived through relay `relay` from device `from`: decrypted
    /// (with the same checks as a direct datagram: the peer's key, the inner source, the
    /// inbound filter) and written to the TUN; replies go out as the engine decides (direct or
    /// relayed). Safe to call from any thread, alongside the data-plane threads.
    pub fn handle_relayed(&self, relay: &str, from: u64, datagram: &[u8]) {
        self.handle_relayed_batch(relay, &[(from, datagram)]);
    }

    /// [`DataPlane::handle_relayed`] for several datagrams from one relay, `(from device,
    /// datagram)` in arrival order: decrypted under one batch, their packets written to the TUN
    /// together (coalesced per flow).
    pub fn handle_relayed_batch(&self, relay: &str, datagrams: &[(u64, &[u8])]) {
        if datagrams.is_empty() {
            return;
        }
        let n = u64::try_from(datagrams.len()).unwrap_or(u64::MAX);
        let Some(id) = self.core.relay_id(relay) else {
            tracing::trace!(relay, n, "datagrams from a relay not connected: dropped");
            self.relay
                .dropped_unknown_relay
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        self.relay
            .received
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if let Some(driver) = &self.driver {
            driver.handle_relayed(id, datagrams.iter().copied());
        }
    }

    /// Peers (device ids) whose direct candidates this device just started probing, for
    /// which the coordinator should be asked to have the peer probe back now (see
    /// [`Core::take_punch_requests`]).
    pub fn take_punch_requests(&self) -> Vec<u64> {
        self.core.take_punch_requests(Instant::now())
    }

    /// Resolves when [`DataPlane::take_punch_requests`] may have peers (the timer thread
    /// started probing them); a notification made while nobody waits is kept.
    pub async fn punch_ready(&self) {
        self.punch_ready.notified().await
    }

    /// Peers on demand (the netmap's `on_demand`); see [`Core::set_on_demand`].
    pub fn set_on_demand(&self, on: bool) {
        self.core.set_on_demand(on);
    }

    /// The peers to ask the coordinator for now (see [`Core::take_wants`]).
    pub fn take_wants(&self) -> Vec<PeerRef> {
        self.core.take_wants(Instant::now())
    }

    /// Resolves when [`DataPlane::take_wants`] may have peers: the packet thread that
    /// recorded a want wakes it at the end of that batch; a notification made while nobody
    /// waits is kept.
    pub async fn wants_ready(&self) {
        self.wants_ready.notified().await
    }

    /// The coordinator refused `by`: held packets for it are answered with ICMP
    /// "administratively prohibited" (written to the TUN), and it is not asked for again for
    /// a while (see [`Core::refuse`]).
    pub fn refuse(&self, by: PeerRef) {
        let mut out = Outbox::new();
        self.core.refuse(by, Instant::now(), &mut out);
        if let Some(driver) = &self.driver {
            driver.send(&out);
        }
    }

    /// Peer `device_id` is probing this device now (a punch forwarded by the coordinator):
    /// burst keepalives to its candidates and `endpoints` at once.
    pub fn punch(&self, device_id: u64, endpoints: &[SocketAddr]) {
        let mut out = Outbox::new();
        self.core
            .punch(device_id, endpoints, Instant::now(), &mut out);
        if let Some(driver) = &self.driver {
            driver.send(&out);
        }
    }

    /// This device's interface addresses changed: every peer's direct candidates are probed
    /// again, with punch requests.
    pub fn network_changed(&self) {
        self.core.network_changed(Instant::now());
    }

    /// Packets dropped for not fitting their path, ICMP too-big sent, refused sends by reason.
    pub fn path_counters(&self) -> PathMtuCounters {
        self.core.path_mtus().counters()
    }

    /// Sends an address-discovery datagram from the tunnels' UDP socket (so the NAT mapping a
    /// relay reports is the one peers reach).
    pub fn send_discovery(&self, dst: SocketAddr, datagram: &[u8]) {
        let mut out = Outbox::new();
        out.push(dst, datagram);
        if let Some(driver) = &self.driver {
            driver.send(&out);
            self.discovery.sent();
        }
    }

    /// Binding responses received since the last call (bounded; see [`discovery`]).
    pub fn take_discovery(&self) -> Vec<(SocketAddr, BindingResponse)> {
        self.discovery.take()
    }

    /// Resolves when a binding response may be waiting in [`DataPlane::take_discovery`].
    pub async fn discovery_ready(&self) {
        self.discovery.ready.notified().await
    }

    pub fn discovery_counters(&self) -> DiscoveryCounters {
        self.discovery.counters()
    }

    /// Stops the threads and removes the TUN with its addresses and routes.
    pub async fn shutdown(mut self) {
        if let Some(driver) = self.driver.take() {
            let res = tokio::task::spawn_blocking(move || driver.shutdown()).await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "data plane shutdown task failed");
            }
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        if let Some(driver) = &self.driver {
            driver.signal_stop();
        }
    }
}

/// The x25519 public key for a private key.
pub fn public_key_for(private_key: &[u8; 32]) -> [u8; 32] {
    let secret = boringtun::x25519::StaticSecret::from(*private_key);
    boringtun::x25519::PublicKey::from(&secret).to_bytes()
}
