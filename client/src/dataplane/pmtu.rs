//! Path MTU: what each peer path carries, and telling the inner stack when a packet does not fit.
//!
//! I/O-free. The driver learns each destination's path MTU from the kernel (which knows the
//! egress route's MTU and what ICMP fragmentation-needed / packet-too-big taught it, because
//! the data socket sets DF on every datagram) and records it here; the core asks here, per
//! packet read from the TUN, whether the packet fits the peer's path once encrypted.
//!
//! ```text
//! driver, first send to a new destination / EMSGSIZE / every REFRESH_INTERVAL:
//!     mtus.handle_learned(dst_ip, kernel_path_mtu(dst))     -> Some(change): log it
//! driver, planning a send:      let mut view = mtus.view();
//!                               view.max_payload(dst)       -> GSO segment limit, or unknown
//! core, per TUN packet:         mtus.admit(packet, endpoint, now, &mut tun_out)
//!                                   false: dropped; an ICMP too-big may be in tun_out
//!   (relayed path):             mtus.admit_relayed(packet, relay_max_datagram, now, &mut tun_out)
//! driver, on a failed send:     mtus.record_send_failure(reason)
//! ```
//!
//! The per-packet check costs one atomic load while every known path carries what the TUN
//! MTU needs (1500-byte paths): only packets longer than the smallest known inner MTU look
//! the destination up.
//!
//! Packets read from the TUN are single segments (the driver splits TSO super-packets into
//! their gso_size + headers segments before the core sees them), so a packet's length is
//! what goes on the wire.
//!
//! A path through a relay carries WireGuard datagrams up to the relay's `max_datagram` (what
//! its QUIC connection takes now, told by the agent), so inner packets up to `max_datagram -
//! 32` fit it, whatever the underlay.
//!
//! A direct path's MTU is also probed actively (`probe`, driven by the engine): when probing
//! finds the path carries less than the kernel says (a router drops large packets without
//! sending ICMP), the engine records that ceiling here ([`PathMtus::set_probed`]) and the
//! path's MTU is the smaller of the two.
//!
//! An inner packet that does not fit is dropped and counted. IPv4 with DF and all IPv6 get
//! an ICMP error written back to the TUN (fragmentation needed, type 3 code 4, with the
//! inner MTU as next-hop MTU; packet too big, type 2), sourced from the packet's destination
//! (the peer's overlay address, which routes back through the TUN, so reverse-path filtering
//! accepts it); the inner stack lowers that route's PMTU and TCP its segment size. IPv4
//! without DF is dropped and counted, not fragmented: the peer's inbound filter refuses
//! non-first fragments, so fragments would be lost there anyway.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

#[cfg(test)]
use super::engine::icmp::checksum;
use super::engine::icmp::{icmp_error, IcmpError};

/// Outer overhead per inner packet over IPv4: IPv4 header 20 + UDP 8 + WireGuard data
/// header 16 + tag 16.
pub const OVERHEAD_V4: u16 = 20 + 8 + 32;
/// Outer overhead per inner packet over IPv6: IPv6 header 40 + UDP 8 + WireGuard 32.
pub const OVERHEAD_V6: u16 = 40 + 8 + 32;
/// WireGuard's data message overhead: header 16 + tag 16.
pub const WG_DATA_OVERHEAD: u16 = 32;
/// Smallest path MTU accepted from the kernel: the IPv4 minimum (RFC 791: 68) plus overhead.
pub const MIN_PATH_MTU: u16 = 68 + OVERHEAD_V6;
/// How often the driver asks the kernel again for every destination in use.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// A destination not sent to for this many refreshes is forgotten.
const IDLE_REFRESHES: u8 = 60;
/// Most destinations remembered (each is a peer endpoint that answered a handshake or a
/// candidate handshakes were sent to).
const MAX_PATHS: usize = 4096;
/// Most ICMP too-big errors written back to the TUN per second.
const TOO_BIG_PER_SEC: u32 = 100;

/// Why a UDP send failed, as counted in [`PathMtuCounters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// Larger than the path MTU (EMSGSIZE, or a GSO segment the path cannot carry).
    TooBig,
    /// No route, network or host unreachable.
    Unreachable,
    /// A local firewall refused it (EPERM, EACCES).
    Refused,
    /// The socket or device queue was full (ENOBUFS, EAGAIN).
    NoBuffer,
    /// Anything else.
    Other,
}

impl SendFailure {
    /// Sorts an errno from `sendmmsg`.
    pub fn from_errno(errno: Option<i32>) -> SendFailure {
        match errno {
            Some(libc::EMSGSIZE) => SendFailure::TooBig,
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EADDRNOTAVAIL) => {
                SendFailure::Unreachable
            }
            Some(libc::EPERM | libc::EACCES) => SendFailure::Refused,
            Some(libc::ENOBUFS | libc::EAGAIN) => SendFailure::NoBuffer,
            _ => SendFailure::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SendFailure::TooBig => "too big for the path",
            SendFailure::Unreachable => "unreachable",
            SendFailure::Refused => "refused by a local firewall",
            SendFailure::NoBuffer => "no buffer space",
            SendFailure::Other => "other error",
        }
    }
}

/// Path-MTU counters (monotonic since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathMtuCounters {
    /// Packets from the TUN dropped because they do not fit their peer's path.
    pub dropped_too_big: u64,
    /// ICMP fragmentation-needed / packet-too-big errors written back to the TUN.
    pub icmp_too_big_sent: u64,
    /// Path MTU changes learned (first value for a destination included).
    pub path_mtu_changes: u64,
    /// Datagrams the kernel refused, by reason.
    pub send_failed_too_big: u64,
    pub send_failed_unreachable: u64,
    pub send_failed_refused: u64,
    pub send_failed_no_buffer: u64,
    pub send_failed_other: u64,
    /// Active path-MTU probes sent, acknowledged by the peer, and lost (unanswered when their
    /// round ended).
    #[serde(default)]
    pub probes_sent: u64,
    #[serde(default)]
    pub probes_acked: u64,
    #[serde(default)]
    pub probes_lost: u64,
}

/// A change of a destination's path MTU (`old` is `None` the first time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MtuChange {
    pub old: Option<u16>,
    pub new: u16,
}

/// Every destination's path MTU. Shared by the core (per TUN packet) and the driver (learning,
/// send planning). See the module documentation for the loop.
pub struct PathMtus {
    paths: RwLock<HashMap<IpAddr, Entry>>,
    /// Smallest inner MTU over the known paths (`u16::MAX` with none): packets up to this long
    /// fit every path.
    floor: AtomicU16,
    too_big_limit: Mutex<(Option<Instant>, u32)>,
    dropped_too_big: AtomicU64,
    icmp_too_big_sent: AtomicU64,
    path_mtu_changes: AtomicU64,
    send_failed: [AtomicU64; 5],
    /// Probes sent, acknowledged, lost.
    probes: [AtomicU64; 3],
}

struct Entry {
    /// What the kernel says.
    mtu: u16,
    /// What active probing found, when below the kernel's value then (see `probe`).
    probed: Option<u16>,
    /// Sent to since the last refresh.
    used: AtomicBool,
    /// Refreshes in a row without use.
    idle: u8,
}

impl Default for PathMtus {
    fn default() -> PathMtus {
        PathMtus {
            paths: RwLock::new(HashMap::new()),
            floor: AtomicU16::new(u16::MAX),
            too_big_limit: Mutex::new((None, 0)),
            dropped_too_big: AtomicU64::new(0),
            icmp_too_big_sent: AtomicU64::new(0),
            path_mtu_changes: AtomicU64::new(0),
            send_failed: Default::default(),
            probes: Default::default(),
        }
    }
}

impl PathMtus {
    /// The path MTU to `ip` (IP packet size, outer headers included), if learned: the
    /// kernel's, or the probed ceiling when lower.
    pub fn path_mtu(&self, ip: IpAddr) -> Option<u16> {
        read(&self.paths).get(&ip).map(Entry::effective)
    }

    /// What the kernel says the path MTU to `ip` is, if learned (the probing upper bound).
    pub fn kernel_mtu(&self, ip: IpAddr) -> Option<u16> {
        read(&self.paths).get(&ip).map(|e| e.mtu)
    }

    /// The probed ceiling recorded for `ip`.
    pub fn probed(&self, ip: IpAddr) -> Option<u16> {
        read(&self.paths).get(&ip).and_then(|e| e.probed)
    }

    /// Records what active probing found for `ip` (`None`: no limit below the kernel's).
    /// Only for a path the kernel's MTU is known for (probing needs it); the ceiling never
    /// raises the path MTU above the kernel's. Returns whether the path MTU changed.
    pub fn set_probed(&self, ip: IpAddr, ceiling: Option<u16>) -> bool {
        let mut paths = write(&self.paths);
        let Some(e) = paths.get_mut(&ip) else {
            return false;
        };
        if e.probed == ceiling {
            return false;
        }
        let before = e.effective();
        e.probed = ceiling.map(|c| c.max(MIN_PATH_MTU));
        let changed = e.effective() != before;
        if changed {
            tracing::info!(%ip, kernel = e.mtu, probed = ?e.probed, "path MTU set by probing");
            self.update_floor(&paths);
        }
        changed
    }

    /// Adds the engine's probe tallies to the counters.
    pub fn record_probes(&self, sent: u64, acked: u64, lost: u64) {
        for (a, n) in self.probes.iter().zip([sent, acked, lost]) {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// The largest inner packet that fits the path to `dst` once encrypted, if learned.
    pub fn inner_mtu(&self, dst: SocketAddr) -> Option<u16> {
        self.path_mtu(dst.ip()).map(|m| inner_mtu(m, dst.ip()))
    }

    /// Records what the kernel says the path MTU to `ip` is (clamped to [`MIN_PATH_MTU`]).
    /// Returns the change, if it is one, for the driver to log.
    pub fn handle_learned(&self, ip: IpAddr, mtu: u16) -> Option<MtuChange> {
        let mtu = mtu.max(MIN_PATH_MTU);
        let mut paths = write(&self.paths);
        let old = match paths.get_mut(&ip) {
            Some(e) if e.mtu == mtu => return None,
            Some(e) => Some(std::mem::replace(&mut e.mtu, mtu)),
            None => {
                if paths.len() >= MAX_PATHS {
                    paths.retain(|_, e| e.used.load(Ordering::Relaxed));
                }
                paths.insert(
                    ip,
                    Entry {
                        mtu,
                        probed: None,
                        used: AtomicBool::new(true),
                        idle: 0,
                    },
                );
                None
            }
        };
        self.update_floor(&paths);
        self.path_mtu_changes.fetch_add(1, Ordering::Relaxed);
        Some(MtuChange { old, new: mtu })
    }

    /// The destinations to ask the kernel about again; forgets those not sent to for
    /// [`IDLE_REFRESHES`] calls. Call every [`REFRESH_INTERVAL`].
    pub fn poll_refresh(&self) -> Vec<IpAddr> {
        let mut paths = write(&self.paths);
        let before = paths.len();
        for e in paths.values_mut() {
            if e.used.swap(false, Ordering::Relaxed) {
                e.idle = 0;
            } else {
                e.idle = e.idle.saturating_add(1);
            }
        }
        paths.retain(|_, e| e.idle < IDLE_REFRESHES);
        if paths.len() != before {
            self.update_floor(&paths);
        }
        paths.keys().copied().collect()
    }

    /// A read view for planning one send (one lock for many lookups).
    pub fn view(&self) -> PathView<'_> {
        PathView {
            paths: read(&self.paths),
            last: None,
        }
    }

    /// Whether `packet` (one IP packet read from the TUN, for a peer at `dst`) fits the path
    /// once encrypted. If not, it must be dropped: it is counted, and an ICMP error telling
    /// the inner stack the usable MTU is pushed to `tun` (rate-limited; not for IPv4 without
    /// DF). Unknown paths admit everything.
    pub fn admit(
        &self,
        packet: &[u8],
        dst: Option<SocketAddr>,
        now: Instant,
        tun: &mut Vec<Vec<u8>>,
    ) -> bool {
        if packet.len() <= usize::from(self.floor.load(Ordering::Relaxed)) {
            return true;
        }
        let Some(inner) = dst.and_then(|d| self.inner_mtu(d)) else {
            return true;
        };
        if packet.len() <= usize::from(inner) {
            return true;
        }
        tracing::trace!(
            len = packet.len(),
            inner_mtu = inner,
            ?dst,
            "inner packet too big for the path"
        );
        self.refuse(packet, inner, now, tun)
    }

    /// Like [`PathMtus::admit`], for a path through a relay that carries WireGuard datagrams
    /// of up to `max_datagram` bytes: an inner packet fits if it is at most
    /// `max_datagram - 32` (the WireGuard data header and tag).
    pub fn admit_relayed(
        &self,
        packet: &[u8],
        max_datagram: u16,
        now: Instant,
        tun: &mut Vec<Vec<u8>>,
    ) -> bool {
        let inner = relayed_inner_mtu(max_datagram);
        if packet.len() <= usize::from(inner) {
            return true;
        }
        tracing::trace!(
            len = packet.len(),
            inner_mtu = inner,
            "inner packet too big for the relay"
        );
        self.refuse(packet, inner, now, tun)
    }

    /// Drops a packet longer than `inner`: counts it and queues the ICMP too-big (rate
    /// limited). Returns false (not admitted).
    fn refuse(&self, packet: &[u8], inner: u16, now: Instant, tun: &mut Vec<Vec<u8>>) -> bool {
        self.dropped_too_big.fetch_add(1, Ordering::Relaxed);
        if self.allow_icmp(now) {
            if let Some(reply) = too_big_reply(packet, inner) {
                tun.push(reply);
                self.icmp_too_big_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        false
    }

    pub fn record_send_failure(&self, why: SendFailure, datagrams: u64) {
        let i = match why {
            SendFailure::TooBig => 0,
            SendFailure::Unreachable => 1,
            SendFailure::Refused => 2,
            SendFailure::NoBuffer => 3,
            SendFailure::Other => 4,
        };
        self.send_failed[i].fetch_add(datagrams, Ordering::Relaxed);
    }

    pub fn counters(&self) -> PathMtuCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PathMtuCounters {
            dropped_too_big: g(&self.dropped_too_big),
            icmp_too_big_sent: g(&self.icmp_too_big_sent),
            path_mtu_changes: g(&self.path_mtu_changes),
            send_failed_too_big: g(&self.send_failed[0]),
            send_failed_unreachable: g(&self.send_failed[1]),
            send_failed_refused: g(&self.send_failed[2]),
            send_failed_no_buffer: g(&self.send_failed[3]),
            send_failed_other: g(&self.send_failed[4]),
            probes_sent: g(&self.probes[0]),
            probes_acked: g(&self.probes[1]),
            probes_lost: g(&self.probes[2]),
        }
    }

    fn update_floor(&self, paths: &HashMap<IpAddr, Entry>) {
        let floor = paths
            .iter()
            .map(|(ip, e)| inner_mtu(e.effective(), *ip))
            .min()
            .unwrap_or(u16::MAX);
        self.floor.store(floor, Ordering::Relaxed);
    }

    fn allow_icmp(&self, now: Instant) -> bool {
        let mut l = self
            .too_big_limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match l.0 {
            Some(t) if now.saturating_duration_since(t) < Duration::from_secs(1) => {}
            _ => *l = (Some(now), 0),
        }
        if l.1 >= TOO_BIG_PER_SEC {
            return false;
        }
        l.1 += 1;
        true
    }
}

impl Entry {
    fn effective(&self) -> u16 {
        self.probed.map_or(self.mtu, |p| p.min(self.mtu))
    }
}

/// Lookups for one send plan; see [`PathMtus::view`].
pub struct PathView<'a> {
    paths: RwLockReadGuard<'a, HashMap<IpAddr, Entry>>,
    last: Option<(SocketAddr, Option<usize>)>,
}

impl PathView<'_> {
    /// The largest UDP payload (one GSO segment) the path to `dst` carries, `None` if the path
    /// is not known yet. Marks the destination as in use.
    pub fn max_payload(&mut self, dst: SocketAddr) -> Option<usize> {
        if let Some((d, v)) = self.last {
            if d == dst {
                return v;
            }
        }
        let v = self.paths.get(&dst.ip()).map(|e| {
            e.used.store(true, Ordering::Relaxed);
            max_udp_payload(e.effective(), dst.ip())
        });
        self.last = Some((dst, v));
        v
    }
}

/// The largest inner packet that fits a path of `path_mtu` to `ip` once encrypted.
pub fn inner_mtu(path_mtu: u16, ip: IpAddr) -> u16 {
    path_mtu.saturating_sub(overhead(ip))
}

/// The largest inner packet a relay carrying WireGuard datagrams of up to `max_datagram`
/// bytes takes (the WireGuard data header and tag, 32 bytes, come off).
pub fn relayed_inner_mtu(max_datagram: u16) -> u16 {
    max_datagram.saturating_sub(WG_DATA_OVERHEAD)
}

/// The largest UDP payload (a WireGuard datagram) a path of `path_mtu` to `ip` carries.
pub fn max_udp_payload(path_mtu: u16, ip: IpAddr) -> usize {
    let ip_udp = if is_v4(ip) { 28 } else { 48 };
    usize::from(path_mtu).saturating_sub(ip_udp)
}

fn overhead(ip: IpAddr) -> u16 {
    if is_v4(ip) {
        OVERHEAD_V4
    } else {
        OVERHEAD_V6
    }
}

/// IPv4, or IPv4 written as IPv4-mapped IPv6 (sent as IPv4 on the wire).
fn is_v4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
    }
}

/// The ICMP error telling the sender of `packet` that `mtu` is the most its path carries:
/// fragmentation needed (IPv4 with DF) or packet too big (IPv6), from the packet's
/// destination to its source. `None` when nothing may be sent (IPv4 without DF, ICMP errors,
/// non-first fragments, unspecified, multicast or broadcast sources, malformed headers).
pub fn too_big_reply(packet: &[u8], mtu: u16) -> Option<Vec<u8>> {
    icmp_error(packet, IcmpError::TooBig { mtu })
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A TCP/IPv4 packet of `len` bytes, 10.0.0.1 → 100.64.0.2, DF as given.
    fn v4_tcp(len: usize, df: bool) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        if df {
            p[6] = 0x40;
        }
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        let c = checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    fn v6_tcp(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[8..24].copy_from_slice(&"fd00:77::1".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd00:77::2".parse::<Ipv6Addr>().unwrap().octets());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    #[test]
    fn mtu_arithmetic() {
        let v4: IpAddr = Ipv4Addr::new(10, 99, 0, 11).into();
        let mapped: IpAddr = Ipv4Addr::new(10, 99, 0, 11).to_ipv6_mapped().into();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(inner_mtu(1500, v4), 1440);
        assert_eq!(inner_mtu(1500, mapped), 1440);
        assert_eq!(inner_mtu(1500, v6), 1420);
        assert_eq!(inner_mtu(1460, v4), 1400);
        assert_eq!(inner_mtu(1280, v4), 1220);
        assert_eq!(inner_mtu(1280, v6), 1200);
        assert_eq!(inner_mtu(10, v6), 0);
        // A 1420-byte inner packet encrypted over IPv6 fills a 1500-byte path exactly.
        assert_eq!(max_udp_payload(1500, v6), 1420 + 32);
        assert_eq!(max_udp_payload(1460, v4), 1400 + 32);
        assert_eq!(max_udp_payload(1280, mapped), 1220 + 32);
    }

    #[test]
    fn learning_reports_changes_and_clamps() {
        let m = PathMtus::default();
        let ip: IpAddr = Ipv4Addr::new(10, 99, 0, 11).into();
        assert_eq!(m.path_mtu(ip), None);
        assert_eq!(
            m.handle_learned(ip, 1500),
            Some(MtuChange {
                old: None,
                new: 1500
            })
        );
        assert_eq!(m.handle_learned(ip, 1500), None);
        assert_eq!(
            m.handle_learned(ip, 1280),
            Some(MtuChange {
                old: Some(1500),
                new: 1280
            })
        );
        assert_eq!(m.inner_mtu(SocketAddr::new(ip, 51820)), Some(1220));
        m.handle_learned(ip, 20);
        assert_eq!(m.path_mtu(ip), Some(MIN_PATH_MTU));
        assert_eq!(m.counters().path_mtu_changes, 3);
    }

    #[test]
    fn admit_fast_path_and_too_big() {
        let m = PathMtus::default();
        let dst: SocketAddr = "10.99.0.11:51820".parse().unwrap();
        let now = Instant::now();
        let mut tun = Vec::new();
        // Unknown path: everything passes.
        assert!(m.admit(&v4_tcp(1420, true), Some(dst), now, &mut tun));
        m.handle_learned(dst.ip(), 1500);
        assert!(m.admit(&v4_tcp(1420, true), Some(dst), now, &mut tun));
        m.handle_learned(dst.ip(), 1460);
        assert!(m.admit(&v4_tcp(1400, true), Some(dst), now, &mut tun));
        assert!(tun.is_empty());
        assert!(!m.admit(&v4_tcp(1401, true), Some(dst), now, &mut tun));
        assert_eq!(tun.len(), 1);
        assert_eq!(&tun[0][26..28], &1400u16.to_be_bytes());
        // Without DF: dropped and counted, no ICMP.
        assert!(!m.admit(&v4_tcp(1420, false), Some(dst), now, &mut tun));
        assert_eq!(tun.len(), 1);
        // Another destination, path unknown: passes.
        let other: SocketAddr = "10.99.0.12:51820".parse().unwrap();
        assert!(m.admit(&v4_tcp(1420, true), Some(other), now, &mut tun));
        assert!(m.admit(&v4_tcp(1420, true), None, now, &mut tun));
        let c = m.counters();
        assert_eq!((c.dropped_too_big, c.icmp_too_big_sent), (2, 1));
    }

    #[test]
    fn icmp_too_big_is_rate_limited() {
        let m = PathMtus::default();
        let dst: SocketAddr = "10.99.0.11:51820".parse().unwrap();
        m.handle_learned(dst.ip(), 1280);
        let now = Instant::now();
        let mut tun = Vec::new();
        for _ in 0..(TOO_BIG_PER_SEC + 50) {
            assert!(!m.admit(&v4_tcp(1420, true), Some(dst), now, &mut tun));
        }
        assert_eq!(tun.len(), TOO_BIG_PER_SEC as usize);
        assert!(!m.admit(
            &v4_tcp(1420, true),
            Some(dst),
            now + Duration::from_secs(1),
            &mut tun
        ));
        assert_eq!(tun.len(), TOO_BIG_PER_SEC as usize + 1);
        assert_eq!(
            m.counters().dropped_too_big,
            u64::from(TOO_BIG_PER_SEC) + 51
        );
    }

    #[test]
    fn refresh_forgets_idle_paths() {
        let m = PathMtus::default();
        let a: SocketAddr = "10.99.0.11:1".parse().unwrap();
        let b: SocketAddr = "10.99.0.12:1".parse().unwrap();
        m.handle_learned(a.ip(), 1280);
        m.handle_learned(b.ip(), 1500);
        // Learning counts as a use; then IDLE_REFRESHES refreshes without one.
        for _ in 0..=IDLE_REFRESHES {
            let mut v = m.view();
            assert_eq!(v.max_payload(b), Some(1472));
            drop(v);
            m.poll_refresh();
        }
        assert_eq!(m.path_mtu(a.ip()), None);
        assert_eq!(m.path_mtu(b.ip()), Some(1500));
        // The floor follows: a 1420-byte packet fits every remaining path without a lookup.
        assert_eq!(m.floor.load(Ordering::Relaxed), 1440);
    }

    #[test]
    fn frag_needed_quotes_and_checksums() {
        let pkt = v4_tcp(1420, true);
        let r = too_big_reply(&pkt, 1400).unwrap();
        assert_eq!(r.len(), 576);
        assert_eq!(r[0], 0x45);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]) as usize, r.len());
        assert_eq!(r[9], 1);
        // From the packet's destination to its source.
        assert_eq!(&r[12..16], &pkt[16..20]);
        assert_eq!(&r[16..20], &pkt[12..16]);
        assert_eq!(checksum(&[&r[..20]]), 0, "IPv4 header checksum");
        assert_eq!((r[20], r[21]), (3, 4));
        assert_eq!(&r[24..26], &[0, 0], "unused");
        assert_eq!(u16::from_be_bytes([r[26], r[27]]), 1400);
        assert_eq!(checksum(&[&r[20..]]), 0, "ICMP checksum");
        // The original IP header and (at least) the first 64 bits of data, unchanged.
        assert_eq!(&r[28..], &pkt[..548]);
        // A short packet is quoted whole.
        let small = v4_tcp(60, true);
        let r = too_big_reply(&small, 1400).unwrap();
        assert_eq!(&r[28..], &small[..]);
        assert_eq!(checksum(&[&r[20..]]), 0);
    }

    #[test]
    fn frag_needed_refusals() {
        assert!(too_big_reply(&v4_tcp(1420, false), 1400).is_none(), "no DF");
        let mut frag = v4_tcp(1420, true);
        frag[7] = 1;
        assert!(too_big_reply(&frag, 1400).is_none(), "non-first fragment");
        let mut err = v4_tcp(1420, true);
        err[9] = 1;
        err[20] = 3;
        assert!(too_big_reply(&err, 1400).is_none(), "ICMP error");
        let mut echo = err.clone();
        echo[20] = 8;
        assert!(too_big_reply(&echo, 1400).is_some(), "echo request");
        let mut mc = v4_tcp(1420, true);
        mc[12] = 224;
        assert!(too_big_reply(&mc, 1400).is_none(), "multicast source");
        assert!(too_big_reply(&v4_tcp(1420, true)[..19], 1400).is_none());
        assert!(too_big_reply(&[], 1400).is_none());
        let mut bad_ihl = v4_tcp(40, true);
        bad_ihl[0] = 0x4f;
        assert!(too_big_reply(&bad_ihl, 1400).is_none());
        assert!(too_big_reply(&[0x10; 64], 1400).is_none());
    }

    #[test]
    fn packet_too_big_quotes_and_checksums() {
        let pkt = v6_tcp(1420);
        let r = too_big_reply(&pkt, 1380).unwrap();
        assert_eq!(r.len(), 1280);
        assert_eq!(r[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([r[4], r[5]]) as usize, r.len() - 40);
        assert_eq!(r[6], 58);
        assert_eq!(&r[8..24], &pkt[24..40]);
        assert_eq!(&r[24..40], &pkt[8..24]);
        assert_eq!((r[40], r[41]), (2, 0));
        assert_eq!(u32::from_be_bytes([r[44], r[45], r[46], r[47]]), 1380);
        assert_eq!(&r[48..], &pkt[..1232]);
        let mut pseudo = [0u8; 40];
        pseudo[..32].copy_from_slice(&r[8..40]);
        pseudo[32..36].copy_from_slice(&((r.len() - 40) as u32).to_be_bytes());
        pseudo[39] = 58;
        assert_eq!(checksum(&[&pseudo, &r[40..]]), 0, "ICMPv6 checksum");
        // Odd-length packets checksum too.
        let odd = v6_tcp(101);
        let r = too_big_reply(&odd, 1380).unwrap();
        pseudo[..32].copy_from_slice(&r[8..40]);
        pseudo[32..36].copy_from_slice(&((r.len() - 40) as u32).to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &r[40..]]), 0);
        assert_eq!(&r[48..], &odd[..]);
    }

    #[test]
    fn packet_too_big_refusals() {
        let mut err = v6_tcp(200);
        err[6] = 58;
        err[40] = 1;
        assert!(too_big_reply(&err, 1280).is_none(), "ICMPv6 error");
        err[40] = 128;
        assert!(too_big_reply(&err, 1280).is_some(), "echo request");
        let mut mc = v6_tcp(200);
        mc[8] = 0xff;
        assert!(too_big_reply(&mc, 1280).is_none(), "multicast source");
        assert!(too_big_reply(&v6_tcp(200)[..39], 1280).is_none());
    }

    /// Through the core: once the path to a peer is known to be 1280, a 1300-byte inner packet
    /// is not encrypted but answered with fragmentation-needed (MTU 1220) into the TUN; a
    /// 1220-byte one goes out; `status` shows the path MTU.
    #[test]
    fn core_answers_packets_too_big_for_the_path() {
        use crate::dataplane::{Core, CoreConfig, Outbox, PeerConfig};
        let node = |k: u8| {
            Core::new(
                CoreConfig {
                    private_key: [k; 32],
                    persistent_keepalive: None,
                    v6_prefix: None,
                },
                u64::from(k),
            )
        };
        let (a, b) = (node(1), node(2));
        let a_addr: SocketAddr = "10.99.0.11:51820".parse().unwrap();
        let b_addr: SocketAddr = "10.99.0.12:51820".parse().unwrap();
        let peer = |core: &Core, id: u8, endpoint: SocketAddr| PeerConfig {
            routes: Default::default(),
            device_id: u64::from(id),
            hostname: format!("node{id}"),
            public_key: core.public_key(),
            ipv4: Ipv4Addr::new(100, 64, 0, id),
            ipv6: format!("fd00::{id}").parse().unwrap(),
            endpoints: vec![endpoint],
            relay: None,
        };
        let now = Instant::now();
        let (mut to_b, mut to_a) = (Outbox::new(), Outbox::new());
        a.set_peers(vec![peer(&b, 2, b_addr)], now, &mut to_b);
        b.set_peers(vec![peer(&a, 1, a_addr)], now, &mut to_a);
        let mut buf = vec![0u8; 65536];
        for _ in 0..3 {
            let (mut next_b, mut next_a) = (Outbox::new(), Outbox::new());
            for (_, d) in to_b.iter() {
                let _ = b.handle_datagram(a_addr, d, now, 0, &mut buf, &mut next_a);
            }
            for (_, d) in to_a.iter() {
                let _ = a.handle_datagram(b_addr, d, now, 0, &mut buf, &mut next_b);
            }
            (to_b, to_a) = (next_b, next_a);
        }
        assert!(
            a.status()[0].last_handshake.is_some(),
            "handshake completed"
        );

        let mut out = Outbox::new();
        a.handle_tun_packet(&v4_tcp(1300, true), now, &mut out);
        assert_eq!(out.len(), 1, "unknown path: sent");
        assert!(out.tun_packets().is_empty());

        a.path_mtus().handle_learned(b_addr.ip(), 1280);
        assert_eq!(a.status()[0].path_mtu, Some(1280));
        let mut out = Outbox::new();
        let big = v4_tcp(1300, true);
        a.handle_tun_packet(&big, now, &mut out);
        assert!(out.is_empty(), "too big: not sent");
        let icmp = out.tun_packets();
        assert_eq!(icmp.len(), 1);
        assert_eq!((icmp[0][20], icmp[0][21]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[0][26], icmp[0][27]]), 1220);
        assert_eq!(&icmp[0][28..48], &big[..20]);

        let mut out = Outbox::new();
        a.handle_tun_packet(&v4_tcp(1220, true), now, &mut out);
        assert_eq!(out.len(), 1, "fits: sent");
        assert_eq!(out.transmits()[0].len, 1220 + 32);
        assert!(out.tun_packets().is_empty());
        let c = a.path_mtus().counters();
        assert_eq!((c.dropped_too_big, c.icmp_too_big_sent), (1, 1));
    }

    #[test]
    fn send_failure_reasons() {
        assert_eq!(
            SendFailure::from_errno(Some(libc::EMSGSIZE)),
            SendFailure::TooBig
        );
        assert_eq!(
            SendFailure::from_errno(Some(libc::ENETUNREACH)),
            SendFailure::Unreachable
        );
        assert_eq!(
            SendFailure::from_errno(Some(libc::EPERM)),
            SendFailure::Refused
        );
        assert_eq!(SendFailure::from_errno(None), SendFailure::Other);
        let m = PathMtus::default();
        m.record_send_failure(SendFailure::TooBig, 3);
        m.record_send_failure(SendFailure::Refused, 1);
        let c = m.counters();
        assert_eq!((c.send_failed_too_big, c.send_failed_refused), (3, 1));
    }
}
