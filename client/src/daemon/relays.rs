//! The relay connections' driver: one task per relay the agent asks for, each holding one QUIC
//! connection (ALPN `ward-relay/1`, mutual TLS with the device certificate, server name
//! `NAME.relay.ward.internal` under the CA), and one pump for the data plane's relayed
//! datagrams.
//!
//! A task connects, sends `Hello{ticket}`, waits (bounded) for `Welcome`, then reports
//! [`RelayConnEvent::Up`] and every second an RTT sample; it hands every received datagram
//! (`split_datagram`) to [`DataPlane::handle_relayed`], presents fresh tickets as they come,
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
use tracing::{debug, info, trace};

use ward_shared::relay::{
    encode_datagram, relay_server_name, split_datagram, DeviceToRelay, RelayToDevice, SignedTicket,
    MAX_RELAYED_DATAGRAM, MAX_RELAY_STREAM_FRAME, RELAY_HEADER_LEN, RELAY_PROTOCOL_VERSION,
};
use ward_shared::wire::{self, DeviceId, FrameDecoder};

use super::lock;
use crate::agent::RelayConnEvent;
use crate::control;
use crate::dataplane::{DataPlane, RelayTransmit};

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
    pub config: quinn::ClientConfig,
}

/// Datagrams the pump could not send, by reason.
#[derive(Debug, Default)]
pub(super) struct PumpCounters {
    pub sent: AtomicU64,
    pub no_connection: AtomicU64,
    pub send_failed: AtomicU64,
    /// Received datagrams without a valid header or too big.
    pub malformed_in: AtomicU64,
}

type Live = Arc<Mutex<BTreeMap<Arc<str>, quinn::Connection>>>;

struct Task {
    creds: watch::Sender<Credentials>,
    handle: tokio::task::JoinHandle<()>,
}

/// The relay tasks and the outbound pump; owned by the session loop.
pub(super) struct RelayClients {
    endpoint: Option<quinn::Endpoint>,
    dp: Option<Arc<DataPlane>>,
    live: Live,
    tasks: BTreeMap<String, Task>,
    events: mpsc::Sender<RelayConnEvent>,
    pump: Option<tokio::task::JoinHandle<()>>,
    pub counters: Arc<PumpCounters>,
}

impl RelayClients {
    /// Reports go to `events`; the pump starts if the data plane has an outbound queue.
    pub fn new(
        endpoint: Option<quinn::Endpoint>,
        dp: Option<Arc<DataPlane>>,
        events: mpsc::Sender<RelayConnEvent>,
    ) -> Self {
        let live: Live = Arc::default();
        let counters = Arc::new(PumpCounters::default());
        let pump = dp
            .as_ref()
            .and_then(|d| d.take_relay_outbound())
            .map(|rx| tokio::spawn(pump(rx, live.clone(), counters.clone())));
        Self {
            endpoint,
            dp,
            live,
            tasks: BTreeMap::new(),
            events,
            pump,
            counters,
        }
    }

    /// Holds a connection to `name` at `addr` (replacing any earlier one for that name).
    pub fn connect(&mut self, name: String, addr: String, creds: Credentials) {
        self.disconnect(&name);
        let Some(endpoint) = self.endpoint.clone() else {
            let events = self.events.clone();
            tokio::spawn(async move {
                let _ = events
                    .send(RelayConnEvent::Down {
                        relay: name,
                        error: "no QUIC endpoint on this device".into(),
                    })
                    .await;
            });
            return;
        };
        let (tx, rx) = watch::channel(creds);
        let name_arc: Arc<str> = Arc::from(name.as_str());
        let handle = tokio::spawn(run(RelayTask {
            name: name_arc,
            addr,
            endpoint,
            creds: rx,
            live: self.live.clone(),
            dp: self.dp.clone(),
            events: self.events.clone(),
            counters: self.counters.clone(),
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
            c.close(0u32.into(), b"relay no longer used");
        }
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
async fn pump(mut rx: mpsc::Receiver<RelayTransmit>, live: Live, counters: Arc<PumpCounters>) {
    while let Some(t) = rx.recv().await {
        let conn = lock(&live).get(&t.relay).cloned();
        let Some(conn) = conn else {
            counters.no_connection.fetch_add(1, Ordering::Relaxed);
            trace!(relay = %t.relay, "no live connection to the relay: datagram dropped");
            continue;
        };
        match conn.send_datagram(encode_datagram(DeviceId(t.to), &t.datagram).into()) {
            Ok(()) => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counters.send_failed.fetch_add(1, Ordering::Relaxed);
                trace!(relay = %t.relay, error = %e, "relayed datagram not sent");
            }
        }
    }
}

struct RelayTask {
    name: Arc<str>,
    addr: String,
    endpoint: quinn::Endpoint,
    creds: watch::Receiver<Credentials>,
    live: Live,
    dp: Option<Arc<DataPlane>>,
    events: mpsc::Sender<RelayConnEvent>,
    counters: Arc<PumpCounters>,
}

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
    let (conn, mut send, mut recv, max_datagram) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(t, &creds))
            .await
            .map_err(|_| anyhow!("no welcome from the relay within {HANDSHAKE_TIMEOUT:?}"))??;
    lock(&t.live).insert(t.name.clone(), conn.clone());
    info!(relay = %t.name, addr = %conn.remote_address(), max_datagram, "relay connection up");
    t.events
        .send(RelayConnEvent::Up {
            relay: t.name.to_string(),
            rtt: conn.rtt(),
            max_datagram,
        })
        .await
        .map_err(|_| anyhow!("session loop gone"))?;
    let mut dec = FrameDecoder::new(MAX_RELAY_STREAM_FRAME);
    let mut buf = vec![0u8; 4096];
    let mut tick = tokio::time::interval(RTT_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            d = conn.read_datagram() => {
                let d = d.map_err(|e| anyhow!("relay connection: {e}"))?;
                match split_datagram(&d) {
                    Some((from, body)) => {
                        if let Some(dp) = &t.dp {
                            dp.handle_relayed(&t.name, from.0, body);
                        }
                    }
                    None => {
                        t.counters.malformed_in.fetch_add(1, Ordering::Relaxed);
                        trace!(relay = %t.name, len = d.len(), "malformed relayed datagram");
                    }
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
            frame = read_frame(&mut recv, &mut dec, &mut buf) => {
                match frame? {
                    Some(RelayToDevice::Error { code, message }) => {
                        bail!("the relay refused: {message} ({code:?})")
                    }
                    Some(RelayToDevice::Welcome { .. }) => {}
                    None => bail!("the relay closed the stream"),
                }
            }
            _ = tick.tick() => {
                // Only a sample: dropped when the loop is busy.
                let _ = t.events.try_send(RelayConnEvent::Rtt {
                    relay: t.name.to_string(),
                    rtt: conn.rtt(),
                    max_datagram: datagram_limit(&conn, u16::MAX),
                });
            }
        }
    }
}

type Opened = (quinn::Connection, quinn::SendStream, quinn::RecvStream, u16);

async fn handshake(t: &RelayTask, creds: &Credentials) -> Result<Opened> {
    let what = format!("relay {}", t.name);
    let addrs = control::resolve_named(&t.addr, &what).await?;
    let conn = control::connect_first_to(
        &t.endpoint,
        creds.config.clone(),
        &addrs,
        &relay_server_name(&t.name),
        &what,
    )
    .await?;
    let (mut send, mut recv) = conn.open_bi().await.context("opening the relay stream")?;
    send.write_all(&wire::encode(&DeviceToRelay::Hello {
        protocol: RELAY_PROTOCOL_VERSION,
        ticket: creds.ticket.clone(),
    }))
    .await
    .context("sending hello")?;
    let mut dec = FrameDecoder::new(MAX_RELAY_STREAM_FRAME);
    let mut buf = vec![0u8; 4096];
    match read_frame(&mut recv, &mut dec, &mut buf).await? {
        Some(RelayToDevice::Welcome { max_datagram, .. }) => {
            let max = datagram_limit(&conn, max_datagram);
            Ok((conn, send, recv, max))
        }
        Some(RelayToDevice::Error { code, message }) => {
            bail!("the relay refused: {message} ({code:?})")
        }
        None => bail!("the relay closed the stream before welcoming"),
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

/// The next frame on the relay stream (bounded by the decoder); `None` at its end. Cancel
/// safe: bytes read are kept in `dec`.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Option<RelayToDevice>> {
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(Some(wire::decode(&f)?));
        }
        let want = dec.wanted().min(buf.len());
        match recv.read(&mut buf[..want]).await {
            Ok(Some(n)) => dec.push(&buf[..n]),
            Ok(None) => {
                dec.finish()?;
                return Ok(None);
            }
            Err(e) => return Err(anyhow!("relay stream: {e}")),
        }
    }
}
