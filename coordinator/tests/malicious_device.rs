//! A malicious enrolled device, at the registry (I/O-free, as the server drives it): whatever
//! sequence of device messages it sends (updates with any fields, lease requests for other
//! devices' keys with missing, forged or valid proofs, denied-flow reports accusing its peers,
//! posture reports claiming to be other devices, reconnects), after every step every other
//! device's netmap (peers, their keys and leases, its inbound filter and reach), its posture
//! verdict and its quarantine state are exactly what they are in a run where the attacker
//! stays silent; and no device's key is ever shown under another device.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use ward_coordinator::leases;
use ward_coordinator::model::{Device, Quarantine};
use ward_coordinator::registry::{ConnId, Output, Registry};
use ward_shared::addr::AddressPools;
use ward_shared::filter::Proto;
use ward_shared::keyproof::{self, KeyProof};
use ward_shared::lease::{Lease, SignedLease};
use ward_shared::names::{Hostname, Name};
use ward_shared::policy;
use ward_shared::posture::PostureReport;
use ward_shared::wire::{
    CoordinatorMsg, DeniedFlow, DeviceId, DeviceUpdate, Netmap, PostureVerdict, WgPublicKey,
};

const T0: i64 = 1_800_000_000_000;
const ATTACKER: u64 = 1;
const VICTIMS: [u64; 3] = [2, 3, 4];

const POLICY: &str = r#"
[groups]
staff = ["alice", "bob"]
[posture.fw]
firewall = true
[services.web]
devices = ["tag:server"]
ports = ["tcp/80", "tcp/443"]
[services.ssh]
devices = ["group:staff"]
ports = ["tcp/22"]
[services.patch]
devices = ["tag:server"]
ports = ["tcp/8443"]
remediation = true
[[rules]]
from = ["group:staff", "mallory"]
to = ["web", "patch"]
[[rules]]
from = ["mallory", "bob"]
to = ["ssh"]
[[rules]]
from = ["alice"]
to = ["ssh"]
posture = ["fw"]
[trust]
scan_denied_flows = 3
scan_window = "60s"
risky_lease_ttl = "1m"
"#;

fn device(id: u64) -> Device {
    let (user, tags) = match id {
        1 => (Some("mallory"), vec![]),
        2 => (Some("alice"), vec![]),
        3 => (Some("bob"), vec![]),
        _ => (None, vec![Name::parse("tag", "server").unwrap()]),
    };
    Device::active(
        DeviceId(id),
        Hostname::parse(&format!("h{id}")).unwrap(),
        user.map(String::from),
        tags,
        Ipv4Addr::new(100, 64, 0, id as u8),
        format!("fd00::{id}").parse().unwrap(),
    )
}

/// Device `id`'s WireGuard private key at setup.
fn private_of(id: u64) -> [u8; 32] {
    [id as u8 + 100; 32]
}

fn public_of(id: u64) -> WgPublicKey {
    keyproof::public_for(&private_of(id))
}

/// What the attacker does in one step.
#[derive(Debug, Clone)]
enum Step {
    Wait(i64),
    Update {
        key_of: Option<u64>,
        port: u16,
        endpoint: Option<(u8, u16)>,
        relay: Option<bool>,
    },
    /// A lease on victim `key_of`'s key (or a fresh key of its own when `None`), with a proof
    /// that is missing (0), made with its own private key for that public key (1), or valid
    /// for its own fresh key (2).
    LeaseRequest {
        key_of: Option<u64>,
        fresh: u8,
        proof: u8,
    },
    LeaseActive {
        serial: u64,
    },
    DeniedFlows {
        flows: Vec<(u64, bool, u16)>,
    },
    Posture {
        claim: u64,
        seq: u64,
        ahead_ms: i64,
        firewall: bool,
    },
    Reconnect,
}

fn step() -> impl Strategy<Value = Step> {
    let who = prop_oneof![Just(1u64), Just(2), Just(3), Just(4), Just(9)];
    prop_oneof![
        (1i64..20_000).prop_map(Step::Wait),
        (
            proptest::option::of(who.clone()),
            any::<u16>(),
            proptest::option::of((any::<u8>(), any::<u16>())),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(key_of, port, endpoint, relay)| Step::Update {
                key_of,
                port,
                endpoint,
                relay
            }),
        (proptest::option::of(who.clone()), any::<u8>(), 0u8..3).prop_map(
            |(key_of, fresh, proof)| Step::LeaseRequest {
                key_of,
                fresh,
                proof
            }
        ),
        (0u64..20).prop_map(|serial| Step::LeaseActive { serial }),
        proptest::collection::vec((who.clone(), any::<bool>(), any::<u16>()), 0..40)
            .prop_map(|flows| Step::DeniedFlows { flows }),
        (who, 0u64..5, -5_000i64..5_000, any::<bool>()).prop_map(
            |(claim, seq, ahead_ms, firewall)| Step::Posture {
                claim,
                seq,
                ahead_ms,
                firewall
            }
        ),
        Just(Step::Reconnect),
    ]
}

fn report(claim: u64, seq: u64, at: i64, firewall: bool) -> PostureReport {
    serde_json::from_value(serde_json::json!({
        "device_id": claim, "seq": seq, "collected_at_ms": at,
        "os": {"at_ms": at, "reading": {"value": {"id": "debian", "version": "12", "pretty": "Debian 12"}}},
        "kernel": {"at_ms": at, "reading": {"value": "6.1"}}, "ward_version": "0.1.0",
        "firewall": {"at_ms": at, "reading": {"value": firewall}},
        "disk_encryption": {"at_ms": at, "reading": {"value": true}},
        "screen_lock": {"at_ms": at, "reading": {"value": null}},
        "last_package_update_ms": {"at_ms": at, "reading": {"value": at}}
    }))
    .unwrap()
}

/// One coordinator (registry plus what the server does around it), and what each session
/// was last told.
struct World {
    reg: Registry,
    signer: SigningKey,
    now: i64,
    serial: u64,
    conn_of: BTreeMap<u64, ConnId>,
    next_conn: ConnId,
    devices: BTreeMap<u64, Device>,
    netmaps: BTreeMap<ConnId, Netmap>,
    verdicts: BTreeMap<ConnId, PostureVerdict>,
    quarantined: Vec<DeviceId>,
}

impl World {
    fn new() -> World {
        let signer = SigningKey::from_bytes(&[42; 32]);
        let devices: BTreeMap<u64, Device> = (1..=4).map(|i| (i, device(i))).collect();
        let leases: Vec<SignedLease> = (1..=4u64)
            .map(|i| sign(&signer, &devices[&i], public_of(i), i, T0))
            .collect();
        let reg = Registry::new(
            AddressPools::from_random([0; 5]),
            devices.values().cloned(),
            [],
            Some(policy::parse(POLICY.as_bytes(), "p.toml").unwrap()),
            vec![],
            leases,
            T0,
        );
        let mut w = World {
            reg,
            signer,
            now: T0,
            serial: 4,
            conn_of: BTreeMap::new(),
            next_conn: 100,
            devices,
            netmaps: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            quarantined: vec![],
        };
        for id in 1..=4 {
            w.open(id);
        }
        w
    }

    fn open(&mut self, id: u64) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conn_of.insert(id, conn);
        let observed: SocketAddr = format!("192.0.2.{id}:4000").parse().unwrap();
        self.reg
            .handle_session_opened(
                DeviceId(id),
                conn,
                observed,
                DeviceUpdate {
                    wg_public_key: Some(public_of(id)),
                    wg_port: 51820,
                    ..Default::default()
                },
            )
            .unwrap();
        self.flush();
    }

    /// Drains the registry's outputs as the server's actor does: sends recorded per
    /// connection, quarantines stored and fed back.
    fn flush(&mut self) {
        while let Some(o) = self.reg.poll_output() {
            match o {
                Output::Send { conn, msg } => match msg {
                    CoordinatorMsg::Netmap(nm) => {
                        self.netmaps.insert(conn, nm);
                    }
                    CoordinatorMsg::NetmapDelta(d) => {
                        if let Some(nm) = self.netmaps.get_mut(&conn) {
                            nm.apply(&d).unwrap();
                        }
                    }
                    CoordinatorMsg::PostureVerdict(v) => {
                        self.verdicts.insert(conn, v);
                    }
                    _ => {}
                },
                Output::Quarantine { device, reason } => {
                    self.quarantined.push(device);
                    let mut d = self.devices[&device.0].clone();
                    d.quarantine = Some(Quarantine {
                        since_ms: self.now,
                        reason,
                        automatic: true,
                    });
                    self.devices.insert(device.0, d.clone());
                    self.reg.handle_device_upserted(d);
                }
                Output::Close { .. }
                | Output::PostureChanged { .. }
                | Output::Anomaly(_)
                | Output::RiskCrossed { .. }
                | Output::DeviceRevoked { .. }
                | Output::RoutesAdvertised { .. }
                | Output::TrustDecided { .. }
                | Output::HomeRelay { .. }
                | Output::ScanEvidence { .. } => {}
            }
        }
    }

    fn wait(&mut self, ms: i64) {
        self.now += ms;
        self.reg.handle_time(self.now);
        self.flush();
    }

    /// The attacker's step, handled as the server handles that message.
    fn attack(&mut self, s: &Step) {
        let a = DeviceId(ATTACKER);
        let conn = self.conn_of[&ATTACKER];
        match s.clone() {
            Step::Wait(ms) => return self.wait(ms),
            Step::Update {
                key_of,
                port,
                endpoint,
                relay,
            } => {
                // Fields added to updates later start at their defaults.
                #[allow(clippy::needless_update)]
                let u = DeviceUpdate {
                    wg_public_key: key_of.map(public_of),
                    wg_port: port,
                    local_endpoints: endpoint
                        .map(|(h, p)| {
                            vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, h)), p)]
                        })
                        .unwrap_or_default(),
                    home_relay: relay.map(|r| if r { "r1".into() } else { "nope".into() }),
                    ..Default::default()
                };
                self.reg.handle_session_update(a, conn, u);
            }
            Step::LeaseRequest {
                key_of,
                fresh,
                proof,
            } => {
                let own_private = [fresh; 32];
                let key = key_of
                    .map(public_of)
                    .unwrap_or_else(|| keyproof::public_for(&own_private));
                let proof: Option<KeyProof> = match proof {
                    0 => None,
                    1 => keyproof::prove(&own_private, &self.signer.verifying_key(), a, &key),
                    _ => {
                        let own = keyproof::public_for(&own_private);
                        keyproof::prove(&own_private, &self.signer.verifying_key(), a, &own)
                    }
                };
                if self.reg.check_lease_request(a, &key).is_ok()
                    && leases::check_proof(&self.signer, a, &key, proof.as_ref()).is_ok()
                {
                    self.serial += 1;
                    let l = sign(
                        &self.signer,
                        &self.devices[&ATTACKER],
                        key,
                        self.serial,
                        self.now,
                    );
                    self.reg.handle_lease(l);
                }
            }
            Step::LeaseActive { serial } => {
                // The store revokes only this device's own leases older than `serial`.
                self.reg
                    .handle_leases_revoked(a, &(1..serial).collect::<Vec<_>>());
            }
            Step::DeniedFlows { flows } => {
                let flows: Vec<DeniedFlow> = flows
                    .into_iter()
                    .map(|(src, udp, port)| DeniedFlow {
                        src: IpAddr::V4(Ipv4Addr::new(100, 64, 0, src as u8)),
                        proto: if udp { Proto::Udp } else { Proto::Tcp },
                        port,
                        count: 1,
                    })
                    .collect();
                self.reg.handle_denied_flows(a, &flows, self.now);
            }
            Step::Posture {
                claim,
                seq,
                ahead_ms,
                firewall,
            } => {
                let r = report(claim, seq, self.now + ahead_ms, firewall);
                let _ = self.reg.handle_posture(a, conn, r, self.now);
            }
            Step::Reconnect => {
                self.reg.handle_session_closed(a, conn);
                self.flush();
                return self.open(ATTACKER);
            }
        }
        self.flush();
    }

    /// What victim `v` holds, without anything about the attacker's own entry.
    fn view(&self, v: u64) -> (String, Option<PostureVerdict>) {
        let conn = self.conn_of[&v];
        let mut nm = self.netmaps[&conn].clone();
        nm.seq = 0;
        // Reach by reference (protocol 3): compare the flat form (named from the peers).
        nm.reach = nm.reach_view();
        nm.reach_grants.clear();
        nm.reach_services.clear();
        nm.peers.retain(|p| p.device_id != DeviceId(ATTACKER));
        // Set ids depend on the order populations appeared: compare the flat form.
        nm.inbound = ward_shared::peerset::expand(&nm.inbound, &nm.peer_sets, 1 << 16).into();
        nm.shadow_filter = nm
            .shadow_filter
            .map(|s| ward_shared::peerset::expand(&s, &nm.peer_sets, 1 << 16));
        std::sync::Arc::make_mut(&mut nm.peer_sets).clear();
        let a = device(ATTACKER);
        for r in std::sync::Arc::make_mut(&mut nm.inbound) {
            r.sources = r
                .sources
                .iter()
                .copied()
                .filter(|s| *s != IpAddr::V4(a.ipv4) && *s != IpAddr::V6(a.ipv6))
                .collect();
        }
        std::sync::Arc::make_mut(&mut nm.inbound).retain(|r| !r.sources.is_empty());
        nm.reach.retain(|r| r.device_id != DeviceId(ATTACKER));
        (format!("{nm:?}"), self.verdicts.get(&conn).cloned())
    }

    /// No victim's key is shown, in any netmap, under another device.
    fn keys_stay_with_their_owners(&self) -> Result<(), String> {
        for nm in self.netmaps.values() {
            for p in &nm.peers {
                for l in &p.leases {
                    for v in VICTIMS {
                        if l.lease.wg_public_key == public_of(v) && p.device_id != DeviceId(v) {
                            return Err(format!("d{v}'s key shown under {}", p.device_id));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn sign(signer: &SigningKey, d: &Device, key: WgPublicKey, serial: u64, now: i64) -> SignedLease {
    Lease {
        device_id: d.id,
        wg_public_key: key,
        ipv4: d.ipv4,
        ipv6: d.ipv6,
        not_before_ms: now,
        not_after_ms: now + 600_000,
        serial,
    }
    .sign(signer)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn a_malicious_device_never_changes_another_devices_state(
        steps in proptest::collection::vec(step(), 1..40)
    ) {
        let mut attacked = World::new();
        let mut silent = World::new();
        for (i, s) in steps.iter().enumerate() {
            attacked.attack(s);
            if let Step::Wait(ms) = s {
                silent.wait(*ms);
            }
            for v in VICTIMS {
                prop_assert_eq!(attacked.view(v), silent.view(v), "device {} after step {} ({:?})", v, i, s);
            }
            prop_assert!(
                attacked.quarantined.iter().all(|d| d.0 == ATTACKER),
                "quarantined {:?} after step {} ({:?})", attacked.quarantined, i, s
            );
            let keys = attacked.keys_stay_with_their_owners();
            prop_assert!(keys.is_ok(), "{:?} after step {} ({:?})", keys, i, s);
        }
    }
}
