//! The TLS-over-TCP driver for devices on networks that drop UDP: the same port number as
//! the QUIC endpoint, the same TLS config (relay certificate, device certificates required and
//! verified against the CA, ALPN `ward-relay/1`), and the same forwarding core: a TCP device
//! is admitted by [`Forwarder::handle_connect`], ticketed by `handle_hello`, rate-limited,
//! routed and revoked exactly like a QUIC one ([`crate::server::forward`]).
//!
//! Per connection one task reads ([`ward_shared::relay`]'s TCP frames: messages, datagrams,
//! pings) and one writer task drains a bounded queue to the socket; a full queue drops the
//! datagram as [`crate::forward::Drop::QueueFull`], as a full QUIC datagram buffer does, so a
//! slow receiver costs only its own datagrams. Everything is bounded: the TLS handshake and
//! the hello by the hello timeout, frames by [`MAX_RELAY_STREAM_FRAME`], silence by
//! [`TCP_IDLE_TIMEOUT_MS`] (devices ping every second).
//!
//! [`Forwarder::handle_connect`]: crate::forward::Forwarder::handle_connect

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use ward_runtime::stream::server::TlsStream;
use ward_shared::relay::{
    encode_tcp_msg, encode_tcp_pong, encode_tcp_raw_datagram, parse_tcp_frame, DeviceToRelay,
    RelayToDevice, TcpFrame, MAX_RELAY_STREAM_FRAME, RELAY_ALPN, TCP_IDLE_TIMEOUT_MS,
    TCP_MAX_DATAGRAM,
};
use ward_shared::wire::{self, FrameDecoder};

use crate::forward::{ConnId, Refusal};
use crate::server::{
    accept_hello, accept_ticket, clock, forward_one, refusal_code, DeviceConn, DeviceSendError,
    Shared,
};

/// Frames queued toward one TCP device (about 1.5 MB of full datagrams) before datagrams to
/// it are dropped.
const QUEUE: usize = 1024;
/// How long a refused device gets to read the `Error` frame.
const ERROR_GRACE: Duration = Duration::from_millis(500);

/// A TCP device connection as the forwarding table holds it.
#[derive(Debug, Clone)]
pub(crate) struct TcpConn {
    tx: mpsc::Sender<Vec<u8>>,
    close: watch::Sender<bool>,
}

impl TcpConn {
    /// Room for one more datagram, or none.
    pub(crate) fn send_buffer_space(&self) -> usize {
        if self.tx.capacity() > 0 {
            usize::MAX
        } else {
            0
        }
    }

    pub(crate) fn send_datagram(&self, with_header: &[u8]) -> Result<(), DeviceSendError> {
        self.tx
            .try_send(encode_tcp_raw_datagram(with_header))
            .map_err(|_| DeviceSendError)
    }

    /// Asks the connection's task to end (the core gave up on it).
    pub(crate) fn close(&self) {
        self.close.send_replace(true);
    }
}

/// Accepts device connections on `listener` until the task is dropped.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: pause instead of spinning.
                tracing::debug!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Not welcomed by the coordinator yet: no certificate to serve (the core refuses too).
        let Some(tls) = shared.device_tls() else {
            tracing::trace!(%remote, "TCP connection before the relay is ready: closed");
            continue;
        };
        match shared.with_core(|c| c.handle_connect(clock())) {
            Ok(id) => {
                tokio::spawn(serve_device(shared.clone(), tcp, remote, id, tls));
            }
            Err(r) => {
                tracing::trace!(%remote, reason = r.as_str(), "TCP connection refused");
            }
        }
    }
}

async fn serve_device(
    shared: Arc<Shared>,
    tcp: TcpStream,
    remote: SocketAddr,
    id: ConnId,
    tls: Arc<rustls::ServerConfig>,
) {
    let deadline = tokio::time::Instant::now() + shared.hello_timeout;
    let acceptor = ward_runtime::stream::TlsAcceptor::from(tls);
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%remote, conn = %id, error = %e, "device TLS handshake failed");
            shared.with_core(|c| c.handle_closed(id));
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, conn = %id, "device TLS handshake timed out");
            shared.with_core(|c| c.handle_closed(id));
            return;
        }
    };
    let (alpn, certs) = ward_runtime::stream::server_session(&stream);
    let identity = certs
        .as_ref()
        .and_then(|c| c.first())
        .and_then(|c| crate::tls::cert_identity(c.as_ref()));
    let (Some(identity), true) = (identity, alpn.as_deref() == Some(RELAY_ALPN)) else {
        // No ALPN (rustls lets a client that offers none through) or an unreadable
        // certificate: refused like garbage.
        tracing::debug!(%remote, conn = %id, "TCP device without the relay protocol or a certificate");
        shared.with_core(|c| c.handle_garbage(id));
        shared.with_core(|c| c.handle_closed(id));
        return;
    };
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel(QUEUE);
    let (close_tx, mut close_rx) = watch::channel(false);
    let writer = tokio::spawn(ward_runtime::stream::write_frames(wr, rx));
    {
        let mut g = shared.lock();
        // The timer may have given up on this connection already.
        if !g.core.is_pending(id) {
            g.core.handle_closed(id);
            drop(g);
            writer.abort();
            return;
        }
        g.conns.insert(
            id,
            DeviceConn::Tcp(TcpConn {
                tx: tx.clone(),
                close: close_tx,
            }),
        );
    }
    let mut dec = FrameDecoder::new(MAX_RELAY_STREAM_FRAME);
    run_device(
        &shared,
        &mut Io {
            rd: &mut rd,
            dec: &mut dec,
            tx: &tx,
        },
        id,
        identity,
        remote,
        deadline,
        &mut close_rx,
    )
    .await;
    {
        let mut g = shared.lock();
        g.core.handle_closed(id);
        g.conns.remove(&id);
        g.drain_closes();
    }
    drop(tx);
    // The writer ends once the queue drains (a last Error frame included), bounded.
    let _ = tokio::time::timeout(ERROR_GRACE, writer).await;
}

struct Io<'a> {
    rd: &'a mut tokio::io::ReadHalf<TlsStream<TcpStream>>,
    dec: &'a mut FrameDecoder,
    tx: &'a mpsc::Sender<Vec<u8>>,
}

impl Io<'_> {
    /// The next frame body; `None` at the end of the stream or on a stream error.
    async fn next(&mut self) -> Option<Vec<u8>> {
        ward_runtime::stream::read_frame(self.rd, self.dec)
            .await
            .ok()
            .flatten()
    }

    async fn refuse(&self, r: Refusal) {
        let msg = RelayToDevice::Error {
            code: refusal_code(r),
            message: format!("relay ticket refused: {}", r.as_str()),
        };
        let _ = tokio::time::timeout(ERROR_GRACE, self.tx.send(encode_tcp_msg(&msg))).await;
    }
}

/// The hello, then datagrams, pings and tickets until the connection ends.
#[allow(clippy::too_many_arguments)]
async fn run_device(
    shared: &Shared,
    io: &mut Io<'_>,
    id: ConnId,
    identity: [u8; 32],
    remote: SocketAddr,
    deadline: tokio::time::Instant,
    close: &mut watch::Receiver<bool>,
) {
    let hello = tokio::time::timeout_at(deadline, async {
        loop {
            let f = io.next().await?;
            match parse_tcp_frame(&f)? {
                TcpFrame::Msg(m) => return wire::decode::<DeviceToRelay>(m).ok(),
                // A ping before the hello is harmless; anything else is not.
                TcpFrame::Ping(_) => continue,
                TcpFrame::Pong(_) | TcpFrame::Datagram(_) => return None,
            }
        }
    })
    .await;
    let Ok(Some(msg)) = hello else {
        shared.with_core(|c| c.handle_garbage(id));
        return;
    };
    let accepted = accept_hello(shared, id, remote.ip(), identity, &msg);
    let device = match accepted {
        Ok(d) => d,
        Err(r) => {
            tracing::debug!(%remote, conn = %id, reason = r.as_str(), "TCP device hello refused");
            io.refuse(r).await;
            return;
        }
    };
    let welcome = RelayToDevice::Welcome {
        device_id: device,
        max_datagram: TCP_MAX_DATAGRAM,
    };
    if io.tx.send(encode_tcp_msg(&welcome)).await.is_err() {
        return;
    }
    tracing::info!(%remote, conn = %id, %device, transport = "tcp", "device connected");
    let idle = Duration::from_millis(TCP_IDLE_TIMEOUT_MS);
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(idle, io.next()) => f,
            _ = close.changed() => break,
        };
        let Ok(Some(frame)) = frame else {
            let r = shared.with_core(|c| c.handle_garbage(id));
            tracing::debug!(%remote, conn = %id, %device, reason = r.as_str(), "TCP device stream ended, went silent or broke the protocol");
            break;
        };
        match parse_tcp_frame(&frame) {
            Some(TcpFrame::Datagram(d)) => forward_one(shared, id, d),
            Some(TcpFrame::Ping(n)) => {
                // A full queue skips the answer: the device's idle bound covers it.
                let _ = io.tx.try_send(encode_tcp_pong(n));
            }
            Some(TcpFrame::Pong(_)) => {}
            Some(TcpFrame::Msg(m)) => {
                let Ok(DeviceToRelay::Ticket { ticket }) = wire::decode::<DeviceToRelay>(m) else {
                    let r = shared.with_core(|c| c.handle_garbage(id));
                    tracing::debug!(%remote, conn = %id, %device, reason = r.as_str(), "TCP device broke the protocol");
                    break;
                };
                let r = accept_ticket(shared, id, &ticket);
                if let Err(r) = r {
                    tracing::debug!(%remote, conn = %id, %device, reason = r.as_str(), "fresh ticket refused");
                    io.refuse(r).await;
                    break;
                }
                tracing::trace!(conn = %id, %device, serial = ticket.ticket.serial, "fresh ticket");
            }
            None => {
                let r = shared.with_core(|c| c.handle_garbage(id));
                tracing::debug!(%remote, conn = %id, %device, reason = r.as_str(), "unknown frame from TCP device");
                break;
            }
        }
    }
}
