//! The control listener's UDP socket as quinn sees it: at most four datagrams per send.
//!
//! quinn gives every connection a send buffer that it never shrinks, and when a send first
//! needs a second datagram it reserves room for a whole batch on top of the one already in it
//! (`max_datagrams × segment size`): with UDP GSO's ten datagrams, one of the largest items in
//! the coordinator's heap at 10 000 control sessions. Four per send, of QUIC's 1 200 bytes (the
//! listener does no path MTU discovery: a datagram size that grows after the first batch makes
//! quinn reserve a second, larger batch on top of the first), keeps a connection's buffer at
//! 6 000 bytes, which jemalloc serves from its 6 KiB class; eight per send took 10 800 bytes,
//! served from the 12 KiB class: 60 MiB more at 10 000 sessions, for batches that only a first
//! netmap fills (a policy change is one datagram a session). One datagram per send would save
//! nearly all of it, but measured it cost the open phase and the resync more than that memory
//! was worth: every datagram a system call, and nothing for the receiver's GRO to coalesce
//! (bench/README.md).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The most datagrams one send of the control listener carries (see above).
pub(super) const MAX_SEGMENTS: usize = 4;

/// The QUIC endpoint of the control listener on `socket` ([`FewDatagrams`]).
pub(super) fn control_endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
    runtime: Arc<dyn quinn::Runtime>,
) -> io::Result<quinn::Endpoint> {
    let socket = FewDatagrams(runtime.wrap_udp_socket(socket)?);
    quinn::Endpoint::new_with_abstract_socket(config, server, Arc::new(socket), runtime)
}

/// A UDP socket that tells quinn to send at most [`MAX_SEGMENTS`] datagrams at once.
pub(super) struct FewDatagrams(pub(super) Arc<dyn AsyncUdpSocket>);

impl fmt::Debug for FewDatagrams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FewDatagrams").field(&self.0).finish()
    }
}

impl AsyncUdpSocket for FewDatagrams {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments().min(MAX_SEGMENTS)
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::pki::Ca;
    use ward_shared::wire;

    /// A transmit's size and segment size.
    type Sent = (usize, Option<usize>);

    /// Records the size and segment size of every transmit it passes on.
    #[derive(Debug)]
    struct Recording {
        inner: Arc<dyn AsyncUdpSocket>,
        sent: Arc<Mutex<Vec<Sent>>>,
    }

    impl AsyncUdpSocket for Recording {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            self.inner.clone().create_io_poller()
        }
        fn try_send(&self, t: &Transmit) -> io::Result<()> {
            let r = self.inner.try_send(t);
            if r.is_ok() {
                self.sent
                    .lock()
                    .unwrap()
                    .push((t.contents.len(), t.segment_size));
            }
            r
        }
        fn poll_recv(
            &self,
            cx: &mut Context,
            bufs: &mut [io::IoSliceMut<'_>],
            meta: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            self.inner.poll_recv(cx, bufs, meta)
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.inner.local_addr()
        }
        fn max_transmit_segments(&self) -> usize {
            self.inner.max_transmit_segments()
        }
        fn max_receive_segments(&self) -> usize {
            self.inner.max_receive_segments()
        }
        fn may_fragment(&self) -> bool {
            self.inner.may_fragment()
        }
    }

    /// Sends 200 KB from a server endpoint whose socket is `wrap(recording socket)`; what the
    /// recording socket was given to send.
    async fn server_sends(
        wrap: fn(Arc<dyn AsyncUdpSocket>) -> Arc<dyn AsyncUdpSocket>,
    ) -> Vec<Sent> {
        let ca = Ca::generate(super::super::now_ms()).expect("ca");
        let runtime = quinn::default_runtime().expect("runtime");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("addr");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let recording: Arc<dyn AsyncUdpSocket> = Arc::new(Recording {
            inner: runtime.wrap_udp_socket(socket).expect("wrap"),
            sent: sent.clone(),
        });
        let tls = super::super::tls_config(&ca).expect("tls");
        let server = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(super::super::server_config(tls).expect("server config")),
            wrap(recording),
            runtime,
        )
        .expect("endpoint");
        let serving = tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("conn");
            let mut s = conn.open_uni().await.expect("stream");
            s.write_all(&vec![7u8; 200_000]).await.expect("write");
            s.finish().expect("finish");
            let _ = conn.closed().await;
        });

        let mut client =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        client.set_default_client_config(super::super::test_client_config(&ca));
        let conn = client
            .connect(addr, wire::COORDINATOR_SERVER_NAME)
            .expect("connect")
            .await
            .expect("handshake");
        let mut r = conn.accept_uni().await.expect("stream");
        let got = r.read_to_end(1 << 20).await.expect("read");
        assert_eq!(got.len(), 200_000);
        conn.close(0u32.into(), b"done");
        let _ = serving.await;
        let sent = sent.lock().unwrap().clone();
        sent
    }

    /// Datagrams in one transmit.
    fn segments(&(len, segment): &Sent) -> usize {
        segment.map_or(1, |s| len.div_ceil(s))
    }

    #[tokio::test]
    async fn the_control_endpoint_sends_at_most_four_datagrams_at_once() {
        let sent = server_sends(|s| Arc::new(FewDatagrams(s))).await;
        let most = sent.iter().map(segments).max().unwrap_or(0);
        assert!(
            (2..=MAX_SEGMENTS).contains(&most),
            "at most {most} datagrams per send, over {} sends",
            sent.len()
        );
    }

    /// The listener's datagrams stay at 1 200 bytes through a transfer long enough for path
    /// MTU discovery to have raised them (it would, to 1 452, on loopback).
    #[tokio::test]
    async fn the_control_endpoint_keeps_to_the_smallest_quic_datagram() {
        let sent = server_sends(|s| Arc::new(FewDatagrams(s))).await;
        let largest = sent
            .iter()
            .map(|&(len, segment)| segment.unwrap_or(len))
            .max()
            .unwrap_or(0);
        assert!(
            (1000..=1200).contains(&largest),
            "largest datagram {largest} bytes, over {} sends",
            sent.len()
        );
    }

    /// The check above can fail: the same transfer through the socket quinn would otherwise
    /// use sends larger batches (UDP GSO, which Linux loopback offers).
    #[tokio::test]
    async fn without_the_cap_quinn_sends_larger_batches() {
        let sent = server_sends(|s| s).await;
        let most = sent.iter().map(segments).max().unwrap_or(0);
        assert!(most > MAX_SEGMENTS, "at most {most} datagrams per send");
    }
}
