//! `ward-coordinator`: Ward's control plane, as a library the binary (and benchmarks) use.
//!
//! - [`registry`]: the I/O-free registry (sessions, compiled policy, netmap deltas).
//! - [`trust`]: the I/O-free trust book (posture evaluation, automatic quarantine, risk).
//! - [`store`]: the storage interface and its SQLite implementation.
//! - [`leases`]: lease TTLs, issuing and signing (synchronous, over the store).
//! - [`pki`]: control-channel CA and certificates.
//! - [`server`]: the tokio driver (QUIC listener, registry actor, admin socket).
//! - [`admin`]: the admin protocol; [`datadir`]: the data directory.
//!
//! Must not depend on `ward-client`.

pub mod admin;
pub mod audit;
pub mod datadir;
pub mod leases;
pub mod model;
pub mod pki;
pub mod registry;
pub mod server;
pub mod store;
pub mod trust;
