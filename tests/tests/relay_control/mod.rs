//! The other end of a relay's control protocol (`ward_shared::relay`, ALPN
//! `ward-relay-control/1`), run in the test with the coordinator's own CA code: it checks the
//! relay's secret, signs its CSR, hands out the ticket key, records `Load` reports, renews the
//! certificate, pushes revocations. Also what a device needs to reach a relay: a CA-signed
//! certificate, tickets, and the forwarding protocol's client side.
#![allow(dead_code)]

use ed25519_dalek::SigningKey;
use rcgen::{CertificateSigningRequestParams, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ward_coordinator::pki::Ca;
use ward_shared::relay::{
    relay_server_name, CoordinatorToRelay, DeviceToRelay, RelayCredential, RelayLoad,
    RelayToCoordinator, RelayToDevice, RelayWelcome, SignedTicket, Ticket, MAX_RELAY_CONTROL_FRAME,
    MAX_RELAY_STREAM_FRAME, RELAY_ALPN, RELAY_CONTROL_ALPN, RELAY_PROTOCOL_VERSION,
};
use ward_shared::secret::Secret;
use ward_shared::wire::{self, Bytes, DeviceId, ErrorCode, FrameDecoder};

/// How long the relay certificates this server signs are valid (short, so a test sees a
/// renewal at half of it).
pub const RELAY_CERT_LIFE_MS: i64 = 30_000;

pub struct ControlServer {
    pub addr: SocketAddr,
    pub ca_der: Vec<u8>,
    ca_fingerprint: [u8; 32],
    ca_key_pem: String,
    ca: Arc<Ca>,
    pub ticket_key: SigningKey,
    secret: Vec<u8>,
    revoke: tokio::sync::broadcast::Sender<Vec<DeviceId>>,
    pub loads: Arc<Mutex<Vec<RelayLoad>>>,
    pub welcomes: Arc<AtomicUsize>,
    pub renewals: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
    endpoint: quinn::Endpoint,
}

impl ControlServer {
    /// Listens on loopback; call inside a tokio runtime.
    pub fn start() -> Self {
        let now = ward_runtime::now_ms();
        let ca = Ca::generate(now).unwrap();
        let (cert, key) = ca.server_cert(now).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![
                    CertificateDer::from(cert),
                    CertificateDer::from(ca.cert_der.clone()),
                ],
                PrivateKeyDer::Pkcs8(key.into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![RELAY_CONTROL_ALPN.to_vec()];
        let qc = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(qc)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let (revoke, _) = tokio::sync::broadcast::channel(16);
        let s = ControlServer {
            addr: endpoint.local_addr().unwrap(),
            ca_der: ca.cert_der.clone(),
            ca_fingerprint: ca.fingerprint(),
            ca_key_pem: ca.key_pem(),
            ca: Arc::new(ca),
            ticket_key: SigningKey::from_bytes(&rand::random()),
            secret: rand::random::<[u8; 32]>().to_vec(),
            revoke,
            loads: Arc::default(),
            welcomes: Arc::default(),
            renewals: Arc::default(),
            refused: Arc::default(),
            endpoint: endpoint.clone(),
        };
        let ctx = Ctx {
            ca_der: s.ca_der.clone(),
            ca_key_pem: s.ca_key_pem.clone(),
            ticket_key: s.ticket_key.verifying_key().to_bytes().to_vec(),
            secret: s.secret.clone(),
            revoke: s.revoke.clone(),
            loads: s.loads.clone(),
            welcomes: s.welcomes.clone(),
            renewals: s.renewals.clone(),
            refused: s.refused.clone(),
        };
        tokio::spawn(async move {
            while let Some(inc) = endpoint.accept().await {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = inc.await {
                        let _ = ctx.serve(conn).await;
                    }
                });
            }
        });
        s
    }

    /// The credential `relay add NAME` would print for this server.
    pub fn credential(&self, name: &str) -> String {
        self.credential_with(name, self.secret.clone())
    }

    pub fn credential_with(&self, name: &str, secret: Vec<u8>) -> String {
        RelayCredential {
            coordinator: self.addr.to_string(),
            ca_sha256: self.ca_fingerprint,
            name: name.into(),
            secret: Secret::new(secret),
        }
        .encode()
    }

    /// Pushes `Revoked` to every live session.
    pub fn revoke(&self, devices: &[u64]) {
        let _ = self
            .revoke
            .send(devices.iter().map(|d| DeviceId(*d)).collect());
    }

    /// A device identity: a key and a client certificate from this CA.
    pub fn device(&self, label: &str) -> Device {
        let key = KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let (cert_der, _) = self
            .ca
            .issue_device_cert(csr.der(), label, ward_runtime::now_ms())
            .unwrap();
        let identity = ward_coordinator::pki::cert_identity(&cert_der).unwrap();
        Device {
            key,
            cert_der,
            identity,
            ca_der: self.ca_der.clone(),
        }
    }

    /// A ticket for `device_id` bound to `identity`, valid from now for `ttl_ms`.
    pub fn ticket(&self, device_id: u64, identity: [u8; 32], ttl_ms: i64) -> SignedTicket {
        ticket_signed_by(&self.ticket_key, device_id, identity, ttl_ms)
    }
}

pub fn ticket_signed_by(
    key: &SigningKey,
    device_id: u64,
    identity: [u8; 32],
    ttl_ms: i64,
) -> SignedTicket {
    let now = ward_runtime::now_ms();
    Ticket {
        device_id: DeviceId(device_id),
        cert_identity: identity,
        not_before_ms: now - 1000,
        not_after_ms: now + ttl_ms,
        serial: rand::random(),
    }
    .sign(key)
}

#[derive(Clone)]
struct Ctx {
    ca_der: Vec<u8>,
    ca_key_pem: String,
    ticket_key: Vec<u8>,
    secret: Vec<u8>,
    revoke: tokio::sync::broadcast::Sender<Vec<DeviceId>>,
    loads: Arc<Mutex<Vec<RelayLoad>>>,
    welcomes: Arc<AtomicUsize>,
    renewals: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl Ctx {
    fn sign_csr(&self, csr_der: &[u8]) -> Option<(Vec<u8>, i64)> {
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .ok()?;
        let now = ward_runtime::now_ms();
        let not_after = now + RELAY_CERT_LIFE_MS;
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        csr.params.not_before =
            time::OffsetDateTime::from_unix_timestamp(now / 1000 - 3600).ok()?;
        csr.params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after / 1000).ok()?;
        let key = KeyPair::from_pem(&self.ca_key_pem).ok()?;
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(self.ca_der.as_slice()), key).ok()?;
        let cert = csr.signed_by(&issuer).ok()?;
        Some((cert.der().to_vec(), (not_after / 1000) * 1000))
    }

    async fn serve(&self, conn: quinn::Connection) -> anyhow::Result<()> {
        let (mut send, recv) = conn.accept_bi().await?;
        let mut rx = Frames::new(recv, MAX_RELAY_CONTROL_FRAME);
        let Some(RelayToCoordinator::Hello(hello)) = rx.next::<RelayToCoordinator>().await else {
            anyhow::bail!("no hello");
        };
        if hello.secret.0 != self.secret || hello.protocol != RELAY_PROTOCOL_VERSION {
            self.refused.fetch_add(1, Ordering::SeqCst);
            let m = CoordinatorToRelay::Error {
                code: ErrorCode::TokenInvalid,
                message: "unknown relay or wrong secret".into(),
            };
            send.write_all(&wire::encode(&m)).await?;
            send.finish()?;
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            conn.close(1u32.into(), b"refused");
            return Ok(());
        }
        let (cert_der, not_after) = self
            .sign_csr(&hello.csr_der.0)
            .ok_or_else(|| anyhow::anyhow!("bad csr"))?;
        let w = CoordinatorToRelay::Welcome(RelayWelcome {
            protocol: RELAY_PROTOCOL_VERSION,
            ticket_key: Bytes(self.ticket_key.clone()),
            cert_der: Bytes(cert_der),
            cert_not_after_ms: not_after,
            ca_der: Bytes(self.ca_der.clone()),
            revoked: vec![],
        });
        send.write_all(&wire::encode(&w)).await?;
        self.welcomes.fetch_add(1, Ordering::SeqCst);
        let mut revoked = self.revoke.subscribe();
        loop {
            tokio::select! {
                m = rx.next::<RelayToCoordinator>() => match m {
                    Some(RelayToCoordinator::Load(l)) => self.loads.lock().unwrap().push(l),
                    Some(RelayToCoordinator::RenewCert { csr_der }) => {
                        let (cert_der, not_after_ms) = self
                            .sign_csr(&csr_der.0)
                            .ok_or_else(|| anyhow::anyhow!("bad csr"))?;
                        let m = CoordinatorToRelay::Cert { cert_der: Bytes(cert_der), not_after_ms };
                        send.write_all(&wire::encode(&m)).await?;
                        self.renewals.fetch_add(1, Ordering::SeqCst);
                    }
                    Some(RelayToCoordinator::Hello(_)) | None => return Ok(()),
                },
                d = revoked.recv() => {
                    let Ok(devices) = d else { return Ok(()) };
                    send.write_all(&wire::encode(&CoordinatorToRelay::Revoked { devices })).await?;
                }
            }
        }
    }
}

/// A device's certificate and key.
pub struct Device {
    pub key: KeyPair,
    pub cert_der: Vec<u8>,
    pub identity: [u8; 32],
    pub ca_der: Vec<u8>,
}

impl Device {
    /// An enrolled device's identity (its certificate, key PEM and CA).
    pub fn enrolled(cert_der: Vec<u8>, key_pem: &str, ca_der: Vec<u8>) -> Self {
        Device {
            key: KeyPair::from_pem(key_pem).unwrap(),
            identity: ward_coordinator::pki::cert_identity(&cert_der).unwrap(),
            cert_der,
            ca_der,
        }
    }

    /// The client config a device dials a relay with (mTLS, ALPN `ward-relay/1`).
    pub fn client_config(&self) -> quinn::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::Pkcs8(self.key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![RELAY_ALPN.to_vec()];
        let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        quinn::ClientConfig::new(Arc::new(qc))
    }
}

/// A client config without a client certificate (the relay's TLS must refuse it).
pub fn anonymous_client_config(ca_der: &[u8]) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec())).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(qc))
}

/// A device's connection to a relay after its `Hello`.
pub struct RelaySession {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub rx: Frames,
    pub answer: RelayToDevice,
}

/// Dials `relay` as `device` and presents `ticket`; the relay's first answer.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    relay_name: &str,
    cfg: quinn::ClientConfig,
    ticket: SignedTicket,
) -> anyhow::Result<RelaySession> {
    connect_version(
        endpoint,
        relay,
        relay_name,
        cfg,
        ticket,
        RELAY_PROTOCOL_VERSION,
    )
    .await
}

/// [`connect`] with a `Hello` of forwarding version `protocol`.
pub async fn connect_version(
    endpoint: &quinn::Endpoint,
    relay: SocketAddr,
    relay_name: &str,
    cfg: quinn::ClientConfig,
    ticket: SignedTicket,
    protocol: u32,
) -> anyhow::Result<RelaySession> {
    let conn = endpoint
        .connect_with(cfg, relay, &relay_server_name(relay_name))?
        .await?;
    let (mut send, recv) = conn.open_bi().await?;
    let hello = DeviceToRelay::Hello { protocol, ticket };
    send.write_all(&wire::encode(&hello)).await?;
    let mut rx = Frames::new(recv, MAX_RELAY_STREAM_FRAME);
    let answer = tokio::time::timeout(Duration::from_secs(5), rx.next::<RelayToDevice>())
        .await?
        .ok_or_else(|| anyhow::anyhow!("relay closed the stream without answering"))?;
    Ok(RelaySession {
        conn,
        send,
        rx,
        answer,
    })
}

/// Frames in, bounded.
pub struct Frames {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl Frames {
    pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Frames {
            recv,
            dec: FrameDecoder::new(max),
        }
    }

    pub async fn next<T: for<'de> serde::Deserialize<'de>>(&mut self) -> Option<T> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.dec.next_frame().ok()? {
                return wire::decode(&f).ok();
            }
            let want = self.dec.wanted().min(buf.len());
            let n = self.recv.read(&mut buf[..want]).await.ok()??;
            self.dec.push(&buf[..n]);
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
