//! Relay control sessions (ALPN `ward-relay-control/1` on the coordinator's port, over QUIC
//! or TLS over TCP: the same code runs on either [`Link`]).
//!
//! ```text
//! relay                                  coordinator
//!   Hello{protocol, name, secret, CSR} ─▶  name registered, SHA-256(secret) equal (constant
//!                                          time) to the stored hash, CSR signed into a server
//!                                          certificate for NAME.relay.ward.internal
//!                                     ◀─  Welcome{ticket key, cert, CA, revoked devices}
//!                                          (or Error, then close)
//!   Load{..} every few seconds        ─▶  kept in memory for `relay ls`
//!   RenewCert{CSR}                    ─▶
//!                                     ◀─  Cert{..}
//!                                     ◀─  Revoked{devices} whenever a device loses access
//! ```
//!
//! The registry actor holds one session per relay name (a newer one replaces the older) and
//! pushes revocations to all of them; `relay rm` ends the relay's session. Refusals are logged,
//! not audited (a relay's secret is checked on every reconnect).

use anyhow::Result;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use ward_shared::relay::{
    valid_relay_name, CoordinatorToRelay, RelayHello, RelayToCoordinator, RelayWelcome,
    MAX_RELAY_CONTROL_FRAME, RELAY_PROTOCOL_VERSION,
};
use ward_shared::secret::ct_eq;
use ward_shared::token::hash_secret;
use ward_shared::wire::{self, Bytes, DeviceId, ErrorCode, FrameDecoder};

use super::actor::{ConnCmd, Event};
use super::link::Link;
use super::session::{first_frame, read_frame, send_msg};
use super::{now_ms, Ctx, CONN_QUEUE};
use tokio::io::AsyncWriteExt;

/// Frames queued for one relay (revocations) before its session is dropped as too slow.
const RELAY_QUEUE: usize = CONN_QUEUE;

/// One relay control connection, after the TLS handshake (QUIC or TCP) chose this protocol.
pub(super) async fn handle_connection(mut link: Link, ctx: Arc<Ctx>) -> Result<()> {
    let remote = link.remote;
    let mut dec = FrameDecoder::new(MAX_RELAY_CONTROL_FRAME);
    let first = match first_frame(&mut link.recv, &mut dec).await {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(()),
        Err(why) => {
            warn!(%remote, %why, "no first message on relay control stream");
            refuse(&mut link, ErrorCode::Protocol, why).await;
            return Ok(());
        }
    };

    let hello = match wire::decode::<RelayToCoordinator>(&first) {
        Ok(RelayToCoordinator::Hello(h)) => h,
        Ok(_) => {
            warn!(%remote, "relay control session did not start with hello");
            refuse(
                &mut link,
                ErrorCode::Protocol,
                "the first message must be hello".into(),
            )
            .await;
            return Ok(());
        }
        Err(e) => {
            warn!(%remote, error = %e, "undecodable first message on relay control stream");
            refuse(&mut link, ErrorCode::Protocol, e.to_string()).await;
            return Ok(());
        }
    };
    let (name, welcome) = match welcome(&ctx, hello, remote).await {
        Ok(x) => x,
        Err((code, message)) => {
            refuse(&mut link, code, message).await;
            return Ok(());
        }
    };
    // Registered before the revoked list is read, so no revocation falls between the two.
    let conn_id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel(RELAY_QUEUE);
    let (reply, accepted) = oneshot::channel();
    ctx.events
        .send(Event::RelayOpened {
            name: name.clone(),
            conn: conn_id,
            tx,
            reply,
        })
        .await;
    if !accepted.await.unwrap_or(false) {
        refuse(
            &mut link,
            ErrorCode::Unauthorized,
            "this relay has been removed".into(),
        )
        .await;
        return Ok(());
    }
    let result = async {
        let revoked = revoked_devices(&ctx).await?;
        send_msg(
            &mut link.send,
            &CoordinatorToRelay::Welcome(RelayWelcome { revoked, ..welcome }),
        )
        .await?;
        info!(relay = %name, %remote, "relay connected");
        serve(&ctx, &mut link, &mut dec, &name, conn_id, &mut rx).await
    }
    .await;
    ctx.events
        .send(Event::RelayClosed {
            name: name.clone(),
            conn: conn_id,
        })
        .await;
    info!(relay = %name, "relay disconnected");
    result
}

/// Checks a relay's hello and prepares its welcome (without the revoked list).
async fn welcome(
    ctx: &Arc<Ctx>,
    hello: RelayHello,
    remote: SocketAddr,
) -> Result<(String, RelayWelcome), (ErrorCode, String)> {
    if hello.protocol != RELAY_PROTOCOL_VERSION {
        warn!(%remote, protocol = hello.protocol, "relay speaks another protocol version");
        return Err((
            ErrorCode::Protocol,
            format!(
                "relay protocol version {} is not supported (this coordinator speaks {RELAY_PROTOCOL_VERSION})",
                hello.protocol
            ),
        ));
    }
    // The same answer for an unknown name and a wrong secret.
    let refused = || {
        (
            ErrorCode::Unauthorized,
            "unknown relay or wrong secret (add the relay again for a new credential)".to_string(),
        )
    };
    let name = hello.name;
    let shown = ward_shared::names::shorten(&name);
    if !valid_relay_name(&name) {
        warn!(%remote, name = %shown, "relay refused: not a relay name");
        return Err(refused());
    }
    let store = ctx.store.clone();
    let lookup = name.clone();
    let stored = tokio::task::spawn_blocking(move || store.relay_secret_hash(&lookup)).await;
    let stored = match stored {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            error!(%remote, relay = %name, error = %e, "relay lookup failed; refusing");
            return Err((
                ErrorCode::Internal,
                "the coordinator could not check this relay".into(),
            ));
        }
        Err(e) => {
            error!(%remote, relay = %name, error = %e, "relay lookup task failed; refusing");
            return Err((
                ErrorCode::Internal,
                "the coordinator could not check this relay".into(),
            ));
        }
    };
    let given = hash_secret(&hello.secret.0);
    let Some(stored) = stored else {
        warn!(%remote, relay = %name, "relay refused: unknown relay (or added before relays had credentials)");
        return Err(refused());
    };
    if !ct_eq(&given, &stored) {
        warn!(%remote, relay = %name, "relay refused: wrong secret");
        return Err(refused());
    }
    let (cert_der, cert_not_after_ms) = ctx
        .ca
        .issue_relay_cert(&hello.csr_der.0, &name, now_ms())
        .map_err(|e| {
            warn!(%remote, relay = %name, error = %format!("{e:#}"), "relay certificate request refused");
            (
                ErrorCode::BadRequest,
                format!("certificate request refused: {e:#}"),
            )
        })?;
    debug!(relay = %name, version = %ward_shared::names::shorten(&hello.version), "relay authenticated");
    Ok((
        name,
        RelayWelcome {
            protocol: RELAY_PROTOCOL_VERSION,
            ticket_key: Bytes(ctx.lease_key.verifying_key().to_bytes().to_vec()),
            cert_der: Bytes(cert_der),
            cert_not_after_ms,
            ca_der: Bytes(ctx.ca.cert_der.clone()),
            revoked: Vec::new(),
        },
    ))
}

/// Every enrolled device that is not live (revoked, or its user disabled).
async fn revoked_devices(ctx: &Arc<Ctx>) -> Result<Vec<DeviceId>> {
    let store = ctx.store.clone();
    let devices = tokio::task::spawn_blocking(move || store.list_devices()).await??;
    Ok(devices
        .into_iter()
        .filter(|d| !d.is_live())
        .map(|d| d.id)
        .collect())
}

/// The session after `Welcome`: pushes from the actor out, loads and renewals in.
async fn serve(
    ctx: &Arc<Ctx>,
    link: &mut Link,
    dec: &mut FrameDecoder,
    name: &str,
    conn_id: u64,
    rx: &mut mpsc::Receiver<ConnCmd>,
) -> Result<()> {
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(ConnCmd::Send(bytes)) => link.send.write_all(&bytes).await?,
                Some(ConnCmd::Close(code, reason)) => {
                    info!(relay = %name, ?code, %reason, "closing relay control session");
                    refuse(link, code, reason).await;
                    return Ok(());
                }
                None => return Ok(()),
            },
            frame = read_frame(&mut link.recv, dec) => {
                let frame = match frame {
                    Ok(Some(f)) => f,
                    Ok(None) => return Ok(()),
                    Err(e) if ward_runtime::stream::ended_by_transport(&e) => {
                        info!(relay = %name, error = %format!("{e:#}"), "relay control session ended");
                        return Ok(());
                    }
                    Err(e) => {
                        warn!(relay = %name, error = %format!("{e:#}"), "bad frame from relay");
                        refuse(link, ErrorCode::Protocol, format!("bad frame: {e:#}")).await;
                        return Ok(());
                    }
                };
                let msg = match wire::decode::<RelayToCoordinator>(&frame) {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(relay = %name, error = %e, "undecodable message from relay");
                        refuse(link, ErrorCode::Protocol, e.to_string()).await;
                        return Ok(());
                    }
                };
                match msg {
                    RelayToCoordinator::Load(load) => {
                        debug!(relay = %name, devices = load.devices, bytes = load.bytes_relayed, "relay load");
                        ctx.events.send(Event::RelayLoad { name: name.to_string(), conn: conn_id, load }).await;
                    }
                    RelayToCoordinator::RenewCert { csr_der } => {
                        match ctx.ca.issue_relay_cert(&csr_der.0, name, now_ms()) {
                            Ok((cert_der, not_after_ms)) => {
                                info!(relay = %name, "relay certificate renewed");
                                send_msg(&mut link.send, &CoordinatorToRelay::Cert { cert_der: Bytes(cert_der), not_after_ms }).await?;
                            }
                            Err(e) => {
                                warn!(relay = %name, error = %format!("{e:#}"), "relay certificate renewal refused");
                                send_msg(&mut link.send, &CoordinatorToRelay::Error { code: ErrorCode::BadRequest, message: format!("renewal refused: {e:#}") }).await?;
                            }
                        }
                    }
                    RelayToCoordinator::Hello(_) => {
                        warn!(relay = %name, "hello on an established relay session");
                        refuse(link, ErrorCode::Protocol, "unexpected hello on an established session".into()).await;
                        return Ok(());
                    }
                }
            }
            _ = link.closer.closed() => return Ok(()),
        }
    }
}

/// Sends `Error`, finishes the stream and closes the connection.
async fn refuse(link: &mut Link, code: ErrorCode, message: String) {
    let frame = wire::encode(&CoordinatorToRelay::Error {
        code,
        message: message.clone(),
    });
    link.close_with(&frame, &message).await;
}
