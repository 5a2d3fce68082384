//! Relays: the credential a relay runs with, the tickets devices present to it, and the two
//! protocols around it.
//!
//! ```text
//!   ward-coordinator ◀── control (QUIC, ALPN ward-relay-control/1) ── ward-relay
//!          │  Welcome{ticket key, relay cert, CA}, Revoked, Cert           ▲
//!          │  (relay: Hello{name, secret, CSR}, Load, RenewCert)           │ QUIC, ALPN ward-relay/1,
//!          │                                                               │ mTLS with the device cert,
//!          └─ netmap (relays, peers' home relay), RelayTicket ─▶ device ───┘ Hello{ticket}, datagrams
//! ```
//!
//! **Credential.** `ward-coordinator relay add NAME --addr HOST:PORT` prints `wardrelay1-`
//! followed by base64url of
//! `len(coordinator) u8 | coordinator | ca_sha256 [32] | len(name) u8 | name | secret [32]`.
//! The coordinator stores only the secret's SHA-256 ([`crate::token::hash_secret`]).
//!
//! **Control session (relay ↔ coordinator).** The relay dials the coordinator's QUIC port with
//! ALPN [`RELAY_CONTROL_ALPN`], pins the CA by the credential's fingerprint (no client
//! certificate), opens one bidirectional stream and exchanges frames in the codec of
//! [`crate::wire`] (4-byte length, JSON), at most [`MAX_RELAY_CONTROL_FRAME`] bytes each way.
//! First frame: [`RelayToCoordinator::Hello`] with its name, secret and a CSR for a key it made
//! at start; the coordinator answers [`CoordinatorToRelay::Welcome`] (the key tickets are
//! signed with, a server certificate for [`relay_server_name`] signed by the CA, the CA
//! certificate, and the devices whose tickets must be refused) or `Error` and closes. Then the
//! relay reports [`RelayLoad`] every few seconds; the coordinator pushes `Revoked` when a device
//! loses access.
//!
//! **Tickets.** A device asks its coordinator (`DeviceMsg::RelayTicketRequest`) and gets a
//! [`SignedTicket`] (`CoordinatorMsg::RelayTicket`): the coordinator's Ed25519 signature (the
//! lease key, domain-separated) over
//! `"ward-relay-ticket-v1\0" | device_id u64 | cert_identity [32] | not_before_ms i64 |
//!  not_after_ms i64 | serial u64 | issuer [32]` (integers big-endian). `cert_identity` is the
//! SHA-256 of the public key in the device's client certificate (the same hash the coordinator
//! keys devices by), so a ticket is useless without that certificate's private key.
//!
//! **Forwarding (device ↔ relay).** The device dials the relay with ALPN [`RELAY_ALPN`] and
//! server name [`relay_server_name`] (verified against the coordinator's CA), presenting its
//! device certificate. It opens one bidirectional stream and sends
//! [`DeviceToRelay::Hello`] with its ticket; the relay verifies the ticket offline (signature,
//! issuer, time, not revoked, `cert_identity` equal to the presented certificate's) and answers
//! [`RelayToDevice::Welcome`] or `Error` and closes. Fresh tickets follow as
//! [`DeviceToRelay::Ticket`] before the current one expires. WireGuard datagrams travel as QUIC
//! datagrams: [`RELAY_HEADER_LEN`] bytes of device id (big-endian u64: the destination from a
//! device, the source from the relay), then the datagram, unchanged. The relay sees only
//! ciphertext.
//!
//! **Plain-UDP binding (forwarding version [`RELAY_PROTOCOL_UDP`]).** A device whose `Hello`
//! says version 2 may send [`DeviceToRelay::UdpBind`] on its stream; the relay answers
//! [`RelayToDevice::UdpBinding`] with the connection's token and a fresh nonce (16 bytes each,
//! hex in JSON). The device sends `0x01 || token || nonce` in plain UDP to the relay's port
//! from the socket it relays through; the relay binds that datagram's source address and
//! answers [`RelayToDevice::UdpBound`] on the stream. WireGuard datagrams may then travel as
//! `0x02 || token || device id (8 bytes) || datagram` in plain UDP both ways (the id as in
//! the QUIC datagram header). A version-1 device never sees any of this and keeps QUIC
//! datagrams; a version-1 connection that sends `UdpBind` breaks the protocol.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;
use crate::wire::{Bytes, DeviceId, ErrorCode};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Version of both relay protocols (control and forwarding).
///
/// - 1: first version: control Hello/Welcome/Load/Revoked/RenewCert/Cert; forwarding
///   Hello/Ticket/Welcome/Error and datagrams with an 8-byte device id header.
/// - 2 (forwarding only, [`RELAY_PROTOCOL_UDP`]): version 1 plus the plain-UDP binding
///   (`UdpBind`, `UdpBinding`, `UdpBound`). The control protocol stays at 1.
pub const RELAY_PROTOCOL_VERSION: u32 = 1;
/// Forwarding protocol version with the plain-UDP binding messages. A relay that knows it
/// accepts a `Hello` of version 1 or 2.
pub const RELAY_PROTOCOL_UDP: u32 = 2;
/// Bytes of a plain-UDP binding token and of its confirm nonce.
pub const UDP_BIND_LEN: usize = 16;
/// ALPN of the device ↔ relay forwarding connection.
pub const RELAY_ALPN: &[u8] = b"ward-relay/1";
/// ALPN of the relay ↔ coordinator control connection (on the coordinator's QUIC port).
pub const RELAY_CONTROL_ALPN: &[u8] = b"ward-relay-control/1";
/// Largest control frame either way.
pub const MAX_RELAY_CONTROL_FRAME: usize = 1024 * 1024;
/// Largest frame on a device's relay stream either way (a ticket is about 300 bytes).
pub const MAX_RELAY_STREAM_FRAME: usize = 8 * 1024;
/// Bytes before the WireGuard datagram in every relayed QUIC datagram.
pub const RELAY_HEADER_LEN: usize = 8;
/// Largest WireGuard datagram a relay forwards (a full 64 KiB TUN packet cannot be relayed:
/// relayed paths have an MTU, see the device's path MTU handling).
pub const MAX_RELAYED_DATAGRAM: usize = 2048;
/// How long a ticket the coordinator issues is valid. Short, because a relay can only refuse a
/// revoked device's ticket while it is connected to the coordinator or still remembers the
/// revocation; expiry bounds both.
pub const TICKET_TTL_MS: i64 = 10 * 60 * 1000;
/// Clock skew tolerated at the start of a ticket.
pub const TICKET_NOT_BEFORE_SKEW_MS: i64 = 5_000;
/// Longest relay name (it is a DNS label in [`relay_server_name`]).
pub const MAX_RELAY_NAME_LEN: usize = 63;

pub const RELAY_CREDENTIAL_PREFIX: &str = "wardrelay1-";
const MAX_CREDENTIAL_LEN: usize = 1024;
const TICKET_DOMAIN: &[u8] = b"ward-relay-ticket-v1\0";

/// The TLS server name a relay's certificate carries and devices dial.
pub fn relay_server_name(name: &str) -> String {
    format!("{name}.relay.ward.internal")
}

/// Whether `name` can name a relay: 1 to 63 of `a-z 0-9 -`, not starting or ending with `-`.
pub fn valid_relay_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_RELAY_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

// ---------------------------------------------------------------------------------------------
// Credential

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("not a Ward relay credential (it should start with {RELAY_CREDENTIAL_PREFIX:?})")]
    Prefix,
    #[error("relay credential is not valid base64url")]
    Encoding,
    #[error("relay credential is truncated or has trailing bytes")]
    Length,
    #[error("relay credential's coordinator address or name is not valid")]
    Field,
}

/// What a relay needs to join: where the coordinator is, which CA to pin, its name and secret.
/// `Debug` never shows the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayCredential {
    /// `HOST:PORT` of the coordinator's QUIC listener; with several replicas, each replica's,
    /// comma-separated (see [`RelayCredential::coordinators`]).
    pub coordinator: String,
    pub ca_sha256: [u8; 32],
    pub name: String,
    /// 32 random bytes.
    pub secret: Secret,
}

/// The longest coordinator address list a credential carries (its length is one byte).
pub const MAX_CREDENTIAL_ADDRS_LEN: usize = 255;

impl RelayCredential {
    /// The coordinator field for `first` and then `others` (the instance's replicas): each
    /// address once, comma-separated, as many as fit in [`MAX_CREDENTIAL_ADDRS_LEN`] bytes
    /// (`first` always; an address with a comma is left out).
    pub fn join_coordinators(first: &str, others: &[String]) -> String {
        let mut out = first.to_string();
        for a in others {
            let a = a.trim();
            if a.is_empty() || a.contains(',') || out.split(',').any(|x| x == a) {
                continue;
            }
            if out.len() + 1 + a.len() > MAX_CREDENTIAL_ADDRS_LEN {
                break;
            }
            out.push(',');
            out.push_str(a);
        }
        out
    }

    /// Every coordinator address the credential names, in order (empty entries skipped).
    pub fn coordinators(&self) -> Vec<&str> {
        self.coordinator
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect()
    }

    pub fn encode(&self) -> String {
        let addr = self.coordinator.as_bytes();
        let addr = &addr[..addr.len().min(255)];
        let name = self.name.as_bytes();
        let name = &name[..name.len().min(MAX_RELAY_NAME_LEN)];
        let mut raw = Vec::with_capacity(2 + addr.len() + 32 + name.len() + 32);
        raw.push(addr.len() as u8);
        raw.extend_from_slice(addr);
        raw.extend_from_slice(&self.ca_sha256);
        raw.push(name.len() as u8);
        raw.extend_from_slice(name);
        raw.extend_from_slice(self.secret.expose());
        format!("{RELAY_CREDENTIAL_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }

    pub fn parse(s: &str) -> Result<Self, CredentialError> {
        let body = s
            .trim()
            .strip_prefix(RELAY_CREDENTIAL_PREFIX)
            .ok_or(CredentialError::Prefix)?;
        if body.len() > MAX_CREDENTIAL_LEN {
            return Err(CredentialError::Length);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| CredentialError::Encoding)?;
        let (&alen, rest) = raw.split_first().ok_or(CredentialError::Length)?;
        let addr = rest.get(..alen as usize).ok_or(CredentialError::Length)?;
        let rest = &rest[alen as usize..];
        let ca = rest.get(..32).ok_or(CredentialError::Length)?;
        let rest = &rest[32..];
        let (&nlen, rest) = rest.split_first().ok_or(CredentialError::Length)?;
        let name = rest.get(..nlen as usize).ok_or(CredentialError::Length)?;
        let secret = &rest[nlen as usize..];
        if secret.len() != 32 {
            return Err(CredentialError::Length);
        }
        let coordinator = std::str::from_utf8(addr)
            .map_err(|_| CredentialError::Field)?
            .to_string();
        let name = std::str::from_utf8(name)
            .map_err(|_| CredentialError::Field)?
            .to_string();
        if coordinator.is_empty() || !valid_relay_name(&name) {
            return Err(CredentialError::Field);
        }
        let mut ca_sha256 = [0u8; 32];
        ca_sha256.copy_from_slice(ca);
        Ok(RelayCredential {
            coordinator,
            ca_sha256,
            name,
            secret: Secret::new(secret.to_vec()),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tickets

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub device_id: DeviceId,
    /// SHA-256 of the public key in the device's client certificate (hex in JSON).
    #[serde(with = "hex32")]
    pub cert_identity: [u8; 32],
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub serial: u64,
}

/// A ticket with the coordinator's signature (base64 in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTicket {
    #[serde(flatten)]
    pub ticket: Ticket,
    pub signature: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket signature does not verify (forged, altered, or from another coordinator)")]
    BadSignature,
    #[error("ticket {serial} expired {ago_ms} ms ago")]
    Expired { serial: u64, ago_ms: i64 },
    #[error("ticket {serial} is not valid for another {in_ms} ms")]
    NotYetValid { serial: u64, in_ms: i64 },
    #[error("ticket validity is inverted (not_after before not_before)")]
    Inverted,
    #[error("ticket {serial} is for another certificate than the one presented")]
    WrongCertificate { serial: u64 },
}

impl Ticket {
    fn signed_bytes(&self, issuer: &VerifyingKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(TICKET_DOMAIN.len() + 8 + 32 + 8 + 8 + 8 + 32);
        b.extend_from_slice(TICKET_DOMAIN);
        b.extend_from_slice(&self.device_id.0.to_be_bytes());
        b.extend_from_slice(&self.cert_identity);
        b.extend_from_slice(&self.not_before_ms.to_be_bytes());
        b.extend_from_slice(&self.not_after_ms.to_be_bytes());
        b.extend_from_slice(&self.serial.to_be_bytes());
        b.extend_from_slice(issuer.as_bytes());
        b
    }

    /// Signs with the coordinator's key.
    pub fn sign(self, key: &SigningKey) -> SignedTicket {
        let sig = key.sign(&self.signed_bytes(&key.verifying_key()));
        SignedTicket {
            ticket: self,
            signature: Bytes(sig.to_bytes().to_vec()),
        }
    }
}

impl SignedTicket {
    /// Signature, issuer and time window, against the coordinator's key and `now_ms` (the
    /// verifier's wall clock, ms since the epoch).
    pub fn verify(&self, issuer: &VerifyingKey, now_ms: i64) -> Result<&Ticket, TicketError> {
        let t = &self.ticket;
        let sig: [u8; 64] = self
            .signature
            .0
            .as_slice()
            .try_into()
            .map_err(|_| TicketError::BadSignature)?;
        issuer
            .verify(&t.signed_bytes(issuer), &Signature::from_bytes(&sig))
            .map_err(|_| TicketError::BadSignature)?;
        if t.not_after_ms <= t.not_before_ms {
            return Err(TicketError::Inverted);
        }
        if now_ms >= t.not_after_ms {
            return Err(TicketError::Expired {
                serial: t.serial,
                ago_ms: now_ms - t.not_after_ms,
            });
        }
        if now_ms + TICKET_NOT_BEFORE_SKEW_MS < t.not_before_ms {
            return Err(TicketError::NotYetValid {
                serial: t.serial,
                in_ms: t.not_before_ms - now_ms,
            });
        }
        Ok(t)
    }

    /// `verify`, and the ticket must name the certificate the device presented.
    pub fn verify_for(
        &self,
        issuer: &VerifyingKey,
        now_ms: i64,
        cert_identity: &[u8; 32],
    ) -> Result<&Ticket, TicketError> {
        let t = self.verify(issuer, now_ms)?;
        if !crate::secret::ct_eq(&t.cert_identity, cert_identity) {
            return Err(TicketError::WrongCertificate { serial: t.serial });
        }
        Ok(t)
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Control protocol (relay ↔ coordinator)

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayToCoordinator {
    /// First frame.
    Hello(RelayHello),
    /// Every few seconds.
    Load(RelayLoad),
    /// A new server certificate for a key the relay just made (before the current one ends).
    RenewCert { csr_der: Bytes },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayHello {
    pub protocol: u32,
    pub name: String,
    /// The credential's secret (the coordinator compares its SHA-256 in constant time).
    pub secret: Bytes,
    /// A CSR (DER) for the key the relay serves devices with.
    pub csr_der: Bytes,
    #[serde(default)]
    pub version: String,
}

/// What a relay carries, for `relay ls` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayLoad {
    /// Devices with a live, ticketed connection.
    pub devices: u32,
    /// WireGuard bytes forwarded since the relay started.
    pub bytes_relayed: u64,
    /// Datagrams forwarded since the relay started.
    pub datagrams_relayed: u64,
    /// Datagrams dropped since the relay started (any reason).
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordinatorToRelay {
    Welcome(RelayWelcome),
    /// Refuse these devices' tickets from now on, and drop their connections.
    Revoked {
        devices: Vec<DeviceId>,
    },
    /// The certificate asked for with `RenewCert`.
    Cert {
        cert_der: Bytes,
        not_after_ms: i64,
    },
    /// The request was refused; after `Hello` the coordinator closes the connection.
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayWelcome {
    pub protocol: u32,
    /// The Ed25519 public key tickets are signed with (32 bytes).
    pub ticket_key: Bytes,
    /// The relay's server certificate (DER) for [`relay_server_name`], signed by the CA.
    pub cert_der: Bytes,
    pub cert_not_after_ms: i64,
    /// The CA certificate (DER): devices' client certificates chain to it.
    pub ca_der: Bytes,
    /// Devices whose tickets must be refused (revoked or without access).
    #[serde(default)]
    pub revoked: Vec<DeviceId>,
}

// ---------------------------------------------------------------------------------------------
// Forwarding protocol (device ↔ relay), on the stream

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceToRelay {
    /// First frame.
    Hello { protocol: u32, ticket: SignedTicket },
    /// A fresh ticket, before the current one expires.
    Ticket { ticket: SignedTicket },
    /// Version 2: asks for a plain-UDP binding (answered by [`RelayToDevice::UdpBinding`]).
    UdpBind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayToDevice {
    Welcome {
        device_id: DeviceId,
        /// Largest WireGuard datagram this connection carries now (QUIC's datagram size
        /// minus [`RELAY_HEADER_LEN`]); it may grow as QUIC discovers the path MTU.
        max_datagram: u16,
    },
    /// The ticket or request was refused; the relay then closes the connection.
    Error { code: ErrorCode, message: String },
    /// Version 2, the answer to `UdpBind`: the connection's token (the same for its
    /// lifetime) and the nonce the confirm datagram must carry (valid for 5 s, once).
    UdpBinding {
        #[serde(with = "hex16")]
        token: [u8; UDP_BIND_LEN],
        #[serde(with = "hex16")]
        nonce: [u8; UDP_BIND_LEN],
    },
    /// Version 2: a confirm datagram bound its source address; plain-UDP data from that
    /// address is accepted, and the relay sends this device's datagrams there.
    UdpBound,
}

mod hex16 {
    use super::UDP_BIND_LEN;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; UDP_BIND_LEN], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; UDP_BIND_LEN], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; UDP_BIND_LEN];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Datagrams

/// Writes the relay header for `device` followed by `datagram`.
pub fn encode_datagram(device: DeviceId, datagram: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RELAY_HEADER_LEN + datagram.len());
    out.extend_from_slice(&device.0.to_be_bytes());
    out.extend_from_slice(datagram);
    out
}

/// Splits a relayed QUIC datagram into its device id and WireGuard datagram. `None` if it is
/// shorter than the header, carries nothing, or is larger than [`MAX_RELAYED_DATAGRAM`].
pub fn split_datagram(d: &[u8]) -> Option<(DeviceId, &[u8])> {
    let (head, body) = d.split_at_checked(RELAY_HEADER_LEN)?;
    if body.is_empty() || body.len() > MAX_RELAYED_DATAGRAM {
        return None;
    }
    let id = u64::from_be_bytes(head.try_into().ok()?);
    Some((DeviceId(id), body))
}

// ---------------------------------------------------------------------------------------------
// The forwarding protocol over TLS/TCP (networks that drop UDP)
//
// One TLS-over-TCP connection carries what QUIC carries on its stream and in its datagrams.
// Every frame is a [`crate::wire`] frame (4-byte big-endian length, then the body), bounded
// by [`MAX_RELAY_STREAM_FRAME`]; the body's first byte says what it holds:
//
// | type | body after the type byte                                           |
// |------|--------------------------------------------------------------------|
// | 0    | a message: [`DeviceToRelay`] / [`RelayToDevice`] as JSON            |
// | 1    | a datagram: 8-byte device id + WireGuard datagram ([`encode_datagram`]) |
// | 2    | ping: 8-byte nonce (big-endian); the relay answers with a pong      |
// | 3    | pong: the ping's nonce                                              |
//
// Datagrams share the byte stream with everything else, so one lost TCP segment delays the
// ones behind it (head-of-line blocking): accepted, since this transport exists only where
// UDP does not get through at all. The device pings every second (its RTT sample, as QUIC's
// keepalive and `rtt()` are on the other transport); either side drops a connection silent
// for [`TCP_IDLE_TIMEOUT_MS`].

/// A TLS-over-TCP relay connection with nothing received for this long is dead.
pub const TCP_IDLE_TIMEOUT_MS: u64 = 5_000;

/// The largest WireGuard datagram a relay offers a device on TCP. The TCP link itself would
/// carry [`MAX_RELAYED_DATAGRAM`], but the datagram's destination may be a QUIC link, whose room
/// depends on its path: this is what every QUIC link carries from its first packet (a
/// 1 200-byte UDP payload, QUIC's minimum), so a datagram from a TCP device fits wherever it
/// goes and the device's inner MTU is lowered to match (ICMP too-big into its TUN).
pub const TCP_MAX_DATAGRAM: u16 = 1154;

const TCP_MSG: u8 = 0;
const TCP_DATAGRAM: u8 = 1;
const TCP_PING: u8 = 2;
const TCP_PONG: u8 = 3;

/// One frame body on a TLS-over-TCP relay connection, parsed ([`parse_tcp_frame`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpFrame<'a> {
    /// A JSON message (decode with [`crate::wire::decode`]).
    Msg(&'a [u8]),
    /// A relayed datagram with its 8-byte device-id header (split with [`split_datagram`]).
    Datagram(&'a [u8]),
    Ping(u64),
    Pong(u64),
}

/// A message as a whole TCP relay frame (length prefix included).
pub fn encode_tcp_msg<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing our own plain enums to JSON cannot fail.
    let json = serde_json::to_vec(msg).unwrap_or_default();
    tcp_frame(TCP_MSG, &[&json])
}

/// A relayed datagram (header for `device`, then `datagram`) as a whole TCP relay frame.
pub fn encode_tcp_datagram(device: DeviceId, datagram: &[u8]) -> Vec<u8> {
    tcp_frame(TCP_DATAGRAM, &[&device.0.to_be_bytes(), datagram])
}

/// A datagram that already carries its 8-byte header, as a whole TCP relay frame.
pub fn encode_tcp_raw_datagram(with_header: &[u8]) -> Vec<u8> {
    tcp_frame(TCP_DATAGRAM, &[with_header])
}

pub fn encode_tcp_ping(nonce: u64) -> Vec<u8> {
    tcp_frame(TCP_PING, &[&nonce.to_be_bytes()])
}

pub fn encode_tcp_pong(nonce: u64) -> Vec<u8> {
    tcp_frame(TCP_PONG, &[&nonce.to_be_bytes()])
}

/// Parses a frame body (as [`crate::wire::FrameDecoder`] returns it). `None` for an empty
/// body, an unknown type or a ping/pong of the wrong size.
pub fn parse_tcp_frame(body: &[u8]) -> Option<TcpFrame<'_>> {
    let (&ty, rest) = body.split_first()?;
    match ty {
        TCP_MSG => Some(TcpFrame::Msg(rest)),
        TCP_DATAGRAM => Some(TcpFrame::Datagram(rest)),
        TCP_PING => Some(TcpFrame::Ping(u64::from_be_bytes(rest.try_into().ok()?))),
        TCP_PONG => Some(TcpFrame::Pong(u64::from_be_bytes(rest.try_into().ok()?))),
        _ => None,
    }
}

fn tcp_frame(ty: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(4 + len);
    // Frames are bounded far below 4 GiB (the decoder refuses more than a few KiB).
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    out.push(ty);
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    fn ticket() -> Ticket {
        Ticket {
            device_id: DeviceId(7),
            cert_identity: [9; 32],
            not_before_ms: 1_000,
            not_after_ms: 601_000,
            serial: 3,
        }
    }

    #[test]
    fn credential_round_trips_and_hides_its_secret() {
        let c = RelayCredential {
            coordinator: "[fd00::1]:7443".into(),
            ca_sha256: [5; 32],
            name: "r1".into(),
            secret: Secret::new(vec![0xab; 32]),
        };
        let s = c.encode();
        assert!(s.starts_with(RELAY_CREDENTIAL_PREFIX));
        assert_eq!(RelayCredential::parse(&format!(" {s}\n")).unwrap(), c);
        assert!(!format!("{c:?}").contains("abab"));
    }

    #[test]
    fn a_credential_names_every_replica_that_fits() {
        let others = vec![
            "b.example:7443".to_string(),
            "a.example:7443".to_string(),
            " ".to_string(),
            "x,y:1".to_string(),
            "[fd00::2]:7443".to_string(),
        ];
        let joined = RelayCredential::join_coordinators("a.example:7443", &others);
        assert_eq!(joined, "a.example:7443,b.example:7443,[fd00::2]:7443");
        let c = RelayCredential {
            coordinator: joined,
            ca_sha256: [5; 32],
            name: "r1".into(),
            secret: Secret::new(vec![1; 32]),
        };
        let back = RelayCredential::parse(&c.encode()).unwrap();
        assert_eq!(
            back.coordinators(),
            ["a.example:7443", "b.example:7443", "[fd00::2]:7443"]
        );
        // The address list's length is one byte: what does not fit is left out, never cut.
        let many: Vec<String> = (0..40)
            .map(|i| format!("replica-{i}.example:7443"))
            .collect();
        let joined = RelayCredential::join_coordinators("first.example:7443", &many);
        assert!(joined.len() <= MAX_CREDENTIAL_ADDRS_LEN, "{}", joined.len());
        assert!(joined
            .split(',')
            .all(|a| a.ends_with(":7443") && a.contains(".example")));
        assert!(joined.starts_with("first.example:7443,replica-0.example:7443"));
    }

    #[test]
    fn bad_credentials_are_refused() {
        assert_eq!(
            RelayCredential::parse("ward1-AAAA"),
            Err(CredentialError::Prefix)
        );
        assert_eq!(
            RelayCredential::parse("wardrelay1-!!!"),
            Err(CredentialError::Encoding)
        );
        let good = RelayCredential {
            coordinator: "c:1".into(),
            ca_sha256: [5; 32],
            name: "r1".into(),
            secret: Secret::new(vec![1; 32]),
        }
        .encode();
        let raw = URL_SAFE_NO_PAD
            .decode(good.strip_prefix(RELAY_CREDENTIAL_PREFIX).unwrap())
            .unwrap();
        for cut in 0..raw.len() {
            let s = format!(
                "{RELAY_CREDENTIAL_PREFIX}{}",
                URL_SAFE_NO_PAD.encode(&raw[..cut])
            );
            assert!(RelayCredential::parse(&s).is_err(), "cut at {cut}");
        }
        let mut long = raw.clone();
        long.push(0);
        let s = format!("{RELAY_CREDENTIAL_PREFIX}{}", URL_SAFE_NO_PAD.encode(long));
        assert_eq!(RelayCredential::parse(&s), Err(CredentialError::Length));
        let huge = format!("{RELAY_CREDENTIAL_PREFIX}{}", "A".repeat(5000));
        assert_eq!(RelayCredential::parse(&huge), Err(CredentialError::Length));
    }

    #[test]
    fn relay_names() {
        assert!(valid_relay_name("r1"));
        assert!(valid_relay_name("eu-west-2"));
        for bad in ["", "-a", "a-", "A", "a.b", "a b", &"a".repeat(64)] {
            assert!(!valid_relay_name(bad), "{bad:?}");
        }
        assert_eq!(relay_server_name("r1"), "r1.relay.ward.internal");
    }

    #[test]
    fn ticket_verifies_only_for_its_issuer_time_and_certificate() {
        let k = key(1);
        let t = ticket().sign(&k);
        let pk = k.verifying_key();
        assert_eq!(t.verify_for(&pk, 2_000, &[9; 32]).unwrap(), &ticket());
        assert_eq!(
            t.verify_for(&pk, 2_000, &[8; 32]),
            Err(TicketError::WrongCertificate { serial: 3 })
        );
        assert_eq!(
            t.verify(&key(2).verifying_key(), 2_000),
            Err(TicketError::BadSignature)
        );
        assert_eq!(
            t.verify(&pk, 601_000),
            Err(TicketError::Expired {
                serial: 3,
                ago_ms: 0
            })
        );
        assert!(matches!(
            t.verify(&pk, -10_000),
            Err(TicketError::NotYetValid { .. })
        ));
        let mut altered = t.clone();
        altered.ticket.device_id = DeviceId(8);
        assert_eq!(altered.verify(&pk, 2_000), Err(TicketError::BadSignature));
        let mut short = t.clone();
        short.signature.0.pop();
        assert_eq!(short.verify(&pk, 2_000), Err(TicketError::BadSignature));
        let inverted = Ticket {
            not_after_ms: 1_000,
            ..ticket()
        }
        .sign(&k);
        assert_eq!(inverted.verify(&pk, 900), Err(TicketError::Inverted));
    }

    #[test]
    fn ticket_json_golden() {
        let t = ticket().sign(&key(1));
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.starts_with(
            r#"{"device_id":7,"cert_identity":"0909090909090909090909090909090909090909090909090909090909090909","not_before_ms":1000,"not_after_ms":601000,"serial":3,"signature":""#
        ), "{json}");
        let back: SignedTicket = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        let hello = DeviceToRelay::Hello {
            protocol: RELAY_PROTOCOL_VERSION,
            ticket: t,
        };
        let json = serde_json::to_string(&hello).unwrap();
        assert!(json.starts_with(r#"{"type":"hello","protocol":1,"ticket":{"device_id":7"#));
        assert_eq!(serde_json::from_str::<DeviceToRelay>(&json).unwrap(), hello);
    }

    #[test]
    fn control_messages_golden() {
        let m: RelayToCoordinator = serde_json::from_str(
            r#"{"type":"load","devices":2,"bytes_relayed":10,"datagrams_relayed":1,"dropped":0}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            RelayToCoordinator::Load(RelayLoad {
                devices: 2,
                bytes_relayed: 10,
                datagrams_relayed: 1,
                dropped: 0
            })
        );
        let r: CoordinatorToRelay =
            serde_json::from_str(r#"{"type":"revoked","devices":[3,4]}"#).unwrap();
        assert_eq!(
            r,
            CoordinatorToRelay::Revoked {
                devices: vec![DeviceId(3), DeviceId(4)]
            }
        );
        let w: RelayToDevice =
            serde_json::from_str(r#"{"type":"welcome","device_id":5,"max_datagram":1400}"#)
                .unwrap();
        assert_eq!(
            w,
            RelayToDevice::Welcome {
                device_id: DeviceId(5),
                max_datagram: 1400
            }
        );
    }

    #[test]
    fn udp_binding_messages_golden() {
        let hello = DeviceToRelay::Hello {
            protocol: RELAY_PROTOCOL_UDP,
            ticket: ticket().sign(&key(1)),
        };
        let json = serde_json::to_string(&hello).unwrap();
        assert!(json.starts_with(r#"{"type":"hello","protocol":2,"ticket":{"device_id":7"#));
        assert_eq!(
            serde_json::to_string(&DeviceToRelay::UdpBind).unwrap(),
            r#"{"type":"udp_bind"}"#
        );
        assert_eq!(
            serde_json::from_str::<DeviceToRelay>(r#"{"type":"udp_bind"}"#).unwrap(),
            DeviceToRelay::UdpBind
        );
        let mut token = [0u8; UDP_BIND_LEN];
        token[0] = 0xab;
        token[15] = 0x01;
        let b = RelayToDevice::UdpBinding {
            token,
            nonce: [0x5a; UDP_BIND_LEN],
        };
        let json = r#"{"type":"udp_binding","token":"ab000000000000000000000000000001","nonce":"5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"}"#;
        assert_eq!(serde_json::to_string(&b).unwrap(), json);
        assert_eq!(serde_json::from_str::<RelayToDevice>(json).unwrap(), b);
        assert_eq!(
            serde_json::to_string(&RelayToDevice::UdpBound).unwrap(),
            r#"{"type":"udp_bound"}"#
        );
        // A short or non-hex token is refused, not truncated.
        assert!(serde_json::from_str::<RelayToDevice>(
            r#"{"type":"udp_binding","token":"ab","nonce":"5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<RelayToDevice>(
            r#"{"type":"udp_binding","token":"zz000000000000000000000000000001","nonce":"5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"}"#
        )
        .is_err());
    }

    #[test]
    fn datagram_header() {
        let d = encode_datagram(DeviceId(0x0102), b"wg");
        assert_eq!(&d[..8], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(split_datagram(&d), Some((DeviceId(0x0102), &b"wg"[..])));
        assert_eq!(split_datagram(&d[..8]), None);
        assert_eq!(split_datagram(&d[..3]), None);
        assert_eq!(split_datagram(&[]), None);
        let big = encode_datagram(DeviceId(1), &[0; MAX_RELAYED_DATAGRAM + 1]);
        assert_eq!(split_datagram(&big), None);
        let max = encode_datagram(DeviceId(1), &[0; MAX_RELAYED_DATAGRAM]);
        assert!(split_datagram(&max).is_some());
    }

    #[test]
    fn tcp_frames_golden() {
        assert_eq!(
            encode_tcp_datagram(DeviceId(0x0102), &[0xaa, 0xbb]),
            vec![0, 0, 0, 11, 1, 0, 0, 0, 0, 0, 0, 1, 2, 0xaa, 0xbb]
        );
        assert_eq!(
            encode_tcp_raw_datagram(&encode_datagram(DeviceId(0x0102), &[0xaa, 0xbb])),
            encode_tcp_datagram(DeviceId(0x0102), &[0xaa, 0xbb])
        );
        assert_eq!(
            encode_tcp_ping(7),
            vec![0, 0, 0, 9, 2, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(
            encode_tcp_pong(7),
            vec![0, 0, 0, 9, 3, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        let msg = encode_tcp_msg(&RelayToDevice::Welcome {
            device_id: DeviceId(3),
            max_datagram: 1400,
        });
        let body = br#"{"type":"welcome","device_id":3,"max_datagram":1400}"#;
        assert_eq!(
            &msg[..4],
            &u32::try_from(body.len() + 1).unwrap().to_be_bytes()
        );
        assert_eq!(msg[4], 0);
        assert_eq!(&msg[5..], body);
    }

    #[test]
    fn tcp_frames_parse_and_refuse() {
        let mut dec = crate::wire::FrameDecoder::new(MAX_RELAY_STREAM_FRAME);
        dec.push(&encode_tcp_datagram(DeviceId(9), &[1, 2, 3]));
        dec.push(&encode_tcp_ping(5));
        dec.push(&encode_tcp_msg(&DeviceToRelay::Ticket {
            ticket: ticket().sign(&key(1)),
        }));
        let f = dec.next_frame().unwrap().unwrap();
        let Some(TcpFrame::Datagram(d)) = parse_tcp_frame(&f) else {
            panic!("{f:?}")
        };
        assert_eq!(split_datagram(d), Some((DeviceId(9), &[1u8, 2, 3][..])));
        let f = dec.next_frame().unwrap().unwrap();
        assert_eq!(parse_tcp_frame(&f), Some(TcpFrame::Ping(5)));
        let f = dec.next_frame().unwrap().unwrap();
        let Some(TcpFrame::Msg(m)) = parse_tcp_frame(&f) else {
            panic!("{f:?}")
        };
        assert!(matches!(
            crate::wire::decode::<DeviceToRelay>(m),
            Ok(DeviceToRelay::Ticket { .. })
        ));
        assert_eq!(parse_tcp_frame(&[]), None);
        assert_eq!(parse_tcp_frame(&[9, 1, 2]), None);
        assert_eq!(parse_tcp_frame(&[2, 1, 2]), None);
        assert_eq!(parse_tcp_frame(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        // A datagram too large for the stream bound is refused by the decoder, not buffered.
        let mut dec = crate::wire::FrameDecoder::new(MAX_RELAY_STREAM_FRAME);
        dec.push(&encode_tcp_datagram(
            DeviceId(1),
            &vec![0; MAX_RELAY_STREAM_FRAME],
        ));
        assert!(dec.next_frame().is_err());
    }
}
