//! Time to compile a policy change and produce every affected device's netmap delta, for 1 000
//! and 10 000 simulated devices with live sessions (the coordinator's I/O-free core, no network).
//!
//! `cargo run --release -p ward-coordinator --example netmap_bench [-- [--dense] [--v1] 1000 10000]`
//! (any sizes; `-- 200` is the quick mode `bench/smoke.sh` runs, done in seconds).
//! `--dense`: each team's rule admits 14 of the 20 teams (most devices reach every server).
//! `--v1`: the devices speak protocol 1 (flat source lists, no peer sets), for comparison.
//! `--protocol N`: the devices speak protocol N (2: peer sets, flat reach list; 3, the default:
//! reach by reference, grants over destination lists).
//! Every device holds a lease. Columns: the first netmaps of every session, a policy change (its
//! messages and bytes), one device's endpoints changing ("peer change": the deltas to the
//! sessions that have it as a peer), and one device's key rotating ("lease change": its new
//! lease, then the old one revoked, each reaching the sessions that have it as a peer: what
//! every rotation costs the coordinator's core).
//! `--load-shape`: the directory and policy of `bench/load.sh` instead (20 users, their
//! devices round robin, ten groups of 70% of the users, 50 rules over 26 services), whose
//! dense peer lists and shared source lists make the netmaps large.
//! `--on-demand K`: every session is on demand (protocol 4, `--peers-on-demand-above 0`) and,
//! after the first push, wants K peers its policy allows (pseudo-random; session 2 also wants
//! devices 1 and 4, which rotate and are revoked below); the "wants" column times them all.
//! With `--load-shape` every session also wants the devices quarantined and revoked below, as
//! the load tool's sessions do, so both reach every session.
//! "narrowed": from the quarantine to its narrowing deltas (every peer's filter without the
//! device, before the compile) made and encoded; "quarantine": to everything it changes.
//! The last column is the process's peak RSS after that size (VmHWM).

#[path = "../../bench/dense_policy.rs"]
mod dense;

use std::time::Instant;

/// The coordinator's allocator (`ward-coordinator`'s own), so the figures are its figures;
/// its one-arena-per-CPU option is left out: the bench runs the core on one thread.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use ward_coordinator::registry::{Output, Registry};
use ward_coordinator::store::{Device, User};
use ward_shared::addr::AddressPools;
use ward_shared::lease::Lease;
use ward_shared::names::{Hostname, Name};
use ward_shared::policy;
use ward_shared::wire::{DeviceId, DeviceUpdate, WgPublicKey};

/// 20 teams of users, each team's laptops reach their team's servers; ops reach every server.
fn policy_text(extra_port: bool, dense: bool) -> String {
    let mut s = String::from("[groups]\nops = [\"u0\"]\n");
    for t in 0..20 {
        // Members come from the directory (users' groups); the policy declares the names.
        s += &format!("team{t} = []\n");
    }
    for t in 0..20 {
        s += &format!("\n[services.team{t}]\ndevices = [\"tag:team{t}\"]\nports = [\"tcp/443\", \"tcp/5432\"{}]\n", if extra_port && t == 0 { ", \"tcp/8080\"" } else { "" });
        let from: Vec<String> = if dense {
            (0..14)
                .map(|k| format!("\"group:team{}\"", (t + k) % 20))
                .collect()
        } else {
            vec![format!("\"group:team{t}\"")]
        };
        s += &format!(
            "\n[[rules]]\nname = \"team{t}\"\nfrom = [{}]\nto = [\"team{t}\"]\n",
            from.join(", ")
        );
    }
    s += "\n[services.ssh]\ndevices = [\"tag:server\"]\nports = [\"tcp/22\"]\n\n[[rules]]\nname = \"ops-ssh\"\nfrom = [\"group:ops\"]\nto = [\"ssh\"]\n";
    s
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dense = args.iter().any(|a| a == "--dense");
    let load_shape = args.iter().any(|a| a == "--load-shape");
    let at = args.iter().position(|a| a == "--protocol");
    let od = args.iter().position(|a| a == "--on-demand");
    let on_demand: Option<usize> = od.map(|i| {
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--on-demand takes K")
    });
    let protocol = match at.and_then(|i| args.get(i + 1)) {
        Some(v) => v.parse().expect("--protocol takes a version number"),
        None if args.iter().any(|a| a == "--v1") => 1,
        None => ward_shared::wire::PROTOCOL_VERSION,
    };
    let sizes: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| at.is_none_or(|p| *i != p + 1) && od.is_none_or(|p| *i != p + 1))
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        sizes
    };
    let pools = AddressPools::from_random([1, 2, 3, 4, 5]);
    println!(
        "{:>8} {:>12} {:>12} {:>14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14} {:>10}   (protocol {protocol}{}{})",
        "devices",
        "first push",
        "wants",
        "policy change",
        "peer change",
        "lease change",
        "narrowed",
        "quarantine",
        "revoke",
        "messages",
        "bytes",
        "netmap mean B",
        "netmap max B",
        "peak RSS",
        match on_demand {
            Some(k) => format!(", on demand, {k} wants a session"),
            None => String::new(),
        },
        if load_shape {
            ", load shape"
        } else if dense {
            ", dense"
        } else {
            ""
        }
    );
    for &n in &sizes {
        // One in ten devices is a server; users own the rest, two laptops each.
        let mut devices = Vec::new();
        let mut users = Vec::new();
        let load_users: Vec<String> = (0..20).map(|u| format!("u{u:03}")).collect();
        for i in 0..n {
            let (v4, v6) = pools.addresses(i as u64 + 1).expect("pool");
            if load_shape {
                let user = load_users[i % load_users.len()].clone();
                if users.len() < load_users.len() {
                    users.push(User {
                        name: user.clone(),
                        groups: vec![],
                        disabled: false,
                        created_ms: 0,
                    });
                }
                devices.push(device(i, Some(user), vec![], v4, v6));
                continue;
            }
            let server = i % 10 == 0;
            let team = if server { (i / 10) % 20 } else { (i / 2) % 20 };
            let user = (!server).then(|| format!("u{}", i / 2));
            if let Some(u) = &user {
                if i % 2 == 1 || users.iter().all(|x: &User| &x.name != u) {
                    users.push(User {
                        name: u.clone(),
                        groups: vec![Name::parse("group", &format!("team{team}")).expect("group")],
                        disabled: false,
                        created_ms: 0,
                    });
                }
            }
            let tags = if server {
                vec![
                    Name::parse("tag", &format!("team{team}")).expect("tag"),
                    Name::parse("tag", "server").expect("tag"),
                ]
            } else {
                vec![]
            };
            devices.push(device(i, user, tags, v4, v6));
        }
        users.dedup_by(|a, b| a.name == b.name);
        let text = |version: u32| {
            if load_shape {
                dense::dense_policy(&load_users, 50, 70, version)
            } else {
                policy_text(version == 2, dense)
            }
        };
        let p1 = policy::parse(text(1).as_bytes(), "bench.toml").expect("policy");
        let p2 = policy::parse(text(2).as_bytes(), "bench.toml").expect("policy");
        let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let lease = |d: &Device, serial: u64| {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&serial.to_le_bytes());
            Lease {
                device_id: d.id,
                wg_public_key: WgPublicKey(key),
                ipv4: d.ipv4,
                ipv6: d.ipv6,
                not_before_ms: 0,
                not_after_ms: 600_000,
                serial,
            }
            .sign(&signer)
        };
        let leases: Vec<_> = devices.iter().map(|d| lease(d, d.id.0)).collect();
        let rotating = devices[0].clone();
        let (quarantined, revoked) = (devices[2].clone(), devices[3].id);
        let mut reg = Registry::new(pools, devices, users, Some(p1), vec![], leases, 0);
        reg.set_peers_on_demand_above(if on_demand.is_some() { 0 } else { usize::MAX });
        for i in 0..n {
            let addr = format!(
                "10.{}.{}.{}:51820",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            )
            .parse()
            .expect("addr");
            reg.handle_session_opened_speaking(
                DeviceId(i as u64 + 1),
                i as u64,
                addr,
                DeviceUpdate::default(),
                protocol,
            )
            .expect("session");
        }
        let t0 = Instant::now();
        // Besides its netmap, a new session gets other messages (posture requests, verdicts).
        let (mut netmaps, mut first_peers) = (0usize, 0usize);
        // Encoding is what a session does before sending; timed apart from the core (and
        // done at once, so that 10 000 dense netmaps are never all held).
        let mut sizes: Vec<usize> = Vec::new();
        let mut encoding = std::time::Duration::ZERO;
        while let Some(o) = reg.poll_output() {
            if let Output::Send { msg, .. } = o {
                if let ward_shared::wire::CoordinatorMsg::Netmap(nm) = &msg {
                    netmaps += 1;
                    first_peers += nm.peers.len();
                    let te = Instant::now();
                    sizes.push(ward_shared::wire::encode(&msg).len());
                    encoding += te.elapsed();
                    if netmaps == 1 {
                        // Where a first netmap's bytes go, field by field.
                        let part = |v: serde_json::Result<String>| v.map_or(0, |s| s.len());
                        eprintln!(
                            "first netmap: inbound {} B, peer_sets {} B, reach_grants {} B, reach_services {} B, peers {} B",
                            part(serde_json::to_string(&nm.inbound)),
                            part(serde_json::to_string(&nm.peer_sets)),
                            part(serde_json::to_string(&nm.reach_grants)),
                            part(serde_json::to_string(&nm.reach_services)),
                            part(serde_json::to_string(&nm.peers)),
                        );
                    }
                }
            }
        }
        let first_push = t0.elapsed().saturating_sub(encoding);
        let mean = sizes.iter().sum::<usize>() / sizes.len().max(1);
        let max = sizes.iter().max().copied().unwrap_or(0);
        assert_eq!(netmaps, n, "one netmap per device");
        // On demand: each session wants K of the peers its policy allows.
        let t_wants = Instant::now();
        let mut wanted = 0usize;
        if let Some(k) = on_demand {
            let compiled = std::sync::Arc::clone(reg.compiled());
            let addr_of: std::collections::BTreeMap<DeviceId, std::net::IpAddr> = (0..n)
                .map(|i| {
                    let (v4, _) = pools.addresses(i as u64 + 1).expect("pool");
                    (DeviceId(i as u64 + 1), std::net::IpAddr::V4(v4))
                })
                .collect();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for i in 0..n {
                let id = DeviceId(i as u64 + 1);
                let Some(a) = compiled.devices.get(&id) else {
                    continue;
                };
                let peers: Vec<DeviceId> = a.peers.iter().collect();
                let mut picks: Vec<DeviceId> = Vec::new();
                if i == 1 {
                    picks.extend(
                        [DeviceId(1), DeviceId(4)]
                            .into_iter()
                            .filter(|p| a.peers.contains(p)),
                    );
                }
                // As in the load tool, every session holds the devices about to be
                // quarantined and revoked: the narrowing reaches every session.
                if load_shape {
                    picks.extend(
                        [quarantined.id, revoked]
                            .into_iter()
                            .filter(|p| a.peers.contains(p)),
                    );
                }
                for _ in 0..k.min(peers.len()) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    picks.push(peers[(x % peers.len() as u64) as usize]);
                }
                for p in picks {
                    // A want past the session's budget waits a second: the bench's clock moves.
                    let by = ward_shared::wire::PeerRef::Addr(addr_of[&p]);
                    if reg
                        .handle_want_peer(id, i as u64, by, (wanted as i64 / 64) * 1000)
                        .is_ok()
                    {
                        wanted += 1;
                    }
                    drain(&mut reg);
                }
            }
        }
        let wants = t_wants.elapsed();
        let t1 = Instant::now();
        reg.handle_policy(p2);
        let (mut msgs, mut bytes) = (0usize, 0usize);
        while let Some(o) = reg.poll_output() {
            if let Output::Send { msg, .. } = o {
                msgs += 1;
                bytes += ward_shared::wire::encode(&msg).len();
            }
        }
        let change = t1.elapsed();
        // One device's endpoints change: every session that has it as a peer gets a delta.
        let t2 = Instant::now();
        reg.handle_session_update(
            DeviceId(1),
            0,
            DeviceUpdate {
                wg_port: 51821,
                ..DeviceUpdate::default()
            },
        );
        let mut peer_msgs = 0usize;
        while let Some(o) = reg.poll_output() {
            if let Output::Send { msg, .. } = o {
                peer_msgs += 1;
                std::hint::black_box(ward_shared::wire::encode(&msg).len());
            }
        }
        let peer_change = t2.elapsed();
        assert!(peer_msgs > 0, "the peer change reached its peers");
        // One device's key rotates: the new lease, then the old one revoked.
        let t3 = Instant::now();
        let serial = n as u64 + 1;
        reg.handle_lease(lease(&rotating, serial));
        let mut lease_msgs = drain(&mut reg);
        reg.handle_leases_revoked(rotating.id, &[rotating.id.0]);
        lease_msgs += drain(&mut reg);
        let lease_change = t3.elapsed();
        assert!(lease_msgs > 0, "the new lease reached the peers");
        // One device quarantined: its peers narrowed, then a compile without its access.
        let t4 = Instant::now();
        let mut q = quarantined;
        q.quarantine = Some(ward_coordinator::model::Quarantine {
            since_ms: 1,
            reason: "bench".into(),
            automatic: false,
        });
        reg.handle_device_upserted(q);
        // The narrowing pass alone: what every peer enforces before the compile.
        reg.narrow_now();
        let mut quarantine_msgs = drain_by(&mut reg, Registry::poll_queued);
        let narrowed = t4.elapsed();
        quarantine_msgs += drain(&mut reg);
        let quarantine = t4.elapsed();
        // One device revoked: its session closed, every peer told, a compile without it.
        let t5 = Instant::now();
        reg.handle_device_removed(revoked, "bench");
        let revoke_msgs = drain(&mut reg);
        let revoke = t5.elapsed();
        assert!(revoke_msgs > 0, "the revocation reached the peers");
        println!("{n:>8} {:>10.1}ms {:>10.1}ms {:>12.1}ms {:>10.1}ms {:>10.1}ms {:>10.1}ms {:>10.1}ms {:>10.1}ms {msgs:>12} {bytes:>12} {mean:>14} {max:>14} {:>7}MiB   ({first_peers} peer entries in the first netmaps; {wanted} wants granted; the peer change {peer_msgs} messages, the lease change {lease_msgs}, the quarantine {quarantine_msgs}, the revocation {revoke_msgs}; compiles {}, sessions carried {})", first_push.as_secs_f64() * 1e3, wants.as_secs_f64() * 1e3, change.as_secs_f64() * 1e3, peer_change.as_secs_f64() * 1e3, lease_change.as_secs_f64() * 1e3, narrowed.as_secs_f64() * 1e3, quarantine.as_secs_f64() * 1e3, revoke.as_secs_f64() * 1e3, peak_rss_mib(), reg.compiles(), reg.sessions_carried());
    }
}

/// The process's peak resident set so far (VmHWM), MiB; 0 where /proc is not readable.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Takes every output, encoding each message as a session would; returns the messages.
fn drain(reg: &mut Registry) -> usize {
    drain_by(reg, Registry::poll_output)
}

/// [`drain`] through `poll` (all outputs, or only those already queued).
fn drain_by(reg: &mut Registry, poll: fn(&mut Registry) -> Option<Output>) -> usize {
    let mut msgs = 0;
    while let Some(o) = poll(reg) {
        if let Output::Send { msg, .. } = o {
            msgs += 1;
            std::hint::black_box(ward_shared::wire::encode(&msg).len());
        }
    }
    msgs
}

/// Device `i` (id `i + 1`), active, with a bound name `h{i}`.
fn device(
    i: usize,
    user: Option<String>,
    tags: Vec<Name>,
    ipv4: std::net::Ipv4Addr,
    ipv6: std::net::Ipv6Addr,
) -> Device {
    let name = Hostname::parse(&format!("h{i}")).expect("hostname");
    Device::active(DeviceId(i as u64 + 1), name, user, tags, ipv4, ipv6)
}
