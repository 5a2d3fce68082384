//! `ward-shared`: everything more than one Ward program needs, free of I/O.
//!
//! - [`wire`]: the control protocol between `ward` and `ward-coordinator` (one version number,
//!   one place), and its length-prefixed codec with a hard maximum frame size.
//! - [`token`]: the enrollment token format (coordinator address + CA fingerprint + secret).
//! - [`names`]: newtypes for hostnames and user names, parsed and sanitized once.
//! - [`addr`]: overlay address pools (IPv4 from 100.64.0.0/10, an IPv6 ULA /48).
//! - [`filter`]: inbound filter rules compiled from the policy, and the stateful packet filter
//!   that enforces them on every decrypted packet.
//! - [`peerset`]: peer sets, the source populations a netmap carries once and inbound rules
//!   name by id, with their aggregation into prefixes, factoring, diffs and application.
//! - [`flows`]: flow records a device aggregates from its data plane and reports.
//! - [`policy`]: the policy language (TOML), its compiler to per-device access, its tests,
//!   `explain` and `diff`.
//! - [`lease`]: coordinator-signed, expiring leases binding a WireGuard key to a device.
//! - [`keyproof`]: a device's proof that it holds the private half of a key it asks a lease for.
//! - [`posture`]: device posture reports, what to collect, and evaluation against requirements.
//! - [`routes`]: routed prefixes (subnet routers, exit nodes): the `Prefix` type.
//! - [`relay`]: relay credentials, tickets, and the relay control and forwarding protocols.
//! - [`resume`]: a device's new control session resumes its netmap: the first netmap leaves
//!   out the peers the device holds already.
//! - [`discovery`]: the address-discovery messages (what ip:port a relay sees a device at).
//! - [`duration`]: the one duration grammar (`500ms`, `90s`, `15m`, `1h`, `7d`).
//! - [`secret`]: a byte-string type that redacts itself in `Debug`.
//! - [`oauth`]: the browser sign-in's PKCE values, loopback redirect rule and callback parser.
//!
//! This crate must not depend on tokio, quinn, clap, a database or anything that touches the
//! operating system: no sockets, no clock, no OS randomness. Time and random bytes are passed in.

pub mod addr;
pub mod discovery;
pub mod duration;
pub mod filter;
pub mod flows;
pub mod keyproof;
pub mod lease;
pub mod names;
pub mod oauth;
pub mod peerset;
pub mod policy;
pub mod posture;
pub mod relay;
pub mod resume;
pub mod routes;
pub mod secret;
pub mod token;
pub mod wire;
