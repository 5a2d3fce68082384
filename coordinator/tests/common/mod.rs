//! The built `ward-coordinator` on loopback, for the storage and flood tests: `init`, `serve`
//! (killed when the handle drops), admin commands, and a raw QUIC enrollment.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use ward_shared::token::EnrollToken;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeviceMsg, EnrollRequest, FrameDecoder, TokenSecret,
    COORDINATOR_SERVER_NAME, PROTOCOL_VERSION,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_ward-coordinator");

/// A running `serve`, killed (SIGKILL) when dropped.
pub struct Serving(pub Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Serving {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Stops it with SIGTERM (a clean shutdown) and waits.
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

pub fn admin(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn admin_ok(dir: &Path, args: &[&str]) -> String {
    let out = admin(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn admin_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&admin_ok(dir, &a)).unwrap()
}

pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `init` in `tmp/coord` with a free loopback port.
pub fn init(tmp: &Path) -> (PathBuf, SocketAddr) {
    let dir = tmp.join("coord");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    admin_ok(&dir, &["init", "--public-addr", &addr.to_string()]);
    (dir, addr)
}

/// `serve`, without waiting: the caller waits or checks how it ended. Logs to `dir/../NAME.log`.
pub fn spawn_serve(dir: &Path, log_name: &str) -> Serving {
    let log = std::fs::File::create(dir.with_file_name(log_name)).unwrap();
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .arg("serve")
        .env("WARD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Serving(child)
}

/// `serve`, once its admin socket answers.
pub fn serve(dir: &Path, log_name: &str) -> Serving {
    let s = spawn_serve(dir, log_name);
    wait_until("the admin socket", 20, || {
        admin(dir, &["status"]).status.success()
    });
    s
}

/// `serve` that must refuse to start: its exit status and log.
pub fn serve_refused(dir: &Path, log_name: &str) -> String {
    let mut s = spawn_serve(dir, log_name);
    let start = Instant::now();
    loop {
        if let Some(st) = s.0.try_wait().unwrap() {
            assert!(!st.success(), "serve must exit with an error");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "serve kept running; it must refuse"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::read_to_string(dir.with_file_name(log_name)).unwrap()
}

pub fn client_config(ca_der: &[u8]) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(qc))
}

pub fn csr(key: &rcgen::KeyPair) -> Vec<u8> {
    rcgen::CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

/// An enrollment request for `token` (the secret replaced by `forge`, if given).
pub fn enroll_request(token: &EnrollToken, host: &str, forge: Option<&[u8]>) -> DeviceMsg {
    enroll_request_with_key(token, host, forge).0
}

/// [`enroll_request`] and the device's identity key.
pub fn enroll_request_with_key(
    token: &EnrollToken,
    host: &str,
    forge: Option<&[u8]>,
) -> (DeviceMsg, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let secret = match forge {
        Some(f) => f.to_vec(),
        None => token.secret.expose().to_vec(),
    };
    let msg = DeviceMsg::Enroll(EnrollRequest {
        protocol: PROTOCOL_VERSION,
        token_id: token.id_hex(),
        token_secret: TokenSecret(Bytes(secret)),
        hostname: host.into(),
        os: "test".into(),
        csr_der: Bytes(csr(&key)),
    });
    (msg, key)
}

/// A client config presenting a device certificate.
pub fn device_client_config(
    ca_der: &[u8],
    cert: &[u8],
    key: &rcgen::KeyPair,
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(cert.to_vec())],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(qc))
}

/// A device's hello.
pub fn hello() -> DeviceMsg {
    DeviceMsg::Hello(wire::Hello {
        holding: None,
        held_peers: Vec::new(),
        protocol: PROTOCOL_VERSION,
        os: "test".into(),
        version: "test".into(),
        update: wire::DeviceUpdate::default(),
    })
}

/// Sends one enrollment request on a fresh connection; the coordinator's answer, or `None`
/// if the connection failed or ended without one within 10 s.
pub async fn enroll_once(
    ep: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    msg: &DeviceMsg,
) -> Option<CoordinatorMsg> {
    let fut = async {
        let conn = ep
            .connect_with(cfg, addr, COORDINATOR_SERVER_NAME)
            .ok()?
            .await
            .ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&wire::encode(msg)).await.ok()?;
        let mut dec = FrameDecoder::new(1 << 20);
        let mut buf = [0u8; 16 * 1024];
        let answer = loop {
            if let Some(f) = dec.next_frame().ok()? {
                break wire::decode::<CoordinatorMsg>(&f).ok();
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => dec.push(&buf[..n]),
                _ => break None,
            }
        };
        conn.close(0u32.into(), b"done");
        answer
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .ok()
        .flatten()
}

/// A client endpoint bound to `ip` (any 127.0.0.0/8 address works on loopback).
pub fn endpoint(ip: &str) -> quinn::Endpoint {
    quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap()
}

pub fn audit(dir: &Path, limit: usize) -> Vec<serde_json::Value> {
    admin_json(dir, &["audit", "--limit", &limit.to_string()])
        .as_array()
        .unwrap()
        .clone()
}
