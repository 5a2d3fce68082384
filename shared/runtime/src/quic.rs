//! QUIC plumbing the programs share: reading length-prefixed frames ([`ward_shared::wire`]'s
//! codec) from a stream, and a server-certificate check that pins a CA by its fingerprint.

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
    buf: &mut [u8],
) -> Result<Option<Vec<u8>>> {
    crate::stream::read_frame(recv, dec, buf).await
}

/// [`read_frame`], decoded as a `T`.
pub async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Option<T>> {
    crate::stream::read_msg(recv, dec, buf).await
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
