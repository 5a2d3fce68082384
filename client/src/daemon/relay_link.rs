//! A relay connection as the rest of [`super::relays`] sees it, whichever transport carries it
//! ([`RelayLink`]), and the TLS-over-TCP side of it: the handshake and the serve loop of a
//! link on a network that drops UDP.
//!
//! Over TCP, the relay stream's messages, the datagrams and a ping every
//! [`super::relays::RTT_INTERVAL`] share one TLS stream as [`ward_shared::relay`]'s TCP frames.
//! A writer task owns the write half (frames queue in a bounded channel: a full queue drops
//! the datagram and counts it, as a full QUIC datagram buffer does), so reading never waits
//! on writing. The link is dead after [`TCP_IDLE_TIMEOUT_MS`] without a byte from the relay.
//! While on TCP the task checks every [`control::QUIC_RETRY_EVERY`] whether QUIC gets through
//! again, and if so ends the link so the reconnect goes back to UDP.

use anyhow::{anyhow, bail, Context as _, Result};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, trace};

use ward_runtime::stream::{client::TlsStream, Transport};
use ward_shared::relay::{
    encode_tcp_msg, encode_tcp_ping, encode_tcp_raw_datagram, parse_tcp_frame, relay_server_name,
    split_datagram, DeviceToRelay, RelayToDevice, TcpFrame, MAX_RELAYED_DATAGRAM,
    MAX_RELAY_STREAM_FRAME, RELAY_PROTOCOL_VERSION, TCP_IDLE_TIMEOUT_MS,
};
use ward_shared::wire::{self, FrameDecoder};

use super::relay_plain::PlainLink;
use super::{lock, RelayTask, RTT_INTERVAL};
use crate::agent::RelayConnEvent;
use crate::control;

/// Frames queued toward the relay on a TCP link before datagrams are dropped.
const TCP_QUEUE: usize = 1024;
/// Which transport each connection uses now, for `ward status` and `ward netcheck`.
#[derive(Debug, Default, Clone)]
pub struct Transports {
    /// The control session's transport; `None` while it is down.
    pub control: Option<Transport>,
    /// Relay links that are up, by relay name.
    pub relays: BTreeMap<String, Transport>,
    /// The QUIC relay links whose relayed datagrams go in plain UDP now (bound).
    pub relay_udp_bound: std::collections::BTreeSet<String>,
    /// Plain-UDP bind attempts or refreshes left unanswered (the link went or stayed on QUIC
    /// datagrams), over all links since the daemon started.
    pub relay_udp_fallbacks: u64,
}

pub type SharedTransports = Arc<Mutex<Transports>>;

/// A welcomed relay connection: where the pump sends datagrams.
#[derive(Clone)]
pub(in crate::daemon) enum RelayLink {
    /// A QUIC link, with its plain-UDP path where it has one (used while bound).
    Quic(quinn::Connection, Option<Arc<PlainLink>>),
    Tcp(mpsc::Sender<Vec<u8>>),
}

/// A datagram the link could not take.
#[derive(Debug, thiserror::Error)]
pub(in crate::daemon) enum LinkSendError {
    #[error(transparent)]
    Quic(#[from] quinn::SendDatagramError),
    #[error("TCP send queue full or closed")]
    Tcp,
}

impl RelayLink {
    /// Sends one datagram (8-byte device-id header included) without waiting.
    pub fn send_datagram(&self, d: bytes::Bytes) -> Result<(), LinkSendError> {
        match self {
            RelayLink::Quic(c, _) => Ok(c.send_datagram(d)?),
            RelayLink::Tcp(tx) => tx
                .try_send(encode_tcp_raw_datagram(&d))
                .map_err(|_| LinkSendError::Tcp),
        }
    }

    /// Closes the connection (a TCP link closes when its task, aborted with it, ends).
    pub fn close(&self, reason: &[u8]) {
        if let RelayLink::Quic(c, plain) = self {
            c.close(0u32.into(), reason);
            if let Some(p) = plain {
                p.stop();
            }
        }
    }
}

/// A TCP link after `Welcome`.
pub(super) struct TcpOpened {
    pub rd: ReadHalf<TlsStream<TcpStream>>,
    pub wr: WriteHalf<TlsStream<TcpStream>>,
    pub dec: FrameDecoder,
    pub max_datagram: u16,
    /// Hello to welcome: the first RTT sample.
    pub rtt: Duration,
}

/// `Hello{ticket}` on a fresh TLS/TCP connection, then (bounded by the caller) `Welcome`.
pub(super) async fn handshake_tcp(
    tls: TlsStream<TcpStream>,
    ticket: ward_shared::relay::SignedTicket,
) -> Result<TcpOpened> {
    let (mut rd, mut wr) = tokio::io::split(tls);
    let sent = Instant::now();
    wr.write_all(&encode_tcp_msg(&DeviceToRelay::Hello {
        protocol: RELAY_PROTOCOL_VERSION,
        ticket,
    }))
    .await
    .context("sending hello")?;
    let mut dec = FrameDecoder::new(MAX_RELAY_STREAM_FRAME);
    loop {
        let Some(frame) = ward_runtime::stream::read_frame(&mut rd, &mut dec).await? else {
            bail!("the relay closed the stream before welcoming");
        };
        match parse_tcp_frame(&frame) {
            Some(TcpFrame::Msg(m)) => match wire::decode::<RelayToDevice>(m)? {
                RelayToDevice::Welcome { max_datagram, .. } => {
                    let max_datagram =
                        max_datagram.min(u16::try_from(MAX_RELAYED_DATAGRAM).unwrap_or(u16::MAX));
                    return Ok(TcpOpened {
                        rd,
                        wr,
                        dec,
                        max_datagram,
                        rtt: sent.elapsed(),
                    });
                }
                RelayToDevice::Error { code, message } => {
                    bail!("the relay refused: {message} ({code:?})")
                }
                RelayToDevice::UdpBinding { .. } | RelayToDevice::UdpBound => {
                    bail!("the relay answered the hello with a plain-UDP binding message")
                }
            },
            Some(TcpFrame::Ping(_) | TcpFrame::Pong(_)) => {}
            Some(TcpFrame::Datagram(_)) | None => bail!("unexpected frame before welcome"),
        }
    }
}

/// Serves a welcomed TCP link until it fails: datagrams both ways, fresh tickets, a ping every
/// [`RTT_INTERVAL`] (its answer is the RTT sample), the idle bound, and the QUIC re-check.
pub(super) async fn serve_tcp(t: &mut RelayTask, opened: TcpOpened) -> Result<()> {
    let TcpOpened {
        mut rd,
        wr,
        mut dec,
        max_datagram,
        rtt,
    } = opened;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    let _writer = AbortOnDrop(tokio::spawn(ward_runtime::stream::write_frames(wr, rx)));
    lock(&t.live).insert(t.name.clone(), RelayLink::Tcp(tx.clone()));
    lock(&t.transports)
        .relays
        .insert(t.name.to_string(), Transport::Tcp);
    info!(relay = %t.name, max_datagram, "relay connection up over TLS/TCP");
    t.events
        .send(RelayConnEvent::Up {
            relay: t.name.to_string(),
            rtt,
            max_datagram,
        })
        .await
        .map_err(|_| anyhow!("session loop gone"))?;
    let idle = Duration::from_millis(TCP_IDLE_TIMEOUT_MS);
    let mut tick = tokio::time::interval(RTT_INTERVAL);
    let started = Instant::now();
    let mut last_heard = Instant::now();
    let mut retry_quic = tokio::time::interval_at(
        tokio::time::Instant::now() + control::QUIC_RETRY_EVERY,
        control::QUIC_RETRY_EVERY,
    );
    let mut probe: Option<tokio::task::JoinHandle<bool>> = None;
    loop {
        tokio::select! {
            frame = ward_runtime::stream::read_frame(&mut rd, &mut dec) => {
                let Some(frame) = frame.context("relay stream")? else {
                    bail!("the relay closed the stream");
                };
                last_heard = Instant::now();
                match parse_tcp_frame(&frame) {
                    Some(TcpFrame::Datagram(d)) => match split_datagram(d) {
                        Some((from, body)) => {
                            if let Some(sink) = &t.sink {
                                sink.relayed(&t.name, from.0, body);
                            }
                        }
                        None => {
                            t.counters.malformed_in.fetch_add(1, Ordering::Relaxed);
                            trace!(relay = %t.name, len = d.len(), "malformed relayed datagram");
                        }
                    },
                    Some(TcpFrame::Pong(sent_us)) => {
                        let now_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                        let rtt = Duration::from_micros(now_us.saturating_sub(sent_us));
                        // Only a sample: dropped when the loop is busy.
                        let _ = t.events.try_send(RelayConnEvent::Rtt {
                            relay: t.name.to_string(),
                            rtt,
                            max_datagram,
                        });
                    }
                    Some(TcpFrame::Ping(_)) => {}
                    Some(TcpFrame::Msg(m)) => match wire::decode::<RelayToDevice>(m)? {
                        RelayToDevice::Error { code, message } => {
                            bail!("the relay refused: {message} ({code:?})")
                        }
                        RelayToDevice::Welcome { .. } => {}
                        // Plain-UDP binding answers come only after a request this link
                        // (version 1) never sends.
                        RelayToDevice::UdpBinding { .. } | RelayToDevice::UdpBound => {
                            bail!("the relay sent an unrequested plain-UDP binding message")
                        }
                    },
                    None => bail!("unknown frame from the relay"),
                }
            }
            changed = t.creds.changed() => {
                changed.map_err(|_| anyhow!("relay no longer used"))?;
                let ticket = t.creds.borrow_and_update().ticket.clone();
                debug!(relay = %t.name, serial = ticket.ticket.serial, "presenting a fresh ticket");
                tx.send(encode_tcp_msg(&DeviceToRelay::Ticket { ticket }))
                    .await
                    .map_err(|_| anyhow!("relay link writer ended"))?;
            }
            _ = tick.tick() => {
                if last_heard.elapsed() >= idle {
                    bail!("nothing from the relay over TCP for {idle:?}");
                }
                let now_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                // A full queue skips a ping; the idle bound still holds.
                let _ = tx.try_send(encode_tcp_ping(now_us));
            }
            _ = retry_quic.tick(), if probe.is_none() && t.endpoint.is_some() => {
                if let Some(ep) = t.endpoint.clone() {
                    let cfg = t.creds.borrow().configs.quic.clone();
                    let (addr, name) = (t.addr.clone(), t.name.clone());
                    probe = Some(tokio::spawn(async move {
                        let what = format!("relay {name}");
                        let Ok(addrs) = control::resolve_named(&addr, &what).await else {
                            return false;
                        };
                        control::quic_gets_through(&ep, cfg, &addrs, &relay_server_name(&name), &what).await
                    }));
                }
            }
            // The `expect` cannot fire: the branch runs only while `probe` is `Some`.
            done = async { probe.as_mut().expect("guarded by the branch condition").await }, if probe.is_some() => {
                probe = None;
                if done.unwrap_or(false) {
                    bail!("QUIC gets through again: reconnecting over UDP");
                }
            }
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
