//! The device side of the control channel: QUIC + TLS 1.3 to the coordinator, with TLS 1.3
//! over TCP as the fallback where UDP does not get through ([`connect_either`]).
//!
//! Enrollment pins the CA by the SHA-256 fingerprint carried in the token (no trust on first
//! use); afterwards the stored CA certificate is the only root, and the device authenticates
//! with its certificate (mutual TLS).

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info};
use ward_runtime::quic::PinnedCa;
use ward_runtime::stream::{read_frame, BoxRead, BoxWrite, Transport};

use ward_shared::token::EnrollToken;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeviceMsg, EnrollRequest, Enrolled, ErrorCode, FrameDecoder,
    TokenSecret, COORDINATOR_SERVER_NAME, MAX_COORDINATOR_FRAME, PROTOCOL_VERSION,
};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long enrollment waits for its connection's close to be sent.
const CLOSE_GRACE: Duration = Duration::from_millis(300);
/// Head start of one coordinator address over the next (RFC 8305's connection attempt delay).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// How long QUIC has the field to itself before TLS over TCP is dialled beside it. A QUIC
/// handshake on a working path completes within one round trip (well under a second even on
/// mobile and intercontinental paths), and quinn resends a lost first flight only after about
/// a second (its initial RTT estimate of 333 ms, times three); so a network that carries UDP
/// almost always wins before TCP starts, and one that drops UDP costs one second per connect.
pub const TCP_HEAD_START: Duration = Duration::from_secs(1);
/// While a connection is on TCP, how often the device checks whether QUIC gets through again
/// (and, when it does, moves back to it).
pub const QUIC_RETRY_EVERY: Duration = Duration::from_secs(30);

/// A refusal the coordinator gave in words, as opposed to a network failure.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Keepalive of the control session: a coordinator that stops answering (killed, its host
/// gone) is given up after [`CONTROL_IDLE_TIMEOUT`] and the agent fails over to the next
/// coordinator address; a device behind a NAT keeps its mapping alive.
pub const CONTROL_KEEPALIVE: Duration = Duration::from_secs(2);
/// Three keepalives lost in a row end the session.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(6);

fn transport() -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(CONTROL_KEEPALIVE));
    t.max_idle_timeout(Some(CONTROL_IDLE_TIMEOUT.try_into()?));
    Ok(Arc::new(t))
}

fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(qc));
    cc.transport_config(transport()?);
    Ok(cc)
}

pub fn enroll_config(fingerprint: [u8; 32]) -> Result<quinn::ClientConfig> {
    client_config(enroll_tls(fingerprint)?)
}

/// The TLS config of both transports: QUIC's, and the same TLS config for TCP.
#[derive(Clone)]
pub struct Configs {
    pub quic: quinn::ClientConfig,
    pub tls: Arc<rustls::ClientConfig>,
}

/// [`enroll_config`] for both transports.
pub fn enroll_configs(fingerprint: [u8; 32]) -> Result<Configs> {
    let tls = enroll_tls(fingerprint)?;
    Ok(Configs {
        quic: client_config(tls.clone())?,
        tls: Arc::new(tls),
    })
}

/// [`session_config`] for both transports.
pub fn session_configs(ca_der: &[u8], cert_der: &[u8], key_pem: &str) -> Result<Configs> {
    let tls = device_tls(ca_der, cert_der, key_pem, wire::ALPN)?;
    Ok(Configs {
        quic: client_config(tls.clone())?,
        tls: Arc::new(tls),
    })
}

/// [`relay_config`] for both transports.
pub fn relay_configs(ca_der: &[u8], cert_der: &[u8], key_pem: &str) -> Result<Configs> {
    let tls = device_tls(ca_der, cert_der, key_pem, ward_shared::relay::RELAY_ALPN)?;
    Ok(Configs {
        quic: relay_config(ca_der, cert_der, key_pem)?,
        tls: Arc::new(tls),
    })
}

fn enroll_tls(fingerprint: [u8; 32]) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa::new(
            fingerprint,
            provider,
            "the token",
        )))
        .with_no_client_auth();
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    Ok(tls)
}

/// Mutual-TLS config for an enrolled device.
pub fn session_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key_pem: &str,
) -> Result<quinn::ClientConfig> {
    let tls = device_tls(ca_der, cert_der, key_pem, wire::ALPN)?;
    client_config(tls)
}

/// Keepalive on a relay connection: QUIC RTT samples for the home relay choice, and the NAT
/// mapping toward the relay stays open.
pub const RELAY_KEEPALIVE: Duration = Duration::from_secs(1);
/// A relay that has not answered for this long is down (the device moves to another).
pub const RELAY_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Mutual-TLS config for a relay connection ([`ward_shared::relay::RELAY_ALPN`]): the same
/// CA root and device certificate as the control session, QUIC datagrams on, keepalive
/// [`RELAY_KEEPALIVE`], idle timeout [`RELAY_IDLE_TIMEOUT`].
pub fn relay_config(ca_der: &[u8], cert_der: &[u8], key_pem: &str) -> Result<quinn::ClientConfig> {
    let tls = device_tls(ca_der, cert_der, key_pem, ward_shared::relay::RELAY_ALPN)?;
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(qc));
    /// Room for about 3000 full datagrams each way, some 30 ms of a 1 Gbit/s link: a stall of
    /// the task that takes relayed datagrams (a busy host) does not overflow it.
    const RELAY_DATAGRAM_BUFFER: usize = 4 * 1024 * 1024;
    const RELAY_MTU_PROBE_UPPER_BOUND: u16 = 1500 - 20 - 8;
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(RELAY_KEEPALIVE));
    t.max_idle_timeout(Some(RELAY_IDLE_TIMEOUT.try_into()?));
    t.datagram_receive_buffer_size(Some(RELAY_DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(RELAY_DATAGRAM_BUFFER);
    // Probe up to what a 1500-byte IPv4 path carries (quinn's default stops at IPv6's 1452),
    // as the relay does, so a full-size WireGuard datagram fits where the path allows: fewer,
    // larger packets per relayed byte.
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(RELAY_MTU_PROBE_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtud));
    // Ask the peer to acknowledge every 8th packet (or after 5 ms) instead of every 2nd: a
    // relayed datagram is never retransmitted, so the acknowledgements only feed congestion
    // control, and every one is a packet to build, encrypt and send on a busy path. A peer
    // without the ACK-frequency extension keeps acknowledging as before.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(7u32.into())
        .max_ack_delay(Some(std::time::Duration::from_millis(5)));
    t.ack_frequency_config(Some(ack));
    // The relayed datagrams' own flows control congestion; the link adds no window or pacing.
    t.congestion_controller_factory(Arc::new(ward_runtime::quic::TunnelWindow));
    cc.transport_config(Arc::new(t));
    Ok(cc)
}

fn device_tls(
    ca_der: &[u8],
    cert_der: &[u8],
    key_pem: &str,
    alpn: &[u8],
) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let key = rcgen::KeyPair::from_pem(key_pem).context("identity key in state is unreadable")?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(cert_der.to_vec())],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// Every address the coordinator's `HOST:PORT` names, in the order to try them
/// ([`eyeballs_order`]). A literal address is used as is, without a lookup.
pub async fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    resolve_named(addr, "coordinator").await
}

/// [`resolve`] for any `HOST:PORT`; `what` names it in errors (`coordinator`, `relay r1`).
pub async fn resolve_named(addr: &str, what: &str) -> Result<Vec<SocketAddr>> {
    if let Ok(literal) = addr.parse::<SocketAddr>() {
        return Ok(vec![literal]);
    }
    let found = eyeballs_order(
        tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("cannot resolve {what} address {addr:?}"))?,
    );
    if found.is_empty() {
        bail!("{what} address {addr:?} resolves to nothing");
    }
    Ok(found)
}

/// Orders resolved addresses for happy eyeballs (RFC 8305 section 4): IPv6 first, then the
/// families alternate, each keeping the resolver's order; repeats are dropped.
pub fn eyeballs_order(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut v6 = Vec::new();
    let mut v4 = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for a in addrs {
        if !seen.insert(a) {
            continue;
        }
        match a {
            SocketAddr::V6(_) => v6.push(a),
            SocketAddr::V4(_) => v4.push(a),
        }
    }
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    let (mut i6, mut i4) = (v6.into_iter(), v4.into_iter());
    loop {
        match (i6.next(), i4.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// A QUIC client endpoint on `[::]:0` with `IPV6_V6ONLY` off, so it reaches IPv4 and IPv6
/// coordinators alike; `0.0.0.0:0` where the host has no IPv6.
pub fn client_endpoint() -> Result<quinn::Endpoint> {
    let bound = ward_runtime::net::bind_udp_dual_stack(0)
        .context("opening a UDP socket for the control channel")?;
    if let Some(e) = &bound.ipv4_only_because {
        info!(error = %e, "IPv6 unavailable: the control channel uses IPv4 only");
    }
    // The endpoint carries the relay links too: room for a burst while its task waits.
    if let Err(e) =
        ward_runtime::net::set_socket_buffers(&bound.socket, ward_runtime::net::QUIC_SOCKET_BUFFER)
    {
        debug!(error = %e, "QUIC socket buffers left at the kernel's default");
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| anyhow!("the control channel needs a tokio runtime"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        bound.socket,
        runtime,
    )
    .context("opening the control channel's QUIC endpoint")
}

/// Connects to the first of `addrs` to finish the QUIC handshake (RFC 8305 style): an attempt
/// starts every [`ATTEMPT_DELAY`], or at once when the previous one failed, and the rest are
/// dropped when one completes. IPv6 addresses are skipped on an IPv4-only endpoint.
pub async fn connect_first(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addrs: &[SocketAddr],
) -> Result<quinn::Connection> {
    connect_first_to(endpoint, cfg, addrs, COORDINATOR_SERVER_NAME, "coordinator").await
}

/// [`connect_first`] to a server presenting `server_name` (`what` names it in errors).
pub async fn connect_first_to(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addrs: &[SocketAddr],
    server_name: &str,
    what: &str,
) -> Result<quinn::Connection> {
    let ipv6_ok = endpoint.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
    let usable: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| ipv6_ok || a.is_ipv4())
        .collect();
    let [first, ..] = usable[..] else {
        bail!("no usable {what} address in {addrs:?} (IPv6 addresses need IPv6 on this host)");
    };
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut pending = tokio::task::JoinSet::new();
    let mut next = usable.iter().copied();
    loop {
        if let Some(addr) = next.next() {
            debug!(%addr, what, "connecting");
            let connecting = endpoint.connect_with(cfg.clone(), addr, server_name)?;
            pending.spawn(async move { (addr, connecting.await) });
        }
        let more = next.len() > 0;
        tokio::select! {
            joined = pending.join_next(), if !pending.is_empty() => match joined {
                Some(Ok((addr, Ok(conn)))) => {
                    pending.abort_all();
                    debug!(%addr, what, "connected");
                    return Ok(conn);
                }
                Some(Ok((addr, Err(e)))) => {
                    debug!(%addr, what, error = %e, "connection attempt failed");
                    if pending.is_empty() && !more {
                        bail!("cannot connect to the {what} at {addr}: {e}");
                    }
                }
                // A task only ends without a result when aborted, and we abort only on return.
                Some(Err(e)) if pending.is_empty() && !more => {
                    bail!("{what} connection attempt ended: {e}");
                }
                Some(Err(_)) | None => {}
            },
            _ = tokio::time::sleep(ATTEMPT_DELAY), if more => {}
            _ = tokio::time::sleep_until(deadline) => {
                pending.abort_all();
                if usable.len() == 1 {
                    bail!("no answer from the {what} at {first} within {CONNECT_TIMEOUT:?}");
                }
                bail!("no answer from the {what} at any of {usable:?} within {CONNECT_TIMEOUT:?}");
            }
        }
    }
}

/// A connection by either transport, its handshake complete.
pub enum Connected {
    Quic(quinn::Connection),
    Tcp(Box<ward_runtime::stream::client::TlsStream<tokio::net::TcpStream>>),
}

impl Connected {
    pub fn transport(&self) -> Transport {
        match self {
            Connected::Quic(_) => Transport::Quic,
            Connected::Tcp(_) => Transport::Tcp,
        }
    }
}

/// Connects to the first of `addrs` to answer, by QUIC ([`connect_first_to`], when `endpoint`
/// is given) or by TLS over TCP, happy-eyeballs style: QUIC alone for [`TCP_HEAD_START`] (or
/// until it failed), then TCP ([`connect_tcp_first`]) beside it; the first handshake to
/// complete wins and the other attempt is dropped.
pub async fn connect_either(
    endpoint: Option<&quinn::Endpoint>,
    cfgs: &Configs,
    addrs: &[SocketAddr],
    server_name: &str,
    what: &str,
) -> Result<Connected> {
    let quic = async {
        match endpoint {
            Some(ep) => connect_first_to(ep, cfgs.quic.clone(), addrs, server_name, what).await,
            None => Err(anyhow!("no UDP socket on this device")),
        }
    };
    tokio::pin!(quic);
    let mut quic_err = None;
    tokio::select! {
        r = &mut quic => match r {
            Ok(c) => return Ok(Connected::Quic(c)),
            Err(e) => quic_err = Some(e),
        },
        _ = tokio::time::sleep(TCP_HEAD_START) => {}
    }
    debug!(what, "QUIC has not connected: trying TLS over TCP too");
    let tcp = connect_tcp_first(cfgs.tls.clone(), addrs, server_name, what);
    tokio::pin!(tcp);
    let mut tcp_err = None;
    loop {
        tokio::select! {
            r = &mut quic, if quic_err.is_none() => match r {
                Ok(c) => return Ok(Connected::Quic(c)),
                Err(e) => quic_err = Some(e),
            },
            r = &mut tcp, if tcp_err.is_none() => match r {
                Ok(s) => {
                    info!(what, "connected over TLS/TCP (QUIC did not get through)");
                    return Ok(Connected::Tcp(Box::new(s)));
                }
                Err(e) => tcp_err = Some(e),
            },
        }
        if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
            bail!("{q:#} (over TCP: {t:#})");
        }
    }
}

/// [`connect_first_to`] over TLS/TCP: an attempt per address every [`ATTEMPT_DELAY`] (or at
/// once when the previous one failed), each bounded by [`CONNECT_TIMEOUT`].
pub async fn connect_tcp_first(
    tls: Arc<rustls::ClientConfig>,
    addrs: &[SocketAddr],
    server_name: &str,
    what: &str,
) -> Result<ward_runtime::stream::client::TlsStream<tokio::net::TcpStream>> {
    let Some(&first) = addrs.first() else {
        bail!("no {what} address to connect to");
    };
    let mut pending = tokio::task::JoinSet::new();
    let mut next = addrs.iter().copied();
    let mut last_err = None;
    loop {
        if let Some(addr) = next.next() {
            debug!(%addr, what, "connecting over TCP");
            let (tls, name) = (tls.clone(), server_name.to_string());
            pending.spawn(async move {
                let r = ward_runtime::stream::connect_tls(addr, tls, &name, CONNECT_TIMEOUT).await;
                (addr, r)
            });
        }
        let more = next.len() > 0;
        tokio::select! {
            joined = pending.join_next(), if !pending.is_empty() => match joined {
                Some(Ok((_, Ok(s)))) => {
                    pending.abort_all();
                    return Ok(s);
                }
                Some(Ok((addr, Err(e)))) => {
                    debug!(%addr, what, error = %format!("{e:#}"), "TCP attempt failed");
                    last_err = Some(e);
                }
                Some(Err(_)) | None => {}
            },
            _ = tokio::time::sleep(ATTEMPT_DELAY), if more => {}
        }
        if pending.is_empty() && !more {
            let e = last_err.unwrap_or_else(|| anyhow!("no attempt completed"));
            if addrs.len() == 1 {
                bail!("cannot connect to the {what} at {first} over TCP: {e:#}");
            }
            bail!("cannot connect to the {what} at any of {addrs:?} over TCP: {e:#}");
        }
    }
}

/// Whether a QUIC handshake to one of `addrs` completes now (the connection is closed at
/// once): the check a device on TCP makes to move back to UDP.
pub async fn quic_gets_through(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addrs: &[SocketAddr],
    server_name: &str,
    what: &str,
) -> bool {
    match connect_first_to(endpoint, cfg, addrs, server_name, what).await {
        Ok(c) => {
            c.close(0u32.into(), b"probe");
            true
        }
        Err(_) => false,
    }
}

/// The sending half of a control stream, over either transport.
pub struct SendHalf(SendKind);

enum SendKind {
    Quic(quinn::SendStream),
    Tcp(BoxWrite),
}

impl SendHalf {
    /// Writes all of `buf` (raw bytes: tests speak the protocol by hand with it).
    pub async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match &mut self.0 {
            SendKind::Quic(s) => s.write_all(buf).await.map_err(Into::into),
            SendKind::Tcp(s) => s.write_all(buf).await,
        }
    }

    /// Ends the QUIC stream at once; over TCP (whose end is an async TLS close) it does
    /// nothing and says so: use [`SendHalf::shutdown`].
    pub fn finish(&mut self) -> std::io::Result<()> {
        match &mut self.0 {
            SendKind::Quic(s) => s.finish().map_err(|e| std::io::Error::other(e.to_string())),
            SendKind::Tcp(_) => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
        }
    }

    /// Ends the stream, either transport.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match &mut self.0 {
            SendKind::Quic(s) => s.shutdown().await,
            SendKind::Tcp(s) => s.shutdown().await,
        }
    }
}

/// A control-stream connection over either transport: frames in, frames out.
pub struct Channel {
    pub transport: Transport,
    pub send: SendHalf,
    recv: BoxRead,
    /// The QUIC connection beneath the stream, to close it with a reason.
    conn: Option<quinn::Connection>,
    dec: FrameDecoder,
}

impl Channel {
    /// A QUIC control session to `addr`.
    pub async fn open(
        endpoint: &quinn::Endpoint,
        cfg: quinn::ClientConfig,
        addr: SocketAddr,
    ) -> Result<Self> {
        Self::open_any(endpoint, cfg, &[addr]).await
    }

    /// Opens the control stream on the first of `addrs` to answer QUIC ([`connect_first`]).
    pub async fn open_any(
        endpoint: &quinn::Endpoint,
        cfg: quinn::ClientConfig,
        addrs: &[SocketAddr],
    ) -> Result<Self> {
        let conn = connect_first(endpoint, cfg, addrs).await?;
        Self::on(Connected::Quic(conn)).await
    }

    /// Opens the control stream on the first of `addrs` to answer, QUIC or, where UDP does not
    /// get through, TLS over TCP ([`connect_either`]).
    pub async fn open_either(
        endpoint: Option<&quinn::Endpoint>,
        cfgs: &Configs,
        addrs: &[SocketAddr],
    ) -> Result<Self> {
        let c = connect_either(
            endpoint,
            cfgs,
            addrs,
            COORDINATOR_SERVER_NAME,
            "coordinator",
        )
        .await?;
        Self::on(c).await
    }

    async fn on(c: Connected) -> Result<Self> {
        let transport = c.transport();
        let (send, recv, conn): (SendKind, BoxRead, _) = match c {
            Connected::Quic(conn) => {
                let (send, recv) = conn.open_bi().await?;
                (SendKind::Quic(send), Box::new(recv), Some(conn))
            }
            Connected::Tcp(tls) => {
                let (recv, send) = tokio::io::split(*tls);
                (SendKind::Tcp(Box::new(send)), Box::new(recv), None)
            }
        };
        Ok(Self {
            transport,
            send: SendHalf(send),
            recv,
            conn,
            dec: FrameDecoder::new(MAX_COORDINATOR_FRAME),
        })
    }

    pub async fn send(&mut self, msg: &DeviceMsg) -> Result<()> {
        self.send.write_all(&wire::encode(msg)).await?;
        Ok(())
    }

    /// Next message; `Ok(None)` when the coordinator closed the stream.
    pub async fn recv(&mut self) -> Result<Option<CoordinatorMsg>> {
        Ok(self.recv_sized().await?.map(|(m, _)| m))
    }

    /// Next message and the bytes its frame took on the stream (length prefix included);
    /// `Ok(None)` when the coordinator closed the stream.
    pub async fn recv_sized(&mut self) -> Result<Option<(CoordinatorMsg, usize)>> {
        let read = async {
            let Some(f) = read_frame(&mut self.recv, &mut self.dec).await? else {
                return Ok(None);
            };
            let m = wire::decode_coordinator_msg(&f)?;
            anyhow::Ok(Some((m, f.len() + 4)))
        };
        read.await.context("control stream")
    }

    /// Closes the connection with `reason` (QUIC), or drops it (TCP: the end of the stream
    /// tells the coordinator).
    pub fn close(self, reason: &str) {
        if let Some(c) = self.conn {
            c.close(0u32.into(), reason.as_bytes());
        }
    }
}

/// Generates the identity key and CSR, and enrolls. Returns the identity key PEM too.
pub async fn enroll(token: &EnrollToken, hostname: &str, os: &str) -> Result<(Enrolled, String)> {
    let key = rcgen::KeyPair::generate().context("generating identity key")?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .context("making certificate request")?;
    // No UDP socket at all (a sandbox) still leaves TCP.
    let endpoint = client_endpoint()
        .inspect_err(|e| debug!(error = %format!("{e:#}"), "no QUIC endpoint: TCP only"))
        .ok();
    let cfgs = enroll_configs(token.ca_sha256)?;
    // The token's addresses in order: the first coordinator that answers enrolls the device.
    let mut opened = None;
    let mut errors = Vec::new();
    for coordinator in token.coordinators() {
        let res = match resolve(&coordinator).await {
            Ok(addrs) => Channel::open_either(endpoint.as_ref(), &cfgs, &addrs).await,
            Err(e) => Err(e),
        };
        match res {
            Ok(ch) => {
                opened = Some(ch);
                break;
            }
            Err(e) => {
                debug!(%coordinator, error = %format!("{e:#}"), "coordinator unreachable for enrollment");
                errors.push(format!("{coordinator}: {e:#}"));
            }
        }
    }
    let Some(mut ch) = opened else {
        bail!("no coordinator answered: {}", errors.join("; "));
    };
    ch.send(&DeviceMsg::Enroll(EnrollRequest {
        protocol: PROTOCOL_VERSION,
        token_id: token.id_hex(),
        token_secret: TokenSecret(Bytes(token.secret.expose().to_vec())),
        hostname: hostname.to_string(),
        os: os.to_string(),
        csr_der: Bytes(csr.der().to_vec()),
    }))
    .await?;
    let reply = tokio::time::timeout(CONNECT_TIMEOUT, ch.recv())
        .await
        .map_err(|_| anyhow!("the coordinator did not answer the enrollment"))??;
    ch.close("enrolled");
    // Long enough for the close to go out; a losing happy-eyeballs attempt to an address that
    // never answered would otherwise hold the endpoint for its whole drain period (seconds).
    if let Some(endpoint) = &endpoint {
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    }
    match reply {
        Some(CoordinatorMsg::Enrolled(e)) => {
            if Sha256::digest(&e.ca_der.0).as_slice() != token.ca_sha256 {
                bail!("the coordinator sent a CA that does not match the token's fingerprint");
            }
            Ok((e, key.serialize_pem()))
        }
        Some(CoordinatorMsg::Error { code, message }) => Err(Refused { code, message }.into()),
        Some(other) => bail!("unexpected answer to enrollment: {:?}", msg_type(&other)),
        None => bail!("the coordinator closed the connection without answering"),
    }
}

/// A device sign-in in progress: the provider's code is shown to the user while this waits
/// for the coordinator's `enrolled` (or `error`) on the same stream.
pub struct PendingLogin {
    ch: Channel,
    endpoint: Option<quinn::Endpoint>,
    key: rcgen::KeyPair,
    ca_sha256: [u8; 32],
    pub expires_in: Duration,
}

/// Starts `ward up --login`: a fresh identity key and CSR, a `login_start` to the coordinator at
/// `coordinator` (its CA pinned by `ca_sha256`), and its `login_pending` answer.
pub async fn login_start(
    coordinator: &str,
    ca_sha256: [u8; 32],
    hostname: &str,
    os: &str,
    pkce: Option<wire::LoginPkce>,
) -> Result<(LoginAnswer, PendingLogin)> {
    let key = rcgen::KeyPair::generate().context("generating identity key")?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .context("making certificate request")?;
    let addrs = resolve(coordinator).await?;
    let endpoint = client_endpoint()
        .inspect_err(|e| debug!(error = %format!("{e:#}"), "no QUIC endpoint: TCP only"))
        .ok();
    let mut ch =
        Channel::open_either(endpoint.as_ref(), &enroll_configs(ca_sha256)?, &addrs).await?;
    ch.send(&DeviceMsg::LoginStart(wire::LoginStart {
        protocol: PROTOCOL_VERSION,
        hostname: hostname.to_string(),
        os: os.to_string(),
        csr_der: Bytes(csr.der().to_vec()),
        pkce,
    }))
    .await?;
    // The coordinator asks the provider first: allow for its timeouts.
    let reply = tokio::time::timeout(Duration::from_secs(30), ch.recv())
        .await
        .map_err(|_| anyhow!("the coordinator did not answer the sign-in request"))??;
    match reply {
        Some(CoordinatorMsg::LoginAuthorize(a)) => {
            let expires_in = Duration::from_secs(a.expires_in_secs.clamp(1, 3600));
            Ok((
                LoginAnswer::Browser(a),
                PendingLogin {
                    ch,
                    endpoint,
                    key,
                    ca_sha256,
                    expires_in,
                },
            ))
        }
        Some(CoordinatorMsg::LoginPending(p)) => {
            let expires_in = Duration::from_secs(p.expires_in_secs.clamp(1, 3600));
            Ok((
                LoginAnswer::Device(p),
                PendingLogin {
                    ch,
                    endpoint,
                    key,
                    ca_sha256,
                    expires_in,
                },
            ))
        }
        Some(CoordinatorMsg::Error { code, message }) => Err(Refused { code, message }.into()),
        Some(other) => bail!(
            "unexpected answer to the sign-in request: {:?}",
            msg_type(&other)
        ),
        None => bail!("the coordinator closed the connection without answering"),
    }
}

/// How the coordinator answered `login_start`.
pub enum LoginAnswer {
    /// The device grant: a code to confirm at the provider.
    Device(wire::LoginPending),
    /// The browser sign-in: an authorization URL; `login_callback` must follow.
    Browser(wire::LoginAuthorize),
}

impl PendingLogin {
    /// Passes the browser sign-in's redirect on to the coordinator.
    pub async fn send_callback(&mut self, cb: wire::LoginCallback) -> Result<()> {
        self.ch.send(&DeviceMsg::LoginCallback(cb)).await
    }

    /// Waits for the sign-in to end. Returns the enrollment and the identity key PEM.
    pub async fn wait(mut self) -> Result<(Enrolled, String)> {
        let reply = tokio::time::timeout(self.expires_in + Duration::from_secs(30), self.ch.recv())
            .await
            .map_err(|_| anyhow!("the sign-in was not completed in time"))??;
        self.ch.close("signed in");
        if let Some(endpoint) = &self.endpoint {
            let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        }
        match reply {
            Some(CoordinatorMsg::Enrolled(e)) => {
                if Sha256::digest(&e.ca_der.0).as_slice() != self.ca_sha256 {
                    bail!("the coordinator sent a CA that does not match the pinned fingerprint");
                }
                Ok((e, self.key.serialize_pem()))
            }
            Some(CoordinatorMsg::Error { code, message }) => Err(Refused { code, message }.into()),
            Some(other) => bail!("unexpected answer to the sign-in: {:?}", msg_type(&other)),
            None => bail!("the coordinator closed the connection during the sign-in"),
        }
    }
}

/// Starts signing an enrolled device in again (`ward up --login` while enrolled): a
/// connection with the device's certificate, a `sign_in_start`, and the coordinator's answer
/// (the device grant's code, or the browser sign-in's URL).
pub async fn sign_in_again(
    coordinator: &str,
    ca_der: &[u8],
    cert_der: &[u8],
    key_pem: &str,
    pkce: Option<wire::LoginPkce>,
) -> Result<(LoginAnswer, PendingSignIn)> {
    let addrs = resolve(coordinator).await?;
    let endpoint = client_endpoint()
        .inspect_err(|e| debug!(error = %format!("{e:#}"), "no QUIC endpoint: TCP only"))
        .ok();
    let cfgs = session_configs(ca_der, cert_der, key_pem)?;
    let mut ch = Channel::open_either(endpoint.as_ref(), &cfgs, &addrs).await?;
    ch.send(&DeviceMsg::SignInStart(wire::SignInStart {
        protocol: PROTOCOL_VERSION,
        pkce,
    }))
    .await?;
    let reply = tokio::time::timeout(Duration::from_secs(30), ch.recv())
        .await
        .map_err(|_| anyhow!("the coordinator did not answer the sign-in request"))??;
    let (answer, secs) = match reply {
        Some(CoordinatorMsg::LoginAuthorize(a)) => {
            let secs = a.expires_in_secs;
            (LoginAnswer::Browser(a), secs)
        }
        Some(CoordinatorMsg::LoginPending(p)) => {
            let secs = p.expires_in_secs;
            (LoginAnswer::Device(p), secs)
        }
        Some(CoordinatorMsg::Error { code, message }) => {
            return Err(Refused {
                code,
                message: predates_sign_in_again(code, message),
            }
            .into())
        }
        Some(other) => bail!(
            "unexpected answer to the sign-in request: {:?}",
            msg_type(&other)
        ),
        None => bail!("the coordinator closed the connection without answering"),
    };
    Ok((
        answer,
        PendingSignIn {
            ch,
            endpoint,
            expires_in: Duration::from_secs(secs.clamp(1, 3600)),
        },
    ))
}

/// A coordinator that predates `sign_in_start` refuses it as an unknown message: say so.
fn predates_sign_in_again(code: ErrorCode, message: String) -> String {
    if code == ErrorCode::Protocol && message.contains("sign_in_start") {
        format!(
            "this coordinator cannot sign an enrolled device in again (it is older than this \
             agent): re-enroll, or upgrade the coordinator ({message})"
        )
    } else {
        message
    }
}

/// Signing an enrolled device in again, in progress: waits for `signed_in` (or `error`).
pub struct PendingSignIn {
    ch: Channel,
    endpoint: Option<quinn::Endpoint>,
    pub expires_in: Duration,
}

impl PendingSignIn {
    /// Passes the browser sign-in's redirect on to the coordinator.
    pub async fn send_callback(&mut self, cb: wire::LoginCallback) -> Result<()> {
        self.ch.send(&DeviceMsg::LoginCallback(cb)).await
    }

    /// Waits for the sign-in to end: the identity facts the coordinator stored.
    pub async fn wait(mut self) -> Result<wire::SignedIn> {
        let reply = tokio::time::timeout(self.expires_in + Duration::from_secs(30), self.ch.recv())
            .await
            .map_err(|_| anyhow!("the sign-in was not completed in time"))??;
        self.ch.close("signed in");
        if let Some(endpoint) = &self.endpoint {
            let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        }
        match reply {
            Some(CoordinatorMsg::SignedIn(s)) => Ok(s),
            Some(CoordinatorMsg::Error { code, message }) => Err(Refused { code, message }.into()),
            Some(other) => bail!("unexpected answer to the sign-in: {:?}", msg_type(&other)),
            None => bail!("the coordinator closed the connection during the sign-in"),
        }
    }
}

pub fn msg_type(m: &CoordinatorMsg) -> &'static str {
    match m {
        CoordinatorMsg::Enrolled(_) => "enrolled",
        CoordinatorMsg::LoginPending(_) => "login_pending",
        CoordinatorMsg::LoginAuthorize(_) => "login_authorize",
        CoordinatorMsg::SignedIn(_) => "signed_in",
        CoordinatorMsg::Netmap(_) => "netmap",
        CoordinatorMsg::NetmapDelta(_) => "netmap_delta",
        CoordinatorMsg::CertRenewed { .. } => "cert_renewed",
        CoordinatorMsg::Pong { .. } => "pong",
        CoordinatorMsg::Error { .. } => "error",
        CoordinatorMsg::Lease { .. } => "lease",
        CoordinatorMsg::RotateNow { .. } => "rotate_now",
        CoordinatorMsg::PostureWants(_) => "posture_wants",
        CoordinatorMsg::PostureVerdict(_) => "posture_verdict",
        CoordinatorMsg::RelayTicket { .. } => "relay_ticket",
        CoordinatorMsg::Punch { .. } => "punch",
        CoordinatorMsg::FlowsAck { .. } => "flows_ack",
        CoordinatorMsg::PeerRefused { .. } => "peer_refused",
    }
}

/// A fresh identity key's CSR, for tests that speak the protocol by hand.
pub fn test_csr() -> Vec<u8> {
    rcgen::KeyPair::generate()
        .and_then(|k| rcgen::CertificateParams::default().serialize_request(&k))
        .map(|c| c.der().to_vec())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_older_coordinators_refusal_of_signing_in_again_says_so() {
        // What a coordinator that predates the message answers (its decode error).
        let old = "unknown variant `sign_in_start`, expected one of `enroll`, `login_start`";
        let m = predates_sign_in_again(ErrorCode::Protocol, old.into());
        assert!(
            m.starts_with("this coordinator cannot sign an enrolled device in again"),
            "{m}"
        );
        let other = predates_sign_in_again(ErrorCode::LoginFailed, "the user refused".into());
        assert_eq!(other, "the user refused");
    }

    #[test]
    fn eyeballs_puts_ipv6_first_and_interleaves() {
        let got = eyeballs_order([
            a("10.0.0.1:7443"),
            a("10.0.0.2:7443"),
            a("10.0.0.3:7443"),
            a("[fd00::1]:7443"),
            a("[fd00::2]:7443"),
        ]);
        assert_eq!(
            got,
            vec![
                a("[fd00::1]:7443"),
                a("10.0.0.1:7443"),
                a("[fd00::2]:7443"),
                a("10.0.0.2:7443"),
                a("10.0.0.3:7443"),
            ]
        );
    }

    #[test]
    fn eyeballs_keeps_one_family_in_resolver_order_and_drops_repeats() {
        assert_eq!(
            eyeballs_order([a("10.0.0.2:1"), a("10.0.0.1:1"), a("10.0.0.2:1")]),
            vec![a("10.0.0.2:1"), a("10.0.0.1:1")]
        );
        assert_eq!(
            eyeballs_order([a("[::2]:1"), a("[::1]:1")]),
            vec![a("[::2]:1"), a("[::1]:1")]
        );
        assert!(eyeballs_order([]).is_empty());
    }

    #[tokio::test]
    async fn literal_addresses_are_used_as_is() {
        assert_eq!(
            resolve("[fd00:77::1]:7443").await.unwrap(),
            vec![a("[fd00:77::1]:7443")]
        );
        assert_eq!(
            resolve("10.99.0.1:7443").await.unwrap(),
            vec![a("10.99.0.1:7443")]
        );
    }

    #[tokio::test]
    async fn client_endpoint_is_dual_stack_where_the_host_has_ipv6() {
        let ep = client_endpoint().unwrap();
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            assert!(ep.local_addr().unwrap().is_ipv6());
        }
    }

    #[tokio::test]
    async fn connect_first_moves_on_from_a_silent_address() {
        // A silent IPv6 address first, then a QUIC server on IPv4: the second attempt starts
        // after the attempt delay and wins.
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            return;
        }
        let silent = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![COORDINATOR_SERVER_NAME.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_der = cert.der().to_vec();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert_der.clone())],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![wire::ALPN.to_vec()];
        let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        let server = quinn::Endpoint::server(server_cfg, a("127.0.0.1:0")).unwrap();
        let server_addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let inc = server.accept().await.unwrap();
            let conn = inc.await.unwrap();
            let remote = conn.remote_address();
            conn.closed().await;
            remote
        });

        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(cert_der)).unwrap();
        let mut ctls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        ctls.alpn_protocols = vec![wire::ALPN.to_vec()];
        let ep = client_endpoint().unwrap();
        let started = std::time::Instant::now();
        let conn = connect_first(
            &ep,
            client_config(ctls).unwrap(),
            &[silent.local_addr().unwrap(), server_addr],
        )
        .await
        .unwrap();
        let took = started.elapsed();
        // The dual-stack endpoint reached the IPv4 server (it sees a v4-mapped address).
        assert_eq!(conn.remote_address().port(), server_addr.port());
        assert!(
            took >= ATTEMPT_DELAY,
            "second attempt started early: {took:?}"
        );
        assert!(took < CONNECT_TIMEOUT / 2, "took {took:?}");
        conn.close(0u32.into(), b"done");
        let remote = accept.await.unwrap();
        assert!(remote.ip().is_loopback() || remote.ip().to_string().contains("127.0.0.1"));
    }
}
