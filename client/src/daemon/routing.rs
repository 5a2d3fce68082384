//! The host side of routed prefixes (the OS edge; decisions come from the agent's
//! `Event::SetRoutes`).
//!
//! - A device that reaches routed prefixes through peers gets a kernel route per prefix into
//!   the TUN (`ip route replace P dev TUN`), removed when the netmap drops it and when the
//!   session ends. Default routes (an exit node) are not installed here.
//! - A device that forwards (a subnet router or exit node with approved routes) turns IP
//!   forwarding on (the previous values are restored when it stops forwarding) and installs
//!   Ward's own nftables table `inet ward_routes`: traffic from the TUN is forwarded and
//!   masqueraded to the LAN (unless `WARD_SNAT_ROUTES=false`), traffic into the TUN is
//!   forwarded only as replies (conntrack established/related): LAN-initiated flows into the
//!   overlay are dropped. The table is deleted when forwarding stops and when the session ends.
//!   The data plane itself still checks every packet: only approved destinations, only flows
//!   the inbound filter's routed rules open.

use std::process::Command;

use tracing::{info, warn};
use ward_shared::routes::Prefix;

const NFT_TABLE: &str = "ward_routes";
const FORWARD_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// Kernel routes and forwarding state installed for routed prefixes.
pub(super) struct HostRouting {
    tun: Option<String>,
    routes: Vec<Prefix>,
    /// Previous values of the forwarding sysctls, while forwarding is on.
    forwarding: Option<Vec<(String, String)>>,
}

impl HostRouting {
    pub(super) fn new(tun: Option<String>) -> HostRouting {
        HostRouting {
            tun,
            routes: Vec::new(),
            forwarding: None,
        }
    }

    /// Installs kernel routes for `reached` and forwarding for `served`; undoes what is no
    /// longer wanted. Failures are logged; the data plane's own checks still hold.
    pub(super) fn apply(&mut self, served: &[Prefix], reached: &[Prefix]) {
        let Some(tun) = self.tun.clone() else { return };
        let want: Vec<Prefix> = reached
            .iter()
            .filter(|p| !p.is_default())
            .copied()
            .collect();
        for p in self.routes.clone() {
            if !want.contains(&p) {
                if let Err(e) = run("ip", &["route", "del", &p.to_string(), "dev", &tun]) {
                    warn!(prefix = %p, error = %e, "removing a routed prefix's kernel route failed");
                }
            }
        }
        self.routes.retain(|p| want.contains(p));
        for p in &want {
            if self.routes.contains(p) {
                continue;
            }
            match run("ip", &["route", "replace", &p.to_string(), "dev", &tun]) {
                Ok(()) => {
                    info!(prefix = %p, %tun, "routed prefix goes through the tunnel");
                    self.routes.push(*p);
                }
                Err(e) => {
                    warn!(prefix = %p, error = %e, "installing a routed prefix's kernel route failed")
                }
            }
        }
        match (served.is_empty(), self.forwarding.is_some()) {
            (false, false) => self.start_forwarding(&tun),
            (true, true) => self.stop_forwarding(),
            _ => {}
        }
    }

    /// Removes everything installed (session end, `ward down`, daemon exit).
    pub(super) fn clear(&mut self) {
        self.apply(&[], &[]);
    }

    fn start_forwarding(&mut self, tun: &str) {
        let mut saved = Vec::new();
        for path in FORWARD_SYSCTLS {
            let old = std::fs::read_to_string(path)
                .unwrap_or_default()
                .trim()
                .to_string();
            if let Err(e) = std::fs::write(path, "1") {
                warn!(path, error = %e, "turning IP forwarding on failed");
            }
            saved.push((path.to_string(), old));
        }
        let snat = std::env::var("WARD_SNAT_ROUTES").map_or(true, |v| v != "false");
        let masq = if snat {
            format!("iifname \"{tun}\" oifname != \"{tun}\" masquerade")
        } else {
            String::new()
        };
        let script = format!(
            "table inet {NFT_TABLE} {{\n\
             chain forward {{ type filter hook forward priority 0; policy accept;\n\
             iifname \"{tun}\" accept\n\
             oifname \"{tun}\" ct state established,related accept\n\
             oifname \"{tun}\" counter drop\n}}\n\
             chain postrouting {{ type nat hook postrouting priority 100; policy accept;\n\
             {masq}\n}}\n}}\n"
        );
        let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]);
        match nft_script(&script) {
            Ok(()) => info!(%tun, snat, "forwarding routed prefixes"),
            Err(e) => warn!(error = %e, "installing the forwarding rules failed"),
        }
        self.forwarding = Some(saved);
    }

    fn stop_forwarding(&mut self) {
        let _ = run("nft", &["delete", "table", "inet", NFT_TABLE]);
        for (path, old) in self.forwarding.take().unwrap_or_default() {
            if !old.is_empty() {
                let _ = std::fs::write(&path, old);
            }
        }
        info!("stopped forwarding routed prefixes");
    }
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn nft_script(script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
