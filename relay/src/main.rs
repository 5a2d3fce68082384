//! `ward-relay`: the thin tokio driver of [`ward_relay::core::Relay`]. It owns the UDP socket,
//! the clock and the optional metrics listener; every decision is the core's.

use anyhow::Context;
use clap::{Parser, Subcommand};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::{TcpListener, UdpSocket};
use ward_relay::core::{Config, Relay};
use ward_relay::metrics;

#[derive(Parser)]
#[command(
    name = "ward-relay",
    version,
    about = "Ward relay: answers address discovery"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer binding requests on a UDP socket.
    Serve {
        /// UDP address to listen on. The default is every address, IPv6 and IPv4 on one
        /// dual-stack socket (plain IPv4 where the host has no IPv6).
        #[arg(long, env = "WARD_RELAY_LISTEN")]
        listen: Option<SocketAddr>,
        /// TCP address serving Prometheus metrics at `GET /metrics` (off unless given).
        #[arg(long, env = "WARD_RELAY_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
    },
}

/// The default UDP port (that of STUN).
const DEFAULT_PORT: u16 = 3478;
/// Larger than any datagram the relay answers, so an oversized one is seen as oversized.
const RECV_BUF: usize = 2048;

fn main() {
    let cli = Cli::parse();
    ward_runtime::main("info", ward_runtime::Mode::Service, run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cmd::Serve {
        listen,
        metrics_listen,
    } = cli.cmd;
    let socket = match listen {
        Some(addr) => bind(addr).with_context(|| format!("binding UDP {addr}"))?,
        None => bind_default()?,
    };
    let local = socket
        .local_addr()
        .context("reading the UDP socket's address")?;
    let stats: metrics::Shared = Arc::new(Mutex::new(Default::default()));
    if let Some(addr) = metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics listener {addr}"))?;
        let maddr = l.local_addr().context("reading the metrics address")?;
        tracing::info!(addr = %maddr, "metrics listening");
        tokio::spawn(metrics::serve(l, stats.clone()));
    }
    tracing::info!(addr = %local, "relay listening");
    tokio::select! {
        r = serve(&socket, &stats) => r,
        r = shutdown() => {
            tracing::info!("relay stopping");
            r
        }
    }
}

async fn serve(socket: &UdpSocket, stats: &metrics::Shared) -> anyhow::Result<()> {
    let mut relay = Relay::new(Config::default(), Instant::now());
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // Errors on an unconnected UDP socket are about one datagram; keep serving.
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        let Some(datagram) = buf.get(..len) else {
            continue; // recv_from never reports more than the buffer holds
        };
        if let Some(t) = relay.handle_datagram(src, datagram, Instant::now()) {
            if let Err(e) = socket.send_to(&t.payload, t.dst).await {
                tracing::debug!(dst = %t.dst, error = %e, "UDP send failed");
            }
        }
        *stats.lock().unwrap_or_else(|p| p.into_inner()) = relay.stats();
    }
}

/// `[::]:3478` dual-stack, else `0.0.0.0:3478`.
fn bind_default() -> anyhow::Result<UdpSocket> {
    let v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), DEFAULT_PORT);
    match bind(v6) {
        Ok(s) => Ok(s),
        Err(e) => {
            tracing::info!(error = %e, "no IPv6 socket; listening on IPv4 only");
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), DEFAULT_PORT);
            bind(v4).with_context(|| format!("binding UDP {v4}"))
        }
    }
}

/// A UDP socket on `addr`; an IPv6 wildcard is made dual-stack whatever the host's default.
fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let SocketAddr::V6(v6) = addr {
        if v6.ip().is_unspecified() {
            sock.set_only_v6(false)?;
        }
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

async fn shutdown() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT"),
        _ = term.recv() => Ok(()),
    }
}
