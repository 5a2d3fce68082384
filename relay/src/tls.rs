//! TLS for both sides of the relay: the control session's client config (the coordinator's CA
//! pinned by the credential's fingerprint), the devices' server config (the relay's certificate,
//! client certificates required and verified against the CA), and the identity of a device's
//! certificate.

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use ward_runtime::quic::PinnedCa;
use ward_shared::relay::{RELAY_ALPN, RELAY_CONTROL_ALPN};

/// How often an idle device connection is probed, and how long silence may last before it is
/// dropped: a dead device is noticed within about five seconds.
const DEVICE_KEEPALIVE: Duration = Duration::from_secs(1);
const DEVICE_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// QUIC datagrams received from a device connection and not yet forwarded, at most: about
/// 30 ms at 1 Gbit/s (the connection's own task takes them in batches). quinn drops the oldest
/// when it overflows, and the relayed TCP flows inside see that as loss: with 1 MiB a relay
/// sharing two cores with both ends of a bulk stream lost ~1 300 datagrams in 8 s (as many
/// TCP retransmissions, the stream at 0.42× of direct); with 4 MiB none. It fills only while
/// the connection's task is not scheduled; all of them together are bounded by
/// [`crate::forward::Limits::max_connections`].
const DATAGRAM_RECEIVE_BUFFER: usize = 4 * 1024 * 1024;
/// QUIC datagrams waiting to go out on a device connection, at most: about 30 ms at 1 Gbit/s,
/// so a stall of the connection's task on a busy host (datagrams keep coming from other
/// devices' tasks meanwhile) does not overflow it; the forwarding core bounds all buffers
/// together ([`crate::forward::Forwarder::queue_share`]).
pub(crate) const DATAGRAM_SEND_BUFFER: usize = 4 * 1024 * 1024;
/// Largest UDP payload path MTU discovery tries: a 1500-byte IPv4 packet.
const MTU_PROBE_UPPER_BOUND: u16 = 1500 - 20 - 8;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The control session's client config: TLS 1.3, ALPN `ward-relay-control/1`, the coordinator
/// accepted only if its chain holds the CA with this SHA-256 and its certificate verifies
/// against that CA. No client certificate: the relay proves itself with its secret.
pub fn control_client_config(ca_sha256: [u8; 32]) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa::new(
            ca_sha256,
            provider,
            "the relay credential",
        )))
        .with_no_client_auth();
    tls.alpn_protocols = vec![RELAY_CONTROL_ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(qc));
    // A coordinator that vanished without closing is noticed within ten seconds, and the
    // relay starts redialling.
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into()?));
    cc.transport_config(Arc::new(t));
    Ok(cc)
}

/// The devices' server config: chain [relay certificate, CA], the relay's key, client
/// certificates required and chained to the CA, ALPN `ward-relay/1`, datagrams on, one stream.
pub fn device_server_config(
    cert_der: &[u8],
    ca_der: &[u8],
    key: &rcgen::KeyPair,
) -> Result<quinn::ServerConfig> {
    let tls = device_tls_config(cert_der, ca_der, key)?;
    let qc = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(qc));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(DEVICE_KEEPALIVE));
    t.max_idle_timeout(Some(DEVICE_IDLE_TIMEOUT.try_into()?));
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((64u32 * 1024).into());
    t.datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    // Probe up to what a 1500-byte IPv4 path carries (quinn's default stops at IPv6's 1452),
    // so a full-size WireGuard datagram fits where the path allows.
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MTU_PROBE_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtud));
    // Ask the peer to acknowledge every 8th packet (or after 5 ms) instead of every 2nd: a
    // relayed datagram is never retransmitted, so the acknowledgements only feed congestion
    // control, and every one is a packet to build, encrypt and send on a busy path. A peer
    // without the ACK-frequency extension keeps acknowledging as before.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(7u32.into())
        .max_ack_delay(Some(std::time::Duration::from_millis(5)));
    t.ack_frequency_config(Some(ack));
    // The relayed datagrams' own flows control congestion; the link adds no window or pacing.
    t.congestion_controller_factory(Arc::new(ward_runtime::quic::TunnelWindow));
    sc.transport_config(Arc::new(t));
    Ok(sc)
}

/// The TLS side of [`device_server_config`], shared by QUIC and the TLS-over-TCP listener
/// ([`crate::tcp`]): chain [relay certificate, CA], client certificates required and chained
/// to the CA, ALPN `ward-relay/1`, TLS 1.3 only.
pub fn device_tls_config(
    cert_der: &[u8],
    ca_der: &[u8],
    key: &rcgen::KeyPair,
) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let ca = CertificateDer::from(ca_der.to_vec());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .context("the coordinator's CA certificate is unusable")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the device certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert_der.to_vec()), ca],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .context("the relay certificate does not match its key")?;
    tls.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    Ok(tls)
}

/// SHA-256 of the public key in a device's certificate (the hash tickets are bound to), from
/// the chain TLS verified on `conn`.
pub fn peer_cert_identity(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_identity(chain.first()?.as_ref())
}

/// SHA-256 of the subject public key (the BIT STRING's contents) of a DER certificate.
pub fn cert_identity(cert_der: &[u8]) -> Option<[u8; 32]> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(Sha256::digest(&cert.tbs_certificate.subject_pki.subject_public_key.data).into())
}
