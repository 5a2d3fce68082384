//! Relays and the coordinator, over real QUIC against the built binary on loopback: `relay add`
//! prints a credential that opens a control session (`Welcome` with a certificate for
//! `NAME.relay.ward.internal` signed by the CA and the lease key as ticket key); wrong secrets,
//! unknown names and garbage are refused; the reported load shows in `relay ls --json`;
//! `device revoke` reaches the relay as `Revoked`; a newer session replaces the older; `relay rm`
//! ends it. A device gets a relay ticket that verifies for its own certificate.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::de::DeserializeOwned;
use serde::Serialize;

use ward_coordinator::datadir::DataDir;
use ward_coordinator::pki::cert_identity;
use ward_shared::relay::{
    CoordinatorToRelay, RelayCredential, RelayHello, RelayLoad, RelayToCoordinator, RelayWelcome,
    MAX_RELAY_CONTROL_FRAME, RELAY_CONTROL_ALPN, RELAY_PROTOCOL_VERSION, TICKET_TTL_MS,
};
use ward_shared::token::EnrollToken;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeviceMsg, DeviceUpdate, EnrollRequest, Enrolled, ErrorCode,
    FrameDecoder, Hello, TokenSecret, COORDINATOR_SERVER_NAME, PROTOCOL_VERSION,
};

const BIN: &str = env!("CARGO_BIN_EXE_ward-coordinator");

/// Kills the coordinator when the test ends, however it ends.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admin(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn admin_ok(dir: &Path, args: &[&str]) -> String {
    let out = admin(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(tmp: &Path) -> (PathBuf, SocketAddr, Serving) {
    let dir = tmp.join("coord");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    admin_ok(&dir, &["init", "--public-addr", &addr.to_string()]);
    let log = std::fs::File::create(tmp.join("coord.log")).unwrap();
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(&dir)
        .arg("serve")
        .env("WARD_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let serving = Serving(child);
    wait_until("the admin socket", || {
        admin(&dir, &["status"]).status.success()
    });
    (dir, addr, serving)
}

/// A QUIC client config trusting the coordinator's CA, with `alpn`, and a client certificate
/// when given.
fn client_config(
    ca_der: &[u8],
    alpn: &[u8],
    client: Option<(&[u8], &rcgen::KeyPair)>,
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(cert.to_vec())],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(qc))
}

/// One bidirectional stream of length-prefixed JSON frames.
struct Stream {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl Stream {
    async fn open(ep: &quinn::Endpoint, cfg: quinn::ClientConfig, addr: SocketAddr) -> Self {
        let conn = ep
            .connect_with(cfg, addr, COORDINATOR_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Self {
            conn,
            send,
            recv,
            dec: FrameDecoder::new(8 * 1024 * 1024),
        }
    }

    async fn send<T: Serialize>(&mut self, msg: &T) {
        self.send.write_all(&wire::encode(msg)).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// The next frame, `None` when the stream or connection ends first; panics after 5 s.
    async fn recv<T: DeserializeOwned>(&mut self) -> Option<T> {
        let fut = async {
            let mut buf = [0u8; 16 * 1024];
            loop {
                if let Some(f) = self.dec.next_frame().unwrap() {
                    return Some(wire::decode::<T>(&f).unwrap());
                }
                match self.recv.read(&mut buf).await {
                    Ok(Some(n)) => self.dec.push(&buf[..n]),
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("a frame or the end within 5 s")
    }

    /// Whether the coordinator closes the connection within 5 s.
    async fn closed(&self) -> bool {
        tokio::time::timeout(Duration::from_secs(5), self.conn.closed())
            .await
            .is_ok()
    }
}

fn csr(key: &rcgen::KeyPair) -> Vec<u8> {
    rcgen::CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

fn relay_hello(name: &str, secret: &[u8], key: &rcgen::KeyPair) -> RelayToCoordinator {
    RelayToCoordinator::Hello(RelayHello {
        protocol: RELAY_PROTOCOL_VERSION,
        name: name.into(),
        secret: Bytes(secret.to_vec()),
        csr_der: Bytes(csr(key)),
        version: "test".into(),
    })
}

/// A relay control session that said hello; its first answer.
async fn relay_session(
    ep: &quinn::Endpoint,
    ca_der: &[u8],
    addr: SocketAddr,
    hello: &RelayToCoordinator,
) -> (Stream, CoordinatorToRelay) {
    let mut s = Stream::open(ep, client_config(ca_der, RELAY_CONTROL_ALPN, None), addr).await;
    s.send(hello).await;
    let first = s.recv::<CoordinatorToRelay>().await.expect("an answer");
    (s, first)
}

/// Verifies `cert_der` as a TLS server certificate for `name` under the CA.
fn verify_server_cert(ca_der: &[u8], cert_der: &[u8], name: &str) -> Result<(), rustls::Error> {
    use rustls::client::danger::ServerCertVerifier;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
        .build()
        .unwrap();
    v.verify_server_cert(
        &CertificateDer::from(cert_der.to_vec()),
        &[],
        &ServerName::try_from(name.to_string()).unwrap(),
        &[],
        UnixTime::now(),
    )
    .map(|_| ())
}

fn relay_ls(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&admin_ok(dir, &["relay", "ls", "--json"])).unwrap()
}

fn refused(m: &CoordinatorToRelay, want: ErrorCode) -> bool {
    matches!(m, CoordinatorToRelay::Error { code, .. } if *code == want)
}

#[test]
fn relay_control_sessions_tickets_and_revocations() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, addr, _serving) = start(tmp.path());
    let dd = DataDir::new(&dir);
    let ca = dd.load_ca().unwrap();
    let lease_pub = dd.load_lease_key().unwrap().verifying_key();

    // 1. `relay add` prints the credential alone on stdout: this coordinator, its CA, the name.
    let out = admin_ok(&dir, &["relay", "add", "r1", "--addr", "127.0.0.1:3478"]);
    assert_eq!(out.lines().count(), 1, "{out:?}");
    let cred = RelayCredential::parse(&out).unwrap();
    assert_eq!(cred.coordinator, addr.to_string());
    assert_eq!(cred.ca_sha256, ca.fingerprint());
    assert_eq!(cred.name, "r1");
    let ls = relay_ls(&dir);
    assert_eq!(ls[0]["name"], "r1");
    assert_eq!(ls[0]["online"], false);
    assert_eq!(ls[0]["devices"], 0);
    assert_eq!(ls[0]["bytes_relayed"], 0);
    assert!(
        !admin(&dir, &["relay", "add", "Bad.Name", "--addr", "127.0.0.1:1"])
            .status
            .success()
    );

    admin_ok(&dir, &["user", "add", "rita"]);
    let tok =
        EnrollToken::parse(admin_ok(&dir, &["token", "create", "--user", "rita"]).trim()).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

        // 2. A device enrolls and, in its session, gets a ticket bound to its certificate.
        let dev_key = rcgen::KeyPair::generate().unwrap();
        let mut e = Stream::open(&ep, client_config(&ca.cert_der, wire::ALPN, None), addr).await;
        e.send(&DeviceMsg::Enroll(EnrollRequest {
            protocol: PROTOCOL_VERSION,
            token_id: tok.id_hex(),
            token_secret: TokenSecret(Bytes(tok.secret.expose().to_vec())),
            hostname: "rita1".into(),
            os: "test".into(),
            csr_der: Bytes(csr(&dev_key)),
        }))
        .await;
        let Some(CoordinatorMsg::Enrolled(enrolled)) = e.recv::<CoordinatorMsg>().await else {
            panic!("not enrolled")
        };
        let enrolled: Enrolled = enrolled;
        assert_eq!(enrolled.lease_key.0, lease_pub.to_bytes());
        let identity = cert_identity(&enrolled.cert_der.0).unwrap();
        let mut dev = Stream::open(
            &ep,
            client_config(
                &ca.cert_der,
                wire::ALPN,
                Some((&enrolled.cert_der.0, &dev_key)),
            ),
            addr,
        )
        .await;
        dev.send(&DeviceMsg::Hello(Hello {
            held_peers: Vec::new(),
            holding: None,
            protocol: PROTOCOL_VERSION,
            os: "test".into(),
            version: "0".into(),
            update: DeviceUpdate::default(),
        }))
        .await;
        dev.send(&DeviceMsg::RelayTicketRequest).await;
        let ticket = loop {
            match dev.recv::<CoordinatorMsg>().await.expect("session open") {
                CoordinatorMsg::RelayTicket { ticket } => break ticket,
                CoordinatorMsg::Error { code, message } => panic!("{code:?}: {message}"),
                _ => continue,
            }
        };
        let now = ward_runtime::now_ms();
        let t = ticket.verify_for(&lease_pub, now, &identity).unwrap();
        assert_eq!(t.device_id, enrolled.device_id);
        assert!((t.not_after_ms - now - TICKET_TTL_MS).abs() < 5_000);
        assert!(ticket.verify_for(&lease_pub, now, &[0; 32]).is_err());

        // 3. The credential opens a control session: a certificate for r1.relay.ward.internal
        // under the CA, the lease key as ticket key, nobody revoked yet.
        let relay_key = rcgen::KeyPair::generate().unwrap();
        let good = relay_hello("r1", cred.secret.expose(), &relay_key);
        let (mut r1, first) = relay_session(&ep, &ca.cert_der, addr, &good).await;
        let CoordinatorToRelay::Welcome(w) = first else {
            panic!("{first:?}")
        };
        let w: RelayWelcome = w;
        assert_eq!(w.protocol, RELAY_PROTOCOL_VERSION);
        assert_eq!(w.ticket_key.0, lease_pub.to_bytes());
        assert_eq!(w.ca_der.0, ca.cert_der);
        assert!(w.revoked.is_empty(), "{:?}", w.revoked);
        verify_server_cert(&w.ca_der.0, &w.cert_der.0, "r1.relay.ward.internal").unwrap();
        assert!(verify_server_cert(&w.ca_der.0, &w.cert_der.0, "r2.relay.ward.internal").is_err());
        assert_eq!(
            cert_identity(&w.cert_der.0),
            Some(ward_coordinator::pki::Ca::csr_identity(&csr(&relay_key)).unwrap())
        );
        let week = 7 * 24 * 3600 * 1000;
        assert!((w.cert_not_after_ms - now - week).abs() < 60_000);

        // 4. The reported load shows in `relay ls --json`.
        r1.send(&RelayToCoordinator::Load(RelayLoad {
            devices: 2,
            bytes_relayed: 1234,
            datagrams_relayed: 5,
            dropped: 0,
        }))
        .await;
        let dir2 = dir.clone();
        tokio::task::spawn_blocking(move || {
            wait_until("relay ls shows r1 online with its load", || {
                let ls = relay_ls(&dir2);
                ls[0]["online"] == true && ls[0]["devices"] == 2 && ls[0]["bytes_relayed"] == 1234
            })
        })
        .await
        .unwrap();
        // A renewal gets a certificate for a new key.
        let key2 = rcgen::KeyPair::generate().unwrap();
        r1.send(&RelayToCoordinator::RenewCert {
            csr_der: Bytes(csr(&key2)),
        })
        .await;
        let Some(CoordinatorToRelay::Cert { cert_der, .. }) = r1.recv().await else {
            panic!("no renewed certificate")
        };
        verify_server_cert(&ca.cert_der, &cert_der.0, "r1.relay.ward.internal").unwrap();

        // 5. Refused: a wrong secret, an unknown name, another protocol version, a first frame
        // that is not hello, garbage, an oversized frame. Each gets an error and a close.
        let wrong = relay_hello("r1", &[0u8; 32], &relay_key);
        let unknown = relay_hello("r9", cred.secret.expose(), &relay_key);
        for (what, hello) in [("wrong secret", &wrong), ("unknown name", &unknown)] {
            let (s, m) = relay_session(&ep, &ca.cert_der, addr, hello).await;
            assert!(refused(&m, ErrorCode::Unauthorized), "{what}: {m:?}");
            assert!(s.closed().await, "{what}: closed");
        }
        let mut old = good.clone();
        if let RelayToCoordinator::Hello(h) = &mut old {
            h.protocol = 99;
        }
        let (_, m) = relay_session(&ep, &ca.cert_der, addr, &old).await;
        assert!(refused(&m, ErrorCode::Protocol), "{m:?}");
        let (_, m) = relay_session(
            &ep,
            &ca.cert_der,
            addr,
            &RelayToCoordinator::Load(RelayLoad::default()),
        )
        .await;
        assert!(refused(&m, ErrorCode::Protocol), "{m:?}");
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"\xff{{{x");
        let huge = ((MAX_RELAY_CONTROL_FRAME + 1) as u32)
            .to_be_bytes()
            .to_vec();
        for (what, raw) in [("garbage", garbage), ("oversized", huge)] {
            let mut s = Stream::open(
                &ep,
                client_config(&ca.cert_der, RELAY_CONTROL_ALPN, None),
                addr,
            )
            .await;
            s.send_raw(&raw).await;
            let m = s.recv::<CoordinatorToRelay>().await.expect("an answer");
            assert!(refused(&m, ErrorCode::Protocol), "{what}: {m:?}");
            assert!(s.closed().await, "{what}: closed");
        }
        // The good session is unaffected.
        assert_eq!(relay_ls(&dir)[0]["online"], true);

        // 6. A revoked device reaches the relay as `Revoked`; its session ends.
        admin_ok(&dir, &["device", "revoke", "rita1"]);
        let m = r1.recv::<CoordinatorToRelay>().await.expect("session open");
        let CoordinatorToRelay::Revoked { devices: revoked } = m else {
            panic!("{m:?}")
        };
        assert_eq!(revoked, vec![enrolled.device_id]);
        assert!(dev.closed().await);

        // 7. A newer session of the same relay replaces the older and learns the revocation.
        let (r1b, first) = relay_session(&ep, &ca.cert_der, addr, &good).await;
        let CoordinatorToRelay::Welcome(w) = first else {
            panic!("{first:?}")
        };
        assert_eq!(w.revoked, vec![enrolled.device_id]);
        let m = r1.recv::<CoordinatorToRelay>().await;
        assert!(
            m.as_ref().is_none_or(|m| refused(m, ErrorCode::Protocol)),
            "{m:?}"
        );
        assert!(r1.closed().await);

        // 8. `relay rm` ends the relay's session; its credential no longer opens one.
        admin_ok(&dir, &["relay", "rm", "r1"]);
        let mut r1b = r1b;
        let m = r1b.recv::<CoordinatorToRelay>().await;
        assert!(
            m.as_ref()
                .is_none_or(|m| refused(m, ErrorCode::Unauthorized)),
            "{m:?}"
        );
        assert!(r1b.closed().await);
        let (_, m) = relay_session(&ep, &ca.cert_der, addr, &good).await;
        assert!(refused(&m, ErrorCode::Unauthorized), "{m:?}");
        ep.close(0u32.into(), b"");
    });
    assert_eq!(relay_ls(&dir), serde_json::json!([]));
}
