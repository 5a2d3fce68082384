//! The control session: the relay's connection to its coordinator (see
//! [`ward_shared::relay`] for the protocol).
//!
//! ```text
//! loop {
//!     resolve the credential's coordinator; dial each address in turn (CA pinned, ALPN
//!     ward-relay-control/1); Hello{name, secret, CSR for the relay's key}
//!     Welcome → device server config [relay cert, CA] on the endpoint; ticket key to the core
//!     every 5 s: Load;  Revoked → core;  half the certificate's life spent: RenewCert with a
//!     new key, Cert → new server config with it
//!     session ends → wait (1 s, doubling to 30 s, back to 1 s after a Welcome), dial again
//! }
//! ```
//!
//! Forwarding goes on while the session is down, with the last ticket key and revocations.
//! The secret is sent only inside the TLS session to the pinned coordinator and never logged.

use crate::server::{clock, Shared};
use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::VerifyingKey;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use ward_shared::relay::{
    relay_server_name, CoordinatorToRelay, RelayCredential, RelayHello, RelayLoad,
    RelayToCoordinator, RelayWelcome, MAX_RELAY_CONTROL_FRAME, RELAY_PROTOCOL_VERSION,
};
use ward_shared::wire::{self, Bytes, FrameDecoder, COORDINATOR_SERVER_NAME};

/// How often the relay reports its load.
const LOAD_EVERY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the coordinator has to answer `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Shortest wait before asking for a certificate again (a coordinator that hands out
/// certificates already half spent must not be asked in a loop).
const RENEW_MIN: Duration = Duration::from_secs(10);

/// What the relay needs to join and serve: its credential, its endpoint, its serving key.
pub struct Control {
    pub credential: RelayCredential,
    pub endpoint: quinn::Endpoint,
    pub shared: Arc<Shared>,
    /// The key the current server certificate is for.
    key: rcgen::KeyPair,
    /// A live load report for `Load`, from the same counters as the metrics.
    pub load: Arc<dyn Fn() -> RelayLoad + Send + Sync>,
    /// Which of the credential's coordinator addresses to dial first: the one that answered
    /// last, or after a session that ended, the next one (so a replica that went away is
    /// tried last, not first).
    first: usize,
}

impl Control {
    pub fn new(
        credential: RelayCredential,
        endpoint: quinn::Endpoint,
        shared: Arc<Shared>,
        load: Arc<dyn Fn() -> RelayLoad + Send + Sync>,
    ) -> Result<Self> {
        let key = rcgen::KeyPair::generate().context("making the relay's key")?;
        Ok(Control {
            credential,
            endpoint,
            shared,
            key,
            load,
            first: 0,
        })
    }

    /// Keeps a session up until the task is dropped.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let mut welcomed = false;
            let r = self.session(&mut welcomed).await;
            self.shared.control_up.store(false, Ordering::Relaxed);
            self.first = self.first.wrapping_add(1);
            if welcomed {
                backoff = BACKOFF_FIRST;
            }
            match r {
                Ok(()) => tracing::warn!(
                    coordinator = %self.credential.coordinator,
                    retry_in = ?backoff,
                    "control session closed by the coordinator; forwarding continues"
                ),
                Err(e) => tracing::warn!(
                    coordinator = %self.credential.coordinator,
                    retry_in = ?backoff,
                    error = %format!("{e:#}"),
                    "control session failed; forwarding continues with what the relay has"
                ),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(&mut self, welcomed: &mut bool) -> Result<()> {
        let conn = self.connect().await?;
        let (mut send, recv) = conn.open_bi().await.context("opening the control stream")?;
        let mut rx = Frames::new(recv);
        let hello = RelayToCoordinator::Hello(RelayHello {
            protocol: RELAY_PROTOCOL_VERSION,
            name: self.credential.name.clone(),
            secret: Bytes(self.credential.secret.expose().to_vec()),
            csr_der: Bytes(csr(&self.key, &self.credential.name)?),
            version: env!("CARGO_PKG_VERSION").to_string(),
        });
        send.write_all(&wire::encode(&hello)).await?;
        let first = tokio::time::timeout(WELCOME_TIMEOUT, rx.next())
            .await
            .map_err(|_| anyhow!("no answer to Hello within {WELCOME_TIMEOUT:?}"))??;
        let welcome = match first {
            Some(CoordinatorToRelay::Welcome(w)) => w,
            Some(CoordinatorToRelay::Error { code, message }) => {
                bail!("the coordinator refused the relay ({code:?}): {message}")
            }
            Some(other) => bail!("unexpected first message from the coordinator: {other:?}"),
            None => bail!("the coordinator closed the control stream without answering"),
        };
        let mut cert_due = self.apply_welcome(&welcome)?;
        *welcomed = true;
        self.shared.control_up.store(true, Ordering::Relaxed);
        tracing::info!(
            coordinator = %conn.remote_address(),
            name = %self.credential.name,
            cert_not_after_ms = welcome.cert_not_after_ms,
            revoked = welcome.revoked.len(),
            "control session up: accepting device connections"
        );
        let ca_der = welcome.ca_der.0;
        let mut pending_key: Option<rcgen::KeyPair> = None;
        let mut load = tokio::time::interval(LOAD_EVERY);
        load.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = load.tick() => {
                    let m = RelayToCoordinator::Load((self.load)());
                    send.write_all(&wire::encode(&m)).await?;
                }
                _ = tokio::time::sleep_until(cert_due), if pending_key.is_none() => {
                    let key = rcgen::KeyPair::generate().context("making a new relay key")?;
                    let m = RelayToCoordinator::RenewCert {
                        csr_der: Bytes(csr(&key, &self.credential.name)?),
                    };
                    send.write_all(&wire::encode(&m)).await?;
                    pending_key = Some(key);
                    tracing::info!("relay certificate half spent: asked for a new one");
                }
                m = rx.next() => match m? {
                    Some(CoordinatorToRelay::Revoked { devices }) => {
                        tracing::info!(count = devices.len(), "devices revoked by the coordinator");
                        self.shared.with_core(|c| c.handle_revoked(&devices, clock()));
                    }
                    Some(CoordinatorToRelay::Cert { cert_der, not_after_ms }) => {
                        let Some(key) = pending_key.take() else {
                            bail!("the coordinator sent a certificate nobody asked for");
                        };
                        let cfg = crate::tls::device_server_config(&cert_der.0, &ca_der, &key)?;
                        self.endpoint.set_server_config(Some(cfg));
                        self.shared.set_device_tls(Arc::new(crate::tls::device_tls_config(&cert_der.0, &ca_der, &key)?));
                        self.key = key;
                        cert_due = renew_at(not_after_ms);
                        tracing::info!(not_after_ms, "relay certificate renewed");
                    }
                    Some(CoordinatorToRelay::Error { code, message }) => {
                        bail!("the coordinator ended the session ({code:?}): {message}");
                    }
                    Some(CoordinatorToRelay::Welcome(_)) => {
                        bail!("the coordinator sent a second Welcome");
                    }
                    None => return Ok(()),
                },
            }
        }
    }

    /// Server config and ticket key from a `Welcome`; when to renew the certificate.
    fn apply_welcome(&mut self, w: &RelayWelcome) -> Result<tokio::time::Instant> {
        if w.protocol != RELAY_PROTOCOL_VERSION {
            bail!("the coordinator speaks relay protocol {}", w.protocol);
        }
        let raw: [u8; 32] = w
            .ticket_key
            .0
            .as_slice()
            .try_into()
            .map_err(|_| anyhow!("the coordinator's ticket key is not 32 bytes"))?;
        let ticket_key =
            VerifyingKey::from_bytes(&raw).context("the coordinator's ticket key is invalid")?;
        let cfg = crate::tls::device_server_config(&w.cert_der.0, &w.ca_der.0, &self.key)?;
        self.endpoint.set_server_config(Some(cfg));
        self.shared
            .set_device_tls(Arc::new(crate::tls::device_tls_config(
                &w.cert_der.0,
                &w.ca_der.0,
                &self.key,
            )?));
        self.shared
            .with_core(|c| c.handle_welcome(ticket_key, &w.revoked, clock()));
        Ok(renew_at(w.cert_not_after_ms))
    }

    /// Dials the credential's coordinator addresses in turn (each replica's, starting at
    /// `first`; every address a name resolves to); the first that completes the handshake.
    async fn connect(&mut self) -> Result<quinn::Connection> {
        let names: Vec<String> = self
            .credential
            .coordinators()
            .into_iter()
            .map(str::to_string)
            .collect();
        if names.is_empty() {
            bail!("the relay credential names no coordinator address");
        }
        let cfg = crate::tls::control_client_config(self.credential.ca_sha256)?;
        let ipv6_ok = self
            .endpoint
            .local_addr()
            .map(|a| a.is_ipv6())
            .unwrap_or(false);
        let mut last = anyhow!("no usable coordinator address in {names:?}");
        for i in 0..names.len() {
            let at = (self.first.wrapping_add(i)) % names.len();
            let addrs = match resolve(&names[at]).await {
                Ok(a) => a,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            for addr in addrs {
                if addr.is_ipv6() && !ipv6_ok {
                    continue;
                }
                let attempt = async {
                    let c =
                        self.endpoint
                            .connect_with(cfg.clone(), addr, COORDINATOR_SERVER_NAME)?;
                    anyhow::Ok(c.await?)
                };
                match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                    Ok(Ok(c)) => {
                        self.first = at;
                        return Ok(c);
                    }
                    Ok(Err(e)) => {
                        last = e.context(format!("connecting to the coordinator at {addr}"))
                    }
                    Err(_) => {
                        last = anyhow!(
                            "no answer from the coordinator at {addr} within {CONNECT_TIMEOUT:?}"
                        )
                    }
                }
            }
        }
        Err(last)
    }
}

/// When half of the time from now to `not_after_ms` is spent (at least [`RENEW_MIN`] away).
fn renew_at(not_after_ms: i64) -> tokio::time::Instant {
    let left = not_after_ms.saturating_sub(ward_runtime::now_ms()).max(0) / 2;
    let wait = Duration::from_millis(u64::try_from(left).unwrap_or(0)).max(RENEW_MIN);
    tokio::time::Instant::now() + wait
}

/// A CSR (DER) for `key`, naming the relay's server name.
fn csr(key: &rcgen::KeyPair, name: &str) -> Result<Vec<u8>> {
    let params = rcgen::CertificateParams::new(vec![relay_server_name(name)])
        .context("relay name is not a valid DNS name")?;
    let req = params
        .serialize_request(key)
        .context("making the certificate request")?;
    Ok(req.der().to_vec())
}

/// Every address `HOST:PORT` names, in the resolver's order; a literal is used as is.
async fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let found: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve coordinator address {addr:?}"))?
        .collect();
    if found.is_empty() {
        bail!("coordinator address {addr:?} resolves to nothing");
    }
    Ok(found)
}

/// Frames from the coordinator, bounded.
struct Frames {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl Frames {
    fn new(recv: quinn::RecvStream) -> Self {
        Frames {
            recv,
            dec: FrameDecoder::new(MAX_RELAY_CONTROL_FRAME),
        }
    }

    /// The next message; `Ok(None)` at the end of the stream.
    async fn next(&mut self) -> Result<Option<CoordinatorToRelay>> {
        ward_runtime::quic::read_msg(&mut self.recv, &mut self.dec)
            .await
            .context("control stream")
    }
}
