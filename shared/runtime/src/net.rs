//! UDP sockets for Ward's QUIC endpoints and TCP listeners for their TLS-over-TCP fallback:
//! dual-stack by default.
//!
//! A socket bound to `[::]:PORT` with `IPV6_V6ONLY` off receives IPv4 too (as v4-mapped
//! addresses), so one listener or client endpoint serves both families. Where the host has no
//! IPv6 (the socket family is unsupported or `[::]` cannot be bound), [`bind_udp_dual_stack`]
//! falls back to `0.0.0.0:PORT` and tells the caller why, for its log line.
//!
//! Outbound marking: a program that routes the host's traffic into its own tunnel (the device
//! agent with an exit node) sets a process-wide firewall mark once ([`set_outbound_mark`]);
//! every UDP socket bound here and every TCP connection [`crate::stream::connect_tls`] dials
//! then carries it (`SO_MARK`), so policy routing can keep them on the underlay.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// The mark [`mark_socket`] sets (0: none).
static OUTBOUND_MARK: AtomicU32 = AtomicU32::new(0);

/// Marks every socket this module binds from now on (and every TCP connection
/// [`crate::stream::connect_tls`] dials) with `mark` (0: no mark).
pub fn set_outbound_mark(mark: u32) {
    OUTBOUND_MARK.store(mark, Ordering::Relaxed);
}

/// The mark set by [`set_outbound_mark`] (0: none).
pub fn outbound_mark() -> u32 {
    OUTBOUND_MARK.load(Ordering::Relaxed)
}

/// Sets `SO_MARK` on `fd` to the outbound mark; nothing when none is set. Needs
/// `CAP_NET_ADMIN`: the error says so and the caller decides (a socket left unmarked is
/// routed like any other traffic).
pub fn mark_socket(fd: RawFd) -> io::Result<()> {
    let mark = outbound_mark();
    if mark == 0 {
        return Ok(());
    }
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)
}

/// A socket from [`bind_udp_dual_stack`].
#[derive(Debug)]
pub struct Bound {
    pub socket: UdpSocket,
    /// Why the socket is IPv4-only (`None`: it is dual-stack).
    pub ipv4_only_because: Option<io::Error>,
}

/// Binds `[::]:port` dual-stack, or `0.0.0.0:port` where IPv6 is unavailable.
/// The socket carries the outbound mark ([`set_outbound_mark`]) where one is set; a socket
/// that cannot be marked is an error (it would be routed into the tunnel it carries).
pub fn bind_udp_dual_stack(port: u16) -> io::Result<Bound> {
    let bound = match bind_v6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)) {
        Ok(socket) => Bound {
            socket,
            ipv4_only_because: None,
        },
        Err(e) => Bound {
            socket: UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?,
            ipv4_only_because: Some(e),
        },
    };
    mark_socket(std::os::fd::AsRawFd::as_raw_fd(&bound.socket))?;
    Ok(bound)
}

/// Kernel buffers for a QUIC endpoint's UDP socket that relays datagrams
/// ([`set_socket_buffers`]): about 3 ms of a 10 Gbit/s link each way.
pub const QUIC_SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Sets the kernel send and receive buffers of a QUIC endpoint's UDP socket to `bytes` each
/// (beyond `net.core.{r,w}mem_max` where the process may: `SO_RCVBUFFORCE`, `SO_SNDBUFFORCE`),
/// so a burst of relayed datagrams waits in the socket rather than being dropped while the
/// endpoint's task waits for a CPU. Best effort: where neither is allowed the kernel's
/// default stays, and the returned error says why (the caller logs it).
pub fn set_socket_buffers(socket: &UdpSocket, bytes: libc::c_int) -> io::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    let mut last = Ok(());
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, bytes).is_err() {
            if let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, plain, bytes) {
                last = Err(e);
            }
        }
    }
    last
}

/// Binds exactly `addr`; an IPv6 wildcard (`[::]:PORT`) is bound with `IPV6_V6ONLY` off so it
/// accepts IPv4 as well, whatever the host's `bindv6only` default is.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    match addr {
        SocketAddr::V6(a) if a.ip().is_unspecified() => bind_v6(a),
        _ => UdpSocket::bind(addr),
    }
}

/// A listening TCP socket from [`bind_tcp_dual_stack`].
#[derive(Debug)]
pub struct BoundTcp {
    pub listener: TcpListener,
    /// Why the listener is IPv4-only (`None`: it is dual-stack).
    pub ipv4_only_because: Option<io::Error>,
}

/// Backlog of a TCP listener: connections the kernel completes before they are accepted.
const TCP_BACKLOG: libc::c_int = 1024;

/// Listens on `[::]:port` dual-stack, or `0.0.0.0:port` where IPv6 is unavailable.
/// Non-blocking, ready for `tokio::net::TcpListener::from_std`.
pub fn bind_tcp_dual_stack(port: u16) -> io::Result<BoundTcp> {
    match listen_v6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)) {
        Ok(listener) => Ok(BoundTcp {
            listener,
            ipv4_only_because: None,
        }),
        Err(e) => {
            let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
            listener.set_nonblocking(true)?;
            Ok(BoundTcp {
                listener,
                ipv4_only_because: Some(e),
            })
        }
    }
}

/// Listens on exactly `addr` (an IPv6 wildcard dual-stack, like [`bind_udp`]). Non-blocking.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let l = match addr {
        SocketAddr::V6(a) if a.ip().is_unspecified() => listen_v6(a)?,
        _ => TcpListener::bind(addr)?,
    };
    l.set_nonblocking(true)?;
    Ok(l)
}

fn listen_v6(addr: SocketAddrV6) -> io::Result<TcpListener> {
    let fd = socket_v6(addr, libc::SOCK_STREAM, libc::IPPROTO_TCP)?;
    // SAFETY: listen(2) on a descriptor this function owns.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), TCP_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let l = TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

fn bind_v6(addr: SocketAddrV6) -> io::Result<UdpSocket> {
    Ok(UdpSocket::from(socket_v6(
        addr,
        libc::SOCK_DGRAM,
        libc::IPPROTO_UDP,
    )?))
}

/// An IPv6 socket of `ty` with `IPV6_V6ONLY` off (and, for TCP, `SO_REUSEADDR` on so a
/// restarted listener binds at once), bound to `addr`.
fn socket_v6(addr: SocketAddrV6, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET6, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns; OwnedFd closes it on error.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| {
        setsockopt_int(std::os::fd::AsRawFd::as_raw_fd(&sock), level, name, v)
    };
    set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    if ty == libc::SOCK_STREAM {
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    // SAFETY: sockaddr_in6 is plain data; all-zero is a valid starting value.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = addr.port().to_be();
    sa.sin6_addr.s6_addr = addr.ip().octets();
    sa.sin6_flowinfo = addr.flowinfo();
    sa.sin6_scope_id = addr.scope_id();
    // SAFETY: bind with a pointer to a live sockaddr_in6 and its exact size.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// `setsockopt` with an integer value.
pub fn setsockopt_int(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6_available() -> bool {
        UdpSocket::bind("[::1]:0").is_ok()
    }

    #[test]
    fn dual_stack_socket_receives_ipv4_and_ipv6() {
        let s = bind_udp_dual_stack(0).unwrap().socket;
        let port = s.local_addr().unwrap().port();
        if !s.local_addr().unwrap().is_ipv6() || !v6_available() {
            eprintln!("no IPv6 on this host; dual-stack check skipped");
            return;
        }
        let c4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        c4.send_to(b"four", ("127.0.0.1", port)).unwrap();
        let c6 = UdpSocket::bind("[::1]:0").unwrap();
        c6.send_to(b"six", ("::1", port)).unwrap();
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        for _ in 0..2 {
            let (n, _) = s.recv_from(&mut buf).unwrap();
            got.push(buf[..n].to_vec());
        }
        got.sort();
        assert_eq!(got, vec![b"four".to_vec(), b"six".to_vec()]);
    }

    #[test]
    fn dual_stack_tcp_listener_accepts_ipv4_and_ipv6() {
        let l = bind_tcp_dual_stack(0).unwrap().listener;
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(false).unwrap();
        let _c4 = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        l.accept().unwrap();
        if l.local_addr().unwrap().is_ipv6() && v6_available() {
            let _c6 = std::net::TcpStream::connect(("::1", port)).unwrap();
            l.accept().unwrap();
        }
    }

    #[test]
    fn socket_buffers_grow_to_what_was_asked_or_the_kernel_allows() {
        let s = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let get = |name| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt into a live c_int with its exact size.
            let rc = unsafe {
                libc::getsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            v
        };
        let before = get(libc::SO_RCVBUF);
        let asked = 4 << 20;
        let r = set_socket_buffers(&s, asked);
        let (rcv, snd) = (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF));
        assert!(rcv >= before, "never smaller: {before} -> {rcv}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Root may go beyond the sysctl bound (the kernel doubles what it is given).
            assert!(r.is_ok(), "{r:?}");
            assert!(rcv >= asked && snd >= asked, "{rcv} {snd}");
        }
    }

    #[test]
    fn explicit_ipv4_address_binds_as_given() {
        let s = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(s.local_addr().unwrap().is_ipv4());
    }
}
