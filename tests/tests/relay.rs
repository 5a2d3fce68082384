//! The real `ward-relay` on loopback: it answers address discovery and keeps answering under
//! garbage and a flood; it joins its coordinator (the control protocol's other end, run here
//! with the coordinator's own CA code) and forwards QUIC datagrams between devices holding
//! CA-signed certificates and tickets, refusing forged, foreign, expired and absent tickets
//! while legitimate devices keep relaying; with the real `ward-coordinator`, enrolled devices'
//! tickets open the relay, its load reaches `relay ls`, it forwards on while the coordinator is
//! down and rejoins on its own, and a revocation disconnects at once; the
//! coordinator's relay registry reaches a device's control session (full netmap, then deltas);
//! its plain-UDP data path binds, forwards and refuses spoofed sources, and devices' relay links
//! as the daemon runs them use it on their own, falling back to QUIC datagrams where it is silent.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;
mod relay_control;

use common::{bin, free_udp_port, wait_until, Coordinator, Proc};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;
use ward_shared::discovery::{BindingRequest, BindingResponse};
use ward_shared::relay::{encode_datagram, split_datagram};
use ward_shared::token::EnrollToken;
use ward_shared::wire::{
    self, CoordinatorMsg, DeviceId, DeviceMsg, DeviceUpdate, Hello, RelayInfo,
};

struct Relay {
    proc: Proc,
    udp: SocketAddr,
    metrics: SocketAddr,
}

impl Relay {
    /// Starts `ward-relay serve` with `token` (its credential) and waits for its metrics.
    fn start(tmp: &std::path::Path, token: &str) -> Self {
        Self::start_on(tmp, token, free_udp_port())
    }

    fn start_on(tmp: &std::path::Path, token: &str, port: u16) -> Self {
        let udp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proc = Proc::spawn(
            Command::new(bin("ward-relay"))
                .args(["serve", "--listen", &udp.to_string()])
                .args(["--metrics-listen", &metrics.to_string()])
                .env("WARD_RELAY_TOKEN", token)
                .env("WARD_LOG", "info"),
            tmp.join("relay.log"),
        );
        let mut r = Relay { proc, udp, metrics };
        wait_until("relay metrics answer", Duration::from_secs(10), || {
            if let Ok(Some(status)) = r.proc.child.try_wait() {
                panic!("ward-relay exited ({status}):\n{}", r.proc.log_text());
            }
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    let control = rt.block_on(async { relay_control::ControlServer::start() });
    let relay = Relay::start(tmp.path(), &control.credential("r1"));
    // Welcomed: QUIC is served on the same port from now on.
    wait_until("control session up", Duration::from_secs(10), || {
        relay.metric("ward_relay_control_up") == 1
    });

    // 1. A binding request is answered with the address the request came from.
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let resp = ask(&a, relay.udp, 1).expect("an answer");
    assert_eq!(resp.observed, a.local_addr().unwrap());

    // 2. Garbage, a response sent to the relay, and oversized datagrams get no answer and are
    // counted by reason. Datagrams with the discovery magic are discovery's to refuse; the rest
    // belong to QUIC on the same port, which answers nothing shorter than an Initial.
    let g = UdpSocket::bind("127.0.0.1:0").unwrap();
    let resp_msg = BindingResponse {
        txid: [0; 12],
        observed: g.local_addr().unwrap(),
    }
    .encode();
    let magic = ward_shared::discovery::MAGIC;
    let with_magic = |rest: &[u8]| [&magic[..], rest].concat();
    let garbage: [Vec<u8>; 5] = [
        magic.to_vec(),
        with_magic(b"hello"),
        with_magic(&[0xff; 13]),
        with_magic(&[0xff; 1396]),
        with_magic(&[1, 0, 0, 0]),
    ];
    for d in &garbage {
        g.send_to(d, relay.udp).unwrap();
    }
    for d in [&b""[..], b"hello", &[0xff; 17], &[1, 0, 0, 0]] {
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
            held_peers: Vec::new(),
            holding: None,
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

/// Waits (async) until `f` holds, polling every 20 ms; how long that took.
async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Sends `n` datagrams from `from` to device `to` and counts how many `at` receives from
/// device `source` within a second of the last, each with the body it was sent with.
async fn relay_some(
    from: &quinn::Connection,
    at: &quinn::Connection,
    to: u64,
    source: u64,
    n: u32,
) -> u32 {
    let mut got = 0;
    for i in 0..n {
        let body = format!("wireguard-ciphertext-{i:06}").repeat(8);
        from.send_datagram(encode_datagram(DeviceId(to), body.as_bytes()).into())
            .unwrap();
        // Keep the sender within the path: a few datagrams in flight at a time.
        while let Ok(Ok(d)) = tokio::time::timeout(
            Duration::from_millis(if i + 1 == n { 1000 } else { 0 }),
            at.read_datagram(),
        )
        .await
        {
            let (id, b) = split_datagram(&d).expect("a well-formed relayed datagram");
            assert_eq!(id, DeviceId(source), "the header names the source device");
            assert!(b.starts_with(b"wireguard-ciphertext-"), "body intact");
            got += 1;
        }
    }
    got
}

#[test]
fn relay_forwards_between_ticketed_devices_and_refuses_the_rest() {
    use relay_control::{anonymous_client_config, connect, ticket_signed_by, ControlServer};
    use ward_shared::relay::{RelayToDevice, TICKET_TTL_MS};

    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let control = ControlServer::start();

    // 0. A relay whose secret is wrong is refused by the coordinator and serves no devices
    // (address discovery still works).
    let bad = Relay::start(tmp.path(), &control.credential_with("r0", vec![7; 32]));
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(
        ask(&b, bad.udp, 1).is_some(),
        "discovery answers before any welcome"
    );
    wait_until(
        "the wrong secret is refused",
        Duration::from_secs(10),
        || control.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1,
    );
    assert_eq!(bad.metric("ward_relay_control_up"), 0);
    drop(bad);

    let relay = Relay::start(tmp.path(), &control.credential("r1"));
    wait_until("control session up", Duration::from_secs(10), || {
        relay.metric("ward_relay_control_up") == 1
    });
    let log = relay.proc.log_text();
    assert!(
        !log.contains(&control.credential("r1")),
        "the credential is never logged"
    );

    rt.block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let (alice, bob) = (control.device("alice"), control.device("bob"));

        // 1. Two devices with CA-signed certificates and tickets are welcomed.
        let a = connect(
            &ep,
            relay.udp,
            "r1",
            alice.client_config(),
            control.ticket(1, alice.identity, TICKET_TTL_MS),
        )
        .await
        .unwrap();
        let b = connect(
            &ep,
            relay.udp,
            "r1",
            bob.client_config(),
            control.ticket(2, bob.identity, TICKET_TTL_MS),
        )
        .await
        .unwrap();
        for (s, id) in [(&a, 1), (&b, 2)] {
            let RelayToDevice::Welcome {
                device_id,
                max_datagram,
            } = s.answer
            else {
                panic!("{:?}", s.answer)
            };
            assert_eq!(device_id, DeviceId(id));
            // QUIC's datagram room on a fresh 1200-byte path, or more after MTU discovery.
            assert!(
                (1100..=2048).contains(&max_datagram),
                "max_datagram {max_datagram}"
            );
        }
        assert_eq!(relay.metric("ward_relay_devices"), 2);

        // 2. Datagrams cross the relay both ways, the header naming the source.
        assert_eq!(relay_some(&a.conn, &b.conn, 2, 1, 200).await, 200);
        assert_eq!(relay_some(&b.conn, &a.conn, 1, 2, 200).await, 200);
        assert_eq!(relay.metric("ward_relay_relayed_datagrams_total"), 400);

        // 3. Bad tickets are refused with an Error and a closed connection.
        let carol = control.device("carol");
        let mut forged = control.ticket(3, carol.identity, TICKET_TTL_MS);
        forged.ticket.device_id = DeviceId(2); // claim to be bob
        let mut garbage = control.ticket(3, carol.identity, TICKET_TTL_MS);
        garbage.signature.0 = vec![0xAB; 64];
        let foreign_key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let cases = [
            ("forged", forged, "bad_signature"),
            ("garbage signature", garbage, "bad_signature"),
            (
                "foreign issuer",
                ticket_signed_by(&foreign_key, 3, carol.identity, TICKET_TTL_MS),
                "bad_signature",
            ),
            ("expired", control.ticket(3, carol.identity, -10), "expired"),
            (
                "another certificate's (alice's)",
                control.ticket(1, alice.identity, TICKET_TTL_MS),
                "wrong_certificate",
            ),
        ];
        for (what, ticket, reason) in cases {
            let s = connect(&ep, relay.udp, "r1", carol.client_config(), ticket)
                .await
                .unwrap();
            let RelayToDevice::Error { message, .. } = &s.answer else {
                panic!("{what}: {:?}", s.answer)
            };
            assert!(message.contains(reason), "{what}: {message}");
            let closed = tokio::time::timeout(Duration::from_secs(2), s.conn.closed()).await;
            assert!(closed.is_ok(), "{what}: connection closed");
        }
        assert_eq!(
            relay.metric("ward_relay_ticket_refusals_total{reason=\"bad_signature\"}"),
            3
        );
        assert_eq!(
            relay.metric("ward_relay_ticket_refusals_total{reason=\"expired\"}"),
            1
        );
        assert_eq!(
            relay.metric("ward_relay_ticket_refusals_total{reason=\"wrong_certificate\"}"),
            1
        );
        // No client certificate, or one from another CA: TLS refuses the handshake.
        let anon = ep
            .connect_with(
                anonymous_client_config(&control.ca_der),
                relay.udp,
                "r1.relay.ward.internal",
            )
            .unwrap();
        let anon_ok = match anon.await {
            Ok(c) => tokio::time::timeout(Duration::from_secs(2), c.closed())
                .await
                .is_ok(),
            Err(_) => true,
        };
        assert!(anon_ok, "a device without a certificate is refused");
        let other = ControlServer::start();
        let mallory = other.device("mallory");
        let r = connect(
            &ep,
            relay.udp,
            "r1",
            mallory.client_config(),
            other.ticket(3, mallory.identity, TICKET_TTL_MS),
        )
        .await;
        assert!(
            r.is_err(),
            "a certificate from another CA is refused: {:?}",
            r.map(|s| s.answer)
        );

        // 4. 1 000 connection attempts without tickets (half send garbage, half nothing and
        // leave) while alice and bob keep relaying; memory stays bounded.
        let rss_before = relay.rss_kib();
        let cfg = carol.client_config();
        let flood = {
            let (ep, cfg, addr) = (ep.clone(), cfg.clone(), relay.udp);
            tokio::spawn(async move {
                // (attempts refused or left, garbage senders not closed within 3 s)
                let mut refused_or_closed = 0;
                let mut slow = 0;
                for batch in 0..20 {
                    let mut set = tokio::task::JoinSet::new();
                    for i in 0..50 {
                        let (ep, cfg) = (ep.clone(), cfg.clone());
                        set.spawn(async move {
                            let Ok(connecting) =
                                ep.connect_with(cfg, addr, "r1.relay.ward.internal")
                            else {
                                return (true, false);
                            };
                            let Ok(conn) = connecting.await else {
                                return (true, false);
                            };
                            if (batch + i) % 2 == 0 {
                                let Ok((mut send, _recv)) = conn.open_bi().await else {
                                    return (true, false);
                                };
                                let sent = std::time::Instant::now();
                                let _ = send.write_all(b"\x00\x00\x00\x05hello").await;
                                // Garbage is refused at once; the hello timeout (5 s) would
                                // close it anyway, so the time is what tells them apart.
                                let closed =
                                    tokio::time::timeout(Duration::from_secs(10), conn.closed())
                                        .await
                                        .is_ok();
                                (closed, sent.elapsed() > Duration::from_secs(3))
                            } else {
                                conn.close(0u32.into(), b"bye");
                                (true, false)
                            }
                        });
                    }
                    while let Some(r) = set.join_next().await {
                        let (closed, late) = r.unwrap_or((false, false));
                        refused_or_closed += usize::from(closed);
                        slow += usize::from(late);
                    }
                }
                (refused_or_closed, slow)
            })
        };
        let mut relayed_during = 0;
        while !flood.is_finished() {
            relayed_during += relay_some(&a.conn, &b.conn, 2, 1, 20).await;
        }
        let (refused, slow) = flood.await.unwrap();
        assert_eq!(
            refused, 1000,
            "every ticketless attempt was refused or left"
        );
        // A straggler on a loaded machine (a lost datagram, a late turn) is noise; garbage
        // left to the hello timeout would make all 500 slow.
        assert!(
            slow <= 10,
            "{slow} of 500 garbage senders were not closed within 3 s"
        );
        assert!(
            relayed_during > 0,
            "alice and bob kept relaying during the flood"
        );
        eprintln!(
            "relayed {relayed_during} datagrams alice -> bob during 1 000 ticketless attempts"
        );
        assert_eq!(relay_some(&a.conn, &b.conn, 2, 1, 100).await, 100);
        eventually(
            "ticketless connections gone",
            Duration::from_secs(10),
            || relay.metric("ward_relay_pending_connections") == 0,
        )
        .await;
        assert_eq!(relay.metric("ward_relay_devices"), 2);
        let rss_after = relay.rss_kib();
        eprintln!("relay RSS: {rss_before} KiB before 1 000 attempts, {rss_after} KiB after");
        assert!(
            rss_after < rss_before + 32 * 1024,
            "RSS grew from {rss_before} to {rss_after} KiB"
        );
        assert!(relay.metric("ward_relay_ticket_refusals_total{reason=\"protocol\"}") >= 400);

        // 5. Datagrams to nobody, garbage and oversized ones are dropped by reason.
        a.conn
            .send_datagram(encode_datagram(DeviceId(77), b"x").into())
            .unwrap();
        a.conn.send_datagram(vec![1, 2, 3].into()).unwrap();
        eventually("drops counted", Duration::from_secs(5), || {
            relay.metric("ward_relay_dropped_total{reason=\"unknown_destination\"}") == 1
                && relay.metric("ward_relay_dropped_total{reason=\"malformed\"}") == 1
        })
        .await;

        // 6. A newer connection of the same device replaces the older one.
        let b2 = connect(
            &ep,
            relay.udp,
            "r1",
            bob.client_config(),
            control.ticket(2, bob.identity, TICKET_TTL_MS),
        )
        .await
        .unwrap();
        assert!(matches!(b2.answer, RelayToDevice::Welcome { .. }));
        tokio::time::timeout(Duration::from_secs(2), b.conn.closed())
            .await
            .expect("the older connection closes");
        assert_eq!(relay_some(&a.conn, &b2.conn, 2, 1, 50).await, 50);

        // 7. Discovery keeps working on the same port.
        let d = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            ask(&d, relay.udp, 4).unwrap().observed,
            d.local_addr().unwrap()
        );

        // 8. The relay reports its load from the same counters.
        eventually("a load report with traffic", Duration::from_secs(8), || {
            control
                .loads
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.devices == 2 && l.datagrams_relayed >= 550)
        })
        .await;

        // 9. A revoked device is disconnected and its ticket refused.
        control.revoke(&[2]);
        tokio::time::timeout(Duration::from_secs(3), b2.conn.closed())
            .await
            .expect("revoked device disconnected");
        let r = connect(
            &ep,
            relay.udp,
            "r1",
            bob.client_config(),
            control.ticket(2, bob.identity, TICKET_TTL_MS),
        )
        .await
        .unwrap();
        assert!(
            matches!(r.answer, RelayToDevice::Error { .. }),
            "{:?}",
            r.answer
        );
        assert_eq!(
            relay.metric("ward_relay_ticket_refusals_total{reason=\"revoked\"}"),
            1
        );

        // 10. The certificate is renewed at half its life, and new devices are served with it.
        eventually("certificate renewed", Duration::from_secs(25), || {
            control.renewals.load(std::sync::atomic::Ordering::SeqCst) >= 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let dave = control.device("dave");
        let d = connect(
            &ep,
            relay.udp,
            "r1",
            dave.client_config(),
            control.ticket(4, dave.identity, TICKET_TTL_MS),
        )
        .await
        .unwrap();
        assert!(
            matches!(d.answer, RelayToDevice::Welcome { .. }),
            "{:?}",
            d.answer
        );
        assert_eq!(relay_some(&a.conn, &d.conn, 4, 1, 20).await, 20);
        ep.close(0u32.into(), b"");
    });
    assert!(!relay.proc.log_text().contains(&control.credential("r1")));
}

/// An enrolled device's control session, after `Hello`, with a relay ticket.
struct Enrolled {
    ch: ward_client::control::Channel,
    device: relay_control::Device,
    ticket: ward_shared::relay::SignedTicket,
}

/// Enrolls `name` with `token`, opens its session and asks for a relay ticket.
async fn enroll_with_ticket(c: &Coordinator, token: &str, name: &str) -> Enrolled {
    let tok = EnrollToken::parse(token).unwrap();
    let (enrolled, key) = ward_client::control::enroll(&tok, name, "test")
        .await
        .unwrap();
    let endpoint = ward_client::control::client_endpoint().unwrap();
    let cfg = ward_client::control::session_config(&enrolled.ca_der.0, &enrolled.cert_der.0, &key)
        .unwrap();
    let addr = format!("127.0.0.1:{}", c.port).parse().unwrap();
    let mut ch = ward_client::control::Channel::open(&endpoint, cfg, addr)
        .await
        .unwrap();
    ch.send(&DeviceMsg::Hello(Hello {
        held_peers: Vec::new(),
        holding: None,
        protocol: wire::PROTOCOL_VERSION,
        os: "test".into(),
        version: "0".into(),
        update: DeviceUpdate::default(),
    }))
    .await
    .unwrap();
    ch.send(&DeviceMsg::RelayTicketRequest).await.unwrap();
    let ticket = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ch.recv())
            .await
            .expect("a message within 5 s")
            .unwrap()
            .expect("the session stays open");
        if let CoordinatorMsg::RelayTicket { ticket } = m {
            break ticket;
        }
    };
    let device =
        relay_control::Device::enrolled(enrolled.cert_der.0, &key, enrolled.ca_der.0.clone());
    assert_eq!(ticket.ticket.cert_identity, device.identity);
    Enrolled { ch, device, ticket }
}

#[test]
fn relay_serves_devices_of_a_real_coordinator() {
    use ward_shared::relay::RelayToDevice;

    let tmp = tempfile::tempdir().unwrap();
    let mut c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "rita"]);
    let port = free_udp_port();
    let cred = c.admin(&["relay", "add", "r1", "--addr", &format!("127.0.0.1:{port}")]);
    let relay = Relay::start_on(tmp.path(), cred.trim(), port);
    wait_until("control session up", Duration::from_secs(10), || {
        relay.metric("ward_relay_control_up") == 1
    });
    let online = || c.admin_json(&["relay", "ls"])[0]["online"] == true;
    wait_until("relay ls says online", Duration::from_secs(5), online);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = enroll_with_ticket(&c, &c.token(&["--user", "rita"]), "rita1").await;
        let b = enroll_with_ticket(&c, &c.token(&["--user", "rita"]), "rita2").await;
        let (ida, idb) = (a.ticket.ticket.device_id.0, b.ticket.ticket.device_id.0);
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let sa = relay_control::connect(
            &ep,
            relay.udp,
            "r1",
            a.device.client_config(),
            a.ticket.clone(),
        )
        .await
        .unwrap();
        let sb = relay_control::connect(
            &ep,
            relay.udp,
            "r1",
            b.device.client_config(),
            b.ticket.clone(),
        )
        .await
        .unwrap();
        assert!(
            matches!(sa.answer, RelayToDevice::Welcome { device_id, .. } if device_id.0 == ida)
        );
        assert!(
            matches!(sb.answer, RelayToDevice::Welcome { device_id, .. } if device_id.0 == idb)
        );
        assert_eq!(relay_some(&sa.conn, &sb.conn, idb, ida, 100).await, 100);
        assert_eq!(relay_some(&sb.conn, &sa.conn, ida, idb, 100).await, 100);

        // The relay's load reaches `relay ls`.
        eventually("relay ls shows the load", Duration::from_secs(8), || {
            let ls = c.admin_json(&["relay", "ls"]);
            ls[0]["devices"] == 2 && ls[0]["bytes_relayed"].as_u64().unwrap_or(0) > 0
        })
        .await;

        // The coordinator goes away: the relay keeps forwarding with what it has, and joins
        // again on its own when the coordinator is back.
        c.proc.as_mut().unwrap().term();
        let down = eventually("control session down", Duration::from_secs(40), || {
            relay.metric("ward_relay_control_up") == 0
        })
        .await;
        assert_eq!(relay_some(&sa.conn, &sb.conn, idb, ida, 50).await, 50);
        c.start();
        let up = eventually("control session up again", Duration::from_secs(35), || {
            relay.metric("ward_relay_control_up") == 1
        })
        .await;
        eprintln!("control session seen down {down:?} after the coordinator stopped, up {up:?} after it restarted");
        assert_eq!(relay_some(&sb.conn, &sa.conn, ida, idb, 50).await, 50);

        // A revoked device is disconnected from the relay at once.
        c.admin(&["device", "revoke", "rita2"]);
        tokio::time::timeout(Duration::from_secs(5), sb.conn.closed())
            .await
            .expect("the revoked device's relay connection closes");
        let again = relay_control::connect(
            &ep,
            relay.udp,
            "r1",
            b.device.client_config(),
            b.ticket.clone(),
        )
        .await
        .unwrap();
        assert!(
            matches!(again.answer, RelayToDevice::Error { .. }),
            "{:?}",
            again.answer
        );
        drop((a.ch, b.ch));
        ep.close(0u32.into(), b"");
    });
}

/// One source sends hellos as fast as it can (forged tickets, as an unauthenticated party
/// would): past the per-source burst they are refused as `rate_limited` before any ticket is
/// checked, counted in the ticket refusal metrics, while a device from another address still
/// connects with its ticket.
#[test]
fn a_flood_of_hellos_from_one_source_is_refused_past_its_burst() {
    use relay_control::{connect, ticket_signed_by, ControlServer};
    use ward_shared::relay::{RelayToDevice, TICKET_TTL_MS};
    const HELLOS: usize = 400;
    const AT_ONCE: usize = 40;

    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let control = ControlServer::start();
    let relay = Relay::start(tmp.path(), &control.credential("r1"));
    wait_until("control session up", Duration::from_secs(10), || {
        relay.metric("ward_relay_control_up") == 1
    });
    rt.block_on(async {
        let flooder = quinn::Endpoint::client("127.0.0.3:0".parse().unwrap()).unwrap();
        let mallory = control.device("mallory");
        let forger = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let (mut checked, mut limited, mut other) = (0usize, 0usize, 0usize);
        let start = std::time::Instant::now();
        for _ in 0..HELLOS / AT_ONCE {
            let mut tries = tokio::task::JoinSet::new();
            for _ in 0..AT_ONCE {
                let ticket = ticket_signed_by(&forger, 9, mallory.identity, TICKET_TTL_MS);
                let (ep, cfg, udp) = (flooder.clone(), mallory.client_config(), relay.udp);
                tries.spawn(async move { connect(&ep, udp, "r1", cfg, ticket).await.map(|s| s.answer) });
            }
            while let Some(r) = tries.join_next().await {
                match r.unwrap() {
                    Ok(RelayToDevice::Error { message, .. }) if message.contains("rate_limited") => {
                        limited += 1
                    }
                    Ok(RelayToDevice::Error { message, .. })
                        if message.contains("bad_signature") =>
                    {
                        checked += 1
                    }
                    _ => other += 1,
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{HELLOS} hellos from one source in {secs:.2} s ({:.0}/s): {checked} had their ticket \
             checked, {limited} refused as rate_limited, {other} other",
            HELLOS as f64 / secs
        );
        // The burst (64), then 8 a second.
        assert!(checked >= 64, "the burst is checked: {checked}");
        assert!(
            checked as f64 <= 64.0 + 8.0 * secs + 1.0,
            "{checked} checked in {secs:.2} s"
        );
        assert!(limited >= HELLOS / 2, "{limited}");
        assert_eq!(
            relay.metric("ward_relay_ticket_refusals_total{reason=\"rate_limited\"}"),
            limited as u64
        );

        // A device from another address is not held up by the flood.
        let ep = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
        let alice = control.device("alice");
        let s = connect(
            &ep,
            relay.udp,
            "r1",
            alice.client_config(),
            control.ticket(1, alice.identity, TICKET_TTL_MS),
        )
        .await
        .unwrap();
        assert!(
            matches!(s.answer, RelayToDevice::Welcome { device_id, .. } if device_id == DeviceId(1)),
            "{:?}",
            s.answer
        );
    });
}

/// The plain-UDP data path on the real relay: two version-2 devices bind their UDP sockets
/// (token and nonce over QUIC, the confirm in plain UDP, `UdpBound` back on the stream), then
/// WireGuard datagrams cross the relay in plain UDP both ways, and a QUIC datagram to a bound
/// device arrives in plain UDP; a version-1 device keeps QUIC datagrams (plain UDP to it
/// arrives as a QUIC datagram) and breaks the protocol if it asks for a binding. A datagram
/// with a bound token from another source (spoofed), a replayed confirm, unknown tokens and
/// garbage are counted and never forwarded, and move no binding.
#[test]
fn plain_udp_path_binds_forwards_and_refuses_spoofed_sources() {
    use relay_control::{connect_version, ControlServer};
    use ward_shared::relay::{
        DeviceToRelay, RelayToDevice, RELAY_PROTOCOL_UDP, RELAY_PROTOCOL_VERSION, TICKET_TTL_MS,
    };

    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let control = ControlServer::start();
    let relay = Relay::start(tmp.path(), &control.credential("r1"));
    wait_until("control session up", Duration::from_secs(10), || {
        relay.metric("ward_relay_control_up") == 1
    });

    /// Reads one plain-UDP datagram (or `None` within `wait`).
    fn recv(sock: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
        sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    }
    fn data(token: &[u8], to: u64, body: &[u8]) -> Vec<u8> {
        let mut d = vec![0x02];
        d.extend_from_slice(token);
        d.extend_from_slice(&to.to_be_bytes());
        d.extend_from_slice(body);
        d
    }

    rt.block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let (alice, bob, carol) = (
            control.device("alice"),
            control.device("bob"),
            control.device("carol"),
        );
        let mut sessions = Vec::new();
        for (dev, id, version) in [
            (&alice, 1, RELAY_PROTOCOL_UDP),
            (&bob, 2, RELAY_PROTOCOL_UDP),
            (&carol, 3, RELAY_PROTOCOL_VERSION),
        ] {
            let s = connect_version(
                &ep,
                relay.udp,
                "r1",
                dev.client_config(),
                control.ticket(id, dev.identity, TICKET_TTL_MS),
                version,
            )
            .await
            .unwrap();
            assert!(
                matches!(s.answer, RelayToDevice::Welcome { .. }),
                "{:?}",
                s.answer
            );
            sessions.push(s);
        }
        let mut carol_s = sessions.pop().unwrap();
        let (mut a, mut b) = {
            let b = sessions.pop().unwrap();
            (sessions.pop().unwrap(), b)
        };

        // 1. Both version-2 devices bind a UDP socket each.
        let bind = async |s: &mut relay_control::RelaySession, sock: &UdpSocket| {
            s.send
                .write_all(&wire::encode(&DeviceToRelay::UdpBind))
                .await
                .unwrap();
            let m = tokio::time::timeout(Duration::from_secs(5), s.rx.next::<RelayToDevice>())
                .await
                .unwrap();
            let Some(RelayToDevice::UdpBinding { token, nonce }) = m else {
                panic!("{m:?}")
            };
            let mut confirm = vec![0x01];
            confirm.extend_from_slice(&token);
            confirm.extend_from_slice(&nonce);
            sock.send_to(&confirm, relay.udp).unwrap();
            let m = tokio::time::timeout(Duration::from_secs(5), s.rx.next::<RelayToDevice>())
                .await
                .unwrap();
            assert_eq!(m, Some(RelayToDevice::UdpBound));
            (token, confirm)
        };
        let ua = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ub = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (ta, confirm_a) = bind(&mut a, &ua).await;
        let (tb, _) = bind(&mut b, &ub).await;
        assert_ne!(ta, tb, "one token per connection");
        assert_eq!(relay.metric("ward_relay_udp_bound_total"), 2);

        // 2. Plain UDP both ways: the relay rewrites token and id for the destination.
        for i in 0..50u32 {
            let body = format!("wireguard-ciphertext-{i:04}");
            ua.send_to(&data(&ta, 2, body.as_bytes()), relay.udp)
                .unwrap();
            let got = recv(&ub, Duration::from_secs(2)).expect("bob receives in plain UDP");
            assert_eq!(got, data(&tb, 1, body.as_bytes()), "datagram {i}");
        }
        ub.send_to(&data(&tb, 1, b"reply"), relay.udp).unwrap();
        assert_eq!(
            recv(&ua, Duration::from_secs(2)),
            Some(data(&ta, 2, b"reply"))
        );
        assert_eq!(relay.metric("ward_relay_udp_received_total"), 51);
        // A QUIC datagram to a bound device leaves in plain UDP.
        a.conn
            .send_datagram(encode_datagram(DeviceId(2), b"over-quic").into())
            .unwrap();
        assert_eq!(
            recv(&ub, Duration::from_secs(2)),
            Some(data(&tb, 1, b"over-quic"))
        );
        assert!(relay.metric("ward_relay_udp_sent_total") >= 52);

        // 3. Plain UDP to a version-1 device arrives as a QUIC datagram.
        ua.send_to(&data(&ta, 3, b"to-carol"), relay.udp).unwrap();
        let d = tokio::time::timeout(Duration::from_secs(2), carol_s.conn.read_datagram())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(split_datagram(&d), Some((DeviceId(1), &b"to-carol"[..])));

        // 4. Spoofed source: alice's token from another socket is dropped, nothing reaches
        // bob, and alice's binding still holds. A replayed confirm binds nothing.
        let evil = UdpSocket::bind("127.0.0.1:0").unwrap();
        // No QUIC packet was taken for a plain-UDP one (the relay does not grease QUIC's
        // fixed bit, so every QUIC packet has it set).
        for reason in ["garbage", "unknown_token", "bad_nonce", "wrong_source"] {
            assert_eq!(
                relay.metric(&format!(
                    "ward_relay_udp_dropped_total{{reason=\"{reason}\"}}"
                )),
                0,
                "{reason}"
            );
        }
        evil.send_to(&data(&ta, 2, b"spoofed"), relay.udp).unwrap();
        evil.send_to(&confirm_a, relay.udp).unwrap();
        evil.send_to(&data(&ta, 2, b"spoofed-after-replay"), relay.udp)
            .unwrap();
        evil.send_to(&data(&[7; 16], 2, b"unknown-token"), relay.udp)
            .unwrap();
        evil.send_to(&[0x02, 1, 2, 3], relay.udp).unwrap();
        wait_until(
            "the spoofed datagrams are counted",
            Duration::from_secs(5),
            || relay.metric("ward_relay_udp_dropped_total{reason=\"wrong_source\"}") == 2,
        );
        assert_eq!(
            recv(&ub, Duration::from_millis(300)),
            None,
            "bob got nothing"
        );
        assert_eq!(
            relay.metric("ward_relay_udp_dropped_total{reason=\"bad_nonce\"}"),
            1
        );
        assert_eq!(
            relay.metric("ward_relay_udp_dropped_total{reason=\"unknown_token\"}"),
            1
        );
        assert_eq!(
            relay.metric("ward_relay_udp_dropped_total{reason=\"garbage\"}"),
            1
        );
        assert_eq!(relay.metric("ward_relay_udp_bound_total"), 2);
        ua.send_to(&data(&ta, 2, b"still-alice"), relay.udp)
            .unwrap();
        assert_eq!(
            recv(&ub, Duration::from_secs(2)),
            Some(data(&tb, 1, b"still-alice"))
        );
        // Discovery on the same port still answers.
        assert!(ask(&evil, relay.udp, 9).is_some());

        // 5. A version-1 connection asking for a binding breaks the protocol: closed.
        carol_s
            .send
            .write_all(&wire::encode(&DeviceToRelay::UdpBind))
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(3), carol_s.conn.closed()).await;
        assert!(closed.is_ok(), "version-1 UdpBind closes the connection");

        // 6. Once alice's connection ends, her token is void.
        a.conn.close(0u32.into(), b"bye");
        wait_until("alice gone", Duration::from_secs(5), || {
            relay.metric("ward_relay_devices") == 1
        });
        ua.send_to(&data(&ta, 2, b"after-close"), relay.udp)
            .unwrap();
        wait_until("the void token is counted", Duration::from_secs(5), || {
            relay.metric("ward_relay_udp_dropped_total{reason=\"unknown_token\"}") == 2
        });
        assert_eq!(recv(&ub, Duration::from_millis(300)), None);
    });
}

/// A UDP forwarder in front of `relay` that passes QUIC (both ways, one upstream socket per
/// client address) and drops plain-UDP datagrams (first byte without QUIC's top bits): a path
/// where the relay's plain-UDP data path is silent.
async fn quic_only_proxy(relay: SocketAddr) -> SocketAddr {
    use std::collections::HashMap;
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    let is_quic = |d: &[u8]| d.first().is_some_and(|b| b & 0xc0 != 0);
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        while let Ok((n, src)) = front.recv_from(&mut buf).await {
            if !is_quic(&buf[..n]) {
                continue;
            }
            let up = match ups.get(&src) {
                Some(u) => u.clone(),
                None => {
                    let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    u.connect(relay).await.unwrap();
                    let (back, front) = (u.clone(), front.clone());
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 65536];
                        while let Ok(n) = back.recv(&mut b).await {
                            if is_quic(&b[..n]) {
                                let _ = front.send_to(&b[..n], src).await;
                            }
                        }
                    });
                    ups.insert(src, u.clone());
                    u
                }
            };
            let _ = up.send(&buf[..n]).await;
        }
    });
    addr
}

/// Devices' relay links exactly as the daemon runs them, against the real relay: two links
/// bind the relay's plain-UDP path on their own (forwarding version 2) and relay both ways in
/// plain UDP, nothing as QUIC datagrams; a link whose plain UDP is silent (a path that passes
/// only QUIC) gives up on it after the bind timeout, counts the fallback and keeps relaying
/// over QUIC datagrams, to and from a bound device.
#[test]
fn device_links_relay_over_plain_udp_and_fall_back_to_quic_where_it_is_silent() {
    use relay_control::{ControlServer, Device};
    use ward_client::daemon::relay_harness::RelayLinkHarness;
    use ward_shared::relay::TICKET_TTL_MS;

    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let control = ControlServer::start();
    let relay = Relay::start(tmp.path(), &control.credential("r1"));
    wait_until("control session up", Duration::from_secs(10), || {
        relay.metric("ward_relay_control_up") == 1
    });
    let link = |dev: &Device, id: u64, addr: String| {
        let configs = ward_client::control::relay_configs(
            &dev.ca_der,
            &dev.cert_der,
            &dev.key.serialize_pem(),
        )
        .unwrap();
        RelayLinkHarness::connect(
            "r1",
            &addr,
            control.ticket(id, dev.identity, TICKET_TTL_MS),
            configs,
        )
        .unwrap()
    };

    rt.block_on(async {
        let (alice, bob, carol) = (
            control.device("alice"),
            control.device("bob"),
            control.device("carol"),
        );
        let mut a = link(&alice, 1, relay.udp.to_string());
        let mut b = link(&bob, 2, relay.udp.to_string());
        a.wait_up(Duration::from_secs(10)).await.unwrap();
        b.wait_up(Duration::from_secs(10)).await.unwrap();

        // 1. Both links bind on their own.
        eventually("both links bound", Duration::from_secs(10), || {
            a.plain_udp_bound() && b.plain_udp_bound()
        })
        .await;
        assert_eq!(relay.metric("ward_relay_udp_bound_total"), 2);

        // 2. Both ways in plain UDP, every datagram intact, none as a QUIC datagram.
        let n = 300u32;
        for i in 0..n {
            assert!(a.send(2, format!("alice-to-bob-{i:04}").as_bytes()));
        }
        let mut got = std::collections::BTreeSet::new();
        while got.len() < n as usize {
            let Some((from, d)) = b.recv(Duration::from_secs(3)).await else {
                break;
            };
            assert_eq!(from, 1);
            got.insert(String::from_utf8(d).unwrap());
        }
        let want: std::collections::BTreeSet<String> =
            (0..n).map(|i| format!("alice-to-bob-{i:04}")).collect();
        assert_eq!(got, want, "every datagram arrived");
        assert!(b.send(1, b"bob-to-alice"));
        assert_eq!(
            a.recv(Duration::from_secs(3)).await,
            Some((2, b"bob-to-alice".to_vec()))
        );
        let (pa, pb) = (a.plain_counts(), b.plain_counts());
        assert_eq!(pa.sent, u64::from(n));
        assert_eq!(pb.received, u64::from(n));
        assert_eq!((pb.sent, pa.received), (1, 1));
        assert_eq!((a.quic_sent(), b.quic_sent()), (0, 0), "nothing over QUIC");
        assert_eq!((pa.dropped_in, pb.dropped_in, pa.fallbacks), (0, 0, 0));
        assert!(relay.metric("ward_relay_udp_received_total") > u64::from(n));
        assert!(relay.metric("ward_relay_udp_sent_total") > u64::from(n));

        // 3. Carol's path passes QUIC only: her link asks, never gets bound, falls back after
        // the bind timeout and relays over QUIC datagrams, both ways with alice.
        let proxy = quic_only_proxy(relay.udp).await;
        let mut c = link(&carol, 3, proxy.to_string());
        c.wait_up(Duration::from_secs(10)).await.unwrap();
        eventually("carol's link falls back", Duration::from_secs(8), || {
            c.plain_counts().fallbacks == 1
        })
        .await;
        assert!(!c.plain_udp_bound());
        // QUIC datagrams are unreliable: one lost on a loaded machine is sent again.
        let mut arrived = None;
        for _ in 0..10 {
            assert!(c.send(1, b"carol-to-alice"));
            arrived = a.recv(Duration::from_millis(500)).await;
            if arrived.is_some() {
                break;
            }
        }
        assert_eq!(arrived, Some((3, b"carol-to-alice".to_vec())));
        let mut arrived = None;
        for _ in 0..10 {
            assert!(a.send(3, b"alice-to-carol"));
            arrived = c.recv(Duration::from_millis(500)).await;
            if arrived.is_some() {
                break;
            }
        }
        assert_eq!(arrived, Some((1, b"alice-to-carol".to_vec())));
        assert!(
            c.quic_sent() >= 1,
            "carol's datagrams went as QUIC datagrams"
        );
        assert_eq!(c.plain_counts().sent, 0);
        assert!(a.plain_udp_bound(), "alice's link is still bound");
        assert_eq!(relay.metric("ward_relay_udp_bound_total"), 2);
    });
}
