//! `ward-relay`: a public UDP service that devices reach from their WireGuard socket. Today it
//! answers address discovery ([`ward_shared::discovery`]); forwarding WireGuard datagrams between
//! devices that cannot reach each other directly comes later and slots into the same core.
//!
//! [`core`] is I/O-free (no sockets, no clock, no threads: time is passed in); the binary in
//! `main.rs` is its thin tokio driver. This crate must not depend on `ward-client` or
//! `ward-coordinator`: a relay knows the wire format and nothing of either program.

pub mod core;
pub mod forward;
pub mod metrics;
