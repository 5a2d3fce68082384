//! Runs one Ward data plane from static configuration, for manual tests and benchmarks.
//!
//! ```text
//! dp_pair genkey                      # prints "<private-hex> <public-hex>"
//! dp_pair run --private-key HEX --ipv4 100.64.0.1 --ipv6 fd00:77::1 \
//!             --peer-key HEX --peer-ipv4 100.64.0.2 --peer-ipv6 fd00:77::2 \
//!             --endpoint 10.203.0.2:51820 [--endpoint …] [--port 51820] [--tun ward0] \
//!             [--exit-after SECS]
//! ```
//!
//! `run` stays up until SIGINT/SIGTERM (or `--exit-after` seconds, env `DP_EXIT_AFTER`: the
//! quick mode for smoke runs), then prints the peer status and counters and removes the
//! TUN. See `dp_pair.sh` for a two-namespace setup with ping and iperf3.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use ward_client::dataplane::{public_key_for, DataPlane, DataPlaneConfig, PeerConfig};
use ward_shared::filter::{FilterRule, PortRange, Proto};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prints a new private key and its public key, hex.
    Genkey,
    /// Runs a data plane with one static peer.
    Run(RunArgs),
}

#[derive(Parser)]
struct RunArgs {
    #[arg(long, default_value = "ward0")]
    tun: String,
    #[arg(long, default_value_t = 51820)]
    port: u16,
    /// Own private key, hex (or env DP_PRIVATE_KEY).
    #[arg(long, env = "DP_PRIVATE_KEY", hide_env_values = true)]
    private_key: String,
    #[arg(long)]
    ipv4: Ipv4Addr,
    #[arg(long)]
    ipv6: Ipv6Addr,
    /// The overlay IPv6 /48 (defaults to the first 48 bits of --ipv6).
    #[arg(long)]
    v6_prefix: Option<Ipv6Addr>,
    #[arg(long)]
    peer_key: String,
    #[arg(long)]
    peer_ipv4: Ipv4Addr,
    #[arg(long)]
    peer_ipv6: Ipv6Addr,
    /// Candidate endpoint of the peer (repeatable; none: wait for the peer to reach us).
    #[arg(long)]
    endpoint: Vec<SocketAddr>,
    /// Stop by itself after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, env = "DP_EXIT_AFTER")]
    exit_after: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Genkey => {
            let private: [u8; 32] = rand::random();
            println!(
                "{} {}",
                hex::encode(private),
                hex::encode(public_key_for(&private))
            );
            Ok(())
        }
        Cmd::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(args)),
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let private_key = key(&a.private_key).context("--private-key")?;
    let peer_key = key(&a.peer_key).context("--peer-key")?;
    let v6_prefix = a.v6_prefix.unwrap_or_else(|| {
        let mut o = a.ipv6.octets();
        o[6..].fill(0);
        Ipv6Addr::from(o)
    });
    let dp = DataPlane::start(DataPlaneConfig {
        tun_name: a.tun.clone(),
        port: a.port,
        private_key,
        ipv4: a.ipv4,
        ipv6: a.ipv6,
        v6_prefix,
    })
    .await?;
    println!(
        "up: tun={} port={} public_key={}",
        a.tun,
        dp.local_port(),
        hex::encode(dp.public_key())
    );
    // The benchmark peer may open anything here (the filter still runs on every packet).
    let all = |proto, ports: Vec<PortRange>| FilterRule {
        dests: Default::default(),
        rule: "dp-pair-allow-all".into(),
        service: "all".into(),
        sources: vec![IpAddr::V4(a.peer_ipv4), IpAddr::V6(a.peer_ipv6)].into(),
        source_sets: Vec::new(),
        proto,
        ports,
        not_after_ms: None,
    };
    let every_port = vec![PortRange {
        lo: 0,
        hi: u16::MAX,
    }];
    dp.set_filter(vec![
        all(Proto::Tcp, every_port.clone()),
        all(Proto::Udp, every_port),
        all(Proto::Icmp, Vec::new()),
    ]);
    dp.set_peers(vec![PeerConfig {
        routes: Default::default(),
        device_id: 2,
        hostname: "peer".into(),
        public_key: peer_key,
        ipv4: a.peer_ipv4,
        ipv6: a.peer_ipv6,
        endpoints: a.endpoint,
        relay: None,
    }]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let deadline = async {
        match a.exit_after {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = &mut deadline => break,
            _ = tick.tick() => eprintln!("status: {:?}", dp.status()),
        }
    }
    println!("status: {:?}", dp.status());
    println!("counters: {:?}", dp.counters());
    println!("filter: {:?}", dp.filter_counters());
    dp.shutdown().await;
    Ok(())
}

fn key(s: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(s.trim()).context("not hex")?;
    let Ok(k) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        bail!("a key is 32 bytes (64 hex digits)");
    };
    Ok(k)
}
