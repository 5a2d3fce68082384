//! `ward`: the device agent (`ward daemon`) and the user CLI that talks to it.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use ward_client::api::{self, Request};
use ward_client::daemon::{self, DaemonOpts};

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
    },
    /// Join the network: enroll with a token the first time, reconnect afterwards.
    Up {
        #[arg(long, env = "WARD_TOKEN")]
        token: Option<String>,
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Leave the network (the device stays enrolled).
    Down,
    /// Show this device, its connection and its peers.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,boringtun=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Daemon {
            state_dir,
            tun,
            port,
        } => {
            let tun = (tun != "off").then_some(tun);
            daemon::run(DaemonOpts {
                state_dir,
                socket: cli.socket,
                tun,
                port,
            })
            .await
        }
        Cmd::Up { token, hostname } => {
            let v = api::call(&cli.socket, &Request::Up { token, hostname }).await?;
            println!(
                "up: {} ({} {})",
                v["hostname"].as_str().unwrap_or("?"),
                v["ipv4"].as_str().unwrap_or("?"),
                v["ipv6"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Cmd::Down => {
            api::call(&cli.socket, &Request::Down).await?;
            println!(
                "down: this device has left the network (still enrolled; `ward up` to return)"
            );
            Ok(())
        }
        Cmd::Status { json } => {
            let v = api::call(&cli.socket, &Request::Status).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(())
        }
    }
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        o => o.to_string(),
    }
}

fn print_status(v: &serde_json::Value) {
    println!("state:        {}", s(&v["state"]));
    if v["hostname"].is_null() {
        println!("this device is not enrolled: run `ward up --token TOKEN`");
        return;
    }
    println!(
        "device:       {} ({}, {})",
        s(&v["hostname"]),
        s(&v["ipv4"]),
        s(&v["ipv6"])
    );
    println!("coordinator:  {}", s(&v["coordinator"]));
    if !v["last_error"].is_null() {
        println!("last error:   {}", s(&v["last_error"]));
    }
    if !v["clock_warning"].is_null() {
        println!("clock:        {}", s(&v["clock_warning"]));
    }
    if !v["tun"].is_null() {
        println!("tunnel:       {} udp/{}", s(&v["tun"]), s(&v["port"]));
    }
    let lease = match v["lease"]["serial"].as_u64() {
        Some(n) => format!(
            "lease #{n} ends in {}s (ttl {}s)",
            s(&v["lease"]["expires_in_secs"]),
            s(&v["lease"]["ttl_secs"])
        ),
        None => "no lease yet: peers will not accept this device until the coordinator grants one"
            .into(),
    };
    println!(
        "key:          {}  age {}s, {} rotations, {lease}",
        s(&v["key"]),
        s(&v["key_age_secs"]),
        s(&v["rotations"])
    );
    let reach = v["reach"].as_array().cloned().unwrap_or_default();
    if reach.is_empty() {
        println!("can reach:    nothing (no rule allows this device anything)");
    } else {
        println!("can reach:");
    }
    for r in &reach {
        let exp = r["expires_in_secs"]
            .as_i64()
            .map(|s| format!("  (expires in {s}s)"))
            .unwrap_or_default();
        println!(
            "  {:<14} on {:<16} {:<16} rule {}{}",
            s(&r["service"]),
            s(&r["hostname"]),
            s(&r["ports"]),
            s(&r["rule"]),
            exp
        );
    }
    let inbound = v["inbound"].as_array().cloned().unwrap_or_default();
    if inbound.is_empty() {
        println!("reachable by: nobody (default deny)");
    } else {
        println!("reachable by:");
    }
    for r in &inbound {
        let from: Vec<String> = r["from"].as_array().into_iter().flatten().map(s).collect();
        let exp = r["expires_in_secs"]
            .as_i64()
            .map(|s| format!("  (expires in {s}s)"))
            .unwrap_or_default();
        println!(
            "  {:<14} {:<16} from {}  rule {}{}",
            s(&r["service"]),
            s(&r["ports"]),
            from.join(","),
            s(&r["rule"]),
            exp
        );
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    println!("peers:        {}", peers.len());
    for p in peers {
        let hs = match p["last_handshake_secs"].as_u64() {
            Some(n) => format!("handshake {n}s ago"),
            None => "no handshake".into(),
        };
        println!(
            "  {:<16} {:<15} {:<7} {}  rx {} tx {}  {}",
            s(&p["hostname"]),
            s(&p["ipv4"]),
            if p["online"].as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            },
            s(&p["path"]),
            s(&p["rx_bytes"]),
            s(&p["tx_bytes"]),
            hs
        );
        println!(
            "  {:<16} key {}  age {}s, lease #{} ends in {}s",
            "",
            s(&p["public_key"]),
            s(&p["key_age_secs"]),
            s(&p["lease_serial"]),
            s(&p["lease_expires_in_secs"])
        );
    }
}
