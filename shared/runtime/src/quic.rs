//! QUIC plumbing the programs share: reading length-prefixed frames ([`ward_shared::wire`]'s
//! codec) from a stream, a server-certificate check that pins a CA by its fingerprint, and the
//! congestion window of relay links ([`TunnelWindow`]).

use std::sync::Arc;

use anyhow::Result;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use ward_shared::wire::FrameDecoder;

/// The next frame body from a QUIC stream ([`crate::stream::read_frame`]).
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
) -> Result<Option<Vec<u8>>> {
    crate::stream::read_frame(recv, dec).await
}

/// [`read_frame`], decoded as a `T`.
pub async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
) -> Result<Option<T>> {
    crate::stream::read_msg(recv, dec).await
}

/// The congestion "controller" of a relay link, at both ends (device and relay): a window so
/// large that quinn never holds a packet back and does not pace (quinn paces only windows
/// below 4 GiB).
///
/// A relay link carries WireGuard datagrams of inner flows that run their own congestion
/// control, as they do on the direct path (WireGuard over UDP has none of its own). A second
/// controller inside the tunnel only gets in their way: its window and pacing hold datagrams
/// in the connection's buffer, queueing delay the inner flows read as a slower path, and each
/// lost packet cuts its window although the datagrams are never sent again. What bounds a
/// link instead: the inner flows' controllers, the relay's per-device rate limits, the
/// connections' bounded datagram buffers (a full one drops, counted) and the UDP socket (a
/// full send buffer makes quinn wait). The link's one stream (hello, tickets: a few hundred
/// bytes a minute) stays reliable: loss detection and retransmission do not depend on the
/// window.
#[derive(Debug, Clone, Copy, Default)]
pub struct TunnelWindow;

/// [`TunnelWindow`]'s window: above what quinn paces, far below any overflow in its sums.
const TUNNEL_WINDOW: u64 = 1 << 40;

impl quinn::congestion::Controller for TunnelWindow {
    fn on_congestion_event(
        &mut self,
        _now: std::time::Instant,
        _sent: std::time::Instant,
        _is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
    }

    fn on_mtu_update(&mut self, _new_mtu: u16) {}

    fn window(&self) -> u64 {
        TUNNEL_WINDOW
    }

    fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
        Box::new(*self)
    }

    fn initial_window(&self) -> u64 {
        TUNNEL_WINDOW
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

impl quinn::congestion::ControllerFactory for TunnelWindow {
    fn build(
        self: Arc<Self>,
        _now: std::time::Instant,
        _current_mtu: u16,
    ) -> Box<dyn quinn::congestion::Controller> {
        Box::new(TunnelWindow)
    }
}

/// Accepts a server only if its chain holds the CA whose SHA-256 fingerprint is pinned (from
/// an enrollment token or a relay credential) and its certificate verifies against that CA for
/// the name dialled. No trust on first use.
#[derive(Debug)]
pub struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// What carried the fingerprint, for the error ("the token", "the relay credential").
    source: &'static str,
}

impl PinnedCa {
    pub fn new(
        fingerprint: [u8; 32],
        provider: Arc<rustls::crypto::CryptoProvider>,
        source: &'static str,
    ) -> PinnedCa {
        PinnedCa {
            fingerprint,
            provider,
            source,
        }
    }
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
            return Err(rustls::Error::General(format!(
                "the coordinator's certificate does not come from the CA named in {} (CA fingerprint mismatch)",
                self.source
            )));
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

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::congestion::ControllerFactory;
    use std::time::{Duration, Instant};

    #[test]
    fn the_tunnel_window_is_never_paced_and_never_cut() {
        let now = Instant::now();
        let mut c = Arc::new(TunnelWindow).build(now, 1200);
        // quinn paces only windows that fit in 32 bits.
        assert!(c.window() > u64::from(u32::MAX));
        assert_eq!(c.initial_window(), c.window());
        let before = c.window();
        c.on_congestion_event(now + Duration::from_millis(5), now, true, 1 << 20);
        c.on_mtu_update(1452);
        assert_eq!(
            c.window(),
            before,
            "loss and MTU changes leave the window as it was"
        );
    }
}
