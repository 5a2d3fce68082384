//! The relay connections' driver: one task per relay the agent asks for, each holding one
//! connection (ALPN `ward-relay/1`, mutual TLS with the device certificate, server name
//! `NAME.relay.ward.internal` under the CA) over QUIC, or over TLS/TCP where UDP does not get
//! through ([`relay_link`], [`control::connect_either`]), and one pump for the data plane's
//! relayed datagrams.
//!
//! A task connects, sends `Hello{ticket}`, waits (bounded) for `Welcome`, then reports
//! [`RelayConnEvent::Up`] and every second an RTT sample; it hands received datagrams
//! (`split_datagram`), every one ready when it wakes, to [`DataPlane::handle_relayed_batch`]
//! on the relayed-receive thread (`relay_batch.rs`, [`relay_batch::Inbound`]), presents fresh
//! tickets as they come,
//! and on any failure reports [`RelayConnEvent::Down`] and reconnects after a backoff
//! (0.5 s doubling to 10 s, ±20 % jitter, reset after a connection that lasted 30 s). The
//! pump takes [`DataPlane::take_relay_outbound`] and sends each datagram on the named relay's
//! welcomed connection, or drops it (counted) when there is none. Nothing here decides
//! anything: which relays, which ticket and the home relay are the agent's.

use anyhow::{anyhow, bail, Context as _, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use ward_shared::relay::{
    relay_server_name, DeviceToRelay, RelayToDevice, SignedTicket, MAX_RELAYED_DATAGRAM,
    MAX_RELAY_STREAM_FRAME, RELAY_HEADER_LEN, RELAY_PROTOCOL_UDP, RELAY_PROTOCOL_VERSION,
};
use ward_shared::wire::ErrorCode;
use ward_shared::wire::{self, FrameDecoder};

use super::lock;
#[path = "relay_harness.rs"]
pub mod relay_harness;
#[path = "relay_link.rs"]
pub(super) mod relay_link;
#[path = "relay_plain.rs"]
pub(super) mod relay_plain;
use super::relay_batch;
use crate::agent::relay_udp::{Action as PlainAction, PlainUdp};
use crate::agent::RelayConnEvent;
use crate::control;
use crate::dataplane::{DataPlane, RelayReceiver};
use relay_link::{RelayLink, SharedTransports};
use relay_plain::PlainLink;
use ward_runtime::stream::Transport;

/// Connect, TLS, `Hello` → `Welcome`: all within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// RTT samples are reported this often.
pub const RTT_INTERVAL: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(30);

/// What a relay task needs to (re)connect: the ticket to present and the TLS client config
/// (device certificate) to present it with. Replaced together after a certificate renewal.
#[derive(Clone)]
pub(super) struct Credentials {
    pub ticket: SignedTicket,
    pub configs: control::Configs,
}

/// Datagrams the pump could not send, by reason.
#[derive(Debug, Default)]
pub(super) struct PumpCounters {
    pub sent: AtomicU64,
    pub no_connection: AtomicU64,
    pub send_failed: AtomicU64,
    /// Received datagrams without a valid header or too big.
    pub malformed_in: AtomicU64,
    /// Received batches decrypted on the session thread because the relayed-receive thread's
    /// queue was full.
    pub inline_in: AtomicU64,
    /// The plain-UDP data path's.
    pub plain: relay_plain::PlainCounters,
}

pub(super) type Live = Arc<Mutex<BTreeMap<Arc<str>, RelayLink>>>;

/// Where relayed datagrams go: the data plane (or a test's collector).
pub(super) trait RelaySink: Send + Sync + 'static {
    fn relayed(&self, relay: &str, from: u64, datagram: &[u8]);

    /// Several datagrams from one relay, `(from, datagram)` in arrival order.
    fn relayed_batch(&self, relay: &str, datagrams: &[(u64, &[u8])]) {
        for &(from, d) in datagrams {
            self.relayed(relay, from, d);
        }
    }
}

impl RelaySink for DataPlane {
    fn relayed(&self, relay: &str, from: u64, datagram: &[u8]) {
        self.handle_relayed(relay, from, datagram);
    }

    fn relayed_batch(&self, relay: &str, datagrams: &[(u64, &[u8])]) {
        self.handle_relayed_batch(relay, datagrams);
    }
}

struct Task {
    creds: watch::Sender<Credentials>,
    handle: tokio::task::JoinHandle<()>,
}

/// The relay tasks and the outbound pump; owned by the session loop.
pub(super) struct RelayClients {
    endpoint: Option<quinn::Endpoint>,
    sink: Option<Arc<dyn RelaySink>>,
    /// The relayed-receive thread (with a sink, where it could be started).
    inbound: Option<Arc<relay_batch::Inbound>>,
    live: Live,
    tasks: BTreeMap<String, Task>,
    events: mpsc::Sender<RelayConnEvent>,
    pump: Option<tokio::task::JoinHandle<()>>,
    pub counters: Arc<PumpCounters>,
    /// Each live link's transport, for status.
    pub transports: SharedTransports,
}

impl RelayClients {
    /// Reports go to `events`; the pump starts if the data plane has an outbound queue.
    pub fn new(
        endpoint: Option<quinn::Endpoint>,
        dp: Option<Arc<DataPlane>>,
        events: mpsc::Sender<RelayConnEvent>,
    ) -> Self {
        let outbound = dp.as_ref().and_then(|d| d.take_relay_outbound());
        let sink = dp.map(|d| d as Arc<dyn RelaySink>);
        Self::with(endpoint, sink, outbound, events)
    }

    /// Received datagrams go to `sink`, `outbound` is pumped to the relays.
    fn with(
        endpoint: Option<quinn::Endpoint>,
        sink: Option<Arc<dyn RelaySink>>,
        outbound: Option<RelayReceiver>,
        events: mpsc::Sender<RelayConnEvent>,
    ) -> Self {
        let live: Live = Arc::default();
        let counters = Arc::new(PumpCounters::default());
        let pump = outbound.map(|rx| tokio::spawn(pump(rx, live.clone(), counters.clone())));
        let inbound = sink
            .clone()
            .and_then(|s| relay_batch::Inbound::start(s, counters.clone()))
            .map(Arc::new);
        Self {
            endpoint,
            sink,
            inbound,
            live,
            tasks: BTreeMap::new(),
            events,
            pump,
            counters,
            transports: SharedTransports::default(),
        }
    }

    /// Holds a connection to `name` at `addr` (replacing any earlier one for that name).
    pub fn connect(&mut self, name: String, addr: String, creds: Credentials) {
        self.disconnect(&name);
        // Without a UDP socket the link goes over TCP alone.
        let endpoint = self.endpoint.clone();
        let (tx, rx) = watch::channel(creds);
        let name_arc: Arc<str> = Arc::from(name.as_str());
        let handle = tokio::spawn(run(RelayTask {
            name: name_arc,
            addr,
            endpoint,
            creds: rx,
            live: self.live.clone(),
            sink: self.sink.clone(),
            inbound: self.inbound.clone(),
            events: self.events.clone(),
            counters: self.counters.clone(),
            transports: self.transports.clone(),
            protocol: RELAY_PROTOCOL_UDP,
        }));
        self.tasks.insert(name, Task { creds: tx, handle });
    }

    /// New credentials for `name`: presented on the live connection and used to reconnect.
    pub fn update(&mut self, name: &str, creds: Credentials) {
        if let Some(t) = self.tasks.get(name) {
            t.creds.send_replace(creds);
        }
    }

    /// Closes the connection to `name` and stops reconnecting.
    pub fn disconnect(&mut self, name: &str) {
        if let Some(t) = self.tasks.remove(name) {
            t.handle.abort();
        }
        if let Some(c) = lock(&self.live).remove(name) {
            c.close(b"relay no longer used");
        }
        let mut tr = lock(&self.transports);
        tr.relays.remove(name);
        tr.relay_udp_bound.remove(name);
    }

    /// Closes everything (the daemon stops).
    pub fn shutdown(&mut self) {
        let names: Vec<String> = self.tasks.keys().cloned().collect();
        for n in names {
            self.disconnect(&n);
        }
        if let Some(p) = self.pump.take() {
            p.abort();
        }
    }
}

impl Drop for RelayClients {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Sends the data plane's relayed datagrams on the named relay's live connection.
async fn pump(mut rx: RelayReceiver, live: Live, counters: Arc<PumpCounters>) {
    let mut scratch = Vec::with_capacity(64 * 1024);
    while let Some(t) = rx.recv().await {
        relay_batch::send(&t, &live, &counters, &mut scratch);
    }
}

struct RelayTask {
    name: Arc<str>,
    addr: String,
    endpoint: Option<quinn::Endpoint>,
    creds: watch::Receiver<Credentials>,
    live: Live,
    sink: Option<Arc<dyn RelaySink>>,
    /// Where QUIC batches go to be decrypted off this thread (`None`: delivered here).
    inbound: Option<Arc<relay_batch::Inbound>>,
    events: mpsc::Sender<RelayConnEvent>,
    counters: Arc<PumpCounters>,
    transports: SharedTransports,
    /// The forwarding version the QUIC `Hello` says: [`RELAY_PROTOCOL_UDP`] until the relay
    /// refuses it (a relay that speaks version 1 only), then [`RELAY_PROTOCOL_VERSION`].
    protocol: u32,
}

/// The relay refused the `Hello`'s forwarding version (`Error{Protocol}` in answer to it).
#[derive(Debug, thiserror::Error)]
#[error("the relay refused forwarding version {0}: {1}")]
struct VersionRefused(u32, String);

/// Connects, serves, reconnects, until aborted.
async fn run(mut t: RelayTask) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let err = match serve(&mut t).await {
            Ok(()) => "the relay closed the connection".to_string(),
            Err(e) => format!("{e:#}"),
        };
        lock(&t.live).remove(&t.name);
        {
            let mut tr = lock(&t.transports);
            tr.relays.remove(&*t.name);
            tr.relay_udp_bound.remove(&*t.name);
        }
        debug!(relay = %t.name, error = %err, "relay connection down");
        if t.events
            .send(RelayConnEvent::Down {
                relay: t.name.to_string(),
                error: err,
            })
            .await
            .is_err()
        {
            return; // the session loop is gone
        }
        if started.elapsed() >= BACKOFF_RESET {
            backoff = BACKOFF_MIN;
        }
        let jitter = 0.8 + rand::random::<f64>() * 0.4;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: handshake, then datagrams both ways until it fails.
async fn serve(t: &mut RelayTask) -> Result<()> {
    let creds = t.creds.borrow_and_update().clone();
    let mut opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(t, &creds))
        .await
        .map_err(|_| anyhow!("no welcome from the relay within {HANDSHAKE_TIMEOUT:?}"))?;
    let refused = opened
        .as_ref()
        .err()
        .and_then(|e| e.downcast_ref::<VersionRefused>())
        .map(|r| r.0);
    if refused.is_some_and(|v| v != RELAY_PROTOCOL_VERSION) {
        // An older relay: say version 1 from now on, over QUIC datagrams alone.
        info!(relay = %t.name, "the relay speaks an older forwarding version: relayed datagrams stay on QUIC datagrams");
        t.protocol = RELAY_PROTOCOL_VERSION;
        opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(t, &creds))
            .await
            .map_err(|_| anyhow!("no welcome from the relay within {HANDSHAKE_TIMEOUT:?}"))?;
    }
    let (conn, mut send, mut recv, mut dec, relay_says) = match opened? {
        Opened::Quic(q) => q,
        Opened::Tcp(tcp) => return relay_link::serve_tcp(t, tcp).await,
    };
    let max_datagram = datagram_limit(&conn, relay_says);
    // The plain-UDP path: on a version-2 link with somewhere to deliver what arrives.
    let mut plain = match (&t.sink, t.protocol == RELAY_PROTOCOL_UDP) {
        (Some(sink), true) => open_plain(t, &conn, sink),
        _ => None,
    };
    let _stop_plain = plain.as_ref().map(|(p, _)| StopOnDrop(p.clone()));
    lock(&t.live).insert(
        t.name.clone(),
        RelayLink::Quic(conn.clone(), plain.as_ref().map(|(p, _)| p.clone())),
    );
    lock(&t.transports)
        .relays
        .insert(t.name.to_string(), Transport::Quic);
    info!(relay = %t.name, addr = %conn.remote_address(), max_datagram, "relay connection up");
    t.events
        .send(RelayConnEvent::Up {
            relay: t.name.to_string(),
            rtt: conn.rtt(),
            max_datagram,
        })
        .await
        .map_err(|_| anyhow!("session loop gone"))?;
    let mut batch = Vec::with_capacity(relay_batch::RECV_BATCH);
    let mut tick = tokio::time::interval(RTT_INTERVAL);
    tick.tick().await;
    loop {
        // The plain-UDP path's next step (a request, a confirm's resend, a timeout).
        let plain_at = plain.as_ref().map(|(_, state)| state.poll_timeout());
        tokio::select! {
            _ = async { match plain_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            } } => {
                if let Some((link, state)) = plain.as_mut() {
                    let before = state.fallbacks;
                    let action = state.handle_timer(Instant::now());
                    if state.fallbacks > before {
                        debug!(relay = %t.name, "no plain-UDP binding within the timeout: QUIC datagrams");
                        t.counters.plain.fallbacks.fetch_add(1, Ordering::Relaxed);
                        let mut tr = lock(&t.transports);
                        tr.relay_udp_fallbacks = tr.relay_udp_fallbacks.saturating_add(1);
                    }
                    plain_act(t, link, state, action, &mut send).await?;
                }
            }
            d = conn.read_datagram() => {
                let d = d.map_err(|e| anyhow!("relay connection: {e}"))?;
                relay_batch::take_ready(&conn, d, &mut batch);
                match &t.inbound {
                    Some(inbound) => inbound.deliver(&t.name, &mut batch),
                    None => relay_batch::deliver(&t.name, &batch, t.sink.as_deref(), &t.counters),
                }
            }
            changed = t.creds.changed() => {
                changed.map_err(|_| anyhow!("relay no longer used"))?;
                let ticket = t.creds.borrow_and_update().ticket.clone();
                debug!(relay = %t.name, serial = ticket.ticket.serial, "presenting a fresh ticket");
                send.write_all(&wire::encode(&DeviceToRelay::Ticket { ticket }))
                    .await
                    .context("sending a ticket")?;
            }
            frame = read_frame(&mut recv, &mut dec) => {
                match frame? {
                    Some(RelayToDevice::Error { code, message }) => {
                        bail!("the relay refused: {message} ({code:?})")
                    }
                    Some(RelayToDevice::Welcome { .. }) => {}
                    Some(RelayToDevice::UdpBinding { token, nonce }) => {
                        // Only a link that asked (it has a plain-UDP path) gets an answer.
                        let Some((link, state)) = plain.as_mut() else {
                            bail!("the relay sent an unrequested plain-UDP binding message")
                        };
                        link.set_known(token);
                        let action = state.handle_binding(token, nonce, Instant::now());
                        plain_act(t, link, state, action, &mut send).await?;
                    }
                    Some(RelayToDevice::UdpBound) => {
                        let Some((link, state)) = plain.as_mut() else {
                            bail!("the relay sent an unrequested plain-UDP binding message")
                        };
                        state.handle_bound(Instant::now());
                        plain_act(t, link, state, None, &mut send).await?;
                    }
                    None => bail!("the relay closed the stream"),
                }
            }
            _ = tick.tick() => {
                // Only a sample: dropped when the loop is busy.
                let _ = t.events.try_send(RelayConnEvent::Rtt {
                    relay: t.name.to_string(),
                    rtt: conn.rtt(),
                    // The welcome's figure is a snapshot: the room grows as QUIC
                    // discovers the path MTU, so later samples are this connection's own.
                    max_datagram: datagram_limit(&conn, u16::MAX),
                });
            }
        }
    }
}

/// The connection, its stream (with the decoder holding any bytes after `Welcome`) and the
/// largest WireGuard datagram the relay's `Welcome` offered.
type QuicOpened = (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    FrameDecoder,
    u16,
);

/// A welcomed link, by transport.
enum Opened {
    Quic(QuicOpened),
    Tcp(relay_link::TcpOpened),
}

async fn handshake(t: &RelayTask, creds: &Credentials) -> Result<Opened> {
    let what = format!("relay {}", t.name);
    let addrs = control::resolve_named(&t.addr, &what).await?;
    let connected = control::connect_either(
        t.endpoint.as_ref(),
        &creds.configs,
        &addrs,
        &relay_server_name(&t.name),
        &what,
    )
    .await?;
    let conn = match connected {
        control::Connected::Quic(c) => c,
        control::Connected::Tcp(tls) => {
            return Ok(Opened::Tcp(
                relay_link::handshake_tcp(*tls, creds.ticket.clone()).await?,
            ))
        }
    };
    let (mut send, mut recv) = conn.open_bi().await.context("opening the relay stream")?;
    send.write_all(&wire::encode(&DeviceToRelay::Hello {
        protocol: t.protocol,
        ticket: creds.ticket.clone(),
    }))
    .await
    .context("sending hello")?;
    let mut dec = FrameDecoder::new(MAX_RELAY_STREAM_FRAME);
    match read_frame(&mut recv, &mut dec).await? {
        Some(RelayToDevice::Welcome { max_datagram, .. }) => {
            Ok(Opened::Quic((conn, send, recv, dec, max_datagram)))
        }
        Some(RelayToDevice::Error {
            code: ErrorCode::Protocol,
            message,
        }) => Err(VersionRefused(t.protocol, message).into()),
        Some(RelayToDevice::Error { code, message }) => {
            bail!("the relay refused: {message} ({code:?})")
        }
        Some(RelayToDevice::UdpBinding { .. } | RelayToDevice::UdpBound) => {
            bail!("the relay answered the hello with a plain-UDP binding message")
        }
        None => bail!("the relay closed the stream before welcoming"),
    }
}

/// Opens the link's plain-UDP socket (connected to the relay's address) and its receive
/// thread; `None` (logged) where either cannot be had: the link stays on QUIC datagrams.
fn open_plain(
    t: &RelayTask,
    conn: &quinn::Connection,
    sink: &Arc<dyn RelaySink>,
) -> Option<(Arc<PlainLink>, PlainUdp)> {
    let opened = PlainLink::open(conn.remote_address(), t.counters.clone()).and_then(|link| {
        link.start_receiver(t.name.clone(), sink, t.inbound.clone())?;
        Ok(link)
    });
    match opened {
        Ok(link) => Some((link, PlainUdp::new(Instant::now()))),
        Err(e) => {
            info!(relay = %t.name, error = %e, "no plain-UDP socket for the relay link: relayed datagrams stay on QUIC");
            None
        }
    }
}

/// Carries out what the plain-UDP state machine asked for, then publishes its binding (the
/// token relayed sends carry, or none) to the pump and to status.
async fn plain_act(
    t: &RelayTask,
    link: &PlainLink,
    state: &PlainUdp,
    action: Option<PlainAction>,
    send: &mut quinn::SendStream,
) -> Result<()> {
    match action {
        Some(PlainAction::Request) => send
            .write_all(&wire::encode(&DeviceToRelay::UdpBind))
            .await
            .context("asking for a plain-UDP binding")?,
        Some(PlainAction::Confirm(c)) => link.send_confirm(&c),
        None => {}
    }
    let token = state.token();
    let was = link.is_bound();
    if was != token.is_some() {
        link.set_bound(token);
        let mut tr = lock(&t.transports);
        if token.is_some() {
            info!(relay = %t.name, "relayed datagrams go in plain UDP");
            tr.relay_udp_bound.insert(t.name.to_string());
        } else {
            info!(relay = %t.name, "the relay's plain-UDP path went silent: relayed datagrams go as QUIC datagrams");
            tr.relay_udp_bound.remove(&*t.name);
        }
    } else if token.is_some() {
        link.set_bound(token);
    }
    Ok(())
}

/// Ends a plain-UDP receive thread when the link's serve loop ends.
struct StopOnDrop(Arc<PlainLink>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The largest WireGuard datagram to send: the relay's word, this connection's QUIC datagram
/// size minus the header, and the protocol's bound, whichever is least.
fn datagram_limit(conn: &quinn::Connection, relay_says: u16) -> u16 {
    let quic = conn
        .max_datagram_size()
        .map_or(0, |m| m.saturating_sub(RELAY_HEADER_LEN));
    let m = quic.min(MAX_RELAYED_DATAGRAM).min(usize::from(relay_says));
    u16::try_from(m).unwrap_or(u16::MAX)
}

/// The next message on the relay stream (bounded by the decoder); `None` at its end. Cancel
/// safe: bytes read are kept in `dec`.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
) -> Result<Option<RelayToDevice>> {
    ward_runtime::quic::read_msg(recv, dec)
        .await
        .context("relay stream")
}

#[cfg(test)]
mod tests {
    //! The relay client against a small in-test relay: real QUIC (quinn), mutual TLS under an
    //! rcgen CA, the committed forwarding protocol.
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use ward_shared::relay::{encode_datagram, split_datagram};
    use ward_shared::relay::{Ticket, RELAY_ALPN};
    use ward_shared::wire::DeviceId;

    struct Pki {
        ca_der: Vec<u8>,
        server: (Vec<u8>, Vec<u8>),
        client: (Vec<u8>, String),
    }

    fn pki(server_name: &str) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca_cert.der(), &ca_key).unwrap();
        let skey = KeyPair::generate().unwrap();
        let mut sp = CertificateParams::new(vec![server_name.to_string()]).unwrap();
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let scert = sp.signed_by(&skey, &issuer).unwrap();
        let ckey = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::new(vec!["d.device.ward.internal".to_string()]).unwrap();
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let ccert = cp.signed_by(&ckey, &issuer).unwrap();
        Pki {
            ca_der: ca_cert.der().to_vec(),
            server: (scert.der().to_vec(), skey.serialize_der()),
            client: (ccert.der().to_vec(), ckey.serialize_pem()),
        }
    }

    /// A relay endpoint requiring a client certificate under the CA.
    fn relay_endpoint(p: &Pki) -> quinn::Endpoint {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(p.ca_der.clone())).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(p.server.0.clone())],
                PrivateKeyDer::Pkcs8(p.server.1.clone().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![RELAY_ALPN.to_vec()];
        let sc = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        quinn::Endpoint::server(sc, "127.0.0.1:0".parse().unwrap()).unwrap()
    }

    fn ticket(serial: u64) -> SignedTicket {
        Ticket {
            device_id: DeviceId(7),
            cert_identity: [1; 32],
            not_before_ms: 0,
            not_after_ms: i64::MAX,
            serial,
        }
        .sign(&ed25519_dalek::SigningKey::from_bytes(&[4; 32]))
    }

    /// One accepted device connection on the relay side.
    struct Served {
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        dec: FrameDecoder,
        buf: Vec<u8>,
    }

    impl Served {
        async fn accept(ep: &quinn::Endpoint) -> Served {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let (send, recv) = conn.accept_bi().await.unwrap();
            Served {
                conn,
                send,
                recv,
                dec: FrameDecoder::new(MAX_RELAY_STREAM_FRAME),
                buf: vec![0; 4096],
            }
        }

        async fn frame(&mut self) -> DeviceToRelay {
            loop {
                if let Some(f) = self.dec.next_frame().unwrap() {
                    return wire::decode(&f).unwrap();
                }
                let n = self.recv.read(&mut self.buf).await.unwrap().unwrap();
                self.dec.push(&self.buf[..n]);
            }
        }

        async fn reply(&mut self, m: &RelayToDevice) {
            self.send.write_all(&wire::encode(m)).await.unwrap();
        }
    }

    struct Collect(mpsc::UnboundedSender<(String, u64, Vec<u8>)>);

    impl RelaySink for Collect {
        fn relayed(&self, relay: &str, from: u64, datagram: &[u8]) {
            let _ = self.0.send((relay.to_string(), from, datagram.to_vec()));
        }
    }

    async fn next_event(rx: &mut mpsc::Receiver<RelayConnEvent>) -> RelayConnEvent {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an event within 10 s")
                .expect("events open");
            if !matches!(ev, RelayConnEvent::Rtt { .. }) {
                return ev;
            }
        }
    }

    #[tokio::test]
    async fn relay_client_handshakes_forwards_both_ways_presents_tickets_and_reconnects() {
        let p = pki(&relay_server_name("r1"));
        let relay = relay_endpoint(&p);
        let addr: SocketAddr = relay.local_addr().unwrap();
        let (ev_tx, mut ev_rx) = mpsc::channel(64);
        let out_tx = crate::dataplane::RelayQueue::new(16);
        let out_rx = out_tx.take_receiver().unwrap();
        let (in_tx, mut in_rx) = mpsc::unbounded_channel();
        let mut clients = RelayClients::with(
            Some(control::client_endpoint().unwrap()),
            Some(Arc::new(Collect(in_tx))),
            Some(out_rx),
            ev_tx,
        );
        let config = control::relay_configs(&p.ca_der, &p.client.0, &p.client.1).unwrap();
        clients.connect(
            "r1".into(),
            addr.to_string(),
            Credentials {
                ticket: ticket(1),
                configs: config.clone(),
            },
        );

        // Hello with the ticket, then Welcome: up.
        let mut s = Served::accept(&relay).await;
        assert!(
            s.conn.peer_identity().is_some(),
            "client certificate presented"
        );
        match s.frame().await {
            DeviceToRelay::Hello { protocol, ticket } => {
                assert_eq!(protocol, RELAY_PROTOCOL_UDP);
                assert_eq!(ticket.ticket.serial, 1);
            }
            other => panic!("{other:?}"),
        }
        s.reply(&RelayToDevice::Welcome {
            device_id: DeviceId(7),
            max_datagram: 1200,
        })
        .await;
        // A version-2 link with somewhere to deliver asks for a plain-UDP binding at once;
        // this relay never answers, so datagrams stay on QUIC.
        assert_eq!(s.frame().await, DeviceToRelay::UdpBind);
        match next_event(&mut ev_rx).await {
            RelayConnEvent::Up {
                relay,
                max_datagram,
                ..
            } => {
                assert_eq!(relay, "r1");
                assert!((1000..=1200).contains(&max_datagram), "{max_datagram}");
            }
            other => panic!("{other:?}"),
        }

        // Device → relay: the data plane's datagram, addressed by device id.
        assert!(out_tx.try_send(crate::dataplane::RelayTransmit::one(
            Arc::from("r1"),
            9,
            b"to nine"
        )));
        // A datagram for a relay with no connection is dropped, not sent elsewhere.
        assert!(out_tx.try_send(crate::dataplane::RelayTransmit::one(
            Arc::from("r2"),
            9,
            b"nowhere"
        )));
        let d = tokio::time::timeout(Duration::from_secs(5), s.conn.read_datagram())
            .await
            .unwrap()
            .unwrap();
        let (to, body) = split_datagram(&d).unwrap();
        assert_eq!((to, body), (DeviceId(9), &b"to nine"[..]));

        // Relay → device: to the sink, with the source device id; garbage is counted.
        s.conn.send_datagram(vec![1, 2, 3].into()).unwrap();
        s.conn
            .send_datagram(encode_datagram(DeviceId(5), b"from five").into())
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), in_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, ("r1".to_string(), 5, b"from five".to_vec()));
        assert_eq!(clients.counters.malformed_in.load(Ordering::Relaxed), 1);
        assert_eq!(clients.counters.no_connection.load(Ordering::Relaxed), 1);
        assert_eq!(clients.counters.sent.load(Ordering::Relaxed), 1);

        // A fresh ticket is presented on the live connection.
        clients.update(
            "r1",
            Credentials {
                ticket: ticket(2),
                configs: config.clone(),
            },
        );
        match s.frame().await {
            DeviceToRelay::Ticket { ticket } => assert_eq!(ticket.ticket.serial, 2),
            other => panic!("{other:?}"),
        }

        // The relay drops the connection: down, then a reconnect with the newest ticket,
        // which this time the relay refuses: down again, with its reason.
        s.conn.close(0u32.into(), b"restart");
        assert!(matches!(
            next_event(&mut ev_rx).await,
            RelayConnEvent::Down { .. }
        ));
        let mut s2 = Served::accept(&relay).await;
        match s2.frame().await {
            DeviceToRelay::Hello { ticket, .. } => assert_eq!(ticket.ticket.serial, 2),
            other => panic!("{other:?}"),
        }
        s2.reply(&RelayToDevice::Error {
            code: ward_shared::wire::ErrorCode::Unauthorized,
            message: "ticket expired".into(),
        })
        .await;
        match next_event(&mut ev_rx).await {
            RelayConnEvent::Down { error, .. } => {
                assert!(error.contains("ticket expired"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        // And again, welcomed this time.
        let mut s3 = Served::accept(&relay).await;
        assert!(matches!(s3.frame().await, DeviceToRelay::Hello { .. }));
        s3.reply(&RelayToDevice::Welcome {
            device_id: DeviceId(7),
            max_datagram: 1200,
        })
        .await;
        assert!(matches!(
            next_event(&mut ev_rx).await,
            RelayConnEvent::Up { .. }
        ));

        // Disconnect: the connection closes and no reconnect follows.
        clients.disconnect("r1");
        let closed = tokio::time::timeout(Duration::from_secs(5), s3.conn.closed()).await;
        assert!(closed.is_ok(), "connection closed after disconnect");
        let again = tokio::time::timeout(Duration::from_millis(1500), relay.accept()).await;
        assert!(again.is_err(), "no reconnect after disconnect");
    }

    /// A relay that speaks forwarding version 1 only refuses the version-2 hello: the link
    /// says version 1 at once, is welcomed, never asks for a plain-UDP binding and relays over
    /// QUIC datagrams; an unrequested binding message on it breaks the protocol.
    #[tokio::test]
    async fn an_old_relay_is_spoken_to_in_version_1_over_quic_datagrams() {
        let p = pki(&relay_server_name("r1"));
        let relay = relay_endpoint(&p);
        let (ev_tx, mut ev_rx) = mpsc::channel(64);
        let out_tx = crate::dataplane::RelayQueue::new(16);
        let (in_tx, _in_rx) = mpsc::unbounded_channel();
        let mut clients = RelayClients::with(
            Some(control::client_endpoint().unwrap()),
            Some(Arc::new(Collect(in_tx))),
            out_tx.take_receiver(),
            ev_tx,
        );
        let config = control::relay_configs(&p.ca_der, &p.client.0, &p.client.1).unwrap();
        clients.connect(
            "r1".into(),
            relay.local_addr().unwrap().to_string(),
            Credentials {
                ticket: ticket(1),
                configs: config,
            },
        );
        // What a version-1 relay answers a version-2 hello.
        let mut s = Served::accept(&relay).await;
        match s.frame().await {
            DeviceToRelay::Hello { protocol, .. } => assert_eq!(protocol, RELAY_PROTOCOL_UDP),
            other => panic!("{other:?}"),
        }
        s.reply(&RelayToDevice::Error {
            code: ward_shared::wire::ErrorCode::Protocol,
            message: "relay ticket refused: protocol".into(),
        })
        .await;
        let started = Instant::now();
        let mut s2 = Served::accept(&relay).await;
        match s2.frame().await {
            DeviceToRelay::Hello { protocol, .. } => assert_eq!(protocol, RELAY_PROTOCOL_VERSION),
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < BACKOFF_MIN,
            "asked again at once, not after a backoff"
        );
        s2.reply(&RelayToDevice::Welcome {
            device_id: DeviceId(7),
            max_datagram: 1200,
        })
        .await;
        assert!(matches!(
            next_event(&mut ev_rx).await,
            RelayConnEvent::Up { .. }
        ));
        assert!(out_tx.try_send(crate::dataplane::RelayTransmit::one(
            Arc::from("r1"),
            9,
            b"over quic"
        )));
        let d = tokio::time::timeout(Duration::from_secs(5), s2.conn.read_datagram())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            split_datagram(&d).unwrap(),
            (DeviceId(9), &b"over quic"[..])
        );
        // No binding request came: the next frame is the fresh ticket.
        clients.update(
            "r1",
            Credentials {
                ticket: ticket(2),
                configs: control::relay_configs(&p.ca_der, &p.client.0, &p.client.1).unwrap(),
            },
        );
        match s2.frame().await {
            DeviceToRelay::Ticket { ticket } => assert_eq!(ticket.ticket.serial, 2),
            other => panic!("{other:?}"),
        }
        assert!(!lock(&clients.transports).relay_udp_bound.contains("r1"));
        s2.reply(&RelayToDevice::UdpBound).await;
        match next_event(&mut ev_rx).await {
            RelayConnEvent::Down { error, .. } => {
                assert!(error.contains("unrequested"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        clients.disconnect("r1");
    }

    #[tokio::test]
    async fn a_relay_with_the_wrong_name_is_refused_and_a_silent_one_times_out() {
        // The certificate names another relay: the TLS check fails, reported as down.
        let p = pki(&relay_server_name("other"));
        let relay = relay_endpoint(&p);
        let (ev_tx, mut ev_rx) = mpsc::channel(64);
        let mut clients =
            RelayClients::with(Some(control::client_endpoint().unwrap()), None, None, ev_tx);
        let config = control::relay_configs(&p.ca_der, &p.client.0, &p.client.1).unwrap();
        clients.connect(
            "r1".into(),
            relay.local_addr().unwrap().to_string(),
            Credentials {
                ticket: ticket(1),
                configs: config.clone(),
            },
        );
        let accept = tokio::spawn(async move {
            // Drive the server side of the handshake.
            if let Some(inc) = relay.accept().await {
                let _ = inc.await;
            }
            relay
        });
        match next_event(&mut ev_rx).await {
            RelayConnEvent::Down { relay, error } => {
                assert_eq!(relay, "r1");
                assert!(!error.is_empty());
            }
            other => panic!("{other:?}"),
        }
        clients.disconnect("r1");
        let _ = accept.await;

        // A relay that accepts but never welcomes: down after the handshake timeout.
        let p = pki(&relay_server_name("r1"));
        let relay = relay_endpoint(&p);
        let config = control::relay_configs(&p.ca_der, &p.client.0, &p.client.1).unwrap();
        clients.connect(
            "r1".into(),
            relay.local_addr().unwrap().to_string(),
            Credentials {
                ticket: ticket(1),
                configs: config,
            },
        );
        let s = Served::accept(&relay).await;
        let started = Instant::now();
        match next_event(&mut ev_rx).await {
            RelayConnEvent::Down { error, .. } => assert!(error.contains("no welcome"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() >= HANDSHAKE_TIMEOUT / 2);
        drop(s);
    }
}
