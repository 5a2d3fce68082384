//! `ward`: the device agent (`ward daemon`) and the user CLI that talks to it.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ward_client::api::{
    self, DownView, LoginView, NetcheckView, PostureView, Request, StatusView, UpView,
};
use ward_client::daemon::{self, DaemonOpts};
use ward_client::posture;
use ward_shared::posture::Measured;

#[derive(Parser)]
#[command(name = "ward", version, about = "Ward device agent")]
struct Cli {
    /// The agent's local API socket.
    #[arg(
        long,
        env = "WARD_SOCKET",
        global = true,
        default_value = "/run/ward/ward.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: identity, control session, TUN and tunnels.
    Daemon {
        #[arg(long, env = "WARD_STATE_DIR", default_value = "/var/lib/ward")]
        state_dir: PathBuf,
        /// TUN interface name; `off` runs the control plane only (no tunnels).
        #[arg(long, env = "WARD_TUN", default_value = "ward0")]
        tun: String,
        /// UDP port for WireGuard (0: any free port).
        #[arg(long, env = "WARD_PORT", default_value_t = 51820)]
        port: u16,
        /// A custom posture check: NAME=PATH of an executable that prints a JSON object
        /// (repeatable). Only checks configured here ever run; the coordinator only names them.
        #[arg(
            long = "posture-check",
            env = "WARD_POSTURE_CHECKS",
            value_delimiter = ','
        )]
        posture_checks: Vec<String>,
        /// Every executable file in this directory is a custom check named after the file.
        #[arg(long, env = "WARD_POSTURE_CHECKS_DIR")]
        posture_checks_dir: Option<PathBuf>,
        /// Longest a custom check may run before it is killed and counted as failing.
        #[arg(long, env = "WARD_POSTURE_CHECK_TIMEOUT", default_value = "5s", value_parser = parse_secs)]
        posture_check_timeout: Duration,
        /// Posture is reported at once on change, and at least this often.
        #[arg(long, env = "WARD_POSTURE_INTERVAL", default_value = "30s", value_parser = parse_secs)]
        posture_interval: Duration,
        /// While the control session is on TCP, how often to check whether QUIC gets through
        /// again (seconds; for tests).
        #[arg(long, env = "WARD_QUIC_RETRY_SECS", hide = true, default_value_t = ward_client::control::QUIC_RETRY_EVERY.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
        quic_retry_secs: u64,
        /// TCP address serving Prometheus metrics at `GET /metrics` (off unless given; bind it
        /// to loopback: see docs/metrics.md).
        #[arg(long, env = "WARD_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Device names in DNS: `auto` (systemd-resolved when it runs, else resolv.conf),
        /// `resolved`, `resolv.conf`, or `off` (no resolver, the host's DNS untouched).
        #[arg(long, env = "WARD_DNS", value_enum, default_value = "auto")]
        dns: ward_client::daemon::DnsSetting,
        /// The resolv.conf to manage in `resolv.conf` mode (backed up and restored byte for
        /// byte).
        #[arg(long, env = "WARD_RESOLV_CONF", default_value = ward_client::daemon::DEFAULT_RESOLV_CONF)]
        resolv_conf: PathBuf,
    },
    /// Join the network: enroll with a token the first time, reconnect afterwards.
    Up {
        /// The enrollment token; `-` reads it from stdin. Prefer `--token-file` or `-`: an
        /// argument is visible to every local user in /proc/PID/cmdline.
        #[arg(long, env = "WARD_TOKEN", conflicts_with = "token_file")]
        token: Option<String>,
        /// Read the enrollment token from this file (first line; surrounding spaces ignored).
        #[arg(long, env = "WARD_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Sign in through the coordinator's OpenID provider instead of a token: prints where
        /// to sign in, then waits. Needs --coordinator and --ca-sha256.
        #[arg(long, conflicts_with_all = ["token", "token_file"], requires_all = ["coordinator", "ca_sha256"])]
        login: bool,
        /// With --login: sign in in a browser (authorization code + PKCE, the provider
        /// redirecting to a listener on 127.0.0.1) and open it with xdg-open. The default when
        /// $DISPLAY or $WAYLAND_DISPLAY is set.
        #[arg(long, requires = "login", conflicts_with_all = ["no_browser", "device_code"])]
        browser: bool,
        /// With --login: the browser sign-in, but only print its address (open it in a browser
        /// on this machine yourself).
        #[arg(long, requires = "login", conflicts_with = "device_code")]
        no_browser: bool,
        /// With --login: sign in with a code on another device (the device authorization
        /// grant). The default without a desktop.
        #[arg(long, requires = "login")]
        device_code: bool,
        /// HOST:PORT of the coordinator (with --login).
        #[arg(long, env = "WARD_COORDINATOR")]
        coordinator: Option<String>,
        /// The coordinator's CA fingerprint, as `ward-coordinator init` prints it (with --login).
        #[arg(long, env = "WARD_CA_SHA256")]
        ca_sha256: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
        /// Offer to forward these prefixes (comma-separated, e.g. 10.20.0.0/16): a subnet
        /// router. Nothing is routed until the coordinator approves them.
        #[arg(long, value_delimiter = ',')]
        advertise_routes: Vec<ward_shared::routes::Prefix>,
        /// Offer to be an exit node (internet traffic of devices that choose it).
        #[arg(long)]
        advertise_exit_node: bool,
        /// Send this device's internet traffic through this exit node (a peer's hostname).
        #[arg(long)]
        exit_node: Option<String>,
    },
    /// Leave the network (the device stays enrolled).
    Down,
    /// Show this device, its connection and its peers.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Show this device's posture signals and, for each requirement, pass or fail and why.
    Posture {
        #[arg(long)]
        json: bool,
    },
    /// Show what address discovery through the relays found: UDP, public address, NAT mapping.
    Netcheck {
        #[arg(long)]
        json: bool,
    },
}

/// Longest token accepted from a file or stdin (tokens are a few hundred bytes).
const MAX_TOKEN_LEN: u64 = 16 * 1024;

/// `ward up --login` in a browser: the loopback listener and the verifier live in this
/// process; the daemon passes the challenge, then the redirect, to the coordinator.
async fn browser_login(
    socket: &std::path::Path,
    coordinator: String,
    ca_sha256: String,
    hostname: Option<String>,
    open: bool,
) -> Result<()> {
    use ward_shared::oauth;
    let lo = ward_client::login::Loopback::bind().await?;
    let mut raw = [0u8; oauth::RANDOM_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let verifier = oauth::random_value(&raw);
    let pkce = ward_shared::wire::LoginPkce {
        redirect_uri: lo.redirect_uri.clone(),
        code_challenge: oauth::challenge_s256(&verifier),
    };
    let v: LoginView = api::call(
        socket,
        &Request::LoginStart {
            coordinator,
            ca_sha256,
            hostname,
            pkce: Some(pkce),
        },
    )
    .await?;
    let Some(auth) = v.browser else {
        // A coordinator that predates the browser sign-in answered with the device grant.
        println!("This coordinator offers only sign-in with a code.");
        match &v.verification_uri_complete {
            Some(u) => println!("To sign in, open: {u}"),
            None => println!("To sign in, open: {}", v.verification_uri),
        }
        println!("and confirm the code: {}", v.user_code);
        let v: UpView = api::call(socket, &Request::LoginWait).await?;
        print_up(&v);
        return Ok(());
    };
    println!("To sign in, open: {}", auth.authorize_url);
    if open {
        if ward_client::login::open_browser(&lo.start_uri) {
            println!("(a browser was opened on {})", lo.start_uri);
        } else {
            println!("(could not start xdg-open: open the address above yourself)");
        }
    }
    println!(
        "(waiting up to {} s for the redirect to {})",
        auth.expires_in_secs, lo.redirect_uri
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let wait = Duration::from_secs(auth.expires_in_secs.clamp(1, 3600));
    let outcome = match lo.wait(&auth.authorize_url, &auth.state, wait).await {
        Ok(o) => o,
        Err(e) => {
            let _ = api::call::<DownView>(socket, &Request::LoginAbort).await;
            anyhow::bail!("sign-in failed: {e}");
        }
    };
    let (code, error) = match outcome {
        ward_client::login::Outcome::Code(c) => (Some(c), None),
        ward_client::login::Outcome::Error(e) => (None, Some(e)),
    };
    let callback = ward_shared::wire::LoginCallback {
        state: auth.state,
        code,
        error,
        code_verifier: verifier,
    };
    let _: LoginView = api::call(socket, &Request::LoginCallback { callback }).await?;
    let v: UpView = api::call(socket, &Request::LoginWait).await?;
    print_up(&v);
    Ok(())
}

/// What `ward up --login` ended with: the enrollment, or (on an enrolled device) the sign-in.
fn print_up(v: &UpView) {
    match &v.signed_in {
        Some(s) => {
            println!("signed in again as {} on {}", s.user, v.hostname);
            if !s.amr.is_empty() {
                println!("  methods: {}", s.amr.join(", "));
            }
            if !s.groups.is_empty() {
                println!("  groups: {}", s.groups.join(", "));
            }
        }
        None => println!("up: {} ({} {})", v.hostname, v.ipv4, v.ipv6),
    }
}

/// The token `ward up` sends: `--token T` as given, `--token -` read from `stdin`,
/// `--token-file F` read from F; the first line, trimmed, at most [`MAX_TOKEN_LEN`] bytes.
fn resolve_token(
    arg: Option<String>,
    file: Option<&std::path::Path>,
    stdin: impl std::io::Read,
) -> Result<Option<String>> {
    use anyhow::Context;
    let (text, from) = match (arg, file) {
        (Some(t), _) if t != "-" => return Ok(Some(t)),
        (Some(_), _) => (
            read_bounded(stdin).context("reading the token from stdin")?,
            "stdin",
        ),
        (None, Some(f)) => {
            let file = std::fs::File::open(f)
                .with_context(|| format!("opening token file {}", f.display()))?;
            let text = read_bounded(file)
                .with_context(|| format!("reading token file {}", f.display()))?;
            (text, "the token file")
        }
        (None, None) => return Ok(None),
    };
    let token = text.lines().next().unwrap_or("").trim();
    anyhow::ensure!(!token.is_empty(), "no token in {from}");
    Ok(Some(token.to_string()))
}

fn read_bounded(r: impl std::io::Read) -> Result<String> {
    use std::io::Read;
    let mut buf = String::new();
    r.take(MAX_TOKEN_LEN + 1).read_to_string(&mut buf)?;
    anyhow::ensure!(
        buf.len() as u64 <= MAX_TOKEN_LEN,
        "longer than {MAX_TOKEN_LEN} bytes: not a token"
    );
    Ok(buf)
}

/// Whether the command line itself carries a token (`--token T` or `--token=T`, not `-`).
fn token_in_args(args: impl IntoIterator<Item = String>) -> bool {
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        if a == "--token" {
            return args.next().is_some_and(|v| v != "-");
        }
        if let Some(v) = a.strip_prefix("--token=") {
            return v != "-";
        }
    }
    false
}

/// A positive duration in the one grammar (`500ms`, `30s`, `5m`, `1h`; a bare number is seconds).
fn parse_secs(s: &str) -> Result<Duration, String> {
    let d = ward_shared::duration::parse(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > Duration::from_secs(1_000_000) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(d)
}

fn main() {
    // `completions SHELL` and `man [DIR]` (hidden): generated from this clap definition.
    ward_clidoc::run_if_asked(<Cli as clap::CommandFactory>::command);
    let cli = Cli::parse();
    // The daemon's data plane runs on its own threads; its control plane needs no more than
    // one thread (fewer stacks and malloc arenas: bench/README.md, memory), and every thread
    // allocates from one arena.
    if matches!(cli.cmd, Cmd::Daemon { .. }) {
        ward_runtime::cap_malloc_arenas(1);
        ward_runtime::main_current_thread(
            "info,boringtun=error",
            ward_runtime::Mode::Service,
            run(cli),
        )
    }
    ward_runtime::main("info,boringtun=error", ward_runtime::Mode::Cli, run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Daemon {
            state_dir,
            tun,
            port,
            posture_checks,
            posture_checks_dir,
            posture_check_timeout,
            posture_interval,
            quic_retry_secs,
            metrics_listen,
            dns,
            resolv_conf,
        } => {
            let tun = (tun != "off").then_some(tun);
            let mut custom_checks = BTreeMap::new();
            if let Some(dir) = &posture_checks_dir {
                custom_checks = posture::checks_from_dir(dir).map_err(anyhow::Error::msg)?;
            }
            for c in posture_checks.iter().filter(|c| !c.is_empty()) {
                let (name, path) = posture::parse_check_arg(c).map_err(anyhow::Error::msg)?;
                custom_checks.insert(name, path);
            }
            daemon::run(DaemonOpts {
                state_dir,
                socket: cli.socket,
                tun,
                port,
                posture: posture::CollectorConfig {
                    root: PathBuf::from("/"),
                    custom_checks,
                    custom_timeout: posture_check_timeout,
                    full_interval: posture_interval,
                },
                posture_interval,
                quic_retry: Duration::from_secs(quic_retry_secs),
                metrics_listen,
                dns,
                resolv_conf,
            })
            .await
        }
        Cmd::Up {
            login: true,
            coordinator,
            ca_sha256,
            hostname,
            browser,
            no_browser,
            device_code,
            ..
        } => {
            let desktop = ward_client::login::has_desktop(
                std::env::var("DISPLAY").ok().as_deref(),
                std::env::var("WAYLAND_DISPLAY").ok().as_deref(),
            );
            let in_browser = browser || no_browser || (desktop && !device_code);
            if in_browser {
                return browser_login(
                    &cli.socket,
                    coordinator.unwrap_or_default(),
                    ca_sha256.unwrap_or_default(),
                    hostname,
                    !no_browser,
                )
                .await;
            }
            let v: LoginView = api::call(
                &cli.socket,
                &Request::LoginStart {
                    coordinator: coordinator.unwrap_or_default(),
                    ca_sha256: ca_sha256.unwrap_or_default(),
                    hostname,
                    pkce: None,
                },
            )
            .await?;
            match &v.verification_uri_complete {
                Some(u) => println!("To sign in, open: {u}"),
                None => println!("To sign in, open: {}", v.verification_uri),
            }
            println!("and confirm the code: {}", v.user_code);
            println!("(waiting up to {} s)", v.expires_in_secs);
            let v: UpView = api::call(&cli.socket, &Request::LoginWait).await?;
            print_up(&v);
            Ok(())
        }
        Cmd::Up {
            token,
            token_file,
            hostname,
            advertise_routes,
            advertise_exit_node,
            exit_node,
            ..
        } => {
            if token_in_args(std::env::args()) {
                eprintln!(
                    "warning: a token given with --token is visible to local users in \
                     /proc/*/cmdline; use --token-file FILE or --token - (stdin)"
                );
            }
            let token = resolve_token(token, token_file.as_deref(), std::io::stdin().lock())?;
            let routes = ward_client::agent::routes::RouteOptions {
                advertise_routes,
                advertise_exit_node,
                exit_node,
            };
            let v: UpView = api::call(
                &cli.socket,
                &Request::Up {
                    token,
                    hostname,
                    routes,
                },
            )
            .await?;
            print_up(&v);
            Ok(())
        }
        Cmd::Down => {
            let _: DownView = api::call(&cli.socket, &Request::Down).await?;
            println!(
                "down: this device has left the network (still enrolled; `ward up` to return)"
            );
            Ok(())
        }
        Cmd::Status { json } => {
            let v: StatusView = api::call(&cli.socket, &Request::Status).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(())
        }
        Cmd::Posture { json } => {
            let v: PostureView = api::call(&cli.socket, &Request::Posture).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_posture(&v);
            }
            Ok(())
        }
        Cmd::Netcheck { json } => {
            let v: NetcheckView = api::call(&cli.socket, &Request::Netcheck).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_netcheck(&v);
            }
            Ok(())
        }
    }
}

fn print_netcheck(v: &NetcheckView) {
    if v.relays.is_empty() {
        println!("no relays in the netmap: address discovery has nothing to ask");
        return;
    }
    let on_tcp = v.control_transport.as_deref() == Some("tcp")
        || v.relays
            .iter()
            .any(|r| r.transport.as_deref() == Some("tcp"));
    println!(
        "udp:          {}",
        match (v.udp, on_tcp) {
            (true, _) => "yes",
            (false, true) => "no relay answered: UDP looks blocked (using TLS over TCP)",
            (false, false) => "no relay answered",
        }
    );
    println!(
        "control:      {}",
        v.control_transport
            .as_deref()
            .unwrap_or("- (not connected)")
    );
    let refl: Vec<String> = v.reflexive.iter().map(|a| a.to_string()).collect();
    println!(
        "public addr:  {}",
        if refl.is_empty() {
            "-".into()
        } else {
            refl.join(", ")
        }
    );
    let mapping = match v.mapping_varies_by_dest {
        None => "unknown (needs answers from two relays)",
        Some(false) => "same for every destination (direct paths can be punched)",
        Some(true) => "varies by destination (direct paths need a relay)",
    };
    println!("nat mapping:  {mapping}");
    println!(
        "home relay:   {}",
        v.home_relay.as_deref().unwrap_or("- (no relay connected)")
    );
    println!("relays:");
    for r in &v.relays {
        let result = match (&r.observed, &r.error) {
            (Some(o), _) => format!("saw {o} in {}ms", opt(&r.latency_ms)),
            (None, Some(e)) => e.clone(),
            (None, None) => "waiting".into(),
        };
        let conn = match (r.connection.as_str(), &r.rtt_ms, &r.connection_error) {
            ("up", Some(rtt), _) => format!(
                "connected over {}, rtt {rtt}ms",
                r.transport.as_deref().unwrap_or("quic")
            ),
            ("idle", _, _) => "not connected (no ticket yet)".to_string(),
            (_, _, Some(e)) => format!("connecting (last error: {e})"),
            (c, _, None) if !c.is_empty() => c.to_string(),
            _ => "-".to_string(),
        };
        println!("  {:<14} {:<24} {result}; relay {conn}", r.name, r.addr);
    }
}

/// An optional value for people: `-` when absent.
fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |v| v.to_string())
}

fn print_status(v: &StatusView) {
    println!("state:        {}", v.state);
    let Some(d) = &v.device else {
        println!("this device is not enrolled: run `ward up --token-file FILE` (or `--token -` to read it from stdin)");
        return;
    };
    println!("device:       {} ({}, {})", d.hostname, d.ipv4, d.ipv6);
    if let Some(dns) = &d.dns {
        let name = dns.name.as_deref().unwrap_or("-");
        let via = match (&dns.mode, dns.listen.first()) {
            (m, Some(l)) => format!("{m}, resolver {}", l.ip()),
            (m, None) => m.clone(),
        };
        match &dns.error {
            Some(e) => println!("dns:          {name} ({via}; {e})"),
            None => println!("dns:          {name} ({via})"),
        }
    }
    if d.coordinators.len() > 1 {
        println!(
            "coordinator:  {} (known: {})",
            d.coordinator,
            d.coordinators.join(", ")
        );
    } else {
        println!("coordinator:  {}", d.coordinator);
    }
    if let Some(x) = &d.exit_node {
        println!("exit node:    {}", x.text);
    }
    println!(
        "control:      {}",
        d.control_transport
            .as_deref()
            .unwrap_or("- (not connected)")
    );
    if !d.relay_transports.is_empty() {
        let links: Vec<String> = d
            .relay_transports
            .iter()
            .map(|(n, t)| {
                if d.relay_udp_bound.contains(n) {
                    format!("{n} {t} (plain UDP)")
                } else {
                    format!("{n} {t}")
                }
            })
            .collect();
        println!("relay links:  {}", links.join(", "));
    }
    if let Some(e) = &d.last_error {
        println!("last error:   {e}");
    }
    if let Some(w) = &d.clock_warning {
        println!("clock:        {w}");
    }
    if let Some(tun) = &d.tun {
        println!("tunnel:       {tun} udp/{}", opt(&d.port));
    }
    println!(
        "home relay:   {}",
        d.home_relay.as_deref().unwrap_or("- (no relay connected)")
    );
    let lease = match &d.lease {
        Some(l) => format!(
            "lease #{} ends in {}s (ttl {}s)",
            l.serial, l.expires_in_secs, l.ttl_secs
        ),
        None => "no lease yet: peers will not accept this device until the coordinator grants one"
            .into(),
    };
    println!(
        "key:          {}  age {}s, {} rotations, {lease}",
        d.key,
        opt(&d.key_age_secs),
        d.rotations
    );
    if d.reach.is_empty() {
        println!("can reach:    nothing (no rule allows this device anything)");
    } else {
        println!("can reach:");
    }
    for r in &d.reach {
        let exp = r
            .expires_in_secs
            .map(|s| format!("  (expires in {s}s)"))
            .unwrap_or_default();
        println!(
            "  {:<14} on {:<16} {:<16} rule {}{}",
            r.service, r.hostname, r.ports, r.rule, exp
        );
    }
    if d.inbound.is_empty() {
        println!("reachable by: nobody (default deny)");
    } else {
        println!("reachable by:");
    }
    for r in &d.inbound {
        let exp = r
            .expires_in_secs
            .map(|s| format!("  (expires in {s}s)"))
            .unwrap_or_default();
        println!(
            "  {:<14} {:<16} from {}  rule {}{}",
            r.service,
            r.ports,
            r.from.join(","),
            r.rule,
            exp
        );
    }
    if let Some(q) = &d.quarantine {
        println!("QUARANTINED:  {q} (only remediation services are reachable)");
    }
    if let Some(r) = d.risk.as_ref().filter(|r| r.score > 0) {
        println!("behaviour:    {r}");
    }
    if let Some(s) = &d.sign_in_again {
        println!("SIGN IN:      {s} (run `ward up --login`)");
    }
    for u in &d.unavailable {
        println!("unavailable:  {u}");
    }
    if d.unavailable_more > 0 {
        println!(
            "unavailable:  and {} more on other devices",
            d.unavailable_more
        );
    }
    println!("peers:        {}", v.peers.len());
    for p in &v.peers {
        let hs = match p.last_handshake_secs {
            Some(n) => format!("handshake {n}s ago"),
            None => "no handshake".into(),
        };
        // `direct ADDR`, `relay NAME`, or `-` with what the agent knows about why.
        let path = match (&p.path, p.path_text.as_str()) {
            (api::PathView::None, "") => "-".to_string(),
            (api::PathView::None, why) => format!("- ({why})"),
            (path, _) => path.to_string(),
        };
        if let Some(n) = &p.dns_name {
            println!("  {:<16} name {n}", "");
        }
        println!(
            "  {:<16} {:<15} {:<7} {}  rx {} tx {}  {}",
            p.hostname,
            p.ipv4.to_string(),
            if p.online { "online" } else { "offline" },
            path,
            p.rx_bytes,
            p.tx_bytes,
            hs
        );
        println!(
            "  {:<16} key {}  age {}s, lease #{} ends in {}s",
            "",
            opt(&p.public_key),
            opt(&p.key_age_secs),
            opt(&p.lease_serial),
            opt(&p.lease_expires_in_secs)
        );
    }
}

/// One signal's reading for people: the value, or why it could not be read.
fn reading<T>(m: &Measured<T>, show: impl Fn(&T) -> String) -> String {
    match m.get() {
        Ok(v) => show(v),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// A JSON value for people: strings without quotes.
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        o => o.to_string(),
    }
}

fn print_posture(v: &PostureView) {
    match &v.report {
        None => println!("no posture collected yet (it starts once the device is connected)"),
        Some(r) => {
            println!("signals (report #{}):", r.seq);
            let os = reading(&r.os, |o| format!("{} {} ({})", o.id, o.version, o.pretty));
            println!("  {:<22} {os}", "os");
            println!("  {:<22} {}", "kernel", reading(&r.kernel, |k| k.clone()));
            println!(
                "  {:<22} {}",
                "firewall",
                reading(&r.firewall, bool::to_string)
            );
            println!(
                "  {:<22} {}",
                "disk_encryption",
                reading(&r.disk_encryption, bool::to_string)
            );
            let lock = reading(&r.screen_lock, |l| match l {
                Some(b) => b.to_string(),
                None => "no desktop session".into(),
            });
            println!("  {:<22} {lock}", "screen_lock");
            println!(
                "  {:<22} {}",
                "last_package_update_ms",
                reading(&r.last_package_update_ms, i64::to_string)
            );
            println!("  {:<22} {}", "ward_version", r.ward_version);
            for (name, m) in &r.processes {
                println!(
                    "  {:<22} {}",
                    format!("process {name}"),
                    reading(m, bool::to_string)
                );
            }
            for (path, m) in &r.files {
                let val = reading(m, |f| match (f.present, &f.sha256) {
                    (true, Some(h)) => format!("present, sha256 {h}"),
                    (true, None) => "present".into(),
                    (false, _) => "missing".into(),
                });
                println!("  {:<22} {val}", format!("file {path}"));
            }
            for (name, m) in &r.custom {
                println!(
                    "  {:<22} {}",
                    format!("check {name}"),
                    reading(m, json_text)
                );
            }
        }
    }
    match &v.verdict {
        Some(verdict) => verdict.lines().iter().for_each(|l| println!("{l}")),
        None => println!("requirements: no verdict from the coordinator yet"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_token_on_the_command_line_is_flagged_but_stdin_and_files_are_not() {
        assert!(token_in_args(args(&["ward", "up", "--token", "ward1-x"])));
        assert!(token_in_args(args(&["ward", "up", "--token=ward1-x"])));
        assert!(!token_in_args(args(&["ward", "up", "--token", "-"])));
        assert!(!token_in_args(args(&["ward", "up", "--token-file", "/t"])));
        assert!(!token_in_args(args(&["ward", "up"])));
    }

    #[test]
    fn the_token_comes_from_stdin_or_a_file_first_line_trimmed() {
        let t = resolve_token(Some("-".into()), None, &b"  ward1-abc \nrest\n"[..]).unwrap();
        assert_eq!(t.as_deref(), Some("ward1-abc"));
        let dir = std::env::temp_dir().join(format!("ward-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "ward1-def\n").unwrap();
        let t = resolve_token(None, Some(&f), &b""[..]).unwrap();
        assert_eq!(t.as_deref(), Some("ward1-def"));
        std::fs::write(&f, "\n").unwrap();
        assert!(resolve_token(None, Some(&f), &b""[..]).is_err());
        assert!(resolve_token(None, Some(&dir.join("missing")), &b""[..]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        // An argument is taken as it is; nothing at all means reconnect with no token.
        let t = resolve_token(Some("ward1-ghi".into()), None, &b"x"[..]).unwrap();
        assert_eq!(t.as_deref(), Some("ward1-ghi"));
        assert_eq!(resolve_token(None, None, &b"x"[..]).unwrap(), None);
        // Empty or endless stdin is refused.
        assert!(resolve_token(Some("-".into()), None, &b""[..]).is_err());
        let huge = vec![b'a'; MAX_TOKEN_LEN as usize + 10];
        assert!(resolve_token(Some("-".into()), None, &huge[..]).is_err());
    }

    #[test]
    fn token_and_token_file_are_exclusive_and_both_parse() {
        assert!(Cli::try_parse_from(["ward", "up", "--token", "t", "--token-file", "f"]).is_err());
        assert!(Cli::try_parse_from(["ward", "up", "--token-file", "f"]).is_ok());
        assert!(Cli::try_parse_from(["ward", "up", "--token", "-"]).is_ok());
    }
}
