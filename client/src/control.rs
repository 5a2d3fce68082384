//! The device side of the control channel: QUIC + TLS 1.3 to the coordinator.
//!
//! Enrollment pins the CA by the SHA-256 fingerprint carried in the token (no trust on first
//! use); afterwards the stored CA certificate is the only root, and the device authenticates
//! with its certificate (mutual TLS).

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ward_shared::token::EnrollToken;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeviceMsg, EnrollRequest, Enrolled, ErrorCode, FrameDecoder,
    TokenSecret, COORDINATOR_SERVER_NAME, MAX_COORDINATOR_FRAME, PROTOCOL_VERSION,
};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A refusal the coordinator gave in words, as opposed to a network failure.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the coordinator only if its chain contains the CA whose fingerprint the token
/// carries, and the server certificate verifies against that CA.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.fingerprint)
        else {
            return Err(rustls::Error::General(
                "the coordinator's certificate does not come from the CA named in the token (CA fingerprint mismatch)".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn transport() -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(Duration::from_secs(20).try_into()?));
    Ok(Arc::new(t))
}

fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(qc));
    cc.transport_config(transport()?);
    Ok(cc)
}

pub fn enroll_config(fingerprint: [u8; 32]) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint,
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    client_config(tls)
}

/// Mutual-TLS config for an enrolled device.
pub fn session_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key_pem: &str,
) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let key = rcgen::KeyPair::from_pem(key_pem).context("identity key in state is unreadable")?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(cert_der.to_vec())],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    client_config(tls)
}

pub async fn resolve(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve coordinator address {addr:?}"))?
        .next()
        .ok_or_else(|| anyhow!("coordinator address {addr:?} resolves to nothing"))
}

pub fn client_endpoint() -> Result<quinn::Endpoint> {
    quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
        .context("opening a UDP socket for the control channel")
}

/// A control-stream connection: frames in, frames out.
pub struct Channel {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl Channel {
    pub async fn open(
        endpoint: &quinn::Endpoint,
        cfg: quinn::ClientConfig,
        addr: SocketAddr,
    ) -> Result<Self> {
        let connecting = endpoint.connect_with(cfg, addr, COORDINATOR_SERVER_NAME)?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                anyhow!("no answer from the coordinator at {addr} within {CONNECT_TIMEOUT:?}")
            })?
            .map_err(|e| anyhow!("cannot connect to the coordinator at {addr}: {e}"))?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            conn,
            send,
            recv,
            dec: FrameDecoder::new(MAX_COORDINATOR_FRAME),
            buf: vec![0u8; 64 * 1024],
        })
    }

    pub async fn send(&mut self, msg: &DeviceMsg) -> Result<()> {
        self.send.write_all(&wire::encode(msg)).await?;
        Ok(())
    }

    /// Next message; `Ok(None)` when the coordinator closed the stream.
    pub async fn recv(&mut self) -> Result<Option<CoordinatorMsg>> {
        loop {
            if let Some(f) = self.dec.next_frame()? {
                return Ok(Some(wire::decode(&f)?));
            }
            let want = self.dec.wanted().min(self.buf.len());
            match self.recv.read(&mut self.buf[..want]).await {
                Ok(Some(n)) => self.dec.push(&self.buf[..n]),
                Ok(None) => {
                    self.dec.finish()?;
                    return Ok(None);
                }
                Err(e) => return Err(anyhow!("control stream: {e}")),
            }
        }
    }
}

/// Generates the identity key and CSR, and enrolls. Returns the identity key PEM too.
pub async fn enroll(token: &EnrollToken, hostname: &str, os: &str) -> Result<(Enrolled, String)> {
    let key = rcgen::KeyPair::generate().context("generating identity key")?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .context("making certificate request")?;
    let addr = resolve(&token.coordinator).await?;
    let endpoint = client_endpoint()?;
    let mut ch = Channel::open(&endpoint, enroll_config(token.ca_sha256)?, addr).await?;
    ch.send(&DeviceMsg::Enroll(EnrollRequest {
        protocol: PROTOCOL_VERSION,
        token_id: token.id_hex(),
        token_secret: TokenSecret(Bytes(token.secret.expose().to_vec())),
        hostname: hostname.to_string(),
        os: os.to_string(),
        csr_der: Bytes(csr.der().to_vec()),
    }))
    .await?;
    let reply = tokio::time::timeout(CONNECT_TIMEOUT, ch.recv())
        .await
        .map_err(|_| anyhow!("the coordinator did not answer the enrollment"))??;
    ch.conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    match reply {
        Some(CoordinatorMsg::Enrolled(e)) => {
            if Sha256::digest(&e.ca_der.0).as_slice() != token.ca_sha256 {
                bail!("the coordinator sent a CA that does not match the token's fingerprint");
            }
            Ok((e, key.serialize_pem()))
        }
        Some(CoordinatorMsg::Error { code, message }) => Err(Refused { code, message }.into()),
        Some(other) => bail!("unexpected answer to enrollment: {:?}", msg_type(&other)),
        None => bail!("the coordinator closed the connection without answering"),
    }
}

pub fn msg_type(m: &CoordinatorMsg) -> &'static str {
    match m {
        CoordinatorMsg::Enrolled(_) => "enrolled",
        CoordinatorMsg::Netmap(_) => "netmap",
        CoordinatorMsg::NetmapDelta(_) => "netmap_delta",
        CoordinatorMsg::CertRenewed { .. } => "cert_renewed",
        CoordinatorMsg::Pong { .. } => "pong",
        CoordinatorMsg::Error { .. } => "error",
        CoordinatorMsg::Lease { .. } => "lease",
        CoordinatorMsg::RotateNow { .. } => "rotate_now",
        CoordinatorMsg::PostureWants(_) => "posture_wants",
        CoordinatorMsg::PostureVerdict(_) => "posture_verdict",
    }
}

/// A fresh identity key's CSR, for tests that speak the protocol by hand.
pub fn test_csr() -> Vec<u8> {
    rcgen::KeyPair::generate()
        .and_then(|k| rcgen::CertificateParams::default().serialize_request(&k))
        .map(|c| c.der().to_vec())
        .unwrap_or_default()
}
