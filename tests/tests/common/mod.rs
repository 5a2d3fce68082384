//! Harness for whole-system tests: real `ward-coordinator` and `ward` binaries, started as
//! child processes, stopped by PID when the handle drops.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the binaries are: `WARD_BIN_DIR`, else `target/debug` of this workspace.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WARD_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build --workspace --bins`) or set WARD_BIN_DIR",
        p.display()
    );
    p
}

/// A free UDP port on loopback (bound and released; good enough for tests).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

/// A free TCP port on loopback, as an address (bound and released; good enough for tests).
pub fn free_tcp_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// `GET /metrics` on `addr`: the body of a 200 answer, else `None`.
pub fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.strip_prefix("HTTP/1.1 200 OK\r\n")?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let f = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(f.try_clone().expect("clone"))
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        Self { child, log }
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn term(&mut self) {
        // SAFETY: sending SIGTERM to our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

pub struct Coordinator {
    pub dir: PathBuf,
    pub port: u16,
    pub proc: Option<Proc>,
    /// Arguments added after `serve`.
    pub serve_args: Vec<String>,
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run command")
}

impl Coordinator {
    pub fn init(tmp: &Path) -> Self {
        Self::init_with(tmp, &[])
    }

    /// Initialises and starts a coordinator whose `serve` gets `serve_args` too.
    pub fn init_with(tmp: &Path, serve_args: &[&str]) -> Self {
        let dir = tmp.join("coord");
        let port = free_udp_port();
        let out = run(Command::new(bin("ward-coordinator"))
            .args(["--data-dir"])
            .arg(&dir)
            .args(["init", "--public-addr", &format!("127.0.0.1:{port}")]));
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut c = Self {
            dir,
            port,
            proc: None,
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
        };
        c.start();
        c
    }

    pub fn start(&mut self) {
        let log = self.dir.with_file_name(format!(
            "coord-{}.log",
            Instant::now().elapsed().as_nanos() % 100000 + std::process::id() as u128
        ));
        let p = Proc::spawn(
            Command::new(bin("ward-coordinator"))
                .arg("--data-dir")
                .arg(&self.dir)
                .arg("serve")
                .args(&self.serve_args)
                .env("WARD_LOG", "info"),
            log,
        );
        self.proc = Some(p);
        let sock = self.dir.join("admin.sock");
        wait_until("coordinator admin socket", Duration::from_secs(10), || {
            sock.exists() && self.try_admin(&["status"]).status.success()
        });
    }

    pub fn try_admin(&self, args: &[&str]) -> Output {
        run(Command::new(bin("ward-coordinator"))
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args))
    }

    /// Runs an admin command that must succeed; returns stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = self.try_admin(args);
        assert!(
            out.status.success(),
            "ward-coordinator {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn admin_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.admin(&a)).expect("json output")
    }

    pub fn token(&self, args: &[&str]) -> String {
        let mut a = vec!["token", "create"];
        a.extend_from_slice(args);
        self.admin(&a).trim().to_string()
    }

    /// Applies a policy (must succeed).
    pub fn apply_policy(&self, text: &str) {
        let f = self
            .dir
            .with_file_name(format!("policy-{}.toml", std::process::id()));
        std::fs::write(&f, text).expect("write policy");
        let path = f.to_string_lossy().to_string();
        self.admin(&["policy", "apply", &path]);
    }

    /// A policy under which every device of `user` may reach every other on any port.
    pub fn allow_user_devices(&self, user: &str) {
        self.apply_policy(&format!(
            "[services.mine]\ndevices = [\"user:{user}\"]\nports = [\"tcp/*\", \"udp/*\", \"icmp\"]\n\n[[rules]]\nname = \"{user}-mesh\"\nfrom = [\"user:{user}\"]\nto = [\"mine\"]\n"
        ));
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.admin_json(&["audit", "--limit", "100000"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

pub struct Agent {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub proc: Option<Proc>,
    pub extra: Vec<String>,
}

impl Agent {
    /// A control-plane-only agent (`--tun off`), runnable many times in one namespace.
    pub fn start(tmp: &Path, name: &str) -> Self {
        let mut a = Self {
            state_dir: tmp.join(format!("{name}-state")),
            socket: tmp.join(format!("{name}.sock")),
            proc: None,
            extra: vec!["--tun".into(), "off".into()],
        };
        a.restart();
        a
    }

    pub fn restart(&mut self) {
        let log = self.state_dir.with_extension(format!(
            "log{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0)
        ));
        let p = Proc::spawn(
            Command::new(bin("ward"))
                .arg("--socket")
                .arg(&self.socket)
                .arg("daemon")
                .arg("--state-dir")
                .arg(&self.state_dir)
                // Never the host's resolver configuration from a test.
                .env("WARD_DNS", "off")
                .args(&self.extra),
            log,
        );
        self.proc = Some(p);
        let sock = self.socket.clone();
        wait_until("agent socket", Duration::from_secs(10), || {
            sock.exists() && self.try_cli(&["status", "--json"]).status.success()
        });
    }

    pub fn try_cli(&self, args: &[&str]) -> Output {
        run(Command::new(bin("ward"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args))
    }

    /// `ward up` with the token in a 0600 file beside the socket (never on the command line,
    /// where other local users could read it).
    pub fn up(&self, token: &str, hostname: &str) -> Output {
        let file = self.socket.with_extension("token");
        write_private(&file, token);
        let file = file.to_string_lossy().into_owned();
        self.try_cli(&["up", "--token-file", &file, "--hostname", hostname])
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.try_cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    pub fn peer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.status()["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["hostname"].as_str().map(String::from))
            .collect();
        v.sort();
        v
    }
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("token file");
    f.write_all(text.as_bytes()).expect("token file written");
}
