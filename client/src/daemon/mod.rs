//! `ward daemon`: holds the device's identity, runs the agent core with its control session
//! and data plane, and answers the local API.
//!
//! Lifecycle only lives here (run, up/down/enroll, the API server); the protocol is the I/O-free
//! [`crate::agent::Agent`], driven by the session loop in [`session`]; the views `ward status`
//! and `ward posture` print are built in [`status`].

mod collect;
mod dns;
mod dns_host;
mod flowlog;
mod host;
mod local_api;
pub mod metrics;
mod relay_batch;
mod relays;
mod routing;
mod session;
mod status;

use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tracing::{info, warn};

use ward_runtime::rpc::Envelope;
use ward_shared::token::EnrollToken;
use ward_shared::wire::Bytes;

use crate::agent::Agent;
use crate::api::{DownView, Request, Response, UpView, MAX_API_LINE};
use crate::control::{self, Refused};
use crate::dataplane::{DataPlane, DataPlaneConfig};
use crate::state::{State, StateFile, STATE_VERSION};

pub use dns_host::{DnsSetting, DEFAULT_RESOLV_CONF};
pub use host::{os_name, system_hostname};
pub use relays::relay_harness;
pub use ward_runtime::now_ms;

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
    /// While the control session is on TCP, how often QUIC is tried again
    /// ([`control::QUIC_RETRY_EVERY`] unless a test sets it).
    pub quic_retry: Duration,
    /// Where Prometheus metrics are served (`GET /metrics`); `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Device names in DNS (see [`dns_host`]).
    pub dns: DnsSetting,
    /// The resolv.conf managed in `resolv.conf` mode.
    pub resolv_conf: PathBuf,
}

/// While the device is up: its agent core, data plane and session task.
struct Running {
    agent: Arc<Mutex<Agent>>,
    dataplane: Option<Arc<DataPlane>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// The resolver on the overlay addresses; `None` with `--dns off` or without a TUN.
    dns: Option<dns::DnsServer>,
}

pub struct Daemon {
    opts: DaemonOpts,
    state_file: StateFile,
    /// The flow log's numbering and unacknowledged reports.
    flow_state: flowlog::FlowStateFile,
    /// The flow log's configuration (hidden environment settings read at start).
    flow_config: crate::agent::flows::FlowLogConfig,
    /// The device's identity; `None` before enrollment.
    identity: Mutex<Option<State>>,
    /// Routes to advertise and the exit node to use, as the last `ward up` said.
    route_opts: Mutex<crate::agent::routes::RouteOptions>,
    /// `None` while stopped.
    running: Mutex<Option<Running>>,
    /// The agent of the last run, for `ward posture` after `ward down`.
    last_agent: Mutex<Option<Arc<Mutex<Agent>>>>,
    collectors: collect::Collectors,
    /// Which transport the control session and each relay link use now.
    transports: relays::relay_link::SharedTransports,
    /// The names the resolver answers, published by the session loop on every netmap.
    zone: watch::Sender<crate::dns::Zone>,
    /// Names the resolver wants held and names the coordinator refused (peers on demand),
    /// between the resolver task and the session loop.
    names: Arc<dns::NameDemand>,
    dns_status: dns::SharedDnsStatus,
    /// The end of the sign-in `ward up --login` started, for `login_wait`.
    pending_login:
        tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<Result<UpView, String>>>>,
    /// Where a browser sign-in's redirect goes (`login_callback`); dropping it abandons the
    /// sign-in (`login_abort`).
    login_callback:
        tokio::sync::Mutex<Option<tokio::sync::oneshot::Sender<ward_shared::wire::LoginCallback>>>,
}

/// A panic while holding a lock leaves consistent-enough data for status; keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn run(opts: DaemonOpts) -> Result<()> {
    let state_file = StateFile::new(&opts.state_dir);
    let state = state_file.load()?;
    // A resolv.conf left managed by a run that did not stop cleanly (kill -9, power loss)
    // is put back first, whatever `--dns` says now.
    match dns_host::restore_leftover(&opts.state_dir) {
        Ok(Some(p)) => {
            info!(path = %p.display(), "DNS: restored the resolv.conf a previous run left managed")
        }
        Ok(None) => {}
        Err(e) => {
            warn!(error = %format!("{e:#}"), "DNS: cannot restore the resolv.conf a previous run left managed")
        }
    }
    // Exit-node routes and rules a killed run left behind go first, then Ward's own sockets
    // are marked so an exit node's default route never captures them.
    match routing::restore_leftover(&opts.state_dir) {
        Ok(left) => {
            if left.exit_items > 0 {
                info!(
                    items = left.exit_items,
                    "removed the exit-node routes and rules a previous run left"
                );
            }
            if left.forwarding {
                info!("removed the forwarding rules (nftables inet ward_routes) a previous run left and restored the forwarding sysctls");
            }
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot remove the exit-node routes and rules a previous run left")
        }
    }
    mark_own_sockets();
    let listener = local_api::bind_socket(&opts.socket).await?;
    let start = match &state {
        None => {
            info!("not enrolled yet: run `ward up --token-file FILE`");
            false
        }
        Some(s) => s.enabled,
    };
    let route_opts = state.as_ref().map(|s| s.routes.clone()).unwrap_or_default();
    let d = Arc::new(Daemon {
        route_opts: Mutex::new(route_opts),
        collectors: collect::Collectors::new(&opts.posture),
        flow_state: flowlog::FlowStateFile::new(&opts.state_dir),
        flow_config: flowlog::config_from_env(),
        opts: opts.clone(),
        state_file,
        identity: Mutex::new(state),
        running: Mutex::new(None),
        last_agent: Mutex::new(None),
        transports: Default::default(),
        zone: watch::channel(crate::dns::Zone::empty(Default::default())).0,
        names: Default::default(),
        dns_status: Default::default(),
        pending_login: tokio::sync::Mutex::new(None),
        login_callback: tokio::sync::Mutex::new(None),
    });
    info!(socket = %opts.socket.display(), state_dir = %opts.state_dir.display(), "ward daemon started");
    if let Some(addr) = opts.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener on {addr}"))?;
        info!(addr = %l.local_addr()?, "metrics listening");
        let d = d.clone();
        tokio::spawn(ward_runtime::metrics::serve(
            l,
            ward_runtime::metrics::Limits::default(),
            move || {
                let text = d.metrics();
                async move { text }
            },
        ));
    }
    if start {
        d.clone().start().await?;
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

/// Marks Ward's own sockets with the exit node's firewall mark where the process may
/// (`CAP_NET_ADMIN`); where it may not, nothing is marked (and no exit node's routes can be
/// installed either).
fn mark_own_sockets() {
    let mark = routing::plan::EXIT_MARK;
    let probe = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
        ward_runtime::net::setsockopt_int(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            mark as libc::c_int,
        )
    });
    match probe {
        Ok(()) => ward_runtime::net::set_outbound_mark(mark),
        Err(e) => {
            info!(error = %e, "Ward's sockets are not marked (no CAP_NET_ADMIN): exit nodes cannot be used")
        }
    }
}

impl Daemon {
    /// Answers one request on a local API connection, if the caller's credentials allow it
    /// (see `local_api`); a connection whose credentials cannot be read gets nothing.
    async fn serve_api(self: Arc<Self>, stream: tokio::net::UnixStream) {
        let cred = stream.peer_cred();
        let (r, mut w) = stream.into_split();
        let mut line = String::new();
        let resp: Envelope<Response> = match BufReader::new(r)
            .take(MAX_API_LINE)
            .read_line(&mut line)
            .await
        {
            Ok(_) => match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    let allowed = match &cred {
                        Ok(c) => {
                            let access = local_api::access_for(c.uid(), c.gid());
                            local_api::authorize(access, c.uid(), &req).inspect_err(|_| {
                                local_api::log_refusal(c.uid(), &req);
                            })
                        }
                        Err(e) => Err(format!(
                            "permission denied: cannot read the caller's credentials: {e}"
                        )),
                    };
                    match allowed {
                        Err(why) => Envelope::err(why),
                        Ok(()) => match self.clone().handle(req).await {
                            Ok(v) => Envelope::ok(v),
                            Err(e) => Envelope::err(format!("{e:#}")),
                        },
                    }
                }
                Err(e) => Envelope::err(format!("bad request: {e}")),
            },
            Err(e) => Envelope::err(format!("reading request: {e}")),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        let _ = w.write_all(&out).await;
    }

    async fn handle(self: Arc<Self>, req: Request) -> Result<Response> {
        match req {
            Request::Status => Ok(Response::Status(Box::new(self.status()))),
            Request::Posture => Ok(Response::Posture(Box::new(self.posture()))),
            Request::Netcheck => Ok(Response::Netcheck(self.netcheck())),
            Request::Down => {
                self.stop().await;
                let saved = {
                    let mut g = lock(&self.identity);
                    g.as_mut().map(|st| {
                        st.enabled = false;
                        st.clone()
                    })
                };
                if let Some(st) = saved {
                    self.state_file.save(&st)?;
                }
                Ok(Response::Down(DownView {
                    state: crate::api::State::Stopped,
                }))
            }
            Request::Up {
                token,
                hostname,
                routes,
            } => {
                let changed = *lock(&self.route_opts) != routes;
                *lock(&self.route_opts) = routes.clone();
                if changed {
                    let mut g = lock(&self.identity);
                    if let Some(st) = g.as_mut() {
                        st.routes = routes;
                        if let Err(e) = self.state_file.save(st) {
                            warn!(error = %format!("{e:#}"), "cannot save the route options; a restart forgets them");
                        }
                    }
                }
                if changed {
                    // A running session picks the new routes up when it starts again.
                    self.stop().await;
                }
                self.up(token, hostname).await.map(Response::Up)
            }
            Request::LoginStart {
                coordinator,
                ca_sha256,
                hostname,
                pkce,
            } => self
                .login_start(coordinator, ca_sha256, hostname, pkce)
                .await
                .map(Response::Login),
            Request::LoginCallback { callback } => {
                let Some(tx) = self.login_callback.lock().await.take() else {
                    bail!("no browser sign-in is waiting for its redirect: run `ward up --login`")
                };
                if tx.send(callback).is_err() {
                    bail!("the sign-in ended before its redirect arrived");
                }
                Ok(Response::Login(crate::api::LoginView {
                    verification_uri: String::new(),
                    verification_uri_complete: None,
                    user_code: String::new(),
                    expires_in_secs: 0,
                    browser: None,
                }))
            }
            Request::LoginAbort => {
                // Dropping the sender ends the waiting task, which closes the connection.
                self.login_callback.lock().await.take();
                self.pending_login.lock().await.take();
                Ok(Response::Down(DownView {
                    state: crate::api::State::NeedsLogin,
                }))
            }
            Request::LoginWait => {
                let rx = self.pending_login.lock().await.take();
                let Some(rx) = rx else {
                    bail!("no sign-in in progress: run `ward up --login`")
                };
                match rx.await {
                    Ok(Ok(v)) => Ok(Response::Up(v)),
                    Ok(Err(e)) => bail!("{e}"),
                    Err(_) => bail!("the sign-in ended without an answer"),
                }
            }
        }
    }

    async fn up(
        self: Arc<Self>,
        token: Option<String>,
        hostname: Option<String>,
    ) -> Result<UpView> {
        let existing = lock(&self.identity).clone();
        let view = |st: &State| UpView {
            hostname: st.hostname.clone(),
            ipv4: st.ipv4,
            ipv6: st.ipv6,
            device_id: st.device_id.0,
            signed_in: None,
        };
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
                    *lock(&self.identity) = Some(st.clone());
                }
                self.clone().start().await?;
                Ok(view(&st))
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
                self.finish_enroll(tok.coordinator.clone(), tok.alternates.clone(), enrolled, key_pem)
                    .await
            }
        }
    }

    /// `ward up --login`: starts the sign-in and returns where the user completes it; the
    /// enrollment finishes in the background (`login_wait` reports it).
    async fn login_start(
        self: Arc<Self>,
        coordinator: String,
        ca_sha256: String,
        hostname: Option<String>,
        pkce: Option<ward_shared::wire::LoginPkce>,
    ) -> Result<crate::api::LoginView> {
        let enrolled = lock(&self.identity).clone();
        if let Some(st) = enrolled {
            return self.sign_in_again(st, pkce).await;
        }
        let fp: [u8; 32] = hex::decode(ca_sha256.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                anyhow!("--ca-sha256 must be 64 hex digits (the coordinator's CA fingerprint)")
            })?;
        let mut slot = self.pending_login.lock().await;
        if slot.is_some() {
            bail!("a sign-in is already in progress");
        }
        let hostname = hostname.unwrap_or_else(system_hostname);
        info!(%coordinator, %hostname, "signing in through the identity provider");
        let (answer, mut waiting) =
            control::login_start(&coordinator, fp, &hostname, &os_name(), pkce)
                .await
                .map_err(|e| anyhow!(sign_in_error(&e)))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        *slot = Some(rx);
        let callback = self.expect_browser_callback(&answer).await;
        let me = self.clone();
        tokio::spawn(async move {
            let expires_in = waiting.expires_in;
            let send = async |cb| waiting.send_callback(cb).await;
            if let Err(e) = me.pass_browser_callback(callback, expires_in, send).await {
                warn!(error = %e, "sign-in failed");
                let _ = tx.send(Err(e));
                return;
            }
            let res = match waiting.wait().await {
                Ok((enrolled, key_pem)) => me
                    .finish_enroll(coordinator, Vec::new(), enrolled, key_pem)
                    .await
                    .map_err(|e| format!("{e:#}")),
                Err(e) => Err(sign_in_error(&e)),
            };
            if let Err(e) = &res {
                warn!(error = %e, "sign-in failed");
            }
            let _ = tx.send(res);
        });
        Ok(login_view(answer))
    }

    /// When the coordinator chose the browser flow: the slot that the CLI's loopback listener
    /// fills with the browser's redirect (`Request::LoginCallback`).
    async fn expect_browser_callback(
        &self,
        answer: &control::LoginAnswer,
    ) -> Option<tokio::sync::oneshot::Receiver<ward_shared::wire::LoginCallback>> {
        match answer {
            control::LoginAnswer::Browser(_) => {
                let (cb_tx, cb_rx) = tokio::sync::oneshot::channel();
                *self.login_callback.lock().await = Some(cb_tx);
                Some(cb_rx)
            }
            control::LoginAnswer::Device(_) => None,
        }
    }

    /// Waits, until the sign-in expires, for the browser's redirect and passes it on with
    /// `send` (nothing to wait for in the device grant). The error says why the sign-in ends.
    async fn pass_browser_callback(
        &self,
        callback: Option<tokio::sync::oneshot::Receiver<ward_shared::wire::LoginCallback>>,
        expires_in: Duration,
        send: impl AsyncFnOnce(ward_shared::wire::LoginCallback) -> Result<()>,
    ) -> std::result::Result<(), String> {
        let Some(cb_rx) = callback else {
            return Ok(());
        };
        match tokio::time::timeout(expires_in, cb_rx).await {
            Ok(Ok(cb)) => send(cb).await.map_err(|e| format!("sign-in failed: {e:#}")),
            Ok(Err(_)) => Err("the browser sign-in was abandoned".to_string()),
            Err(_) => {
                self.login_callback.lock().await.take();
                Err("the sign-in was not completed in time".to_string())
            }
        }
    }

    /// `ward up --login` on an enrolled device: signs its user in again over a connection with
    /// the device certificate; the coordinator refreshes the device's identity facts and its
    /// access follows. Nothing local changes (keys, leases and the session stay).
    async fn sign_in_again(
        self: Arc<Self>,
        st: State,
        pkce: Option<ward_shared::wire::LoginPkce>,
    ) -> Result<crate::api::LoginView> {
        let mut slot = self.pending_login.lock().await;
        if slot.is_some() {
            bail!("a sign-in is already in progress");
        }
        info!(coordinator = %st.coordinator, hostname = %st.hostname, "signing in again through the identity provider");
        let (answer, mut waiting) = control::sign_in_again(
            &st.coordinator,
            &st.ca_der.0,
            &st.cert_der.0,
            &st.identity_key_pem,
            pkce,
        )
        .await
        .map_err(|e| anyhow!(sign_in_error(&e)))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        *slot = Some(rx);
        let callback = self.expect_browser_callback(&answer).await;
        let me = self.clone();
        tokio::spawn(async move {
            let expires_in = waiting.expires_in;
            let send = async |cb| waiting.send_callback(cb).await;
            if let Err(e) = me.pass_browser_callback(callback, expires_in, send).await {
                warn!(error = %e, "sign-in failed");
                let _ = tx.send(Err(e));
                return;
            }
            let res = match waiting.wait().await {
                Ok(done) => {
                    info!(user = %done.user, amr = ?done.amr, "signed in again");
                    Ok(UpView {
                        hostname: st.hostname.clone(),
                        ipv4: st.ipv4,
                        ipv6: st.ipv6,
                        device_id: st.device_id.0,
                        signed_in: Some(done),
                    })
                }
                Err(e) => Err(sign_in_error(&e)),
            };
            if let Err(e) = &res {
                warn!(error = %e, "signing in again failed");
            }
            let _ = tx.send(res);
        });
        Ok(login_view(answer))
    }

    /// Saves a new enrollment (token or sign-in) and starts the device.
    async fn finish_enroll(
        self: Arc<Self>,
        coordinator: String,
        alternates: Vec<String>,
        enrolled: ward_shared::wire::Enrolled,
        key_pem: String,
    ) -> Result<UpView> {
        // One address needs no list (and keeps the state file as it always was).
        let coordinators = if alternates.is_empty() {
            Vec::new()
        } else {
            std::iter::once(coordinator.clone())
                .chain(alternates)
                .collect()
        };
        let mut wg = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut wg);
        let st = State {
            version: STATE_VERSION,
            coordinator,
            coordinators,
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
            routes: lock(&self.route_opts).clone(),
        };
        self.state_file.save(&st)?;
        info!(device = %st.device_id, hostname = %st.hostname, ipv4 = %st.ipv4, "enrolled");
        *lock(&self.identity) = Some(st.clone());
        self.clone().start().await?;
        Ok(UpView {
            hostname: st.hostname.clone(),
            ipv4: st.ipv4,
            ipv6: st.ipv6,
            device_id: st.device_id.0,
            signed_in: None,
        })
    }

    /// Brings the data plane up (if configured), creates the agent core and starts the
    /// session loop, once.
    async fn start(self: Arc<Self>) -> Result<()> {
        if lock(&self.running).is_some() {
            return Ok(());
        }
        let Some(st) = lock(&self.identity).clone() else {
            bail!("not enrolled")
        };
        let mut key = [0u8; 32];
        if st.wg_private_key.0.len() != 32 {
            bail!("the WireGuard key in the state file is unusable");
        }
        key.copy_from_slice(&st.wg_private_key.0);
        let dataplane = match &self.opts.tun {
            Some(tun) => {
                let v6_prefix = {
                    let mut b = st.ipv6.octets();
                    b[6..].fill(0);
                    std::net::Ipv6Addr::from(b)
                };
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
                Some(Arc::new(dp))
            }
            None => None,
        };
        let dns = match (&dataplane, &self.opts.tun) {
            (Some(_), Some(tun)) => self.start_dns(&st, tun).await,
            _ => None,
        };
        let routes = lock(&self.route_opts).clone();
        let mut agent = session::new_agent(&st, key, self.opts.posture_interval, routes);
        agent.configure_flows(self.flow_config.clone(), self.flow_state.load());
        let agent = Arc::new(Mutex::new(agent));
        let (stop, stop_rx) = watch::channel(false);
        let me = self.clone();
        let (a, dp) = (agent.clone(), dataplane.clone());
        let task = tokio::spawn(async move { me.drive(a, dp, stop_rx).await });
        *lock(&self.last_agent) = Some(agent.clone());
        let lost = {
            let mut g = lock(&self.running);
            if g.is_some() {
                // Another `up` won the race; this run is not needed.
                let _ = stop.send(true);
                dns
            } else {
                *g = Some(Running {
                    agent,
                    dataplane,
                    stop,
                    task,
                    dns,
                });
                None
            }
        };
        if let Some(d) = lost {
            d.stop().await;
        }
        Ok(())
    }

    /// Starts the resolver on the overlay addresses and points the host at it. A failure is
    /// logged and shown in `ward status`; the device stays on the network without names.
    async fn start_dns(&self, st: &State, tun: &str) -> Option<dns::DnsServer> {
        *lock(&self.dns_status) = Default::default();
        // No names from a previous run until this run's first netmap.
        let domain = self.zone.borrow().domain().clone();
        self.zone.send_replace(crate::dns::Zone::empty(domain));
        self.names.clear();
        let host = dns_host::HostDns::choose(
            self.opts.dns,
            &self.opts.resolv_conf,
            &self.opts.state_dir,
            tun,
        )?;
        match dns::DnsServer::start(
            st.ipv4,
            st.ipv6,
            53,
            host,
            self.zone.subscribe(),
            self.names.clone(),
            self.dns_status.clone(),
        )
        .await
        {
            Ok(d) => Some(d),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "DNS: the resolver could not start; device names will not resolve");
                lock(&self.dns_status).error = Some(format!("{e:#}"));
                None
            }
        }
    }

    /// Publishes the names of the agent's current netmap to the resolver (when they changed).
    /// Without a netmap (a revoked device) no Ward name resolves.
    pub(super) fn publish_zone(&self, agent: &Agent) {
        let zone = match agent.netmap() {
            Some(nm) => crate::dns::Zone::from_netmap(nm),
            None => crate::dns::Zone::empty(self.zone.borrow().domain().clone()),
        };
        self.zone.send_if_modified(|z| {
            if *z == zone {
                false
            } else {
                *z = zone;
                true
            }
        });
    }

    async fn stop(&self) {
        let Some(r) = lock(&self.running).take() else {
            return;
        };
        let _ = r.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), r.task).await;
        if let Some(d) = r.dns {
            d.stop().await;
        }
        // The window being filled goes into the spool, saved for the next run.
        let flows = lock(&r.agent).close_flow_window();
        if let Err(e) = self.flow_state.save(&flows) {
            warn!(error = %format!("{e:#}"), "cannot save the flow log state");
        }
        if let Some(dp) = r.dataplane {
            match Arc::try_unwrap(dp) {
                Ok(dp) => dp.shutdown().await,
                Err(_) => warn!("data plane still in use at shutdown; it stops when released"),
            }
        }
    }

    fn status(&self) -> crate::api::StatusView {
        let identity = lock(&self.identity).clone();
        let exit_node = lock(&self.route_opts).exit_node.clone();
        let running = lock(&self.running);
        let agent = running.as_ref().map(|r| lock(&r.agent));
        let mut view = status::status(status::Sources {
            identity: identity.as_ref(),
            agent: agent.as_deref(),
            dataplane: running.as_ref().and_then(|r| r.dataplane.as_deref()),
            tun: self.opts.tun.as_deref(),
            transports: &lock(&self.transports),
            exit_node: exit_node.as_deref(),
        });
        let dns_on = running.as_ref().is_some_and(|r| r.dns.is_some());
        self.add_dns(&mut view, dns_on);
        view
    }

    /// The DNS part of the status view: the mode, this device's name, the peers' names.
    fn add_dns(&self, view: &mut crate::api::StatusView, running: bool) {
        let zone = self.zone.borrow().clone();
        let domain = zone.domain().to_string();
        let names: std::collections::BTreeSet<String> = zone.names().map(|(n, _)| n).collect();
        for p in &mut view.peers {
            if names.contains(&p.hostname) {
                p.dns_name = Some(format!("{}.{domain}", p.hostname));
            }
        }
        let s = lock(&self.dns_status).clone();
        if let Some(d) = view.device.as_mut() {
            let mode = match (running, s.mode) {
                (true, Some(m)) => m.to_string(),
                _ => "off".to_string(),
            };
            d.dns = Some(crate::api::DnsView {
                name: (mode != "off").then(|| format!("{}.{domain}", d.hostname)),
                mode,
                domain,
                listen: if running { s.listen } else { vec![] },
                upstreams: if running { s.upstreams } else { vec![] },
                queries: s.queries,
                dropped: s.dropped,
                error: s.error,
            });
        }
    }

    /// This device's metrics (`--metrics-listen`): the status view and the data plane's
    /// counters.
    fn metrics(&self) -> String {
        let view = self.status();
        let dp = lock(&self.running)
            .as_ref()
            .and_then(|r| r.dataplane.as_deref())
            .map(|dp| metrics::DataPlaneSnapshot {
                counters: dp.counters(),
                path: dp.path_counters(),
                discovery: dp.discovery_counters(),
            });
        metrics::render(&view, dp.as_ref())
    }

    /// What address discovery found (empty while stopped).
    fn netcheck(&self) -> crate::api::NetcheckView {
        let running = lock(&self.running);
        let agent = running.as_ref().map(|r| lock(&r.agent));
        status::netcheck(agent.as_deref(), &lock(&self.transports))
    }

    /// The latest posture report and the coordinator's verdict (for `ward posture`).
    fn posture(&self) -> crate::api::PostureView {
        let agent = lock(&self.last_agent).clone();
        let g = agent.as_ref().map(|a| lock(a));
        status::posture(
            g.as_deref(),
            self.opts.posture.custom_checks.keys().cloned().collect(),
        )
    }
}

/// A failed sign-in in one line: the coordinator's refusal with its reason, or what failed.
fn sign_in_error(e: &anyhow::Error) -> String {
    match e.downcast_ref::<Refused>() {
        Some(r) => format!("sign-in refused by the coordinator: {}", r.message),
        None => format!("sign-in failed: {e:#}"),
    }
}

/// Where the user completes a sign-in, as `ward up --login` shows it.
fn login_view(answer: control::LoginAnswer) -> crate::api::LoginView {
    match answer {
        control::LoginAnswer::Device(pending) => crate::api::LoginView {
            verification_uri: pending.verification_uri,
            verification_uri_complete: pending.verification_uri_complete,
            user_code: pending.user_code,
            expires_in_secs: pending.expires_in_secs,
            browser: None,
        },
        control::LoginAnswer::Browser(a) => crate::api::LoginView {
            verification_uri: String::new(),
            verification_uri_complete: None,
            user_code: String::new(),
            expires_in_secs: a.expires_in_secs,
            browser: Some(a),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// Sends one request line to `socket` as `uid` (a separate process) and returns what it
    /// read, or `connect failed: …`.
    fn call_as(uid: u32, socket: &Path, line: &str) -> String {
        use std::os::unix::process::CommandExt;
        let script = "import socket, sys\n\
            s = socket.socket(socket.AF_UNIX)\n\
            try:\n    s.connect(sys.argv[1])\n\
            except OSError as e:\n    print('connect failed:', e.strerror); sys.exit(0)\n\
            s.sendall(sys.argv[2].encode() + b'\\n')\n\
            print(s.makefile().readline().strip())\n";
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(socket)
            .arg(line)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_root_changes_the_device_through_the_local_api() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (to run a client as another user)");
            return;
        }
        const NOBODY: u32 = 65534;
        let top = tempfile::tempdir().unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let run_dir = top.path().join("run");
        let sock = run_dir.join("ward.sock");
        let listener = local_api::bind_socket(&sock).await.unwrap();
        let group = local_api::ward_group().is_some();
        assert_eq!(mode(&run_dir), if group { 0o750 } else { 0o700 });
        assert_eq!(mode(&sock), if group { 0o660 } else { 0o600 });
        // No leftovers of the private bind directory.
        assert_eq!(std::fs::read_dir(&run_dir).unwrap().count(), 1);

        let posture = crate::posture::CollectorConfig::default();
        let d = Arc::new(Daemon {
            route_opts: Default::default(),
            collectors: collect::Collectors::new(&posture),
            opts: DaemonOpts {
                state_dir: top.path().join("state"),
                socket: sock.clone(),
                tun: None,
                port: 0,
                posture,
                posture_interval: Duration::from_secs(30),
                quic_retry: control::QUIC_RETRY_EVERY,
                metrics_listen: None,
                dns: DnsSetting::Off,
                resolv_conf: PathBuf::from(DEFAULT_RESOLV_CONF),
            },
            state_file: StateFile::new(&top.path().join("state")),
            flow_state: flowlog::FlowStateFile::new(&top.path().join("state")),
            flow_config: Default::default(),
            identity: Mutex::new(None),
            running: Mutex::new(None),
            last_agent: Mutex::new(None),
            transports: Default::default(),
            zone: watch::channel(crate::dns::Zone::empty(Default::default())).0,
            names: Default::default(),
            dns_status: Default::default(),
            pending_login: tokio::sync::Mutex::new(None),
            login_callback: tokio::sync::Mutex::new(None),
        });
        let server = tokio::spawn({
            let d = d.clone();
            async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    tokio::spawn(d.clone().serve_api(stream));
                }
            }
        });
        let down = r#"{"cmd":"down"}"#;
        let status = r#"{"cmd":"status"}"#;
        let s = sock.clone();
        // Another user cannot even reach the socket.
        let got = tokio::task::spawn_blocking(move || call_as(NOBODY, &s, down))
            .await
            .unwrap();
        assert!(
            got.starts_with("connect failed: Permission denied"),
            "{got}"
        );

        // Even where the socket is reachable (a loosened directory and socket), the caller's
        // credentials decide: no change, and no read either outside the `ward` group.
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let s = sock.clone();
        let (got_down, got_status) = tokio::task::spawn_blocking(move || {
            (call_as(NOBODY, &s, down), call_as(NOBODY, &s, status))
        })
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&got_down).unwrap();
        assert_eq!(v["ok"], false, "{got_down}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .starts_with("permission denied: uid 65534 may not run `down`"),
            "{got_down}"
        );
        let v: serde_json::Value = serde_json::from_str(&got_status).unwrap();
        assert_eq!(v["ok"], false, "{got_status}");

        // Root may.
        let _: crate::api::StatusView = crate::api::call(&sock, &Request::Status).await.unwrap();
        let _: DownView = crate::api::call(&sock, &Request::Down).await.unwrap();
        server.abort();
    }
}
