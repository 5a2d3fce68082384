//! One UDP socket, two protocols: quinn reads the relay's socket through [`DemuxSocket`], which
//! answers address-discovery datagrams itself (through [`crate::core::Relay`]) and hands quinn
//! everything else.
//!
//! A datagram goes to discovery when it was received alone (not a GRO batch of several
//! segments) and starts with the discovery magic. The magic's first byte, 0xFF, would be a QUIC
//! long-header Retry packet, which a server never receives, and its next three bytes would be a
//! QUIC version that does not exist, so no QUIC packet is taken. A batch is always quinn's: GRO
//! only joins datagrams of one flow, and quinn drops what it cannot parse.

use crate::core::Relay;
use crate::server::Shared;
use crate::udp_path;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;
use ward_shared::discovery;

/// The relay's UDP socket as quinn sees it.
#[derive(Debug)]
pub struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    discovery: Arc<Mutex<Relay>>,
    /// Where plain-UDP datagrams go ([`crate::udp_path`]); `None`: they go to quinn, which
    /// drops them (no QUIC packet starts with their marks).
    plain: Option<Arc<Shared>>,
}

impl DemuxSocket {
    /// `inner` is the runtime's wrapper of the bound socket.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, discovery: Arc<Mutex<Relay>>) -> Self {
        DemuxSocket {
            inner,
            discovery,
            plain: None,
        }
    }

    /// Also demultiplexes the plain-UDP data path to `shared` (and sends its datagrams on
    /// this socket).
    pub fn with_plain_udp(mut self, shared: Arc<Shared>) -> Self {
        shared.set_udp_socket(self.inner.clone());
        self.plain = Some(shared);
        self
    }

    /// Handles one received buffer (a datagram, or a GRO batch of `stride`-sized segments of
    /// one flow) if it is plain-UDP; whether quinn should not see it.
    fn take_plain(&self, meta: &RecvMeta, buf: &mut [u8]) -> bool {
        let Some(shared) = &self.plain else {
            return false;
        };
        let stride = meta.stride.max(1);
        let all_plain = buf.chunks(stride).all(udp_path::is_plain);
        let mut segs: Vec<(SocketAddr, &mut [u8])> = buf
            .chunks_mut(stride)
            .filter(|c| udp_path::is_plain(c))
            .map(|c| (meta.addr, c))
            .collect();
        if segs.is_empty() {
            return false;
        }
        udp_path::handle_received(shared, self.inner.as_ref(), meta.dst_ip, &mut segs);
        // A batch mixing both (one flow sending QUIC and plain UDP of one size) goes to quinn
        // as well, which drops the plain segments (no fixed bit).
        all_plain
    }

    /// Answers one discovery datagram (a send error drops this reply only).
    fn answer(&self, meta: &RecvMeta, datagram: &[u8]) {
        let reply = {
            let mut d = self.discovery.lock().unwrap_or_else(|p| p.into_inner());
            d.handle_datagram(meta.addr, datagram, Instant::now())
        };
        if let Some(t) = reply {
            let tx = Transmit {
                destination: t.dst,
                ecn: None,
                contents: &t.payload,
                segment_size: None,
                src_ip: meta.dst_ip,
            };
            if let Err(e) = self.inner.try_send(&tx) {
                tracing::debug!(dst = %t.dst, error = %e, "discovery reply not sent");
            }
        }
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        // Keep quinn's datagrams in order at the front; answer the discovery ones. Returning
        // fewer (even none) is fine: quinn polls again.
        let mut kept = 0;
        for i in 0..n.min(bufs.len()).min(meta.len()) {
            let m = meta[i];
            let len = m.len.min(bufs[i].len());
            let single = m.stride >= len;
            if single && discovery::is_discovery(&bufs[i][..len]) {
                self.answer(&m, &bufs[i][..len]);
                continue;
            }
            if udp_path::is_plain(&bufs[i][..len]) && self.take_plain(&m, &mut bufs[i][..len]) {
                continue;
            }
            if kept != i {
                let (head, tail) = bufs.split_at_mut(i);
                let Some(dst) = head.get_mut(kept) else {
                    continue; // kept < i always
                };
                let Some(src) = tail.first() else {
                    continue; // i < bufs.len() by the loop bound
                };
                if dst.len() < len {
                    continue; // quinn's buffers are all one size; never happens
                }
                dst[..len].copy_from_slice(&src[..len]);
                meta[kept] = m;
            }
            kept += 1;
        }
        Poll::Ready(Ok(kept))
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
