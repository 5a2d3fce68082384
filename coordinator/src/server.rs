//! `ward-coordinator serve`: the tokio driver around [`crate::registry::Registry`] and the store.
//!
//! Tasks: a QUIC accept loop (one task per device connection), the registry actor (owns the
//! core, fans its outputs out to connection tasks), and the admin socket.

use anyhow::{Context, Result};
use serde_json::json;
use sha2::Digest;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use ward_shared::names::{Hostname, Name};
use ward_shared::token::{hash_secret, EnrollToken};
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeniedFlow, DeviceId, DeviceMsg, DeviceUpdate, Enrolled,
    ErrorCode, FrameDecoder, PostureVerdict, MAX_DEVICE_FRAME, PROTOCOL_VERSION,
};

use crate::admin::{AdminRequest, AdminResponse, MAX_ADMIN_LINE};
use crate::audit::Action;
use crate::datadir::{Config, DataDir};
use crate::pki::{cert_identity, Ca};
use crate::registry::{ConnId, Output, Registry};
use crate::store::{
    Audit, Device, EnrollSpec, GrantRow, LeaseRow, Quarantine, SqliteStore, Store, StoreError,
    TokenSpec,
};
use crate::trust::Change;
use ward_shared::lease::SignedLease;
use ward_shared::policy::{self, Compiled, Directory, Grant, Policy};
use ward_shared::posture::PostureReport;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Frames queued for one slow connection before it is dropped.
const CONN_QUEUE: usize = 256;

pub use ward_runtime::now_ms;

enum ConnCmd {
    Send(Vec<u8>),
    Close(ErrorCode, String),
}

enum Event {
    Opened {
        id: DeviceId,
        conn: ConnId,
        observed: SocketAddr,
        update: DeviceUpdate,
        tx: mpsc::Sender<ConnCmd>,
        reply: oneshot::Sender<Result<(), ErrorCode>>,
    },
    Update {
        id: DeviceId,
        conn: ConnId,
        update: DeviceUpdate,
    },
    Closed {
        id: DeviceId,
        conn: ConnId,
    },
    Upserted(Device),
    Removed(DeviceId, String),
    User(crate::store::User),
    Lease(SignedLease, oneshot::Sender<()>),
    LeasesRevoked(DeviceId, Vec<u64>),
    Rotate(DeviceId, String, oneshot::Sender<bool>),
    Policy(Policy),
    Grants(Vec<Grant>),
    Posture {
        id: DeviceId,
        conn: ConnId,
        report: Box<PostureReport>,
        received: Instant,
    },
    DeniedFlows(DeviceId, Vec<DeniedFlow>),
    /// The policy's shorter lease TTL, if this device is risky now.
    RiskyTtl(DeviceId, oneshot::Sender<Option<u64>>),
    /// The directory judged under a candidate policy's posture requirements.
    DirectoryFor(Box<Policy>, oneshot::Sender<Directory>),
    /// A device's latest report and verdict (for `device show`).
    TrustView(
        DeviceId,
        oneshot::Sender<(Option<PostureReport>, PostureVerdict)>,
    ),
    /// What the registry holds now (for admin listings, check, apply and explain).
    Snapshot(oneshot::Sender<Snap>),
}

struct Snap {
    online: Vec<DeviceId>,
    directory: Directory,
    compiled: Compiled,
    policy: Option<Policy>,
    trust: TrustStats,
}

/// Posture report → enforcement latency, as the coordinator sees it: from a report's arrival
/// to the updated netmaps handed to every peer's connection (the last 1 000 changes).
#[derive(Debug, Clone, Default)]
struct TrustStats {
    enforce_us: VecDeque<u64>,
    reports: u64,
    refused: u64,
    changes: u64,
}

impl TrustStats {
    fn json(&self) -> serde_json::Value {
        let mut v: Vec<u64> = self.enforce_us.iter().copied().collect();
        v.sort_unstable();
        let pct = |q: f64| -> Option<f64> {
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            v.get(i).map(|us| *us as f64 / 1000.0)
        };
        json!({
            "reports": self.reports,
            "refused": self.refused,
            "changes": self.changes,
            "enforce_ms_p50": pct(0.5),
            "enforce_ms_p99": pct(0.99),
            "enforce_ms_last": self.enforce_us.back().map(|us| *us as f64 / 1000.0),
        })
    }
}

pub use crate::leases::LeaseTtl;

struct Ctx {
    config: Config,
    ca: Ca,
    lease_key: ed25519_dalek::SigningKey,
    lease_ttl: LeaseTtl,
    store: Arc<dyn Store>,
    events: mpsc::UnboundedSender<Event>,
    next_conn: AtomicU64,
    started: Instant,
}

pub async fn serve(dd: DataDir, listen: Option<SocketAddr>, lease_ttl: LeaseTtl) -> Result<()> {
    let config = dd.load_config()?;
    let ca = dd.load_ca()?;
    let lease_key = dd.load_lease_key()?;
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dd.db_path())
            .with_context(|| format!("opening {}", dd.db_path().display()))?,
    );
    let listen = match listen {
        Some(l) => l,
        None => {
            let port = config
                .public_addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .context("public address has no port")?;
            SocketAddr::from(([0, 0, 0, 0], port))
        }
    };
    let devices = store.list_devices()?;
    let users = store.list_users()?;
    let now = now_ms();
    let current = match store.current_policy()? {
        None => {
            info!("no policy applied yet: everything is denied until `policy apply`");
            None
        }
        Some(v) => match policy::parse(v.text.as_bytes(), &format!("policy v{}", v.version)) {
            Ok(p) => Some(p),
            Err(e) => {
                // Fail closed: a stored policy that no longer parses allows nothing.
                error!(version = v.version, error = %e, "stored policy does not parse; denying everything until a valid policy is applied");
                None
            }
        },
    };
    let grants = store.active_grants(now)?.iter().map(grant_of).collect();
    let leases = store
        .active_leases(now)?
        .into_iter()
        .filter_map(|row| crate::leases::sign_row(&lease_key, &devices, row))
        .collect();
    let registry = Registry::new(config.pools, devices, users, current, grants, leases, now);
    let (events, rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        config,
        ca,
        lease_key,
        lease_ttl,
        store,
        events,
        next_conn: AtomicU64::new(1),
        started: Instant::now(),
    });

    let endpoint = quinn::Endpoint::server(server_config(&ctx.ca)?, listen)
        .with_context(|| format!("binding the QUIC control listener on {listen}"))?;
    let admin = bind_admin(&dd).await?;
    info!(%listen, public_addr = %ctx.config.public_addr, "coordinator serving");
    ctx.store.append_audit(
        Audit {
            actor: "coordinator",
            action: Action::CoordinatorStart,
            target: &ctx.config.public_addr,
            detail: serde_json::json!({ "listen": listen.to_string() }),
        },
        now_ms(),
    )?;

    tokio::spawn(registry_actor(
        registry,
        rx,
        ctx.store.clone(),
        ctx.events.clone(),
    ));
    tokio::spawn(admin_loop(admin, ctx.clone()));

    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        anyhow::Ok(())
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = &mut shutdown => { r?; break; }
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let remote = inc.remote_address();
                    if let Err(e) = handle_connection(inc, ctx).await {
                        debug!(%remote, error = %format!("{e:#}"), "control connection ended");
                    }
                });
            }
        }
    }
    info!("coordinator shutting down");
    endpoint.close(0u32.into(), b"coordinator shutting down");
    let _ = std::fs::remove_file(dd.admin_socket());
    Ok(())
}

fn server_config(ca: &Ca) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = ca.server_cert(now_ms())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from(ca.cert_der.clone()))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.into(), ca.cert_der.clone().into()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )?;
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let qsc = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(qsc));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?));
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    sc.transport_config(Arc::new(transport));
    Ok(sc)
}

fn grant_of(g: &GrantRow) -> Grant {
    Grant {
        id: g.id.clone(),
        from: g.principal.clone(),
        to: g.service.clone(),
        not_after_ms: g.not_after_ms,
        reason: g.reason.clone(),
    }
}

async fn registry_actor(
    mut reg: Registry,
    mut rx: mpsc::UnboundedReceiver<Event>,
    store: Arc<dyn Store>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut conns: HashMap<ConnId, mpsc::Sender<ConnCmd>> = HashMap::new();
    let mut stats = TrustStats::default();
    let mut sink = TrustSink {
        store,
        events,
        stats: &mut stats,
        received: None,
        refused: HashMap::new(),
    };
    loop {
        // Wake for the next rule or grant expiry, or at least every second.
        let wait = reg
            .poll_timeout()
            .map(|t| (t - now_ms()).clamp(50, 1000) as u64)
            .unwrap_or(1000);
        let ev = tokio::select! {
            ev = rx.recv() => match ev { Some(ev) => Some(ev), None => break },
            _ = tokio::time::sleep(Duration::from_millis(wait)) => None,
        };
        reg.handle_time(now_ms());
        let Some(ev) = ev else {
            flush(&mut reg, &mut conns, &mut sink);
            continue;
        };
        match ev {
            Event::Opened {
                id,
                conn,
                observed,
                update,
                tx,
                reply,
            } => {
                let r = reg.handle_session_opened(id, conn, observed, update);
                if r.is_ok() {
                    conns.insert(conn, tx);
                }
                let _ = reply.send(r);
            }
            Event::Update { id, conn, update } => reg.handle_session_update(id, conn, update),
            Event::Closed { id, conn } => {
                conns.remove(&conn);
                reg.handle_session_closed(id, conn);
            }
            Event::Upserted(d) => reg.handle_device_upserted(d),
            Event::Removed(id, why) => reg.handle_device_removed(id, &why),
            Event::User(u) => reg.handle_user(u),
            Event::Lease(l, done) => {
                reg.handle_lease(l);
                // Peers get the new key before the device hears its lease was granted.
                flush(&mut reg, &mut conns, &mut sink);
                let _ = done.send(());
            }
            Event::LeasesRevoked(id, serials) => reg.handle_leases_revoked(id, &serials),
            Event::Rotate(id, why, done) => {
                let _ = done.send(reg.handle_rotate(id, &why));
            }
            Event::Policy(p) => reg.handle_policy(p),
            Event::Grants(g) => reg.handle_grants(g),
            Event::Posture {
                id,
                conn,
                report,
                received,
            } => {
                sink.stats.reports += 1;
                let (seq, age) = (report.seq, now_ms().saturating_sub(report.collected_at_ms));
                match reg.handle_posture(id, conn, *report, now_ms()) {
                    Ok(()) => {
                        debug!(device = %id, seq, age_ms = age, "posture report");
                        sink.received = Some(received);
                    }
                    Err(e) => {
                        sink.stats.refused += 1;
                        // A device sending garbage must not turn into an fsync per message:
                        // at most one audit row per device per 10 s, with the count.
                        let (last, n) = sink.refused.entry(id).or_insert((None, 0));
                        *n += 1;
                        if last.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                            warn!(device = %id, seq, error = %e, refused = *n, "posture report refused");
                            let count = *n;
                            *last = Some(Instant::now());
                            *n = 0;
                            sink.audit(
                                id,
                                Action::PostureRefused,
                                json!({ "error": e.to_string(), "count": count }),
                            );
                        }
                    }
                }
            }
            Event::DeniedFlows(id, flows) => reg.handle_denied_flows(id, &flows, now_ms()),
            Event::DirectoryFor(p, reply) => {
                let _ = reply.send(reg.directory_for(&p));
            }
            Event::RiskyTtl(id, reply) => {
                let _ = reply.send(reg.risky_lease_ttl_ms(id));
            }
            Event::TrustView(id, reply) => {
                flush(&mut reg, &mut conns, &mut sink);
                let _ = reply.send((reg.posture_report(id).cloned(), reg.trust_view(id)));
            }
            Event::Snapshot(reply) => {
                flush(&mut reg, &mut conns, &mut sink);
                let _ = reply.send(Snap {
                    online: conns_online(&reg),
                    directory: reg.directory(),
                    compiled: reg.compiled().clone(),
                    policy: reg.policy().cloned(),
                    trust: sink.stats.clone(),
                });
            }
        }
        flush(&mut reg, &mut conns, &mut sink);
    }
}

/// Where the registry's trust decisions go: the audit log, the posture table, and (for an
/// automatic quarantine) the device row, which then comes back as `Event::Upserted`.
struct TrustSink<'a> {
    store: Arc<dyn Store>,
    events: mpsc::UnboundedSender<Event>,
    stats: &'a mut TrustStats,
    /// When the report being handled arrived.
    received: Option<Instant>,
    /// Per device: when a refusal was last audited, and refusals since.
    refused: HashMap<DeviceId, (Option<Instant>, u64)>,
}

impl TrustSink<'_> {
    fn audit(&self, id: DeviceId, action: Action, detail: serde_json::Value) {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let target = store
                .device(id)
                .map(|d| d.hostname.to_string())
                .unwrap_or_else(|_| id.to_string());
            let a = Audit {
                actor: "coordinator",
                action,
                target: &target,
                detail,
            };
            if let Err(e) = store.append_audit(a, now_ms()) {
                error!(device = %id, %action, error = %e, "audit append failed");
            }
        });
    }

    fn posture_changed(
        &mut self,
        id: DeviceId,
        change: Change,
        report: Option<Box<PostureReport>>,
    ) {
        self.stats.changes += 1;
        let failures: BTreeMap<&str, &[String]> = change
            .evaluations
            .iter()
            .filter(|e| !e.passed)
            .map(|e| (e.requirement.as_str(), &e.failures[..]))
            .collect();
        info!(device = %id, failed = ?change.newly_failed, passed = ?change.newly_passed, "posture changed");
        // A device that never reported failing at first contact is not news.
        if report.is_some() || !change.newly_passed.is_empty() {
            for (action, names) in [
                (Action::PostureFail, &change.newly_failed),
                (Action::PosturePass, &change.newly_passed),
            ] {
                if names.is_empty() {
                    continue;
                }
                let reasons: BTreeMap<&str, &[String]> = names
                    .iter()
                    .map(|n| (n.as_str(), failures.get(n.as_str()).copied().unwrap_or(&[])))
                    .collect();
                self.audit(
                    id,
                    action,
                    json!({ "requirements": names, "reasons": reasons, "report_seq": report.as_ref().map(|r| r.seq) }),
                );
            }
        }
        // No report (first judged after a restart): keep the last stored evaluation.
        if report.is_none() {
            return;
        }
        let store = self.store.clone();
        let report = serde_json::to_value(&report).unwrap_or(serde_json::Value::Null);
        let evaluation =
            serde_json::to_value(&change.evaluations).unwrap_or(serde_json::Value::Null);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.save_posture(id, &report, &evaluation, now_ms()) {
                error!(device = %id, error = %e, "saving posture failed");
            }
        });
    }

    fn quarantine(&self, id: DeviceId, reason: String) {
        warn!(device = %id, %reason, "quarantining device automatically");
        let store = self.store.clone();
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let q = Quarantine {
                since_ms: now_ms(),
                reason,
                automatic: true,
            };
            match store.set_quarantine(id, Some(&q), "coordinator", now_ms()) {
                Ok(dev) => {
                    let _ = events.send(Event::Upserted(dev));
                }
                Err(e) => error!(device = %id, error = %e, "storing a quarantine failed"),
            }
        });
    }
}

fn flush(
    reg: &mut Registry,
    conns: &mut HashMap<ConnId, mpsc::Sender<ConnCmd>>,
    sink: &mut TrustSink<'_>,
) {
    let mut changed = false;
    {
        while let Some(out) = reg.poll_output() {
            match out {
                Output::Send { conn, msg } => {
                    let Some(tx) = conns.get(&conn) else { continue };
                    if tx.try_send(ConnCmd::Send(wire::encode(&msg))).is_err() {
                        warn!(conn, "control connection is not keeping up; closing it");
                        let _ = tx.try_send(ConnCmd::Close(ErrorCode::Internal, "too slow".into()));
                        conns.remove(&conn);
                    }
                }
                Output::Close { conn, code, reason } => {
                    if let Some(tx) = conns.remove(&conn) {
                        let _ = tx.try_send(ConnCmd::Close(code, reason));
                    }
                }
                Output::PostureChanged {
                    device,
                    change,
                    report,
                } => {
                    changed = true;
                    sink.posture_changed(device, change, report);
                }
                Output::Quarantine { device, reason } => sink.quarantine(device, reason),
            }
        }
    }
    // Every peer's netmap change is queued on its connection now.
    if let Some(t) = sink.received.take() {
        if changed {
            if sink.stats.enforce_us.len() >= 1000 {
                sink.stats.enforce_us.pop_front();
            }
            sink.stats
                .enforce_us
                .push_back(t.elapsed().as_micros() as u64);
        }
    }
}

fn conns_online(reg: &Registry) -> Vec<DeviceId> {
    reg.online_ids()
}

/// Reads the next frame; `Ok(None)` at a clean end of stream.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
) -> Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(Some(f));
        }
        let want = dec.wanted().min(buf.len());
        match recv.read(&mut buf[..want]).await? {
            Some(n) => dec.push(&buf[..n]),
            None => {
                dec.finish()?;
                return Ok(None);
            }
        }
    }
}

async fn send_msg(send: &mut quinn::SendStream, msg: &CoordinatorMsg) -> Result<()> {
    send.write_all(&wire::encode(msg)).await?;
    Ok(())
}

async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: String,
) {
    let _ = send_msg(
        send,
        &CoordinatorMsg::Error {
            code,
            message: message.clone(),
        },
    )
    .await;
    let _ = send.finish();
    // Give the frame a moment to leave before the close discards it.
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    conn.close(1u32.into(), message.as_bytes());
}

async fn handle_connection(inc: quinn::Incoming, ctx: Arc<Ctx>) -> Result<()> {
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, inc)
        .await
        .context("handshake timed out")??;
    let remote = conn.remote_address();
    let certs = conn.peer_identity().and_then(|a| {
        a.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let (mut send, mut recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .context("device opened no control stream")??;
    let mut dec = FrameDecoder::new(MAX_DEVICE_FRAME);
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut recv, &mut dec)).await
    {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            warn!(%remote, error = %format!("{e:#}"), "bad frame on control stream");
            refuse(
                &conn,
                &mut send,
                ErrorCode::Protocol,
                format!("bad frame: {e:#}"),
            )
            .await;
            return Ok(());
        }
        Err(_) => {
            refuse(
                &conn,
                &mut send,
                ErrorCode::Protocol,
                "no message within 10 s".into(),
            )
            .await;
            return Ok(());
        }
    };
    let msg = match wire::decode::<DeviceMsg>(&first) {
        Ok(m) => m,
        Err(e) => {
            warn!(%remote, error = %e, "undecodable first message");
            refuse(&conn, &mut send, ErrorCode::Protocol, e.to_string()).await;
            return Ok(());
        }
    };
    match (certs.as_ref().and_then(|c| c.first()), msg) {
        (None, DeviceMsg::Enroll(req)) => {
            let reply = enroll(&ctx, req, remote).await;
            match reply {
                Ok(enrolled) => {
                    send_msg(&mut send, &CoordinatorMsg::Enrolled(enrolled)).await?;
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                }
                Err((code, message)) => refuse(&conn, &mut send, code, message).await,
            }
            Ok(())
        }
        (Some(cert), DeviceMsg::Hello(hello)) => {
            let cert = cert.to_vec();
            session(ctx, conn, send, recv, dec, &cert, hello).await
        }
        (None, _) => {
            refuse(
                &conn,
                &mut send,
                ErrorCode::Unauthorized,
                "this connection has no device certificate; only enrollment is possible".into(),
            )
            .await;
            Ok(())
        }
        (Some(_), _) => {
            refuse(
                &conn,
                &mut send,
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
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut dec: FrameDecoder,
    cert: &[u8],
    hello: wire::Hello,
) -> Result<()> {
    let remote = conn.remote_address();
    let Some(identity) = cert_identity(cert) else {
        refuse(
            &conn,
            &mut send,
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
                &conn,
                &mut send,
                ErrorCode::Unauthorized,
                "this certificate belongs to no enrolled device".into(),
            )
            .await;
            return Ok(());
        }
        Err(e) => {
            error!(%remote, error = %e, "device lookup failed; refusing");
            refuse(
                &conn,
                &mut send,
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
        refuse(&conn, &mut send, ErrorCode::DeviceRevoked, why.to_string()).await;
        return Ok(());
    }
    if hello.protocol != PROTOCOL_VERSION {
        refuse(
            &conn,
            &mut send,
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
                &conn,
                &mut send,
                code,
                "the device is not allowed on the network".into(),
            )
            .await;
            return Ok(());
        }
        Err(_) => return Ok(()),
    }
    info!(device = %id, hostname = %dev.hostname, %remote, "device connected");
    let result: Result<()> = async {
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(ConnCmd::Send(bytes)) => send.write_all(&bytes).await?,
                    Some(ConnCmd::Close(code, reason)) => {
                        info!(device = %id, ?code, %reason, "closing device session");
                        refuse(&conn, &mut send, code, reason).await;
                        return Ok(());
                    }
                    None => return Ok(()),
                },
                frame = read_frame(&mut recv, &mut dec) => {
                    let Some(frame) = (match frame {
                        Ok(f) => f,
                        Err(e) => {
                            warn!(device = %id, error = %format!("{e:#}"), "bad frame from device");
                            refuse(&conn, &mut send, ErrorCode::Protocol, format!("bad frame: {e:#}")).await;
                            return Ok(());
                        }
                    }) else { return Ok(()) };
                    let msg = match wire::decode::<DeviceMsg>(&frame) {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(device = %id, error = %e, "undecodable message from device");
                            refuse(&conn, &mut send, ErrorCode::Protocol, e.to_string()).await;
                            return Ok(());
                        }
                    };
                    match msg {
                        DeviceMsg::Update(u) => {
                            touch(&ctx, id, &u);
                            let _ = ctx.events.send(Event::Update { id, conn: conn_id, update: u });
                        }
                        DeviceMsg::Ping { nonce } => {
                            send_msg(&mut send, &CoordinatorMsg::Pong { nonce, coordinator_time_ms: now_ms() }).await?;
                        }
                        DeviceMsg::RenewCert { csr_der } => {
                            match renew(&ctx, id, identity, &csr_der.0).await {
                                Ok((cert_der, not_after_ms)) => send_msg(&mut send, &CoordinatorMsg::CertRenewed { cert_der: Bytes(cert_der), not_after_ms }).await?,
                                Err(e) => {
                                    warn!(device = %id, error = %format!("{e:#}"), "certificate renewal refused");
                                    send_msg(&mut send, &CoordinatorMsg::Error { code: ErrorCode::BadRequest, message: format!("renewal refused: {e:#}") }).await?;
                                }
                            }
                        }
                        DeviceMsg::LeaseRequest { wg_public_key } => {
                            match issue_lease(&ctx, dev.id, wg_public_key).await {
                                Ok(lease) => send_msg(&mut send, &CoordinatorMsg::Lease { lease }).await?,
                                Err((code, message)) => {
                                    warn!(device = %id, ?code, %message, "lease refused");
                                    refuse(&conn, &mut send, code, message).await;
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
                        DeviceMsg::DeniedFlows { mut flows } => {
                            flows.truncate(wire::MAX_DENIED_FLOWS);
                            let _ = ctx.events.send(Event::DeniedFlows(id, flows));
                        }
                        DeviceMsg::Enroll(_) | DeviceMsg::Hello(_) => {
                            refuse(&conn, &mut send, ErrorCode::Protocol, "unexpected message on an established session".into()).await;
                            return Ok(());
                        }
                    }
                }
                _ = conn.closed() => return Ok(()),
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

async fn bind_admin(dd: &DataDir) -> Result<tokio::net::UnixListener> {
    let path = dd.admin_socket();
    if path.exists() {
        // A live coordinator answers; a dead one left a stale socket behind.
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            anyhow::bail!(
                "another coordinator is already serving {}",
                dd.path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn admin_loop(l: tokio::net::UnixListener, ctx: Arc<Ctx>) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Only the coordinator's own user (or root) may administer it.
            let me = unsafe_free_geteuid();
            match stream.peer_cred() {
                Ok(c) if c.uid() == me || c.uid() == 0 => {}
                _ => {
                    warn!("admin connection from another user refused");
                    return;
                }
            }
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let resp = match BufReader::new(r)
                .take(MAX_ADMIN_LINE as u64)
                .read_line(&mut line)
                .await
            {
                Ok(_) => match serde_json::from_str::<AdminRequest>(&line) {
                    Ok(req) => admin_handle(&ctx, req).await,
                    Err(e) => AdminResponse::err(format!("bad admin request: {e}")),
                },
                Err(e) => AdminResponse::err(format!("reading admin request: {e}")),
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

fn unsafe_free_geteuid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The process's own /proc entry is owned by its effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

async fn admin_handle(ctx: &Arc<Ctx>, req: AdminRequest) -> AdminResponse {
    let ctx2 = ctx.clone();
    let snap = {
        let (tx, rx) = oneshot::channel();
        let _ = ctx.events.send(Event::Snapshot(tx));
        match rx.await {
            Ok(s) => s,
            Err(_) => return AdminResponse::err("the coordinator is shutting down"),
        }
    };
    if let AdminRequest::DeviceRotate { name: n } = &req {
        return match rotate_device(ctx, n).await {
            Ok(v) => AdminResponse::ok(v),
            Err(e) => AdminResponse::err(format!("{e:#}")),
        };
    }
    let res = tokio::task::spawn_blocking(move || admin_blocking(&ctx2, req, &snap)).await;
    match res {
        Ok(Ok(v)) => AdminResponse::ok(v),
        Ok(Err(e)) => AdminResponse::err(format!("{e:#}")),
        Err(e) => AdminResponse::err(format!("internal error: {e}")),
    }
}

/// `device rotate`: the device makes a new key now; its current leases stop being renewed.
async fn rotate_device(ctx: &Arc<Ctx>, n: &str) -> Result<serde_json::Value> {
    let store = ctx.store.clone();
    let name = n.to_string();
    let d = tokio::task::spawn_blocking(move || store.device_by_name(&name)).await??;
    anyhow::ensure!(d.is_live(), "device {n:?} is not active");
    let (tx, rx) = oneshot::channel();
    let _ = ctx.events.send(Event::Rotate(
        d.id,
        "rotation requested by an administrator".into(),
        tx,
    ));
    let online = rx.await.unwrap_or(false);
    let store = ctx.store.clone();
    let hostname = d.hostname.to_string();
    tokio::task::spawn_blocking(move || {
        store.append_audit(
            Audit {
                actor: "admin",
                action: Action::DeviceRotate,
                target: &hostname,
                detail: serde_json::json!({ "online": online }),
            },
            now_ms(),
        )
    })
    .await??;
    if !online {
        anyhow::bail!(
            "device {n:?} is not connected; it will get a fresh key and lease when it reconnects"
        );
    }
    Ok(serde_json::json!({ "device": n, "rotating": true }))
}

fn name(kind: &'static str, s: &str) -> Result<Name> {
    Ok(Name::parse(kind, s)?)
}

fn names(kind: &'static str, s: &[String]) -> Result<Vec<Name>> {
    s.iter().map(|x| name(kind, x)).collect()
}

fn device_json(d: &Device, online: &[DeviceId], leases: &LeaseInfo) -> serde_json::Value {
    let mut v = serde_json::to_value(d).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        let mine: Vec<&LeaseRow> = leases
            .active
            .iter()
            .filter(|l| l.device_id == d.id)
            .collect();
        o.insert(
            "lease_expires_ms".into(),
            mine.iter().map(|l| l.not_after_ms).max().into(),
        );
        o.insert(
            "lease_serial".into(),
            mine.iter().map(|l| l.serial).max().into(),
        );
        o.insert(
            "lease_key".into(),
            mine.iter()
                .max_by_key(|l| l.serial)
                .map(|l| l.wg_public_key.to_base64())
                .into(),
        );
        o.insert(
            "rotations".into(),
            leases
                .counts
                .get(&d.id)
                .map(|c| (c - 1).max(0))
                .unwrap_or(0)
                .into(),
        );
        o.insert("online".into(), online.contains(&d.id).into());
        o.insert("id".into(), d.id.to_string().into());
        o.insert("state".into(), d.state().as_str().into());
    }
    v
}

struct LeaseInfo {
    active: Vec<LeaseRow>,
    counts: std::collections::BTreeMap<DeviceId, i64>,
}

fn admin_blocking(ctx: &Arc<Ctx>, req: AdminRequest, snap: &Snap) -> Result<serde_json::Value> {
    let now = now_ms();
    let store = &ctx.store;
    let online = snap.online.as_slice();
    let leases = || -> Result<LeaseInfo> {
        Ok(LeaseInfo {
            active: store.active_leases(now)?,
            counts: store.lease_counts()?,
        })
    };
    let actor = "admin";
    Ok(match req {
        AdminRequest::Status => serde_json::json!({
            "public_addr": ctx.config.public_addr,
            "ca_sha256": hex::encode(ctx.ca.fingerprint()),
            "ipv6_prefix": format!("{}/48", ctx.config.pools.v6_prefix),
            "devices": store.list_devices()?.len(),
            "online": online.len(),
            "users": store.list_users()?.len(),
            "uptime_secs": ctx.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": PROTOCOL_VERSION,
            "posture": snap.trust.json(),
        }),
        AdminRequest::UserAdd { name: n, groups } => {
            let n = name("user name", &n)?;
            let groups = groups
                .iter()
                .map(|g| name("group name", g))
                .collect::<Result<Vec<_>>>()?;
            let u = store.add_user(&n, &groups, actor, now)?;
            let _ = ctx.events.send(Event::User(u.clone()));
            serde_json::to_value(u)?
        }
        AdminRequest::UserLs => serde_json::to_value(store.list_users()?)?,
        AdminRequest::UserDisable { name: n } => set_user(ctx, &n, true, now)?,
        AdminRequest::UserEnable { name: n } => set_user(ctx, &n, false, now)?,
        AdminRequest::TokenCreate {
            user,
            tags,
            ttl_secs,
            uses,
        } => {
            if ttl_secs == 0 || ttl_secs > 90 * 86400 {
                anyhow::bail!("--ttl must be between 1s and 90d");
            }
            let user = user.map(|u| name("user name", &u)).transpose()?;
            let tags = tags
                .iter()
                .map(|t| name("tag", t))
                .collect::<Result<Vec<_>>>()?;
            let mut id = [0u8; 8];
            let mut secret = vec![0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
            let tok = EnrollToken {
                coordinator: ctx.config.public_addr.clone(),
                ca_sha256: ctx.ca.fingerprint(),
                id,
                secret: ward_shared::secret::Secret::new(secret.clone()),
            };
            let info = store.create_token(
                TokenSpec {
                    id: &tok.id_hex(),
                    secret_hash: hash_secret(&secret),
                    user: user.as_ref(),
                    tags: &tags,
                    expires_ms: now + ttl_secs as i64 * 1000,
                    uses,
                },
                actor,
                now,
            )?;
            serde_json::json!({ "token": tok.encode(), "info": info })
        }
        AdminRequest::TokenLs => serde_json::to_value(store.list_tokens()?)?,
        AdminRequest::TokenRevoke { id } => {
            serde_json::to_value(store.revoke_token(&id, actor, now)?)?
        }
        AdminRequest::DeviceLs => {
            let li = leases()?;
            serde_json::Value::Array(store.list_devices()?.iter().map(|d| device_json(d, online, &li)).collect())
        }
        AdminRequest::DeviceShow { name: n } => {
            let d = store.device_by_name(&n)?;
            let mut v = device_json(&d, online, &leases()?);
            let (tx, rx) = oneshot::channel();
            let _ = ctx.events.send(Event::TrustView(d.id, tx));
            let (report, verdict) = rx
                .blocking_recv()
                .map_err(|_| anyhow::anyhow!("the coordinator is shutting down"))?;
            if let Some(o) = v.as_object_mut() {
                o.insert("posture".into(), serde_json::to_value(&verdict)?);
                o.insert("posture_report".into(), serde_json::to_value(&report)?);
                if report.is_none() {
                    // After a restart, the last stored evaluation until the device reports.
                    if let Some((r, e, at)) = store.posture(d.id)? {
                        o.insert("stored_posture".into(), json!({ "report": r, "evaluation": e, "at_ms": at }));
                    }
                }
            }
            v
        }
        AdminRequest::DeviceQuarantine { name: n, reason } => {
            let d = store.device_by_name(&n)?;
            anyhow::ensure!(d.is_live(), "device {n:?} is not active");
            let q = Quarantine {
                since_ms: now,
                reason: reason.unwrap_or_else(|| "quarantined by an administrator".into()),
                automatic: false,
            };
            let d = store.set_quarantine(d.id, Some(&q), actor, now)?;
            let _ = ctx.events.send(Event::Upserted(d.clone()));
            device_json(&d, online, &leases()?)
        }
        AdminRequest::DeviceRelease { name: n } => {
            let d = store.device_by_name(&n)?;
            anyhow::ensure!(d.quarantine.is_some(), "device {n:?} is not quarantined");
            let d = store.set_quarantine(d.id, None, actor, now)?;
            let _ = ctx.events.send(Event::Upserted(d.clone()));
            device_json(&d, online, &leases()?)
        }
        AdminRequest::DeviceRevoke { name: n } => {
            let d = store.revoke_device(&n, actor, now)?;
            let _ = ctx.events.send(Event::Removed(
                d.id,
                "the device has been revoked by an administrator".into(),
            ));
            info!(device = %d.id, hostname = %d.hostname, "device revoked");
            device_json(&d, &[], &leases()?)
        }
        AdminRequest::DeviceTag { name: n, add, remove } => {
            let add = names("tag", &add)?;
            let remove = names("tag", &remove)?;
            let d = store.edit_device_tags(&n, &add, &remove, actor, now)?;
            let _ = ctx.events.send(Event::Upserted(d.clone()));
            serde_json::json!({ "device": n, "tags": d.tags })
        }
        AdminRequest::UserGroups { name: n, add, remove } => {
            let user = name("user name", &n)?;
            let add = names("group name", &add)?;
            let remove = names("group name", &remove)?;
            let u = store.edit_user_groups(&user, &add, &remove, actor, now)?;
            let _ = ctx.events.send(Event::User(u.clone()));
            serde_json::json!({ "user": n, "groups": u.groups })
        }
        AdminRequest::PolicyCheck { file_name, content_b64 } => policy_check(ctx, snap, &file_name, &content_b64, false, now)?,
        AdminRequest::PolicyApply { file_name, content_b64 } => policy_check(ctx, snap, &file_name, &content_b64, true, now)?,
        AdminRequest::PolicyShow => match store.current_policy()? {
            Some(v) => serde_json::json!({ "version": v.version, "text": v.text, "created_ms": v.created_ms, "sha256": v.sha256 }),
            None => serde_json::json!({ "version": null, "text": null }),
        },
        AdminRequest::PolicyHistory => serde_json::Value::Array(
            store
                .policy_history()?
                .into_iter()
                .map(|v| serde_json::json!({ "version": v.version, "created_ms": v.created_ms, "actor": v.actor, "sha256": v.sha256, "summary": v.summary }))
                .collect(),
        ),
        AdminRequest::PolicyExplain { src, dst } => {
            let empty;
            let p = match &snap.policy {
                Some(p) => p,
                None => {
                    empty = policy::parse(b"", "no policy").map_err(|e| anyhow::anyhow!("{e}"))?;
                    &empty
                }
            };
            let e = policy::explain(p, &snap.directory, &src, &dst, now).map_err(|e| anyhow::anyhow!("{e}"))?;
            serde_json::json!({
                "allowed": e.allowed,
                "src": e.src,
                "dst": e.dst,
                "target": e.target,
                "devices": e.devices.iter().map(|d| serde_json::json!({
                    "src": d.src_hostname, "dst": d.dst_hostname, "allowed": d.allowed,
                    "allowed_by": d.allowed_by.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
                    "misses": d.misses.iter().map(|m| serde_json::json!({ "rule": m.rule, "reasons": m.reasons })).collect::<Vec<_>>(),
                    "blocked": d.blocked,
                })).collect::<Vec<_>>(),
                "notes": e.notes,
                "text": e.to_string(),
            })
        }
        AdminRequest::GrantAdd { from, to, for_secs, reason } => {
            anyhow::ensure!((1..=7 * 86400).contains(&for_secs), "--for must be between 1s and 7d");
            let p = snap.policy.as_ref().ok_or_else(|| anyhow::anyhow!("no policy is applied, so there is no service {to:?} to grant"))?;
            anyhow::ensure!(p.services.contains_key(&to), "the policy has no service named {to:?}");
            let principal = match from.strip_prefix("device:") {
                Some(host) => {
                    store.device_by_name(host)?;
                    from.clone()
                }
                None => {
                    let n = name("user name", &from)?;
                    anyhow::ensure!(store.list_users()?.iter().any(|u| u.name == n.as_str()), "no user named {from:?} (use device:NAME for a device)");
                    from.clone()
                }
            };
            let reason = reason.map(|r| r.chars().filter(|c| !c.is_control()).take(200).collect::<String>());
            let mut idb = [0u8; 6];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut idb);
            let g = GrantRow {
                id: format!("g{}", hex::encode(idb)),
                principal,
                service: to,
                not_after_ms: now + for_secs as i64 * 1000,
                reason,
                actor: actor.to_string(),
                created_ms: now,
            };
            store.add_grant(&g, now)?;
            let _ = ctx.events.send(Event::Grants(store.active_grants(now)?.iter().map(grant_of).collect()));
            serde_json::to_value(&g)?
        }
        AdminRequest::GrantLs => serde_json::to_value(store.active_grants(now)?)?,
        AdminRequest::GrantRm { id } => {
            let g = store.remove_grant(&id, actor, now)?;
            let _ = ctx.events.send(Event::Grants(store.active_grants(now)?.iter().map(grant_of).collect()));
            serde_json::to_value(&g)?
        }
        AdminRequest::DeviceRotate { .. } => anyhow::bail!("device rotate is handled asynchronously"),
        AdminRequest::Audit { limit } => {
            serde_json::to_value(store.audit_log(limit.clamp(1, 100_000))?)?
        }
        AdminRequest::AuditVerify => serde_json::to_value(store.verify_audit()?)?,
    })
}

/// `policy check` / `policy apply`: parse, compile against the live directory, run the tests;
/// on apply (and only if all of that passes) store a new version and push it.
fn policy_check(
    ctx: &Arc<Ctx>,
    snap: &Snap,
    file_name: &str,
    content_b64: &str,
    apply: bool,
    now: i64,
) -> Result<serde_json::Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(content_b64)
        .map_err(|_| anyhow::anyhow!("policy content is not valid base64"))?;
    let refuse = |msg: String, tests: serde_json::Value| -> Result<serde_json::Value> {
        if apply {
            ctx.store.append_audit(
                Audit {
                    actor: "admin",
                    action: Action::PolicyRefused,
                    target: file_name,
                    detail: serde_json::json!({ "reason": msg }),
                },
                now,
            )?;
            warn!(file = file_name, reason = %msg, "policy refused");
        }
        Ok(
            serde_json::json!({ "ok": false, "message": msg, "tests": tests, "warnings": [], "changes": [] }),
        )
    };
    let p = match policy::parse(&bytes, file_name) {
        Ok(p) => p,
        Err(e) => return refuse(e.to_string(), serde_json::json!([])),
    };
    let warnings: Vec<String> = policy::warnings(&p, &snap.directory)
        .iter()
        .map(|w| w.to_string())
        .collect();
    // Access as it would be: every device's latest posture judged by this policy's requirements.
    let dir = {
        let (tx, rx) = oneshot::channel();
        let _ = ctx
            .events
            .send(Event::DirectoryFor(Box::new(p.clone()), tx));
        rx.blocking_recv()
            .map_err(|_| anyhow::anyhow!("the coordinator is shutting down"))?
    };
    let compiled = policy::compile(&p, &dir, now);
    let outcomes = policy::run_tests(&p, &dir, now);
    let failed = outcomes.iter().filter(|t| !t.pass).count();
    let tests: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|t| {
            serde_json::json!({
                "pass": t.pass,
                "text": format!("{}: {} -> {} expected {}, got {}: {}", t.pos, t.from, t.target,
                    if t.expect_allow { "allow" } else { "deny" }, if t.allowed { "allow" } else { "deny" }, t.why),
            })
        })
        .collect();
    if failed > 0 {
        return refuse(
            format!(
                "{failed} of {} policy tests failed; nothing was applied",
                outcomes.len()
            ),
            serde_json::Value::Array(tests),
        );
    }
    let changes: Vec<String> = policy::diff(&snap.compiled, &compiled, &dir)
        .iter()
        .map(|c| c.to_string())
        .collect();
    let mut out = serde_json::json!({
        "ok": true,
        "message": "policy is valid and its tests pass",
        "tests": tests,
        "warnings": warnings,
        "changes": changes,
        "devices": compiled.devices.len(),
    });
    if apply {
        let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("policy is not UTF-8"))?;
        let sha = hex::encode(sha2::Sha256::digest(text.as_bytes()));
        let summary = if changes.is_empty() {
            "no access changes".to_string()
        } else {
            changes.join("; ")
        };
        let version = ctx.store.save_policy(&text, &sha, &summary, "admin", now)?;
        let _ = ctx.events.send(Event::Policy(p));
        info!(version, changes = changes.len(), "policy applied");
        out["version"] = version.into();
    }
    Ok(out)
}

fn set_user(ctx: &Arc<Ctx>, n: &str, disabled: bool, now: i64) -> Result<serde_json::Value> {
    let n = name("user name", n)?;
    let ids = ctx.store.set_user_disabled(&n, disabled, "admin", now)?;
    if let Some(u) = ctx
        .store
        .list_users()?
        .into_iter()
        .find(|u| u.name == n.as_str())
    {
        let _ = ctx.events.send(Event::User(u));
    }
    for id in &ids {
        if let Ok(d) = ctx.store.device(*id) {
            let _ = ctx.events.send(Event::Upserted(d));
        }
    }
    Ok(serde_json::json!({ "user": n.as_str(), "disabled": disabled, "devices": ids.len() }))
}
