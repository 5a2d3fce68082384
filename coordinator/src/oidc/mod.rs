//! OpenID Connect: people sign devices in with their organisation's provider, and the
//! coordinator keeps re-checking them.
//!
//! - [`jwt`]: I/O-free JWS verification (RS256/ES256/EdDSA only) and ID/logout token checks.
//! - [`core`]: I/O-free rules: user names and groups from claims, device-flow poll answers,
//!   replay books, the SCIM `PATCH` parser, `max_auth_age`/`amr` judgement with reasons.
//! - [`http`]: a bounded HTTPS/1.1 client for the provider and the push endpoints' responder.
//! - [`provider`]: discovery, the cached key set, device authorization, polling, refresh,
//!   userinfo.
//!
//! The server side (the sign-in on an enrollment connection, the refresh loop, the push
//! endpoints) is `server::oidc`.

pub mod core;
pub mod http;
pub mod jwt;
pub mod provider;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What `init --oidc-*` persists in the data dir (`oidc.json`, 0600): paths, never the secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcSettings {
    pub issuer: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// The relying party's configuration at run time.
#[derive(Clone)]
pub struct OidcConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub ca_pem: Option<Vec<u8>>,
    /// A first sign-in creates the user.
    pub create_users: bool,
    pub refresh_interval_ms: i64,
    pub max_auth_age_ms: i64,
}

impl std::fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

pub const SETTINGS_FILE: &str = "oidc.json";

impl OidcSettings {
    /// The issuer must be an https URL.
    pub fn check(&self) -> Result<()> {
        http::Url::parse(&self.issuer).context("--oidc-issuer")?;
        anyhow::ensure!(!self.client_id.is_empty(), "--oidc-client-id is empty");
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(SETTINGS_FILE);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let p = dir.join(SETTINGS_FILE);
        crate::datadir::write_private(&p, &serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", p.display()))
    }

    /// Reads the secret and CA files into a run-time configuration.
    pub fn resolve(
        &self,
        create_users: bool,
        refresh_interval_ms: i64,
        max_auth_age_ms: i64,
    ) -> Result<OidcConfig> {
        self.check()?;
        let client_secret = match &self.client_secret_file {
            Some(p) => Some(provider::read_secret(p)?),
            None => None,
        };
        let ca_pem = match &self.ca_file {
            Some(p) => Some(
                std::fs::read(p)
                    .with_context(|| format!("reading OIDC CA file {}", p.display()))?,
            ),
            None => None,
        };
        Ok(OidcConfig {
            issuer: self.issuer.clone(),
            client_id: self.client_id.clone(),
            client_secret,
            ca_pem,
            create_users,
            refresh_interval_ms,
            max_auth_age_ms,
        })
    }
}
