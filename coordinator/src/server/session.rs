//! The device protocol: enrollment (no client certificate) and the session loop (device
//! certificate) of one connection, feeding the registry actor. The same code serves a QUIC
//! connection and a TLS-over-TCP one ([`Link`]).

use anyhow::Result;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use ward_shared::lease::SignedLease;
use ward_shared::names::Hostname;
use ward_shared::relay::SignedTicket;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeviceId, DeviceMsg, DeviceUpdate, Enrolled, ErrorCode,
    FrameDecoder, MAX_DEVICE_FRAME, PROTOCOL_VERSION,
};

use super::actor::{ConnCmd, Event};
use super::link::Link;
use super::{now_ms, Ctx, CONN_QUEUE, HANDSHAKE_TIMEOUT};
use crate::audit::Action;
use crate::pki::{cert_identity, Ca};
use crate::store::{Audit, EnrollSpec, StoreError};
use tokio::io::AsyncWriteExt;
use ward_runtime::stream::{BoxRead, BoxWrite};

/// The first frame of a session, within [`HANDSHAKE_TIMEOUT`]: `Ok(None)` if the peer closed
/// the stream; `Err(why)` (a bad frame, or nothing in time) to refuse the peer with.
pub(super) async fn first_frame(
    recv: &mut BoxRead,
    dec: &mut FrameDecoder,
) -> std::result::Result<Option<Vec<u8>>, String> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(recv, dec)).await {
        Ok(Ok(f)) => Ok(f),
        Ok(Err(e)) => Err(format!("bad frame: {e:#}")),
        Err(_) => Err(format!(
            "no message within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
    }
}

/// Reads the next frame; `Ok(None)` at a clean end of stream.
pub(super) async fn read_frame(
    recv: &mut BoxRead,
    dec: &mut FrameDecoder,
) -> Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 16 * 1024];
    ward_runtime::stream::read_frame(recv, dec, &mut buf).await
}

/// Writes one frame (a device or relay message) to the stream.
pub(super) async fn send_msg<T: serde::Serialize>(send: &mut BoxWrite, msg: &T) -> Result<()> {
    send.write_all(&wire::encode(msg)).await?;
    Ok(())
}

async fn refuse(link: &mut Link, code: ErrorCode, message: String) {
    let frame = wire::encode(&CoordinatorMsg::Error {
        code,
        message: message.clone(),
    });
    link.close_with(&frame, &message).await;
}

/// One device connection, after the TLS handshake (QUIC or TCP) chose the device protocol.
pub(super) async fn handle_connection(mut link: Link, ctx: Arc<Ctx>) -> Result<()> {
    let remote = link.remote;
    let certs = link.certs.take();
    let mut dec = FrameDecoder::new(MAX_DEVICE_FRAME);
    let first = match first_frame(&mut link.recv, &mut dec).await {
        Ok(Some(f)) => f,
        Ok(None) => return Ok(()),
        Err(why) => {
            warn!(%remote, %why, "no first message on control stream");
            refuse(&mut link, ErrorCode::Protocol, why).await;
            return Ok(());
        }
    };

    let msg = match wire::decode::<DeviceMsg>(&first) {
        Ok(m) => m,
        Err(e) => {
            warn!(%remote, error = %e, "undecodable first message");
            refuse(&mut link, ErrorCode::Protocol, e.to_string()).await;
            return Ok(());
        }
    };
    match (certs.as_ref().and_then(|c| c.first()), msg) {
        (None, DeviceMsg::Enroll(req)) => {
            let reply = enroll(&ctx, req, remote).await;
            match reply {
                Ok(enrolled) => {
                    send_msg(&mut link.send, &CoordinatorMsg::Enrolled(enrolled)).await?;
                    link.finish(Duration::from_secs(2)).await;
                }
                Err((code, message)) => refuse(&mut link, code, message).await,
            }
            Ok(())
        }
        (Some(cert), DeviceMsg::Hello(hello)) => {
            let cert = cert.to_vec();
            session(ctx, link, dec, &cert, hello).await
        }
        (None, _) => {
            refuse(
                &mut link,
                ErrorCode::Unauthorized,
                "this connection has no device certificate; only enrollment is possible".into(),
            )
            .await;
            Ok(())
        }
        (Some(_), _) => {
            refuse(
                &mut link,
                ErrorCode::Protocol,
                "the first message must be hello".into(),
            )
            .await;
            Ok(())
        }
    }
}

async fn enroll(
    ctx: &Arc<Ctx>,
    req: wire::EnrollRequest,
    remote: SocketAddr,
) -> Result<Enrolled, (ErrorCode, String)> {
    let audit_refusal = |code: ErrorCode, message: &str| {
        let _ = ctx.store.append_audit(
            Audit {
                actor: "device",
                action: Action::EnrollRefused,
                target: &req.token_id.chars().take(32).collect::<String>(),
                detail: serde_json::json!({ "code": code, "reason": message, "remote": remote.to_string() }),
            },
            now_ms(),
        );
        warn!(%remote, ?code, reason = message, "enrollment refused");
        (code, message.to_string())
    };
    if req.protocol != PROTOCOL_VERSION {
        return Err(audit_refusal(
            ErrorCode::Protocol,
            &format!(
                "protocol version {} is not supported (this coordinator speaks {PROTOCOL_VERSION})",
                req.protocol
            ),
        ));
    }
    if req.token_id.len() != 16 || !req.token_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(audit_refusal(
            ErrorCode::TokenInvalid,
            "token is not valid (malformed id)",
        ));
    }
    let hostname = match Hostname::sanitize(&req.hostname) {
        Ok(h) => h,
        Err(e) => {
            return Err(audit_refusal(
                ErrorCode::BadRequest,
                &format!("hostname refused: {e}"),
            ))
        }
    };
    let identity_hash = match Ca::csr_identity(&req.csr_der.0) {
        Ok(h) => h,
        Err(e) => return Err(audit_refusal(ErrorCode::BadRequest, &e.to_string())),
    };
    let os: String = req
        .os
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect();
    let ctx2 = ctx.clone();
    let csr = req.csr_der.0.clone();
    let token_id = req.token_id.clone();
    let secret = req.token_secret.0 .0.clone();
    let res = tokio::task::spawn_blocking(move || {
        let now = now_ms();
        let spec = EnrollSpec {
            token_id: &token_id,
            token_secret: &secret,
            hostname,
            os,
            identity_hash,
        };
        let mut issue = |id: DeviceId| ctx2.ca.issue_device_cert(&csr, &id.to_string(), now);
        ctx2.store.enroll(spec, &ctx2.config.pools, &mut issue, now)
    })
    .await;
    let (dev, cert) = match res {
        Ok(Ok(x)) => x,
        Ok(Err(StoreError::Refused { code, message })) => {
            warn!(%remote, ?code, reason = %message, "enrollment refused");
            return Err((code, message));
        }
        Ok(Err(e)) => {
            error!(%remote, error = %e, "enrollment failed");
            return Err((
                ErrorCode::Internal,
                "the coordinator could not complete enrollment".into(),
            ));
        }
        Err(e) => {
            error!(%remote, error = %e, "enrollment task failed");
            return Err((
                ErrorCode::Internal,
                "the coordinator could not complete enrollment".into(),
            ));
        }
    };
    info!(device = %dev.id, hostname = %dev.hostname, ipv4 = %dev.ipv4, "device enrolled");
    let _ = ctx.events.send(Event::Upserted(dev.clone()));
    Ok(Enrolled {
        device_id: dev.id,
        hostname: dev.hostname,
        ipv4: dev.ipv4,
        ipv6: dev.ipv6,
        cert_der: Bytes(cert),
        cert_not_after_ms: dev.cert_not_after_ms,
        ca_der: Bytes(ctx.ca.cert_der.clone()),
        lease_key: Bytes(ctx.lease_key.verifying_key().to_bytes().to_vec()),
    })
}

async fn session(
    ctx: Arc<Ctx>,
    mut link: Link,
    mut dec: FrameDecoder,
    cert: &[u8],
    hello: wire::Hello,
) -> Result<()> {
    let remote = link.remote;
    let Some(identity) = cert_identity(cert) else {
        refuse(
            &mut link,
            ErrorCode::Unauthorized,
            "unreadable certificate".into(),
        )
        .await;
        return Ok(());
    };
    let store = ctx.store.clone();
    let dev = tokio::task::spawn_blocking(move || store.device_by_identity(&identity)).await?;
    let dev = match dev {
        Ok(Some(d)) => d,
        Ok(None) => {
            warn!(%remote, "certificate of an unknown device");
            refuse(
                &mut link,
                ErrorCode::Unauthorized,
                "this certificate belongs to no enrolled device".into(),
            )
            .await;
            return Ok(());
        }
        Err(e) => {
            error!(%remote, error = %e, "device lookup failed; refusing");
            refuse(
                &mut link,
                ErrorCode::Internal,
                "the coordinator could not check this device".into(),
            )
            .await;
            return Ok(());
        }
    };
    if !dev.is_live() {
        let why = if dev.user_disabled {
            "the device's user is disabled"
        } else {
            "the device has been revoked"
        };
        let _ = ctx.store.append_audit(
            Audit {
                actor: "device",
                action: Action::ConnectRefused,
                target: dev.hostname.as_str(),
                detail: serde_json::json!({ "reason": why, "remote": remote.to_string() }),
            },
            now_ms(),
        );
        info!(device = %dev.id, %remote, reason = why, "refused connection");
        refuse(&mut link, ErrorCode::DeviceRevoked, why.to_string()).await;
        return Ok(());
    }
    if hello.protocol != PROTOCOL_VERSION {
        refuse(
            &mut link,
            ErrorCode::Protocol,
            format!("protocol version {} is not supported", hello.protocol),
        )
        .await;
        return Ok(());
    }
    let id = dev.id;
    let conn_id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel(CONN_QUEUE);
    let (reply_tx, reply_rx) = oneshot::channel();
    let update = hello.update.clone();
    touch(&ctx, id, &update);
    let _ = ctx.events.send(Event::Opened {
        id,
        conn: conn_id,
        observed: remote,
        update,
        tx,
        reply: reply_tx,
    });
    match reply_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(code)) => {
            refuse(
                &mut link,
                code,
                "the device is not allowed on the network".into(),
            )
            .await;
            return Ok(());
        }
        Err(_) => return Ok(()),
    }
    info!(device = %id, hostname = %dev.hostname, %remote, transport = %link.transport, "device connected");
    let result: Result<()> = async {
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(ConnCmd::Send(bytes)) => link.send.write_all(&bytes).await?,
                    Some(ConnCmd::Close(code, reason)) => {
                        info!(device = %id, ?code, %reason, "closing device session");
                        refuse(&mut link, code, reason).await;
                        return Ok(());
                    }
                    None => return Ok(()),
                },
                frame = read_frame(&mut link.recv, &mut dec) => {
                    let Some(frame) = (match frame {
                        Ok(f) => f,
                        Err(e) => {
                            warn!(device = %id, error = %format!("{e:#}"), "bad frame from device");
                            refuse(&mut link, ErrorCode::Protocol, format!("bad frame: {e:#}")).await;
                            return Ok(());
                        }
                    }) else { return Ok(()) };
                    let msg = match wire::decode::<DeviceMsg>(&frame) {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(device = %id, error = %e, "undecodable message from device");
                            refuse(&mut link, ErrorCode::Protocol, e.to_string()).await;
                            return Ok(());
                        }
                    };
                    match msg {
                        DeviceMsg::Update(u) => {
                            touch(&ctx, id, &u);
                            let _ = ctx.events.send(Event::Update { id, conn: conn_id, update: u });
                        }
                        DeviceMsg::Ping { nonce } => {
                            send_msg(&mut link.send, &CoordinatorMsg::Pong { nonce, coordinator_time_ms: now_ms() }).await?;
                        }
                        DeviceMsg::RenewCert { csr_der } => {
                            match renew(&ctx, id, identity, &csr_der.0).await {
                                Ok((cert_der, not_after_ms)) => send_msg(&mut link.send, &CoordinatorMsg::CertRenewed { cert_der: Bytes(cert_der), not_after_ms }).await?,
                                Err(e) => {
                                    warn!(device = %id, error = %format!("{e:#}"), "certificate renewal refused");
                                    send_msg(&mut link.send, &CoordinatorMsg::Error { code: ErrorCode::BadRequest, message: format!("renewal refused: {e:#}") }).await?;
                                }
                            }
                        }
                        DeviceMsg::LeaseRequest { wg_public_key } => {
                            match issue_lease(&ctx, dev.id, wg_public_key).await {
                                Ok(lease) => send_msg(&mut link.send, &CoordinatorMsg::Lease { lease }).await?,
                                Err((code, message)) => {
                                    warn!(device = %id, ?code, %message, "lease refused");
                                    refuse(&mut link, code, message).await;
                                    return Ok(());
                                }
                            }
                        }
                        DeviceMsg::LeaseActive { serial } => {
                            let store = ctx.store.clone();
                            let revoked = tokio::task::spawn_blocking(move || store.revoke_leases(id, Some(serial), "rotated", now_ms())).await?;
                            match revoked {
                                Ok(serials) if !serials.is_empty() => {
                                    debug!(device = %id, ?serials, "old leases revoked after rotation");
                                    let _ = ctx.events.send(Event::LeasesRevoked(id, serials));
                                }
                                Ok(_) => {}
                                Err(e) => warn!(device = %id, error = %e, "revoking old leases failed"),
                            }
                        }
                        DeviceMsg::Posture(report) => {
                            let _ = ctx.events.send(Event::Posture { id, conn: conn_id, report, received: Instant::now() });
                        }
                        DeviceMsg::RelayTicketRequest => {
                            match relay_ticket(&ctx, id, identity).await {
                                Ok(ticket) => send_msg(&mut link.send, &CoordinatorMsg::RelayTicket { ticket }).await?,
                                Err((code, message)) => {
                                    warn!(device = %id, ?code, %message, "relay ticket refused");
                                    refuse(&mut link, code, message).await;
                                    return Ok(());
                                }
                            }
                        }
                        DeviceMsg::DeniedFlows { mut flows } => {
                            flows.truncate(wire::MAX_DENIED_FLOWS);
                            let _ = ctx.events.send(Event::DeniedFlows(id, flows));
                        }
                        DeviceMsg::Enroll(_) | DeviceMsg::Hello(_) => {
                            refuse(&mut link, ErrorCode::Protocol, "unexpected message on an established session".into()).await;
                            return Ok(());
                        }
                    }
                }
                _ = link.closer.closed() => return Ok(()),
            }
        }
    }
    .await;
    let _ = ctx.events.send(Event::Closed { id, conn: conn_id });
    info!(device = %id, "device disconnected");
    result
}

/// Issues, records and signs a lease, and has the registry push it to peers first.
async fn issue_lease(
    ctx: &Arc<Ctx>,
    id: DeviceId,
    key: wire::WgPublicKey,
) -> Result<SignedLease, (ErrorCode, String)> {
    // A recent trust failure shortens the lease (the policy's `risky_lease_ttl`).
    let (tx, rx) = oneshot::channel();
    let _ = ctx.events.send(Event::RiskyTtl(id, tx));
    let risky = rx.await.ok().flatten();
    let ctx2 = ctx.clone();
    let lease = tokio::task::spawn_blocking(move || {
        crate::leases::issue(
            ctx2.store.as_ref(),
            &ctx2.lease_key,
            &ctx2.lease_ttl,
            risky,
            id,
            key,
            now_ms(),
        )
    })
    .await
    .map_err(|e| (ErrorCode::Internal, e.to_string()))??;
    let (tx, rx) = oneshot::channel();
    let _ = ctx.events.send(Event::Lease(lease.clone(), tx));
    let _ = rx.await;
    Ok(lease)
}

/// A relay ticket for a device that is live now (read afresh), bound to the certificate its
/// session authenticated with.
async fn relay_ticket(
    ctx: &Arc<Ctx>,
    id: DeviceId,
    identity: [u8; 32],
) -> Result<SignedTicket, (ErrorCode, String)> {
    let store = ctx.store.clone();
    let dev = match tokio::task::spawn_blocking(move || store.device(id)).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            error!(device = %id, error = %e, "device lookup for a relay ticket failed");
            return Err((
                ErrorCode::Internal,
                "the coordinator could not issue a relay ticket".into(),
            ));
        }
        Err(e) => {
            error!(device = %id, error = %e, "relay ticket task failed");
            return Err((
                ErrorCode::Internal,
                "the coordinator could not issue a relay ticket".into(),
            ));
        }
    };
    let mut issuer = ctx.tickets.lock().unwrap_or_else(|p| p.into_inner());
    let t = issuer
        .issue(&ctx.lease_key, &dev, identity, now_ms())
        .map_err(|e| (e.code(), e.to_string()))?;
    debug!(device = %id, serial = t.ticket.serial, "relay ticket issued");
    Ok(t)
}

fn touch(ctx: &Arc<Ctx>, id: DeviceId, u: &DeviceUpdate) {
    let store = ctx.store.clone();
    let wg = u.wg_public_key;
    let eps = u.local_endpoints.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.touch_device(id, wg, &eps, now_ms()) {
            warn!(device = %id, error = %e, "recording device contact failed");
        }
    });
}

async fn renew(
    ctx: &Arc<Ctx>,
    id: DeviceId,
    identity: [u8; 32],
    csr: &[u8],
) -> Result<(Vec<u8>, i64)> {
    let csr_identity = Ca::csr_identity(csr)?;
    anyhow::ensure!(
        csr_identity == identity,
        "the request is for a different key than this device's identity"
    );
    let now = now_ms();
    let (cert, not_after) = ctx.ca.issue_device_cert(csr, &id.to_string(), now)?;
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || store.set_device_cert(id, not_after, now)).await??;
    info!(device = %id, "device certificate renewed");
    Ok((cert, not_after))
}
