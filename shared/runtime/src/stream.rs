//! Frames over any byte stream, and TLS 1.3 over TCP: the fallback transport for networks that
//! drop UDP.
//!
//! The control channel and the relay stream carry the same length-prefixed frames
//! ([`ward_shared::wire`]'s codec) whether a QUIC stream or a TLS-over-TCP connection carries
//! them; [`read_frame`] reads either. [`connect_tls`] dials one address over TCP and completes
//! TLS within a bound; the servers accept with the same rustls config (certificates, client
//! certificate check, ALPN) as their QUIC side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::{CertificateDer, ServerName};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use ward_shared::wire::{self, FrameDecoder};

pub use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// Which transport carries a connection: QUIC over UDP, or the TLS-over-TCP fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The read half of a connection, whichever transport carries it.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection, whichever transport carries it.
pub type BoxWrite = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// Most bytes of queued frames [`write_frames`] gathers into one write.
pub const WRITE_BATCH: usize = 64 * 1024;

/// Writes the frames queued on `rx`, gathering what is already queued (up to [`WRITE_BATCH`]
/// bytes) into one write, until the queue closes or a write fails; then shuts the stream down.
/// One task per TLS/TCP link runs it, so senders never wait on the socket.
pub async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
) {
    use tokio::io::AsyncWriteExt;
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH {
            let Ok(more) = rx.try_recv() else { break };
            batch.extend_from_slice(&more);
        }
        if wr.write_all(&batch).await.is_err() || wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// The next frame body from `recv`; `Ok(None)` at a clean end of the stream. Reads no more
/// than the frame needs, straight into `dec` (bytes read are kept there, so it is safe to call
/// again, also after a cancelled call; a stream waiting for its next frame holds no read
/// buffer). A frame over the decoder's bound, a truncated frame or a stream error is an error.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    recv: &mut R,
    dec: &mut FrameDecoder,
) -> Result<Option<Vec<u8>>> {
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(Some(f));
        }
        let want = dec.wanted() as u64;
        // `read_buf` appends only what the read returned: nothing is lost if this is cancelled.
        match (&mut *recv).take(want).read_buf(dec.append_buffer()).await {
            Ok(0) => {
                dec.finish()?;
                return Ok(None);
            }
            Ok(_) => {}
            Err(e) => return Err(StreamError(e).into()),
        }
    }
}

/// Whether [`read_frame`]'s error `e` says the connection or stream went away (the peer
/// closed or reset it, it timed out, the TCP connection broke), not that the peer sent
/// something malformed: a session that ends is not a protocol error worth a warning.
pub fn ended_by_transport(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind;
    e.chain().any(|c| {
        c.downcast_ref::<quinn::ConnectionError>().is_some()
            || c.downcast_ref::<StreamError>().is_some_and(|s| {
                matches!(
                    s.0.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                        | ErrorKind::UnexpectedEof
                        | ErrorKind::NotConnected
                        | ErrorKind::TimedOut
                )
            })
    })
}

/// A read from a stream failed: shown as `stream: {error}` as before, and its cause (a QUIC
/// reset, an idle timeout) kept as the source, so that a caller can tell why the stream ended
/// and `{:#}` prints it.
#[derive(Debug)]
struct StreamError(std::io::Error);

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream: {}", self.0)
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The I/O error's own cause: its text is already in this one's.
        self.0.source()
    }
}

/// [`read_frame`], decoded as a `T`.
pub async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin + ?Sized>(
    recv: &mut R,
    dec: &mut FrameDecoder,
) -> Result<Option<T>> {
    match read_frame(recv, dec).await? {
        Some(f) => Ok(Some(wire::decode(&f)?)),
        None => Ok(None),
    }
}

/// Dials `addr` over TCP and completes TLS (`config` carries the CA check, the client
/// certificate and the ALPN) for `server_name`, all within `timeout`. The ALPN must be the one
/// offered: a server that chose none is refused. Nagle is off: frames are small and latency
/// matters more than packing. The socket carries the outbound mark
/// ([`crate::net::set_outbound_mark`]) where one is set.
pub async fn connect_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
    timeout: Duration,
) -> Result<client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| anyhow!("bad server name {server_name:?}: {e}"))?;
    let want_alpn = config.alpn_protocols.clone();
    let dial = async {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .with_context(|| format!("a TCP socket for {addr}"))?;
        crate::net::mark_socket(std::os::fd::AsRawFd::as_raw_fd(&sock))
            .with_context(|| format!("marking the TCP socket for {addr}"))?;
        let tcp = sock
            .connect(addr)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {addr}"))
    };
    let tls = tokio::time::timeout(timeout, dial)
        .await
        .map_err(|_| anyhow!("no TLS answer from {addr} over TCP within {timeout:?}"))??;
    match tls.get_ref().1.alpn_protocol() {
        Some(p) if want_alpn.iter().any(|w| w.as_slice() == p) => Ok(tls),
        _ => bail!("the server at {addr} did not agree on the application protocol"),
    }
}

/// Completes a server-side TLS handshake on an accepted TCP connection within `timeout`.
pub async fn accept_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<server::TlsStream<TcpStream>> {
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))?
        .context("TLS handshake")
}

/// The negotiated ALPN and the client's verified certificate chain of a server-side TLS
/// connection.
pub fn server_session(
    tls: &server::TlsStream<TcpStream>,
) -> (Option<Vec<u8>>, Option<Vec<CertificateDer<'static>>>) {
    let conn = tls.get_ref().1;
    (
        conn.alpn_protocol().map(<[u8]>::to_vec),
        conn.peer_certificates()
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_are_read_across_arbitrary_chunking() {
        let mut bytes = wire::encode(&"hello".to_string());
        bytes.extend(wire::encode(&"world".to_string()));
        let (mut a, mut b) = tokio::io::duplex(3);
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut a, &bytes)
                .await
                .unwrap();
        });
        let mut dec = FrameDecoder::new(64);
        let one: Option<String> = read_msg(&mut b, &mut dec).await.unwrap();
        let two: Option<String> = read_msg(&mut b, &mut dec).await.unwrap();
        writer.await.unwrap();
        drop(b);
        assert_eq!(one.as_deref(), Some("hello"));
        assert_eq!(two.as_deref(), Some("world"));
    }

    /// A read cancelled halfway through a frame (a `select!` branch that lost) keeps what it
    /// read: the next call returns the whole frame.
    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        let bytes = wire::encode(&"hello world".to_string());
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut dec = FrameDecoder::new(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &bytes[..7])
            .await
            .unwrap();
        let cut = tokio::time::timeout(
            Duration::from_millis(50),
            read_msg::<String, _>(&mut b, &mut dec),
        )
        .await;
        assert!(cut.is_err(), "half a frame read as {cut:?}");
        tokio::io::AsyncWriteExt::write_all(&mut a, &bytes[7..])
            .await
            .unwrap();
        let whole: Option<String> = read_msg(&mut b, &mut dec).await.unwrap();
        assert_eq!(whole.as_deref(), Some("hello world"));
    }

    /// A reader whose every read fails with `kind` (and `inner` as the error's cause).
    struct Failing(std::io::ErrorKind, Option<quinn::ConnectionError>);

    impl AsyncRead for Failing {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let e = match self.1.clone() {
                Some(c) => std::io::Error::new(self.0, quinn::ReadError::ConnectionLost(c)),
                None => std::io::Error::from(self.0),
            };
            std::task::Poll::Ready(Err(e))
        }
    }

    /// A connection that went away is told apart from a peer that sent something malformed.
    #[tokio::test]
    async fn a_lost_connection_is_not_a_bad_frame() {
        use std::io::ErrorKind;
        let mut dec = FrameDecoder::new(100);
        for (kind, quic, ended) in [
            (ErrorKind::ConnectionReset, None, true),
            (ErrorKind::UnexpectedEof, None, true),
            (
                ErrorKind::NotConnected,
                Some(quinn::ConnectionError::TimedOut),
                true,
            ),
            (ErrorKind::Other, Some(quinn::ConnectionError::Reset), true),
            (ErrorKind::InvalidData, None, false),
        ] {
            let e = read_frame(&mut Failing(kind, quic), &mut dec)
                .await
                .unwrap_err();
            assert_eq!(ended_by_transport(&e), ended, "{kind:?}: {e:#}");
        }
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &1000u32.to_be_bytes())
            .await
            .unwrap();
        let e = read_frame(&mut b, &mut dec).await.unwrap_err();
        assert!(!ended_by_transport(&e), "an oversized frame: {e:#}");
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &1000u32.to_be_bytes())
            .await
            .unwrap();
        let mut dec = FrameDecoder::new(100);
        assert!(read_frame(&mut b, &mut dec).await.is_err());

        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[0, 0, 0, 9, 1, 2])
            .await
            .unwrap();
        drop(a);
        let mut dec = FrameDecoder::new(100);
        assert!(read_frame(&mut b, &mut dec).await.is_err());
    }
}
