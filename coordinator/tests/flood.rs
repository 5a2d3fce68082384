//! One enrolled device floods the coordinator with updates and flapping posture reports while
//! another device's posture changes are being enforced. Both go through what a session does
//! (`limits::SessionLimits`, then the registry, drained as the actor drains it). Checked: the
//! flooder's messages that reach the registry (each is a registry event, and each update or
//! report a database write) stay within the limits' rate however fast it sends, its session is
//! closed, and the other device's enforcement waits behind a bounded number of the flooder's
//! events. The wall-clock p99 of that enforcement, idle and under the flood, is printed (a
//! figure to report, not a timed assertion).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use ward_coordinator::limits::{Decision, Kind, SessionLimits};
use ward_coordinator::model::Device;
use ward_coordinator::registry::{Output, Registry};
use ward_shared::addr::AddressPools;
use ward_shared::names::Hostname;
use ward_shared::policy;
use ward_shared::posture::PostureReport;
use ward_shared::wire::{CoordinatorMsg, DeviceId, DeviceUpdate};

const T0: i64 = 1_800_000_000_000;
const DEVICES: u64 = 20;
const FLOODER: u64 = 1;
const VICTIM: u64 = 2;

fn device(id: u64) -> Device {
    Device::active(
        DeviceId(id),
        Hostname::parse(&format!("h{id}")).unwrap(),
        Some("alice".into()),
        vec![],
        Ipv4Addr::new(100, 64, (id / 250) as u8, (id % 250) as u8 + 1),
        format!("fd00::{id}").parse().unwrap(),
    )
}

fn report(id: u64, seq: u64, at: i64, firewall: bool) -> PostureReport {
    serde_json::from_value(serde_json::json!({
        "device_id": id, "seq": seq, "collected_at_ms": at,
        "os": {"at_ms": at, "reading": {"value": {"id": "debian", "version": "12", "pretty": "Debian 12"}}},
        "kernel": {"at_ms": at, "reading": {"value": "6.1"}}, "ward_version": "0.1.0",
        "firewall": {"at_ms": at, "reading": {"value": firewall}},
        "disk_encryption": {"at_ms": at, "reading": {"value": true}},
        "screen_lock": {"at_ms": at, "reading": {"value": null}},
        "last_package_update_ms": {"at_ms": at, "reading": {"value": at}}
    }))
    .unwrap()
}

fn registry() -> Registry {
    let p = policy::parse(
        br#"
[groups]
eng = ["alice"]
[posture.fw]
firewall = true
[services.all]
devices = ["group:eng"]
ports = ["tcp/*"]
[[rules]]
from = ["group:eng"]
to = ["all"]
posture = ["fw"]
"#,
        "p.toml",
    )
    .unwrap();
    let mut r = Registry::new(
        AddressPools::from_random([0; 5]),
        (1..=DEVICES).map(device),
        [],
        Some(p),
        vec![],
        vec![],
        T0,
    );
    for id in 1..=DEVICES {
        r.handle_session_opened(
            DeviceId(id),
            id,
            format!("192.0.2.1:{}", 1000 + id).parse().unwrap(),
            DeviceUpdate::default(),
        )
        .unwrap();
        r.handle_posture(DeviceId(id), id, report(id, 1, T0, true), T0)
            .unwrap();
    }
    while r.poll_output().is_some() {}
    r
}

/// Drains the outputs; whether any peer got a netmap change.
fn drain(r: &mut Registry) -> usize {
    std::iter::from_fn(|| r.poll_output())
        .filter(|o| {
            matches!(
                o,
                Output::Send {
                    msg: CoordinatorMsg::NetmapDelta(_),
                    ..
                }
            )
        })
        .count()
}

/// A registry event waiting in the actor's queue.
type Queued = Box<dyn FnOnce(&mut Registry)>;

struct Run {
    /// Wall-clock µs of each victim enforcement (its report, plus the flooder events queued
    /// ahead of it in the same millisecond).
    enforce_us: Vec<u64>,
    /// The flooder's messages that reached the registry (each one database write).
    flooder_forwarded: u64,
    /// The most flooder events queued ahead of one victim report.
    max_ahead: u64,
    closed_at_ms: Option<i64>,
}

/// Ten simulated seconds. The victim's firewall flips every 200 ms; the flooder (when
/// `flood`) sends `per_ms` updates and reports each millisecond until its session is closed.
fn run(flood: bool, per_ms: u32) -> Run {
    let mut r = registry();
    let mut limits = SessionLimits::new(T0);
    let mut out = Run {
        enforce_us: vec![],
        flooder_forwarded: 0,
        max_ahead: 0,
        closed_at_ms: None,
    };
    let mut seq = 1;
    let mut fseq = 1;
    let mut ahead = 0u64;
    for ms in 0..10_000i64 {
        let now = T0 + ms;
        let mut queued: Vec<Queued> = Vec::new();
        if flood && out.closed_at_ms.is_none() {
            for i in 0..per_ms {
                let kind = if i % 2 == 0 {
                    Kind::Update
                } else {
                    Kind::Posture
                };
                match limits.handle(kind, now) {
                    Decision::Pass => {
                        out.flooder_forwarded += 1;
                        fseq += 1;
                        let s = fseq;
                        queued.push(match kind {
                            Kind::Update => Box::new(move |r: &mut Registry| {
                                r.handle_session_update(
                                    DeviceId(FLOODER),
                                    FLOODER,
                                    DeviceUpdate {
                                        wg_port: (s % 60_000) as u16 + 1,
                                        local_endpoints: vec![SocketAddr::new(
                                            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                                            (s % 60_000) as u16 + 1,
                                        )],
                                        ..Default::default()
                                    },
                                )
                            }),
                            _ => Box::new(move |r: &mut Registry| {
                                let _ = r.handle_posture(
                                    DeviceId(FLOODER),
                                    FLOODER,
                                    report(FLOODER, s, now, s % 2 == 0),
                                    now,
                                );
                            }),
                        });
                    }
                    Decision::Defer { .. } | Decision::Drop => {}
                    Decision::Exceeded => {
                        out.closed_at_ms = Some(ms);
                        queued.push(Box::new(|r: &mut Registry| {
                            r.handle_session_closed(DeviceId(FLOODER), FLOODER)
                        }));
                        break;
                    }
                }
            }
            // A coalesced message due now goes out (the latest one held).
            for _ in limits.poll_release(now) {
                out.flooder_forwarded += 1;
                queued.push(Box::new(move |r: &mut Registry| {
                    r.handle_session_update(DeviceId(FLOODER), FLOODER, DeviceUpdate::default())
                }));
            }
        }
        ahead += queued.len() as u64;
        if ms % 200 == 100 {
            seq += 1;
            let firewall = seq % 2 == 1;
            let start = Instant::now();
            for f in queued.drain(..) {
                f(&mut r);
            }
            r.handle_posture(
                DeviceId(VICTIM),
                VICTIM,
                report(VICTIM, seq, now, firewall),
                now,
            )
            .unwrap();
            let pushed = drain(&mut r);
            out.enforce_us.push(start.elapsed().as_micros() as u64);
            assert!(pushed > 0, "the victim's change reached its peers");
            out.max_ahead = out.max_ahead.max(ahead);
            ahead = 0;
        } else {
            for f in queued.drain(..) {
                f(&mut r);
            }
            drain(&mut r);
        }
        r.handle_time(now);
        drain(&mut r);
    }
    out
}

fn p99(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[test]
fn a_flooding_device_is_bounded_and_does_not_hold_up_others() {
    // Interleaved: idle, flood, idle, flood.
    let mut figures = Vec::new();
    for (i, flood) in [false, true, false, true].into_iter().enumerate() {
        let r = run(flood, 20);
        if flood {
            // 20 messages per ms for as long as the session lasts: at most the two bursts and
            // the coalesced releases reach the registry before the hard limit closes it.
            let closed = r.closed_at_ms.expect("the flooding session is closed");
            assert!(closed < 100, "closed after {closed} ms");
            assert!(
                r.flooder_forwarded <= 30,
                "{} forwarded",
                r.flooder_forwarded
            );
            assert!(r.max_ahead <= 30, "{} flooder events ahead", r.max_ahead);
        } else {
            assert_eq!(r.flooder_forwarded, 0);
        }
        figures.push(format!(
            "run {i} ({}): victim enforcement p99 {} us over {} changes, flooder events forwarded {}, closed at {:?} ms",
            if flood { "flood" } else { "idle" },
            p99(&r.enforce_us),
            r.enforce_us.len(),
            r.flooder_forwarded,
            r.closed_at_ms
        ));
    }
    // Below the hard limit (an update or a report every 30 ms, each kind every 60 ms, for ten
    // seconds): never closed, and coalescing keeps what reaches the registry to the soft rate.
    let slow = run_paced();
    assert!(slow.closed_at_ms.is_none());
    assert!(
        slow.flooder_forwarded <= 2 * (10 + 10_000 / 500) + 2,
        "{} forwarded",
        slow.flooder_forwarded
    );
    figures.push(format!(
        "paced flooder (33 msg/s, under the hard limit): victim p99 {} us, forwarded {} of 333",
        p99(&slow.enforce_us),
        slow.flooder_forwarded
    ));
    for f in figures {
        println!("{f}");
    }
}

/// A flooder that stays under the hard limit: one message every 30 ms, alternating kinds.
fn run_paced() -> Run {
    let mut r = registry();
    let mut limits = SessionLimits::new(T0);
    let mut out = Run {
        enforce_us: vec![],
        flooder_forwarded: 0,
        max_ahead: 0,
        closed_at_ms: None,
    };
    let mut seq = 1;
    for ms in 0..10_000i64 {
        let now = T0 + ms;
        if ms % 30 == 0 {
            let kind = if ms % 60 == 0 {
                Kind::Update
            } else {
                Kind::Posture
            };
            match limits.handle(kind, now) {
                Decision::Pass => {
                    out.flooder_forwarded += 1;
                    r.handle_session_update(
                        DeviceId(FLOODER),
                        FLOODER,
                        DeviceUpdate {
                            wg_port: (ms % 60_000) as u16 + 1,
                            ..Default::default()
                        },
                    );
                }
                Decision::Exceeded => {
                    out.closed_at_ms = Some(ms);
                }
                Decision::Defer { .. } | Decision::Drop => {}
            }
        }
        for _ in limits.poll_release(now) {
            out.flooder_forwarded += 1;
            r.handle_session_update(DeviceId(FLOODER), FLOODER, DeviceUpdate::default());
        }
        if ms % 200 == 100 {
            seq += 1;
            let start = Instant::now();
            r.handle_posture(
                DeviceId(VICTIM),
                VICTIM,
                report(VICTIM, seq, now, seq % 2 == 1),
                now,
            )
            .unwrap();
            drain(&mut r);
            out.enforce_us.push(start.elapsed().as_micros() as u64);
        } else {
            drain(&mut r);
        }
        r.handle_time(now);
        drain(&mut r);
    }
    out
}
