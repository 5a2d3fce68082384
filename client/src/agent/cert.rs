//! Device certificate renewal timing. Making the request needs the identity key, which only
//! the driver holds: the agent asks for a CSR ([`super::Event::NeedCsr`]) and sends it.

/// Renew the device certificate when less than this fraction of its life is left.
pub const CERT_RENEW_FRACTION: f64 = 1.0 / 3.0;

/// Whether a certificate ending at `not_after_ms` is due for renewal at `unix_ms` (device time).
pub fn renewal_due(not_after_ms: i64, unix_ms: i64) -> bool {
    let left = not_after_ms - unix_ms;
    (left as f64) < crate::CERT_LIFETIME_MS as f64 * CERT_RENEW_FRACTION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_in_the_last_third() {
        let life = crate::CERT_LIFETIME_MS;
        assert!(!renewal_due(life, 0));
        assert!(!renewal_due(life, life / 2));
        assert!(renewal_due(life, life - life / 3 + 1));
        assert!(renewal_due(life, life + 1));
    }
}
