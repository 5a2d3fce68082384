//! `ward-coordinator serve`: the tokio driver around [`crate::registry::Registry`] and the store.
//!
//! Tasks: a QUIC accept loop and a TLS-over-TCP accept loop on the same port number (one task
//! per connection), the registry actor (owns the core, fans its outputs out to connection
//! tasks), and the admin socket.
//!
//! - [`link`]: one connection's frame stream and its close, over QUIC or TLS/TCP; the TCP side
//!   serves devices on networks that drop UDP, with the same certificates, client-certificate
//!   check and ALPNs as QUIC.
//! - [`session`]: the device protocol (enrollment, the session loop, relay tickets).
//! - [`relay`]: relay control sessions (same port, ALPN `ward-relay-control/1`); the
//!   connection's negotiated ALPN picks the protocol.
//! - [`actor`]: the registry actor; [`effects`]: its trust and audit side effects.
//! - The admin socket is [`crate::admin::socket`]; its requests run [`crate::admin::ops`] here
//!   through [`LiveRegistry`].

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use ward_runtime::rpc::Envelope;
use ward_shared::policy::{self, Directory, Policy};
use ward_shared::posture::PostureReport;
use ward_shared::relay::RELAY_CONTROL_ALPN;
use ward_shared::wire::{self, DeviceId, PostureVerdict};

use crate::admin::api::AdminReply;
use crate::admin::ops::{self, Identity, Live, Notice, Snapshot};
use crate::admin::{socket, AdminRequest};
use crate::audit::Action;
use crate::datadir::{Config, DataDir};
use crate::pki::Ca;
use crate::registry::Registry;
use crate::store::{Audit, SqliteStore, Store};
use actor::Event;

mod actor;
mod effects;
mod link;
mod login_code;
pub mod oidc;
mod queue;
mod relay;
mod replica;
mod resign;
mod session;
mod touches;
mod udp;

pub use replica::{FeedWake, FEED_POLL, FEED_POLL_NOTIFIED};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC handshakes in progress from which a connection attempt must first prove its source
/// address: it gets a stateless Retry (no connection state, no key exchange, no signature)
/// and is accepted when it comes back with the token. A device's QUIC stack answers a Retry
/// on its own, at the cost of one round trip; a flood from spoofed addresses then holds no
/// state at all. Nobody is refused: attempts from proven addresses are accepted whatever the
/// number in progress.
const RETRY_ABOVE_HANDSHAKES: u64 = 256;
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the devices whose sessions the process before this one held are shown online to
/// their peers while they reconnect (`Registry::presume_online`): devices notice a restart
/// within seconds, but thousands reconnecting take a minute or two here; one that does not
/// come back goes offline then.
const PRESENCE_GRACE: Duration = Duration::from_secs(120);
/// Frames queued for one slow connection before it is dropped.
const CONN_QUEUE: usize = 256;

/// Bytes a device may have in flight to the coordinator, on its stream and in all: four of
/// its largest frames (`wire::MAX_DEVICE_FRAME`, 64 KiB).
const CONTROL_RECEIVE_WINDOW: u32 = 4 * wire::MAX_DEVICE_FRAME as u32;
/// Bytes the coordinator keeps unacknowledged per connection: 2 MiB, a few full netmaps of a
/// device with hundreds of peers (a larger frame still goes out, in window-sized steps).
const CONTROL_SEND_WINDOW: u64 = 2 * 1024 * 1024;
/// Enrollment transactions at once (the store serialises them anyway; more only queue).
const ENROLL_SLOTS: usize = 4;

/// Kernel send and receive buffers of the QUIC control socket (beyond `net.core.rmem_max`
/// where the process may).
const CONTROL_SOCKET_BUFFER: libc::c_int = 4 << 20;

/// TLS-over-TCP connections at once (handshaking or in session); more are closed at accept.
const MAX_TCP_CONNECTIONS: usize = 16_384;

pub use ward_runtime::now_ms;

pub use crate::leases::LeaseTtl;

struct Ctx {
    config: Config,
    /// The data directory (`addrs set` rewrites its config.json).
    data_dir: DataDir,
    /// The coordinator addresses tokens and netmaps carry now (first = dialled first):
    /// `config`'s list until an `addrs set` replaces it (held only to read or swap).
    addrs: std::sync::RwLock<Vec<String>>,
    ca: Ca,
    lease_key: ed25519_dalek::SigningKey,
    lease_ttl: LeaseTtl,
    store: Arc<dyn Store>,
    /// The registry actor's inbox (connection events bounded; see [`queue`]).
    events: queue::Events,
    next_conn: AtomicU64,
    started: Instant,
    /// Relay tickets (signing is quick: held only for one `issue`).
    tickets: std::sync::Mutex<crate::tickets::TicketIssuer>,
    /// Per-source rate limits and refusal aggregation for unauthenticated attempts (held only
    /// for one call).
    gate: std::sync::Mutex<crate::gate::EnrollGate>,
    /// Each device's message limits across its sessions, and how often it may open one (held
    /// only for one call).
    device_limits: std::sync::Mutex<crate::limits::DeviceLimits>,
    /// Enrollment database jobs in flight at once, whatever the number of sources.
    enroll_slots: tokio::sync::Semaphore,
    /// Flow records older than this are not stored and are pruned.
    flow_retention_ms: i64,
    /// Counters for `--metrics-listen`.
    metrics: crate::metrics::Counters,
    /// The web console, when `--console-listen` is set (it answers `console-link`).
    console: std::sync::OnceLock<Arc<crate::console::Console>>,
    /// The OpenID provider people sign in with (`--oidc-issuer`).
    oidc: Option<Arc<crate::oidc::provider::Provider>>,
    /// This replica's id (`replica.id` in its data directory).
    replica_id: String,
    /// Device contact waiting to be written in one batch ([`touches`]).
    touches: Arc<touches::Touches>,
}

/// Flow record retention when `serve --flow-retention` does not say.
pub const DEFAULT_FLOW_RETENTION_MS: i64 = 30 * 86_400_000;

/// `serve`: the QUIC/TCP control listener on `listen` (default: the public address's port),
/// and Prometheus metrics on `metrics_listen` when given; `feed_notify` turns the PostgreSQL
/// change feed's `LISTEN` wake-up on.
// One parameter per `serve` flag group, passed straight from the CLI.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    dd: DataDir,
    listen: Option<SocketAddr>,
    lease_ttl: LeaseTtl,
    metrics_listen: Option<SocketAddr>,
    console_listen: Option<SocketAddr>,
    flow_retention_ms: i64,
    peers_on_demand_above: usize,
    oidc: Option<oidc::OidcServe>,
    feed_notify: bool,
) -> Result<()> {
    let config = dd.load_config()?;
    let provider = match &oidc {
        Some(o) => Some(Arc::new(crate::oidc::provider::Provider::new(
            o.cfg.clone(),
        )?)),
        None => None,
    };
    let ca = dd.load_ca()?;
    let lease_key = dd.load_lease_key()?;
    let sqlite = Arc::new(dd.open_store(now_ms())?);
    let store: Arc<dyn Store> = sqlite.clone();
    let socket = match listen {
        Some(l) => ward_runtime::net::bind_udp(l)
            .with_context(|| format!("binding the QUIC control listener on {l}"))?,
        None => {
            let port = public_port(&config.public_addr)?;
            let bound = ward_runtime::net::bind_udp_dual_stack(port)
                .with_context(|| format!("binding the QUIC control listener on port {port}"))?;
            if let Some(e) = &bound.ipv4_only_because {
                info!(error = %e, "IPv6 unavailable on this host: listening on IPv4 only");
            }
            bound.socket
        }
    };
    let listen = socket.local_addr()?;
    // Every device's handshakes, keepalives and reconnections arrive on this one socket: the
    // kernel's default buffer (about 200 KB) overflows in a wave of thousands while the
    // endpoint's task waits for a CPU, and each handshake packet dropped costs its device a
    // retransmission timeout (a second or more), so a wave takes longer and comes back.
    if let Err(e) = ward_runtime::net::set_socket_buffers(&socket, CONTROL_SOCKET_BUFFER) {
        info!(error = %e, "the control socket keeps the kernel's default buffers");
    }
    // TCP on the same port number, for devices on networks that drop UDP.
    let tcp = match listen {
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            let bound =
                ward_runtime::net::bind_tcp_dual_stack(listen.port()).with_context(|| {
                    format!("binding the TCP control listener on port {}", listen.port())
                })?;
            if let Some(e) = &bound.ipv4_only_because {
                info!(error = %e, "IPv6 unavailable for TCP: listening on IPv4 only");
            }
            bound.listener
        }
        _ => ward_runtime::net::bind_tcp(listen)
            .with_context(|| format!("binding the TCP control listener on {listen}"))?,
    };
    let tcp = tokio::net::TcpListener::from_std(tcp).context("registering the TCP listener")?;
    // The feed position before the registry is read: a write in between is applied twice
    // (harmless), never missed.
    let feed_version = store.feed_version()?;
    let replica_id = dd.replica_id()?;
    // Users an older coordinator disabled for the provider become provider-suspended (the
    // suspension below keeps their access cut; a new sign-in or the provider lifts it). On
    // failure they simply stay disabled (closed).
    match store.repair_provider_disabled("repair", now_ms()) {
        Ok(users) if !users.is_empty() => {
            tracing::warn!(?users, "users disabled by the identity provider under an older coordinator are now suspended by the provider instead");
        }
        Ok(_) => {}
        Err(e) => {
            error!(error = %e, "repairing provider-disabled users failed; they stay disabled")
        }
    }
    let devices = store.list_devices()?;
    let users = store.list_users()?;
    let now = now_ms();
    let mut current_version = None;
    let current = match store.current_policy()? {
        None => {
            info!("no policy applied yet: everything is denied until `policy apply`");
            None
        }
        Some(v) => match policy::parse(
            v.text.as_bytes(),
            &crate::admin::policy::stored_name(v.version),
        ) {
            Ok(p) => {
                current_version = u64::try_from(v.version).ok();
                Some(p)
            }
            Err(e) => {
                // Fail closed: a stored policy that no longer parses allows nothing.
                error!(version = v.version, error = %e, "stored policy does not parse; denying everything until a valid policy is applied");
                None
            }
        },
    };
    let grants = ops::active_grants(store.as_ref(), now)?;
    let by_id: std::collections::BTreeMap<DeviceId, &crate::model::Device> =
        devices.iter().map(|d| (d.id, d)).collect();
    let leases: Vec<_> = store
        .active_leases(now)?
        .into_iter()
        .filter_map(|row| crate::leases::sign_row(&lease_key, |id| by_id.get(&id).copied(), row))
        .collect();
    drop(by_id);
    let seen = replica::Seen::new(
        &devices,
        current_version.and_then(|v| i64::try_from(v).ok()),
        &leases,
    );
    let mut registry = Registry::new(config.pools, devices, users, current, grants, leases, now);
    // The sessions table still names this replica for the sessions its previous process held
    // when it ended (a closed session's row is released). Unreadable, nobody is presumed.
    let held_before: Vec<DeviceId> = match store.sessions() {
        Ok(rows) => rows
            .into_iter()
            .filter(|r| r.replica == replica_id)
            .map(|r| r.device)
            .collect(),
        Err(e) => {
            warn!(error = %e, "reading the sessions table failed: no device is presumed online");
            Vec::new()
        }
    };
    if !held_before.is_empty() {
        info!(devices = held_before.len(), grace = ?PRESENCE_GRACE, "devices that held sessions before this start are shown online while they reconnect");
    }
    registry.presume_online(held_before, PRESENCE_GRACE.as_millis() as i64);
    registry.handle_policy_version(current_version);
    registry.set_dns_domain(config.dns_domain.clone());
    registry.set_coordinators(config.public_addrs());
    registry.set_peers_on_demand_above(peers_on_demand_above);
    registry.handle_relays(ops::relays(store.as_ref())?);
    // What the behaviour detector learned before this start (anomalies of the last 30 days).
    let anomalies = store
        .anomalies(now - 30 * 86_400_000)?
        .iter()
        .filter_map(|t| match serde_json::from_str(t) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "a stored anomaly does not parse; skipped");
                None
            }
        })
        .collect();
    for e in registry.restore_behaviour(store.baselines()?, anomalies) {
        tracing::warn!(error = %e, "a stored behaviour baseline was refused; the device learns afresh");
    }
    for e in registry.restore_behaviour_groups(store.group_baselines()?) {
        tracing::warn!(error = %e, "a stored group baseline was refused; the group learns afresh");
    }
    registry.handle_routes(store.device_routes()?);
    // Sign-ins at the identity provider (identity signals) and users it suspended.
    for si in store.sign_ins()? {
        let s = crate::oidc::core::SignIn {
            auth_time_ms: si.auth_time_ms,
            amr: si.amr,
        };
        registry.handle_sign_in(si.device, Some(s));
    }
    for u in store
        .oidc_users()?
        .into_iter()
        .filter(|u| u.provider_disabled)
    {
        let why = u
            .reason
            .unwrap_or_else(|| "the identity provider took access away".into());
        registry.handle_identity(&u.user, Some(why));
    }
    let (events, rx) = queue::channel(queue::CONNECTION_EVENTS);
    let ctx = Arc::new(Ctx {
        addrs: std::sync::RwLock::new(config.public_addrs()),
        data_dir: dd.clone(),
        config,
        ca,
        lease_key,
        lease_ttl,
        store,
        events,
        next_conn: AtomicU64::new(1),
        started: Instant::now(),
        tickets: std::sync::Mutex::new(crate::tickets::TicketIssuer::new(
            u64::try_from(now).unwrap_or(1),
        )),
        gate: std::sync::Mutex::new(crate::gate::EnrollGate::new(
            crate::gate::GateConfig::default(),
        )),
        device_limits: std::sync::Mutex::new(crate::limits::DeviceLimits::new(
            crate::limits::MAX_REMEMBERED,
        )),
        enroll_slots: tokio::sync::Semaphore::new(ENROLL_SLOTS),
        metrics: crate::metrics::Counters::default(),
        flow_retention_ms,
        console: std::sync::OnceLock::new(),
        oidc: provider.clone(),
        replica_id: replica_id.clone(),
        touches: Arc::new(touches::Touches::default()),
    });
    if let (Some(o), Some(p)) = (&oidc, &provider) {
        info!(issuer = %o.cfg.issuer, client_id = %o.cfg.client_id, "OpenID Connect sign-in enabled");
        tokio::spawn(oidc::refresh_loop(ctx.clone(), p.clone()));
        if let Some(addr) = o.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the OIDC push listener on {addr}"))?;
            info!(addr = %l.local_addr()?, "OIDC back-channel logout and SCIM listening");
            tokio::spawn(oidc::push_listener(
                ctx.clone(),
                p.clone(),
                l,
                o.scim_token.clone(),
            ));
        }
    }
    if let Some(addr) = metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener on {addr}"))?;
        info!(addr = %l.local_addr()?, "metrics listening");
        let ctx = ctx.clone();
        tokio::spawn(ward_runtime::metrics::serve(
            l,
            ward_runtime::metrics::Limits::default(),
            move || scrape(ctx.clone()),
        ));
    }
    if let Some(addr) = console_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the web console listener on {addr}"))?;
        let bound = l.local_addr()?;
        let console_oidc = ctx.oidc.clone().map(|p| {
            let group = oidc.as_ref().and_then(|o| o.console_admin_group.clone());
            crate::console::oidc::ConsoleOidc::new(p, group)
        });
        let console = crate::console::Console::new(bound, console_hooks(ctx.clone()), console_oidc);
        let _ = ctx.console.set(console.clone());
        info!(addr = %bound, "web console listening (sign in with `ward-coordinator console-link`)");
        tokio::spawn(crate::console::web::serve(l, console));
    }

    let runtime = quinn::default_runtime().context("the QUIC listener needs a tokio runtime")?;
    let tls = tls_config(&ctx.ca)?;
    let acceptor = ward_runtime::stream::TlsAcceptor::from(Arc::new(tls.clone()));
    let endpoint = udp::control_endpoint(
        endpoint_config(&ctx.lease_key.to_bytes()),
        Some(server_config(tls)?),
        socket,
        runtime,
    )
    .with_context(|| format!("starting the QUIC control listener on {listen}"))?;
    let admin = socket::bind(&dd).await?;
    info!(%listen, public_addr = %ctx.config.public_addr, "coordinator serving (QUIC, and TLS over TCP on the same port)");
    ctx.store.append_audit(
        Audit {
            actor: "coordinator",
            action: Action::CoordinatorStart,
            target: &ctx.config.public_addr,
            detail: serde_json::json!({ "listen": listen.to_string() }),
        },
        now_ms(),
    )?;

    // On PostgreSQL a `LISTEN` connection wakes the feed at every other replica's commit and
    // the poll is only the safety net; on SQLite the poll is the feed.
    let feed_wake: FeedWake = Arc::new(tokio::sync::Notify::new());
    let feed_poll = if !feed_notify {
        info!(poll = ?FEED_POLL, "change feed notifications off (--feed-notify false): polling only");
        FEED_POLL
    } else {
        let w = feed_wake.clone();
        match sqlite.start_feed_listener(move || w.notify_one()) {
            Ok(true) => FEED_POLL_NOTIFIED,
            Ok(false) => FEED_POLL,
            Err(e) => {
                tracing::warn!(error = %e, poll = ?FEED_POLL, "could not start the change feed listener; polling only");
                FEED_POLL
            }
        }
    };
    tokio::spawn(integrity_checks(sqlite));
    tokio::spawn(session::refusal_rows(ctx.clone()));
    tokio::spawn(touches::write_loop(ctx.touches.clone(), ctx.store.clone()));
    tokio::spawn(prune_flows(ctx.store.clone(), flow_retention_ms));
    tokio::spawn(maturity_daily(ctx.clone()));
    let (presence_tx, presence_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(actor::registry_actor(
        registry,
        rx,
        ctx.store.clone(),
        ctx.events.clone(),
        presence_tx,
        replica_id.clone(),
    ));
    tokio::spawn(replica::run(
        ctx.clone(),
        replica::Me {
            id: replica_id,
            address: listen.to_string(),
            started_ms: now_ms(),
        },
        crate::replicas::Feed::new(feed_version),
        seen,
        presence_rx,
        feed_wake,
        feed_poll,
    ));
    // Dropped when `serve` returns: the admin thread stops serving then.
    let _admin = serve_admin_apart(admin, ctx.clone())?;

    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        anyhow::Ok(())
    };
    tokio::pin!(shutdown);
    let tcp_task = tokio::spawn(tcp_accept_loop(tcp, acceptor, ctx.clone()));
    loop {
        tokio::select! {
            r = &mut shutdown => { r?; break; }
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                let counters = &ctx.metrics;
                if !inc.remote_address_validated()
                    && counters.quic_handshakes.load(Ordering::Relaxed) >= RETRY_ABOVE_HANDSHAKES
                {
                    counters.quic_retries.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = inc.retry() {
                        e.into_incoming().ignore();
                    }
                    continue;
                }
                let handshake = Handshake::start(ctx.clone());
                tokio::spawn(async move {
                    let remote = inc.remote_address();
                    if let Err(e) = accept(inc, handshake).await {
                        debug!(%remote, error = %format!("{e:#}"), "control connection ended");
                    }
                });
            }
        }
    }
    info!("coordinator shutting down");
    tcp_task.abort();
    endpoint.close(0u32.into(), b"coordinator shutting down");
    let _ = std::fs::remove_file(dd.admin_socket());
    Ok(())
}

/// How often `PRAGMA quick_check` runs after the one at start-up. Its cost grows with the file
/// (every page is read once; milliseconds for thousands of devices), and it holds the store's
/// connection while it runs, so hourly keeps it well under 0.1 % of the store's time.
const INTEGRITY_INTERVAL: Duration = Duration::from_secs(3600);

/// Runs the periodic integrity check on a blocking thread; a failure is logged at ERROR by the
/// store and shown in `status`.
async fn integrity_checks(store: Arc<SqliteStore>) {
    let mut tick = tokio::time::interval(INTEGRITY_INTERVAL);
    tick.tick().await; // the first tick is now: start-up already checked
    loop {
        tick.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.quick_check(now_ms())).await {
            Ok(Ok(c)) if c.ok => debug!(took_ms = c.took_ms, "database integrity check passed"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => error!(error = %e, "database integrity check could not run"),
            Err(e) => error!(error = %e, "database integrity check task failed"),
        }
    }
}

/// How often the daily maturity recording checks whether a day has passed since the last one.
const MATURITY_CHECK: Duration = Duration::from_secs(3600);

/// Records a maturity assessment when none was recorded in the last day (checked at start and
/// then hourly), on a blocking thread.
async fn maturity_daily(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(MATURITY_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ctx = ctx.clone();
        let res = tokio::task::spawn_blocking(move || {
            let live = LiveRegistry {
                events: ctx.events.clone(),
            };
            crate::admin::maturity::record_if_due(ctx.store.as_ref(), &live, now_ms())
        })
        .await;
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => error!(error = %format!("{e:#}"), "daily maturity assessment failed"),
            Err(e) => error!(error = %e, "daily maturity assessment task failed"),
        }
    }
}

/// Flow records deleted per transaction, so a prune holds the store only briefly.
const FLOW_PRUNE_BATCH: usize = 10_000;

/// Deletes flow records older than the retention, at start and then every quarter of the
/// retention (at least every second, at most every ten minutes), on a blocking thread.
async fn prune_flows(store: Arc<dyn Store>, retention_ms: i64) {
    let every = Duration::from_millis(u64::try_from(retention_ms / 4).unwrap_or(0))
        .clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = store.clone();
        let res = tokio::task::spawn_blocking(move || {
            let cutoff = now_ms().saturating_sub(retention_ms);
            let mut total = 0u64;
            loop {
                let n = s.prune_flows(cutoff, FLOW_PRUNE_BATCH)?;
                total += n;
                if n < FLOW_PRUNE_BATCH as u64 {
                    return Ok::<u64, crate::store::StoreError>(total);
                }
            }
        })
        .await;
        match res {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(records = n, "old flow records pruned"),
            Ok(Err(e)) => error!(error = %e, "pruning flow records failed"),
            Err(e) => error!(error = %e, "flow pruning task failed"),
        }
    }
}

/// One QUIC handshake in progress, counted from its acceptance until it ends either way.
struct Handshake(Arc<Ctx>);

impl Handshake {
    fn start(ctx: Arc<Ctx>) -> Self {
        ctx.metrics.quic_handshakes.fetch_add(1, Ordering::Relaxed);
        Handshake(ctx)
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.0
            .metrics
            .quic_handshakes
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Completes the QUIC handshake and runs the protocol its ALPN names ([`dispatch`]).
async fn accept(inc: quinn::Incoming, handshake: Handshake) -> Result<()> {
    let ctx = handshake.0.clone();
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, inc)
        .await
        .context("handshake timed out")??;
    drop(handshake);
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if !known_alpn(alpn.as_deref()) {
        debug!(remote = %conn.remote_address(), "connection without a known protocol");
        conn.close(1u32.into(), b"no application protocol");
        return Ok(());
    }
    dispatch(link::Link::quic(conn).await?, alpn.as_deref(), ctx).await
}

/// Accepts TLS-over-TCP connections (at most [`MAX_TCP_CONNECTIONS`] at once) until aborted.
async fn tcp_accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: ward_runtime::stream::TlsAcceptor,
    ctx: Arc<Ctx>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: pause instead of spinning.
                debug!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%remote, "too many TCP control connections: closed");
            continue;
        };
        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = accept_tcp(tcp, remote, &acceptor, ctx).await {
                debug!(%remote, error = %format!("{e:#}"), "TCP control connection ended");
            }
        });
    }
}

/// Completes TLS (within the handshake timeout) and runs the protocol its ALPN names; a
/// client that offered no ALPN is closed.
async fn accept_tcp(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: &ward_runtime::stream::TlsAcceptor,
    ctx: Arc<Ctx>,
) -> Result<()> {
    let mut tls = ward_runtime::stream::accept_tls(acceptor, tcp, HANDSHAKE_TIMEOUT).await?;
    let (alpn, certs) = ward_runtime::stream::server_session(&tls);
    if !known_alpn(alpn.as_deref()) {
        debug!(%remote, "TCP connection without a known protocol");
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        return Ok(());
    }
    dispatch(link::Link::tcp(tls, remote, certs), alpn.as_deref(), ctx).await
}

fn known_alpn(alpn: Option<&[u8]>) -> bool {
    matches!(alpn, Some(p) if p == RELAY_CONTROL_ALPN || p == wire::ALPN)
}

/// Runs a device's control session or enrollment (`ward-control/1`), or a relay's control
/// session (`ward-relay-control/1`), whichever transport carries it.
async fn dispatch(link: link::Link, alpn: Option<&[u8]>, ctx: Arc<Ctx>) -> Result<()> {
    match alpn {
        Some(p) if p == RELAY_CONTROL_ALPN => relay::handle_connection(link, ctx).await,
        _ => session::handle_connection(link, ctx).await,
    }
}

/// The port of the public `HOST:PORT` (`[v6]:PORT` included): the default listener's port.
fn public_port(public_addr: &str) -> Result<u16> {
    public_addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .context("public address has no port")
}

/// TLS 1.3 with the coordinator's certificate, client certificates optional (enrollment has
/// none) and verified against the CA, both ALPNs: one config for QUIC and TCP alike.
fn tls_config(ca: &Ca) -> Result<rustls::ServerConfig> {
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
    tls.alpn_protocols = vec![wire::ALPN.to_vec(), RELAY_CONTROL_ALPN.to_vec()];
    Ok(tls)
}

/// No minimum gap between stateless resets. quinn compares the gap with the time its receive
/// loop read the datagrams, one reading for a whole batch, so any gap allows one reset per
/// batch: measured with 100 µs after a restart with 10 000 devices, 44% of them got a reset and
/// the rest waited out their idle timeout. What bounds resets instead: only a packet carrying a
/// connection ID this instance issued gets one (a keyed check), and a reset is always smaller
/// than the packet that provoked it, so it amplifies nothing.
const MIN_RESET_INTERVAL: Duration = Duration::ZERO;

/// The QUIC endpoint's keys for surviving its own restart: devices learn at once that a
/// restarted coordinator lost their connection, instead of after their idle timeout.
///
/// QUIC's stateless reset (RFC 9000 §10.3) lets an endpoint that lost a connection's state
/// end it: the reset token it gave for each connection ID is an HMAC of that ID, so a
/// process that knows the same key recomputes it. Both keys are derived (HKDF-SHA256, one
/// label each) from the instance's lease-signing seed, so every process of the instance, a
/// restart or another replica, has them, nothing new is stored, and neither key reveals the
/// seed. The connection-ID key lets the endpoint recognise IDs it issued (a keyed checksum in
/// each ID): only those get a reset, not any stray packet to the port.
fn endpoint_config(seed: &[u8; 32]) -> quinn::EndpointConfig {
    let reset = derive_key::<64>(seed, b"quic stateless reset key");
    let cid_key = u64::from_le_bytes(derive_key::<8>(seed, b"quic connection id key"));
    let mut c = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &reset,
    )));
    c.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    c.min_reset_interval(MIN_RESET_INTERVAL);
    c
}

/// `N` bytes of HKDF-SHA256 from `secret`, under a label of Ward's.
fn derive_key<const N: usize>(secret: &[u8], label: &[u8]) -> [u8; N] {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"ward coordinator endpoint")
        .extract(secret);
    let mut out = [0u8; N];
    // `expand` refuses only lengths over 255 hash lengths (8 160 bytes); `fill` only a length
    // other than the one asked for. N is 8 or 64.
    if let Ok(okm) = prk.expand(&[label], Len(N)) {
        let _ = okm.fill(&mut out);
    }
    out
}

fn server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig> {
    let qsc = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(qsc));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?));
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Control sessions carry small frames from devices and netmaps to them, not bulk data:
    // quinn's defaults (a 1.25 MB stream receive window, an unbounded connection one, 10 MB
    // of unacknowledged data per connection) are sized for throughput and, with thousands of
    // sessions, let the coordinator buffer megabytes per slow device. Bounded here, a device
    // that does not read stops its session's writes sooner, and the registry's backlog merges
    // what waits into one change instead (`fanout::Backlog`).
    transport.stream_receive_window(CONTROL_RECEIVE_WINDOW.into());
    transport.receive_window(CONTROL_RECEIVE_WINDOW.into());
    transport.send_window(CONTROL_SEND_WINDOW);
    // Datagrams stay at QUIC's 1 200 bytes, which every path carries: control frames are
    // small, and quinn sizes a connection's send buffer (never shrunk) by the datagram size it
    // had when it first sent a batch, then grows it again when path MTU discovery raises it,
    // to about 22 KB a session instead of 11 KB (`udp.rs`).
    transport.mtu_discovery_config(None);
    sc.transport_config(Arc::new(transport));
    Ok(sc)
}

/// One scrape of `--metrics-listen`: the actor's snapshot, then the store on a blocking thread.
async fn scrape(ctx: Arc<Ctx>) -> String {
    let (tx, rx) = oneshot::channel();
    ctx.events.send_internal(Event::Snapshot(tx));
    let snap = rx.await.unwrap_or_default();
    let mut posture: std::collections::BTreeMap<(String, bool), u64> = Default::default();
    for d in &snap.directory.devices {
        for r in &d.posture_passed {
            *posture.entry((r.clone(), true)).or_default() += 1;
        }
        for r in d.posture_failures.keys() {
            *posture.entry((r.clone(), false)).or_default() += 1;
        }
    }
    let refusals = ctx
        .gate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .refusal_totals()
        .clone();
    let mut inputs = crate::metrics::Inputs {
        now_ms: now_ms(),
        sessions: snap.online.len(),
        relay_sessions: snap.relays.len(),
        trust: snap.trust,
        live: snap.live,
        posture,
        admin: ctx.metrics.admin_requests(),
        refusals,
        quic_handshakes: ctx.metrics.quic_handshakes.load(Ordering::Relaxed),
        quic_retries: ctx.metrics.quic_retries.load(Ordering::Relaxed),
        ..Default::default()
    };
    let res = tokio::task::spawn_blocking(move || {
        inputs.read_store(ctx.store.as_ref(), &ctx.metrics);
        crate::metrics::render(&inputs)
    })
    .await;
    res.unwrap_or_else(|e| {
        error!(error = %e, "metrics scrape task failed");
        String::new()
    })
}

/// The console's way into the coordinator: admin requests through [`admin_handle`] (the
/// socket's path), sign-in audit rows through the store.
fn console_hooks(ctx: Arc<Ctx>) -> crate::console::ConsoleHooks {
    let admin_ctx = ctx.clone();
    crate::console::ConsoleHooks {
        admin: Box::new(move |req| {
            let ctx = admin_ctx.clone();
            Box::pin(async move {
                let env = admin_handle(ctx, req).await;
                match (env.ok, env.data) {
                    (true, Some(v)) => Ok(v),
                    _ => Err(env.error.unwrap_or_else(|| "no answer".into())),
                }
            })
        }),
        audit: Box::new(move |action, target, detail| {
            let ctx = ctx.clone();
            Box::pin(async move {
                let res = tokio::task::spawn_blocking(move || {
                    ctx.store.append_audit(
                        Audit {
                            actor: "console",
                            action,
                            target: &target,
                            detail,
                        },
                        now_ms(),
                    )
                })
                .await;
                match res {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => error!(error = %e, "console audit row not written"),
                    Err(e) => error!(error = %e, "console audit task failed"),
                }
            })
        }),
        now_ms,
    }
}

/// `console-link`: a one-time login URL from the running console, audited.
async fn console_link(ctx: Arc<Ctx>) -> Envelope<AdminReply> {
    let Some(console) = ctx.console.get().cloned() else {
        return Envelope::err(
            "the web console is off: start `ward-coordinator serve` with --console-listen ADDR"
                .to_string(),
        );
    };
    let link = console.issue_link(now_ms());
    let expires_ms = link.expires_ms;
    let res = tokio::task::spawn_blocking(move || {
        ctx.store.append_audit(
            Audit {
                actor: "admin",
                action: Action::ConsoleLink,
                target: "console",
                detail: serde_json::json!({ "expires_ms": expires_ms }),
            },
            now_ms(),
        )
    })
    .await;
    match res {
        Ok(Ok(_)) => Envelope::ok(AdminReply::ConsoleLink(link)),
        // No audit row, no link: the secret is never handed out unrecorded.
        Ok(Err(e)) => Envelope::err(format!(
            "console link not issued: the audit row could not be written: {e}"
        )),
        Err(e) => Envelope::err(format!("internal error: {e}")),
    }
}

impl Ctx {
    /// The first coordinator address and the others, as tokens carry them now.
    fn current_addrs(&self) -> (String, Vec<String>) {
        // A poisoned lock still holds a whole list (it is only ever swapped whole).
        let list = self.addrs.read().unwrap_or_else(|e| e.into_inner());
        match list.split_first() {
            Some((first, rest)) => (first.clone(), rest.to_vec()),
            None => (
                self.config.public_addr.clone(),
                self.config.alternate_addrs.clone(),
            ),
        }
    }
}

/// `addrs set`: the new list is checked and saved in config.json, audited, then carried by
/// tokens minted from now on and sent to every session of this replica in a full netmap
/// (devices fail over among the new addresses without waiting for a restart). Each replica's
/// list lives in its own data directory. Nothing changes when the file cannot be written or
/// the audit row cannot be appended (the file is then put back).
async fn addrs_set(ctx: Arc<Ctx>, addrs: Vec<String>) -> Envelope<AdminReply> {
    let ctx2 = ctx.clone();
    let saved = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let before = ctx2.data_dir.load_config()?.public_addrs();
        let cfg = ctx2.data_dir.save_public_addrs(&addrs)?;
        let list = cfg.public_addrs();
        let audit = Audit {
            actor: "admin",
            action: Action::AddrsSet,
            target: &list[0],
            detail: serde_json::json!({ "addrs": list, "before": before }),
        };
        if let Err(e) = ctx2.store.append_audit(audit, now_ms()) {
            // Unrecorded, not done: the old list goes back.
            if let Err(e2) = ctx2.data_dir.save_public_addrs(&before) {
                tracing::error!(error = %e2, "putting the coordinator addresses back failed");
            }
            anyhow::bail!("addresses not changed: the audit row could not be written: {e}");
        }
        *ctx2.addrs.write().unwrap_or_else(|e| e.into_inner()) = list.clone();
        Ok(list)
    })
    .await;
    let list = match saved {
        Ok(Ok(list)) => list,
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "addrs set refused");
            return Envelope::err(format!("{e:#}"));
        }
        Err(e) => return Envelope::err(format!("internal error: {e}")),
    };
    info!(addrs = %list.join(","), "coordinator addresses changed");
    let (tx, rx) = oneshot::channel();
    ctx.events.send(Event::Coordinators(list.clone(), tx)).await;
    let sessions = rx.await.unwrap_or(0);
    Envelope::ok(AdminReply::Addrs(crate::admin::api::AddrsView {
        addrs: list,
        sessions,
    }))
}

/// Serves the admin socket on a thread and runtime of its own. Under load every worker of the
/// main runtime has hundreds of session tasks queued (a netmap change wakes every session),
/// and an admin connection queued behind them waited about half a second before its request
/// was read: a revocation or quarantine must not wait for the sessions it is about to change.
/// The commands reach the registry through the same channels as before. The thread serves
/// until the returned sender is dropped.
fn serve_admin_apart(
    admin: tokio::net::UnixListener,
    ctx: Arc<Ctx>,
) -> Result<tokio::sync::oneshot::Sender<()>> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = admin.into_std().context("taking the admin socket")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    let listener = {
        let _in = rt.enter();
        tokio::net::UnixListener::from_std(admin).context("serving the admin socket")?
    };
    std::thread::Builder::new()
        .name("ward-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    _ = socket::serve(listener, move |req| {
                        let ctx = ctx.clone();
                        async move { admin_handle(ctx, req).await }
                    }) => {}
                    _ = stopped => {}
                }
            })
        })
        .context("starting the admin thread")?;
    Ok(stop)
}

/// Runs one admin request on a blocking thread (the store is synchronous).
async fn admin_handle(ctx: Arc<Ctx>, req: AdminRequest) -> Envelope<AdminReply> {
    let command = crate::metrics::admin_command(&req);
    ctx.metrics.admin_request(&command);
    let started = std::time::Instant::now();
    let reply = admin_run(ctx, req).await;
    tracing::info!(
        command,
        ok = reply.ok,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "admin request handled"
    );
    reply
}

async fn admin_run(ctx: Arc<Ctx>, req: AdminRequest) -> Envelope<AdminReply> {
    if matches!(req, AdminRequest::ConsoleLink) {
        return console_link(ctx).await;
    }
    if let AdminRequest::AddrsSet { addrs } = req {
        return addrs_set(ctx, addrs).await;
    }
    let res = tokio::task::spawn_blocking(move || {
        let (public_addr, alternate_addrs) = ctx.current_addrs();
        let me = Identity {
            public_addr,
            alternate_addrs,
            ca_sha256: ctx.ca.fingerprint(),
            ipv6_prefix: format!("{}/48", ctx.config.pools.v6_prefix),
            uptime_secs: ctx.started.elapsed().as_secs(),
            replica_id: ctx.replica_id.clone(),
        };
        let live = LiveRegistry {
            events: ctx.events.clone(),
        };
        ops::handle(
            ctx.store.as_ref(),
            &live,
            &me,
            &mut rand::rngs::OsRng,
            req,
            now_ms(),
        )
    })
    .await;
    match res {
        Ok(Ok(v)) => Envelope::ok(v),
        Ok(Err(e)) => {
            let mut msg = format!("{e:#}");
            if msg.contains("database or disk is full") {
                msg.push_str(
                    " (the disk holding the data directory is full: changes that widen access are \
                     refused; revoke, disable and quarantine still take effect through the journal)",
                );
            }
            tracing::warn!(error = %msg, "admin request refused");
            Envelope::err(msg)
        }
        Err(e) => Envelope::err(format!("internal error: {e}")),
    }
}

/// The registry actor as the admin requests see it (blocking calls: they run on a blocking
/// thread, never on the runtime).
struct LiveRegistry {
    events: queue::Events,
}

impl LiveRegistry {
    fn ask<T>(&self, ev: impl FnOnce(oneshot::Sender<T>) -> Event) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.events.send_internal(ev(tx));
        rx.blocking_recv()
            .map_err(|_| anyhow::anyhow!("the coordinator is shutting down"))
    }
}

impl Live for LiveRegistry {
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        self.ask(Event::Snapshot)
    }

    fn online(&self) -> anyhow::Result<Vec<DeviceId>> {
        self.ask(Event::Online)
    }

    fn directory_for(&self, p: &Policy) -> anyhow::Result<Directory> {
        self.ask(|tx| Event::DirectoryFor(Box::new(p.clone()), tx))
    }

    fn settle(&self, within: std::time::Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.events.send_internal(Event::Settled(tx));
        rx.recv_timeout(within).is_ok()
    }

    fn trust_view(&self, id: DeviceId) -> anyhow::Result<(Option<PostureReport>, PostureVerdict)> {
        self.ask(|tx| Event::TrustView(id, tx))
    }

    fn rotate(&self, id: DeviceId, why: &str) -> anyhow::Result<bool> {
        // A closed channel means the actor is gone: the device is not connected.
        Ok(self
            .ask(|tx| Event::Rotate(id, why.to_string(), tx))
            .unwrap_or(false))
    }

    fn ack_anomaly(
        &self,
        id: u64,
        label: crate::behaviour::Label,
    ) -> anyhow::Result<crate::behaviour::Anomaly> {
        Ok(self.ask(|tx| Event::AnomalyAck(id, label, tx))??)
    }

    fn notify(&self, n: Notice) {
        let ev = match n {
            Notice::Device(d) => Event::Upserted(d),
            Notice::Removed(id, why) => Event::Removed(id, why),
            Notice::User(u) => Event::User(u),
            Notice::Grants(g) => Event::Grants(g),
            Notice::Policy(p, version, c) => Event::Policy(p, version, c),
            Notice::Relays(r) => Event::Relays(r),
            Notice::Routes(r) => Event::Routes(r),
            Notice::SignIn(id, s) => Event::SignIn(id, s),
            Notice::Identity(user, why) => Event::Identity(user, why),
        };
        self.events.send_internal(ev);
    }
}

/// A client of the control listener that trusts `ca` and offers no certificate (tests).
#[cfg(test)]
fn test_client_config(ca: &Ca) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(ca.cert_der.clone()))
        .expect("root");
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    quinn::ClientConfig::new(Arc::new(qc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QUIC server endpoint on `socket` with the instance keys of `seed`, in a runtime of its
    /// own: shutting that runtime down loses every connection's state without a word to the
    /// peer, as `kill -9` does.
    fn server(seed: [u8; 32], socket: std::net::UdpSocket, ca: &Ca) -> tokio::runtime::Runtime {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let tls = tls_config(ca).expect("tls");
        rt.block_on(async {
            let ep = udp::control_endpoint(
                endpoint_config(&seed),
                Some(server_config(tls).expect("server config")),
                socket,
                quinn::default_runtime().expect("quinn runtime"),
            )
            .expect("endpoint");
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Some(inc) = ep.accept().await {
                    if let Ok(conn) = inc.await {
                        held.push(conn);
                    }
                }
            });
        });
        rt
    }

    /// How the client's connection ends after the server that held it dies and a server with
    /// `restarted_seed` takes its port.
    fn ending_after_restart(restarted_seed: [u8; 32]) -> quinn::ConnectionError {
        let seed = [7u8; 32];
        let ca = Ca::generate(now_ms()).expect("ca");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("addr");
        let first = server(seed, socket, &ca);

        let client_rt = tokio::runtime::Runtime::new().expect("runtime");
        let conn = client_rt.block_on(async {
            let mut cc = test_client_config(&ca);
            let mut t = quinn::TransportConfig::default();
            t.keep_alive_interval(Some(Duration::from_millis(200)));
            t.max_idle_timeout(Some(Duration::from_secs(3).try_into().expect("idle")));
            cc.transport_config(Arc::new(t));
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr"))
                .expect("client endpoint");
            ep.set_default_client_config(cc);
            ep.connect(addr, wire::COORDINATOR_SERVER_NAME)
                .expect("connect")
                .await
                .expect("handshake")
        });

        // The server dies: no CONNECTION_CLOSE, its socket gone.
        first.shutdown_background();
        let socket = loop {
            match std::net::UdpSocket::bind(addr) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let _second = server(restarted_seed, socket, &ca);
        client_rt.block_on(conn.closed())
    }

    #[test]
    fn a_restarted_coordinator_resets_the_connections_it_lost() {
        assert!(
            matches!(
                ending_after_restart([7u8; 32]),
                quinn::ConnectionError::Reset
            ),
            "the same instance keys must reset the lost connection"
        );
    }

    #[test]
    fn another_instance_cannot_reset_a_connection() {
        // A process without this instance's seed cannot forge the reset token: the client
        // waits out its idle timeout.
        let e = ending_after_restart([8u8; 32]);
        assert!(matches!(e, quinn::ConnectionError::TimedOut), "{e:?}");
    }

    #[test]
    fn endpoint_keys_are_derived_per_label() {
        let a: [u8; 8] = derive_key(&[1u8; 32], b"quic connection id key");
        let b: [u8; 8] = derive_key(&[1u8; 32], b"quic stateless reset key");
        let c: [u8; 8] = derive_key(&[2u8; 32], b"quic connection id key");
        assert_ne!(a, [0u8; 8]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, derive_key::<8>(&[1u8; 32], b"quic connection id key"));
    }
}
