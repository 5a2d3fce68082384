//! `ward`: the device agent (`ward daemon`) and the user CLI that talks to it.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ward_client::api::{self, Request};
use ward_client::daemon::{self, DaemonOpts};
use ward_client::posture;
use ward_shared::wire::{PostureVerdict, Unavailable};

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
    /// Show this device's posture signals and, for each requirement, pass or fail and why.
    Posture {
        #[arg(long)]
        json: bool,
    },
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
    let cli = Cli::parse();
    let mode = match cli.cmd {
        Cmd::Daemon { .. } => ward_runtime::Mode::Service,
        _ => ward_runtime::Mode::Cli,
    };
    ward_runtime::main("info,boringtun=error", mode, run(cli))
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
        Cmd::Posture { json } => {
            let v = api::call(&cli.socket, &Request::Posture).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_posture(&v);
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
    if let Some(q) = v["quarantine"].as_str() {
        println!("QUARANTINED:  {q} (only remediation services are reachable)");
    }
    let unavailable: Vec<Unavailable> =
        serde_json::from_value(v["unavailable"].clone()).unwrap_or_default();
    for u in unavailable {
        println!("unavailable:  {u}");
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

/// One signal's reading for people: the value, or why it could not be read.
fn reading(m: &serde_json::Value) -> String {
    match (&m["reading"]["value"], &m["reading"]["error"]) {
        (serde_json::Value::Null, serde_json::Value::Null) => "-".into(),
        (v, serde_json::Value::Null) => s(v),
        (_, e) => format!("unreadable: {}", s(e)),
    }
}

fn print_posture(v: &serde_json::Value) {
    let r = &v["report"];
    if r.is_null() {
        println!("no posture collected yet (it starts once the device is connected)");
    } else {
        println!("signals (report #{}):", s(&r["seq"]));
        let os = &r["os"]["reading"]["value"];
        let os = if os.is_null() {
            reading(&r["os"])
        } else {
            format!(
                "{} {} ({})",
                s(&os["id"]),
                s(&os["version"]),
                s(&os["pretty"])
            )
        };
        println!("  {:<22} {os}", "os");
        for k in [
            "kernel",
            "firewall",
            "disk_encryption",
            "screen_lock",
            "last_package_update_ms",
        ] {
            let mut val = reading(&r[k]);
            if k == "screen_lock" && val == "-" {
                val = "no desktop session".into();
            }
            println!("  {k:<22} {val}");
        }
        println!("  {:<22} {}", "ward_version", s(&r["ward_version"]));
        for (name, m) in r["processes"].as_object().into_iter().flatten() {
            println!("  {:<22} {}", format!("process {name}"), reading(m));
        }
        for (path, m) in r["files"].as_object().into_iter().flatten() {
            let val = match &m["reading"]["value"] {
                serde_json::Value::Null => reading(m),
                f if f["present"].as_bool() == Some(true) => match f["sha256"].as_str() {
                    Some(h) => format!("present, sha256 {h}"),
                    None => "present".into(),
                },
                _ => "missing".into(),
            };
            println!("  {:<22} {val}", format!("file {path}"));
        }
        for (name, m) in r["custom"].as_object().into_iter().flatten() {
            println!("  {:<22} {}", format!("check {name}"), reading(m));
        }
    }
    match serde_json::from_value::<Option<PostureVerdict>>(v["verdict"].clone()) {
        Ok(Some(verdict)) => verdict.lines().iter().for_each(|l| println!("{l}")),
        Ok(None) => println!("requirements: no verdict from the coordinator yet"),
        Err(e) => println!("requirements: the daemon's verdict is unreadable ({e})"),
    }
}
