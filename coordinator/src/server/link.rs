//! One control connection, whichever transport carries it: a QUIC connection's bidirectional
//! stream, or a TLS 1.3 connection over TCP (the fallback for devices on networks that drop
//! UDP). Both carry the same frames; the device and relay protocols ([`super::session`],
//! [`super::relay`]) read and write [`Link::recv`] / [`Link::send`] and end a connection with
//! [`Link::close_with`], never touching the transport.

use anyhow::{Context, Result};
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ward_runtime::stream::{BoxRead, BoxWrite, Transport};

use super::HANDSHAKE_TIMEOUT;

/// How long a last (error) frame gets to leave before the connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

pub(super) struct Link {
    pub remote: SocketAddr,
    pub transport: Transport,
    /// The client's verified certificate chain (none: enrollment or a relay's session).
    pub certs: Option<Vec<CertificateDer<'static>>>,
    pub send: BoxWrite,
    pub recv: BoxRead,
    pub closer: Closer,
}

/// What ends the connection beneath the stream.
pub(super) enum Closer {
    Quic(quinn::Connection),
    Tcp,
}

impl Closer {
    /// Resolves when the peer or the transport has closed the connection (QUIC: the
    /// connection; TCP: never, as the end of the stream reports it).
    pub async fn closed(&self) {
        match self {
            Closer::Quic(c) => {
                c.closed().await;
            }
            Closer::Tcp => std::future::pending().await,
        }
    }
}

impl Link {
    /// The stream the peer opens on a QUIC connection (within the handshake timeout).
    pub async fn quic(conn: quinn::Connection) -> Result<Link> {
        let certs = conn.peer_identity().and_then(|a| {
            a.downcast::<Vec<CertificateDer<'static>>>()
                .ok()
                .map(|b| *b)
        });
        let (send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
            .await
            .context("the peer opened no control stream")??;
        Ok(Link {
            remote: conn.remote_address(),
            transport: Transport::Quic,
            certs,
            send: Box::new(send),
            recv: Box::new(recv),
            closer: Closer::Quic(conn),
        })
    }

    /// A TLS-over-TCP connection whose handshake is complete.
    pub fn tcp(
        tls: ward_runtime::stream::server::TlsStream<tokio::net::TcpStream>,
        remote: SocketAddr,
        certs: Option<Vec<CertificateDer<'static>>>,
    ) -> Link {
        let (recv, send) = tokio::io::split(tls);
        Link {
            remote,
            transport: Transport::Tcp,
            certs,
            send: Box::new(send),
            recv: Box::new(recv),
            closer: Closer::Tcp,
        }
    }

    /// Sends a last frame, ends the stream, and closes the connection with `reason`, giving
    /// the frame [`CLOSE_GRACE`] to reach the peer.
    pub async fn close_with(&mut self, frame: &[u8], reason: &str) {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            let _ = self.send.write_all(frame).await;
            let _ = self.send.shutdown().await;
        })
        .await;
        match &self.closer {
            Closer::Quic(conn) => {
                // `shutdown` finished the stream; wait until the peer has it (or stops it).
                let _ = tokio::time::timeout(CLOSE_GRACE, conn.closed()).await;
                conn.close(1u32.into(), reason.as_bytes());
            }
            Closer::Tcp => self.drain().await,
        }
    }

    /// Ends the stream after a final answer (enrollment) and waits up to `wait` for the peer
    /// to close its side.
    pub async fn finish(&mut self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.send.shutdown()).await;
        match &self.closer {
            Closer::Quic(conn) => {
                let _ = tokio::time::timeout(wait, conn.closed()).await;
            }
            Closer::Tcp => self.drain().await,
        }
    }

    /// Reads (and discards) until the peer closes, for at most [`CLOSE_GRACE`]: closing a TCP
    /// socket with unread bytes resets the connection, which can destroy the frame just sent.
    async fn drain(&mut self) {
        // On the heap: inline, it would size every session's future for this rare path.
        let mut scratch = vec![0u8; 4096];
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while matches!(self.recv.read(&mut scratch).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}
