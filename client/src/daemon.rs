//! `ward daemon`: holds the device's identity, its control session and its data plane, and
//! answers the local API.
//!
//! Tasks: the API listener, one control task (connect → hello → netmap → deltas; reconnect
//! with backoff and jitter), and the data plane (its own threads). Shared state sits behind
//! one mutex that is never held across an `.await`.

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use ward_shared::lease::{self, SignedLease};
use ward_shared::posture::{Measured, PostureReport, PostureWants};
use ward_shared::token::EnrollToken;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeviceId, DeviceMsg, DeviceUpdate, ErrorCode, Hello, Netmap,
    PostureVerdict, WgPublicKey, MAX_ENDPOINTS, PROTOCOL_VERSION,
};

use crate::api::{Request, Response, MAX_API_LINE};
use crate::control::{self, Channel, Refused};
use crate::dataplane::{self, DataPlane, DataPlaneConfig, PeerConfig};
use crate::posture::Collector;
use crate::state::{State, StateFile, STATE_VERSION};

/// A peer with no handshake this long after it was configured is reported unreachable.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Short enough that devices are back within seconds of a coordinator restart.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Between receiving the lease for a new key and switching to it: time for peers' deltas.
const ROTATION_SETTLE: Duration = Duration::from_millis(750);
/// After switching keys, the old lease is given up (`lease_active`) once every peer that had a
/// session has a session under the new key, or after this long at most.
const ROTATION_CONFIRM_MAX: Duration = Duration::from_secs(5);
/// Renew the device certificate when less than this fraction of its life is left.
const CERT_RENEW_FRACTION: f64 = 1.0 / 3.0;

#[derive(Debug, Clone)]
pub struct DaemonOpts {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// `None`: control plane only (no TUN, no tunnels).
    pub tun: Option<String>,
    pub port: u16,
    /// Posture collection: custom checks configured on this device, timeouts, intervals.
    pub posture: crate::posture::CollectorConfig,
    /// A report is sent at least this often, and at once when a value changes.
    pub posture_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Phase {
    NeedsLogin,
    Stopped,
    Connecting,
    Connected,
    Revoked,
}

/// (netmap seq, clock offset) the check was for, valid-until (coordinator ms), the peers.
type Verified = ((u64, Option<i64>), i64, Vec<PeerConfig>);

struct Shared {
    state: Option<State>,
    phase: Phase,
    last_error: Option<String>,
    netmap: Option<Netmap>,
    dataplane: Option<Arc<DataPlane>>,
    control: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    configured_at: BTreeMap<DeviceId, Instant>,
    /// The peer configuration last pushed into the data plane.
    applied: Option<Vec<PeerConfig>>,
    /// Peers whose leases verified for (netmap seq, clock offset), valid until the earliest of
    /// their leases ends.
    verified: Option<Verified>,
    /// The inbound filter last pushed into the data plane.
    applied_filter: Option<Vec<ward_shared::filter::FilterRule>>,
    connected_since: Option<Instant>,
    clock_offset_ms: Option<i64>,
    /// This device's lease on its current key.
    own_lease: Option<SignedLease>,
    key_since: Option<Instant>,
    rotations: u64,
    /// What the coordinator's policy needs collected.
    posture_wants: PostureWants,
    /// The latest collection, and the coordinator's latest verdict on this device.
    posture_report: Option<PostureReport>,
    posture_verdict: Option<PostureVerdict>,
    posture_seq: u64,
}

pub struct Daemon {
    opts: DaemonOpts,
    state_file: StateFile,
    shared: Mutex<Shared>,
    /// Only the blocking collection task takes this lock.
    collector: Arc<Mutex<Collector>>,
    /// Custom checks run on their own blocking task (a slow one must not delay the cheap
    /// signals); their latest results are merged into every report.
    custom: Arc<Mutex<Collector>>,
    custom_results: Arc<Mutex<BTreeMap<String, Measured<serde_json::Value>>>>,
}

fn lock(d: &Daemon) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves consistent-enough status data; keep serving.
    d.shared.lock().unwrap_or_else(|p| p.into_inner())
}

pub use ward_runtime::now_ms;

pub async fn run(opts: DaemonOpts) -> Result<()> {
    let state_file = StateFile::new(&opts.state_dir);
    let state = state_file.load()?;
    let listener = bind_socket(&opts.socket).await?;
    let phase = match &state {
        None => Phase::NeedsLogin,
        Some(s) if s.enabled => Phase::Connecting,
        Some(_) => Phase::Stopped,
    };
    let d = Arc::new(Daemon {
        opts: opts.clone(),
        state_file,
        shared: Mutex::new(Shared {
            state,
            phase,
            last_error: None,
            netmap: None,
            dataplane: None,
            control: None,
            configured_at: BTreeMap::new(),
            applied: None,
            applied_filter: None,
            verified: None,
            connected_since: None,
            clock_offset_ms: None,
            own_lease: None,
            key_since: Some(Instant::now()),
            rotations: 0,
            posture_wants: PostureWants::default(),
            posture_report: None,
            posture_verdict: None,
            posture_seq: 0,
        }),
        collector: Arc::new(Mutex::new(Collector::new(opts.posture.clone()))),
        custom: Arc::new(Mutex::new(Collector::new(opts.posture.clone()))),
        custom_results: Arc::new(Mutex::new(BTreeMap::new())),
    });
    info!(socket = %opts.socket.display(), state_dir = %opts.state_dir.display(), "ward daemon started");
    if phase == Phase::Connecting {
        d.clone().start().await?;
    } else if phase == Phase::NeedsLogin {
        info!("not enrolled yet: run `ward up --token TOKEN`");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            acc = listener.accept() => {
                let Ok((stream, _)) = acc else { continue };
                let d = d.clone();
                tokio::spawn(async move { d.serve_api(stream).await });
            }
        }
    }
    info!("ward daemon stopping");
    d.stop().await;
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

async fn bind_socket(path: &PathBuf) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another ward daemon is already listening on {}",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

impl Daemon {
    async fn serve_api(self: Arc<Self>, stream: tokio::net::UnixStream) {
        let (r, mut w) = stream.into_split();
        let mut line = String::new();
        let resp = match BufReader::new(r)
            .take(MAX_API_LINE)
            .read_line(&mut line)
            .await
        {
            Ok(_) => match serde_json::from_str::<Request>(&line) {
                Ok(req) => match self.clone().handle(req).await {
                    Ok(v) => Response {
                        ok: true,
                        data: v,
                        error: None,
                    },
                    Err(e) => Response {
                        ok: false,
                        data: serde_json::Value::Null,
                        error: Some(format!("{e:#}")),
                    },
                },
                Err(e) => Response {
                    ok: false,
                    data: serde_json::Value::Null,
                    error: Some(format!("bad request: {e}")),
                },
            },
            Err(e) => Response {
                ok: false,
                data: serde_json::Value::Null,
                error: Some(format!("reading request: {e}")),
            },
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        let _ = w.write_all(&out).await;
    }

    async fn handle(self: Arc<Self>, req: Request) -> Result<serde_json::Value> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Posture => Ok(self.posture()),
            Request::Down => {
                self.stop().await;
                let mut g = lock(&self);
                if let Some(st) = g.state.as_mut() {
                    st.enabled = false;
                    let st = st.clone();
                    g.phase = Phase::Stopped;
                    drop(g);
                    self.state_file.save(&st)?;
                }
                Ok(json!({ "state": "stopped" }))
            }
            Request::Up { token, hostname } => self.up(token, hostname).await,
        }
    }

    async fn up(
        self: Arc<Self>,
        token: Option<String>,
        hostname: Option<String>,
    ) -> Result<serde_json::Value> {
        let existing = lock(&self).state.clone();
        match (existing, token) {
            (Some(st), Some(_)) => bail!(
                "this device is already enrolled as {} ({}); run `ward up` without --token to connect. \
                 To enroll it again, stop the daemon and remove {}",
                st.hostname,
                st.device_id,
                self.state_file.path.display()
            ),
            (Some(mut st), None) => {
                if !st.enabled {
                    st.enabled = true;
                    self.state_file.save(&st)?;
                    lock(&self).state = Some(st.clone());
                }
                self.clone().start().await?;
                Ok(json!({ "hostname": st.hostname, "ipv4": st.ipv4, "ipv6": st.ipv6, "device_id": st.device_id.0 }))
            }
            (None, None) => bail!("this device is not enrolled yet: run `ward up --token TOKEN` with a token from your administrator"),
            (None, Some(tok)) => {
                let tok = EnrollToken::parse(&tok).map_err(|e| anyhow!("{e}"))?;
                let hostname = hostname.unwrap_or_else(system_hostname);
                info!(coordinator = %tok.coordinator, %hostname, "enrolling");
                let (enrolled, key_pem) = match control::enroll(&tok, &hostname, &os_name()).await {
                    Ok(x) => x,
                    Err(e) => {
                        let msg = match e.downcast_ref::<Refused>() {
                            Some(r) => format!("enrollment refused by the coordinator: {}", r.message),
                            None => format!("enrollment failed: {e:#}"),
                        };
                        warn!(error = %msg, "enrollment failed");
                        bail!("{msg}");
                    }
                };
                let mut wg = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut wg);
                let st = State {
                    version: STATE_VERSION,
                    coordinator: tok.coordinator.clone(),
                    ca_der: enrolled.ca_der,
                    device_id: enrolled.device_id,
                    hostname: enrolled.hostname.to_string(),
                    ipv4: enrolled.ipv4,
                    ipv6: enrolled.ipv6,
                    identity_key_pem: key_pem,
                    cert_der: enrolled.cert_der,
                    cert_not_after_ms: enrolled.cert_not_after_ms,
                    wg_private_key: Bytes(wg.to_vec()),
                    enabled: true,
                    lease_key: enrolled.lease_key,
                };
                self.state_file.save(&st)?;
                info!(device = %st.device_id, hostname = %st.hostname, ipv4 = %st.ipv4, "enrolled");
                {
                    let mut g = lock(&self);
                    g.state = Some(st.clone());
                    g.phase = Phase::Connecting;
                }
                self.clone().start().await?;
                Ok(json!({ "hostname": st.hostname, "ipv4": st.ipv4, "ipv6": st.ipv6, "device_id": st.device_id.0 }))
            }
        }
    }

    /// Brings the data plane up (if configured) and starts the control task, once.
    async fn start(self: Arc<Self>) -> Result<()> {
        let (st, has_dp, running) = {
            let g = lock(&self);
            (g.state.clone(), g.dataplane.is_some(), g.control.is_some())
        };
        let Some(st) = st else { bail!("not enrolled") };
        if running {
            return Ok(());
        }
        if let (Some(tun), false) = (&self.opts.tun, has_dp) {
            let v6_prefix = {
                let mut b = st.ipv6.octets();
                b[6..].fill(0);
                std::net::Ipv6Addr::from(b)
            };
            let mut key = [0u8; 32];
            key.copy_from_slice(&st.wg_private_key.0);
            let dp = DataPlane::start(DataPlaneConfig {
                tun_name: tun.clone(),
                port: self.opts.port,
                private_key: key,
                ipv4: st.ipv4,
                ipv6: st.ipv6,
                v6_prefix,
            })
            .await
            .context("starting the data plane")?;
            info!(tun = %tun, port = dp.local_port(), "data plane up");
            let mut g = lock(&self);
            if let Some(o) = g.clock_offset_ms {
                dp.set_clock_offset_ms(o);
            }
            g.dataplane = Some(Arc::new(dp));
            g.applied = None;
            g.applied_filter = None;
            drop(g);
            tokio::spawn(enforce_expiry(Arc::downgrade(&self)));
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let me = self.clone();
        let task = tokio::spawn(async move { me.control_loop(stop_rx).await });
        let mut g = lock(&self);
        g.control = Some((stop_tx, task));
        g.phase = Phase::Connecting;
        Ok(())
    }

    async fn stop(&self) {
        let (control, dp) = {
            let mut g = lock(self);
            g.netmap = None;
            g.connected_since = None;
            (g.control.take(), g.dataplane.take())
        };
        if let Some((tx, task)) = control {
            let _ = tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        if let Some(dp) = dp {
            match Arc::try_unwrap(dp) {
                Ok(dp) => dp.shutdown().await,
                Err(_) => warn!("data plane still in use at shutdown; it stops when released"),
            }
        }
    }

    async fn control_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let endpoint = match control::client_endpoint() {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "control channel unavailable");
                lock(&self).last_error = Some(format!("{e:#}"));
                return;
            }
        };
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            let res = tokio::select! {
                r = self.session(&endpoint) => r,
                _ = stop.changed() => break,
            };
            let revoked = {
                let mut g = lock(&self);
                g.connected_since = None;
                match &res {
                    Ok(()) => g.last_error = Some("the coordinator closed the session".into()),
                    Err(e) => g.last_error = Some(format!("{e:#}")),
                }
                let revoked = matches!(res.as_ref().err().and_then(|e| e.downcast_ref::<Refused>()), Some(r) if r.code == ErrorCode::DeviceRevoked || r.code == ErrorCode::Unauthorized);
                g.phase = if revoked {
                    Phase::Revoked
                } else {
                    Phase::Connecting
                };
                if revoked {
                    // Leave the network: no peers, no tunnels.
                    g.netmap = None;
                    g.verified = None;
                    g.configured_at.clear();
                    g.own_lease = None;
                    g.applied = Some(Vec::new());
                    g.applied_filter = Some(Vec::new());
                    if let Some(dp) = &g.dataplane {
                        dp.set_peers(Vec::new());
                        dp.set_filter(Vec::new());
                    }
                }
                revoked
            };
            if let Err(e) = &res {
                warn!(error = %format!("{e:#}"), "control session ended");
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = BACKOFF_MIN;
            }
            let floor = if revoked {
                Duration::from_secs(30)
            } else {
                Duration::ZERO
            };
            let jitter = rand::thread_rng().gen_range(0.8..1.2);
            let wait = backoff.mul_f64(jitter).max(floor);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {},
                _ = stop.changed() => break,
            }
        }
        endpoint.close(0u32.into(), b"stopping");
    }

    fn hello_update(&self) -> DeviceUpdate {
        let g = lock(self);
        let Some(dp) = &g.dataplane else {
            return DeviceUpdate::default();
        };
        let port = dp.local_port();
        DeviceUpdate {
            wg_public_key: Some(WgPublicKey(dp.public_key())),
            wg_port: port,
            local_endpoints: local_addresses()
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .take(MAX_ENDPOINTS)
                .collect(),
        }
    }

    async fn session(&self, endpoint: &quinn::Endpoint) -> Result<()> {
        let st = lock(self)
            .state
            .clone()
            .ok_or_else(|| anyhow!("not enrolled"))?;
        let addr = control::resolve(&st.coordinator).await?;
        let cfg = control::session_config(&st.ca_der.0, &st.cert_der.0, &st.identity_key_pem)?;
        let mut ch = Channel::open(endpoint, cfg, addr).await?;
        let mut update = self.hello_update();
        ch.send(&DeviceMsg::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            os: os_name(),
            version: env!("CARGO_PKG_VERSION").into(),
            update: update.clone(),
        }))
        .await?;
        // Measure the clock offset first: leases are judged in coordinator time.
        let mut ping_sent: Option<(u64, Instant, i64)> =
            Some((rand::random::<u64>(), Instant::now(), now_ms()));
        if let Some((nonce, _, _)) = ping_sent {
            ch.send(&DeviceMsg::Ping { nonce }).await?;
        }
        let mut lease_requested = false;
        // Rotation waits until this session holds a lease for the key in use: after a
        // reconnect the old lease may be stale, and a rotation must not race the first lease.
        let mut session_leased = false;
        // A trust change asked for a rotation while one could not start (no lease yet in this
        // session, or a rotation already in flight, whose key predates the change): start one
        // as soon as possible.
        let mut rotate_asked: Option<String> = None;
        // A rotation in flight: the new private key, and when to switch to it.
        let mut pending: Option<[u8; 32]> = None;
        let mut switch: Option<(Instant, [u8; 32], SignedLease)> = None;
        // Switched to the key of lease `serial` at `since`; waiting for peers to move to it.
        let mut confirm: Option<(Instant, u64)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut ticks: u64 = 0;
        // Posture: collected every second off the async threads; reported at once when a
        // value changes, else every `posture_interval`.
        let (posture_tx, mut posture_rx) = mpsc::channel::<PostureReport>(1);
        let mut posture_busy = false;
        let custom_busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut posture_sent: Option<(Instant, PostureReport)> = None;
        let mut posture_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = posture_tick.tick() => {
                    let flows = lock(self).dataplane.as_ref().map(|dp| dp.take_denied_flows()).unwrap_or_default();
                    for chunk in flows.chunks(wire::MAX_DENIED_FLOWS) {
                        ch.send(&DeviceMsg::DeniedFlows { flows: chunk.to_vec() }).await?;
                    }
                    if !posture_busy {
                        posture_busy = self.start_collection(posture_tx.clone());
                    }
                    self.start_custom_checks(&custom_busy);
                }
                Some(report) = posture_rx.recv() => {
                    posture_busy = false;
                    let due = match &posture_sent {
                        None => true,
                        Some((at, prev)) => crate::posture::values_differ(prev, &report) || at.elapsed() >= self.opts.posture_interval,
                    };
                    lock(self).posture_report = Some(report.clone());
                    if due {
                        let msg = fit_report(report.clone());
                        debug!(seq = report.seq, "sending posture report");
                        ch.send(&msg).await?;
                        posture_sent = Some((Instant::now(), report));
                    }
                }
                msg = ch.recv() => {
                    let Some(msg) = msg? else { return Ok(()) };
                    match msg {
                        CoordinatorMsg::Netmap(nm) => {
                            debug!(seq = nm.seq, peers = nm.peers.len(), "netmap");
                            let mut g = lock(self);
                            if g.connected_since.is_none() {
                                g.connected_since = Some(Instant::now());
                                info!(coordinator = %st.coordinator, peers = nm.peers.len(), "connected to coordinator");
                            }
                            g.phase = Phase::Connected;
                            g.last_error = None;
                            g.netmap = Some(nm);
                            g.verified = None;
                            apply_peers(&mut g);
                        }
                        CoordinatorMsg::NetmapDelta(d) => {
                            let mut g = lock(self);
                            let Some(nm) = g.netmap.as_mut() else {
                                bail!("netmap delta before a netmap");
                            };
                            // A gap means a lost update: reconnect for a fresh full netmap.
                            nm.apply(&d)?;
                            debug!(seq = d.seq, upsert = d.upsert.len(), remove = d.remove.len(), "netmap delta");
                            apply_peers(&mut g);
                        }
                        CoordinatorMsg::Error { code, message } => {
                            return Err(Refused { code, message }.into());
                        }
                        CoordinatorMsg::CertRenewed { cert_der, not_after_ms } => {
                            let mut st2 = lock(self).state.clone().ok_or_else(|| anyhow!("not enrolled"))?;
                            st2.cert_der = cert_der;
                            st2.cert_not_after_ms = not_after_ms;
                            self.state_file.save(&st2)?;
                            lock(self).state = Some(st2);
                            info!("device certificate renewed");
                        }
                        CoordinatorMsg::Pong { nonce, coordinator_time_ms } => {
                            if let Some((n, sent, sent_ms)) = ping_sent.take() {
                                if n == nonce {
                                    let rtt = sent.elapsed().as_millis() as i64;
                                    let offset = coordinator_time_ms - (sent_ms + rtt / 2);
                                    let mut g = lock(self);
                                    if g.clock_offset_ms.is_none_or(|o| (o - offset).abs() > 1000) && offset.abs() > 2000 {
                                        warn!(offset_ms = offset, "this device's clock differs from the coordinator's; correcting for it");
                                    }
                                    g.clock_offset_ms = Some(offset);
                                    if let Some(dp) = &g.dataplane {
                                        dp.set_clock_offset_ms(offset);
                                    }
                                    apply_peers(&mut g);
                                }
                            }
                            if !lease_requested {
                                // First lease of this session, for the key in use.
                                lease_requested = true;
                                let key = current_public_key(&lock(self));
                                ch.send(&DeviceMsg::LeaseRequest { wg_public_key: key }).await?;
                            }
                        }
                        CoordinatorMsg::Lease { lease } => {
                            let (issuer, offset, st_now) = {
                                let g = lock(self);
                                (g.state.as_ref().and_then(lease_issuer), g.clock_offset_ms.unwrap_or(0), g.state.clone())
                            };
                            let Some(issuer) = issuer else { bail!("no pinned lease key; enroll again") };
                            let Some(st_now) = st_now else { bail!("not enrolled") };
                            let coord_now = now_ms() + offset;
                            lease
                                .verify_for(&issuer, coord_now, st_now.device_id, st_now.ipv4, st_now.ipv6)
                                .map_err(|e| anyhow!("the coordinator sent a lease that does not verify: {e}"))?;
                            let current = current_public_key(&lock(self));
                            if lease.lease.wg_public_key == current {
                                info!(serial = lease.lease.serial, expires_in_s = (lease.lease.not_after_ms - coord_now) / 1000, "lease granted");
                                lock(self).own_lease = Some(lease.clone());
                                ch.send(&DeviceMsg::LeaseActive { serial: lease.lease.serial }).await?;
                                session_leased = true;
                            } else if let Some(k) = pending.take().filter(|k| WgPublicKey(dataplane::public_key_for(k)) == lease.lease.wg_public_key) {
                                // Peers already have the new key (the coordinator pushed it before
                                // answering); give the deltas a moment to land, then switch.
                                switch = Some((Instant::now() + ROTATION_SETTLE, k, lease));
                            } else {
                                warn!(serial = lease.lease.serial, "ignoring a lease for a key this device does not hold");
                            }
                        }
                        CoordinatorMsg::RotateNow { reason } => {
                            info!(%reason, "coordinator asked for a key rotation");
                            if session_leased && pending.is_none() && switch.is_none() && confirm.is_none() {
                                pending = Some(self.start_rotation(&mut ch).await?);
                            } else {
                                rotate_asked = Some(reason);
                            }
                        }
                        CoordinatorMsg::PostureWants(w) => {
                            debug!(processes = w.processes.len(), files = w.files.len(), custom = w.custom.len(), "posture wants");
                            lock(self).posture_wants = w;
                            // Collect and report now rather than at the next periodic report.
                            posture_sent = None;
                        }
                        CoordinatorMsg::PostureVerdict(v) => {
                            let failing: Vec<&str> = v.results.iter().filter(|r| !r.passed).map(|r| r.requirement.as_str()).collect();
                            if !failing.is_empty() || v.quarantine.is_some() {
                                info!(?failing, quarantine = ?v.quarantine, unavailable = v.unavailable.len(), "posture verdict: access restricted");
                            } else {
                                info!(requirements = v.results.len(), "posture verdict: all requirements met");
                            }
                            lock(self).posture_verdict = Some(v);
                        }
                        CoordinatorMsg::Enrolled(_) => bail!("unexpected enrolled message on a session"),
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    if let Some((at, key, lease)) = switch.take() {
                        if Instant::now() >= at {
                            self.switch_key(key, &lease)?;
                            confirm = Some((Instant::now(), lease.lease.serial));
                        } else {
                            switch = Some((at, key, lease));
                        }
                    }
                    if let Some((since, serial)) = confirm {
                        let on_old = lock(self).dataplane.as_ref().map_or(0, |dp| dp.peers_on_old_key());
                        if on_old == 0 || since.elapsed() >= ROTATION_CONFIRM_MAX {
                            if on_old > 0 {
                                warn!(peers = on_old, "peers did not complete a handshake under the new key in time; giving up the old lease anyway");
                            }
                            debug!(serial, after_ms = since.elapsed().as_millis() as u64, "rotation confirmed");
                            ch.send(&DeviceMsg::LeaseActive { serial }).await?;
                            confirm = None;
                        }
                    }
                    // Rotate when half of the lease is spent.
                    let due = {
                        let g = lock(self);
                        let now = now_ms() + g.clock_offset_ms.unwrap_or(0);
                        g.own_lease.as_ref().is_some_and(|l| crate::agent::rotation_due(l, now))
                    };
                    let free = session_leased && pending.is_none() && switch.is_none() && confirm.is_none();
                    if free && (due || rotate_asked.is_some()) {
                        if let Some(reason) = rotate_asked.take() {
                            info!(%reason, "rotating for a trust change asked for earlier");
                        }
                        pending = Some(self.start_rotation(&mut ch).await?);
                    }
                    if !ticks.is_multiple_of(40) {
                        continue;
                    }
                    // Every 10 s: endpoints, clock, certificate.
                    if let Some(u) = update_if_changed(&mut update, self.hello_update()) {
                        ch.send(&DeviceMsg::Update(u)).await?;
                    }
                    let nonce = rand::random::<u64>();
                    ping_sent = Some((nonce, Instant::now(), now_ms()));
                    ch.send(&DeviceMsg::Ping { nonce }).await?;
                    let st = lock(self).state.clone();
                    if let Some(st) = st {
                        let left = st.cert_not_after_ms - now_ms();
                        if (left as f64) < crate::CERT_LIFETIME_MS as f64 * CERT_RENEW_FRACTION {
                            let key = rcgen::KeyPair::from_pem(&st.identity_key_pem)?;
                            let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
                            ch.send(&DeviceMsg::RenewCert { csr_der: Bytes(csr.der().to_vec()) }).await?;
                        }
                    }
                }
            }
        }
    }

    /// Starts one posture collection on a blocking thread, once the clock offset is known
    /// (reports carry coordinator time). Returns whether one was started.
    fn start_collection(&self, tx: mpsc::Sender<PostureReport>) -> bool {
        let (wants, device_id, offset, seq) = {
            let mut g = lock(self);
            let (Some(st), Some(offset)) = (&g.state, g.clock_offset_ms) else {
                return false;
            };
            let device_id = st.device_id;
            let seq = (g.posture_seq + 1).max((now_ms() + offset).max(0) as u64);
            g.posture_seq = seq;
            (g.posture_wants.clone(), device_id, offset, seq)
        };
        let collector = self.collector.clone();
        let results = self.custom_results.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = collector.lock().unwrap_or_else(|p| p.into_inner());
            let now = now_ms() + offset;
            let cheap = PostureWants {
                custom: Vec::new(),
                ..wants.clone()
            };
            let mut report = c.collect(&cheap, device_id, seq, now);
            let done = results.lock().unwrap_or_else(|p| p.into_inner());
            report.custom = wants
                .custom
                .iter()
                .map(|n| {
                    let m = done
                        .get(n)
                        .cloned()
                        .unwrap_or_else(|| Measured::error(now, "not run yet"));
                    (n.clone(), m)
                })
                .collect();
            drop(done);
            let _ = tx.blocking_send(report);
        });
        true
    }

    /// Runs the custom checks that are due on their own blocking thread, one run at a time.
    fn start_custom_checks(&self, busy: &Arc<std::sync::atomic::AtomicBool>) {
        use std::sync::atomic::Ordering;
        let (wanted, offset) = {
            let g = lock(self);
            let Some(offset) = g.clock_offset_ms else {
                return;
            };
            (g.posture_wants.custom.clone(), offset)
        };
        if wanted.is_empty() || busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let custom = self.custom.clone();
        let results = self.custom_results.clone();
        let busy = busy.clone();
        tokio::task::spawn_blocking(move || {
            let r = custom
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .custom_only(&wanted, now_ms() + offset);
            *results.lock().unwrap_or_else(|p| p.into_inner()) = r;
            busy.store(false, Ordering::Release);
        });
    }

    /// The latest posture report and the coordinator's verdict (for `ward posture`).
    fn posture(&self) -> serde_json::Value {
        let g = lock(self);
        json!({
            "report": g.posture_report,
            "verdict": g.posture_verdict,
            "wants": g.posture_wants,
            "custom_checks": self.opts.posture.custom_checks.keys().collect::<Vec<_>>(),
        })
    }

    /// Makes a new WireGuard key and asks for a lease on it.
    async fn start_rotation(&self, ch: &mut Channel) -> Result<[u8; 32]> {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        let public = WgPublicKey(dataplane::public_key_for(&k));
        debug!(key = %public.to_base64(), "rotating: asking for a lease on a new key");
        ch.send(&DeviceMsg::LeaseRequest {
            wg_public_key: public,
        })
        .await?;
        Ok(k)
    }

    /// Moves the data plane and the state file to the new key.
    fn switch_key(&self, key: [u8; 32], lease: &SignedLease) -> Result<()> {
        let mut g = lock(self);
        let Some(mut st) = g.state.clone() else {
            bail!("not enrolled")
        };
        st.wg_private_key = Bytes(key.to_vec());
        self.state_file.save(&st)?;
        if let Some(dp) = &g.dataplane {
            dp.rotate_key(key);
        }
        g.state = Some(st);
        g.own_lease = Some(lease.clone());
        g.key_since = Some(Instant::now());
        g.rotations += 1;
        info!(serial = lease.lease.serial, key = %lease.lease.wg_public_key.to_base64(), "rotated to a new WireGuard key");
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let g = lock(self);
        let Some(st) = &g.state else {
            return json!({ "state": Phase::NeedsLogin, "peers": [] });
        };
        let dp_status: BTreeMap<u64, dataplane::PeerStatus> = g
            .dataplane
            .as_ref()
            .map(|dp| dp.status().into_iter().map(|p| (p.device_id, p)).collect())
            .unwrap_or_default();
        let peers: Vec<serde_json::Value> = g
            .netmap
            .as_ref()
            .map(|nm| nm.peers.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|p| {
                let s = dp_status.get(&p.device_id.0);
                let since = g.configured_at.get(&p.device_id).map(|t| t.elapsed());
                let hs = s.and_then(|s| s.last_handshake);
                let (path, reachable) = match (&g.dataplane, p.wg_public_key, hs) {
                    (None, _, _) => ("control-plane only (no data plane)".to_string(), false),
                    (_, None, _) => ("peer has no data plane up".to_string(), false),
                    (_, _, Some(_)) => (format!("direct {}", s.and_then(|s| s.endpoint).map(|e| e.to_string()).unwrap_or_default()), true),
                    (_, _, None) if since.is_some_and(|t| t > UNREACHABLE_AFTER) => (
                        "unreachable: no direct path answered (both sides may be behind NAT; relays are not available yet)".to_string(),
                        false,
                    ),
                    _ => ("connecting".to_string(), false),
                };
                let coord_now = now_ms() + g.clock_offset_ms.unwrap_or(0);
                let newest = p.leases.iter().max_by_key(|l| l.lease.serial);
                json!({
                    "lease_expires_in_secs": newest.map(|l| (l.lease.not_after_ms - coord_now) / 1000),
                    "key_age_secs": newest.map(|l| (coord_now - l.lease.not_before_ms).max(0) / 1000),
                    "lease_serial": newest.map(|l| l.lease.serial),
                    "device_id": p.device_id.0,
                    "hostname": p.hostname,
                    "user": p.user,
                    "tags": p.tags,
                    "ipv4": p.ipv4,
                    "ipv6": p.ipv6,
                    "online": p.online,
                    "public_key": p.wg_public_key.map(|k| k.to_base64()),
                    "endpoints": p.endpoints,
                    "endpoint": s.and_then(|s| s.endpoint),
                    "path_mtu": s.and_then(|s| s.path_mtu),
                    "reachable": reachable,
                    "path": path,
                    "last_handshake_secs": hs.map(|d| d.as_secs()),
                    "rx_bytes": s.map(|s| s.rx_bytes).unwrap_or(0),
                    "tx_bytes": s.map(|s| s.tx_bytes).unwrap_or(0),
                    "dropped_bad_source": s.map(|s| s.dropped_bad_source).unwrap_or(0),
                })
            })
            .collect();
        let counters = g.dataplane.as_ref().map(|dp| {
            let c = dp.counters();
            json!({
                "tx_packets": c.tx_packets, "tx_bytes": c.tx_bytes, "rx_packets": c.rx_packets, "rx_bytes": c.rx_bytes,
                "dropped_no_route": c.dropped_no_route, "dropped_no_endpoint": c.dropped_no_endpoint,
                "dropped_bad_source": c.dropped_bad_source, "dropped_garbage": c.dropped_garbage,
                "dropped_bad_tun_packet": c.dropped_bad_tun_packet,
                "dropped_filter_no_rule": c.dropped_filter_no_rule,
                "dropped_filter_expired": c.dropped_filter_expired,
                "dropped_filter_other": c.dropped_filter_other,
                "icmp_unreachable_sent": c.icmp_unreachable_sent,
                "path": dp.path_counters(),
            })
        });
        let fmt_ports = |proto: &ward_shared::filter::Proto,
                         ports: &[ward_shared::filter::PortRange]| {
            let p = serde_json::to_value(proto)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            if ports.is_empty() {
                return p;
            }
            let list: Vec<String> = ports
                .iter()
                .map(|r| {
                    if r.lo == r.hi {
                        r.lo.to_string()
                    } else if r.lo == 0 && r.hi == u16::MAX {
                        "*".into()
                    } else {
                        format!("{}-{}", r.lo, r.hi)
                    }
                })
                .collect();
            format!("{p}/{}", list.join(","))
        };
        let now = now_ms() + g.clock_offset_ms.unwrap_or(0);
        let reach: Vec<serde_json::Value> = g
            .netmap
            .as_ref()
            .map(|nm| nm.reach.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|r| r.not_after_ms.is_none_or(|t| t > now))
            .map(|r| {
                json!({
                    "service": r.service, "hostname": r.hostname, "device_id": r.device_id.0,
                    "ports": fmt_ports(&r.proto, &r.ports), "rule": r.rule,
                    "expires_in_secs": r.not_after_ms.map(|t| (t - now) / 1000),
                })
            })
            .collect();
        let names: BTreeMap<std::net::IpAddr, String> = g
            .netmap
            .as_ref()
            .map(|nm| {
                nm.peers
                    .iter()
                    .flat_map(|p| {
                        [
                            (IpAddr::V4(p.ipv4), p.hostname.to_string()),
                            (IpAddr::V6(p.ipv6), p.hostname.to_string()),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        let inbound: Vec<serde_json::Value> = g
            .netmap
            .as_ref()
            .map(|nm| nm.inbound.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|r| r.not_after_ms.is_none_or(|t| t > now))
            .map(|r| {
                let mut from: Vec<String> = r.sources.iter().map(|ip| names.get(ip).cloned().unwrap_or_else(|| ip.to_string())).collect();
                from.sort();
                from.dedup();
                json!({
                    "service": r.service, "from": from, "ports": fmt_ports(&r.proto, &r.ports), "rule": r.rule,
                    "expires_in_secs": r.not_after_ms.map(|t| (t - now) / 1000),
                })
            })
            .collect();
        let own = g.own_lease.as_ref().map(|l| {
            json!({
                "serial": l.lease.serial,
                "expires_in_secs": (l.lease.not_after_ms - now) / 1000,
                "ttl_secs": (l.lease.not_after_ms - l.lease.not_before_ms) / 1000,
            })
        });
        let clock_warning = g.clock_offset_ms.filter(|o| o.abs() > 30_000).map(|o| {
            format!(
                "this device's clock is {:.1} s {} the coordinator's (corrected for)",
                o.abs() as f64 / 1000.0,
                if o > 0 { "behind" } else { "ahead of" }
            )
        });
        json!({
            "state": g.phase,
            "lease": own,
            "key": WgPublicKey(dataplane::public_key_for(&{
                let mut k = [0u8; 32];
                k.copy_from_slice(&st.wg_private_key.0);
                k
            })).to_base64(),
            "key_age_secs": g.key_since.map(|t| t.elapsed().as_secs()),
            "rotations": g.rotations,
            "clock_warning": clock_warning,
            "quarantine": g.posture_verdict.as_ref().and_then(|v| v.quarantine.clone()),
            "unavailable": g.posture_verdict.as_ref().map(|v| v.unavailable.clone()).unwrap_or_default(),
            "reach": reach,
            "inbound": inbound,
            "device_id": st.device_id.0,
            "hostname": st.hostname,
            "ipv4": st.ipv4,
            "ipv6": st.ipv6,
            "coordinator": st.coordinator,
            "connected_secs": g.connected_since.map(|t| t.elapsed().as_secs()),
            "last_error": g.last_error,
            "clock_offset_ms": g.clock_offset_ms,
            "tun": g.dataplane.as_ref().and(self.opts.tun.clone()),
            "port": g.dataplane.as_ref().map(|d| d.local_port()),
            "public_key": g.dataplane.as_ref().map(|d| WgPublicKey(d.public_key()).to_base64()),
            "peers": peers,
            "counters": counters,
        })
    }
}

fn current_public_key(g: &Shared) -> WgPublicKey {
    let mut k = [0u8; 32];
    if let Some(st) = &g.state {
        k.copy_from_slice(&st.wg_private_key.0);
    }
    WgPublicKey(dataplane::public_key_for(&k))
}

fn lease_issuer(st: &State) -> Option<ed25519_dalek::VerifyingKey> {
    lease::issuer_key(&st.lease_key.0)
}

fn update_if_changed(current: &mut DeviceUpdate, fresh: DeviceUpdate) -> Option<DeviceUpdate> {
    if *current == fresh {
        return None;
    }
    *current = fresh.clone();
    Some(fresh)
}

/// Pushes the netmap's peers into the data plane: one entry per peer key that holds a valid
/// lease (signature from the pinned coordinator key, for that peer's addresses, unexpired in
/// coordinator time). A key without a valid lease is never configured.
fn apply_peers(g: &mut Shared) {
    let Some(nm) = &g.netmap else { return };
    let now = Instant::now();
    let coord_now = now_ms() + g.clock_offset_ms.unwrap_or(0);
    let issuer = g.state.as_ref().and_then(lease_issuer);
    let ids: Vec<DeviceId> = nm.peers.iter().map(|p| p.device_id).collect();
    g.configured_at.retain(|k, _| ids.contains(k));
    for id in &ids {
        g.configured_at.entry(*id).or_insert(now);
    }
    // Signatures are checked once per netmap (and clock offset); the 200 ms expiry tick only
    // compares timestamps until the earliest configured lease ends.
    let key = (nm.seq, g.clock_offset_ms);
    let peers = match &g.verified {
        Some((k, until, peers)) if *k == key && coord_now < *until => peers.clone(),
        _ => {
            // No pinned lease key means no peer can be trusted: configure none (fail closed).
            let (peers, refused) = match &issuer {
                Some(issuer) => crate::agent::leased_peers(nm, issuer, coord_now),
                None => (Vec::new(), Vec::new()),
            };
            for (peer, why) in refused {
                debug!(%peer, error = %why, "peer lease not usable");
            }
            let until = nm
                .peers
                .iter()
                .flat_map(|p| &p.leases)
                .filter(|l| {
                    peers
                        .iter()
                        .any(|c| c.public_key == l.lease.wg_public_key.0)
                })
                .map(|l| l.lease.not_after_ms)
                .min()
                .unwrap_or(i64::MAX);
            g.verified = Some((key, until, peers.clone()));
            peers
        }
    };
    let changed = g.applied.as_ref() != Some(&peers);
    let filter_changed = g.applied_filter.as_ref() != Some(&nm.inbound);
    let inbound = nm.inbound.clone();
    if let Some(dp) = &g.dataplane {
        if changed {
            dp.set_peers(peers.clone());
        }
        if filter_changed {
            dp.set_filter(inbound.clone());
        }
    }
    g.applied = Some(peers);
    g.applied_filter = Some(inbound);
}

/// Drops peers whose leases ran out, on this device's own clock (corrected to coordinator
/// time), whether or not the coordinator can be reached.
async fn enforce_expiry(d: std::sync::Weak<Daemon>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let Some(d) = d.upgrade() else { return };
        let mut g = lock(&d);
        if g.dataplane.is_none() {
            continue;
        }
        apply_peers(&mut g);
    }
}

pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "device".into())
}

pub fn os_name() -> String {
    let raw = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    raw.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| std::env::consts::OS.to_string())
}

/// Non-loopback, non-overlay addresses of this host's interfaces: candidate endpoints.
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we only read and then free exactly once.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned above, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr of the family it names.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        if family == libc::AF_INET {
            // SAFETY: family AF_INET means the storage is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback()
                && !ward_shared::addr::AddressPools::contains_v4(ip)
                && !ip.is_link_local()
            {
                out.push(IpAddr::V4(ip));
            }
        }
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// A posture report as a message that fits in one device frame: custom check outputs are
/// replaced by an error reading, largest first, until it does.
fn fit_report(mut report: PostureReport) -> DeviceMsg {
    loop {
        let msg = DeviceMsg::Posture(Box::new(report.clone()));
        if wire::encode(&msg).len() <= wire::MAX_DEVICE_FRAME {
            return msg;
        }
        let biggest = report
            .custom
            .iter()
            .filter(|(_, m)| m.get().is_ok())
            .max_by_key(|(_, m)| serde_json::to_vec(m).map(|v| v.len()).unwrap_or(0))
            .map(|(k, _)| k.clone());
        match biggest {
            Some(k) => {
                if let Some(m) = report.custom.get_mut(&k) {
                    *m = Measured::error(m.at_ms, "output too large to report");
                }
            }
            None => {
                // Nothing left to shrink: report the essentials only.
                report.processes.clear();
                report.files.clear();
                report.custom.clear();
                return DeviceMsg::Posture(Box::new(report));
            }
        }
    }
}
