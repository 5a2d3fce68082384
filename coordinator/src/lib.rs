//! `ward-coordinator`: Ward's control plane, as a library the binary (and benchmarks) use.
//!
//! - [`registry`]: the I/O-free registry (sessions, compiled policy, netmap deltas).
//! - [`trust`]: the I/O-free trust book (posture evaluation, automatic quarantine, risk).
//! - [`model`]: the domain types (devices, users, the one device state); [`audit`]: the audit
//!   action names.
//! - [`store`]: the storage interface and its SQLite implementation.
//! - [`leases`]: lease TTLs, issuing and signing (synchronous, over the store).
//! - [`flows`]: the I/O-free pairing of both ends' flow records (paired, mismatch, one-sided,
//!   denied) and the `flows top` sums.
//! - [`limits`]: the I/O-free per-session limits on what an enrolled device sends.
//! - [`tickets`]: the I/O-free relay ticket issuer (live devices only, rate-limited).
//! - [`gate`]: the I/O-free gate in front of unauthenticated work (per-source token buckets,
//!   refusals aggregated into one audit row per source per interval).
//! - [`pki`]: control-channel CA and certificates (devices', the listener's, relays').
//! - [`server`]: the tokio driver (QUIC device sessions, relay control sessions, registry actor,
//!   its side effects).
//! - [`metrics`]: the Prometheus metrics `serve --metrics-listen` exposes.
//! - [`oidc`]: OpenID Connect sign-in and continuous identity (relying party).
//! - [`admin`]: the admin protocol (typed API, business rules, policy, socket); [`datadir`]: the
//!   data directory.
//!
//! Must not depend on `ward-client`.

pub mod admin;
pub mod audit;
pub mod behaviour;
pub mod console;
pub mod datadir;
pub mod fanout;
pub mod flows;
pub mod gate;
pub mod instance;
pub mod leases;
pub mod limits;
pub mod maturity;
pub mod metrics;
pub mod model;
pub mod oidc;
pub mod pki;
pub mod registry;
#[cfg(test)]
mod replica_scan_tests;
pub mod replicas;
pub mod server;
pub mod store;
pub mod suggest;
pub mod tickets;
pub mod trust;
