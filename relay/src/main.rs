//! `ward-relay`: wires the relay together. One UDP socket carries address discovery (answered
//! in [`ward_relay::socket`]) and QUIC (device connections in [`ward_relay::server`], the
//! control session in [`ward_relay::control`]); a TCP listener on the same port number serves
//! devices whose network drops UDP ([`ward_relay::tcp`]); every decision is the cores'.

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use ward_relay::control::Control;
use ward_relay::core::{Config, Relay};
use ward_relay::forward::{Forwarder, Limits};
use ward_relay::metrics::{self, Snapshot};
use ward_relay::server::{self, Shared};
use ward_relay::socket::DemuxSocket;
use ward_shared::relay::{RelayCredential, RelayLoad};

#[derive(Parser)]
#[command(
    name = "ward-relay",
    version,
    about = "Ward relay: forwards WireGuard ciphertext between ticketed devices, answers address discovery"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join the coordinator named in the credential and serve devices on one UDP port.
    Serve(Serve),
}

#[derive(clap::Args)]
struct Serve {
    /// The relay credential `ward-coordinator relay add` printed (`wardrelay1-…`). Prefer
    /// `--token-file` or the environment: a command line is visible to every local user.
    #[arg(
        long,
        env = "WARD_RELAY_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the relay credential.
    #[arg(long, env = "WARD_RELAY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// UDP address to listen on (discovery and QUIC), and the TCP address (the same) for
    /// devices on networks that drop UDP. The default is every address, IPv6 and IPv4 on one
    /// dual-stack socket (plain IPv4 where the host has no IPv6).
    #[arg(long, env = "WARD_RELAY_LISTEN")]
    listen: Option<SocketAddr>,
    /// TCP address serving Prometheus metrics at `GET /metrics` (off unless given).
    #[arg(long, env = "WARD_RELAY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Device connections at once (pending or ticketed).
    #[arg(long, env = "WARD_RELAY_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Datagrams per second one device may send through the relay, sustained.
    #[arg(long, env = "WARD_RELAY_RATE_PPS", default_value_t = Limits::default().rate_packets)]
    rate_pps: u64,
    /// Bytes per second one device may send through the relay, sustained.
    #[arg(long, env = "WARD_RELAY_RATE_BYTES", default_value_t = Limits::default().rate_bytes)]
    rate_bytes: u64,
}

/// The default UDP port (that of STUN).
const DEFAULT_PORT: u16 = 3478;

fn main() {
    // `completions SHELL` and `man [DIR]` (hidden): generated from this clap definition.
    ward_clidoc::run_if_asked(<Cli as clap::CommandFactory>::command);
    let cli = Cli::parse();
    ward_runtime::main("info", ward_runtime::Mode::Service, run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cmd::Serve(args) = cli.cmd;
    let credential = credential(&args)?;
    let socket = match args.listen {
        Some(addr) => {
            ward_runtime::net::bind_udp(addr).with_context(|| format!("binding UDP {addr}"))?
        }
        None => bind_default()?,
    };
    // Room for a burst of relayed datagrams while the endpoint's task waits for a CPU.
    if let Err(e) =
        ward_runtime::net::set_socket_buffers(&socket, ward_runtime::net::QUIC_SOCKET_BUFFER)
    {
        tracing::info!(error = %e, "UDP socket buffers left at the kernel's default");
    }
    socket
        .set_nonblocking(true)
        .context("making the UDP socket non-blocking")?;
    let local = socket
        .local_addr()
        .context("reading the UDP socket's address")?;
    let tcp = match local {
        std::net::SocketAddr::V6(a) if a.ip().is_unspecified() && args.listen.is_none() => {
            ward_runtime::net::bind_tcp_dual_stack(local.port())
                .with_context(|| format!("binding TCP port {}", local.port()))?
                .listener
        }
        _ => ward_runtime::net::bind_tcp(local).with_context(|| format!("binding TCP {local}"))?,
    };
    let tcp = TcpListener::from_std(tcp).context("registering the TCP listener")?;

    let discovery = Arc::new(Mutex::new(Relay::new(Config::default(), Instant::now())));
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow!("no tokio runtime"))?;
    let inner = runtime
        .wrap_udp_socket(socket)
        .context("preparing the UDP socket for QUIC")?;
    let limits = Limits {
        max_connections: args.max_connections.max(1),
        rate_packets: args.rate_pps.max(1),
        rate_bytes: args.rate_bytes.max(1),
        ..Limits::default()
    };
    let shared = Shared::new(Forwarder::new(limits), limits.hello_timeout);
    let demux = Arc::new(DemuxSocket::new(inner, discovery.clone()).with_plain_udp(shared.clone()));
    // No greasing of QUIC's fixed bit: peers then set it in every packet, so a first byte
    // with the two top bits clear is never QUIC and belongs to the plain-UDP path
    // (`udp_path::is_plain`). quinn also refuses arriving packets without it.
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.grease_quic_bit(false);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(endpoint_config, None, demux, runtime)
        .context("opening the QUIC endpoint")?;

    let snapshot: metrics::Shared = {
        let (discovery, shared) = (discovery.clone(), shared.clone());
        Arc::new(move || {
            let (forward, udp) = {
                let g = shared.lock();
                (g.core.stats(), g.udp.counters())
            };
            Snapshot {
                discovery: discovery.lock().unwrap_or_else(|p| p.into_inner()).stats(),
                forward,
                udp,
                control_up: shared.is_control_up(),
            }
        })
    };
    let load = {
        let snapshot = snapshot.clone();
        Arc::new(move || {
            let f = snapshot().forward;
            RelayLoad {
                devices: u32::try_from(f.devices).unwrap_or(u32::MAX),
                bytes_relayed: f.bytes_relayed,
                datagrams_relayed: f.datagrams_relayed,
                dropped: f.dropped_total(),
            }
        })
    };

    if let Some(addr) = args.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics listener {addr}"))?;
        let maddr = l.local_addr().context("reading the metrics address")?;
        tracing::info!(addr = %maddr, "metrics listening");
        tokio::spawn(metrics::serve(l, snapshot.clone()));
    }
    tracing::info!(
        addr = %local,
        name = %credential.name,
        coordinator = %credential.coordinator,
        "relay listening: address discovery now, device connections once the coordinator welcomes it"
    );
    let control = Control::new(credential, endpoint.clone(), shared.clone(), load)?;
    let tasks = [
        tokio::spawn(server::accept_loop(endpoint.clone(), shared.clone())),
        tokio::spawn(ward_relay::tcp::accept_loop(tcp, shared.clone())),
        tokio::spawn(server::timer_loop(shared.clone())),
        tokio::spawn(control.run()),
    ];
    let r = shutdown().await;
    tracing::info!("relay stopping");
    endpoint.close(0u32.into(), b"relay stopping");
    let _ = tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
    for t in tasks {
        t.abort();
    }
    r
}

/// The credential from `--token`, `--token-file` or the environment; a bad one is one clear
/// error (that never repeats the credential).
fn credential(args: &Serve) -> anyhow::Result<RelayCredential> {
    let text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the relay credential from {}", f.display()))?,
        (None, None) => {
            return Err(anyhow!(
                "a relay credential is required: --token, --token-file or WARD_RELAY_TOKEN \
                 (`ward-coordinator relay add NAME --addr HOST:PORT` prints one)"
            ))
        }
    };
    RelayCredential::parse(&text).map_err(|e| anyhow!("invalid relay credential: {e}"))
}

/// `[::]:3478` dual-stack, else `0.0.0.0:3478`.
fn bind_default() -> anyhow::Result<std::net::UdpSocket> {
    let b = ward_runtime::net::bind_udp_dual_stack(DEFAULT_PORT)
        .with_context(|| format!("binding UDP port {DEFAULT_PORT}"))?;
    if let Some(e) = &b.ipv4_only_because {
        tracing::info!(error = %e, "no IPv6 socket; listening on IPv4 only");
    }
    Ok(b.socket)
}

async fn shutdown() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT"),
        _ = term.recv() => Ok(()),
    }
}
