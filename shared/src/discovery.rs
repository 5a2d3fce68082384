//! Address discovery (STUN-like): a device sends a [`BindingRequest`] from its WireGuard UDP
//! socket to a relay, and the relay answers with a [`BindingResponse`] naming the source address
//! it saw, so the device learns its public (reflexive) mapping; asking two relays tells whether
//! the device's NAT maps by destination.
//!
//! Both messages share the WireGuard socket, so they start with [`MAGIC`], whose first byte
//! (0xFF) never starts a WireGuard message (types 1..=4). Fixed sizes, no allocation beyond the
//! message, every malformed input an error.
//!
//! ```text
//! request : MAGIC(4) version(1)=1 kind(1)=1 txid(12) zero padding(19)         = 37 bytes
//! response: MAGIC(4) version(1)=1 kind(1)=2 txid(12) family(1)=4|6 port(2, BE)
//!           address(4 | 16)                                              = 25 | 37 bytes
//! ```
//!
//! A request is padded to the longest response, so a relay never answers with more bytes than
//! it received: a forged source address cannot turn a relay into an amplifier.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first four bytes of every discovery message.
pub const MAGIC: [u8; 4] = [0xff, b'W', b'R', b'D'];
/// The only version so far.
pub const VERSION: u8 = 1;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
const HEADER: usize = 4 + 1 + 1 + 12;
/// Longest encoded [`BindingResponse`] (IPv6).
pub const MAX_RESPONSE_LEN: usize = HEADER + 1 + 2 + 16;
/// Length of an encoded [`BindingRequest`]: padded to [`MAX_RESPONSE_LEN`] (no amplification).
pub const REQUEST_LEN: usize = MAX_RESPONSE_LEN;

/// A transaction id: random, chosen by the device, echoed by the relay.
pub type TxId = [u8; 12];

/// "What address do you see me at?"
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingRequest {
    pub txid: TxId,
}

/// "I saw you at `observed`."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingResponse {
    pub txid: TxId,
    pub observed: SocketAddr,
}

/// Why bytes are not a discovery message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("not a discovery message (bad magic)")]
    NotDiscovery,
    #[error("discovery message version {0} is not supported")]
    Version(u8),
    #[error("discovery message of kind {0} where another was expected")]
    Kind(u8),
    #[error("discovery message of {len} bytes has the wrong length")]
    Length { len: usize },
    #[error("discovery response names address family {0}")]
    Family(u8),
}

/// Whether a datagram is a discovery message (by its magic only; decode to be sure).
pub fn is_discovery(datagram: &[u8]) -> bool {
    datagram.starts_with(&MAGIC)
}

impl BindingRequest {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = KIND_REQUEST;
        b[6..HEADER].copy_from_slice(&self.txid);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, DiscoveryError> {
        let txid = header(b, KIND_REQUEST)?;
        if b.len() != REQUEST_LEN || b[HEADER..].iter().any(|&p| p != 0) {
            return Err(DiscoveryError::Length { len: b.len() });
        }
        Ok(BindingRequest { txid })
    }
}

impl BindingResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_RESPONSE_LEN);
        b.extend_from_slice(&MAGIC);
        b.push(VERSION);
        b.push(KIND_RESPONSE);
        b.extend_from_slice(&self.txid);
        // An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) is IPv4.
        let ip = match self.observed.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => {
                b.push(4);
                b.extend_from_slice(&self.observed.port().to_be_bytes());
                b.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                b.push(6);
                b.extend_from_slice(&self.observed.port().to_be_bytes());
                b.extend_from_slice(&v6.octets());
            }
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, DiscoveryError> {
        let txid = header(b, KIND_RESPONSE)?;
        let rest = &b[HEADER..];
        let (&family, rest) = rest
            .split_first()
            .ok_or(DiscoveryError::Length { len: b.len() })?;
        let want = match family {
            4 => 2 + 4,
            6 => 2 + 16,
            f => return Err(DiscoveryError::Family(f)),
        };
        if rest.len() != want {
            return Err(DiscoveryError::Length { len: b.len() });
        }
        let port = u16::from_be_bytes([rest[0], rest[1]]);
        let ip = if family == 4 {
            let mut o = [0u8; 4];
            o.copy_from_slice(&rest[2..6]);
            IpAddr::V4(Ipv4Addr::from(o))
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(&rest[2..18]);
            IpAddr::V6(Ipv6Addr::from(o))
        };
        Ok(BindingResponse {
            txid,
            observed: SocketAddr::new(ip, port),
        })
    }
}

fn header(b: &[u8], kind: u8) -> Result<TxId, DiscoveryError> {
    if !is_discovery(b) {
        return Err(DiscoveryError::NotDiscovery);
    }
    if b.len() < HEADER {
        return Err(DiscoveryError::Length { len: b.len() });
    }
    if b[4] != VERSION {
        return Err(DiscoveryError::Version(b[4]));
    }
    if b[5] != kind {
        return Err(DiscoveryError::Kind(b[5]));
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&b[6..HEADER]);
    Ok(txid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes() {
        let req = BindingRequest { txid: [7; 12] };
        let b = req.encode();
        assert_eq!(
            b.to_vec(),
            [
                &[0xff, b'W', b'R', b'D', 1, 1][..],
                &[7; 12][..],
                &[0; 19][..]
            ]
            .concat()
        );
        assert_eq!(BindingRequest::decode(&b), Ok(req));

        let resp = BindingResponse {
            txid: [9; 12],
            observed: "203.0.113.7:41641".parse().unwrap(),
        };
        let b = resp.encode();
        assert_eq!(b.len(), 25);
        assert_eq!(&b[18..], &[4, 0xa2, 0xa9, 203, 0, 113, 7]);
        assert_eq!(BindingResponse::decode(&b), Ok(resp));

        let v6 = BindingResponse {
            txid: [1; 12],
            observed: "[2001:db8::1]:51820".parse().unwrap(),
        };
        let b = v6.encode();
        assert_eq!(b.len(), MAX_RESPONSE_LEN);
        assert_eq!(BindingResponse::decode(&b), Ok(v6));
    }

    #[test]
    fn a_response_is_never_longer_than_its_request() {
        let v6 = BindingResponse {
            txid: [0; 12],
            observed: "[2001:db8::1]:1".parse().unwrap(),
        };
        assert!(v6.encode().len() <= BindingRequest { txid: [0; 12] }.encode().len());
    }

    #[test]
    fn mapped_ipv4_is_reported_as_ipv4() {
        let resp = BindingResponse {
            txid: [0; 12],
            observed: "[::ffff:198.51.100.2]:1000".parse().unwrap(),
        };
        let d = BindingResponse::decode(&resp.encode()).unwrap();
        assert_eq!(d.observed, "198.51.100.2:1000".parse().unwrap());
    }

    #[test]
    fn malformed_input_is_an_error() {
        let good = BindingResponse {
            txid: [3; 12],
            observed: "192.0.2.1:5".parse().unwrap(),
        }
        .encode();
        // Every truncation and every extension of a valid message is refused.
        for n in 0..good.len() {
            assert!(BindingResponse::decode(&good[..n]).is_err(), "{n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(BindingResponse::decode(&long).is_err());
        // Wrong magic, version, kind, family.
        let mut b = good.clone();
        b[0] = 1; // a WireGuard handshake initiation starts with 1
        assert_eq!(
            BindingResponse::decode(&b),
            Err(DiscoveryError::NotDiscovery)
        );
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(BindingResponse::decode(&b), Err(DiscoveryError::Version(2)));
        let mut b = good.clone();
        b[5] = 1;
        assert_eq!(BindingResponse::decode(&b), Err(DiscoveryError::Kind(1)));
        let mut b = good.clone();
        b[18] = 5;
        assert_eq!(BindingResponse::decode(&b), Err(DiscoveryError::Family(5)));
        let req = BindingRequest { txid: [0; 12] }.encode();
        for n in 0..REQUEST_LEN {
            assert!(BindingRequest::decode(&req[..n]).is_err(), "{n}");
        }
        let mut dirty = req;
        dirty[REQUEST_LEN - 1] = 1;
        assert!(BindingRequest::decode(&dirty).is_err(), "non-zero padding");
        assert!(BindingRequest::decode(&[req.as_slice(), &[0]].concat()).is_err());
        assert!(!is_discovery(&[1, 0, 0, 0]));
    }
}
