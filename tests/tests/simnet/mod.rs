//! The whole-system simulation harness: the real device `Agent`s and data-plane `Core`s, the
//! real coordinator `Registry`, lease issuing (`ward_coordinator::leases::issue`) over a real
//! temporary `SqliteStore`, on a fake clock, over a lossless in-order simulated network.
//!
//! This file holds no protocol logic of its own: [`World::dispatch`] and [`World::route`] only
//! carry messages between the agents and the coordinator's cores, in the order the coordinator
//! server uses (a new lease reaches the registry, and its pushes reach the peers, before the
//! device is answered), and [`World::execute`] carries out agent events the way the daemon's
//! session loop does. Everything that decides anything is product code.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ward_client::agent::{Agent, AgentConfig, DataPlaneEvent, Event, Now, PrivateKey};
use ward_client::dataplane::engine::Destination;
use ward_client::dataplane::{Core, CoreConfig, Outbox};
use ward_coordinator::leases::{self, LeaseTtl};
use ward_coordinator::registry::{ConnId, Output, Registry};
use ward_coordinator::store::{EnrollSpec, SqliteStore, Store, TokenSpec};
use ward_shared::addr::AddressPools;
use ward_shared::names::{Hostname, Name};
use ward_shared::posture::{Measured, PostureReport};
use ward_shared::wire::{CoordinatorMsg, DeviceId, DeviceMsg, DeviceUpdate};

pub const T0: i64 = 1_800_000_000_000;
pub const STEP_MS: i64 = 100;

/// The seed of this run: `WARD_SIM_SEED` or `default`. Printed so that a failing run (whose
/// output is shown) can be replayed.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("WARD_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("simulation seed: WARD_SIM_SEED={seed}");
    seed
}

pub struct Dev {
    pub id: DeviceId,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub endpoint: SocketAddr,
    pub agent: Agent,
    pub core: Core,
    /// The simulated host firewall, as the posture collector would read it.
    pub firewall: bool,
    pub disconnects: usize,
    /// The peer set as the data plane was told it, built from the agent's events alone.
    pub told: ward_client::agent::PeerMap,
}

/// Devices to enroll: (hostname, user, tags).
pub struct Spec<'a> {
    pub devices: Vec<(&'a str, Option<&'a str>, Vec<&'a str>)>,
    pub policy: &'a str,
    pub lease_ttl_ms: i64,
    pub seed: u64,
    /// Devices that may talk with more peers than this are sent only the peers they hold
    /// (`serve --peers-on-demand-above`).
    pub on_demand_above: usize,
}

pub struct World {
    pub t: i64,
    base: Instant,
    _dir: tempfile::TempDir,
    pub store: SqliteStore,
    pub reg: Registry,
    signer: SigningKey,
    ttl: LeaseTtl,
    pub devs: Vec<Dev>,
    pub rng: StdRng,
    pub by_endpoint: BTreeMap<SocketAddr, usize>,
    /// Datagrams in flight: (from, to, bytes).
    pub net: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Key switches checked against the peers' configuration.
    pub switches: usize,
    /// Leases revoked after rotations.
    pub revoked: usize,
    /// Posture reports the registry accepted / refused.
    pub reports: (usize, usize),
    /// Packets each data plane wrote back to its TUN (ICMP errors), oldest first.
    pub to_tun: Vec<Vec<Vec<u8>>>,
}

impl World {
    pub fn new(spec: Spec<'_>) -> World {
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("sim.db")).unwrap();
        let pools = AddressPools::from_random(rng.gen());
        let name = |s: &str| Name::parse("name", s).unwrap();
        let mut users = BTreeSet::new();
        for (_, user, _) in &spec.devices {
            if let Some(u) = user {
                if users.insert(*u) {
                    store.add_user(&name(u), &[], "sim", T0).unwrap();
                }
            }
        }
        // Enrolled through the store's own token and enrollment path.
        let mut enrolled = Vec::new();
        for (i, (host, user, tags)) in spec.devices.iter().enumerate() {
            let secret: [u8; 16] = rng.gen();
            let token = format!("tok{i}");
            let tags: Vec<Name> = tags.iter().map(|t| name(t)).collect();
            store
                .create_token(
                    TokenSpec {
                        id: &token,
                        secret_hash: ward_shared::token::hash_secret(&secret),
                        user: user.map(name).as_ref(),
                        tags: &tags,
                        expires_ms: T0 + 3_600_000,
                        uses: 1,
                        hostname: None,
                    },
                    "sim",
                    T0,
                )
                .unwrap();
            let (dev, _) = store
                .enroll(
                    EnrollSpec {
                        token_id: &token,
                        token_secret: &secret,
                        hostname: Hostname::parse(host).unwrap(),
                        os: "sim".into(),
                        identity_hash: rng.gen(),
                    },
                    &pools,
                    &mut |_| Ok((vec![], T0 + 365 * 86_400_000)),
                    T0,
                )
                .unwrap();
            enrolled.push(dev);
        }
        let policy = ward_shared::policy::parse(spec.policy.as_bytes(), "sim.toml").unwrap();
        let mut reg = Registry::new(
            pools,
            store.list_devices().unwrap(),
            store.list_users().unwrap(),
            Some(policy),
            vec![],
            vec![],
            T0,
        );
        reg.set_peers_on_demand_above(spec.on_demand_above);
        let signer = SigningKey::from_bytes(&rng.gen());
        let base = Instant::now();
        let devs: Vec<Dev> = enrolled
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let key: [u8; 32] = rng.gen();
                let agent = Agent::new(
                    AgentConfig {
                        routes: Default::default(),
                        device_id: d.id,
                        ipv4: d.ipv4,
                        ipv6: d.ipv6,
                        lease_key: Some(signer.verifying_key()),
                        private_key: PrivateKey(key),
                        cert_not_after_ms: T0 + 365 * 86_400_000,
                        posture_interval: Duration::from_secs(30),
                        os: "sim".into(),
                        version: "sim".into(),
                        seed: rng.gen(),
                        protocol: ward_shared::wire::PROTOCOL_VERSION,
                    },
                    Now {
                        instant: base,
                        unix_ms: T0,
                    },
                );
                Dev {
                    id: d.id,
                    name: d.hostname.to_string(),
                    ipv4: d.ipv4,
                    endpoint: format!("10.0.0.{}:51820", i + 1).parse().unwrap(),
                    agent,
                    core: Core::new(
                        CoreConfig {
                            private_key: key,
                            persistent_keepalive: None,
                            v6_prefix: Some(pools.v6_prefix),
                        },
                        rng.gen(),
                    ),
                    firewall: true,
                    disconnects: 0,
                    told: Default::default(),
                }
            })
            .collect();
        let by_endpoint = devs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.endpoint, i))
            .collect();
        let mut w = World {
            t: T0,
            base,
            _dir: dir,
            store,
            reg,
            signer,
            ttl: LeaseTtl {
                default_ms: spec.lease_ttl_ms,
                per_tag_ms: BTreeMap::new(),
                max_ms: spec.lease_ttl_ms,
            },
            devs,
            rng,
            by_endpoint,
            net: VecDeque::new(),
            switches: 0,
            revoked: 0,
            reports: (0, 0),
            to_tun: Vec::new(),
        };
        w.to_tun = vec![Vec::new(); w.devs.len()];
        w.pump();
        w
    }

    pub fn now(&self) -> Now {
        Now {
            instant: self.at(self.t),
            unix_ms: self.t,
        }
    }

    pub fn at(&self, t: i64) -> Instant {
        self.base + Duration::from_millis((t - T0) as u64)
    }

    /// One step of the fake clock: the registry's and the agents' timers, then every message
    /// they cause, then the data planes' timers.
    pub fn step(&mut self) {
        self.t += STEP_MS;
        self.reg.handle_time(self.t);
        let now = self.now();
        for d in &mut self.devs {
            let on_old = d.core.peers_on_old_key();
            d.agent
                .handle_dataplane_event(DataPlaneEvent::PeersOnOldKey(on_old), now);
            if d.agent.poll_timeout() <= now.instant {
                d.agent.handle_tick(now);
            }
        }
        self.pump();
        for i in 0..self.devs.len() {
            let mut out = Outbox::new();
            self.devs[i].core.handle_timers(now.instant, &mut out);
            self.emit(i, &out);
        }
    }

    /// Carries every queued event and message until all cores are quiet.
    pub fn pump(&mut self) {
        loop {
            let mut busy = false;
            for i in 0..self.devs.len() {
                while let Some(ev) = self.devs[i].agent.poll_event() {
                    busy = true;
                    self.execute(i, ev);
                }
                // Invariant: the peer events, applied in order, add up to the agent's set.
                let told: Vec<_> = self.devs[i].told.values().flatten().cloned().collect();
                assert_eq!(
                    told,
                    self.devs[i].agent.configured_peers(),
                    "t={} {}: the peer events do not add up to the configured set",
                    self.t - T0,
                    self.devs[i].name
                );
                // Peers the data plane asked for (on demand), as the session loop takes them.
                let wants = self.devs[i].core.take_wants(self.at(self.t));
                if !wants.is_empty() {
                    busy = true;
                    let now = self.now();
                    self.devs[i]
                        .agent
                        .handle_dataplane_event(DataPlaneEvent::PeersWanted(wants), now);
                }
                while let Some(m) = self.devs[i].agent.poll_transmit() {
                    busy = true;
                    self.dispatch(i, m);
                }
            }
            while let Some(o) = self.reg.poll_output() {
                busy = true;
                self.route(o);
            }
            if !busy {
                return;
            }
        }
    }

    /// The keys every device may hold, from the store: (device, public key) of each lease that
    /// is neither revoked nor expired.
    pub fn valid_keys(&self) -> BTreeSet<(u64, [u8; 32])> {
        self.store
            .active_leases(self.t)
            .unwrap()
            .into_iter()
            .map(|l| (l.device_id.0, l.wg_public_key.0))
            .collect()
    }

    /// Invariant: every key configured in any data plane holds a valid, unrevoked lease.
    pub fn check_only_leased_keys(&self) {
        let valid = self.valid_keys();
        for d in &self.devs {
            for p in d.agent.configured_peers() {
                assert!(
                    valid.contains(&(p.device_id, p.public_key)),
                    "t={} {} has a key of device {} configured without a valid lease",
                    self.t - T0,
                    d.name,
                    p.device_id
                );
            }
        }
    }

    /// Puts a packet from device `i`'s TUN into its data plane.
    pub fn send(&mut self, i: usize, packet: &[u8]) {
        let mut out = Outbox::new();
        let now = self.at(self.t);
        self.devs[i].core.handle_tun_packet(packet, now, &mut out);
        self.emit(i, &out);
    }

    /// Hands one datagram to device `j`'s data plane; the plaintext if it was delivered.
    pub fn receive(&mut self, j: usize, from: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        let mut out = Outbox::new();
        let mut buf = vec![0u8; 65536];
        let now = self.at(self.t);
        let t = self.t;
        let n = self.devs[j]
            .core
            .handle_datagram(from, data, now, t, &mut buf, &mut out);
        self.emit(j, &out);
        n.map(|n| buf[..n].to_vec())
    }

    fn emit(&mut self, i: usize, out: &Outbox) {
        self.to_tun[i].extend(out.tun_packets().iter().cloned());
        let from = self.devs[i].endpoint;
        for (to, data) in out.iter() {
            // No relays in this network: every peer is homed on none.
            let Destination::Udp(to) = to else { continue };
            self.net.push_back((from, to, data.to_vec()));
        }
    }

    fn update(&self, i: usize) -> DeviceUpdate {
        let d = &self.devs[i];
        DeviceUpdate {
            advertise_exit_node: Default::default(),
            advertise_routes: Default::default(),
            wg_public_key: Some(d.agent.public_key()),
            wg_port: d.endpoint.port(),
            local_endpoints: vec![d.endpoint],
            home_relay: None,
            // No NATs nor relays here: punching is shown by the data plane's pair tests.
            punch: false,
        }
    }

    /// Carries out one agent event, as the daemon's session loop does.
    fn execute(&mut self, i: usize, ev: Event) {
        let now = self.now();
        match ev {
            Event::Connect => {
                let u = self.update(i);
                self.devs[i].agent.handle_connected(u, now);
            }
            Event::CloseSession => {
                let id = self.devs[i].id;
                self.reg.handle_session_closed(id, i as ConnId);
            }
            Event::Connected { .. } => {}
            Event::Disconnected { .. } => self.devs[i].disconnects += 1,
            Event::SetPeers(peers) => {
                let told = &mut self.devs[i].told;
                told.clear();
                for p in &peers {
                    told.entry(p.device_id).or_default().push(p.clone());
                }
                let mut out = Outbox::new();
                self.devs[i].core.set_peers(peers, now.instant, &mut out);
                self.emit(i, &out);
            }
            Event::UpdatePeers(changes) => {
                let told = &mut self.devs[i].told;
                for (id, configs) in changes {
                    if configs.is_empty() {
                        told.remove(&id);
                    } else {
                        told.insert(id, configs);
                    }
                }
                let whole: Vec<_> = told.values().flatten().cloned().collect();
                let mut out = Outbox::new();
                self.devs[i].core.set_peers(whole, now.instant, &mut out);
                self.emit(i, &out);
            }
            Event::SetFilter { rules, sets } => self.devs[i]
                .core
                .set_filter_with_sets(rules.to_vec(), &sets),
            Event::SetShadowFilter(rules) => self.devs[i].core.set_shadow_filter(rules),
            Event::SetOnDemand(on) => self.devs[i].core.set_on_demand(on),
            // No resolvers in the simulation: names are never asked for.
            Event::RefuseName(_) => {}
            Event::RefusePeer(by) => {
                let mut out = Outbox::new();
                self.devs[i].core.refuse(by, now.instant, &mut out);
                self.emit(i, &out);
            }
            Event::SetRoutes { served, .. } => self.devs[i].core.set_routes(served),
            Event::SetClockOffset(o) => self.devs[i].core.set_clock_offset_ms(o),
            Event::SwitchKey { key, .. } => {
                // Invariant: a device never switches before every peer that has it configured
                // holds its new key.
                let (id, new) = (self.devs[i].id.0, key.public().0);
                for d in &self.devs {
                    let mine: Vec<[u8; 32]> = d
                        .agent
                        .configured_peers()
                        .iter()
                        .filter(|p| p.device_id == id)
                        .map(|p| p.public_key)
                        .collect();
                    assert!(
                        mine.is_empty() || mine.contains(&new),
                        "t={} {} switched keys before {} held its new key",
                        self.t - T0,
                        self.devs[i].name,
                        d.name
                    );
                }
                self.switches += 1;
                let mut out = Outbox::new();
                self.devs[i].core.rotate_key(key.0, now.instant, &mut out);
                self.emit(i, &out);
            }
            Event::SaveCert { .. }
            | Event::NeedCsr
            | Event::SelfName(_)
            | Event::SaveCoordinators { .. } => {}
            Event::ResolveRelay(_) | Event::SendDiscovery { .. } => {}
            // No relays in the simulation (yet): nothing to connect.
            Event::Relay(_) | Event::SetRelays(_) => {}
            Event::Punch { peer, endpoints } => {
                let mut out = Outbox::new();
                self.devs[i]
                    .core
                    .punch(peer, &endpoints, now.instant, &mut out);
                self.emit(i, &out);
            }
            Event::NetworkChanged => self.devs[i].core.network_changed(now.instant),
            Event::NeedKey => {
                let k = PrivateKey(self.rng.gen());
                self.devs[i].agent.provide_key(k);
            }
            Event::NeedUpdate => {
                let u = self.update(i);
                self.devs[i].agent.handle_local_update(u);
            }
            Event::TakeFlowSamples => {
                let (samples, dropped) = self.devs[i].core.take_flow_samples();
                self.devs[i]
                    .agent
                    .handle_dataplane_event(DataPlaneEvent::FlowSamples { samples, dropped }, now);
            }
            Event::TakeDeniedFlows => {
                let flows = self.devs[i].core.take_denied_flows();
                if !flows.is_empty() {
                    self.devs[i]
                        .agent
                        .handle_dataplane_event(DataPlaneEvent::DeniedFlows(flows), now);
                }
            }
            Event::CollectPosture {
                seq,
                clock_offset_ms,
                ..
            } => {
                let at = self.t + clock_offset_ms;
                let mut r = PostureReport::unknown(self.devs[i].id, seq, at);
                r.firewall = Measured::value(at, self.devs[i].firewall);
                self.devs[i].agent.handle_posture(r, now);
            }
        }
    }

    /// Routes one device message to the coordinator's cores (dispatch only, in the server's
    /// order).
    fn dispatch(&mut self, i: usize, msg: DeviceMsg) {
        let (id, conn, t) = (self.devs[i].id, i as ConnId, self.t);
        let now = self.now();
        match msg {
            DeviceMsg::Hello(h) => {
                let ep = self.devs[i].endpoint;
                if let Err(code) = self.reg.handle_session_opened_holding(
                    id,
                    conn,
                    ep,
                    h.update,
                    h.protocol,
                    h.held_peers,
                ) {
                    let m = CoordinatorMsg::Error {
                        code,
                        message: "refused".into(),
                    };
                    self.devs[i].agent.handle_coordinator_msg(m, now);
                }
            }
            DeviceMsg::PunchRequest { peer } => {
                // Refusals are silent, as in the server.
                let _ = self.reg.handle_punch_request(id, conn, peer, t);
                while let Some(o) = self.reg.poll_output() {
                    self.route(o);
                }
            }
            DeviceMsg::WantPeer { by } => {
                // Refusals go back as `peer_refused`; a dropped want is asked again.
                let _ = self.reg.handle_want_peer(id, conn, by, t);
                while let Some(o) = self.reg.poll_output() {
                    self.route(o);
                }
            }
            DeviceMsg::Ping { nonce } => {
                let m = CoordinatorMsg::Pong {
                    nonce,
                    coordinator_time_ms: t,
                };
                self.devs[i].agent.handle_coordinator_msg(m, now);
            }
            DeviceMsg::LeaseRequest {
                wg_public_key,
                proof,
            } => {
                let risky = self.reg.risky_lease_ttl_ms(id);
                let issued = match self.reg.check_lease_request(id, &wg_public_key) {
                    Ok(()) => leases::issue(
                        &self.store,
                        &self.signer,
                        &self.ttl,
                        risky,
                        id,
                        wg_public_key,
                        proof.as_ref(),
                        self.reg.current_lease(id, &wg_public_key).as_ref(),
                        t,
                    ),
                    Err(e) => Err((e.code(), e.to_string())),
                };
                let m = match issued {
                    Ok(lease) => {
                        // Peers learn the new key before the device hears about its lease.
                        self.reg.handle_lease(lease.clone());
                        while let Some(o) = self.reg.poll_output() {
                            self.route(o);
                        }
                        CoordinatorMsg::Lease { lease }
                    }
                    Err((code, message)) => CoordinatorMsg::Error { code, message },
                };
                self.devs[i].agent.handle_coordinator_msg(m, now);
            }
            DeviceMsg::LeaseActive { serial } => {
                let serials = self
                    .store
                    .revoke_leases(id, Some(serial), "rotated", t)
                    .unwrap();
                self.revoked += serials.len();
                if !serials.is_empty() {
                    self.reg.handle_leases_revoked(id, &serials);
                }
            }
            DeviceMsg::Posture(report) => match self.reg.handle_posture(id, conn, *report, t) {
                Ok(()) => self.reports.0 += 1,
                Err(_) => self.reports.1 += 1,
            },
            DeviceMsg::DeniedFlows { flows } => self.reg.handle_denied_flows(id, &flows, t),
            DeviceMsg::Update(u) => self.reg.handle_session_update(id, conn, u),
            DeviceMsg::RenewCert { .. }
            | DeviceMsg::Enroll(_)
            | DeviceMsg::LoginStart(_)
            | DeviceMsg::LoginCallback(_)
            | DeviceMsg::SignInStart(_)
            | DeviceMsg::RelayTicketRequest
            | DeviceMsg::Flows(_) => {}
        }
    }

    /// Delivers one registry output to the device it is for.
    fn route(&mut self, o: Output) {
        let now = self.now();
        match o {
            Output::Send { conn, msg } => {
                self.devs[conn as usize]
                    .agent
                    .handle_coordinator_msg(msg, now);
            }
            Output::Close { conn, code, reason } => {
                let m = CoordinatorMsg::Error {
                    code,
                    message: reason,
                };
                self.devs[conn as usize]
                    .agent
                    .handle_coordinator_msg(m, now);
            }
            // No relays in this network: revocations for relays have no one to reach.
            Output::PostureChanged { .. }
            | Output::Quarantine { .. }
            | Output::Anomaly(_)
            | Output::RiskCrossed { .. }
            | Output::DeviceRevoked { .. }
            | Output::RoutesAdvertised { .. }
            | Output::TrustDecided { .. }
            | Output::HomeRelay { .. }
            | Output::ScanEvidence { .. } => {}
        }
    }

    pub fn index_of(&self, ep: SocketAddr) -> Option<usize> {
        self.by_endpoint.get(&ep).copied()
    }
}

/// An IPv4 packet of protocol `proto` (17 UDP, 6 TCP) from `sport` to `dport` with `payload`.
pub fn packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let l4 = if proto == 6 { 20 } else { 8 };
    let total = 20 + l4 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u16::from_be_bytes([p[i], p[i + 1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        p[32] = 0x50; // data offset 5 words
        p[33] = 0x02; // SYN
    } else {
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    }
    p[20 + l4..].copy_from_slice(payload);
    p
}
