//! The TUN interface: creation (with virtio-net offload), addresses, routes, removal.
//!
//! Addresses and routes are set with iproute2 (`ip`), which every supported Linux has; deleting
//! the link removes both, and the kernel deletes a non-persistent TUN by itself when its last
//! descriptor closes (e.g. when the agent dies).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};
use tun_rs::{DeviceBuilder, SyncDevice};
use ward_shared::addr::{V4_NET, V4_PREFIX_LEN, V6_PREFIX_LEN};

pub(crate) struct TunDevice {
    pub(crate) dev: SyncDevice,
    /// IFF_VNET_HDR with TSO/USO: reads may be GSO super-packets, writes may be GRO-coalesced.
    pub(crate) offload: bool,
}

pub(crate) struct TunParams<'a> {
    pub(crate) name: &'a str,
    pub(crate) mtu: u16,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
    pub(crate) v6_prefix: Ipv6Addr,
}

impl TunDevice {
    /// Creates the TUN, replacing a leftover TUN of the same name, and configures addresses,
    /// MTU and the overlay routes. On error nothing is left behind.
    pub(crate) fn create(p: &TunParams<'_>) -> anyhow::Result<TunDevice> {
        validate_name(p.name)?;
        if link_exists(p.name) {
            if !Path::new(&format!("/sys/class/net/{}/tun_flags", p.name)).exists() {
                bail!(
                    "interface {} exists and is not a TUN device; refusing to replace it",
                    p.name
                );
            }
            tracing::warn!(tun = p.name, "removing leftover TUN interface");
            ip(&["link", "del", "dev", p.name])?;
        }
        let dev = match build(p, true) {
            Ok(dev) => dev,
            Err(e) => {
                tracing::debug!(error = %e, "TUN offload unavailable, creating without");
                build(p, false).with_context(|| format!("creating TUN {}", p.name))?
            }
        };
        let offload = dev.tcp_gso();
        let tun = TunDevice { dev, offload };
        // If configuration fails, dropping `tun` closes the descriptor and the kernel removes the
        // interface with whatever was already configured.
        tun.configure(p)?;
        set_nonblocking(tun.dev.as_raw_fd())?;
        tracing::info!(tun = p.name, offload, mtu = p.mtu, "TUN up");
        Ok(tun)
    }

    fn configure(&self, p: &TunParams<'_>) -> anyhow::Result<()> {
        let mtu = p.mtu.to_string();
        let v4 = format!("{}/32", p.ipv4);
        let v6 = format!("{}/128", p.ipv6);
        let v4_route = format!("{V4_NET}/{V4_PREFIX_LEN}");
        let v6_route = format!("{}/{V6_PREFIX_LEN}", mask_v6(p.v6_prefix, V6_PREFIX_LEN));
        let n = p.name;
        ip(&["link", "set", "dev", n, "mtu", &mtu, "txqueuelen", "1000"])?;
        ip(&["addr", "replace", &v4, "dev", n])?;
        ip(&["-6", "addr", "replace", &v6, "dev", n, "nodad"])?;
        ip(&["link", "set", "dev", n, "up"])?;
        ip(&["route", "replace", &v4_route, "dev", n])?;
        ip(&["-6", "route", "replace", &v6_route, "dev", n])?;
        Ok(())
    }

    /// Removes the interface (and with it its addresses and routes), if it is still there.
    pub(crate) fn remove(name: &str) {
        if link_exists(name) {
            if let Err(e) = ip(&["link", "del", "dev", name]) {
                tracing::warn!(tun = name, error = %e, "removing TUN failed");
            }
        }
    }
}

fn build(p: &TunParams<'_>, offload: bool) -> std::io::Result<SyncDevice> {
    DeviceBuilder::new()
        .name(p.name)
        .mtu(p.mtu)
        .offload(offload)
        .build_sync()
}

fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name != "."
        && name != "..";
    if !ok {
        bail!("invalid interface name {name:?}");
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    Path::new(&format!("/sys/class/net/{name}")).exists()
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn mask_v6(addr: Ipv6Addr, len: u8) -> Ipv6Addr {
    let bits = u128::from(addr);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    Ipv6Addr::from(bits & mask)
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> anyhow::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error()).context("setting TUN non-blocking");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_name("ward0").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a-very-long-name-x").is_err());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("a b").is_err());
    }

    #[test]
    fn v6_prefix_is_masked() {
        let a: Ipv6Addr = "fd12:3456:789a:1::5".parse().unwrap();
        assert_eq!(
            mask_v6(a, 48),
            "fd12:3456:789a::".parse::<Ipv6Addr>().unwrap()
        );
    }
}
