//! The session loop: turns socket, timer, data-plane and posture-thread events into the agent
//! core's `handle_*` calls and carries out what it polls out (open or drop the control session,
//! over QUIC or, where UDP does not get through, TLS over TCP; send its messages, configure
//! the data plane, save the state file, draw keys, make CSRs). While the session is on TCP,
//! the loop checks every [`control::QUIC_RETRY_EVERY`] (`DaemonOpts::quic_retry`) whether QUIC gets through again and, if
//! so, reconnects (QUIC first).

use anyhow::Result;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use ward_shared::lease;
use ward_shared::posture::PostureReport;
use ward_shared::relay::SignedTicket;
use ward_shared::wire::{Bytes, DeviceUpdate, WgPublicKey, MAX_ENDPOINTS};

use super::relays::{Credentials, RelayClients};
use super::{host, lock, Daemon};
use crate::agent::{
    Agent, AgentConfig, DataPlaneEvent, Event, Now, PrivateKey, RelayConnEvent, RelayOut,
};
use crate::control::{self, Channel};
use crate::dataplane::DataPlane;
use crate::state::State;
use ward_runtime::now_ms;
use ward_runtime::stream::Transport;

type Opening = Pin<Box<dyn Future<Output = Result<Channel>> + Send>>;

pub(super) fn new_agent(
    st: &State,
    key: [u8; 32],
    posture_interval: Duration,
    routes: crate::agent::routes::RouteOptions,
) -> Agent {
    let now = now();
    let mut agent = Agent::new(
        AgentConfig {
            device_id: st.device_id,
            ipv4: st.ipv4,
            ipv6: st.ipv6,
            lease_key: lease::issuer_key(&st.lease_key.0),
            private_key: PrivateKey(key),
            cert_not_after_ms: st.cert_not_after_ms,
            posture_interval,
            os: host::os_name(),
            version: env!("CARGO_PKG_VERSION").into(),
            seed: rand::random(),
            routes,
            protocol: ward_shared::wire::PROTOCOL_VERSION,
        },
        now,
    );
    agent.set_coordinators(st.coordinator_list(), Some(st.coordinator.clone()));
    agent
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_ms: now_ms(),
    }
}

/// What the loop owns besides the agent.
struct Link {
    endpoint: Option<quinn::Endpoint>,
    channel: Option<Channel>,
    opening: Option<Opening>,
    posture_tx: mpsc::Sender<PostureReport>,
    /// Relay names resolved off the loop: (`HOST:PORT`, address or error).
    resolved_tx: mpsc::Sender<Resolved>,
    /// One connection per relay the agent asks for.
    relays: RelayClients,
    /// A check whether QUIC reaches the coordinator again, while the session is on TCP.
    probe: Option<tokio::task::JoinHandle<bool>>,
    /// Kernel routes and forwarding installed for routed prefixes.
    routing: super::routing::HostRouting,
    /// When the daemon lets go of the read-only pages it no longer runs.
    pages: PageRelease,
}

/// How often the daemon lets go of read-only pages once it is on the network: code it ran since
/// (a rotation, a reconnect) is mapped again by its next use, not held until memory runs short.
const RELEASE_PAGES_EVERY: Duration = Duration::from_secs(600);

/// When the daemon drops its mappings of the program's clean read-only pages
/// ([`ward_runtime::pages`]): the first time the data plane has peers (start-up, enrollment and
/// the first netmap are behind it, the traffic it carries is ahead), then at most every
/// [`RELEASE_PAGES_EVERY`], checked as the loop turns.
#[derive(Debug, Default)]
struct PageRelease {
    /// Peers were given to the data plane since the last release.
    peers_set: bool,
    last: Option<Instant>,
}

impl PageRelease {
    /// The data plane was given peers.
    fn handle_peers_set(&mut self) {
        self.peers_set = true;
    }

    /// Whether to release now (and if so, counts it as done).
    fn poll_due(&mut self, now: Instant) -> bool {
        let due = match self.last {
            None => self.peers_set,
            Some(t) => now.saturating_duration_since(t) >= RELEASE_PAGES_EVERY,
        };
        if due {
            self.last = Some(now);
            self.peers_set = false;
        }
        due
    }
}

type Resolved = (String, Result<SocketAddr, String>);

/// A relay name that does not resolve within this long counts as failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Daemon {
    /// Runs until `stop` changes.
    pub(super) async fn drive(
        self: Arc<Self>,
        agent: Arc<Mutex<Agent>>,
        dp: Option<Arc<DataPlane>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let endpoint = control::client_endpoint()
            .inspect_err(|e| warn!(error = %format!("{e:#}"), "control channel unavailable"))
            .ok();
        let (posture_tx, mut posture_rx) = mpsc::channel::<PostureReport>(1);
        let (resolved_tx, mut resolved_rx) = mpsc::channel::<Resolved>(16);
        let (relay_tx, mut relay_rx) = mpsc::channel::<RelayConnEvent>(256);
        let mut relays = RelayClients::new(endpoint.clone(), dp.clone(), relay_tx);
        relays.transports = self.transports.clone();
        let mut link = Link {
            endpoint,
            channel: None,
            opening: None,
            posture_tx,
            resolved_tx,
            relays,
            probe: None,
            routing: super::routing::HostRouting::start(
                self.opts.tun.clone(),
                self.opts.state_dir.clone(),
                lock(&self.route_opts).exit_node.is_some(),
            ),
            pages: PageRelease::default(),
        };
        let mut retry_quic = tokio::time::interval(self.opts.quic_retry);
        retry_quic.reset();

        loop {
            self.execute(&agent, dp.as_deref(), &mut link);
            if dp.is_some() && link.pages.poll_due(Instant::now()) {
                let bytes = ward_runtime::pages::release_read_only_pages();
                tracing::debug!(bytes, "released read-only pages");
            }
            // Saved before the loop sends what the agent queued (a new report's number first).
            let flows = lock(&agent).take_flow_state(Instant::now());
            if let Some(st) = flows {
                if let Err(e) = self.flow_state.save(&st) {
                    warn!(error = %format!("{e:#}"), "cannot save the flow log state");
                }
            }
            // Punch requests the data plane wants sent (it started probing those peers; its
            // timer thread wakes this loop for the ones it starts).
            if let Some(d) = &dp {
                let peers = d.take_punch_requests();
                if !peers.is_empty() {
                    lock(&agent).handle_dataplane_event(DataPlaneEvent::PunchWanted(peers), now());
                }
                // Peers on demand the data plane holds packets for (its packet threads wake
                // this loop at the end of the batch that wanted them).
                let wants = d.take_wants();
                if !wants.is_empty() {
                    lock(&agent).handle_dataplane_event(DataPlaneEvent::PeersWanted(wants), now());
                }
            }
            // Names the resolver holds queries for (its task wakes this loop when it wants one).
            let names = self.names.take_wants();
            if !names.is_empty() {
                lock(&agent).handle_names_wanted(names);
            }
            lock(&self.transports).control = link.channel.as_ref().map(|c| c.transport);
            // Send what the agent queued; a failed send ends the session.
            loop {
                let Some(msg) = lock(&agent).poll_transmit() else {
                    break;
                };
                let Some(ch) = link.channel.as_mut() else {
                    continue;
                };
                if let Err(e) = ch.send(&msg).await {
                    link.channel = None;
                    lock(&agent).handle_disconnected(Some(format!("{e:#}")), now());
                    self.execute(&agent, dp.as_deref(), &mut link);
                }
            }
            let deadline = lock(&agent).poll_timeout();
            let on_tcp = link
                .channel
                .as_ref()
                .is_some_and(|c| c.transport == Transport::Tcp);
            let channel = &mut link.channel;
            let opening = &mut link.opening;
            let probe = &mut link.probe;
            // The two `expect`s below cannot fire: each branch runs only when its option is
            // `Some` (the branch condition), and nothing else touches it while select! polls.
            tokio::select! {
                _ = stop.changed() => break,
                res = async { opening.as_mut().expect("guarded by the branch condition").await }, if opening.is_some() => {
                    link.opening = None;
                    let mut a = lock(&agent);
                    match res {
                        Ok(ch) => {
                            link.channel = Some(ch);
                            a.handle_connected(hello_update(dp.as_deref()), now());
                        }
                        Err(e) if is_certificate_rejection(&format!("{e:#}")) => {
                            warn!(error = %format!("{e:#}"), "the coordinator refused the certificate; retrying the same address");
                            a.handle_refused(format!("{e:#}"), now());
                        }
                        Err(e) => a.handle_disconnected(Some(format!("{e:#}")), now()),
                    }
                }
                msg = async { channel.as_mut().expect("guarded by the branch condition").recv().await }, if channel.is_some() => {
                    let mut a = lock(&agent);
                    match msg {
                        Ok(Some(m)) => a.handle_coordinator_msg(m, now()),
                        Ok(None) => {
                            link.channel = None;
                            a.handle_disconnected(None, now());
                        }
                        Err(e) => {
                            link.channel = None;
                            a.handle_disconnected(Some(format!("{e:#}")), now());
                        }
                    }
                    // Netmaps and deltas arrive here: the resolver answers from the new one.
                    self.publish_zone(&a);
                }
                Some(report) = posture_rx.recv() => lock(&agent).handle_posture(report, now()),
                Some((addr, result)) = resolved_rx.recv() => {
                    lock(&agent).handle_relay_resolved(&addr, result, now());
                }
                Some(ev) = relay_rx.recv() => lock(&agent).handle_relay_event(ev, now()),
                _ = retry_quic.tick(), if on_tcp && probe.is_none() => {
                    let st = lock(&self.identity).clone();
                    let addr = lock(&agent).coordinator().map(str::to_string);
                    if let (Some(st), Some(ep), Some(addr)) = (st, link.endpoint.clone(), addr) {
                        link.probe = Some(tokio::spawn(quic_probe(ep, st, addr)));
                    }
                }
                // The `expect` cannot fire: the branch runs only while `probe` is `Some`.
                done = async { probe.as_mut().expect("guarded by the branch condition").await }, if probe.is_some() => {
                    link.probe = None;
                    if done.unwrap_or(false) && on_tcp {
                        if let Some(ch) = link.channel.take() {
                            info!("QUIC reaches the coordinator again: moving the control session back to UDP");
                            ch.close("moving to QUIC");
                            lock(&agent).handle_disconnected(Some("moving the control session back to QUIC".into()), now());
                        }
                    }
                }
                _ = async { match &dp {
                    Some(d) => d.punch_ready().await,
                    None => std::future::pending().await,
                } } => {}
                _ = async { match &dp {
                    Some(d) => d.wants_ready().await,
                    None => std::future::pending().await,
                } } => {}
                _ = self.names.wants_ready() => {}
                // A fresh wait each turn loses nothing: the data plane's notification is kept
                // until someone waits.
                _ = async { match &dp {
                    Some(d) => d.discovery_ready().await,
                    None => std::future::pending().await,
                } } => {
                    if let Some(d) = &dp {
                        let mut a = lock(&agent);
                        for (from, resp) in d.take_discovery() {
                            a.handle_discovery(from, resp, now());
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let on_old = dp.as_ref().map_or(0, |d| d.peers_on_old_key());
                    let mut a = lock(&agent);
                    let now = now();
                    a.handle_dataplane_event(DataPlaneEvent::PeersOnOldKey(on_old), now);
                    a.handle_tick(now);
                }
            }
        }
        link.relays.shutdown();
        link.routing.clear().await;
        if let Some(p) = link.probe.take() {
            p.abort();
        }
        *lock(&self.transports) = Default::default();
        if let Some(ch) = link.channel.take() {
            ch.close("stopping");
        }
        if let Some(e) = link.endpoint {
            e.close(0u32.into(), b"stopping");
        }
    }

    /// Carries out the agent's events until it has none left (some of them feed it inputs).
    fn execute(&self, agent: &Mutex<Agent>, dp: Option<&DataPlane>, link: &mut Link) {
        loop {
            let Some(ev) = lock(agent).poll_event() else {
                return;
            };
            match ev {
                Event::Connect => {
                    link.channel = None;
                    let st = lock(&self.identity).clone();
                    let addr = lock(agent).coordinator().map(str::to_string);
                    match st.zip(addr) {
                        // Without a UDP socket the session goes over TCP alone.
                        Some((st, addr)) => {
                            link.opening = Some(Box::pin(open(link.endpoint.clone(), st, addr)));
                        }
                        None => lock(agent).handle_disconnected(
                            Some("the control channel is unavailable".into()),
                            now(),
                        ),
                    }
                }
                Event::SaveCoordinators { addrs, preferred } => {
                    let res = self.save(|st| {
                        if let Some(p) = preferred {
                            st.coordinator = p;
                        }
                        st.coordinators = addrs;
                    });
                    if let Err(e) = res {
                        warn!(error = %format!("{e:#}"), "cannot save the coordinator addresses");
                    }
                }
                Event::CloseSession => {
                    if let Some(ch) = link.channel.take() {
                        ch.close("closing");
                    }
                }
                Event::Connected { .. } => {}
                Event::Disconnected { revoked, retry_in } => {
                    let a = lock(agent);
                    if revoked {
                        warn!(
                            error = a.last_error().unwrap_or_default(),
                            "the coordinator revoked this device; left the network"
                        );
                    }
                    tracing::debug!(
                        retry_in_ms = retry_in.as_millis() as u64,
                        "reconnecting later"
                    );
                }
                Event::SetPeers(peers) => {
                    if let Some(dp) = dp {
                        dp.set_peers(peers);
                        link.pages.handle_peers_set();
                    }
                }
                // The data plane takes whole sets: it is given the agent's, which these
                // changes led to (no second copy of the peer list is kept here).
                Event::UpdatePeers(_) => {
                    if let Some(dp) = dp {
                        let peers = lock(agent).configured_peers();
                        dp.set_peers(peers);
                        link.pages.handle_peers_set();
                    }
                }
                // The rules are copied (the data plane keeps them), the sets are read: the
                // netmap keeps its own until a delta changes them.
                Event::SetFilter { rules, sets } => {
                    if let Some(dp) = dp {
                        dp.set_filter_with_sets(rules.to_vec(), &sets);
                    }
                }
                Event::SetRoutes { served, reached } => {
                    link.routing.apply(&served, &reached);
                    if let Some(dp) = dp {
                        dp.set_routes(served);
                    }
                    tracing::info!(
                        reached = ?reached,
                        "routed prefixes reached through peers changed"
                    );
                }
                Event::SetShadowFilter(rules) => {
                    if let Some(dp) = dp {
                        dp.set_shadow_filter(rules);
                    }
                }
                Event::SetClockOffset(o) => {
                    if let Some(dp) = dp {
                        dp.set_clock_offset_ms(o);
                    }
                }
                Event::SwitchKey { key, lease } => {
                    // Saved first: after a crash the device must come back with the key its
                    // peers now hold.
                    if let Err(e) = self.save(|st| st.wg_private_key = Bytes(key.0.to_vec())) {
                        error!(error = %format!("{e:#}"), serial = lease.lease.serial, "saving the new WireGuard key failed");
                    }
                    if let Some(dp) = dp {
                        dp.rotate_key(key.0);
                    }
                }
                Event::SaveCert {
                    cert_der,
                    not_after_ms,
                } => {
                    if let Err(e) = self.save(|st| {
                        st.cert_der = cert_der;
                        st.cert_not_after_ms = not_after_ms;
                    }) {
                        error!(error = %format!("{e:#}"), "saving the renewed certificate failed");
                    }
                }
                Event::SelfName(name) => {
                    let name = name.to_string();
                    let renamed = lock(&self.identity)
                        .as_ref()
                        .is_some_and(|st| st.hostname != name);
                    if renamed {
                        info!(hostname = %name, "this device's name changed at the coordinator");
                        if let Err(e) = self.save(|st| st.hostname = name) {
                            error!(error = %format!("{e:#}"), "saving the device's new name failed");
                        }
                    }
                }
                Event::NeedKey => {
                    let mut k = [0u8; 32];
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
                    lock(agent).provide_key(PrivateKey(k));
                }
                Event::NeedCsr => match self.csr() {
                    Ok(der) => lock(agent).handle_csr(der),
                    Err(e) => warn!(error = %format!("{e:#}"), "cannot make a certificate request"),
                },
                Event::NeedUpdate => lock(agent).handle_local_update(hello_update(dp)),
                Event::ResolveRelay(addr) => {
                    let tx = link.resolved_tx.clone();
                    tokio::spawn(async move {
                        let res = tokio::time::timeout(
                            RESOLVE_TIMEOUT,
                            tokio::net::lookup_host(addr.clone()),
                        )
                        .await;
                        let result = match res {
                            Ok(Ok(mut addrs)) => {
                                addrs.next().ok_or_else(|| "no address".to_string())
                            }
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("timed out".to_string()),
                        };
                        let _ = tx.send((addr, result)).await;
                    });
                }
                Event::Relay(RelayOut::Connect {
                    relay,
                    addr,
                    ticket,
                }) => match self.relay_credentials(ticket) {
                    Ok(c) => link.relays.connect(relay, addr, c),
                    Err(e) => {
                        warn!(%relay, error = %format!("{e:#}"), "cannot connect to the relay")
                    }
                },
                Event::Relay(RelayOut::Ticket { relay, ticket }) => {
                    match self.relay_credentials(ticket) {
                        Ok(c) => link.relays.update(&relay, c),
                        Err(e) => {
                            warn!(%relay, error = %format!("{e:#}"), "cannot present the ticket")
                        }
                    }
                }
                Event::Relay(RelayOut::Disconnect { relay }) => link.relays.disconnect(&relay),
                Event::SetRelays(list) => {
                    if let Some(dp) = dp {
                        dp.set_relays(list);
                    }
                }
                Event::SendDiscovery { dst, datagram } => {
                    if let Some(dp) = dp {
                        dp.send_discovery(dst, &datagram);
                    }
                }
                Event::Punch { peer, endpoints } => {
                    if let Some(dp) = dp {
                        dp.punch(peer, &endpoints);
                    }
                }
                Event::NetworkChanged => {
                    if let Some(dp) = dp {
                        dp.network_changed();
                    }
                }
                Event::SetOnDemand(on) => {
                    if let Some(dp) = dp {
                        dp.set_on_demand(on);
                    }
                }
                Event::RefusePeer(by) => {
                    if let Some(dp) = dp {
                        dp.refuse(by);
                    }
                }
                Event::RefuseName(name) => self.names.refuse(name),
                Event::TakeDeniedFlows => {
                    let flows = dp.map(|d| d.take_denied_flows()).unwrap_or_default();
                    if !flows.is_empty() {
                        lock(agent)
                            .handle_dataplane_event(DataPlaneEvent::DeniedFlows(flows), now());
                    }
                }
                Event::TakeFlowSamples => {
                    let (samples, dropped) = dp.map(|d| d.take_flow_samples()).unwrap_or_default();
                    lock(agent).handle_dataplane_event(
                        DataPlaneEvent::FlowSamples { samples, dropped },
                        now(),
                    );
                }
                Event::CollectPosture {
                    wants,
                    seq,
                    clock_offset_ms,
                } => {
                    let Some(id) = lock(&self.identity).as_ref().map(|s| s.device_id) else {
                        continue;
                    };
                    self.collectors
                        .start(wants, id, seq, clock_offset_ms, link.posture_tx.clone());
                }
            }
        }
    }

    /// Changes the identity and saves it.
    fn save(&self, change: impl FnOnce(&mut State)) -> Result<()> {
        let mut g = lock(&self.identity);
        let Some(st) = g.as_mut() else {
            anyhow::bail!("not enrolled")
        };
        change(st);
        self.state_file.save(st)
    }

    /// The ticket with a relay TLS config for the device certificate held now.
    fn relay_credentials(&self, ticket: SignedTicket) -> Result<Credentials> {
        let g = lock(&self.identity);
        let st = g.as_ref().ok_or_else(|| anyhow::anyhow!("not enrolled"))?;
        let configs = control::relay_configs(&st.ca_der.0, &st.cert_der.0, &st.identity_key_pem)?;
        Ok(Credentials { ticket, configs })
    }

    fn csr(&self) -> Result<Vec<u8>> {
        let pem = lock(&self.identity)
            .as_ref()
            .map(|s| s.identity_key_pem.clone())
            .ok_or_else(|| anyhow::anyhow!("not enrolled"))?;
        let key = rcgen::KeyPair::from_pem(&pem)?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
        Ok(csr.der().to_vec())
    }
}

/// Opens a mutual-TLS control session to the coordinator at `coordinator` (the address the
/// agent chose), over QUIC or TLS/TCP.
async fn open(
    endpoint: Option<quinn::Endpoint>,
    st: State,
    coordinator: String,
) -> Result<Channel> {
    let addrs = control::resolve(&coordinator).await?;
    let cfgs = control::session_configs(&st.ca_der.0, &st.cert_der.0, &st.identity_key_pem)?;
    let ch = Channel::open_either(endpoint.as_ref(), &cfgs, &addrs).await?;
    info!(%coordinator, transport = %ch.transport, "control session open");
    Ok(ch)
}

/// Whether a failed session attempt was a certificate rejection (a TLS alert about a
/// certificate from either side, over QUIC or TCP): every replica shares the verdict, so the
/// agent retries the same address instead of failing over. Anything else (refused, timed out,
/// reset, another TLS failure) moves to the next address.
pub(super) fn is_certificate_rejection(error: &str) -> bool {
    // TLS alerts: bad_certificate 42, unsupported_certificate 43, certificate_revoked 44,
    // certificate_expired 45, certificate_unknown 46, unknown_ca 48, access_denied 49,
    // certificate_required 116; QUIC reports them as crypto error codes.
    const QUIC: [&str; 8] = ["42", "43", "44", "45", "46", "48", "49", "116"];
    const TCP: [&str; 8] = [
        "BadCertificate",
        "UnsupportedCertificate",
        "CertificateRevoked",
        "CertificateExpired",
        "CertificateUnknown",
        "UnknownCA",
        "AccessDenied",
        "CertificateRequired",
    ];
    error.contains("invalid peer certificate")
        || QUIC.iter().any(|c| {
            error
                .split("handshake failed: error ")
                .skip(1)
                .any(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next() == Some(c))
        })
        || TCP
            .iter()
            .any(|a| error.contains(&format!("received fatal alert: {a}")))
}

/// Whether a QUIC handshake with the coordinator at `coordinator` completes now.
async fn quic_probe(endpoint: quinn::Endpoint, st: State, coordinator: String) -> bool {
    let Ok(addrs) = control::resolve(&coordinator).await else {
        return false;
    };
    let Ok(cfg) = control::session_config(&st.ca_der.0, &st.cert_der.0, &st.identity_key_pem)
    else {
        return false;
    };
    control::quic_gets_through(
        &endpoint,
        cfg,
        &addrs,
        ward_shared::wire::COORDINATOR_SERVER_NAME,
        "coordinator",
    )
    .await
}

/// This device's data-plane key, port and interface endpoints; the agent adds the reflexive
/// candidates and its home relay, and always sends the whole update.
fn hello_update(dp: Option<&DataPlane>) -> DeviceUpdate {
    let Some(dp) = dp else {
        return DeviceUpdate::default();
    };
    let port = dp.local_port();
    DeviceUpdate {
        advertise_exit_node: Default::default(),
        advertise_routes: Default::default(),
        wg_public_key: Some(WgPublicKey(dp.public_key())),
        wg_port: port,
        local_endpoints: host::local_addresses()
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .take(MAX_ENDPOINTS)
            .collect(),
        home_relay: None,
        // The data plane carries out forwarded punches.
        punch: true,
    }
}

#[cfg(test)]
mod tests {
    use super::{is_certificate_rejection, PageRelease, RELEASE_PAGES_EVERY};
    use std::time::{Duration, Instant};

    #[test]
    fn pages_are_released_once_peers_are_set_then_every_period() {
        let t0 = Instant::now();
        let mut p = PageRelease::default();
        // Before any peers: start-up is still going on.
        assert!(!p.poll_due(t0));
        assert!(!p.poll_due(t0 + RELEASE_PAGES_EVERY * 2));
        p.handle_peers_set();
        assert!(p.poll_due(t0 + Duration::from_secs(1)));
        // Not again on the next turns, nor on the next netmap, until the period is over.
        assert!(!p.poll_due(t0 + Duration::from_secs(2)));
        p.handle_peers_set();
        assert!(!p.poll_due(t0 + RELEASE_PAGES_EVERY));
        assert!(p.poll_due(t0 + Duration::from_secs(1) + RELEASE_PAGES_EVERY));
        assert!(!p.poll_due(t0 + Duration::from_secs(2) + RELEASE_PAGES_EVERY));
    }

    #[test]
    fn certificate_rejections_are_told_apart_from_unreachable_coordinators() {
        for e in [
            "connecting: aborted by peer: the cryptographic handshake failed: error 42",
            "the cryptographic handshake failed: error 116: peer sent no certificates",
            "TLS over TCP: received fatal alert: CertificateExpired",
            "invalid peer certificate: UnknownIssuer",
        ] {
            assert!(is_certificate_rejection(e), "{e}");
        }
        for e in [
            "timed out",
            "connection refused (os error 111)",
            "the cryptographic handshake failed: error 40",
            "the cryptographic handshake failed: error 420",
            "received fatal alert: HandshakeFailure",
            "the coordinator closed the session",
        ] {
            assert!(!is_certificate_rejection(e), "{e}");
        }
    }
}
