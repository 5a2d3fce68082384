//! A control-plane load tool: one process opens N real device control sessions to a Ward
//! coordinator it starts on loopback, and measures what the coordinator does with them.
//!
//! Every session is a device enrolled for real (its own identity key, CSR and certificate,
//! through `control::Channel` and the coordinator's enrollment), holding a mutual-TLS QUIC
//! control session driven by the device's own protocol core (`agent::Agent`): hello, clock
//! pings, lease requests and key rotation, posture reports at the agent's cadence, netmaps and
//! deltas applied as the daemon applies them. Only the data plane is absent (no TUN, no
//! WireGuard): the agent's data-plane events are answered as a device with no traffic would.
//!
//! ```text
//! ward-coordinator init + serve (child; PID in WORK/coordinator.pid)
//! users, a dense policy (50 rules, groups covering most devices), multi-use tokens
//! enroll N devices (concurrency C)                      → enrollment rate
//! open N sessions (QUIC endpoints bound to 127.x.y.z)   → time until every first netmap
//! steady state                                          → coordinator CPU, message rates
//! policy apply (marker service changed)                 → per-session time to the new version
//! device revoke / device quarantine                     → time to the device and its peers
//! kill -9 + serve                                       → time until every session has a new netmap
//! ```
//!
//! Sessions are spread over QUIC endpoints (`--per-endpoint`, default 64 sessions per UDP
//! socket), each bound to its own loopback address (127.1.x.y): the coordinator's enrollment
//! gate gives each source address a burst of 128 attempts and 2 a second after that, so one
//! address would throttle the enrollment of thousands of devices. The coordinator keeps its
//! defaults; nothing is weakened for the test.
//!
//! Run through `bench/load.sh`; `--help` lists the options (each also an env var).

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

use ward_client::agent::{
    routes::RouteOptions, Agent, AgentConfig, DataPlaneEvent, Event, Now, PrivateKey,
};
use ward_client::control::{self, Channel};
use ward_shared::filter::FilterRule;
use ward_shared::peerset::PeerSet;
use ward_shared::posture::{Measured, PostureReport};
use ward_shared::token::EnrollToken;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, DeviceId, DeviceMsg, DeviceUpdate, EnrollRequest, Enrolled,
    Netmap, PeerRef, TokenSecret, PROTOCOL_VERSION,
};

/// jemalloc for the tool's heap. Its thousands of agents share one process (on a real network
/// each device has its own), and under glibc malloc about a third of the tool's CPU in the
/// measured phases went to malloc's free lists: CPU that the coordinator under test then
/// lacked on a small machine.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug, Clone)]
#[command(about = "Open N real device control sessions against a coordinator and measure it")]
struct Opts {
    /// Device sessions to open.
    #[arg(long, env = "WARD_LOAD_SESSIONS", default_value_t = 100)]
    sessions: usize,
    /// The `ward-coordinator` binary to run.
    #[arg(
        long,
        env = "WARD_LOAD_COORDINATOR",
        required_unless_present = "target"
    )]
    coordinator: Option<PathBuf>,
    /// An empty directory for the coordinator's data dir, its log and PID file.
    #[arg(long, env = "WARD_LOAD_WORK_DIR", required_unless_present = "target")]
    work_dir: Option<PathBuf>,
    /// Background-load mode: start no coordinator; enroll devices, one every
    /// `--enroll-every-ms`, up to `--sessions`, at this running coordinator (with the token in
    /// `--token-file`) and keep every enrolled device's session going (posture reports, lease
    /// requests and key rotations) for `--duration` seconds, then print what was sent.
    #[arg(long, env = "WARD_LOAD_TARGET", requires = "token_file")]
    target: Option<SocketAddr>,
    /// With --target: a file holding a multi-use enrollment token (first line).
    #[arg(long, env = "WARD_LOAD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// With --target: seconds to run.
    #[arg(long, env = "WARD_LOAD_DURATION", default_value_t = 60)]
    duration: u64,
    /// With --target: milliseconds between enrollment attempts.
    #[arg(long, env = "WARD_LOAD_ENROLL_EVERY_MS", default_value_t = 250)]
    enroll_every_ms: u64,
    /// With --target: the enrolled devices' hostnames are PREFIX-N.
    #[arg(long, env = "WARD_LOAD_NAME_PREFIX", default_value = "load")]
    name_prefix: String,
    /// With --target: append one line per enrollment outcome, written when it is known:
    /// `enrolled UNIX_MS TOOK_MS HOSTNAME DEVICE_NUMBER` for each enrollment the coordinator
    /// acknowledged, `failed UNIX_MS TOOK_MS HOSTNAME ERROR` for the others (UNIX_MS: when
    /// the outcome was known; TOOK_MS: how long the attempt took).
    #[arg(long, env = "WARD_LOAD_RECORD")]
    record: Option<PathBuf>,
    /// Coordinator replicas to start, all on the PostgreSQL database in `WARD_DATABASE_URL`
    /// (replica 1 made by `init`, the others by `export-instance` / `import-instance`, each
    /// serving on its own loopback port). Device N enrolls at, and keeps its session with,
    /// replica N mod R; admin commands go to replica 1. With 1 (the default) one coordinator
    /// runs, on SQLite unless `WARD_DATABASE_URL` is set.
    #[arg(long, env = "WARD_LOAD_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// Threads of a runtime of their own for the QUIC endpoints' drivers (packets, acks,
    /// keepalives, TLS handshakes), apart from the agents' work (netmap decoding, agent cores):
    /// a burst of agent work then cannot hold the connections' timers and acks back past their
    /// idle timeout. 0: on the agents' runtime, as a single device's daemon does.
    #[arg(long, env = "WARD_LOAD_QUIC_IO_THREADS", default_value_t = 1)]
    quic_io_threads: usize,
    /// Sessions per QUIC endpoint (one UDP socket, one loopback source address each).
    #[arg(long, env = "WARD_LOAD_PER_ENDPOINT", default_value_t = 64)]
    per_endpoint: usize,
    /// Enrollments in flight at once.
    #[arg(long, env = "WARD_LOAD_ENROLL_CONCURRENCY", default_value_t = 16)]
    enroll_concurrency: usize,
    /// Sessions started per second at most (the agents then connect, and reconnect, by
    /// themselves).
    #[arg(long, env = "WARD_LOAD_OPEN_RATE", default_value_t = 500)]
    open_rate: u64,
    /// Sessions opening at once (started, no first netmap yet) at first; the window then grows
    /// with every session that comes up and halves when sessions fail or drop (`Opener`).
    #[arg(long, env = "WARD_LOAD_OPEN_WINDOW", default_value_t = 32)]
    open_window: u64,
    /// The largest the opening window grows; 0: no window, sessions start at `--open-rate`
    /// whatever comes up.
    #[arg(long, env = "WARD_LOAD_OPEN_WINDOW_MAX", default_value_t = 1024)]
    open_window_max: u64,
    /// Users the devices belong to (round robin); the policy's groups are made of them.
    #[arg(long, env = "WARD_LOAD_USERS", default_value_t = 20)]
    users: usize,
    /// The protocol version the devices say they speak (1: agents that predate peer sets, whose
    /// netmaps list every source address in every rule; 2: peer sets, but a flat reach list,
    /// one entry per destination device; 3, the default: reach by reference).
    #[arg(long, env = "WARD_LOAD_PROTOCOL", default_value_t = PROTOCOL_VERSION)]
    protocol: u32,
    /// Sessions on demand (protocol 4, a device with more peers than the coordinator's
    /// `--peers-on-demand-above`, 256 by default) each ask for this many peers once their
    /// first netmap is in: the last two devices (those the revocation phase targets first)
    /// and the rest at random, as a device would by sending to them. 0: none.
    #[arg(long, env = "WARD_LOAD_WANTS", default_value_t = 0)]
    wants: usize,
    /// Rules in the dense policy.
    #[arg(long, env = "WARD_LOAD_RULES", default_value_t = 50)]
    rules: usize,
    /// Share of the users in each of the policy's ten groups, in percent.
    #[arg(long, env = "WARD_LOAD_GROUP_PERCENT", default_value_t = 70)]
    group_percent: usize,
    /// Each device sends a posture report at least this often (seconds); `ward daemon`'s
    /// default is 30.
    #[arg(long, env = "WARD_LOAD_POSTURE_INTERVAL", default_value_t = 30)]
    posture_interval: u64,
    /// Passed to `serve --lease-ttl` (keys rotate before their lease ends: lease requests).
    #[arg(long, env = "WARD_LOAD_LEASE_TTL", default_value = "10m")]
    lease_ttl: String,
    /// Seconds of steady state measured after every session is up.
    #[arg(long, env = "WARD_LOAD_STEADY", default_value_t = 10)]
    steady: u64,
    /// Devices revoked, and devices quarantined, one after the other.
    #[arg(long, env = "WARD_LOAD_REVOCATIONS", default_value_t = 3)]
    revocations: usize,
    /// The longest any phase may take (seconds) before it is reported incomplete. Sessions
    /// still opening when the open phase ends are stopped, so the phases after it measure a
    /// deployment that is not still joining.
    #[arg(long, env = "WARD_LOAD_PHASE_TIMEOUT", default_value_t = 120)]
    phase_timeout: u64,
    /// Skip the kill -9 + restart phase.
    #[arg(long, env = "WARD_LOAD_NO_RESTART")]
    no_restart: bool,
    /// Write every figure here as JSON.
    #[arg(long, env = "WARD_LOAD_JSON")]
    json: Option<PathBuf>,
    /// Fail (exit 1) unless every device enrolled, every session got every change, and the
    /// bounds below hold.
    #[arg(long, env = "WARD_LOAD_CHECK")]
    check: bool,
    /// With --check: the policy change's p99 (ms) must stay below this.
    #[arg(long, env = "WARD_LOAD_MAX_POLICY_P99_MS", default_value_t = 20_000)]
    max_policy_p99_ms: u64,
    /// With --check: every revocation must reach its device and peers within this (ms).
    #[arg(long, env = "WARD_LOAD_MAX_REVOKE_MS", default_value_t = 20_000)]
    max_revoke_ms: u64,
    /// With --check: every session must be back within this after the restart (ms).
    #[arg(long, env = "WARD_LOAD_MAX_RESYNC_MS", default_value_t = 90_000)]
    max_resync_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = Opts::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARD_LOAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    if opts.sessions == 0 || opts.per_endpoint == 0 || opts.users == 0 {
        bail!("--sessions, --per-endpoint and --users must be at least 1");
    }
    // Lives as long as the process (a runtime may not be dropped inside another): the
    // endpoints' drivers run on it.
    let io = match opts.quic_io_threads {
        0 => None,
        n => Some(
            Box::leak(Box::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(n)
                    .thread_name("quic-io")
                    .enable_all()
                    .build()
                    .context("starting the QUIC I/O runtime")?,
            ))
            .handle()
            .clone(),
        ),
    };
    let io = io.as_ref();
    if let Some(target) = opts.target {
        return background(&opts, target, io).await;
    }
    let mut coord = Cluster::start(&opts).await?;
    // Ctrl-C stops the run and the coordinators it started (no report: the phases are cut).
    let res = tokio::select! {
        r = run(&opts, &mut coord, io) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; the coordinators were stopped")),
    };
    coord.stop().await;
    let report = res?;
    println!("{}", report.table());
    if let Some(p) = &opts.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report.json)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if opts.check {
        if report.failures.is_empty() {
            println!("load check: PASS");
        } else {
            for f in &report.failures {
                println!("load check: FAIL {f}");
            }
            std::process::exit(1);
        }
    }
    Ok(())
}

// ---- the run ------------------------------------------------------------------------------

async fn run(
    opts: &Opts,
    coord: &mut Cluster,
    io: Option<&tokio::runtime::Handle>,
) -> Result<Report> {
    let mut rep = Report::new(opts);
    rep.note("load_before", loadavg());
    let cpu_start = coord.cpu_s();

    // Users, the dense policy, tokens.
    let users: Vec<String> = (0..opts.users).map(|u| format!("u{u:03}")).collect();
    for u in &users {
        coord.admin(&["user", "add", u]).await?;
    }
    let policy_path = work_dir(opts)?.join("policy.toml");
    std::fs::write(
        &policy_path,
        dense_policy(&users, opts.rules, opts.group_percent, 1),
    )?;
    coord
        .admin(&["policy", "apply", path_str(&policy_path)?])
        .await?;
    let per_user = opts.sessions.div_ceil(users.len()) + 1;
    let mut tokens = Vec::new();
    for u in &users {
        let t = coord
            .admin(&[
                "token",
                "create",
                "--user",
                u,
                "--uses",
                &per_user.to_string(),
                "--ttl",
                "2h",
            ])
            .await?;
        tokens.push(Arc::new(
            EnrollToken::parse(t.trim()).map_err(|e| anyhow!("token: {e}"))?,
        ));
    }
    let addrs = coord.addrs();

    // Endpoints, one source address each.
    let n_ep = opts.sessions.div_ceil(opts.per_endpoint);
    let mut endpoints = Vec::with_capacity(n_ep);
    for e in 0..n_ep {
        let ip = Ipv4Addr::new(127, 1, (e / 250) as u8, (e % 250 + 1) as u8);
        let ep = endpoint(SocketAddr::new(IpAddr::V4(ip), 0), io)
            .with_context(|| format!("binding a QUIC endpoint on {ip}"))?;
        endpoints.push(ep);
    }

    // Enrollment.
    eprintln!("load: enrolling {} devices", opts.sessions);
    let cpu0 = coord.cpu_s();
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(opts.enroll_concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..opts.sessions {
        let permit = sem.clone().acquire_owned().await?;
        let ep = endpoints[i / opts.per_endpoint].clone();
        let token = tokens[i % tokens.len()].clone();
        let addr = addrs[i % addrs.len()];
        set.spawn(async move {
            let r = enroll_retrying(&ep, addr, &token, &format!("load-{i}")).await;
            drop(permit);
            (i, r)
        });
    }
    let mut devices: Vec<Option<(Enrolled, String)>> = vec![None; opts.sessions];
    let mut enroll_errors = BTreeMap::<String, usize>::new();
    while let Some(j) = set.join_next().await {
        match j {
            Ok((i, Ok(d))) => devices[i] = Some(d),
            Ok((_, Err(e))) => *enroll_errors.entry(format!("{e:#}")).or_default() += 1,
            Err(e) => *enroll_errors.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    let enroll_s = t0.elapsed().as_secs_f64();
    let enrolled: Vec<(usize, Enrolled, String)> = devices
        .into_iter()
        .enumerate()
        .filter_map(|(i, d)| d.map(|(e, k)| (i, e, k)))
        .collect();
    let n = enrolled.len();
    rep.enroll(n, enroll_s, coord.cpu_s() - cpu0, &enroll_errors);
    if n == 0 {
        bail!("no device enrolled: {enroll_errors:?}");
    }

    // Sessions.
    eprintln!("load: opening {n} sessions");
    let shared = Arc::new(Shared {
        recs: (0..n).map(|_| Mutex::new(Rec::default())).collect(),
        watch: RwLock::new((0, BTreeSet::new())),
        posture_sent: AtomicU64::new(0),
        leases_asked: AtomicU64::new(0),
        pings: AtomicU64::new(0),
        msgs_sent: AtomicU64::new(0),
        up: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        drops: Mutex::new(BTreeMap::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let cpu0 = coord.cpu_s();
    let t_open = Instant::now();
    let mut sessions = tokio::task::JoinSet::new();
    let names: Vec<(DeviceId, String)> = enrolled
        .iter()
        .map(|(_, e, _)| (e.device_id, e.hostname.to_string()))
        .collect();
    let all_addrs: Vec<IpAddr> = enrolled
        .iter()
        .map(|(_, e, _)| IpAddr::V4(e.ipv4))
        .collect();
    let mut devs = enrolled.into_iter().enumerate();
    let timeout = Duration::from_secs(opts.phase_timeout);
    let mut opener = Opener::new(opts.open_window, opts.open_window_max, opts.open_rate, 0);
    let mut progress = Progress::new(coord.cpu_s(), self_cpu_s());
    let mut started = 0u64;
    let mut handles = Vec::new();
    let up = loop {
        let now_ms = t_open.elapsed().as_millis() as u64;
        let up_now = shared.up.load(Ordering::Relaxed);
        opener.observe(up_now, shared.ended.load(Ordering::Relaxed), now_ms);
        for _ in 0..opener.may_start(started, now_ms) {
            let Some((slot, (i, e, key_pem))) = devs.next() else {
                break;
            };
            let wants = wants_of(&all_addrs, slot, opts.wants);
            let dev = Dev {
                wants,
                slot,
                endpoint: endpoints[i / opts.per_endpoint].clone(),
                addr: addrs[i % addrs.len()],
                wg_port: 10_000 + (i % 50_000) as u16,
                posture_interval: Duration::from_secs(opts.posture_interval.max(1)),
                protocol: opts.protocol,
                enrolled: e,
                key_pem,
            };
            handles.push((
                slot,
                sessions.spawn(dev.run(shared.clone(), stop_rx.clone())),
            ));
            started += 1;
        }
        if progress.due() {
            eprintln!(
                "load: {}",
                progress.line(&shared, coord, n, started, opener.window())
            );
        }
        if up_now as usize >= n {
            break true;
        }
        if t_open.elapsed() > timeout {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The last line, unless one was printed a moment ago (its rates would be over no time).
    if progress.last.elapsed() >= Duration::from_secs(1) {
        eprintln!(
            "load: {}",
            progress.line(&shared, coord, n, started, opener.window())
        );
    }
    // Sessions still opening when the phase ends are stopped: left running, they would join
    // during the phases measured next (each join a change to its peers' netmaps, a TLS
    // handshake and a first netmap), so those would measure the end of the opening instead.
    let stopped: Vec<usize> = handles
        .iter()
        .filter(|(slot, _)| shared.get(*slot, |r| r.first_netmap_at.is_none()))
        .map(|(slot, h)| {
            h.abort();
            *slot
        })
        .collect();
    if !stopped.is_empty() {
        // An aborted task runs no further than the poll it may be in now.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for &slot in &stopped {
            shared.recs[slot]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .connected = false;
        }
        eprintln!(
            "load: stopped {} sessions not up when the open phase ended",
            stopped.len()
        );
    }
    let opens: Vec<Duration> = shared.collect(|r| r.first_netmap_at.map(|t| t - t_open));
    let first_bytes: Vec<u64> = shared.collect(|r| Some(r.first_netmap_bytes));
    let first_peers: Vec<u64> = shared.collect(|r| Some(r.first_netmap_peers));
    rep.open(
        n,
        up,
        &opens,
        t_open.elapsed().as_secs_f64(),
        coord.cpu_s() - cpu0,
        &first_bytes,
        &first_peers,
    );

    // Steady state.
    eprintln!("load: steady state for {} s", opts.steady);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = coord.cpu_s();
    let tool0 = self_cpu_s();
    let sent0 = shared.msgs_sent.load(Ordering::Relaxed);
    let posture0 = shared.posture_sent.load(Ordering::Relaxed);
    let bytes0: u64 = shared.sum(|r| r.bytes);
    let t_steady = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.steady)).await;
    let secs = t_steady.elapsed().as_secs_f64();
    rep.steady(
        secs,
        coord.cpu_s() - cpu0,
        self_cpu_s() - tool0,
        (shared.msgs_sent.load(Ordering::Relaxed) - sent0) as f64 / secs,
        (shared.posture_sent.load(Ordering::Relaxed) - posture0) as f64 / secs,
        (shared.sum(|r| r.bytes) - bytes0) as f64 / secs,
        coord.rss(),
    );

    // A policy change that reaches every device (the marker service covers all of them).
    eprintln!("load: policy change");
    // The sessions up now are the ones measured: a device that connects later gets the new
    // policy in its first netmap, which says nothing about the change's fan-out.
    let measured: Vec<bool> = shared
        .recs
        .iter()
        .map(|r| {
            let r = r.lock().unwrap_or_else(|p| p.into_inner());
            r.connected && r.revoked_at.is_none()
        })
        .collect();
    let live = measured.iter().filter(|m| **m).count();
    let v0 = shared.max(|r| r.policy_version.unwrap_or(0));
    std::fs::write(
        &policy_path,
        dense_policy(&users, opts.rules, opts.group_percent, 2),
    )?;
    let nm0: u64 = shared.sum(|r| r.netmap_bytes);
    let cpu0 = coord.cpu_s();
    let t_pol = Instant::now();
    coord
        .admin(&["policy", "apply", path_str(&policy_path)?])
        .await?;
    let apply_ms = t_pol.elapsed().as_secs_f64() * 1e3;
    let reached = |i: usize| measured[i] && shared.get(i, |r| r.policy_version.unwrap_or(0) > v0);
    let done = wait_for(timeout, || {
        (0..measured.len()).filter(|&i| reached(i)).count() >= live
    })
    .await;
    let lat: Vec<Duration> = (0..measured.len())
        .filter(|&i| reached(i))
        .filter_map(|i| {
            shared.get(i, |r| {
                r.policy_at.map(|t| t.saturating_duration_since(t_pol))
            })
        })
        .collect();
    rep.policy(
        live,
        done,
        apply_ms,
        &lat,
        (shared.sum(|r| r.netmap_bytes) - nm0) as f64 / live.max(1) as f64,
        coord.cpu_s() - cpu0,
    );

    // Peers on demand: from a session's wants to the last wanted peer in its netmap.
    if opts.wants > 0 {
        let asked = shared.count(|r| r.wants_at.is_some());
        let lat: Vec<Duration> = shared.collect(|r| {
            r.wants_done_at
                .zip(r.wants_at)
                .map(|(d, a)| d.saturating_duration_since(a))
        });
        let (p50, p99, max) = pct(&lat);
        eprintln!(
            "load: wants: {asked} sessions asked for {} peers each; {} got them all, p50 {p50:.0} ms p99 {p99:.0} ms max {max:.0} ms",
            opts.wants,
            lat.len()
        );
        rep.set(
            "wants",
            serde_json::json!({"per_session": opts.wants, "sessions_asked": asked,
                "sessions_served": lat.len(), "p50_ms": p50, "p99_ms": p99, "max_ms": max}),
        );
        rep.row(
            "peers on demand: wants → every wanted peer held",
            format!(
                "{} of {asked} sessions, p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
                lat.len()
            ),
        );
    }

    // Revocations and quarantines: each target's own session, and its peers' deltas. The
    // targets are the last devices whose sessions are up (a device that never came up would
    // only show how long the phase waits).
    let k = opts.revocations.min(n / 4);
    let (mut up, down): (Vec<usize>, Vec<usize>) = (0..n)
        .rev()
        .partition(|&i| shared.get(i, |r| r.connected && r.revoked_at.is_none()));
    up.extend(down);
    for (what, targets) in [
        ("revoke", up[..k].to_vec()),
        ("quarantine", up[k..2 * k].to_vec()),
    ] {
        let mut own = Vec::new();
        let mut peers = Vec::new();
        let mut commands = Vec::new();
        let mut enforced = Vec::new();
        let (mut expected, mut reached, mut admitted) = (0usize, 0usize, 0usize);
        for &t in &targets {
            eprintln!("load: {what} {}", names[t].1);
            let (id, name) = (names[t].0, names[t].1.clone());
            let (gen, exp) = shared.arm_watch(id).await;
            let start = Instant::now();
            let args: Vec<&str> = match what {
                "revoke" => vec!["device", "revoke", &name],
                _ => vec!["device", "quarantine", &name, "--reason", "load test"],
            };
            coord.admin(&args).await?;
            commands.push(start.elapsed());
            // The device itself: closed as revoked, or told it is quarantined (its verdict).
            let own_done = |s: &Shared| match what {
                "revoke" => s.get(t, |r| r.revoked_at.is_some()),
                _ => s.get(t, |r| r.quarantined_at.is_some()),
            };
            wait_for(timeout, || {
                own_done(&shared) && shared.count(|r| r.touched_gen == gen) >= exp
            })
            .await;
            let own_at = match what {
                "revoke" => shared.get(t, |r| r.revoked_at),
                _ => shared.get(t, |r| r.quarantined_at),
            };
            if let Some(a) = own_at {
                own.push(a.saturating_duration_since(start));
            }
            let p: Vec<Duration> = shared.collect(|r| {
                (r.touched_gen == gen && r.watch_peer_gen == gen)
                    .then(|| r.touched_at.map(|a| a.saturating_duration_since(start)))
                    .flatten()
            });
            // Sessions that were reconnecting when the watch was armed looked later: they count
            // as expected too.
            expected += exp.max(shared.count(|r| r.watch_peer_gen == gen));
            reached += p.len();
            peers.extend(p);
            let e: Vec<Duration> = shared.collect(|r| {
                (r.admits_gen == gen && r.enforced_gen == gen)
                    .then(|| r.enforced_at.map(|a| a.saturating_duration_since(start)))
                    .flatten()
            });
            admitted += shared.count(|r| r.admits_gen == gen);
            enforced.extend(e);
        }
        let times = Narrowed {
            own,
            commands,
            peers,
            enforced,
            admitted,
        };
        rep.revocation(what, targets.len(), &times, expected, reached);
    }

    // Restart: kill -9, start again, every live session resyncs by itself.
    if !opts.no_restart {
        eprintln!("load: kill -9 and restart");
        let live = shared.count(|r| r.connected && r.revoked_at.is_none());
        rep.before_restart(coord.cpu_s() - cpu_start, coord.rss(), self_cpu_s());
        rep.replicas(&coord.per_replica());
        let t_kill = Instant::now();
        coord.kill().await;
        coord.serve(opts).await?;
        let up_ms = t_kill.elapsed().as_secs_f64() * 1e3;
        let cpu0 = coord.cpu_s();
        let done = wait_for(timeout, || {
            shared.count(|r| r.revoked_at.is_none() && r.last_full_netmap_at > Some(t_kill)) >= live
        })
        .await;
        // The first end of each session after the kill, and whether a stateless reset told it.
        let first_end = |r: &Rec| r.ends.iter().find(|(at, _)| *at > t_kill).copied();
        let noticed: Vec<Duration> = shared.collect(|r| first_end(r).map(|(at, _)| at - t_kill));
        let by_reset = shared.count(|r| first_end(r).is_some_and(|(_, reset)| reset));
        let back: Vec<Duration> = shared.collect(|r| {
            r.last_full_netmap_at
                .filter(|a| *a > t_kill)
                .map(|a| a - t_kill)
        });
        // Each session asks for a lease on its key once its netmap is in; a fresh one is sent
        // again, not replaced (a new lease would go to every peer).
        let after = |at: Option<Instant>| at.is_some_and(|a| a > t_kill);
        let leased = || shared.count(|r| after(r.lease_kept_at) || after(r.lease_reissued_at));
        wait_for(Duration::from_secs(10), || leased() >= back.len()).await;
        let leases = (
            shared.count(|r| after(r.lease_kept_at)),
            shared.count(|r| after(r.lease_reissued_at)),
        );
        // The resynced sessions' first netmaps: their size, and how many left out what the
        // agent held.
        let firsts: Vec<(u64, bool)> = shared.collect(|r| {
            after(r.last_full_netmap_at).then_some((r.last_full_netmap_bytes, r.last_full_resumed))
        });
        rep.restart(
            live,
            done,
            up_ms,
            (&noticed, by_reset),
            &back,
            &firsts,
            leases,
            coord.cpu_s() - cpu0,
            coord.rss(),
        );
    } else {
        rep.before_restart(coord.cpu_s() - cpu_start, coord.rss(), self_cpu_s());
        rep.replicas(&coord.per_replica());
    }

    let _ = stop_tx.send(true);
    let stop_by = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(stop_by);
    loop {
        tokio::select! {
            j = sessions.join_next() => if j.is_none() { break },
            _ = &mut stop_by => { sessions.abort_all(); break }
        }
    }
    for ep in &endpoints {
        ep.close(0u32.into(), b"done");
    }
    rep.drops(&shared.drops.lock().unwrap_or_else(|p| p.into_inner()));
    rep.totals(
        shared.posture_sent.load(Ordering::Relaxed),
        shared.leases_asked.load(Ordering::Relaxed),
        shared.pings.load(Ordering::Relaxed),
        shared.sum(|r| r.rotations),
    );
    rep.note("load_after", loadavg());
    Ok(rep)
}

/// Whether a session's error is QUIC's stateless reset from the coordinator.
fn by_reset(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        matches!(
            e.downcast_ref::<quinn::ConnectionError>(),
            Some(quinn::ConnectionError::Reset)
        )
    })
}

// ---- opening sessions at the pace they come up ----------------------------------------------

/// A failure wave halves the window at most once in this long (the sessions of one wave fail
/// over a few hundred milliseconds; each would otherwise halve it again).
const OPENER_CUT_GAP_MS: u64 = 1_000;
/// The window never shrinks below this.
const OPENER_MIN_WINDOW: f64 = 8.0;

/// Paces session starts by what comes up (I/O-free: counts and times come in). At most
/// `window` sessions are opening at once (started, first netmap not arrived) and at most
/// `rate` start a second. The window grows by one for each session that comes up (it doubles
/// every round, as TCP's slow start) until the first failure, then by 1/window for each (one
/// a round); sessions failing to open or dropping halve it, at most once per
/// [`OPENER_CUT_GAP_MS`], never below [`OPENER_MIN_WINDOW`]. So the opens in flight track what
/// the coordinator and this process complete, instead of piling handshakes up past their
/// timeouts (which then fail and retry in waves).
#[derive(Debug)]
struct Opener {
    window: f64,
    max: f64,
    /// Above this the window grows additively; lowered by every cut.
    threshold: f64,
    rate: f64,
    tokens: f64,
    at_ms: u64,
    up: u64,
    ended: u64,
    last_cut_ms: Option<u64>,
}

impl Opener {
    /// `max` 0: no window (only the rate bounds starts).
    fn new(initial: u64, max: u64, rate: u64, now_ms: u64) -> Self {
        let max = if max == 0 { f64::INFINITY } else { max as f64 };
        let rate = rate.max(1) as f64;
        Opener {
            window: (initial as f64).clamp(OPENER_MIN_WINDOW, max.max(OPENER_MIN_WINDOW)),
            max: max.max(OPENER_MIN_WINDOW),
            threshold: f64::INFINITY,
            rate,
            tokens: Self::burst(rate),
            at_ms: now_ms,
            up: 0,
            ended: 0,
            last_cut_ms: None,
        }
    }

    /// Starts allowed at once: a twentieth of a second's worth (the caller polls more often).
    fn burst(rate: f64) -> f64 {
        (rate / 20.0).max(1.0)
    }

    fn window(&self) -> f64 {
        self.window
    }

    /// Totals so far: sessions up (first netmap), and sessions that ended or failed to open.
    fn observe(&mut self, up: u64, ended: u64, now_ms: u64) {
        let new_up = up.saturating_sub(self.up);
        let new_ended = ended.saturating_sub(self.ended);
        self.up = self.up.max(up);
        self.ended = self.ended.max(ended);
        if new_ended > 0
            && self
                .last_cut_ms
                .is_none_or(|t| now_ms >= t + OPENER_CUT_GAP_MS)
        {
            self.window = (self.window / 2.0).max(OPENER_MIN_WINDOW);
            self.threshold = self.window;
            self.last_cut_ms = Some(now_ms);
            return;
        }
        for _ in 0..new_up.min(1 << 20) {
            self.window += if self.window < self.threshold {
                1.0
            } else {
                1.0 / self.window
            };
        }
        self.window = self.window.min(self.max);
    }

    /// How many sessions may start now, `started` having started so far (taken from the rate).
    fn may_start(&mut self, started: u64, now_ms: u64) -> u64 {
        let dt = now_ms.saturating_sub(self.at_ms) as f64;
        self.at_ms = self.at_ms.max(now_ms);
        self.tokens = (self.tokens + dt * self.rate / 1000.0).min(Self::burst(self.rate));
        let opening = started.saturating_sub(self.up) as f64;
        let room = (self.window.floor() - opening).max(0.0);
        let k = room.min(self.tokens.floor());
        self.tokens -= k;
        k as u64
    }
}

/// Progress lines while sessions open (every [`PROGRESS_EVERY`]): what came up since the last
/// line, the drops and their most frequent reason, both processes' CPU and the coordinator's RSS.
struct Progress {
    last: Instant,
    started: Instant,
    up: u64,
    coord_cpu: f64,
    tool_cpu: f64,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(coord_cpu: f64, tool_cpu: f64) -> Self {
        Progress {
            last: Instant::now(),
            started: Instant::now(),
            up: 0,
            coord_cpu,
            tool_cpu,
        }
    }

    fn due(&self) -> bool {
        self.last.elapsed() >= PROGRESS_EVERY
    }

    fn line(
        &mut self,
        shared: &Shared,
        coord: &Cluster,
        n: usize,
        started: u64,
        window: f64,
    ) -> String {
        let secs = self.last.elapsed().as_secs_f64().max(1e-3);
        let up = shared.up.load(Ordering::Relaxed);
        let (coord_cpu, tool_cpu) = (coord.cpu_s(), self_cpu_s());
        let (top, drops) = {
            let d = shared.drops.lock().unwrap_or_else(|p| p.into_inner());
            let top = d
                .iter()
                .max_by_key(|(_, c)| **c)
                .map(|(w, c)| format!(" (most: {c}× {w})"))
                .unwrap_or_default();
            (top, d.values().sum::<usize>())
        };
        let rss = coord.rss();
        let line = format!(
            "open {:.0} s: {started} of {n} started, {up} up (+{:.0}/s), window {window:.0}, \
             {drops} drops{top}; coordinator {:.0}% cpu, {:.0} MiB; tool {:.0}% cpu",
            self.started.elapsed().as_secs_f64(),
            up.saturating_sub(self.up) as f64 / secs,
            (coord_cpu - self.coord_cpu) / secs * 100.0,
            rss.1,
            (tool_cpu - self.tool_cpu) / secs * 100.0,
        );
        *self = Progress {
            last: Instant::now(),
            started: self.started,
            up,
            coord_cpu,
            tool_cpu,
        };
        line
    }
}

/// Polls `done` every 50 ms until it holds or `timeout` passes; whether it held.
async fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- the dense policy (shared with `netmap_bench --load-shape`) --------------------------

#[path = "../../bench/dense_policy.rs"]
mod dense;
use dense::dense_policy;

fn work_dir(opts: &Opts) -> Result<&Path> {
    opts.work_dir
        .as_deref()
        .context("--work-dir is needed unless --target is given")
}

// ---- background load against a running coordinator ----------------------------------------

/// `--target`: enrollments at a steady pace and the enrolled devices' sessions, for a set time,
/// against a coordinator someone else runs (a lab's replica). Every enrollment outcome is
/// appended to `--record` as soon as it is known, so a test can hold the coordinator to every
/// enrollment it acknowledged, whatever happens to it afterwards.
async fn background(
    opts: &Opts,
    target: SocketAddr,
    io: Option<&tokio::runtime::Handle>,
) -> Result<()> {
    let path = opts
        .token_file
        .as_ref()
        .context("--target needs --token-file")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = Arc::new(
        EnrollToken::parse(text.lines().next().unwrap_or("").trim())
            .map_err(|e| anyhow!("token: {e}"))?,
    );
    let mut record = match &opts.record {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => None,
    };
    let ep = endpoint(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0), io)
        .context("binding a QUIC endpoint")?;
    let shared = Arc::new(Shared {
        recs: (0..opts.sessions)
            .map(|_| Mutex::new(Rec::default()))
            .collect(),
        watch: RwLock::new((0, BTreeSet::new())),
        posture_sent: AtomicU64::new(0),
        leases_asked: AtomicU64::new(0),
        pings: AtomicU64::new(0),
        msgs_sent: AtomicU64::new(0),
        up: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        drops: Mutex::new(BTreeMap::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let end = tokio::time::Instant::now() + Duration::from_secs(opts.duration);
    let mut pace = tokio::time::interval(Duration::from_millis(opts.enroll_every_ms.max(1)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut attempts = tokio::task::JoinSet::new();
    let mut sessions = tokio::task::JoinSet::new();
    let (mut started, mut enrolled, mut failed) = (0usize, 0usize, 0usize);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            // SIGINT ends the run early, with the summary.
            _ = tokio::signal::ctrl_c() => break,
            _ = pace.tick(), if started < opts.sessions => {
                let (ep, token) = (ep.clone(), token.clone());
                let host = format!("{}-{started}", opts.name_prefix);
                let slot = started;
                attempts.spawn(async move {
                    let t0 = Instant::now();
                    let r = tokio::time::timeout(
                        Duration::from_secs(15),
                        enroll(&ep, target, &token, &host),
                    )
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("no answer within 15 s")));
                    (slot, host, r, t0.elapsed().as_millis())
                });
                started += 1;
            }
            Some(j) = attempts.join_next(), if !attempts.is_empty() => {
                let Ok((slot, host, r, took)) = j else { continue };
                let line = match r {
                    Ok((e, key_pem)) => {
                        enrolled += 1;
                        let line = format!("enrolled {} {took} {host} {}\n", ward_runtime::now_ms(), e.device_id.0);
                        let dev = Dev {
                            // The background load against replicas asks for no peers.
                            wants: Vec::new(),
                            slot,
                            endpoint: ep.clone(),
                            addr: target,
                            wg_port: 10_000 + (slot % 50_000) as u16,
                            posture_interval: Duration::from_secs(opts.posture_interval.max(1)),
                            protocol: opts.protocol,
                            enrolled: e,
                            key_pem,
                        };
                        sessions.spawn(dev.run(shared.clone(), stop_rx.clone()));
                        line
                    }
                    Err(err) => {
                        failed += 1;
                        let msg = format!("{err:#}").replace('\n', " ");
                        format!("failed {} {took} {host} {msg}\n", ward_runtime::now_ms())
                    }
                };
                if let Some(f) = record.as_mut() {
                    use std::io::Write;
                    f.write_all(line.as_bytes()).context("writing the record")?;
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    let rotations = shared.sum(|r| r.rotations);
    let connected = shared.count(|r| r.connected);
    println!(
        "load: {started} enrollments tried, {enrolled} acknowledged, {failed} failed; \
         {connected} sessions connected at the end; {} posture reports, {} lease requests, \
         {rotations} key rotations",
        shared.posture_sent.load(Ordering::Relaxed),
        shared.leases_asked.load(Ordering::Relaxed),
    );
    Ok(())
}

// ---- QUIC endpoints -----------------------------------------------------------------------

/// A client endpoint bound to `addr`; with `io`, its drivers, timers and socket on that runtime.
fn endpoint(addr: SocketAddr, io: Option<&tokio::runtime::Handle>) -> Result<quinn::Endpoint> {
    let Some(io) = io else {
        return Ok(quinn::Endpoint::client(addr)?);
    };
    let socket = std::net::UdpSocket::bind(addr)?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(IoRuntime(io.clone())),
    )?)
}

/// quinn's tokio runtime, with everything it spawns and registers on one given runtime.
#[derive(Debug)]
struct IoRuntime(tokio::runtime::Handle);

impl quinn::Runtime for IoRuntime {
    fn new_timer(&self, at: Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        let _in = self.0.enter();
        quinn::Runtime::new_timer(&quinn::TokioRuntime, at)
    }

    fn spawn(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _in = self.0.enter();
        quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)
    }
}

// ---- enrollment ---------------------------------------------------------------------------

/// Enrolls through the control channel's own code (`Channel`, the pinned-CA config), over a
/// shared endpoint; a busy coordinator is tried again.
async fn enroll_retrying(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    token: &EnrollToken,
    hostname: &str,
) -> Result<(Enrolled, String)> {
    let mut last = None;
    for attempt in 0..5u32 {
        match enroll(ep, addr, token, hostname).await {
            Ok(d) => return Ok(d),
            Err(e) => {
                if e.downcast_ref::<control::Refused>()
                    .is_some_and(|r| r.code != wire::ErrorCode::Internal)
                {
                    return Err(e);
                }
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no attempt made")))
}

async fn enroll(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    token: &EnrollToken,
    hostname: &str,
) -> Result<(Enrolled, String)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let mut ch = Channel::open(ep, control::enroll_config(token.ca_sha256)?, addr).await?;
    ch.send(&DeviceMsg::Enroll(EnrollRequest {
        protocol: PROTOCOL_VERSION,
        token_id: token.id_hex(),
        token_secret: TokenSecret(Bytes(token.secret.expose().to_vec())),
        hostname: hostname.to_string(),
        os: "linux".into(),
        csr_der: Bytes(csr.der().to_vec()),
    }))
    .await?;
    let reply = tokio::time::timeout(control::CONNECT_TIMEOUT, ch.recv())
        .await
        .map_err(|_| anyhow!("the coordinator did not answer the enrollment"))??;
    ch.close("enrolled");
    match reply {
        Some(CoordinatorMsg::Enrolled(e)) => {
            if Sha256::digest(&e.ca_der.0).as_slice() != token.ca_sha256 {
                bail!("the coordinator sent a CA that does not match the token");
            }
            Ok((e, key.serialize_pem()))
        }
        Some(CoordinatorMsg::Error { code, message }) => {
            Err(control::Refused { code, message }.into())
        }
        Some(other) => bail!("unexpected answer: {}", control::msg_type(&other)),
        None => bail!("the coordinator closed the connection without answering"),
    }
}

// ---- one device's session -----------------------------------------------------------------

/// What the measurements read from each session (one lock per session, taken briefly).
#[derive(Default)]
struct Rec {
    connected: bool,
    first_netmap_at: Option<Instant>,
    first_netmap_bytes: u64,
    first_netmap_peers: u64,
    last_full_netmap_at: Option<Instant>,
    /// The size of the last full netmap, and whether it was resumed (left out the peers the
    /// agent held).
    last_full_netmap_bytes: u64,
    last_full_resumed: bool,
    last_netmap_at: Option<Instant>,
    netmap_msgs: u64,
    /// Bytes of every coordinator message on the stream (length prefix + JSON).
    bytes: u64,
    /// Of `bytes`, netmaps and deltas.
    netmap_bytes: u64,
    policy_version: Option<u64>,
    policy_at: Option<Instant>,
    revoked_at: Option<Instant>,
    /// When a verdict naming a quarantine first arrived.
    quarantined_at: Option<Instant>,
    disconnected_at: Option<Instant>,
    /// Each time the session ended on an error or a close: when, and whether by a QUIC
    /// stateless reset (the coordinator that lost the connection said so).
    ends: Vec<(Instant, bool)>,
    rotations: u64,
    /// The watch generation whose device this session had as a peer when it was armed.
    watch_peer_gen: u64,
    /// The watch generation for which a delta mentioning the watched device arrived, and when.
    touched_gen: u64,
    touched_at: Option<Instant>,
    /// The watch generation this session has looked at.
    seen_gen: u64,
    /// The watch generation for which this session's inbound filter let the watched device
    /// in when it was armed, that device's addresses, and when the filter stopped letting it
    /// in (the peer enforcing the narrowing, whatever else its netmap still holds).
    admits_gen: u64,
    admits_addrs: Vec<IpAddr>,
    enforced_gen: u64,
    enforced_at: Option<Instant>,
    /// The last lease the session was sent: (serial, key).
    lease: Option<(u64, [u8; 32])>,
    /// When this session on demand asked for its peers, how many, and when the last arrived.
    wants_at: Option<Instant>,
    wants_asked: usize,
    wants_done_at: Option<Instant>,
    /// When the session was last sent the lease it held (the same serial), or a new lease on
    /// the key it held (another serial).
    lease_kept_at: Option<Instant>,
    lease_reissued_at: Option<Instant>,
}

struct Shared {
    recs: Vec<Mutex<Rec>>,
    /// (generation, devices watched): deltas that remove or change one are timed.
    watch: RwLock<(u64, BTreeSet<DeviceId>)>,
    posture_sent: AtomicU64,
    leases_asked: AtomicU64,
    pings: AtomicU64,
    msgs_sent: AtomicU64,
    /// Sessions whose first netmap arrived.
    up: AtomicU64,
    /// Sessions that ended or failed to open (the sum of `drops`).
    ended: AtomicU64,
    /// Why sessions ended or failed to open, counted ("open: …", "send: …", "recv: …",
    /// "closed by the coordinator"; device-specific parts as the error gives them).
    drops: Mutex<BTreeMap<String, usize>>,
}

impl Shared {
    fn get<T>(&self, i: usize, f: impl FnOnce(&Rec) -> T) -> T {
        f(&self.recs[i].lock().unwrap_or_else(|p| p.into_inner()))
    }
    fn count(&self, f: impl Fn(&Rec) -> bool) -> usize {
        self.recs
            .iter()
            .filter(|r| f(&r.lock().unwrap_or_else(|p| p.into_inner())))
            .count()
    }
    fn sum(&self, f: impl Fn(&Rec) -> u64) -> u64 {
        self.recs
            .iter()
            .map(|r| f(&r.lock().unwrap_or_else(|p| p.into_inner())))
            .sum()
    }
    fn max(&self, f: impl Fn(&Rec) -> u64) -> u64 {
        self.recs
            .iter()
            .map(|r| f(&r.lock().unwrap_or_else(|p| p.into_inner())))
            .max()
            .unwrap_or(0)
    }
    fn collect<T>(&self, f: impl Fn(&Rec) -> Option<T>) -> Vec<T> {
        self.recs
            .iter()
            .filter_map(|r| f(&r.lock().unwrap_or_else(|p| p.into_inner())))
            .collect()
    }
    fn drop_seen(&self, why: String) {
        self.ended.fetch_add(1, Ordering::Relaxed);
        *self
            .drops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(why)
            .or_default() += 1;
    }
    fn watching(&self) -> (u64, bool) {
        let w = self.watch.read().unwrap_or_else(|p| p.into_inner());
        (w.0, !w.1.is_empty())
    }
    fn watched(&self, id: DeviceId) -> Option<u64> {
        let w = self.watch.read().unwrap_or_else(|p| p.into_inner());
        w.1.contains(&id).then_some(w.0)
    }
    /// Watches `id` under a new generation; waits until every live session has looked
    /// whether it holds `id` as a peer (each does at its next tick, within 250 ms). Returns
    /// the generation and how many sessions hold it.
    async fn arm_watch(&self, id: DeviceId) -> (u64, usize) {
        let gen = {
            let mut w = self.watch.write().unwrap_or_else(|p| p.into_inner());
            w.0 += 1;
            w.1 = BTreeSet::from([id]);
            w.0
        };
        wait_for(Duration::from_secs(5), || {
            self.count(|r| r.connected && r.revoked_at.is_none() && r.seen_gen < gen) == 0
        })
        .await;
        (gen, self.count(|r| r.watch_peer_gen == gen))
    }
}

struct Dev {
    /// The peers this session asks for once it is on demand.
    wants: Vec<IpAddr>,
    slot: usize,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    wg_port: u16,
    posture_interval: Duration,
    protocol: u32,
    enrolled: Enrolled,
    key_pem: String,
}

type Opening = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Channel>> + Send>>;

impl Dev {
    /// The daemon's session loop (`daemon/session.rs`) without a data plane: the agent core
    /// decides everything; this only carries messages and answers its events.
    async fn run(self, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
        let e = &self.enrolled;
        let cfg = match control::session_config(&e.ca_der.0, &e.cert_der.0, &self.key_pem) {
            Ok(c) => c,
            Err(err) => {
                eprintln!("load: {}: no session config: {err:#}", e.hostname);
                return;
            }
        };
        let mut agent = Agent::new(
            AgentConfig {
                device_id: e.device_id,
                ipv4: e.ipv4,
                ipv6: e.ipv6,
                lease_key: ward_shared::lease::issuer_key(&e.lease_key.0),
                private_key: PrivateKey(rand::random()),
                cert_not_after_ms: e.cert_not_after_ms,
                posture_interval: self.posture_interval,
                os: "linux".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                seed: rand::random(),
                routes: RouteOptions::default(),
                protocol: self.protocol,
            },
            now(),
        );
        let mut channel: Option<Channel> = None;
        let mut opening: Option<Opening> = None;
        let rec = &shared.recs[self.slot];
        let lock = || rec.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // Events first (some feed the agent inputs), then what it queued to send.
            while let Some(ev) = agent.poll_event() {
                match ev {
                    Event::Connect => {
                        channel = None;
                        let (ep, cfg, addr) = (self.endpoint.clone(), cfg.clone(), self.addr);
                        opening =
                            Some(Box::pin(async move { Channel::open(&ep, cfg, addr).await }));
                    }
                    Event::CloseSession => {
                        if let Some(ch) = channel.take() {
                            ch.close("closing");
                        }
                    }
                    Event::Connected { .. } => lock().connected = true,
                    Event::Disconnected { revoked, .. } => {
                        let mut r = lock();
                        r.connected = false;
                        r.disconnected_at = Some(Instant::now());
                        if revoked {
                            r.revoked_at = Some(Instant::now());
                        }
                    }
                    Event::NeedKey => agent.provide_key(PrivateKey(rand::random())),
                    Event::NeedCsr => match csr(&self.key_pem) {
                        Ok(der) => agent.handle_csr(der),
                        Err(err) => eprintln!("load: {}: csr: {err:#}", e.hostname),
                    },
                    Event::NeedUpdate => {
                        let u = self.update(&agent);
                        agent.handle_local_update(u);
                    }
                    Event::CollectPosture {
                        seq,
                        clock_offset_ms,
                        ..
                    } => {
                        let at = ward_runtime::now_ms() + clock_offset_ms;
                        let mut r = PostureReport::unknown(e.device_id, seq, at);
                        r.firewall = Measured::value(at, true);
                        agent.handle_posture(r, now());
                    }
                    Event::TakeFlowSamples => agent.handle_dataplane_event(
                        DataPlaneEvent::FlowSamples {
                            samples: Vec::new(),
                            dropped: 0,
                        },
                        now(),
                    ),
                    Event::SwitchKey { .. } => lock().rotations += 1,
                    // No data plane, no relays: nothing to configure or probe.
                    Event::SetPeers(_)
                    | Event::UpdatePeers(_)
                    | Event::SetFilter { .. }
                    | Event::SetRoutes { .. }
                    | Event::SetShadowFilter(_)
                    | Event::SetClockOffset(_)
                    | Event::SaveCert { .. }
                    | Event::SaveCoordinators { .. }
                    | Event::SelfName(_)
                    | Event::TakeDeniedFlows
                    | Event::ResolveRelay(_)
                    | Event::SendDiscovery { .. }
                    | Event::Relay(_)
                    | Event::SetRelays(_)
                    | Event::Punch { .. }
                    | Event::NetworkChanged
                    | Event::SetOnDemand(_)
                    | Event::RefusePeer(_)
                    | Event::RefuseName(_) => {}
                }
            }
            if lock().revoked_at.is_some() {
                // The device left the network, as `ward daemon` does; nothing more to measure.
                return;
            }
            while let Some(msg) = agent.poll_transmit() {
                match &msg {
                    DeviceMsg::Posture(_) => shared.posture_sent.fetch_add(1, Ordering::Relaxed),
                    DeviceMsg::LeaseRequest { .. } => {
                        shared.leases_asked.fetch_add(1, Ordering::Relaxed)
                    }
                    DeviceMsg::Ping { .. } => shared.pings.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                let Some(ch) = channel.as_mut() else { continue };
                shared.msgs_sent.fetch_add(1, Ordering::Relaxed);
                if let Err(err) = ch.send(&msg).await {
                    channel = None;
                    lock().ends.push((Instant::now(), by_reset(&err)));
                    shared.drop_seen(format!("send: {err:#}"));
                    agent.handle_disconnected(Some(format!("{err:#}")), now());
                }
            }
            let deadline = agent.poll_timeout();
            // The `expect`s cannot fire: each branch runs only while its option is `Some`.
            let step = tokio::select! {
                _ = stop.changed() => Step::Stop,
                res = async { opening.as_mut().expect("guarded").await }, if opening.is_some() => Step::Opened(res),
                msg = async { channel.as_mut().expect("guarded").recv_sized().await }, if channel.is_some() => Step::Msg(msg),
                _ = tokio::time::sleep_until(deadline.into()) => Step::Tick,
            };
            match step {
                Step::Stop => break,
                Step::Opened(res) => {
                    opening = None;
                    match res {
                        Ok(ch) => {
                            channel = Some(ch);
                            let u = self.update(&agent);
                            agent.handle_connected(u, now());
                        }
                        Err(err) => {
                            shared.drop_seen(format!("open: {err:#}"));
                            agent.handle_disconnected(Some(format!("{err:#}")), now())
                        }
                    }
                }
                Step::Msg(Ok(Some((m, size)))) => {
                    if let CoordinatorMsg::Error { code, message } = &m {
                        shared.drop_seen(format!("coordinator error {code:?}: {message}"));
                    }
                    let at = Instant::now();
                    self.observe(&shared, &m, size as u64, at);
                    let netmap_msg = matches!(
                        m,
                        CoordinatorMsg::Netmap(_) | CoordinatorMsg::NetmapDelta(_)
                    );
                    agent.handle_coordinator_msg(m, now());
                    let on_demand = agent.netmap().is_some_and(|n| n.on_demand);
                    if on_demand && !self.wants.is_empty() && lock().wants_at.is_none() {
                        let by: Vec<PeerRef> =
                            self.wants.iter().map(|a| PeerRef::Addr(*a)).collect();
                        let mut r = lock();
                        r.wants_at = Some(Instant::now());
                        r.wants_asked = by.len();
                        drop(r);
                        agent.handle_dataplane_event(DataPlaneEvent::PeersWanted(by), now());
                    }
                    if netmap_msg && on_demand {
                        let held = agent.netmap().map_or(0, |n| {
                            n.peers
                                .iter()
                                .filter(|p| self.wants.contains(&IpAddr::V4(p.ipv4)))
                                .count()
                        });
                        let mut r = lock();
                        if r.wants_at.is_some()
                            && r.wants_done_at.is_none()
                            && held >= r.wants_asked
                        {
                            r.wants_done_at = Some(at);
                        }
                    }
                    let v = agent.netmap().and_then(|n| n.policy_version);
                    let mut r = lock();
                    if netmap_msg {
                        let (gen, active) = shared.watching();
                        if active
                            && r.admits_gen == gen
                            && r.enforced_gen != gen
                            && !lets_in(agent.netmap(), &r.admits_addrs)
                        {
                            r.enforced_gen = gen;
                            r.enforced_at = Some(at);
                        }
                    }
                    if v != r.policy_version {
                        r.policy_version = v;
                        r.policy_at = Some(at);
                    }
                }
                Step::Msg(Ok(None)) => {
                    channel = None;
                    lock().ends.push((Instant::now(), false));
                    shared.drop_seen("closed by the coordinator".into());
                    agent.handle_disconnected(None, now());
                }
                Step::Msg(Err(err)) => {
                    channel = None;
                    lock().ends.push((Instant::now(), by_reset(&err)));
                    shared.drop_seen(format!("recv: {err:#}"));
                    agent.handle_disconnected(Some(format!("{err:#}")), now());
                }
                Step::Tick => {
                    let now = now();
                    agent.handle_dataplane_event(DataPlaneEvent::PeersOnOldKey(0), now);
                    agent.handle_tick(now);
                    let (gen, active) = shared.watching();
                    let seen = lock().seen_gen;
                    if active && seen < gen {
                        let w = shared
                            .watch
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .1
                            .clone();
                        let addrs: Vec<IpAddr> = agent
                            .netmap()
                            .map(|n| {
                                n.peers
                                    .iter()
                                    .filter(|p| w.contains(&p.device_id))
                                    .flat_map(|p| [IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)])
                                    .collect()
                            })
                            .unwrap_or_default();
                        let admits = admits_any(agent.netmap(), &addrs);
                        let mut r = lock();
                        r.seen_gen = gen;
                        if !addrs.is_empty() {
                            r.watch_peer_gen = gen;
                        }
                        if admits {
                            r.admits_gen = gen;
                            r.admits_addrs = addrs;
                        }
                    }
                }
            }
        }
        if let Some(ch) = channel.take() {
            ch.close("stopping");
        }
    }

    /// Counts one coordinator message of `size` bytes on the stream into this session's
    /// record.
    fn observe(&self, shared: &Shared, m: &CoordinatorMsg, size: u64, at: Instant) {
        let mut touched = None;
        if let CoordinatorMsg::NetmapDelta(d) = m {
            for id in d.remove.iter().chain(d.upsert.iter().map(|p| &p.device_id)) {
                if let Some(gen) = shared.watched(*id) {
                    touched = Some(gen);
                }
            }
        }
        let mut r = shared.recs[self.slot]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        r.bytes += size;
        match m {
            CoordinatorMsg::Netmap(nm) => {
                r.netmap_bytes += size;
                r.netmap_msgs += 1;
                r.connected = true;
                r.last_netmap_at = Some(at);
                r.last_full_netmap_at = Some(at);
                r.last_full_netmap_bytes = size;
                r.last_full_resumed = nm.resumed.is_some();
                if r.first_netmap_at.is_none() {
                    if self.slot == 0 {
                        if let Some(path) = std::env::var_os("WARD_LOAD_DUMP_NETMAP") {
                            // For reading what a netmap is made of: the first one of session 0.
                            let _ = std::fs::write(
                                path,
                                serde_json::to_vec_pretty(nm).unwrap_or_default(),
                            );
                        }
                    }
                    r.first_netmap_at = Some(at);
                    shared.up.fetch_add(1, Ordering::Relaxed);
                    r.first_netmap_bytes = size;
                    r.first_netmap_peers = nm.peers.len() as u64;
                }
            }
            CoordinatorMsg::NetmapDelta(_) => {
                r.netmap_bytes += size;
                r.netmap_msgs += 1;
                r.last_netmap_at = Some(at);
            }
            CoordinatorMsg::PostureVerdict(v) if v.quarantine.is_some() => {
                r.quarantined_at.get_or_insert(at);
            }
            CoordinatorMsg::Lease { lease } => {
                let (serial, key) = (lease.lease.serial, lease.lease.wg_public_key.0);
                match r.lease {
                    Some((s, k)) if k == key && s == serial => r.lease_kept_at = Some(at),
                    Some((_, k)) if k == key => r.lease_reissued_at = Some(at),
                    _ => {}
                }
                r.lease = Some((serial, key));
            }
            _ => {}
        }
        if let Some(gen) = touched {
            if r.touched_gen != gen {
                r.touched_gen = gen;
                r.touched_at = Some(at);
            }
        }
    }

    /// What `hello` and `update` carry: the agent's current key, a port, one endpoint.
    fn update(&self, agent: &Agent) -> DeviceUpdate {
        let ip = self
            .endpoint
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        DeviceUpdate {
            wg_public_key: Some(agent.public_key()),
            wg_port: self.wg_port,
            local_endpoints: vec![SocketAddr::new(ip, self.wg_port)],
            ..DeviceUpdate::default()
        }
    }
}

// One value per turn of a session's loop, moved once: the largest variant's size does not matter.
#[allow(clippy::large_enum_variant)]
enum Step {
    Stop,
    Opened(Result<Channel>),
    Msg(Result<Option<(CoordinatorMsg, usize)>>),
    Tick,
}

/// Whether a device with `addrs` can still open flows to this one: it is still a peer and
/// the inbound filter still lets it in.
fn lets_in(nm: Option<&Netmap>, addrs: &[IpAddr]) -> bool {
    let peer = nm.is_some_and(|n| {
        n.peers
            .iter()
            .any(|p| addrs.contains(&IpAddr::V4(p.ipv4)) || addrs.contains(&IpAddr::V6(p.ipv6)))
    });
    peer && admits_any(nm, addrs)
}

/// Whether a netmap's inbound filter lets any of `addrs` in as a source (on any port).
fn admits_any(nm: Option<&Netmap>, addrs: &[IpAddr]) -> bool {
    nm.is_some_and(|nm| admits(&nm.inbound, &nm.peer_sets, addrs))
}

/// Whether `inbound` (naming `sets`) lets any of `addrs` in as a source: what
/// `peerset::rule_has_source` says of each rule and address, in one pass over the sets.
fn admits(inbound: &[FilterRule], sets: &[PeerSet], addrs: &[IpAddr]) -> bool {
    use ward_shared::peerset::{contains, contains_sorted};
    let addrs: Vec<IpAddr> = addrs.iter().map(|a| a.to_canonical()).collect();
    // Each set looked at once (rules share sets), by binary search when it is sorted (as the
    // protocol keeps them), not copied into a book per check.
    let holding: Vec<u32> = sets
        .iter()
        .filter(|s| {
            let sorted = s.prefixes.is_sorted();
            addrs.iter().any(|ip| match sorted {
                true => contains_sorted(&s.prefixes, *ip),
                false => contains(&s.prefixes, *ip),
            })
        })
        .map(|s| s.id)
        .collect();
    inbound.iter().any(|r| {
        r.source_sets.iter().any(|id| holding.contains(id))
            || r.sources.iter().any(|s| addrs.contains(&s.to_canonical()))
    })
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_ms: ward_runtime::now_ms(),
    }
}

fn csr(key_pem: &str) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::from_pem(key_pem)?;
    Ok(rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .der()
        .to_vec())
}

// ---- the coordinator process --------------------------------------------------------------

struct Coordinator {
    bin: PathBuf,
    data_dir: PathBuf,
    work_dir: PathBuf,
    addr: SocketAddr,
    /// 0 for the first (its log coordinator.log, PID in coordinator.pid), N for replica N+1.
    index: usize,
    /// Serve on `addr` exactly (replicas share a host; one coordinator keeps the default).
    listen: bool,
    child: Option<tokio::process::Child>,
    pid: u32,
    /// CPU seconds of processes already gone (killed), so totals span restarts.
    cpu_before: f64,
}

/// The coordinator processes of a run: one, or `--replicas` on one PostgreSQL database.
struct Cluster {
    nodes: Vec<Coordinator>,
}

impl Cluster {
    async fn start(opts: &Opts) -> Result<Self> {
        let r = opts.replicas.max(1);
        if r > 1 && std::env::var_os("WARD_DATABASE_URL").is_none() {
            bail!("--replicas {r} needs WARD_DATABASE_URL (the PostgreSQL database they share)");
        }
        let work_dir = work_dir(opts)?.to_path_buf();
        let bin = opts
            .coordinator
            .clone()
            .context("--coordinator is needed unless --target is given")?;
        // Ports picked up front: replica 1's `init` carries every address.
        let mut addrs = Vec::with_capacity(r);
        for _ in 0..r {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        let mut nodes: Vec<Coordinator> = addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| Coordinator {
                bin: bin.clone(),
                data_dir: work_dir.join(if i == 0 {
                    "coordinator".to_string()
                } else {
                    format!("replica-{}", i + 1)
                }),
                work_dir: work_dir.clone(),
                addr,
                index: i,
                listen: r > 1,
                child: None,
                pid: 0,
                cpu_before: 0.0,
            })
            .collect();
        let list = addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let first = &nodes[0];
        run_checked(
            tokio::process::Command::new(&bin)
                .args(["init", "--data-dir"])
                .arg(&first.data_dir)
                .args(["--public-addr", &list]),
            "init",
        )
        .await?;
        if r > 1 {
            let file = work_dir.join("instance.json");
            run_checked(
                tokio::process::Command::new(&bin)
                    .arg("--data-dir")
                    .arg(&first.data_dir)
                    .arg("export-instance")
                    .arg(&file),
                "export-instance",
            )
            .await?;
            for n in &nodes[1..] {
                run_checked(
                    tokio::process::Command::new(&bin)
                        .arg("--data-dir")
                        .arg(&n.data_dir)
                        .arg("import-instance")
                        .arg(&file),
                    "import-instance",
                )
                .await?;
            }
        }
        for n in &mut nodes {
            n.serve(opts).await?;
        }
        Ok(Cluster { nodes })
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// Admin commands go to the first replica (the others share its database).
    async fn admin(&self, args: &[&str]) -> Result<String> {
        self.nodes[0].admin(args).await
    }

    /// CPU seconds of every replica together.
    fn cpu_s(&self) -> f64 {
        self.nodes.iter().map(|n| n.cpu_s()).sum()
    }

    /// (peak RSS, current RSS) in MiB, each summed over the replicas (one process: its own).
    fn rss(&self) -> (f64, f64) {
        self.nodes
            .iter()
            .map(|n| n.rss())
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// (address, CPU seconds, peak RSS MiB) of each replica.
    fn per_replica(&self) -> Vec<(SocketAddr, f64, f64)> {
        self.nodes
            .iter()
            .map(|n| (n.addr, n.cpu_s(), n.rss().0))
            .collect()
    }

    async fn kill(&mut self) {
        for n in &mut self.nodes {
            n.kill().await;
        }
    }

    async fn serve(&mut self, opts: &Opts) -> Result<()> {
        for n in &mut self.nodes {
            n.serve(opts).await?;
        }
        Ok(())
    }

    async fn stop(&mut self) {
        for n in &mut self.nodes {
            n.stop().await;
        }
    }
}

async fn run_checked(cmd: &mut tokio::process::Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running the coordinator's {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Coordinator {
    /// Starts `serve` (its PID in WORK/coordinator.pid) and waits for its admin socket.
    async fn serve(&mut self, opts: &Opts) -> Result<()> {
        let name = match self.index {
            0 => "coordinator".to_string(),
            i => format!("replica-{}", i + 1),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work_dir.join(format!("{name}.log")))?;
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(["serve", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--lease-ttl", &opts.lease_ttl]);
        if self.listen {
            cmd.args(["--listen", &self.addr.to_string()]);
        }
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting the coordinator")?;
        self.pid = child
            .id()
            .ok_or_else(|| anyhow!("the coordinator exited at once"))?;
        self.child = Some(child);
        std::fs::write(
            self.work_dir.join(format!("{name}.pid")),
            self.pid.to_string(),
        )?;
        let ok = wait_for_async(Duration::from_secs(30), || async {
            self.admin(&["device", "ls", "--json"]).await.is_ok()
        })
        .await;
        if !ok {
            bail!("the coordinator did not come up (see its log)");
        }
        Ok(())
    }

    /// Runs an admin command; its stdout.
    async fn admin(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "ward-coordinator {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn cpu_s(&self) -> f64 {
        self.cpu_before + proc_cpu_s(&format!("/proc/{}/stat", self.pid)).unwrap_or(0.0)
    }

    /// (peak RSS, current RSS) in MiB of the running process.
    fn rss(&self) -> (f64, f64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let kib = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0)
    }

    async fn kill(&mut self) {
        self.cpu_before = self.cpu_s();
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first: a clean shutdown.
            // SAFETY: kill(2) on our own child's PID, which `c` has not reaped yet.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(5), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
        let name = match self.index {
            0 => "coordinator".to_string(),
            i => format!("replica-{}", i + 1),
        };
        let _ = std::fs::remove_file(self.work_dir.join(format!("{name}.pid")));
    }
}

async fn wait_for_async<F, Fut>(timeout: Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + timeout;
    loop {
        if done().await {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// utime + stime of a /proc/PID/stat file, in seconds.
fn proc_cpu_s(path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based, `man 5 proc`).
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

fn self_cpu_s() -> f64 {
    proc_cpu_s("/proc/self/stat").unwrap_or(0.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))
}

// ---- the report ---------------------------------------------------------------------------

struct Report {
    rows: Vec<(String, String)>,
    json: serde_json::Value,
    failures: Vec<String>,
    check: Opts,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (p50, p99, max) in ms; zeros for none.
/// How long a revocation or quarantine took: to the device, for the admin command alone,
/// and to each peer session.
struct Narrowed {
    own: Vec<Duration>,
    commands: Vec<Duration>,
    /// Peer sessions that got a delta naming the device (a removal, or its new lease).
    peers: Vec<Duration>,
    /// Peer sessions whose filter let the device in when the command was given, and when each
    /// stopped letting it in (the device gone from its peers, or its addresses from the filter).
    enforced: Vec<Duration>,
    admitted: usize,
}

/// The peers session `slot` asks for on demand: the last two devices, then others at random
/// (seeded by the slot), never itself; at most `k`.
fn wants_of(all: &[IpAddr], slot: usize, k: usize) -> Vec<IpAddr> {
    let n = all.len();
    let mut out: Vec<IpAddr> = Vec::new();
    let mut x = (slot as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut tries = 0;
    for i in (0..n).rev().take(2).chain(std::iter::from_fn(|| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Some((x % n.max(1) as u64) as usize)
    })) {
        tries += 1;
        if out.len() >= k || tries > 4 * k + 4 {
            break;
        }
        if i != slot && !out.contains(&all[i]) {
            out.push(all[i]);
        }
    }
    out
}

fn pct(v: &[Duration]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut s = v.to_vec();
    s.sort();
    let at = |q: f64| ms(s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1]);
    (at(0.50), at(0.99), ms(s[s.len() - 1]))
}

impl Report {
    fn new(opts: &Opts) -> Self {
        let mut r = Report {
            rows: Vec::new(),
            json: serde_json::json!({}),
            failures: Vec::new(),
            check: opts.clone(),
        };
        r.set("sessions_asked", opts.sessions.into());
        r.set("per_endpoint", opts.per_endpoint.into());
        r.set("rules", opts.rules.into());
        r.set("group_percent", opts.group_percent.into());
        r.set("users", opts.users.into());
        r.set("posture_interval_s", opts.posture_interval.into());
        r.set("protocol", opts.protocol.into());
        r.set("lease_ttl", opts.lease_ttl.clone().into());
        r.set("replica_count", opts.replicas.max(1).into());
        r
    }

    fn set(&mut self, k: &str, v: serde_json::Value) {
        if let Some(o) = self.json.as_object_mut() {
            o.insert(k.into(), v);
        }
    }

    fn row(&mut self, k: &str, v: String) {
        self.rows.push((k.into(), v));
    }

    fn note(&mut self, k: &str, v: String) {
        self.row(k, v.clone());
        self.set(k, v.into());
    }

    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    fn enroll(&mut self, n: usize, secs: f64, cpu: f64, errors: &BTreeMap<String, usize>) {
        let rate = n as f64 / secs.max(1e-9);
        self.row(
            "enrolled",
            format!(
                "{n} of {} in {secs:.1} s ({rate:.0}/s)",
                self.check.sessions
            ),
        );
        self.row("enroll coordinator cpu", format!("{cpu:.1} s"));
        for (e, c) in errors {
            self.row("enroll error", format!("{c}× {e}"));
        }
        self.set(
            "enroll",
            serde_json::json!({"enrolled": n, "secs": secs, "per_sec": rate,
                "coordinator_cpu_s": cpu, "errors": errors}),
        );
        if n < self.check.sessions {
            self.fail(format!(
                "only {n} of {} devices enrolled",
                self.check.sessions
            ));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        n: usize,
        all: bool,
        opens: &[Duration],
        secs: f64,
        cpu: f64,
        bytes: &[u64],
        peers: &[u64],
    ) {
        let (p50, p99, max) = pct(opens);
        let avg = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        self.row(
            "sessions up",
            format!(
                "{} of {n}; first netmap after start p50 {p50:.0} ms p99 {p99:.0} ms max {max:.0} ms",
                opens.len()
            ),
        );
        self.row(
            "first netmap",
            format!(
                "{:.0} bytes, {:.0} peers per session (mean)",
                avg(bytes),
                avg(peers)
            ),
        );
        self.row(
            "open coordinator cpu",
            format!("{cpu:.1} s over {secs:.1} s"),
        );
        self.set(
            "open",
            serde_json::json!({"up": opens.len(), "all": all, "p50_ms": p50, "p99_ms": p99,
                "max_ms": max, "secs": secs, "coordinator_cpu_s": cpu,
                "netmap_bytes_mean": avg(bytes), "peers_mean": avg(peers)}),
        );
        if !all {
            self.fail(format!("only {} of {n} sessions came up", opens.len()));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn steady(
        &mut self,
        secs: f64,
        cpu: f64,
        tool_cpu: f64,
        msgs: f64,
        posture: f64,
        bytes: f64,
        rss: (f64, f64),
    ) {
        self.row(
            "steady state",
            format!(
                "coordinator {:.0}% of a core; {msgs:.0} msgs/s in ({posture:.1} posture/s), {:.0} KB/s out; tool {:.0}% of a core",
                cpu / secs * 100.0,
                bytes / 1e3,
                tool_cpu / secs * 100.0
            ),
        );
        self.row(
            "coordinator rss",
            format!("{:.0} MiB (peak {:.0})", rss.1, rss.0),
        );
        self.set(
            "steady",
            serde_json::json!({"secs": secs, "coordinator_cpu_s": cpu, "tool_cpu_s": tool_cpu,
                "msgs_per_sec": msgs, "posture_per_sec": posture, "bytes_out_per_sec": bytes,
                "rss_mib": rss.1, "peak_rss_mib": rss.0}),
        );
    }

    fn policy(
        &mut self,
        live: usize,
        all: bool,
        apply_ms: f64,
        lat: &[Duration],
        bytes_per_session: f64,
        cpu: f64,
    ) {
        let (p50, p99, max) = pct(lat);
        self.row(
            "policy change",
            format!(
                "{} of {live} sessions: p50 {p50:.0} ms p99 {p99:.0} ms max {max:.0} ms (apply command {apply_ms:.0} ms)",
                lat.len()
            ),
        );
        self.row(
            "policy change netmap",
            format!("{bytes_per_session:.0} bytes per session; coordinator cpu {cpu:.1} s"),
        );
        self.set(
            "policy_change",
            serde_json::json!({"sessions": live, "reached": lat.len(), "all": all,
                "p50_ms": p50, "p99_ms": p99, "max_ms": max, "apply_command_ms": apply_ms,
                "netmap_bytes_per_session": bytes_per_session, "coordinator_cpu_s": cpu}),
        );
        if !all {
            self.fail(format!(
                "the policy change reached {} of {live} sessions",
                lat.len()
            ));
        }
        if p99 > self.check.max_policy_p99_ms as f64 {
            self.fail(format!(
                "policy change p99 {p99:.0} ms > {} ms",
                self.check.max_policy_p99_ms
            ));
        }
    }

    fn revocation(
        &mut self,
        what: &str,
        targets: usize,
        times: &Narrowed,
        expected: usize,
        reached: usize,
    ) {
        let own = &times.own;
        let (o50, o99, omax) = pct(own);
        let (p50, p99, pmax) = pct(&times.peers);
        let (_, _, cmax) = pct(&times.commands);
        self.row(
            &format!("{what}: device"),
            format!(
                "{} of {targets}: p50 {o50:.0} ms p99 {o99:.0} ms max {omax:.0} ms (command {cmax:.0} ms at most)",
                own.len()
            ),
        );
        let (e50, e99, emax) = pct(&times.enforced);
        let enforced = times.enforced.len();
        let admitted = times.admitted;
        self.row(
            &format!("{what}: enforced"),
            format!("{enforced} of {admitted} peer sessions that let it in: p50 {e50:.0} ms p99 {e99:.0} ms max {emax:.0} ms"),
        );
        self.row(
            &format!("{what}: peers"),
            format!("{reached} of {expected} peer sessions told of it: p50 {p50:.0} ms p99 {p99:.0} ms max {pmax:.0} ms"),
        );
        self.set(
            what,
            serde_json::json!({"targets": targets, "device_reached": own.len(),
                "device_p50_ms": o50, "device_p99_ms": o99, "device_max_ms": omax,
                "command_max_ms": cmax,
                "enforcing_sessions": admitted, "enforced": enforced,
                "enforced_p50_ms": e50, "enforced_p99_ms": e99, "enforced_max_ms": emax,
                "peer_sessions": expected, "peers_reached": reached,
                "peers_p50_ms": p50, "peers_p99_ms": p99, "peers_max_ms": pmax}),
        );
        if own.len() < targets || reached < expected || enforced < admitted {
            self.fail(format!(
                "{what}: reached {} of {targets} devices, {reached} of {expected} peer sessions, enforced at {enforced} of {admitted}",
                own.len()
            ));
        }
        let worst = omax.max(pmax).max(emax);
        if worst > self.check.max_revoke_ms as f64 {
            self.fail(format!(
                "{what}: slowest {worst:.0} ms > {} ms",
                self.check.max_revoke_ms
            ));
        }
    }

    fn before_restart(&mut self, cpu: f64, rss: (f64, f64), tool_cpu: f64) {
        self.row(
            "coordinator total",
            format!(
                "{cpu:.1} cpu s, peak rss {:.0} MiB; tool {tool_cpu:.1} cpu s",
                rss.0
            ),
        );
        self.set(
            "coordinator_total",
            serde_json::json!({"cpu_s": cpu, "peak_rss_mib": rss.0, "rss_mib": rss.1,
                "tool_cpu_s": tool_cpu}),
        );
    }

    /// Each replica's own CPU and peak RSS (a row per replica when there are several).
    fn replicas(&mut self, per: &[(SocketAddr, f64, f64)]) {
        if per.len() > 1 {
            for (i, (addr, cpu, peak)) in per.iter().enumerate() {
                self.row(
                    &format!("replica {}", i + 1),
                    format!("{addr}: {cpu:.1} cpu s, peak rss {peak:.0} MiB"),
                );
            }
        }
        self.set(
            "replicas",
            serde_json::Value::Array(
                per.iter()
                    .map(|(addr, cpu, peak)| {
                        serde_json::json!({"addr": addr.to_string(), "cpu_s": cpu,
                            "peak_rss_mib": peak})
                    })
                    .collect(),
            ),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn restart(
        &mut self,
        live: usize,
        all: bool,
        up_ms: f64,
        (noticed, by_reset): (&[Duration], usize),
        back: &[Duration],
        firsts: &[(u64, bool)],
        (kept, reissued): (usize, usize),
        cpu: f64,
        rss: (f64, f64),
    ) {
        let (n50, n99, nmax) = pct(noticed);
        let (b50, b99, bmax) = pct(back);
        self.row(
            "restart",
            format!("kill -9 to admin socket up {up_ms:.0} ms"),
        );
        self.row(
            "restart: noticed",
            format!(
                "{} sessions ({by_reset} by a stateless reset): p50 {n50:.0} ms p99 {n99:.0} ms max {nmax:.0} ms",
                noticed.len()
            ),
        );
        self.row(
            "restart: resynced",
            format!(
                "{} of {live}: p50 {b50:.0} ms p99 {b99:.0} ms max {bmax:.0} ms after kill",
                back.len()
            ),
        );
        let resumed = firsts.iter().filter(|(_, r)| *r).count();
        let bytes_mean =
            firsts.iter().map(|(b, _)| *b as f64).sum::<f64>() / firsts.len().max(1) as f64;
        self.row(
            "restart: first netmaps",
            format!(
                "{resumed} of {} resumed (left out the peers the agent held), mean {:.1} KB",
                firsts.len(),
                bytes_mean / 1e3
            ),
        );
        self.row(
            "restart: leases",
            format!(
                "{kept} sessions sent the lease they held, {reissued} a new lease on the same key"
            ),
        );
        self.row(
            "restart coordinator",
            format!("{cpu:.1} cpu s during resync, peak rss {:.0} MiB", rss.0),
        );
        self.set(
            "restart",
            serde_json::json!({"sessions": live, "all": all, "up_ms": up_ms,
                "noticed": noticed.len(), "noticed_p50_ms": n50, "noticed_p99_ms": n99,
                "noticed_max_ms": nmax, "noticed_by_reset": by_reset, "resynced": back.len(), "resync_p50_ms": b50,
                "resync_p99_ms": b99, "resync_max_ms": bmax, "coordinator_cpu_s": cpu,
                "peak_rss_mib": rss.0, "leases_kept": kept, "leases_reissued": reissued,
                "netmaps_resumed": resumed, "netmap_bytes_mean": bytes_mean}),
        );
        // A reconnecting agent says what it holds; after a restart that changed nothing but
        // the process, most first netmaps leave the held peers out.
        if resumed * 2 < firsts.len() {
            self.fail(format!(
                "{resumed} of {} resynced sessions' first netmaps were resumed",
                firsts.len()
            ));
        }
        // A reconnect keeps a lease in the first half of its life, and a run is far shorter
        // than half of the default 10-minute lease: a new lease on the same key for more than
        // a tenth of the sessions means reconnects make new leases (each one checked by every
        // peer: a million signature checks at 1 000 sessions).
        if reissued > live / 10 {
            self.fail(format!(
                "{reissued} of {live} sessions got a new lease on the key they held after the restart"
            ));
        }
        if !all {
            self.fail(format!("{} of {live} sessions resynced", back.len()));
        }
        // The restarted coordinator answers each device's next packet with a stateless reset
        // (its keys survive the restart): most sessions end that way within a keepalive, not
        // by their idle timeout.
        if by_reset * 2 < noticed.len() {
            self.fail(format!(
                "{by_reset} of {} sessions learned of the restart from a stateless reset",
                noticed.len()
            ));
        }
        if bmax > self.check.max_resync_ms as f64 {
            self.fail(format!(
                "resync max {bmax:.0} ms > {} ms",
                self.check.max_resync_ms
            ));
        }
    }

    fn drops(&mut self, drops: &BTreeMap<String, usize>) {
        let total: usize = drops.values().sum();
        self.row(
            "session drops",
            format!("{total} (sessions ended or failed to open)"),
        );
        for (why, n) in drops {
            self.row("  drop", format!("{n}× {why}"));
        }
        self.set("session_drops", serde_json::json!(drops));
    }

    fn totals(&mut self, posture: u64, leases: u64, pings: u64, rotations: u64) {
        self.row(
            "device messages",
            format!("{posture} posture reports, {leases} lease requests, {pings} pings, {rotations} key switches"),
        );
        self.set(
            "device_messages",
            serde_json::json!({"posture": posture, "lease_requests": leases, "pings": pings,
                "key_switches": rotations}),
        );
    }

    fn table(&self) -> String {
        let w = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        self.rows
            .iter()
            .map(|(k, v)| format!("{k:<w$}  {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enforcement check says what the filter's own source test says, for sorted sets,
    /// an unsorted one, literal sources and addresses in neither.
    #[test]
    fn admits_agrees_with_the_filters_source_test() {
        use ward_shared::filter::{Proto, Sources};
        let p = |s: &str| -> ward_shared::routes::Prefix { s.parse().unwrap() };
        let sets = vec![
            PeerSet {
                id: 1,
                prefixes: vec![p("100.64.0.0/30"), p("100.64.0.8/32"), p("fd00::5/128")],
            },
            PeerSet {
                id: 2,
                prefixes: vec![p("100.64.1.9/32"), p("100.64.1.0/30")],
            },
            PeerSet {
                id: 3,
                prefixes: vec![p("100.64.2.0/24")],
            },
        ];
        let rule = |sets: Vec<u32>, sources: &[&str]| FilterRule {
            rule: "r".into(),
            service: "s".into(),
            sources: sources
                .iter()
                .map(|a| a.parse::<IpAddr>().unwrap())
                .collect::<Sources>(),
            source_sets: sets,
            proto: Proto::Tcp,
            ports: vec![],
            not_after_ms: None,
            dests: vec![],
        };
        let inbound = vec![rule(vec![1], &[]), rule(vec![2, 9], &["100.64.3.3"])];
        let book = ward_shared::peerset::book(&sets);
        let mut some_in = 0;
        for a in [
            "100.64.0.2",
            "100.64.0.8",
            "100.64.0.9",
            "fd00::5",
            "::ffff:100.64.0.1",
            "100.64.1.9",
            "100.64.1.2",
            "100.64.1.5",
            "100.64.2.7",
            "100.64.3.3",
            "10.0.0.1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            let want = inbound
                .iter()
                .any(|r| ward_shared::peerset::rule_has_source(r, &book, ip));
            assert_eq!(admits(&inbound, &sets, &[ip]), want, "{a}");
            some_in += usize::from(want);
        }
        // Set 3 is held but no rule names it; `100.64.2.7` is in no rule.
        assert_eq!(some_in, 7);
        assert!(!admits(&inbound, &sets, &[]));
    }

    #[test]
    fn the_window_bounds_sessions_opening_and_grows_as_they_come_up() {
        let mut o = Opener::new(32, 1024, 100_000, 0);
        // Rate is no bound here: the window of 32 is.
        assert_eq!(o.may_start(0, 0), 32);
        assert_eq!(o.may_start(32, 1), 0);
        // 16 come up: slow start adds one each, and 16 fewer are opening.
        o.observe(16, 0, 10);
        assert_eq!(o.window(), 48.0);
        assert_eq!(o.may_start(32, 11), 48 - 16);
    }

    #[test]
    fn failures_halve_the_window_once_per_wave_and_growth_turns_additive() {
        let mut o = Opener::new(100, 1024, 100_000, 0);
        o.observe(0, 5, 100);
        assert_eq!(o.window(), 50.0);
        // More failures of the same wave do not cut again.
        o.observe(0, 40, 600);
        assert_eq!(o.window(), 50.0);
        // A second later they do.
        o.observe(0, 41, 1_100);
        assert_eq!(o.window(), 25.0);
        // Past the threshold, 25 sessions up add about one.
        o.observe(25, 41, 1_200);
        assert!(o.window() > 25.9 && o.window() < 26.1, "{}", o.window());
        // Never below the floor.
        for t in 2..20u64 {
            o.observe(25, 41 + t, t * 1_000);
        }
        assert_eq!(o.window(), OPENER_MIN_WINDOW);
    }

    #[test]
    fn the_rate_bounds_starts_and_the_window_its_maximum() {
        // 100 a second: 5 at once, then 5 more every 50 ms.
        let mut o = Opener::new(1_000, 1_000, 100, 0);
        assert_eq!(o.may_start(0, 0), 5);
        assert_eq!(o.may_start(5, 5), 0);
        assert_eq!(o.may_start(5, 60), 5);
        // Over 10 s at 100 a second: about 1,000 starts, whatever the window.
        let mut o = Opener::new(1_000_000, 0, 100, 0);
        let mut started = 0;
        for t in 0..=200u64 {
            started += o.may_start(started, t * 50);
        }
        assert!((995..=1_005).contains(&started), "{started}");
        // The window stops at its maximum.
        let mut o = Opener::new(32, 64, 1_000_000, 0);
        o.observe(1_000, 0, 1);
        assert_eq!(o.window(), 64.0);
    }
}
