//! The host side of routed prefixes and exit nodes (the OS edge; decisions come from the
//! agent's `Event::SetRoutes` and from `ward up --exit-node`).
//!
//! - A device that reaches routed prefixes through peers gets a kernel route per prefix into
//!   the TUN (`ip route replace P dev TUN`), removed when the netmap drops it and when the
//!   session ends.
//! - A device that uses an exit node sends all other traffic into the TUN through Ward's own
//!   routing table and policy rules, while Ward's marked sockets, the LAN and more specific
//!   routes stay outside it ([`plan`] has the design). The rules stay for as long as the user
//!   asks for the exit node, also when the exit node leaves the netmap (revoked, unapproved,
//!   denied): internet traffic is then dropped by the data plane (no peer carries the default
//!   route) rather than leaking around the tunnel. What is installed is written to
//!   `exit-routes.json` in the state dir before it is installed; leaving the exit node, `ward
//!   down`, daemon exit and, after a crash, the next daemon start ([`restore_leftover`]) remove
//!   it.
//! - A device that forwards (a subnet router or exit node with approved routes) turns IP
//!   forwarding on (the previous values are restored when it stops forwarding) and installs
//!   Ward's own nftables table `inet ward_routes`: traffic from the TUN is forwarded and
//!   masqueraded to the LAN or the internet (unless `WARD_SNAT_ROUTES=false`), traffic into
//!   the TUN is forwarded only as replies (conntrack established/related): flows from outside
//!   into the overlay are dropped. The table is deleted when forwarding stops and when the
//!   session ends. Turning forwarding on is first recorded in `forwarding.json` in the state
//!   dir (with the sysctls' previous values); after a crash the next daemon start deletes the
//!   table and puts the sysctls back ([`restore_leftover`]) before a session installs it anew. The data plane itself still checks every packet: only approved
//!   destinations, only flows the inbound filter's routed rules open.
//!
//! Every `ip`/`nft` command runs on tokio's blocking pool ([`HostRouting`] owns a worker task
//! that applies the latest wanted state), so a slow command never stalls the session loop.

pub(super) mod plan;

use std::process::Command;

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use tracing::{error, info, warn};
use ward_shared::routes::Prefix;

use plan::ExitItem;

const NFT_TABLE: &str = "ward_routes";
const FORWARD_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// The file in the state dir that lists the exit-node items installed (or being installed).
const EXIT_STATE: &str = "exit-routes.json";

/// The file in the state dir that says forwarding is on (the nftables table `inet
/// ward_routes` may be installed) and holds the forwarding sysctls' values from before.
const FORWARD_STATE: &str = "forwarding.json";

/// The record of forwarding turned on ([`FORWARD_STATE`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ForwardRecord {
    /// Each forwarding sysctl's path and its value before Ward turned it on.
    sysctls: Vec<(String, String)>,
}

/// What the session wants of the host: this device's approved routes (`served`), the routed
/// prefixes reached through peers (`reached`).
#[derive(Debug, Clone, Default)]
struct Wanted {
    served: Vec<Prefix>,
    reached: Vec<Prefix>,
}

/// The session loop's handle on the host's routing: [`HostRouting::apply`] hands the wanted
/// state to a worker task, which runs the commands on the blocking pool (newer wants replace
/// older ones not yet applied); [`HostRouting::clear`] removes everything and waits for it.
pub(super) struct HostRouting {
    tx: Option<mpsc::UnboundedSender<Wanted>>,
    worker: Option<tokio::task::JoinHandle<()>>,
}

impl HostRouting {
    /// Starts the worker; with `exit` (an exit node is chosen) it installs the exit node's
    /// routes and rules at once, before the first netmap: from `ward up --exit-node` on,
    /// internet traffic goes into the tunnel or nowhere.
    pub(super) fn start(tun: Option<String>, state_dir: PathBuf, exit: bool) -> HostRouting {
        let (tx, rx) = mpsc::unbounded_channel();
        let host = HostState::new(tun, state_dir, exit);
        let _ = tx.send(Wanted::default());
        HostRouting {
            tx: Some(tx),
            worker: Some(tokio::spawn(worker(host, rx))),
        }
    }

    /// Asks for kernel routes for `reached` and forwarding for `served` (applied in order,
    /// off the session loop).
    pub(super) fn apply(&self, served: &[Prefix], reached: &[Prefix]) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Wanted {
                served: served.to_vec(),
                reached: reached.to_vec(),
            });
        }
    }

    /// Removes everything installed (session end, `ward down`, daemon exit) and waits until
    /// it is done.
    pub(super) async fn clear(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.await {
                error!(error = %e, "the host routing worker failed; the next daemon start restores the exit node's rules");
            }
        }
    }
}

/// Applies the latest wanted state on the blocking pool until the session drops its sender,
/// then removes everything.
async fn worker(mut host: HostState, mut rx: mpsc::UnboundedReceiver<Wanted>) {
    while let Some(mut want) = rx.recv().await {
        while let Ok(newer) = rx.try_recv() {
            want = newer;
        }
        host = blocking(host, move |h| h.apply(&want.served, &want.reached)).await;
    }
    host.exit = false;
    let _ = blocking(host, |h| h.apply(&[], &[])).await;
}

/// Runs `f` on `host` on tokio's blocking pool. If the pool fails to run it, the state is
/// rebuilt from what the state dir says is installed (the exit node's items; prefix routes
/// are put back by the next apply).
async fn blocking(
    mut host: HostState,
    f: impl FnOnce(&mut HostState) + Send + 'static,
) -> HostState {
    let (tun, dir, exit) = (host.tun.clone(), host.state_dir.clone(), host.exit);
    match tokio::task::spawn_blocking(move || {
        f(&mut host);
        host
    })
    .await
    {
        Ok(h) => h,
        Err(e) => {
            error!(error = %e, "a host routing step failed");
            let mut h = HostState::new(tun, dir.clone(), exit);
            h.exit_items = read_exit_state(&dir).ok().flatten().unwrap_or_default();
            h
        }
    }
}

/// Kernel routes, exit-node rules and forwarding state installed for this session.
struct HostState {
    tun: Option<String>,
    state_dir: PathBuf,
    /// An exit node is chosen.
    exit: bool,
    routes: Vec<Prefix>,
    /// The exit node's items installed, in installation order.
    exit_items: Vec<ExitItem>,
    /// Previous values of the forwarding sysctls, while forwarding is on.
    forwarding: Option<Vec<(String, String)>>,
}

impl HostState {
    fn new(tun: Option<String>, state_dir: PathBuf, exit: bool) -> HostState {
        HostState {
            tun,
            state_dir,
            exit,
            routes: Vec::new(),
            exit_items: Vec::new(),
            forwarding: None,
        }
    }

    /// Installs kernel routes for `reached` and forwarding for `served`; undoes what is no
    /// longer wanted. Failures are logged; the data plane's own checks still hold.
    fn apply(&mut self, served: &[Prefix], reached: &[Prefix]) {
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
        self.apply_exit(&tun);
    }

    /// Brings the exit node's routes and rules to the plan: removals first (the diverting
    /// rule before the route it needs), then installs, each family's route before its rules.
    /// The state file lists every item that may be installed before any is (where it cannot
    /// be written they are installed all the same, with an error logged).
    fn apply_exit(&mut self, tun: &str) {
        let svm_on = std::fs::read_to_string(plan::SRC_VALID_MARK)
            .map(|v| v.trim() == "1")
            .unwrap_or(false);
        let want = plan::exit_plan(tun, self.exit, svm_on);
        let (remove, install) = plan::reconcile(&self.exit_items, &want);
        if remove.is_empty() && install.is_empty() {
            return;
        }
        let mut journal = self.exit_items.clone();
        journal.extend(install.iter().cloned());
        if let Err(e) = write_exit_state(&self.state_dir, &journal) {
            // Installed all the same (fail closed: the user asked for the tunnel); only a
            // crash before the next record would leave them for the operator to remove.
            error!(error = %format!("{e:#}"), "cannot record the exit node's routes in the state dir");
        }
        for item in &remove {
            if let Err(e) = perform(&item.remove()) {
                warn!(item = ?item, error = %e, "removing an exit-node route or rule failed");
            }
            self.exit_items.retain(|i| i != item);
        }
        let mut failed_route = Vec::new();
        for item in &install {
            if item.family().is_some_and(|f| failed_route.contains(&f)) {
                continue;
            }
            if matches!(
                item,
                ExitItem::Suppress { .. } | ExitItem::Divert { .. } | ExitItem::Connmark
            ) {
                // A rule or table a run could not record would otherwise be doubled.
                let _ = perform(&item.remove());
            }
            match perform(&item.install()) {
                Ok(()) => self.exit_items.push(item.clone()),
                Err(e) => {
                    warn!(item = ?item, error = %e, "installing an exit-node route or rule failed");
                    if let (ExitItem::Route { .. }, Some(f)) = (item, item.family()) {
                        // No rules that would divert into an empty table.
                        failed_route.push(f);
                    }
                }
            }
        }
        if let Err(e) = write_exit_state(&self.state_dir, &self.exit_items) {
            warn!(error = %format!("{e:#}"), "cannot update the record of the exit node's routes");
        }
        if self.exit_items.is_empty() {
            info!("internet traffic no longer goes through an exit node");
        } else {
            info!(%tun, items = self.exit_items.len(), "internet traffic goes into the tunnel, to the exit node");
        }
    }

    fn start_forwarding(&mut self, tun: &str) {
        let saved: Vec<(String, String)> = FORWARD_SYSCTLS
            .iter()
            .map(|path| {
                let old = std::fs::read_to_string(path).unwrap_or_default();
                (path.to_string(), old.trim().to_string())
            })
            .collect();
        // Recorded before anything is changed, so a killed run's table and sysctls are put
        // back at the next daemon start ([`restore_leftover`]).
        let record = ForwardRecord {
            sysctls: saved.clone(),
        };
        if let Err(e) = write_json(&self.state_dir, FORWARD_STATE, Some(&record)) {
            error!(error = %format!("{e:#}"), "cannot record the forwarding state in the state dir");
        }
        for path in FORWARD_SYSCTLS {
            if let Err(e) = std::fs::write(path, "1") {
                warn!(path, error = %e, "turning IP forwarding on failed");
            }
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
        restore_sysctls(&self.forwarding.take().unwrap_or_default());
        if let Err(e) = write_json::<ForwardRecord>(&self.state_dir, FORWARD_STATE, None) {
            warn!(error = %format!("{e:#}"), "cannot remove the record of the forwarding state");
        }
        info!("stopped forwarding routed prefixes");
    }
}

/// What a previous run left installed and [`restore_leftover`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leftover {
    /// Exit-node routes and rules listed in the record.
    pub exit_items: usize,
    /// Forwarding was on: the nftables table `inet ward_routes` was deleted and the
    /// forwarding sysctls put back.
    pub forwarding: bool,
}

/// Removes what a previous run recorded and did not remove (it was killed): the exit-node
/// routes and rules, and a forwarding device's nftables table and sysctls. Called once at
/// daemon start, before any session.
pub(crate) fn restore_leftover(state_dir: &Path) -> anyhow::Result<Leftover> {
    let mut left = Leftover::default();
    let forward = read_json::<ForwardRecord>(state_dir, FORWARD_STATE);
    if let Some(items) = read_exit_state(state_dir)? {
        for item in items.iter().rev() {
            if let Err(e) = perform(&item.remove()) {
                tracing::debug!(item = ?item, error = %e, "a recorded exit-node item was already gone");
            }
        }
        write_exit_state(state_dir, &[])?;
        left.exit_items = items.len();
    }
    if let Some(record) = forward? {
        if let Err(e) = run("nft", &["delete", "table", "inet", NFT_TABLE]) {
            tracing::debug!(error = %e, "the recorded forwarding table was already gone");
        }
        restore_sysctls(&record.sysctls);
        write_json::<ForwardRecord>(state_dir, FORWARD_STATE, None)?;
        left.forwarding = true;
    }
    Ok(left)
}

/// Puts the forwarding sysctls back to the values saved before forwarding was turned on
/// (only the known ones: a record is never a way to write elsewhere).
fn restore_sysctls(saved: &[(String, String)]) {
    for (path, old) in saved {
        if !FORWARD_SYSCTLS.contains(&path.as_str()) || !matches!(old.as_str(), "0" | "1") {
            warn!(
                path,
                value = old,
                "not restoring an unexpected forwarding sysctl record"
            );
            continue;
        }
        if let Err(e) = std::fs::write(path, old) {
            warn!(path, error = %e, "restoring a forwarding sysctl failed");
        }
    }
}

/// Reads a JSON record from the state dir (`None`: there is none).
fn read_json<T: serde::de::DeserializeOwned>(
    state_dir: &Path,
    name: &str,
) -> anyhow::Result<Option<T>> {
    use anyhow::Context;
    let path = state_dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{} is not a valid record", path.display()))
}

/// Writes a JSON record to the state dir atomically (a new file, synced, renamed over the
/// old); `None` removes it.
fn write_json<T: serde::Serialize>(
    state_dir: &Path,
    name: &str,
    value: Option<&T>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let path = state_dir.join(name);
    let Some(value) = value else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        };
    };
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let tmp = state_dir.join(format!("{name}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(value)?)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

fn read_exit_state(state_dir: &Path) -> anyhow::Result<Option<Vec<ExitItem>>> {
    read_json(state_dir, EXIT_STATE)
}

/// Writes the record atomically; an empty list removes it.
fn write_exit_state(state_dir: &Path, items: &[ExitItem]) -> anyhow::Result<()> {
    write_json(state_dir, EXIT_STATE, (!items.is_empty()).then_some(&items))
}

/// Runs one planned host command (blocking: only on the blocking pool or at start-up).
fn perform(action: &plan::Action) -> anyhow::Result<()> {
    use anyhow::Context;
    match action {
        plan::Action::Ip(args) => run("ip", &args.iter().map(String::as_str).collect::<Vec<_>>()),
        plan::Action::Nft(args) => run("nft", &args.iter().map(String::as_str).collect::<Vec<_>>()),
        plan::Action::NftScript(script) => nft_script(script),
        plan::Action::Sysctl { path, value } => {
            std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn the_forwarding_record_round_trips_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rec = ForwardRecord {
            sysctls: vec![(FORWARD_SYSCTLS[0].to_string(), "0".to_string())],
        };
        write_json(dir.path(), FORWARD_STATE, Some(&rec)).unwrap();
        let back: Option<ForwardRecord> = read_json(dir.path(), FORWARD_STATE).unwrap();
        assert_eq!(back, Some(rec));
        write_json::<ForwardRecord>(dir.path(), FORWARD_STATE, None).unwrap();
        assert!(!dir.path().join(FORWARD_STATE).exists());
        let none: Option<ForwardRecord> = read_json(dir.path(), FORWARD_STATE).unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn a_garbled_forwarding_record_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FORWARD_STATE), b"{\"sysctls\": 3").unwrap();
        assert!(read_json::<ForwardRecord>(dir.path(), FORWARD_STATE).is_err());
    }

    #[test]
    fn restoring_sysctls_writes_only_the_forwarding_ones_with_0_or_1() {
        // A record naming another file (or a strange value) must not make the daemon write
        // there: only the two forwarding sysctls, only "0" or "1".
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("not-a-sysctl");
        std::fs::write(&other, "keep").unwrap();
        let other_s = other.to_string_lossy().to_string();
        restore_sysctls(&[(other_s.clone(), "1".into()), (other_s, "0".into())]);
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep");
    }

    #[test]
    fn the_exit_record_is_empty_list_free() {
        let dir = tempfile::tempdir().unwrap();
        write_exit_state(dir.path(), &[ExitItem::Connmark]).unwrap();
        assert_eq!(
            read_exit_state(dir.path()).unwrap(),
            Some(vec![ExitItem::Connmark])
        );
        write_exit_state(dir.path(), &[]).unwrap();
        assert_eq!(read_exit_state(dir.path()).unwrap(), None);
    }
}
