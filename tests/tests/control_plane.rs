//! Enrollment, tokens, revocation, bad input, durability and the audit chain, with
//! the real `ward-coordinator` and `ward` binaries over QUIC on loopback.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::{wait_until, Agent, Coordinator};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use ward_shared::token::EnrollToken;
use ward_shared::wire::{self, CoordinatorMsg, DeviceMsg, ErrorCode};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn three_devices_enroll_and_see_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "alice", "--group", "eng"]);
    c.allow_user_devices("alice");
    let agents: Vec<Agent> = (1..=3)
        .map(|i| Agent::start(tmp.path(), &format!("a{i}")))
        .collect();
    for (i, a) in agents.iter().enumerate() {
        let tok = c.token(&["--user", "alice"]);
        let out = a.up(&tok, &format!("laptop{}", i + 1));
        assert!(out.status.success(), "up failed: {}", stderr(&out));
    }
    let devs = c.admin_json(&["device", "ls"]);
    let devs = devs.as_array().unwrap();
    assert_eq!(devs.len(), 3);
    let v4: BTreeSet<&str> = devs.iter().map(|d| d["ipv4"].as_str().unwrap()).collect();
    let v6: BTreeSet<&str> = devs.iter().map(|d| d["ipv6"].as_str().unwrap()).collect();
    assert_eq!(v4.len(), 3, "addresses must be distinct: {devs:?}");
    assert_eq!(v6.len(), 3);
    for (i, a) in agents.iter().enumerate() {
        let me = format!("laptop{}", i + 1);
        let want: Vec<String> = (1..=3)
            .map(|j| format!("laptop{j}"))
            .filter(|n| *n != me)
            .collect();
        wait_until("peers in status", Duration::from_secs(5), || {
            a.peer_names() == want
        });
        assert_eq!(a.status()["state"], "connected");
    }
    // Human output too.
    let table = c.admin(&["device", "ls"]);
    assert!(
        table.contains("laptop2") && table.contains("HOSTNAME"),
        "{table}"
    );
}

#[test]
fn default_deny_without_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "zed"]);
    let agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::start(tmp.path(), &format!("z{i}")))
        .collect();
    for (i, a) in agents.iter().enumerate() {
        assert!(a
            .up(&c.token(&["--user", "zed"]), &format!("z{}", i + 1))
            .status
            .success());
    }
    wait_until("connected", Duration::from_secs(5), || {
        agents[0].status()["state"] == "connected"
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        agents[0].peer_names().is_empty(),
        "no policy must mean no peers"
    );
    assert!(agents[0].status()["inbound"].as_array().unwrap().is_empty());
    c.allow_user_devices("zed");
    wait_until("policy reaches the devices", Duration::from_secs(1), || {
        agents[0].peer_names() == vec!["z2".to_string()]
    });
    // An empty policy takes it all away again.
    c.apply_policy("# nothing is allowed\n");
    wait_until("empty policy removes peers", Duration::from_secs(1), || {
        agents[0].peer_names().is_empty()
    });
}

#[test]
fn token_edge_cases_are_refused_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "bob"]);
    let a = Agent::start(tmp.path(), "a");

    // Expired.
    let tok = c.token(&["--user", "bob", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1300));
    let out = a.up(&tok, "x");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("token has expired"),
        "{}",
        stderr(&out)
    );

    // Revoked.
    let tok = c.token(&["--user", "bob"]);
    let id = EnrollToken::parse(&tok).unwrap().id_hex();
    c.admin(&["token", "revoke", &id]);
    let out = a.up(&tok, "x");
    assert!(
        stderr(&out).contains("token has been revoked"),
        "{}",
        stderr(&out)
    );

    // Forged secret.
    let mut t = EnrollToken::parse(&c.token(&["--user", "bob"])).unwrap();
    t.secret = ward_shared::secret::Secret::new(vec![0x42; 32]);
    let out = a.up(&t.encode(), "x");
    assert!(
        stderr(&out).contains("token is not valid"),
        "{}",
        stderr(&out)
    );

    // Forged CA fingerprint: the device refuses the coordinator before sending the secret.
    let good = c.token(&["--user", "bob"]);
    let mut t = EnrollToken::parse(&good).unwrap();
    t.ca_sha256[0] ^= 1;
    let out = a.up(&t.encode(), "x");
    assert!(
        stderr(&out).contains("CA fingerprint mismatch"),
        "{}",
        stderr(&out)
    );

    // Garbage token string.
    let out = a.up("ward1-AAAA", "x");
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));

    // The good token still works after all that, once.
    let out = a.up(&good, "laptop");
    assert!(out.status.success(), "{}", stderr(&out));
    let b = Agent::start(tmp.path(), "b");
    let out = b.up(&good, "other");
    assert!(
        stderr(&out).contains("token has already been used"),
        "{}",
        stderr(&out)
    );
    // Already enrolled: a second token is refused locally with a clear message.
    let out = a.up(&c.token(&["--user", "bob"]), "again");
    assert!(
        stderr(&out).contains("already enrolled"),
        "{}",
        stderr(&out)
    );

    let refused: Vec<String> = c
        .audit()
        .iter()
        .filter(|e| e["action"] == "enroll.refused")
        .map(|e| e["detail"]["reason"].as_str().unwrap_or("").to_string())
        .collect();
    for why in [
        "token has expired",
        "token has been revoked",
        "token is not valid (wrong secret)",
        "token has already been used",
    ] {
        assert!(
            refused.iter().any(|r| r == why),
            "audit lacks {why:?}: {refused:?}"
        );
    }
    assert_eq!(c.admin_json(&["device", "ls"]).as_array().unwrap().len(), 1);
}

#[test]
fn hundred_way_race_on_single_use_token() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "carol"]);
    let tok = EnrollToken::parse(&c.token(&["--user", "carol"])).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results: Vec<Result<String, String>> = rt.block_on(async {
        let mut set = Vec::new();
        for i in 0..100 {
            let tok = tok.clone();
            set.push(tokio::spawn(async move {
                ward_client::control::enroll(&tok, &format!("racer{i}"), "test")
                    .await
                    .map(|(e, _)| e.hostname.to_string())
                    .map_err(|e| format!("{e:#}"))
            }));
        }
        let mut out = Vec::new();
        for h in set {
            out.push(h.await.unwrap());
        }
        out
    });
    let ok: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let errs: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(ok.len(), 1, "exactly one enrollment must win: {results:?}");
    assert!(
        errs.iter()
            .all(|e| e.contains("token has already been used")),
        "{errs:?}"
    );
    assert_eq!(c.admin_json(&["device", "ls"]).as_array().unwrap().len(), 1);
    let audit = c.audit();
    let used = audit
        .iter()
        .filter(|e| {
            e["action"] == "enroll.refused"
                && e["detail"]["reason"] == "token has already been used"
        })
        .count();
    assert_eq!(used, 99, "every losing attempt is audited with its reason");
    assert_eq!(
        audit
            .iter()
            .filter(|e| e["action"] == "device.enroll")
            .count(),
        1
    );
    c.admin(&["audit", "verify"]);
}

#[test]
fn revocation_closes_session_and_drops_device_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "dave"]);
    c.allow_user_devices("dave");
    let mut agents: Vec<Agent> = (1..=3)
        .map(|i| Agent::start(tmp.path(), &format!("r{i}")))
        .collect();
    for (i, a) in agents.iter().enumerate() {
        assert!(a
            .up(&c.token(&["--user", "dave"]), &format!("r{}", i + 1))
            .status
            .success());
    }
    for a in &agents {
        wait_until("two peers", Duration::from_secs(5), || {
            a.peer_names().len() == 2
        });
    }
    let t0 = Instant::now();
    c.admin(&["device", "revoke", "r2"]);
    let closed = wait_until(
        "revoked device's session closed",
        Duration::from_secs(5),
        || agents[1].status()["state"] == "revoked",
    );
    let total = t0.elapsed();
    assert!(
        total <= Duration::from_secs(1),
        "session closed after {total:?} (> 1 s)"
    );
    eprintln!("revocation: session closed {closed:?} after the command returned ({total:?} total)");
    for i in [0, 2] {
        wait_until("others drop r2", Duration::from_secs(2), || {
            !agents[i].peer_names().contains(&"r2".to_string())
        });
    }
    // It reconnects and is refused, also after a daemon restart.
    if let Some(p) = agents[1].proc.as_mut() {
        p.term();
    }
    agents[1].restart();
    wait_until("restart refused", Duration::from_secs(10), || {
        let s = agents[1].status();
        s["state"] == "revoked" && s["last_error"].as_str().unwrap_or("").contains("revoked")
    });
    assert!(c
        .audit()
        .iter()
        .any(|e| e["action"] == "connect.refused" && e["target"] == "r2"));
    let show = c.admin_json(&["device", "show", "r2"]);
    assert_eq!(show["state"], "revoked");

    // Disabling a user cuts all of that user's devices.
    c.admin(&["user", "disable", "dave"]);
    wait_until("user disabled", Duration::from_secs(2), || {
        agents[0].status()["state"] == "revoked"
    });
}

/// Talks raw QUIC to the coordinator without a device certificate (as an attacker could).
async fn raw_exchange(
    c: &Coordinator,
    tok: &EnrollToken,
    payload: Vec<u8>,
    finish: bool,
) -> Option<CoordinatorMsg> {
    let endpoint = ward_client::control::client_endpoint().unwrap();
    let cfg = ward_client::control::enroll_config(tok.ca_sha256).unwrap();
    let addr = format!("127.0.0.1:{}", c.port).parse().unwrap();
    let mut ch = ward_client::control::Channel::open(&endpoint, cfg, addr)
        .await
        .unwrap();
    ch.send.write_all(&payload).await.unwrap();
    if finish {
        let _ = ch.send.finish();
    }
    let r = tokio::time::timeout(Duration::from_secs(12), ch.recv())
        .await
        .ok()?
        .ok()?;
    endpoint.close(0u32.into(), b"");
    r
}

fn enroll_frame(tok: &EnrollToken, hostname: &str) -> Vec<u8> {
    let key = rcgen_key_csr();
    wire::encode(&DeviceMsg::Enroll(wire::EnrollRequest {
        protocol: wire::PROTOCOL_VERSION,
        token_id: tok.id_hex(),
        token_secret: wire::TokenSecret(wire::Bytes(tok.secret.expose().to_vec())),
        hostname: hostname.to_string(),
        os: "test\n\"os\"".into(),
        csr_der: wire::Bytes(key),
    }))
}

fn rcgen_key_csr() -> Vec<u8> {
    // A fresh identity key per call, as a device makes.
    ward_client::control::test_csr()
}

#[test]
fn bad_input_gets_clear_errors_and_coordinator_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "erin"]);
    let a = Agent::start(tmp.path(), "good");
    assert!(a.up(&c.token(&["--user", "erin"]), "good").status.success());
    let tok = EnrollToken::parse(&c.token(&["--user", "erin", "--uses", "10"])).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let protocol_err = |m: Option<CoordinatorMsg>| match m {
            Some(CoordinatorMsg::Error {
                code: ErrorCode::Protocol,
                message,
            }) => message,
            other => panic!("expected a protocol error, got {other:?}"),
        };
        // Garbage bytes in a valid frame.
        let mut g = (5u32).to_be_bytes().to_vec();
        g.extend_from_slice(b"\xff\x00zz}");
        let m = protocol_err(raw_exchange(&c, &tok, g, true).await);
        assert!(m.contains("undecodable"), "{m}");
        // Oversized frame.
        let m =
            protocol_err(raw_exchange(&c, &tok, (u32::MAX).to_be_bytes().to_vec(), false).await);
        assert!(m.contains("exceeds the maximum"), "{m}");
        // Truncated frame, then end of stream.
        let mut t = (100u32).to_be_bytes().to_vec();
        t.extend_from_slice(b"{\"type\":");
        let m = protocol_err(raw_exchange(&c, &tok, t, true).await);
        assert!(m.contains("middle of a frame"), "{m}");
        // Unknown message type.
        let m = protocol_err(
            raw_exchange(
                &c,
                &tok,
                wire::encode(&serde_json::json!({"type": "format_disk"})),
                true,
            )
            .await,
        );
        assert!(m.contains("unknown variant"), "{m}");
        // Hello without a certificate.
        let hello = wire::encode(&serde_json::json!({"type": "hello", "protocol": 1, "os": "x"}));
        match raw_exchange(&c, &tok, hello, true).await {
            Some(CoordinatorMsg::Error {
                code: ErrorCode::Unauthorized,
                ..
            }) => {}
            other => panic!("expected unauthorized, got {other:?}"),
        }
        // Hostile names: sanitized, stored verbatim-safe.
        for (host, want) in [
            ("x'; DROP TABLE devices; --", "x-drop-table-devices"),
            ("new\nline\"quote", "new-line-quote"),
        ] {
            match raw_exchange(&c, &tok, enroll_frame(&tok, host), true).await {
                Some(CoordinatorMsg::Enrolled(e)) => assert_eq!(e.hostname.as_str(), want),
                other => panic!("expected enrollment, got {other:?}"),
            }
        }
        // A 10 000-character hostname is refused, not truncated.
        match raw_exchange(&c, &tok, enroll_frame(&tok, &"h".repeat(10_000)), true).await {
            Some(CoordinatorMsg::Error {
                code: ErrorCode::BadRequest,
                message,
            }) => {
                assert!(message.contains("too long"), "{message}")
            }
            other => panic!("expected bad request, got {other:?}"),
        }
        // A CSR that is garbage.
        let mut f = enroll_frame(&tok, "ok");
        let body: serde_json::Value = serde_json::from_slice(&f[4..]).unwrap();
        let mut body = body;
        body["csr_der"] = "AAAA".into();
        f = wire::encode(&body);
        match raw_exchange(&c, &tok, f, true).await {
            Some(CoordinatorMsg::Error {
                code: ErrorCode::BadRequest,
                ..
            }) => {}
            other => panic!("expected bad request, got {other:?}"),
        }
    });
    // Still serving: the good device is (or, if its first netmap is still paced behind the
    // burst of bad enrollments, soon is) connected, a new one can enroll, the database is intact.
    let took = wait_until("the good device connected", Duration::from_secs(10), || {
        a.status()["state"] == "connected"
    });
    eprintln!("the good device was connected {took:?} after the bad input");
    let b = Agent::start(tmp.path(), "after");
    assert!(b
        .up(&c.token(&["--user", "erin"]), "after")
        .status
        .success());
    let names: BTreeSet<String> = c
        .admin_json(&["device", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["hostname"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = ["good", "x-drop-table-devices", "new-line-quote", "after"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
    c.admin(&["audit", "verify"]);
    assert!(c.log().contains("bad frame"), "bad input must be logged");
    // Admin input is validated too.
    let out = c.try_admin(&["user", "add", "robert'); DROP TABLE users;--"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not allowed"), "{}", stderr(&out));
}

#[test]
fn kill_9_after_enrollment_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "frank"]);
    let a = Agent::start(tmp.path(), "k");
    let out = a.up(&c.token(&["--user", "frank"]), "survivor");
    assert!(out.status.success());
    // The enrollment was acknowledged: kill -9 at once.
    c.proc.as_mut().unwrap().kill9();
    c.start();
    let devs = c.admin_json(&["device", "ls"]);
    assert_eq!(devs[0]["hostname"], "survivor");
    assert!(c
        .audit()
        .iter()
        .any(|e| e["action"] == "device.enroll" && e["target"] == "survivor"));
    c.admin(&["audit", "verify"]);
    // The device resumes on its own.
    wait_until("device reconnects", Duration::from_secs(40), || {
        a.status()["state"] == "connected"
            && c.admin_json(&["device", "show", "survivor"])["online"] == true
    });
}

#[test]
fn audit_verify_detects_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "gina"]);
    c.admin(&["user", "add", "hank"]);
    let ok = c.admin(&["audit", "verify"]);
    assert!(ok.contains("intact"), "{ok}");
    // Edit a row in the database file (dropping the append-only trigger first, as an attacker
    // with file access would).
    let db = c.dir.join("ward.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("DROP TRIGGER audit_no_update; UPDATE audit SET target = 'mallory' WHERE action = 'user.add' AND target = 'gina';")
        .output()
        .expect("sqlite3 must be installed (apt-get install sqlite3)");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.try_admin(&["audit", "verify"]);
    assert!(!out.status.success(), "verify must fail after tampering");
    assert!(stderr(&out).contains("FAILED"), "{}", stderr(&out));
}

#[test]
fn corrupt_state_is_an_error_not_a_reenrollment() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "ivy"]);
    let mut a = Agent::start(tmp.path(), "s");
    assert!(a
        .up(&c.token(&["--user", "ivy"]), "stateful")
        .status
        .success());
    a.proc.as_mut().unwrap().term();
    std::fs::write(
        a.state_dir.join("state.json"),
        b"{\"version\": 1, \"garbage",
    )
    .unwrap();
    let out = common::run(
        std::process::Command::new(common::bin("ward"))
            .arg("--socket")
            .arg(&a.socket)
            .arg("daemon")
            .arg("--state-dir")
            .arg(&a.state_dir)
            .args(["--tun", "off"]),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("corrupt") && err.contains("refusing"), "{err}");
    assert_eq!(c.admin_json(&["device", "ls"]).as_array().unwrap().len(), 1);
    // Both the state file and the socket are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(c.dir.join("admin.sock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

/// A QUIC long-header packet of type Retry (version 1: form and fixed bits, type 3).
fn is_quic_retry(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0xf0 == 0xf0)
}

/// Opens `n` QUIC connections to `target` through a socket in the middle that forwards what
/// the clients send and answers nothing back: every handshake stays in progress at the server.
/// Returns the number of Retry packets the server sent, counted until `until` is set.
fn stalled_handshakes(
    target: std::net::SocketAddr,
    n: usize,
    until: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            // Clients → the middle socket → the coordinator; the coordinator's answers end here.
            let middle = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let middle_addr = middle.local_addr().unwrap();
            let client_sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let client_addr = client_sock.local_addr().unwrap();
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                client_sock,
                std::sync::Arc::new(quinn::TokioRuntime),
            )
            .unwrap();
            // No certificate is checked before the server's first answer, which never comes.
            let mut tls = rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            tls.alpn_protocols = vec![wire::ALPN.to_vec()];
            let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
            let config = quinn::ClientConfig::new(std::sync::Arc::new(quic));
            // Paced, so that no socket buffer on the way drops the first packets.
            let opener = tokio::spawn(async move {
                let mut pending = Vec::new();
                for i in 0..n {
                    let c = endpoint
                        .connect_with(config.clone(), middle_addr, "coordinator")
                        .unwrap();
                    pending.push(c);
                    if i % 20 == 19 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                (endpoint, pending)
            });
            let mut retries = 0;
            let mut buf = vec![0u8; 65536];
            while !until.load(Ordering::Relaxed) {
                let got =
                    tokio::time::timeout(Duration::from_millis(50), middle.recv_from(&mut buf))
                        .await;
                let Ok(Ok((len, from))) = got else { continue };
                if from == client_addr {
                    let _ = middle.send_to(&buf[..len], target).await;
                } else if is_quic_retry(&buf[..len]) {
                    retries += 1;
                }
            }
            drop(opener.await.unwrap());
            retries
        })
    })
}

/// Beyond 256 QUIC handshakes in progress, a connection attempt must prove its source address
/// (a stateless Retry) before the coordinator keeps anything for it; a real device still
/// enrolls and opens its session during such a flood, and the flood's attempts are counted.
#[test]
fn a_flood_of_stalled_handshakes_gets_retries_and_a_device_still_connects() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let metrics = common::free_tcp_addr();
    let c = Coordinator::init_with(tmp.path(), &["--metrics-listen", &metrics.to_string()]);
    c.admin(&["user", "add", "fay", "--group", "eng"]);
    c.allow_user_devices("fay");
    let value = |name: &str| {
        let text = common::scrape(metrics).unwrap_or_default();
        let parsed = ward_runtime::metrics::parse_strict(&text).unwrap();
        parsed.value(name, &[]).unwrap_or(0.0)
    };
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", c.port).parse().unwrap();
    let flood = stalled_handshakes(target, 400, stop.clone());
    wait_until(
        "the flood's handshakes in progress",
        Duration::from_secs(10),
        || value("ward_coordinator_quic_handshakes") >= 256.0,
    );
    wait_until("retries sent", Duration::from_secs(10), || {
        value("ward_coordinator_quic_retries_total") >= 100.0
    });
    // The flood goes on (stalled handshakes live for the 10 s handshake timeout).
    let in_progress = value("ward_coordinator_quic_handshakes");
    assert!(
        (256.0..300.0).contains(&in_progress),
        "{in_progress} handshakes in progress: attempts beyond 256 must not hold state"
    );
    let a = Agent::start(tmp.path(), "fay1");
    let out = a.up(&c.token(&["--user", "fay"]), "during-flood");
    assert!(out.status.success(), "up failed: {}", stderr(&out));
    wait_until(
        "connected during the flood",
        Duration::from_secs(10),
        || a.status()["state"] == "connected",
    );
    stop.store(true, Ordering::Relaxed);
    let retries_seen = flood.join().unwrap();
    let counted = value("ward_coordinator_quic_retries_total");
    assert!(retries_seen >= 100, "the flood saw {retries_seen} retries");
    assert!(
        counted >= retries_seen as f64,
        "{counted} retries counted, {retries_seen} seen"
    );
    // Once the stalled handshakes time out, nothing stays counted.
    wait_until("stalled handshakes ended", Duration::from_secs(15), || {
        value("ward_coordinator_quic_handshakes") == 0.0
    });
}
