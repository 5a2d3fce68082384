//! What one enrolled device may make the coordinator do, through the real `serve` on loopback:
//! its message limits follow the device across reconnects, opening sessions is itself
//! limited, and many sessions flooding at once neither grow the registry's event queue past
//! its bound (`status` → `event_queue`) nor stop another device's posture from being enforced.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use ward_shared::token::EnrollToken;
use ward_shared::wire::{self, CoordinatorMsg, DeviceMsg, ErrorCode, FrameDecoder};

/// One device's credentials.
struct Dev {
    cfg: quinn::ClientConfig,
    id: u64,
}

fn enroll(
    dir: &Path,
    addr: SocketAddr,
    ep: &quinn::Endpoint,
    rt: &tokio::runtime::Runtime,
    host: &str,
) -> Dev {
    let ca = ward_coordinator::datadir::DataDir::new(dir)
        .load_ca()
        .unwrap()
        .cert_der;
    let tok =
        EnrollToken::parse(admin_ok(dir, &["token", "create", "--user", "vic"]).trim()).unwrap();
    let (msg, key) = enroll_request_with_key(&tok, host, None);
    let Some(CoordinatorMsg::Enrolled(e)) =
        rt.block_on(enroll_once(ep, client_config(&ca), addr, &msg))
    else {
        panic!("enrollment of {host} failed");
    };
    Dev {
        cfg: device_client_config(&ca, &e.cert_der.0, &key),
        id: e.device_id.0,
    }
}

/// A device session: hello sent, the coordinator's first answer read.
struct Session {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    first: Option<CoordinatorMsg>,
}

impl Session {
    async fn open(ep: &quinn::Endpoint, addr: SocketAddr, dev: &Dev) -> Session {
        let conn = ep
            .connect_with(dev.cfg.clone(), addr, wire::COORDINATOR_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&wire::encode(&hello())).await.unwrap();
        let mut s = Session {
            conn,
            send,
            recv,
            dec: FrameDecoder::new(1 << 20),
            first: None,
        };
        s.first = s.next().await;
        s
    }

    /// The next message, `None` at the end of the stream or after 10 s.
    async fn next(&mut self) -> Option<CoordinatorMsg> {
        let fut = async {
            let mut buf = [0u8; 16 * 1024];
            loop {
                if let Some(f) = self.dec.next_frame().ok()? {
                    return wire::decode::<CoordinatorMsg>(&f).ok();
                }
                match self.recv.read(&mut buf).await {
                    Ok(Some(n)) => self.dec.push(&buf[..n]),
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .ok()
            .flatten()
    }

    fn welcomed(&self) -> bool {
        matches!(self.first, Some(CoordinatorMsg::Netmap(_)))
    }

    /// Sends `n` pings at once; the pongs answered before the session was closed, and whether
    /// it was closed for its rate.
    async fn ping_flood(&mut self, n: u64) -> (u64, bool) {
        let mut bytes = Vec::new();
        for nonce in 0..n {
            bytes.extend(wire::encode(&DeviceMsg::Ping { nonce }));
        }
        let _ = self.send.write_all(&bytes).await;
        let mut pongs = 0;
        loop {
            match self.next().await {
                Some(CoordinatorMsg::Pong { .. }) => pongs += 1,
                Some(CoordinatorMsg::Error { code, .. }) => {
                    return (pongs, code == ErrorCode::RateLimited)
                }
                Some(_) => {}
                None => return (pongs, false),
            }
        }
    }
}

fn is_rate_limited(m: &Option<CoordinatorMsg>) -> bool {
    matches!(
        m,
        Some(CoordinatorMsg::Error {
            code: ErrorCode::RateLimited,
            ..
        })
    )
}

#[test]
fn limits_follow_the_device_across_reconnects_and_reconnecting_is_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, addr) = init(tmp.path());
    let _s = serve(&dir, "serve.log");
    admin_ok(&dir, &["user", "add", "vic"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = rt.block_on(async { endpoint("127.0.0.1") });
    let flooder = enroll(&dir, addr, &ep, &rt, "flooder");
    let hopper = enroll(&dir, addr, &ep, &rt, "hopper");

    rt.block_on(async {
        // A flood ends the session after the burst.
        let mut s = Session::open(&ep, addr, &flooder).await;
        assert!(s.welcomed(), "{:?}", s.first);
        let (first, limited) = s.ping_flood(100).await;
        assert!(limited, "the flood is refused as rate_limited");
        assert!(
            (15..=25).contains(&first),
            "pongs in the first session: {first}"
        );
        s.conn.close(0u32.into(), b"bye");
        // Reconnected at once: the buckets are as the last session left them.
        let mut s = Session::open(&ep, addr, &flooder).await;
        assert!(s.welcomed(), "{:?}", s.first);
        let (again, limited) = s.ping_flood(100).await;
        println!("pongs: first session {first}, after reconnecting {again}");
        assert!(limited);
        assert!(
            again <= 3,
            "reconnecting refilled the limits: {again} pongs"
        );

        // Opening sessions is limited per device: a burst, then refused as rate_limited.
        let mut welcomed = 0;
        let mut refused = 0;
        for _ in 0..40 {
            let s = Session::open(&ep, addr, &hopper).await;
            if s.welcomed() {
                welcomed += 1;
            } else {
                assert!(is_rate_limited(&s.first), "{:?}", s.first);
                refused += 1;
            }
            s.conn.close(0u32.into(), b"bye");
        }
        println!("40 sessions opened at once: {welcomed} welcomed, {refused} refused");
        assert!((20..=23).contains(&welcomed), "{welcomed}");
        // The flooder's limits did not touch the other device, and the other's session
        // limit did not touch the flooder (its own burst is not spent).
        let s = Session::open(&ep, addr, &flooder).await;
        assert!(s.welcomed(), "{:?}", s.first);
    });
}

/// A posture report with the firewall on or off.
fn report(id: u64, seq: u64, firewall: bool) -> DeviceMsg {
    let at = ward_coordinator::server::now_ms();
    let r = serde_json::from_value(serde_json::json!({
        "device_id": id, "seq": seq, "collected_at_ms": at,
        "os": {"at_ms": at, "reading": {"value": {"id": "debian", "version": "12", "pretty": "Debian 12"}}},
        "kernel": {"at_ms": at, "reading": {"value": "6.1"}}, "ward_version": "0.1.0",
        "firewall": {"at_ms": at, "reading": {"value": firewall}},
        "disk_encryption": {"at_ms": at, "reading": {"value": true}},
        "screen_lock": {"at_ms": at, "reading": {"value": null}},
        "last_package_update_ms": {"at_ms": at, "reading": {"value": at}}
    }))
    .unwrap();
    DeviceMsg::Posture(Box::new(r))
}

/// The requirements a verdict says fail.
fn failing(verdict: &serde_json::Value) -> Vec<String> {
    verdict["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["passed"] == false)
        .map(|e| e["requirement"].as_str().unwrap().to_string())
        .collect()
}

fn status(dir: &Path) -> serde_json::Value {
    admin_json(dir, &["status"])
}

#[test]
fn many_flooding_sessions_keep_the_event_queue_bounded_and_enforcement_going() {
    const FLOODERS: usize = 24;
    let tmp = tempfile::tempdir().unwrap();
    let (dir, addr) = init(tmp.path());
    let _s = serve(&dir, "serve.log");
    admin_ok(&dir, &["user", "add", "vic"]);
    let policy = tmp.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
[groups]
eng = ["vic"]
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
    )
    .unwrap();
    admin_ok(&dir, &["policy", "apply", policy.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = rt.block_on(async { endpoint("127.0.0.1") });
    let victim = enroll(&dir, addr, &ep, &rt, "victim");
    let flooders: Vec<Dev> = (0..FLOODERS)
        .map(|i| enroll(&dir, addr, &ep, &rt, &format!("flood{i}")))
        .collect();
    let cap = status(&dir)["event_queue"]["capacity"].as_u64().unwrap();
    assert!(cap > 0);

    let mut v = rt.block_on(Session::open(&ep, addr, &victim));
    assert!(v.welcomed());
    rt.block_on(async {
        v.send
            .write_all(&wire::encode(&report(victim.id, 1, true)))
            .await
            .unwrap();
    });
    let verdict = |dir: &Path| admin_json(dir, &["device", "show", "victim"])["posture"].clone();
    wait_until("the victim's first report", 20, || {
        verdict(&dir)["report_seq"].as_u64() == Some(1)
    });
    assert!(failing(&verdict(&dir)).is_empty(), "{}", verdict(&dir));

    // Every flooder sends updates, reports and denied-flow hints as fast as it can write.
    let tasks: Vec<_> = flooders
        .into_iter()
        .map(|d| {
            let ep = ep.clone();
            rt.spawn(async move {
                let mut s = Session::open(&ep, addr, &d).await;
                let mut bytes = Vec::new();
                for seq in 0..200u64 {
                    bytes.extend(wire::encode(&DeviceMsg::Update(Default::default())));
                    bytes.extend(wire::encode(&report(d.id, seq + 2, seq % 2 == 0)));
                    bytes.extend(wire::encode(&DeviceMsg::DeniedFlows { flows: vec![] }));
                }
                for _ in 0..5 {
                    if s.send.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                while s.next().await.is_some() {}
            })
        })
        .collect();
    // Meanwhile the victim's firewall goes off: its access must be narrowed.
    std::thread::sleep(Duration::from_millis(200));
    rt.block_on(async {
        v.send
            .write_all(&wire::encode(&report(victim.id, 2, false)))
            .await
            .unwrap();
    });
    let start = std::time::Instant::now();
    wait_until("the victim's posture change is enforced", 30, || {
        let v = verdict(&dir);
        v["report_seq"].as_u64() == Some(2) && failing(&v) == ["fw"]
    });
    println!(
        "the victim's failing firewall judged {:?} after its report, under the flood",
        start.elapsed()
    );
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    let q = &status(&dir)["event_queue"];
    println!("event queue after {FLOODERS} flooding sessions: {q}");
    assert!(q["max_depth"].as_u64().unwrap() <= cap, "{q}");
    assert_eq!(q["internal_depth"].as_u64(), Some(0), "{q}");
}
