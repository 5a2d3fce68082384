//! The data plane's one UDP socket, with batched I/O.
//!
//! Send: runs of equal-size datagrams to one destination in an [`Outbox`] go out as one UDP GSO
//! message (`UDP_SEGMENT`), several messages per `sendmmsg`. Receive: `recvmmsg` into large
//! buffers with `UDP_GRO`, so one syscall returns many coalesced datagrams. Both fall back to
//! one datagram per message when the kernel refuses the offload.
//!
//! Path MTU: every datagram leaves with DF set (`IP_PMTUDISC_DO` / `IPV6_PMTUDISC_DO`), so the
//! kernel never fragments outer packets, refuses a datagram larger than the path with
//! `EMSGSIZE` (a GSO message whose segments are too large with `EINVAL`), and lowers a
//! destination's path MTU when an ICMP fragmentation-needed / packet-too-big arrives for it.
//! The socket learns each destination's path MTU from the kernel ([`kernel_path_mtu`]) on the
//! first send to it, after a too-big refusal and every [`pmtu::REFRESH_INTERVAL`] (driven by
//! the timer thread), into the shared [`PathMtus`]; GSO runs are only formed of segments that
//! fit the destination's path. Refused datagrams are counted by reason; the first refusal of each
//! kind is logged once (WARN, or INFO for too-big ones, which path MTU discovery expects),
//! later ones at DEBUG, at most one line a second.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ward_runtime::net::setsockopt_int;

use super::engine::{Destination, Outbox};
use super::pmtu::{self, PathMtus, SendFailure};
use super::TUN_MTU;

/// Largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD: usize = 65507;
/// Segments per GSO message (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;
/// Messages per sendmmsg call.
const SEND_BATCH: usize = 64;
/// Socket buffer size requested (SO_*BUFFORCE needs CAP_NET_ADMIN; falls back to SO_*BUF).
const SOCKET_BUFFER: libc::c_int = 8 << 20;

pub(crate) struct UdpSocket {
    fd: OwnedFd,
    /// Bound to an AF_INET6 dual-stack socket: IPv4 destinations are sent as v4-mapped.
    v6: bool,
    gso: AtomicBool,
    gro: bool,
    pmtu: Arc<PathMtus>,
    /// Per [`SendFailure`] kind: already logged once above DEBUG.
    warned: [AtomicBool; 5],
    /// Seconds since `created` of the last DEBUG line about a failed send.
    last_debug: AtomicU64,
    created: Instant,
}

impl UdpSocket {
    /// Binds `[::]:port` dual-stack, or `0.0.0.0:port` where IPv6 is unavailable, with DF on
    /// every datagram; learned path MTUs go to `pmtu`.
    pub(crate) fn bind(port: u16, pmtu: Arc<PathMtus>) -> io::Result<UdpSocket> {
        let (fd, v6) = match bind_v6(port) {
            Ok(fd) => (fd, true),
            Err(e) => {
                tracing::debug!(error = %e, "dual-stack bind failed, using IPv4 only");
                (bind_v4(port)?, false)
            }
        };
        let raw = fd.as_raw_fd();
        // Kept on the underlay while an exit node's default route holds the host's traffic.
        ward_runtime::net::mark_socket(raw)?;
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(raw, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        let gro = setsockopt_int(raw, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        // Never fragment outer packets: the IPv4 option covers IPv4 (also v4-mapped on the
        // dual-stack socket), the IPv6 one native IPv6.
        setsockopt_int(
            raw,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
        if v6 {
            setsockopt_int(
                raw,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
            )?;
        }
        Ok(UdpSocket {
            fd,
            v6,
            gso: AtomicBool::new(true),
            gro,
            pmtu,
            warned: Default::default(),
            last_debug: AtomicU64::new(0),
            created: Instant::now(),
        })
    }

    /// Asks the kernel again for the path MTU of every destination in use (forgetting idle
    /// ones). Call every [`pmtu::REFRESH_INTERVAL`].
    pub(crate) fn refresh_path_mtus(&self) {
        for ip in self.pmtu.poll_refresh() {
            self.learn(SocketAddr::new(ip, PROBE_PORT));
        }
    }

    /// Records the kernel's current path MTU to `dst`, logging a change.
    fn learn(&self, dst: SocketAddr) {
        let mtu = match kernel_path_mtu(dst) {
            Ok(m) => m,
            Err(e) => {
                tracing::trace!(%dst, error = %e, "cannot read the path MTU");
                return;
            }
        };
        let Some(change) = self.pmtu.handle_learned(dst.ip(), mtu) else {
            return;
        };
        let inner = pmtu::inner_mtu(change.new, dst.ip());
        if inner < TUN_MTU || change.old.is_some() {
            tracing::info!(
                dst = %dst.ip(),
                path_mtu = change.new,
                previous = ?change.old,
                inner_mtu = inner,
                tun_mtu = TUN_MTU,
                "path MTU to peer endpoint changed; inner packets above inner_mtu get ICMP too-big"
            );
        } else {
            tracing::debug!(dst = %dst.ip(), path_mtu = change.new, "path MTU learned");
        }
    }

    fn send_failed(&self, why: SendFailure, g: &Group, e: &io::Error) {
        self.pmtu.record_send_failure(why, g.segments as u64);
        let first = !self.warned[why as usize].swap(true, Ordering::Relaxed);
        let fields = (g.dst, g.segments, g.segment_size);
        if first && why == SendFailure::TooBig {
            tracing::info!(
                reason = why.as_str(), error = %e, dst = %fields.0, datagrams = fields.1,
                size = fields.2,
                "datagrams larger than the path MTU refused, path MTU re-learned; later ones at DEBUG"
            );
        } else if first {
            tracing::warn!(
                reason = why.as_str(), error = %e, dst = %fields.0, datagrams = fields.1,
                "UDP send to a peer failed; later failures counted (counters.path), at DEBUG"
            );
        } else {
            let now = self.created.elapsed().as_secs();
            if self.last_debug.swap(now, Ordering::Relaxed) != now {
                tracing::debug!(
                    reason = why.as_str(), error = %e, dst = %fields.0, datagrams = fields.1,
                    size = fields.2, counters = ?self.pmtu.counters(), "UDP send failed"
                );
            }
        }
    }

    pub(crate) fn local_port(&self) -> io::Result<u16> {
        let mut ss: libc::sockaddr_storage = unsafe_zeroed_storage();
        let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: fd is a live socket; ss/len describe a writable sockaddr_storage.
        let rc = unsafe {
            libc::getsockname(
                self.fd.as_raw_fd(),
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        from_sockaddr(&ss)
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("unknown address family"))
    }

    pub(crate) fn gro_enabled(&self) -> bool {
        self.gro
    }

    pub(crate) fn gso_enabled(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// The socket's descriptor, for a `poll` that waits on it with others.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends every datagram in `out` (blocking when the socket buffer is full). Datagrams the
    /// kernel refuses (too big for the path, unreachable destination, …) are counted by
    /// reason and skipped; a too-big refusal re-learns the destination's path MTU first.
    pub(crate) fn send_outbox(&self, out: &Outbox, scratch: &mut SendScratch) {
        if out.is_empty() {
            return;
        }
        let mut gso = self.gso.load(Ordering::Relaxed);
        self.plan(out, scratch, gso);
        let mut i = 0;
        while i < scratch.groups.len() {
            match self.sendmmsg(out.bytes(), &mut scratch.groups[i..]) {
                Ok(n) => i += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let g = &scratch.groups[i];
                    let gso_error = g.segments > 1 && is_gso_error(&e);
                    let too_big = e.raw_os_error() == Some(libc::EMSGSIZE)
                        || (gso_error && self.exceeds_path(g));
                    if too_big {
                        if e.raw_os_error() == Some(libc::EMSGSIZE) {
                            self.learn(g.dst);
                        }
                        self.send_failed(SendFailure::TooBig, g, &e);
                        i += 1;
                    } else if gso && gso_error {
                        tracing::debug!(error = %e, "UDP GSO refused, falling back to one datagram per send");
                        self.gso.store(false, Ordering::Relaxed);
                        gso = false;
                        // Re-plan without GSO; what went out already is not sent again.
                        let sent_up_to = g.start;
                        self.plan(out, scratch, false);
                        i = scratch.groups.partition_point(|g| g.start < sent_up_to);
                    } else {
                        self.send_failed(SendFailure::from_errno(e.raw_os_error()), g, &e);
                        i += 1;
                    }
                }
            }
        }
    }

    /// Plans `out` into messages, GSO runs sized to each destination's path; learns the path
    /// MTU of destinations not seen before.
    fn plan(&self, out: &Outbox, scratch: &mut SendScratch, gso: bool) {
        {
            let mut view = self.pmtu.view();
            scratch.plan(out, gso, self.v6, |dst| view.max_payload(dst));
        }
        let unknown = std::mem::take(&mut scratch.unknown);
        for dst in &unknown {
            self.learn(*dst);
        }
        scratch.unknown = unknown;
    }

    /// A GSO group's segments are larger than the path to its destination (re-learned now).
    fn exceeds_path(&self, g: &Group) -> bool {
        self.learn(g.dst);
        self.pmtu
            .path_mtu(g.dst.ip())
            .is_some_and(|m| usize::from(g.segment_size) > pmtu::max_udp_payload(m, g.dst.ip()))
    }

    /// Sends as many of `groups` as one `sendmmsg` takes; returns how many went out.
    fn sendmmsg(&self, bytes: &[u8], groups: &mut [Group]) -> io::Result<usize> {
        let n = groups.len().min(SEND_BATCH);
        let mut iovs: [libc::iovec; SEND_BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_BATCH];
        // SAFETY: all-zero is a valid mmsghdr.
        let mut msgs: [libc::mmsghdr; SEND_BATCH] = unsafe { mem::zeroed() };
        for (k, g) in groups[..n].iter_mut().enumerate() {
            iovs[k] = libc::iovec {
                iov_base: bytes[g.start..].as_ptr() as *mut libc::c_void,
                iov_len: g.len,
            };
            let hdr = &mut msgs[k].msg_hdr;
            hdr.msg_name = (&mut g.addr as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = g.addr_len;
            hdr.msg_iov = &mut iovs[k];
            hdr.msg_iovlen = 1;
            if g.segments > 1 {
                g.cmsg.fill_segment(g.segment_size);
                hdr.msg_control = g.cmsg.buf.as_mut_ptr().cast();
                hdr.msg_controllen = g.cmsg.len();
            }
        }
        // SAFETY: msgs[..n] point at iovecs, addresses and control buffers that outlive the call,
        // and the iovecs point into `bytes`, which is borrowed for the call.
        let rc = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), n as _, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// Receives into `batch` without blocking. Returns the number of messages (each possibly
    /// GRO-coalesced); `WouldBlock` when there is nothing.
    pub(crate) fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let n = batch.slots;
        // On the stack: a receive allocates nothing.
        // SAFETY: all-zero is a valid mmsghdr and a valid iovec.
        let mut msgs: [libc::mmsghdr; MAX_RECV_SLOTS] = unsafe { mem::zeroed() };
        let mut iovs: [libc::iovec; MAX_RECV_SLOTS] = unsafe { mem::zeroed() };
        for (k, iov) in iovs.iter_mut().take(n).enumerate() {
            iov.iov_base = batch.buf[k * batch.slot_size..].as_mut_ptr().cast();
            iov.iov_len = batch.slot_size;
        }
        for (k, msg) in msgs.iter_mut().take(n).enumerate() {
            let hdr = &mut msg.msg_hdr;
            hdr.msg_name = (&mut batch.addrs[k] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as _;
            hdr.msg_iov = &mut iovs[k];
            hdr.msg_iovlen = 1;
            hdr.msg_control = batch.cmsgs[k].buf.as_mut_ptr().cast();
            hdr.msg_controllen = mem::size_of_val(&batch.cmsgs[k].buf) as _;
        }
        // SAFETY: every msg points at a buffer slot, address and control buffer owned by `batch`
        // (or the local iovec vector), all alive for the call.
        let rc = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as _,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = rc as usize;
        batch.filled = 0;
        for (k, msg) in msgs.iter().take(got).enumerate() {
            let len = msg.msg_len as usize;
            let truncated = msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let from = from_sockaddr(&batch.addrs[k]);
            // SAFETY: the kernel filled msg_controllen bytes of this message's control buffer.
            let gro = unsafe { gro_segment_size(&msg.msg_hdr) };
            batch.meta[k] = RecvMeta {
                len: if truncated { 0 } else { len },
                from,
                segment: gro.unwrap_or(len).max(1),
            };
            batch.filled = k + 1;
        }
        Ok(got)
    }
}

/// The most messages one receive takes.
pub(crate) const MAX_RECV_SLOTS: usize = 16;

/// Reusable buffers for [`UdpSocket::recv`].
pub(crate) struct RecvBatch {
    buf: Vec<u8>,
    slot_size: usize,
    slots: usize,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<Cmsg>,
    meta: Vec<RecvMeta>,
    filled: usize,
}

#[derive(Clone, Copy)]
struct RecvMeta {
    len: usize,
    from: Option<SocketAddr>,
    segment: usize,
}

impl RecvBatch {
    /// `slots` messages of up to 64 KiB each (a GRO-coalesced message can be that large), at
    /// most [`MAX_RECV_SLOTS`].
    pub(crate) fn new(slots: usize) -> RecvBatch {
        let slots = slots.clamp(1, MAX_RECV_SLOTS);
        let slot_size = 65536;
        RecvBatch {
            buf: vec![0; slots * slot_size],
            slot_size,
            slots,
            addrs: vec![unsafe_zeroed_storage(); slots],
            cmsgs: (0..slots).map(|_| Cmsg::new()).collect(),
            meta: vec![
                RecvMeta {
                    len: 0,
                    from: None,
                    segment: 1,
                };
                slots
            ],
            filled: 0,
        }
    }

    /// Every datagram of the last receive, GRO messages split into their segments.
    pub(crate) fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.filled).flat_map(move |k| {
            let m = self.meta[k];
            let base = k * self.slot_size;
            let data = &self.buf[base..base + m.len];
            let from = m.from;
            data.chunks(m.segment)
                .filter_map(move |seg| from.map(|f| (f, seg)))
        })
    }
}

/// Control-message buffer big enough for one `UDP_SEGMENT`/`UDP_GRO` cmsg.
struct Cmsg {
    buf: [u64; 8],
}

impl Cmsg {
    fn new() -> Cmsg {
        Cmsg { buf: [0; 8] }
    }

    // SAFETY argument for the CMSG_* calls: `buf` is 64 bytes, 8-aligned, larger than
    // CMSG_SPACE(size_of::<u16>()), and the msghdr built here only describes `buf`.
    fn fill_segment(&mut self, segment: u16) {
        self.buf = [0; 8];
        // SAFETY: see above.
        unsafe {
            let mut hdr: libc::msghdr = mem::zeroed();
            hdr.msg_control = self.buf.as_mut_ptr().cast();
            hdr.msg_controllen = self.len();
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
        }
    }

    fn len(&self) -> usize {
        // SAFETY: CMSG_SPACE is a pure computation.
        unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as usize }
    }
}

/// Reads the `UDP_GRO` segment size from a received message's control data.
///
/// # Safety
/// `hdr` must come from a completed `recvmsg`/`recvmmsg` whose control buffer is still alive.
unsafe fn gro_segment_size(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|v| *v > 0);
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// Reusable planning state for [`UdpSocket::send_outbox`].
#[derive(Default)]
pub(crate) struct SendScratch {
    groups: Vec<Group>,
    /// Destinations of the last plan whose path MTU is not known yet.
    unknown: Vec<SocketAddr>,
}

struct Group {
    dst: SocketAddr,
    addr: libc::sockaddr_storage,
    addr_len: libc::socklen_t,
    start: usize,
    len: usize,
    segments: usize,
    segment_size: u16,
    /// The segment fits the destination's path (or the path is unknown): more may join.
    fits: bool,
    cmsg: Cmsg,
}

impl SendScratch {
    /// Groups consecutive, contiguous datagrams of equal size (the last may be shorter) to the
    /// same destination into GSO messages, as long as that size fits the destination's path
    /// (`max_payload`: the largest UDP payload it carries, `None` if unknown). A datagram
    /// larger than its path goes alone, for the kernel to refuse and count.
    fn plan(
        &mut self,
        out: &Outbox,
        gso: bool,
        v6: bool,
        mut max_payload: impl FnMut(SocketAddr) -> Option<usize>,
    ) {
        self.groups.clear();
        self.unknown.clear();
        let mut cur: Option<Group> = None;
        for t in out.transmits() {
            // Datagrams for relays leave through the relay queue, not this socket.
            let Destination::Udp(dst) = t.dst else {
                continue;
            };
            if let Some(g) = cur.as_mut() {
                let seg = g.segment_size as usize;
                let contiguous = g.start + g.len == t.start;
                let last_was_short = g.len % seg != 0;
                if gso
                    && g.fits
                    && g.dst == dst
                    && contiguous
                    && !last_was_short
                    && t.len <= seg
                    && g.segments < MAX_GSO_SEGMENTS
                    && g.len + t.len <= MAX_UDP_PAYLOAD
                {
                    g.len += t.len;
                    g.segments += 1;
                    continue;
                }
            }
            if let Some(g) = cur.take() {
                self.groups.push(g);
            }
            let (addr, addr_len) = to_sockaddr(dst, v6);
            let limit = max_payload(dst);
            if limit.is_none() && !self.unknown.contains(&dst) {
                self.unknown.push(dst);
            }
            cur = Some(Group {
                dst,
                addr,
                addr_len,
                start: t.start,
                len: t.len,
                segments: 1,
                segment_size: u16::try_from(t.len.max(1)).unwrap_or(u16::MAX),
                fits: limit.is_none_or(|l| t.len <= l),
                cmsg: Cmsg::new(),
            });
        }
        if let Some(g) = cur.take() {
            self.groups.push(g);
        }
    }
}

fn is_gso_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP)
    )
}

/// The port [`UdpSocket::refresh_path_mtus`] connects its throw-away sockets to (nothing is
/// ever sent; the path MTU depends on the address only).
const PROBE_PORT: u16 = 9;

/// The kernel's current path MTU to `dst`: the egress route's MTU, lowered by what ICMP
/// fragmentation-needed / packet-too-big taught it. Asked through a connected UDP socket that
/// never sends (a fresh one each time, so the route lookup is fresh too).
pub(crate) fn kernel_path_mtu(dst: SocketAddr) -> io::Result<u16> {
    let (family, level, name) = match dst {
        SocketAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let fd = socket(family)?;
    // The data plane's own socket is marked: ask about the route its datagrams take.
    ward_runtime::net::mark_socket(fd.as_raw_fd())?;
    let (ss, len) = to_sockaddr(dst, family == libc::AF_INET6);
    // SAFETY: ss/len describe a valid socket address.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut v: libc::c_int = 0;
    let mut vlen = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v/vlen describe a writable c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut vlen,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u16::try_from(v).map_err(|_| io::Error::other(format!("path MTU out of range: {v}")))
}

fn bind_v6(port: u16) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET6)?;
    setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    let (ss, len) = to_sockaddr(
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
        true,
    );
    bind(&fd, &ss, len)?;
    Ok(fd)
}

fn bind_v4(port: u16) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET)?;
    let (ss, len) = to_sockaddr(
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        false,
    );
    bind(&fd, &ss, len)?;
    Ok(fd)
}

fn socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, ss: &libc::sockaddr_storage, len: libc::socklen_t) -> io::Result<()> {
    // SAFETY: ss/len describe a valid socket address.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `pollfd` waiting for `fd` to be readable.
pub(crate) fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits until one of `fds` is ready or `timeout` passes; `revents` say which.
pub(crate) fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) {
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
    // SAFETY: `fds` is a valid slice of `n` pollfds.
    unsafe {
        libc::poll(fds.as_mut_ptr(), n, ms);
    }
}

fn unsafe_zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage.
    unsafe { mem::zeroed() }
}

fn to_sockaddr(addr: SocketAddr, v6_socket: bool) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut ss = unsafe_zeroed_storage();
    let v6addr = match addr {
        SocketAddr::V4(a) if !v6_socket => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            return (ss, mem::size_of::<libc::sockaddr_in>() as _);
        }
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
        SocketAddr::V6(a) => a,
    };
    let sin6 = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as _,
        sin6_port: v6addr.port().to_be(),
        sin6_flowinfo: v6addr.flowinfo(),
        sin6_addr: libc::in6_addr {
            s6_addr: v6addr.ip().octets(),
        },
        sin6_scope_id: v6addr.scope_id(),
    };
    // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
    unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
    (ss, mem::size_of::<libc::sockaddr_in6>() as _)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: family says this is a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: family says this is a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn sockaddr_round_trip() {
        for a in [
            "10.1.2.3:51820".parse::<SocketAddr>().unwrap(),
            "[fd00::1]:9".parse().unwrap(),
        ] {
            for v6 in [true, false] {
                if a.is_ipv6() && !v6 {
                    continue;
                }
                let (ss, _) = to_sockaddr(a, v6);
                assert_eq!(from_sockaddr(&ss), Some(a));
            }
        }
    }

    /// GSO runs are cut to the path: segments larger than the destination's path MTU allows go
    /// alone; ones that fit are coalesced up to the segment limit; unknown paths are reported.
    #[test]
    fn plan_sizes_gso_runs_to_the_path() {
        let near: SocketAddr = "10.99.0.11:51820".parse().unwrap();
        let far: SocketAddr = "10.99.0.12:51820".parse().unwrap();
        let new: SocketAddr = "10.99.0.13:51820".parse().unwrap();
        let mut out = Outbox::new();
        for _ in 0..100 {
            out.push(near, &[1; 1452]);
        }
        for _ in 0..5 {
            out.push(far, &[2; 1452]);
        }
        for _ in 0..3 {
            out.push(far, &[3; 1000]);
        }
        out.push(new, &[4; 1452]);
        let mut limits = BTreeMap::new();
        limits.insert(near, pmtu::max_udp_payload(1500, near.ip()));
        limits.insert(far, pmtu::max_udp_payload(1280, far.ip()));
        let mut scratch = SendScratch::default();
        scratch.plan(&out, true, true, |d| limits.get(&d).copied());
        let shape: Vec<(SocketAddr, usize, u16)> = scratch
            .groups
            .iter()
            .map(|g| (g.dst, g.segments, g.segment_size))
            .collect();
        // 45 × 1452 bytes is the most one UDP message holds.
        let mut want = vec![(near, 45, 1452), (near, 45, 1452), (near, 10, 1452)];
        want.extend(std::iter::repeat_n((far, 1, 1452), 5));
        want.push((far, 3, 1000));
        want.push((new, 1, 1452));
        assert_eq!(shape, want);
        assert!(scratch.groups.iter().all(|g| g.len <= MAX_UDP_PAYLOAD));
        assert_eq!(scratch.unknown, vec![new]);
        // Without GSO every datagram goes alone.
        scratch.plan(&out, false, true, |d| limits.get(&d).copied());
        assert_eq!(scratch.groups.len(), out.len());
    }

    #[test]
    fn loopback_batch_send_and_receive() {
        let a = UdpSocket::bind(0, Arc::default()).unwrap();
        let b = UdpSocket::bind(0, Arc::default()).unwrap();
        let dst: SocketAddr = format!("127.0.0.1:{}", b.local_port().unwrap())
            .parse()
            .unwrap();
        let mut out = Outbox::new();
        let mut sent = Vec::new();
        for i in 0..50u8 {
            // 40 equal-size datagrams (one GSO run), then 10 small ones.
            let len = if i < 40 { 1200 } else { 100 + i as usize };
            let d = vec![i; len];
            out.push(dst, &d);
            sent.push(d);
        }
        let mut scratch = SendScratch::default();
        a.send_outbox(&out, &mut scratch);
        let mut batch = RecvBatch::new(8);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < sent.len() && Instant::now() < deadline {
            match b.recv(&mut batch) {
                Ok(_) => got.extend(batch.datagrams().map(|(_, d)| d.to_vec())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_fds(&mut [pollfd(b.raw_fd())], Duration::from_millis(50));
                }
                Err(e) => panic!("{e}"),
            }
        }
        let summary = |v: &[Vec<u8>]| -> Vec<(usize, u8)> {
            v.iter()
                .map(|d| (d.len(), d.first().copied().unwrap_or(0)))
                .collect()
        };
        assert_eq!(summary(&got), summary(&sent));
        assert!(got == sent, "payload mismatch");
    }
}
