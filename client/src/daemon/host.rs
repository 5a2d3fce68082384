//! What the daemon reads about its host: name, operating system, interface addresses.

use std::net::{IpAddr, Ipv6Addr};

use ward_shared::addr::AddressPools;

pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "device".into())
}

pub fn os_name() -> String {
    let raw = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    raw.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| std::env::consts::OS.to_string())
}

/// Candidate endpoints: this host's interface addresses that a peer could reach, IPv4 first
/// and then IPv6 ([`candidates`] says which).
pub fn local_addresses() -> Vec<IpAddr> {
    candidates(&interface_addresses())
}

/// Picks candidate endpoints from `(interface, address)` pairs: IPv4 addresses that are not
/// loopback, link-local or overlay (100.64.0.0/10), then IPv6 global and unique-local
/// addresses. Interfaces that carry an overlay IPv4 (the TUN) give nothing, which keeps the
/// overlay's IPv6 out without knowing its prefix. IPv6 link-local addresses (fe80::/10) are
/// left out: they need a scope id that the wire's endpoint type does not carry, and a peer on
/// the same link has a global or unique-local address as well.
pub fn candidates(addrs: &[(String, IpAddr)]) -> Vec<IpAddr> {
    let overlay_ifaces: std::collections::BTreeSet<&str> = addrs
        .iter()
        .filter(|(_, ip)| matches!(ip, IpAddr::V4(v4) if AddressPools::contains_v4(*v4)))
        .map(|(name, _)| name.as_str())
        .collect();
    let usable = addrs
        .iter()
        .filter(|(name, _)| !overlay_ifaces.contains(name.as_str()))
        .map(|(_, ip)| *ip);
    let v4 = usable.clone().filter(|ip| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(_) => false,
    });
    let v6 = usable.filter(|ip| match ip {
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                && (first & 0xffc0) != 0xfe80
                && v6.to_ipv4_mapped().is_none()
        }
        IpAddr::V4(_) => false,
    });
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in v4.chain(v6) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Every IPv4 and IPv6 address of this host's interfaces, with the interface's name.
fn interface_addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we only read and then free exactly once.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned above, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is non-null and a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points at a sockaddr of the family it names.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        if family == libc::AF_INET {
            // SAFETY: family AF_INET means the storage is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            out.push((name, IpAddr::V4(ip)));
        } else if family == libc::AF_INET6 {
            // SAFETY: family AF_INET6 means the storage is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            out.push((name, IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))));
        }
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, ip: &str) -> (String, IpAddr) {
        (name.to_string(), ip.parse().unwrap())
    }

    #[test]
    fn candidates_take_global_and_ula_ipv6_after_ipv4() {
        let got = candidates(&[
            e("lo", "127.0.0.1"),
            e("lo", "::1"),
            e("eth0", "fd00:99::12"),
            e("eth0", "fe80::1"),
            e("eth0", "10.99.0.12"),
            e("eth0", "2001:db8::5"),
            e("eth1", "169.254.1.1"),
            e("eth1", "::ffff:10.1.1.1"),
        ]);
        let want: Vec<IpAddr> = ["10.99.0.12", "fd00:99::12", "2001:db8::5"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_overlay_interface_gives_no_candidates() {
        let got = candidates(&[
            e("ward0", "100.64.0.1"),
            e("ward0", "fd12:3456:789a::1"),
            e("eth0", "fd00:99::12"),
        ]);
        assert_eq!(got, vec!["fd00:99::12".parse::<IpAddr>().unwrap()]);
    }
}
