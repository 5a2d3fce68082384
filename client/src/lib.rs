//! `ward-client` library: the `ward` agent's parts, shared by the binary, the examples and the
//! whole-system tests.
//!
//! - [`agent`]: the device's I/O-free protocol core (session, leases, key rotation, posture
//!   cadence, certificate renewal, reconnect backoff), driven by [`daemon`] and by simulations.
//! - [`dataplane`]: TUN + WireGuard (boringtun) + UDP, with an I/O-free core.
//! - [`control`]: the QUIC control channel (enrollment with a pinned CA, mutual-TLS sessions).
//! - [`daemon`]: `ward daemon` (identity, control loop, local API).
//! - [`state`]: the device's durable identity file.
//! - [`posture`]: posture collection (OS, firewall, disk encryption, processes, files, custom checks).
//! - [`dns`]: the I/O-free resolver core (device and service names from the netmap,
//!   forwarding of other names), driven by the daemon.
//! - [`api`]: the local Unix-socket API between the CLI and the daemon.
//! - [`login`]: the CLI's loopback listener for `ward up --login` in a browser.

pub mod agent;
pub mod api;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod login;
pub mod posture;
pub mod state;

/// Device certificates live this long (the coordinator decides; this is for renewal timing).
pub const CERT_LIFETIME_MS: i64 = 30 * 24 * 3600 * 1000;
