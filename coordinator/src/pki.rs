//! The coordinator's control-channel PKI: a CA made at `init`, a server certificate for the
//! QUIC listener, and device certificates issued from a device's CSR.
//!
//! Only the public key is taken from a CSR (after its self-signature proves possession of the
//! private key); every other field of a device certificate is ours. A device's identity is the
//! SHA-256 of that public key, which survives certificate renewal.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

pub const DEVICE_CERT_LIFETIME_MS: i64 = 30 * 24 * 3600 * 1000;
/// A relay's server certificate: short, since a relay renews it over its control session.
pub const RELAY_CERT_LIFETIME_MS: i64 = 7 * 24 * 3600 * 1000;
const SERVER_CERT_LIFETIME_MS: i64 = 90 * 24 * 3600 * 1000;
const CA_LIFETIME_MS: i64 = 10 * 365 * 24 * 3600 * 1000;
/// Allowed clock skew between devices and coordinator when a certificate starts.
const BACKDATE_MS: i64 = 3600 * 1000;

pub struct Ca {
    pub cert_der: Vec<u8>,
    key: KeyPair,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("certificate request is malformed or its signature does not verify")]
    Invalid,
}

impl Ca {
    /// Makes a new CA. `now_ms` is wall-clock time passed in by the caller.
    pub fn generate(now_ms: i64) -> Result<Self> {
        let key = KeyPair::generate().context("generating CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Ward control CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_time(now_ms - BACKDATE_MS)?;
        params.not_after = to_time(now_ms + CA_LIFETIME_MS)?;
        let cert = params.self_signed(&key).context("self-signing CA")?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            key,
        })
    }

    pub fn load(cert_der: Vec<u8>, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("parsing CA key")?;
        Ok(Self { cert_der, key })
    }

    /// PEM of the private key, for the 0600 file in the data dir.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(&self.cert_der).into()
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>> {
        Issuer::from_ca_cert_der(&CertificateDer::from(self.cert_der.as_slice()), &self.key)
            .context("loading CA as issuer")
    }

    /// A fresh server certificate for the QUIC listener: (cert DER, key PKCS#8 DER).
    pub fn server_cert(&self, now_ms: i64) -> Result<(Vec<u8>, Vec<u8>)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec![ward_shared::wire::COORDINATOR_SERVER_NAME.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Ward coordinator");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = to_time(now_ms - BACKDATE_MS)?;
        params.not_after = to_time(now_ms + SERVER_CERT_LIFETIME_MS)?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }

    /// Verifies a device CSR and returns the identity hash of its public key.
    pub fn csr_identity(csr_der: &[u8]) -> Result<[u8; 32], CsrError> {
        let csr = parse_csr(csr_der)?;
        Ok(Sha256::digest(csr.public_key.der_bytes()).into())
    }

    /// Issues a client certificate for the CSR's key. Returns (cert DER, not_after ms).
    pub fn issue_device_cert(
        &self,
        csr_der: &[u8],
        device_label: &str,
        now_ms: i64,
    ) -> Result<(Vec<u8>, i64)> {
        let csr = parse_csr(csr_der)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, device_label);
        params.subject_alt_names = vec![SanType::DnsName(
            format!("{device_label}.device.ward.internal").try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        let not_after = now_ms + DEVICE_CERT_LIFETIME_MS;
        params.not_before = to_time(now_ms - BACKDATE_MS)?;
        params.not_after = to_time(not_after)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok((cert.der().to_vec(), not_after))
    }
}

impl Ca {
    /// Issues a server certificate for relay `name` (`NAME.relay.ward.internal`, server auth
    /// only) for the CSR's key. Returns (cert DER, not_after ms).
    pub fn issue_relay_cert(
        &self,
        csr_der: &[u8],
        name: &str,
        now_ms: i64,
    ) -> Result<(Vec<u8>, i64)> {
        anyhow::ensure!(
            ward_shared::relay::valid_relay_name(name),
            "not a relay name"
        );
        let csr = parse_csr(csr_der)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Ward relay {name}"));
        params.subject_alt_names = vec![SanType::DnsName(
            ward_shared::relay::relay_server_name(name).try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        let not_after = now_ms + RELAY_CERT_LIFETIME_MS;
        params.not_before = to_time(now_ms - BACKDATE_MS)?;
        params.not_after = to_time(not_after)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok((cert.der().to_vec(), not_after))
    }
}

/// Identity hash of the public key inside a (verified) device certificate.
pub fn cert_identity(cert_der: &[u8]) -> Option<[u8; 32]> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(Sha256::digest(&cert.tbs_certificate.subject_pki.subject_public_key.data).into())
}

fn parse_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, CsrError> {
    if csr_der.len() > 8 * 1024 {
        return Err(CsrError::Invalid);
    }
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
        .map_err(|_| CsrError::Invalid)
}

fn to_time(ms: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).context("time out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_device_cert_bound_to_csr_key() {
        let ca = Ca::generate(1_800_000_000_000).unwrap();
        let dev_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&dev_key)
            .unwrap();
        let id = Ca::csr_identity(csr.der()).unwrap();
        let (cert, not_after) = ca
            .issue_device_cert(csr.der(), "d1", 1_800_000_000_000)
            .unwrap();
        assert_eq!(cert_identity(&cert), Some(id));
        assert_eq!(not_after, 1_800_000_000_000 + DEVICE_CERT_LIFETIME_MS);
        // The CA key round-trips through PEM.
        let again = Ca::load(ca.cert_der.clone(), &ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn relay_cert_verifies_for_its_server_name() {
        let now = ward_runtime::now_ms();
        let ca = Ca::generate(now).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let (der, not_after) = ca.issue_relay_cert(csr.der(), "r1", now).unwrap();
        assert_eq!(not_after, now + RELAY_CERT_LIFETIME_MS);
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert_der.clone()))
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let verify = |name: &str| {
            use rustls::client::danger::ServerCertVerifier;
            verifier.verify_server_cert(
                &CertificateDer::from(der.clone()),
                &[],
                &rustls_pki_types::ServerName::try_from(name.to_string()).unwrap(),
                &[],
                rustls_pki_types::UnixTime::now(),
            )
        };
        verify("r1.relay.ward.internal").unwrap();
        assert!(verify("r2.relay.ward.internal").is_err());
        assert!(verify(ward_shared::wire::COORDINATOR_SERVER_NAME).is_err());
        assert!(ca.issue_relay_cert(csr.der(), "Bad.Name", now).is_err());
        assert!(ca.issue_relay_cert(b"garbage", "r1", now).is_err());
    }

    #[test]
    fn rejects_bad_csr() {
        assert_eq!(Ca::csr_identity(b"garbage"), Err(CsrError::Invalid));
        let dev_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&dev_key)
            .unwrap();
        let mut der = csr.der().to_vec();
        let n = der.len();
        der[n - 5] ^= 0xff; // corrupt the signature
        assert_eq!(Ca::csr_identity(&der), Err(CsrError::Invalid));
        assert_eq!(
            Ca::csr_identity(&vec![0x30; 100_000]),
            Err(CsrError::Invalid)
        );
    }
}
