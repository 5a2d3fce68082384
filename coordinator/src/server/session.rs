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

use ward_shared::keyproof::KeyProof;
use ward_shared::lease::SignedLease;
use ward_shared::names::Hostname;
use ward_shared::relay::SignedTicket;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeviceId, DeviceMsg, DeviceUpdate, Enrolled, ErrorCode,
    FrameDecoder, MAX_DEVICE_FRAME, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use super::actor::{ConnCmd, Event};
use super::link::Link;
use super::{now_ms, Ctx, CONN_QUEUE, HANDSHAKE_TIMEOUT};
use crate::audit::Action;
use crate::gate::{Admit, RefusalRow};
use crate::limits::{Decision, Kind};
use crate::pki::{cert_identity, Ca};
use crate::store::{Audit, EnrollSpec, StoreError};
use tokio::io::AsyncWriteExt;
use ward_runtime::stream::{ended_by_transport, BoxRead, BoxWrite};

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
    ward_runtime::stream::read_frame(recv, dec).await
}

/// Writes one frame (a device or relay message) to the stream.
pub(super) async fn send_msg<T: serde::Serialize>(send: &mut BoxWrite, msg: &T) -> Result<()> {
    send.write_all(&wire::encode(msg)).await?;
    Ok(())
}

pub(super) async fn refuse(link: &mut Link, code: ErrorCode, message: String) {
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
    // The enrollment and sign-in flows are boxed: this future lives as long as the device's
    // session, and inline they would size every session for the largest of them (13 KB each,
    // against 4 KB for a session).
    match (certs.as_ref().and_then(|c| c.first()), msg) {
        (None, DeviceMsg::Enroll(req)) => {
            let reply = Box::pin(enroll(&ctx, req, remote)).await;
            match reply {
                Ok(enrolled) => {
                    send_msg(&mut link.send, &CoordinatorMsg::Enrolled(enrolled)).await?;
                    link.finish(Duration::from_secs(2)).await;
                }
                Err((code, message)) => refuse(&mut link, code, message).await,
            }
            Ok(())
        }
        (None, DeviceMsg::LoginStart(req)) if req.pkce.is_some() => {
            Box::pin(super::login_code::login(&ctx, &mut link, dec, req)).await
        }
        (None, DeviceMsg::LoginStart(req)) => {
            Box::pin(super::oidc::login(&ctx, &mut link, req)).await
        }
        (Some(cert), DeviceMsg::SignInStart(req)) => {
            let cert = cert.to_vec();
            Box::pin(super::resign::sign_in_again(
                &ctx, &mut link, dec, &cert, req,
            ))
            .await
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

/// Writes the gate's aggregated refusal rows (those whose interval has passed) every second, on
/// a blocking thread.
pub(super) async fn refusal_rows(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let rows = ctx
            .gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .poll_rows(now_ms());
        if !rows.is_empty() {
            let _ = write_refusal_rows(&ctx, rows).await;
        }
    }
}

/// Appends refusal rows off the runtime's threads; the handle resolves once they are written.
fn write_refusal_rows(ctx: &Arc<Ctx>, rows: Vec<RefusalRow>) -> tokio::task::JoinHandle<()> {
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || {
        for r in rows {
            let target = r.target();
            warn!(remote = %target, action = %r.action, count = r.count, rate_limited = r.rate_limited, "unauthenticated attempts refused");
            let a = Audit {
                actor: "device",
                action: r.action,
                target: &target,
                detail: r.detail(),
            };
            if let Err(e) = store.append_audit(a, now_ms()) {
                error!(error = %e, "audit append failed");
            }
        }
    })
}

/// Records one unauthenticated refusal with the gate; writes its row now (before the refusal
/// is answered) if it is the first from this source in the interval.
pub(super) async fn gate_refused(
    ctx: &Arc<Ctx>,
    remote: SocketAddr,
    action: Action,
    reason: &str,
    limited: bool,
) {
    let row = ctx.gate.lock().unwrap_or_else(|p| p.into_inner()).refused(
        remote.ip().to_canonical(),
        action,
        reason,
        limited,
        now_ms(),
    );
    debug!(%remote, %action, reason, limited, "refused");
    if let Some(row) = row {
        let _ = write_refusal_rows(ctx, vec![row]).await;
    }
}

/// An enrollment: every attempt takes a token from its source's bucket first; refusals before
/// the token's secret is proven (malformed requests, unknown tokens, wrong secrets, the rate
/// limit) are aggregated by the gate; refusals of a genuine token (used, expired, revoked, user
/// disabled) are audited one by one. No database work runs on the runtime's threads.
pub(super) async fn enroll(
    ctx: &Arc<Ctx>,
    req: wire::EnrollRequest,
    remote: SocketAddr,
) -> Result<Enrolled, (ErrorCode, String)> {
    let admitted = ctx
        .gate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(remote.ip().to_canonical(), now_ms());
    if admitted == Admit::Limited {
        gate_refused(ctx, remote, Action::EnrollRefused, "rate limited", true).await;
        return Err((
            ErrorCode::Unauthorized,
            "too many enrollment attempts from this address; try again later".into(),
        ));
    }
    let (hostname, identity_hash) = match check_request(&req) {
        Ok(x) => x,
        Err((code, message)) => {
            gate_refused(ctx, remote, Action::EnrollRefused, &message, false).await;
            return Err((code, message));
        }
    };
    let os: String = req
        .os
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect();
    let busy = || {
        (
            ErrorCode::Internal,
            "the coordinator is busy; try again later".to_string(),
        )
    };
    let Ok(Ok(_slot)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, ctx.enroll_slots.acquire()).await
    else {
        warn!(%remote, "enrollment refused: no enrollment slot in time");
        return Err(busy());
    };
    let ctx2 = ctx.clone();
    let csr = req.csr_der.0.clone();
    let token_id = req.token_id.clone();
    let secret = req.token_secret.0 .0.clone();
    let res = tokio::task::spawn_blocking(move || {
        let now = now_ms();
        let host = hostname.clone();
        let spec = EnrollSpec {
            token_id: &token_id,
            token_secret: &secret,
            hostname,
            os,
            identity_hash,
        };
        let mut issue = |id: DeviceId| ctx2.ca.issue_device_cert(&csr, &id.to_string(), now);
        // A device holding the name this token binds as a self-chosen display name is moved
        // aside by the store; remember which, so the registry hears of its new name.
        // A database that cannot be read refuses the enrollment here, before a second wait
        // for a connection in `try_enroll` outlasts the device's patience.
        let holder = match ctx2.store.token_hostname(&token_id) {
            Ok(Some(h)) => ctx2.store.device_by_name(h.as_str()).ok().map(|d| d.id),
            Err(e) if e.is_storage_fault() => return Err(e),
            _ => None,
        };
        let res = ctx2
            .store
            .try_enroll(spec, &ctx2.config.pools, &mut issue, now)
            .map(|(dev, cert)| {
                let displaced = holder
                    .filter(|h| *h != dev.id)
                    .and_then(|h| ctx2.store.device(h).ok());
                (dev, cert, displaced)
            });
        // A refusal of a genuine token is audited here, row by row, as it always was.
        if let Err(StoreError::Refused { code, message }) = &res {
            if *code != ErrorCode::TokenInvalid {
                let a = Audit {
                    actor: "device",
                    action: Action::EnrollRefused,
                    target: &token_id,
                    detail: serde_json::json!({
                        "code": code,
                        "reason": message,
                        "hostname": host.as_str(),
                        "remote": remote.to_string(),
                    }),
                };
                if let Err(e) = ctx2.store.append_audit(a, now) {
                    error!(error = %e, "audit append failed");
                }
            }
        }
        res
    })
    .await;
    let (dev, cert, displaced) = match res {
        Ok(Ok(x)) => x,
        Ok(Err(StoreError::Refused { code, message })) => {
            if code == ErrorCode::TokenInvalid {
                gate_refused(ctx, remote, Action::EnrollRefused, &message, false).await;
            } else {
                warn!(%remote, ?code, reason = %message, "enrollment refused");
            }
            return Err((code, message));
        }
        Ok(Err(e)) if e.is_storage_fault() => {
            error!(%remote, error = %e, "enrollment failed: the database is unavailable");
            return Err((
                ErrorCode::Internal,
                "the coordinator's database is unavailable; enrollment refused, try again later"
                    .into(),
            ));
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
    info!(device = %dev.id, hostname = %dev.hostname, name_bound = dev.name_bound, ipv4 = %dev.ipv4, "device enrolled");
    if let Some(d) = displaced {
        info!(device = %d.id, hostname = %d.hostname, "device with a self-chosen name moved aside for a bound name");
        ctx.events.send(Event::Upserted(d)).await;
    }
    ctx.events.send(Event::Upserted(dev.clone())).await;
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

/// What an enrollment request must be before the store is asked: this protocol, a well-formed
/// token id, a valid hostname, a CSR whose signature proves its key.
fn check_request(req: &wire::EnrollRequest) -> Result<(Hostname, [u8; 32]), (ErrorCode, String)> {
    if !wire::speaks(req.protocol) {
        return Err((
            ErrorCode::Protocol,
            format!(
                "protocol version {} is not supported (this coordinator speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})",
                req.protocol
            ),
        ));
    }
    if req.token_id.len() != 16 || !req.token_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((
            ErrorCode::TokenInvalid,
            "token is not valid (malformed id)".into(),
        ));
    }
    let hostname = Hostname::sanitize(&req.hostname)
        .map_err(|e| (ErrorCode::BadRequest, format!("hostname refused: {e}")))?;
    let identity_hash =
        Ca::csr_identity(&req.csr_der.0).map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
    Ok((hostname, identity_hash))
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
        // A revoked device can reconnect without end: one row per device per interval.
        let row = ctx
            .gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused_subject(
                dev.hostname.as_str(),
                remote.ip().to_canonical(),
                Action::ConnectRefused,
                why,
                now_ms(),
            );
        if let Some(row) = row {
            let _ = write_refusal_rows(&ctx, vec![row]).await;
        }
        info!(device = %dev.id, %remote, reason = why, "refused connection");
        refuse(&mut link, ErrorCode::DeviceRevoked, why.to_string()).await;
        return Ok(());
    }
    if !wire::speaks(hello.protocol) {
        refuse(
            &mut link,
            ErrorCode::Protocol,
            format!(
                "protocol version {} is not supported (this coordinator speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})",
                hello.protocol
            ),
        )
        .await;
        return Ok(());
    }
    let id = dev.id;
    // What this session may send: what the device's earlier sessions left, so reconnecting
    // refills nothing; a device opening sessions too often is refused before the registry
    // hears of it.
    let opened = ctx
        .device_limits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .open(id, now_ms());
    let mut limits = match opened {
        Ok(l) => l,
        Err(e) => {
            debug!(device = %id, %remote, "device opens sessions too often; refused");
            refuse(
                &mut link,
                ErrorCode::RateLimited,
                format!("{e}: retry later"),
            )
            .await;
            return Ok(());
        }
    };
    let conn_id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel(CONN_QUEUE);
    // A close from the registry (revoked, replaced, too slow) goes ahead of the queue.
    let (close_tx, close_rx) = oneshot::channel::<(ErrorCode, String)>();
    let mut close_rx = Some(close_rx);
    let (reply_tx, reply_rx) = oneshot::channel();
    let update = hello.update.clone();
    // A malformed holding costs the device its resume, not its session: its first netmap is
    // whole.
    let holding = hello.holding.filter(|h| match h.count() {
        Ok(_) => true,
        Err(e) => {
            warn!(device = %id, error = %e, "hello: unusable netmap holding; sending a whole netmap");
            false
        }
    });
    let mut held_peers = hello.held_peers;
    if held_peers.len() > wire::MAX_HELD_PEERS {
        debug!(device = %id, named = held_peers.len(), "hello: more held peers than any session holds; the rest ignored");
        held_peers.truncate(wire::MAX_HELD_PEERS);
    }
    touch(&ctx, id, &update);
    ctx.events
        .send(Event::Opened {
            id,
            conn: conn_id,
            observed: remote,
            update,
            protocol: hello.protocol,
            holding,
            held_peers,
            tx,
            close: close_tx,
            reply: reply_tx,
        })
        .await;
    let opened = reply_rx.await;
    if !matches!(opened, Ok(Ok(()))) {
        let mut dl = ctx.device_limits.lock().unwrap_or_else(|p| p.into_inner());
        dl.close(id, &limits, now_ms());
    }
    match opened {
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
    // The latest update and report held back by the limits.
    let mut held_update: Option<DeviceUpdate> = None;
    let mut held_posture: Option<Box<ward_shared::posture::PostureReport>> = None;
    let result: Result<()> = async {
        loop {
            let release_in = limits
                .poll_timeout()
                .map(|t| Duration::from_millis(u64::try_from(t.saturating_sub(now_ms())).unwrap_or(0)));
            tokio::select! {
                _ = async {
                    match release_in {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    for kind in limits.poll_release(now_ms()) {
                        match kind {
                            Kind::Update => if let Some(u) = held_update.take() {
                                touch(&ctx, id, &u);
                                ctx.events.send(Event::Update { id, conn: conn_id, update: u }).await;
                            },
                            Kind::Posture => if let Some(report) = held_posture.take() {
                                ctx.events.send(Event::Posture { id, conn: conn_id, report, received: Instant::now() }).await;
                            },
                            _ => {}
                        }
                    }
                }
                closed = async {
                    match close_rx.as_mut() {
                        Some(c) => c.await,
                        None => std::future::pending().await,
                    }
                } => match closed {
                    Ok((code, reason)) => {
                        info!(device = %id, ?code, %reason, "closing device session");
                        refuse(&mut link, code, reason).await;
                        return Ok(());
                    }
                    // The registry let go of this session without a word: the queue's end
                    // (below) ends the session once what is queued was sent.
                    Err(_) => close_rx = None,
                },
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
                        // The device went away: nothing to answer, nothing to warn about.
                        Err(e) if ended_by_transport(&e) => {
                            debug!(device = %id, error = %format!("{e:#}"), "device session ended");
                            return Ok(());
                        }
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
                    let decision = match limit_kind(&msg) {
                        Some(kind) => {
                            let d = limits.handle(kind, now_ms());
                            if d == Decision::Exceeded {
                                warn!(device = %id, kind = kind.as_str(), "device session over its message limits; closing it");
                                // Kept before the device hears of it: a session it opens as
                                // soon as it reads the refusal starts from the spent buckets.
                                ctx.device_limits
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .close(id, &limits, now_ms());
                                refuse(&mut link, ErrorCode::RateLimited, format!("too many {} messages: this session is closed", kind.as_str())).await;
                                return Ok(());
                            }
                            d
                        }
                        None => Decision::Pass,
                    };
                    match decision {
                        Decision::Pass => {}
                        Decision::Drop => {
                            debug!(device = %id, "message over its soft limit dropped");
                            continue;
                        }
                        Decision::Defer { .. } | Decision::Exceeded => {
                            // Only updates and reports are deferred: keep the latest.
                            match msg {
                                DeviceMsg::Update(u) => held_update = Some(u),
                                DeviceMsg::Posture(r) => held_posture = Some(r),
                                _ => {}
                            }
                            continue;
                        }
                    }
                    match msg {
                        DeviceMsg::Update(u) => {
                            touch(&ctx, id, &u);
                            ctx.events.send(Event::Update { id, conn: conn_id, update: u }).await;
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
                        DeviceMsg::LeaseRequest { wg_public_key, proof } => {
                            match issue_lease(&ctx, &dev, wg_public_key, proof).await {
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
                                    ctx.events.send(Event::LeasesRevoked(id, serials)).await;
                                }
                                Ok(_) => {}
                                Err(e) => warn!(device = %id, error = %e, "revoking old leases failed"),
                            }
                        }
                        DeviceMsg::Posture(report) => {
                            ctx.events.send(Event::Posture { id, conn: conn_id, report, received: Instant::now() }).await;
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
                            ctx.events.send(Event::DeniedFlows(id, flows)).await;
                        }
                        DeviceMsg::PunchRequest { peer } => {
                            ctx.events.send(Event::Punch { id, conn: conn_id, peer }).await;
                        }
                        DeviceMsg::WantPeer { by } => {
                            ctx.events.send(Event::WantPeer { id, conn: conn_id, by }).await;
                        }
                        DeviceMsg::Flows(report) => {
                            // A refused report is answered with an error and the session goes
                            // on (its rate limit still counts it); a stored one is acknowledged.
                            if let Err(e) = report.validate() {
                                warn!(device = %id, seq = report.seq, error = %e, "flow report refused");
                                send_msg(&mut link.send, &CoordinatorMsg::Error { code: ErrorCode::BadRequest, message: format!("flow report refused: {e}") }).await?;
                                continue;
                            }
                            let seq = report.seq;
                            if store_flows(&ctx, id, report).await {
                                send_msg(&mut link.send, &CoordinatorMsg::FlowsAck { seq }).await?;
                            }
                        }
                        DeviceMsg::Enroll(_) | DeviceMsg::LoginStart(_) | DeviceMsg::LoginCallback(_) | DeviceMsg::SignInStart(_) | DeviceMsg::Hello(_) => {
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
    ctx.device_limits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .close(id, &limits, now_ms());
    ctx.events.send(Event::Closed { id, conn: conn_id }).await;
    info!(device = %id, "device disconnected");
    result
}

/// The limit a message counts against (`None`: not limited; only valid first messages).
fn limit_kind(msg: &DeviceMsg) -> Option<Kind> {
    Some(match msg {
        DeviceMsg::Update(_) => Kind::Update,
        DeviceMsg::Posture(_) => Kind::Posture,
        DeviceMsg::DeniedFlows { .. } => Kind::DeniedFlows,
        DeviceMsg::Flows(_) => Kind::Flows,
        DeviceMsg::LeaseRequest { .. } => Kind::LeaseRequest,
        DeviceMsg::LeaseActive { .. } => Kind::LeaseActive,
        DeviceMsg::RenewCert { .. } => Kind::RenewCert,
        DeviceMsg::RelayTicketRequest => Kind::RelayTicket,
        DeviceMsg::Ping { .. } => Kind::Ping,
        DeviceMsg::PunchRequest { .. } => Kind::Punch,
        DeviceMsg::WantPeer { .. } => Kind::WantPeer,
        DeviceMsg::Enroll(_)
        | DeviceMsg::LoginStart(_)
        | DeviceMsg::LoginCallback(_)
        | DeviceMsg::SignInStart(_)
        | DeviceMsg::Hello(_) => return None,
    })
}

/// Stores a validated flow report off the runtime's threads; whether it is stored now or was
/// before (a retransmission), so it may be acknowledged. A failure is not acknowledged: the
/// device keeps the report and sends it again.
async fn store_flows(ctx: &Arc<Ctx>, id: DeviceId, report: ward_shared::flows::FlowReport) -> bool {
    let store = ctx.store.clone();
    let retention = ctx.flow_retention_ms;
    let seq = report.seq;
    let dropped = report.dropped_records;
    // Denials the device could only call `no rule` are judged by the registry, which knows
    // posture and quarantine. If it cannot answer (shutting down), the device's reasons are
    // stored: a label, never access.
    let relabeled = if crate::flows::may_relabel(&report) {
        let (tx, rx) = oneshot::channel();
        ctx.events
            .send(Event::RelabelFlows(id, Box::new(report.clone()), tx))
            .await;
        rx.await.ok()
    } else {
        None
    };
    let learn = report.clone();
    let res = tokio::task::spawn_blocking(move || {
        let now = now_ms();
        let keep = now.saturating_sub(retention);
        match relabeled {
            Some(r) => store.store_flows_relabeled(id, &report, &r, keep, now),
            None => store.store_flows(id, &report, keep, now),
        }
    })
    .await;
    match res {
        Ok(Ok(crate::store::FlowsStored::Stored {
            records,
            refused,
            gap,
        })) => {
            debug!(device = %id, seq, records, refused, dropped, "flow report stored");
            // Learned once, when first stored (a retransmission is not counted twice).
            ctx.events.send(Event::Flows(id, Box::new(learn))).await;
            if gap > 0 {
                warn!(device = %id, seq, missing = gap, "flow reports missing before this one");
            }
            true
        }
        Ok(Ok(crate::store::FlowsStored::Duplicate)) => {
            debug!(device = %id, seq, "flow report stored before: acknowledged again");
            true
        }
        Ok(Err(e)) => {
            warn!(device = %id, seq, error = %e, "storing a flow report failed; not acknowledged");
            false
        }
        Err(e) => {
            error!(device = %id, seq, error = %e, "flow report task failed");
            false
        }
    }
}

/// Issues, records and signs a lease, and has the registry push it to peers first. Refused
/// (audited as `lease.refused`): a key another device holds, or one this device has not
/// proved it holds.
async fn issue_lease(
    ctx: &Arc<Ctx>,
    dev: &crate::store::Device,
    key: wire::WgPublicKey,
    proof: Option<KeyProof>,
) -> Result<SignedLease, (ErrorCode, String)> {
    let id = dev.id;
    let refused = |code: ErrorCode, message: String, holder: Option<DeviceId>| {
        let store = ctx.store.clone();
        let target = dev.hostname.to_string();
        let detail = serde_json::json!({
            "code": code, "reason": message, "wg_key": key.to_base64(),
            "holder": holder.map(|h| h.0),
        });
        tokio::task::spawn_blocking(move || {
            let audit = Audit {
                actor: "device",
                action: Action::LeaseRefused,
                target: &target,
                detail,
            };
            if let Err(e) = store.append_audit(audit, now_ms()) {
                warn!(device = %id, error = %e, "auditing a refused lease failed");
            }
        });
        (code, message)
    };
    // The key must not be another device's; a recent trust failure shortens the lease (the
    // policy's `risky_lease_ttl`).
    let (tx, rx) = oneshot::channel();
    ctx.events.send(Event::LeaseCheck(id, key, tx)).await;
    let (risky, current) = match rx.await {
        Ok(Ok(checked)) => checked,
        Ok(Err(e)) => {
            let holder = match &e {
                crate::registry::LeaseRefusal::KeyInUse { holder } => Some(*holder),
                crate::registry::LeaseRefusal::NotLive => None,
            };
            warn!(device = %id, ?holder, error = %e, "lease refused");
            return Err(refused(e.code(), e.to_string(), holder));
        }
        Err(_) => {
            return Err((
                ErrorCode::Internal,
                "the coordinator could not issue a lease".into(),
            ))
        }
    };
    if let Err((code, message)) =
        crate::leases::check_proof(&ctx.lease_key, id, &key, proof.as_ref())
    {
        return Err(refused(code, message, None));
    }
    if let Some(p) = &ctx.oidc {
        // A device signed in through the provider gets leases only while its sign-in is younger
        // than --max-auth-age.
        let max = p.cfg.max_auth_age_ms;
        let store = ctx.store.clone();
        let signed = tokio::task::spawn_blocking(move || store.sign_ins())
            .await
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        if let Some(si) = signed.iter().find(|s| s.device == id) {
            let age = now_ms() - si.auth_time_ms;
            if age > max {
                let msg = format!(
                    "the sign-in of {} on this device is {} s old, more than --max-auth-age ({} s): sign in again",
                    si.user,
                    age / 1000,
                    max / 1000
                );
                return Err(refused(ErrorCode::Unauthorized, msg, None));
            }
        }
    }
    let ctx2 = ctx.clone();
    let lease = tokio::task::spawn_blocking(move || {
        crate::leases::issue(
            ctx2.store.as_ref(),
            &ctx2.lease_key,
            &ctx2.lease_ttl,
            risky,
            id,
            key,
            proof.as_ref(),
            current.as_ref(),
            now_ms(),
        )
    })
    .await
    .map_err(|e| (ErrorCode::Internal, e.to_string()))??;
    let (tx, rx) = oneshot::channel();
    ctx.events.send(Event::Lease(lease.clone(), tx)).await;
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

/// Records contact from the device; written with others in one batch ([`super::touches`]).
fn touch(ctx: &Arc<Ctx>, id: DeviceId, u: &DeviceUpdate) {
    ctx.touches
        .record(id, u.wg_public_key, &u.local_endpoints, now_ms());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that speaks a newer protocol than this coordinator (a version-3 agent against a
    /// coordinator that predates reach by reference) is refused with a `protocol` error that
    /// names its version and the versions this coordinator speaks; every version spoken passes
    /// the version check (this request then fails on its malformed token).
    #[test]
    fn a_newer_protocol_is_refused_with_the_versions_spoken() {
        let req = |protocol| wire::EnrollRequest {
            protocol,
            token_id: "zz".into(),
            token_secret: wire::TokenSecret(Bytes(vec![])),
            hostname: "h".into(),
            os: "x".into(),
            csr_der: Bytes(vec![]),
        };
        let newer = PROTOCOL_VERSION + 1;
        assert_eq!(
            check_request(&req(newer)).err(),
            Some((
                ErrorCode::Protocol,
                format!(
                    "protocol version {newer} is not supported (this coordinator speaks \
                     {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})"
                )
            ))
        );
        assert_eq!(PROTOCOL_VERSION, 5);
        for v in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
            assert_eq!(
                check_request(&req(v)).err().map(|e| e.0),
                Some(ErrorCode::TokenInvalid),
                "version {v}"
            );
        }
        assert_eq!(
            check_request(&req(0)).err().map(|e| e.0),
            Some(ErrorCode::Protocol)
        );
    }
}
