//! The real `ward-relay` answers address discovery on loopback and keeps
//! answering under garbage and a flood; the coordinator's relay registry reaches a device's
//! control session (full netmap, then deltas).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::{bin, free_udp_port, wait_until, Coordinator, Proc};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;
use ward_shared::discovery::{BindingRequest, BindingResponse};
use ward_shared::token::EnrollToken;
use ward_shared::wire::{self, CoordinatorMsg, DeviceMsg, DeviceUpdate, Hello, RelayInfo};

struct Relay {
    proc: Proc,
    udp: SocketAddr,
    metrics: SocketAddr,
}

impl Relay {
    fn start(tmp: &std::path::Path) -> Self {
        let udp: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proc = Proc::spawn(
            Command::new(bin("ward-relay"))
                .args(["serve", "--listen", &udp.to_string()])
                .args(["--metrics-listen", &metrics.to_string()])
                .env("WARD_LOG", "info"),
            tmp.join("relay.log"),
        );
        let r = Relay { proc, udp, metrics };
        wait_until("relay metrics answer", Duration::from_secs(10), || {
            r.try_metrics().is_some()
        });
        r
    }

    fn try_metrics(&self) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.starts_with("HTTP/1.1 200").then_some(out)
    }

    /// One metric's value (`name` includes any labels).
    fn metric(&self, name: &str) -> u64 {
        let text = self.try_metrics().expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{text}"))
    }

    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.proc.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }
}

/// Sends a binding request from `sock` and waits for the matching answer, retrying like a real
/// client does (a flood can fill the relay's socket buffer, and the kernel then drops datagrams
/// before the relay sees them).
fn ask(sock: &UdpSocket, relay: SocketAddr, txid: u8) -> Option<BindingResponse> {
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 128];
    for _attempt in 0..5 {
        sock.send_to(&BindingRequest { txid: [txid; 12] }.encode(), relay)
            .unwrap();
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            assert_eq!(from, relay);
            let resp = BindingResponse::decode(&buf[..n]).unwrap();
            if resp.txid == [txid; 12] {
                return Some(resp);
            }
        }
    }
    None
}

#[test]
fn relay_answers_discovery_and_survives_garbage_and_a_flood() {
    let tmp = tempfile::tempdir().unwrap();
    let relay = Relay::start(tmp.path());

    // 1. A binding request is answered with the address the request came from.
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let resp = ask(&a, relay.udp, 1).expect("an answer");
    assert_eq!(resp.observed, a.local_addr().unwrap());

    // 2. Garbage, a response sent to the relay, and oversized datagrams get no answer and are
    // counted by reason.
    let g = UdpSocket::bind("127.0.0.1:0").unwrap();
    let resp_msg = BindingResponse {
        txid: [0; 12],
        observed: g.local_addr().unwrap(),
    }
    .encode();
    let garbage: [&[u8]; 5] = [b"", b"hello", &[0xff; 17], &[0xff; 1400], &[1, 0, 0, 0]];
    for d in garbage {
        g.send_to(d, relay.udp).unwrap();
    }
    g.send_to(&resp_msg, relay.udp).unwrap();
    wait_until("garbage counted", Duration::from_secs(5), || {
        relay.metric("ward_relay_refused_total{reason=\"malformed\"}") == 5
            && relay.metric("ward_relay_refused_total{reason=\"wrong_kind\"}") == 1
    });
    g.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        g.recv_from(&mut [0u8; 64]).is_err(),
        "garbage must get no answer"
    );

    // 3. A flood of 2 000 requests from one socket: answered at the rate limit only, while
    // another socket is still answered; memory stays put.
    let rss_before = relay.rss_kib();
    let f = UdpSocket::bind("127.0.0.1:0").unwrap();
    f.set_nonblocking(true).unwrap();
    let req = BindingRequest { txid: [9; 12] }.encode();
    for _ in 0..2000 {
        // A full socket buffer drops some: the relay counts what it received.
        let _ = f.send_to(&req, relay.udp);
    }
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    let resp = ask(&b, relay.udp, 2).expect("another source is answered during a flood");
    assert_eq!(resp.observed, b.local_addr().unwrap());
    wait_until("flood counted", Duration::from_secs(5), || {
        relay.metric("ward_relay_refused_total{reason=\"rate_limited\"}") > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut answers = 0;
    let mut buf = [0u8; 64];
    while f.recv_from(&mut buf).is_ok() {
        answers += 1;
    }
    let limited = relay.metric("ward_relay_refused_total{reason=\"rate_limited\"}");
    let requests = relay.metric("ward_relay_requests_total");
    let answered = relay.metric("ward_relay_answered_total");
    eprintln!(
        "flood: {requests} datagrams received in all, {answered} answered, {limited} rate limited, \
         {answers} answers to the flooder"
    );
    // Burst 40, plus at most 20/s refill over the flood's duration.
    assert!((1..=60).contains(&answers), "flooder got {answers} answers");
    assert_eq!(
        requests,
        answered + limited + 6,
        "every datagram is answered or refused with a reason"
    );
    let rss_after = relay.rss_kib();
    eprintln!("relay RSS: {rss_before} KiB before the flood, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // The answered sockets at most (refused datagrams create no state; idle entries go).
    assert!(relay.metric("ward_relay_sources") <= 3);

    // 4. The first socket recovers once its bucket refills; the relay is still serving.
    assert!(ask(&a, relay.udp, 3).is_some());
    // Refusals are summarised in the log at DEBUG only: nothing at WARN for a flood.
    assert!(
        !relay.proc.log_text().contains("WARN"),
        "{}",
        relay.proc.log_text()
    );
}

#[test]
fn registered_relays_reach_a_device_session() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "rita"]);
    let out = c.admin(&["relay", "add", "r1", "--addr", "127.0.0.1:3478"]);
    // The relay's credential, alone on stdout.
    let cred = ward_shared::relay::RelayCredential::parse(&out).unwrap();
    assert_eq!(cred.name, "r1");
    let dup = c.try_admin(&["relay", "add", "r1", "--addr", "127.0.0.1:1"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let ls = c.admin_json(&["relay", "ls"]);
    assert_eq!(ls[0]["name"], "r1");
    assert_eq!(ls[0]["addr"], "127.0.0.1:3478");
    assert!(ls[0]["created_ms"].as_i64().unwrap() > 0);

    let tok = EnrollToken::parse(&c.token(&["--user", "rita"])).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (enrolled, key) = ward_client::control::enroll(&tok, "rita1", "test")
            .await
            .unwrap();
        let endpoint = ward_client::control::client_endpoint().unwrap();
        let cfg =
            ward_client::control::session_config(&enrolled.ca_der.0, &enrolled.cert_der.0, &key)
                .unwrap();
        let addr = format!("127.0.0.1:{}", c.port).parse().unwrap();
        let mut ch = ward_client::control::Channel::open(&endpoint, cfg, addr)
            .await
            .unwrap();
        ch.send(&DeviceMsg::Hello(Hello {
            protocol: wire::PROTOCOL_VERSION,
            os: "test".into(),
            version: "0".into(),
            update: DeviceUpdate::default(),
        }))
        .await
        .unwrap();
        let relay = |name: &str, addr: &str| RelayInfo {
            name: name.into(),
            addr: addr.into(),
        };
        // The full netmap lists the registered relay.
        let nm = next_netmap(&mut ch).await;
        let CoordinatorMsg::Netmap(nm) = nm else {
            panic!("{nm:?}")
        };
        assert_eq!(nm.relays, vec![relay("r1", "127.0.0.1:3478")]);

        // Adding and removing relays reaches the live session as deltas.
        let c2 = c.dir.clone();
        let admin = move |args: &[&str]| {
            let out = Command::new(bin("ward-coordinator"))
                .arg("--data-dir")
                .arg(&c2)
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        };
        admin(&["relay", "add", "r2", "--addr", "[::1]:3478"]);
        let want = vec![relay("r1", "127.0.0.1:3478"), relay("r2", "[::1]:3478")];
        assert_eq!(next_relays(&mut ch).await, want);
        admin(&["relay", "rm", "r1"]);
        assert_eq!(next_relays(&mut ch).await, vec![relay("r2", "[::1]:3478")]);
        endpoint.close(0u32.into(), b"");
    });
    let actions: Vec<String> = c
        .audit()
        .iter()
        .filter_map(|e| e["action"].as_str().map(String::from))
        .filter(|a| a.starts_with("relay."))
        .collect();
    assert_eq!(actions.len(), 3, "{actions:?}");
}

/// The next netmap or netmap delta (posture messages skipped).
async fn next_netmap(ch: &mut ward_client::control::Channel) -> CoordinatorMsg {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ch.recv())
            .await
            .expect("a message within 5 s")
            .unwrap()
            .expect("the session stays open");
        if matches!(
            m,
            CoordinatorMsg::Netmap(_) | CoordinatorMsg::NetmapDelta(_)
        ) {
            return m;
        }
    }
}

/// The relay list of the next netmap delta that carries one.
async fn next_relays(ch: &mut ward_client::control::Channel) -> Vec<RelayInfo> {
    loop {
        if let CoordinatorMsg::NetmapDelta(d) = next_netmap(ch).await {
            if let Some(r) = d.relays {
                return r;
            }
        }
    }
}
