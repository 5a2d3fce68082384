//! The admin web console (`serve --console-listen ADDR`): server-rendered HTML over HTTP/1.1,
//! everything in the binary, no script.
//!
//! - [`auth`]: I/O-free one-time login links and sessions (time and randomness passed in).
//! - [`html`], [`svg`], [`views`]: pure functions from the admin API's typed answers to HTML
//!   and inline SVG, every value escaped.
//! - [`web`]: the axum driver: sign-in, session cookie, CSRF and Origin checks, security
//!   headers, and handlers that run the SAME admin requests the CLI sends over the admin
//!   socket ([`crate::admin::ops`]), so every change is checked and audited the same way.
//!
//! - [`oidc`]: sign-in with the identity provider (authorization code + PKCE) for members of
//!   the console administrators' provider group.
//!
//! Sign-in is `ward-coordinator console-link` (whoever can use the admin socket can mint a
//! link) or, with `--oidc-issuer` and `--console-admin-group`, the provider; each opens its
//! session through [`auth::Auth::open_session`] with its own [`auth::Method`].

pub mod auth;
pub mod html;
pub mod oidc;
pub mod svg;
pub mod views;
pub mod web;

pub use web::{Console, ConsoleHooks};
