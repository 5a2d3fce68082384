//! The relying party's side of the provider's HTTP endpoints: discovery, the key set (cached,
//! refetched on an unknown `kid` at most once per [`JWKS_REFETCH_MS`]), device authorization,
//! token polling, refresh and userinfo. Errors are split into what the provider *said* (a
//! refusal: it may take access away) and what went wrong on the way (an outage: it never does).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::Deserialize;
use serde_json::Value;
use tracing::{info, warn};

use super::core::{poll_answer, PollAnswer, ReplayBook};
use super::http::{self, Auth};
use super::jwt::{check_id_token, Alg, IdClaims, IdTokenRules, Jwks, Jws, JwtError};
use super::OidcConfig;

/// The key set is refetched for an unknown `kid` at most this often.
pub const JWKS_REFETCH_MS: u64 = 10_000;
/// What the device sign-in asks for.
pub const SCOPE: &str = "openid email profile groups offline_access";

#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub jwks_uri: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    /// Where browser sign-ins start (authorization code flow).
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
}

/// The provider's answer to a device authorization request.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuth {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default)]
    pub interval: Option<u64>,
}

/// Tokens from the token endpoint.
#[derive(Clone, Deserialize)]
pub struct Tokens {
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
}

/// What went wrong talking to the provider.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider is unreachable or failing (network error, timeout, 5xx, bad JSON): an
    /// outage, never a reason to take access away.
    #[error("the identity provider is unavailable: {0}")]
    Down(String),
    /// The provider refused (invalid_grant, 4xx): the identity no longer stands.
    #[error("the identity provider refused: {0}")]
    Refused(String),
    /// A token the provider sent does not verify.
    #[error("{0}")]
    Token(#[from] JwtError),
}

fn down(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Down(e.to_string())
}

/// One poll of the token endpoint during a device sign-in.
pub enum Poll {
    Done(Box<Tokens>),
    Wait(PollAnswer),
}

struct KeyCache {
    jwks: Jwks,
    fetched: Option<Instant>,
}

pub struct Provider {
    pub cfg: OidcConfig,
    tls: Arc<rustls::ClientConfig>,
    disc: tokio::sync::Mutex<Option<Discovery>>,
    keys: tokio::sync::Mutex<KeyCache>,
    /// Sign-in nonces already accepted (a replayed ID token carries an old one).
    pub nonces: Mutex<ReplayBook>,
    /// Logout token `jti`s already accepted.
    pub jtis: Mutex<ReplayBook>,
}

impl Provider {
    pub fn new(cfg: OidcConfig) -> anyhow::Result<Self> {
        let tls = http::client_tls(cfg.ca_pem.as_deref())?;
        Ok(Self {
            cfg,
            tls,
            disc: tokio::sync::Mutex::new(None),
            keys: tokio::sync::Mutex::new(KeyCache {
                jwks: Jwks::default(),
                fetched: None,
            }),
            nonces: Mutex::new(ReplayBook::new(24 * 3_600_000)),
            jtis: Mutex::new(ReplayBook::new(2 * super::jwt::LOGOUT_MAX_AGE_MS)),
        })
    }

    fn auth(&self) -> Auth<'_> {
        match &self.cfg.client_secret {
            Some(s) => Auth::Basic(&self.cfg.client_id, s.as_str()),
            None => Auth::None,
        }
    }

    async fn get_json(&self, url: &str, auth: Auth<'_>) -> Result<Value, ProviderError> {
        let r = http::request(&self.tls, "GET", url, None, auth)
            .await
            .map_err(|e| down(format!("{e:#}")))?;
        if r.status >= 500 {
            return Err(down(format!("{url} answered HTTP {}", r.status)));
        }
        if r.status >= 400 {
            return Err(ProviderError::Refused(format!(
                "{url} answered HTTP {}",
                r.status
            )));
        }
        serde_json::from_slice(&r.body).map_err(|e| down(format!("{url}: not JSON: {e}")))
    }

    /// The discovery document (fetched once, then cached; its issuer must be the configured
    /// one exactly).
    pub async fn discovery(&self) -> Result<Discovery, ProviderError> {
        let mut d = self.disc.lock().await;
        if let Some(d) = d.as_ref() {
            return Ok(d.clone());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let v = self.get_json(&url, Auth::None).await?;
        let disc: Discovery =
            serde_json::from_value(v).map_err(|e| down(format!("discovery document: {e}")))?;
        if disc.issuer != self.cfg.issuer {
            return Err(down(format!(
                "the discovery document names issuer {:?}, not the configured {:?}",
                disc.issuer, self.cfg.issuer
            )));
        }
        for u in [Some(&disc.jwks_uri), Some(&disc.token_endpoint)]
            .into_iter()
            .flatten()
            .chain(disc.device_authorization_endpoint.iter())
            .chain(disc.userinfo_endpoint.iter())
        {
            http::Url::parse(u).map_err(|e| down(format!("discovery document: {e}")))?;
        }
        info!(issuer = %disc.issuer, "OIDC provider discovered");
        *d = Some(disc.clone());
        Ok(disc)
    }

    async fn fetch_keys(&self, cache: &mut KeyCache) -> Result<(), ProviderError> {
        let disc = self.discovery().await?;
        let v = self.get_json(&disc.jwks_uri, Auth::None).await?;
        cache.jwks = Jwks::parse(v.to_string().as_bytes())?;
        cache.fetched = Some(Instant::now());
        info!(
            keys = cache.jwks.keys.len(),
            "OIDC provider key set fetched"
        );
        Ok(())
    }

    /// Verifies a JWS from the provider and returns its payload. An unknown `kid` refetches the
    /// key set once (key rotation), rate-limited.
    pub async fn verify(&self, token: &str) -> Result<Vec<u8>, ProviderError> {
        Ok(self.verify_alg(token).await?.0)
    }

    async fn verify_alg(&self, token: &str) -> Result<(Vec<u8>, Alg), ProviderError> {
        let jws = Jws::parse(token)?;
        let mut cache = self.keys.lock().await;
        if cache.fetched.is_none() {
            self.fetch_keys(&mut cache).await?;
        }
        match jws.verify(&cache.jwks) {
            Ok(p) => Ok((p.to_vec(), jws.alg)),
            Err(JwtError::UnknownKid(kid)) => {
                let recent = cache
                    .fetched
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(JWKS_REFETCH_MS));
                if recent {
                    return Err(JwtError::UnknownKid(kid).into());
                }
                self.fetch_keys(&mut cache).await?;
                Ok((jws.verify(&cache.jwks)?.to_vec(), jws.alg))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Verifies an ID token for this relying party. `sign_in`: the nonce this sign-in sent and
    /// when it started (a device-flow token must be issued after that).
    pub async fn id_token(
        &self,
        token: &str,
        sign_in: Option<(&str, i64)>,
        access_token: Option<&str>,
        now_ms: i64,
    ) -> Result<IdClaims, ProviderError> {
        let (payload, alg) = self.verify_alg(token).await?;
        let rules = IdTokenRules {
            issuer: &self.cfg.issuer,
            client_id: &self.cfg.client_id,
            nonce: sign_in.map(|s| s.0),
            nonce_required: false,
            not_before_ms: sign_in.map(|s| s.1),
            access_token,
            alg,
            now_ms,
        };
        Ok(check_id_token(&payload, &rules)?)
    }

    /// Starts a device sign-in (RFC 8628 3.1).
    pub async fn start_device(&self, nonce: &str) -> Result<DeviceAuth, ProviderError> {
        let disc = self.discovery().await?;
        let url = disc.device_authorization_endpoint.ok_or_else(|| {
            ProviderError::Refused("the provider does not offer device sign-in".into())
        })?;
        let mut form = vec![("scope", SCOPE), ("nonce", nonce)];
        if self.cfg.client_secret.is_none() {
            form.push(("client_id", self.cfg.client_id.as_str()));
        }
        let r = http::request(&self.tls, "POST", &url, Some(&form), self.auth())
            .await
            .map_err(|e| down(format!("{e:#}")))?;
        if r.status >= 500 {
            return Err(down(format!(
                "device authorization answered HTTP {}",
                r.status
            )));
        }
        if r.status >= 400 {
            let why = match poll_answer(&r.body) {
                PollAnswer::Failed(m) => m,
                other => format!("{other:?}"),
            };
            return Err(ProviderError::Refused(why));
        }
        serde_json::from_slice(&r.body).map_err(|e| down(format!("device authorization: {e}")))
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> Result<http::Response, ProviderError> {
        let disc = self.discovery().await?;
        let mut form = form.to_vec();
        if self.cfg.client_secret.is_none() {
            form.push(("client_id", self.cfg.client_id.as_str()));
        }
        let r = http::request(
            &self.tls,
            "POST",
            &disc.token_endpoint,
            Some(&form),
            self.auth(),
        )
        .await
        .map_err(|e| down(format!("{e:#}")))?;
        if r.status >= 500 {
            return Err(down(format!("token endpoint answered HTTP {}", r.status)));
        }
        Ok(r)
    }

    /// One poll of the token endpoint for a device code.
    pub async fn poll_device(&self, device_code: &str) -> Result<Poll, ProviderError> {
        let r = self
            .token_request(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", device_code),
            ])
            .await?;
        if r.status == 200 {
            let t: Tokens =
                serde_json::from_slice(&r.body).map_err(|e| down(format!("token answer: {e}")))?;
            return Ok(Poll::Done(Box::new(t)));
        }
        Ok(Poll::Wait(poll_answer(&r.body)))
    }

    /// The refresh token grant. `Refused` (invalid_grant and other 4xx) means the identity no
    /// longer stands; `Down` is an outage.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens, ProviderError> {
        let r = self
            .token_request(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .await?;
        if r.status == 200 {
            return serde_json::from_slice(&r.body).map_err(|e| down(format!("token answer: {e}")));
        }
        let why = match poll_answer(&r.body) {
            PollAnswer::Failed(m) => m,
            other => format!("{other:?}"),
        };
        Err(ProviderError::Refused(why))
    }

    /// The userinfo claims for an access token (groups may only be there).
    pub async fn userinfo(&self, access_token: &str) -> Result<Value, ProviderError> {
        let disc = self.discovery().await?;
        let Some(url) = disc.userinfo_endpoint else {
            return Ok(Value::Null);
        };
        self.get_json(&url, Auth::Bearer(access_token)).await
    }

    /// The authorization URL of a browser sign-in (authorization code + PKCE S256).
    pub async fn authorize_url(&self, a: &AuthorizeParams<'_>) -> Result<String, ProviderError> {
        let disc = self.discovery().await?;
        let endpoint = disc.authorization_endpoint.ok_or_else(|| {
            ProviderError::Refused("the provider does not offer browser sign-in".into())
        })?;
        http::Url::parse(&endpoint).map_err(|e| down(format!("discovery document: {e}")))?;
        let query = http::encode_form(&[
            ("response_type", "code"),
            ("client_id", self.cfg.client_id.as_str()),
            ("redirect_uri", a.redirect_uri),
            ("scope", a.scope),
            ("state", a.state),
            ("nonce", a.nonce),
            ("code_challenge", a.code_challenge),
            ("code_challenge_method", "S256"),
            ("prompt", "login consent"),
        ]);
        let sep = if endpoint.contains('?') { '&' } else { '?' };
        Ok(format!("{endpoint}{sep}{query}"))
    }

    /// Redeems an authorization code with its PKCE verifier (RFC 7636 4.5). A 4xx is the
    /// provider refusing (a used, expired or stolen code, a wrong verifier).
    pub async fn redeem_code(
        &self,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
    ) -> Result<Tokens, ProviderError> {
        let r = self
            .token_request(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("code_verifier", verifier),
                ("redirect_uri", redirect_uri),
            ])
            .await?;
        if r.status == 200 {
            return serde_json::from_slice(&r.body).map_err(|e| down(format!("token answer: {e}")));
        }
        let why = match poll_answer(&r.body) {
            PollAnswer::Failed(m) => m,
            other => format!("{other:?}"),
        };
        Err(ProviderError::Refused(why))
    }

    /// Verifies the ID token of a browser sign-in: as [`Provider::id_token`], and it must carry
    /// exactly the `nonce` this sign-in sent (the code flow always echoes it).
    pub async fn id_token_code(
        &self,
        token: &str,
        nonce: &str,
        access_token: Option<&str>,
        now_ms: i64,
    ) -> Result<IdClaims, ProviderError> {
        let (payload, alg) = self.verify_alg(token).await?;
        let rules = IdTokenRules {
            issuer: &self.cfg.issuer,
            client_id: &self.cfg.client_id,
            nonce: Some(nonce),
            nonce_required: true,
            not_before_ms: None,
            access_token,
            alg,
            now_ms,
        };
        Ok(check_id_token(&payload, &rules)?)
    }

    /// Logs the provider's failure without any token.
    pub fn log_failure(&self, what: &str, e: &ProviderError) {
        warn!(issuer = %self.cfg.issuer, error = %e, "{what}");
    }
}

/// What one browser sign-in sends to the authorization endpoint.
pub struct AuthorizeParams<'a> {
    pub redirect_uri: &'a str,
    pub scope: &'a str,
    pub state: &'a str,
    pub nonce: &'a str,
    pub code_challenge: &'a str,
}

/// What the console's sign-in asks for (no refresh token: a console session is not renewed).
pub const CONSOLE_SCOPE: &str = "openid email profile groups";

/// Reads the client secret file (first line, trimmed).
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("reading the OIDC client secret file {}", path.display()))?;
    let s = s.lines().next().unwrap_or("").trim().to_string();
    if s.is_empty() {
        return Err(anyhow!(
            "the OIDC client secret file {} is empty",
            path.display()
        ));
    }
    Ok(s)
}
