//! Flow reports over real device sessions: the built coordinator on loopback, two enrolled
//! devices speaking the protocol by hand (hello, then `flows` reports). Checked: netmaps ask for
//! flows and name the policy version; a report is acknowledged once stored and a
//! retransmission is acknowledged again but stored once, also across a `kill -9` of the
//! coordinator; a gap in the sequence and the device's dropped records are visible; the two
//! ends' records are paired (`paired`, `mismatch`, `denied`, `one_sided`) in `flows --json`,
//! with the filters and `flows top`; bad reports are refused with a clear error while the
//! session goes on, and a flood of them closes the session as the rate limits say.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ward_shared::filter::Proto;
use ward_shared::flows::{DenyCause, FlowRecord, FlowReport, FlowVerdict, FlowWindow, Role};
use ward_shared::token::EnrollToken;
use ward_shared::wire::{self, CoordinatorMsg, DeviceId, DeviceMsg, ErrorCode, FrameDecoder};

const POLICY: &str = r#"
[groups]
eng = ["alice"]
[services.all]
devices = ["group:eng"]
ports = ["tcp/*", "udp/*"]
[[rules]]
from = ["group:eng"]
to = ["all"]
"#;

/// One device's control session.
struct Session {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl Session {
    async fn open(ep: &quinn::Endpoint, cfg: quinn::ClientConfig, addr: SocketAddr) -> Self {
        let conn = ep
            .connect_with(cfg, addr, wire::COORDINATOR_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut s = Session {
            conn,
            send,
            recv,
            dec: FrameDecoder::new(1 << 20),
        };
        s.send(&hello()).await;
        s
    }

    async fn send(&mut self, msg: &DeviceMsg) {
        self.send.write_all(&wire::encode(msg)).await.unwrap();
    }

    /// The next message, or `None` when the stream ends or nothing comes within 10 s.
    async fn next(&mut self) -> Option<CoordinatorMsg> {
        let mut buf = [0u8; 16 * 1024];
        let fut = async {
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

    /// Skips netmaps and other pushes until a message `pick` takes.
    async fn wait<T>(&mut self, mut pick: impl FnMut(&CoordinatorMsg) -> Option<T>) -> T {
        loop {
            let m = self.next().await.expect("the session ended or went quiet");
            if let Some(t) = pick(&m) {
                return t;
            }
        }
    }

    /// Sends a report and waits for its acknowledgement.
    async fn report(&mut self, r: FlowReport) {
        let seq = r.seq;
        self.send(&DeviceMsg::Flows(r)).await;
        let got = self
            .wait(|m| match m {
                CoordinatorMsg::FlowsAck { seq } => Some(Ok(*seq)),
                CoordinatorMsg::Error { code, message } => Some(Err((*code, message.clone()))),
                _ => None,
            })
            .await;
        assert_eq!(got, Ok(seq));
    }

    /// Sends a report that must be refused; the error's message.
    async fn refused(&mut self, r: FlowReport) -> String {
        self.send(&DeviceMsg::Flows(r)).await;
        let (code, message) = self
            .wait(|m| match m {
                CoordinatorMsg::Error { code, message } => Some((*code, message.clone())),
                CoordinatorMsg::FlowsAck { .. } => panic!("a bad report was acknowledged"),
                _ => None,
            })
            .await;
        assert_eq!(code, ErrorCode::BadRequest, "{message}");
        message
    }

    async fn ping(&mut self) -> bool {
        self.send(&DeviceMsg::Ping { nonce: 7 }).await;
        loop {
            match self.next().await {
                Some(CoordinatorMsg::Pong { nonce: 7, .. }) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn rec(
    role: Role,
    peer: DeviceId,
    proto: Proto,
    port: u16,
    out: (u64, u64),
    inn: (u64, u64),
    verdict: FlowVerdict,
) -> FlowRecord {
    FlowRecord {
        role,
        peer: Some(peer),
        peer_addr: "100.64.0.9".parse().unwrap(),
        peer_user: Some("alice".into()),
        peer_tags: vec![],
        proto,
        port,
        verdict,
        rule: (verdict == FlowVerdict::Allowed).then(|| "eng-all".into()),
        policy_version: Some(1),
        reason: (verdict == FlowVerdict::Denied).then_some(DenyCause::NoRule),
        packets_out: out.0,
        bytes_out: out.1,
        packets_in: inn.0,
        bytes_in: inn.1,
        connections: 1,
        shadow: None,
    }
}

fn report(seq: u64, start_ms: i64, records: Vec<FlowRecord>, dropped: u64) -> FlowReport {
    FlowReport {
        seq,
        windows: vec![FlowWindow {
            start_ms,
            end_ms: start_ms + 60_000,
            records,
        }],
        dropped_records: dropped,
    }
}

fn flows(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["flows"];
    a.extend_from_slice(args);
    admin_json(dir, &a)
}

/// The one flow on `port` in `flows --json`.
fn flow_on(v: &serde_json::Value, port: u16) -> serde_json::Value {
    let all: Vec<&serde_json::Value> = v["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["port"] == port)
        .collect();
    assert_eq!(all.len(), 1, "one flow on port {port}: {v:#}");
    all[0].clone()
}

#[test]
fn reports_are_stored_once_paired_and_bad_ones_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, addr) = init(tmp.path());
    let s = serve(&dir, "serve1.log");
    admin_ok(&dir, &["user", "add", "alice", "--group", "eng"]);
    std::fs::write(tmp.path().join("p.toml"), POLICY).unwrap();
    admin_ok(
        &dir,
        &[
            "policy",
            "apply",
            tmp.path().join("p.toml").to_str().unwrap(),
        ],
    );
    let tok = EnrollToken::parse(
        admin_ok(&dir, &["token", "create", "--user", "alice", "--uses", "2"]).trim(),
    )
    .unwrap();
    let ca = ward_coordinator::datadir::DataDir::new(&dir)
        .load_ca()
        .unwrap()
        .cert_der;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = rt.block_on(async { endpoint("127.0.0.1") });
    let mut devs = Vec::new();
    for host in ["laptop", "db"] {
        let (msg, key) = enroll_request_with_key(&tok, host, None);
        let Some(CoordinatorMsg::Enrolled(e)) =
            rt.block_on(enroll_once(&ep, client_config(&ca), addr, &msg))
        else {
            panic!("enrollment failed");
        };
        devs.push((e.device_id, e.cert_der.0, key));
    }
    let (a_id, b_id) = (devs[0].0, devs[1].0);
    let cfg = |i: usize| device_client_config(&ca, &devs[i].1, &devs[i].2);
    let now = ward_runtime::now_ms();
    let w1 = now - now % 60_000 - 120_000;

    rt.block_on(async {
        let mut a = Session::open(&ep, cfg(0), addr).await;
        let mut b = Session::open(&ep, cfg(1), addr).await;
        // The netmap asks for flow records and names the policy version.
        for s in [&mut a, &mut b] {
            let (flows, version) = s
                .wait(|m| match m {
                    CoordinatorMsg::Netmap(nm) => Some((nm.flows, nm.policy_version)),
                    _ => None,
                })
                .await;
            assert!(flows);
            assert_eq!(version, Some(1));
        }
        // laptop → db tcp/5432, both ends agreeing.
        let ini = rec(
            Role::Initiator,
            b_id,
            Proto::Tcp,
            5432,
            (10, 1000),
            (9, 20_000),
            FlowVerdict::Allowed,
        );
        let resp = rec(
            Role::Responder,
            a_id,
            Proto::Tcp,
            5432,
            (9, 20_000),
            (10, 1000),
            FlowVerdict::Allowed,
        );
        a.report(report(1, w1, vec![ini.clone()], 0)).await;
        b.report(report(1, w1, vec![resp], 0)).await;
        // A retransmission is acknowledged again.
        a.report(report(1, w1, vec![ini.clone()], 0)).await;
    });
    let v = flows(&dir, &[]);
    let f = flow_on(&v, 5432);
    assert_eq!(f["status"], "paired", "{v:#}");
    assert_eq!(f["initiator"], "laptop");
    assert_eq!(f["responder"], "db");
    assert_eq!(f["rule"], "eng-all");
    assert_eq!(f["initiator_counts"]["bytes_out"], 1000, "stored once");
    assert_eq!(f["responder_counts"]["bytes_in"], 1000);

    // kill -9 and restart: the retransmission is still known.
    drop(s);
    let s = serve(&dir, "serve2.log");
    rt.block_on(async {
        let mut a = Session::open(&ep, cfg(0), addr).await;
        let ini = rec(
            Role::Initiator,
            b_id,
            Proto::Tcp,
            5432,
            (10, 1000),
            (9, 20_000),
            FlowVerdict::Allowed,
        );
        a.report(report(1, w1, vec![ini], 0)).await;
    });
    let v = flows(&dir, &[]);
    assert_eq!(
        flow_on(&v, 5432)["initiator_counts"]["bytes_out"],
        1000,
        "never counted twice across a restart: {v:#}"
    );

    let w2 = w1 + 60_000;
    let old = w1 - 10 * 60_000;
    rt.block_on(async {
        let mut a = Session::open(&ep, cfg(0), addr).await;
        let mut b = Session::open(&ep, cfg(1), addr).await;
        // A gap (seq 2 and 3 never arrive) and dropped records at the device.
        let udp = rec(
            Role::Initiator,
            b_id,
            Proto::Udp,
            53,
            (4, 400),
            (4, 400),
            FlowVerdict::Allowed,
        );
        let udp_r = rec(
            Role::Responder,
            a_id,
            Proto::Udp,
            53,
            (4, 400),
            (4, 400),
            FlowVerdict::Allowed,
        );
        a.report(report(4, w2, vec![udp], 3)).await;
        b.report(report(2, w2, vec![udp_r], 0)).await;
        // db under-reports what it sent on 8080: mismatch.
        let big = rec(
            Role::Initiator,
            b_id,
            Proto::Tcp,
            8080,
            (100, 100_000),
            (100, 100_000),
            FlowVerdict::Allowed,
        );
        let half = rec(
            Role::Responder,
            a_id,
            Proto::Tcp,
            8080,
            (50, 50_000),
            (100, 100_000),
            FlowVerdict::Allowed,
        );
        a.report(report(5, w2, vec![big], 3)).await;
        b.report(report(3, w2, vec![half], 0)).await;
        // laptop tries ssh on db, whose filter refuses it: denied, with both ends' counts.
        let ssh = rec(
            Role::Initiator,
            b_id,
            Proto::Tcp,
            22,
            (3, 180),
            (0, 0),
            FlowVerdict::Allowed,
        );
        let ssh_r = rec(
            Role::Responder,
            a_id,
            Proto::Tcp,
            22,
            (0, 0),
            (3, 180),
            FlowVerdict::Denied,
        );
        a.report(report(6, w2, vec![ssh], 3)).await;
        b.report(report(4, w2, vec![ssh_r], 0)).await;
        // Only laptop saw this one, ten minutes ago: one-sided.
        let lone = rec(
            Role::Initiator,
            b_id,
            Proto::Tcp,
            9000,
            (5, 500),
            (5, 500),
            FlowVerdict::Allowed,
        );
        a.report(report(7, old, vec![lone], 3)).await;

        // Bad reports: refused, clearly, and the session goes on.
        let msg = a.refused(report(0, w2, vec![], 0)).await;
        assert!(
            msg.contains("flow report refused") && msg.contains("start at 1"),
            "{msg}"
        );
        let too_many = vec![
            rec(
                Role::Initiator,
                b_id,
                Proto::Tcp,
                1,
                (1, 1),
                (1, 1),
                FlowVerdict::Allowed
            );
            57
        ];
        let msg = a.refused(report(8, w2, too_many, 0)).await;
        assert!(msg.contains("57 records"), "{msg}");
        let mut long = rec(
            Role::Initiator,
            b_id,
            Proto::Tcp,
            1,
            (1, 1),
            (1, 1),
            FlowVerdict::Allowed,
        );
        long.rule = Some("x".repeat(65));
        let msg = a.refused(report(8, w2, vec![long], 0)).await;
        assert!(msg.contains("too long"), "{msg}");
        assert!(a.ping().await, "the session is still open");

        // A flood of (bad) reports: refused one by one up to the soft rate, dropped above
        // it, and above the hard rate the session is closed.
        for _ in 0..400u64 {
            b.send(&DeviceMsg::Flows(report(0, w2, vec![], 0))).await;
        }
        let (mut refused, mut limited) = (0, false);
        while let Some(m) = b.next().await {
            match m {
                CoordinatorMsg::Error {
                    code: ErrorCode::BadRequest,
                    ..
                } => refused += 1,
                CoordinatorMsg::Error { code, message } => {
                    assert_eq!(code, ErrorCode::RateLimited, "{message}");
                    assert!(message.contains("flows"), "{message}");
                    limited = true;
                }
                CoordinatorMsg::FlowsAck { .. } => panic!("a bad report was acknowledged"),
                _ => {}
            }
        }
        assert!(
            (10..200).contains(&refused),
            "{refused} refused before the limit"
        );
        assert!(limited, "the flooding session was closed with rate_limited");
        a.conn.close(0u32.into(), b"done");
    });

    let v = flows(&dir, &[]);
    assert_eq!(flow_on(&v, 53)["status"], "paired", "{v:#}");
    let m = flow_on(&v, 8080);
    assert_eq!(m["status"], "mismatch", "{m:#}");
    assert_eq!(
        m["disagree"],
        serde_json::json!(["packets r→i", "bytes r→i"])
    );
    let d = flow_on(&v, 22);
    assert_eq!(d["status"], "denied");
    assert_eq!(d["verdict"], "denied");
    assert_eq!(d["reason"], "no_rule");
    assert_eq!(d["initiator_counts"]["packets_out"], 3);
    assert_eq!(d["responder_counts"]["packets_in"], 3);
    assert_eq!(flow_on(&v, 9000)["status"], "one_sided");
    assert_eq!(v["summary"]["missing_seqs"], 2, "{:#}", v["summary"]);
    assert_eq!(v["summary"]["dropped_records"], 3);
    assert_eq!(v["summary"]["mismatch"], 1);
    let laptop = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["device"] == "laptop")
        .unwrap();
    assert_eq!(laptop["last_seq"], 7);
    assert_eq!(laptop["missing_seqs"], 2);
    assert_eq!(laptop["dropped_records"], 3);

    let shown = admin_json(&dir, &["device", "show", "laptop"]);
    assert_eq!(shown["flows"]["missing_seqs"], 2, "{shown:#}");
    assert_eq!(shown["flows"]["dropped_records"], 3);
    assert!(
        admin_ok(&dir, &["device", "show", "laptop"]).contains("2 missing, 3 record(s) dropped")
    );

    // Filters and selectors.
    let only = |args: &[&str]| -> Vec<u64> {
        flows(&dir, args)["flows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["port"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(only(&["--denied"]), vec![22]);
    assert_eq!(only(&["--one-sided"]), vec![9000]);
    assert_eq!(only(&["--from", "db"]).len(), 0, "db initiated nothing");
    assert_eq!(only(&["--from", "laptop", "--to", "device:db"]).len(), 5);
    assert_eq!(only(&["--from", "group:eng"]).len(), 5);
    assert_eq!(only(&["--rule", "eng-all"]).len(), 4);
    assert_eq!(
        only(&["--since", "5m"]).len(),
        4,
        "the ten-minute-old flow is older"
    );
    let out = admin(&dir, &["flows", "--from", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("selects no device"));
    let top = admin_json(&dir, &["flows", "top", "--by", "bytes"]);
    assert_eq!(top[0]["port"], 8080, "{top:#}");
    let top = admin_json(&dir, &["flows", "top", "--by", "denied"]);
    assert_eq!(top.as_array().unwrap().len(), 1);
    assert_eq!(top[0]["port"], 22);
    // The table form prints.
    let table = admin_ok(&dir, &["flows"]);
    assert!(
        table.contains("INITIATOR") && table.contains("mismatch"),
        "{table}"
    );
    assert!(
        table.contains("2 report(s) missing, 3 record(s) dropped"),
        "{table}"
    );
    drop(s);
}
