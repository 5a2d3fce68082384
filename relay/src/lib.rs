//! `ward-relay`: a public UDP service devices reach from anywhere. On one UDP port it answers
//! address discovery ([`ward_shared::discovery`]) and serves QUIC: devices holding a
//! coordinator-signed ticket connect with their device certificate, and the relay forwards
//! their WireGuard datagrams (ciphertext only) to each other by device id. A control session
//! to the coordinator brings the ticket key, the relay's certificate and revocations.
//!
//! Devices on networks that drop UDP reach the same forwarding over TLS/TCP on the same port
//! number ([`tcp`]).
//!
//! [`core`] (discovery), [`forward`] (connections, tickets, routing, limits), [`gate`]
//! (hellos per source address, before any ticket is checked) and [`udp_bind`] (the bindings
//! of a plain-UDP data path; not wired to a driver yet) are I/O-free:
//! no sockets, no clock, no threads; time is passed in. [`socket`], [`server`], [`tcp`],
//! [`control`], [`tls`] and [`metrics`] are their thin tokio/quinn drivers, wired together in
//! `main.rs`.
//! This crate must not depend on `ward-client` or `ward-coordinator`: a relay knows the wire
//! format and nothing of either program.

pub mod control;
pub mod core;
pub mod forward;
pub mod gate;
pub mod metrics;
pub mod server;
pub mod socket;
pub mod tcp;
pub mod tls;
pub mod udp_bind;
pub mod udp_path;
