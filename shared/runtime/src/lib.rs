//! `ward-runtime`: the operating-system edge that Ward's programs share, so each exists once:
//! the wall clock ([`now_ms`]), logging and runtime start-up ([`main`]), command-line tools that
//! stop quietly on a closed pipe ([`Mode::Cli`]), and the JSON-lines RPC client for local
//! sockets ([`rpc`]), dual-stack UDP sockets for the QUIC endpoints ([`net`]), and reading
//! frames from QUIC streams and pinning a CA by fingerprint ([`quic`]), and frames over any stream
//! plus TLS over TCP, the fallback for networks that drop UDP ([`stream`]), and the Prometheus
//! exposition writer and `/metrics` responder behind every program's `--metrics-listen` ([`metrics`]),
//! and letting go of read-only pages a long-running program no longer runs ([`pages`]).
//!
//! I/O-free cores (`ward-shared`, the agent and registry cores) must not depend on this crate:
//! they take time as an argument. Only drivers and binaries use it.

pub mod metrics;
pub mod net;
pub mod pages;
pub mod quic;
pub mod rpc;
pub mod stream;

use std::future::Future;

/// Milliseconds since the Unix epoch by this machine's clock (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How a program run behaves on a closed standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A long-running service (`ward daemon`, `ward-coordinator serve`): a peer that closes a
    /// socket must never kill it, so `SIGPIPE` stays ignored and writes fail with `EPIPE`.
    Service,
    /// A command that prints and exits: when the reader of its output goes away
    /// (`ward status | head -1`) it stops quietly, like other command-line tools, instead of
    /// panicking in `println!`.
    Cli,
}

/// The shared `main` of every Ward binary: logging to stderr filtered by `WARD_LOG` (else
/// `default_filter`), a multi-threaded tokio runtime, and one `error: …` line on stderr with
/// exit status 1 when `run` fails.
pub fn main<F>(default_filter: &str, mode: Mode, run: F) -> !
where
    F: Future<Output = anyhow::Result<()>>,
{
    main_on(
        default_filter,
        mode,
        tokio::runtime::Builder::new_multi_thread(),
        run,
    )
}

/// [`main`] on a single-threaded tokio runtime (the main thread runs every task), for a
/// program whose heavy work runs on threads of its own: the device daemon, whose data plane
/// has its own OS threads and whose control plane is light. Saves the worker threads' stacks
/// and malloc arenas. `spawn_blocking` still runs blocking work on the blocking pool.
pub fn main_current_thread<F>(default_filter: &str, mode: Mode, run: F) -> !
where
    F: Future<Output = anyhow::Result<()>>,
{
    main_on(
        default_filter,
        mode,
        tokio::runtime::Builder::new_current_thread(),
        run,
    )
}

fn main_on<F>(default_filter: &str, mode: Mode, mut builder: tokio::runtime::Builder, run: F) -> !
where
    F: Future<Output = anyhow::Result<()>>,
{
    if mode == Mode::Cli {
        restore_default_sigpipe();
    }
    init_logging(default_filter);
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Caps glibc's malloc arenas at `arenas` (at least 1), unless the operator set
/// `MALLOC_ARENA_MAX` or a `glibc.malloc.arena_max` tunable. glibc gives a thread that meets
/// contention an arena of its own, up to 8 per CPU, and memory freed in one arena does not
/// serve another. The coordinator caps at the CPU count: its blocking pool runs dozens of
/// threads (store calls), and at 10 000 control sessions its steady RSS was 1 073–1 079 MiB
/// with glibc's default, 983 MiB with two arenas (bench/README.md, "A control session's
/// memory"); it has since moved its Rust heap to jemalloc, and the cap still bounds what C
/// libraries (SQLite) allocate through glibc. The device daemon uses one: its few threads'
/// hot paths reuse their buffers rather than allocate, and one arena held 0.5–0.6 MiB less at
/// peak under the soak's mixed traffic at the same throughput (bench/README.md, "An answer
/// read without sleeping; one malloc arena"). Call before any other thread starts.
pub fn cap_malloc_arenas(arenas: usize) {
    let tunable = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| sets_arena_max(&t));
    if tunable || std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let arenas = libc::c_int::try_from(arenas.max(1)).unwrap_or(libc::c_int::MAX);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; it runs before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Whether a `GLIBC_TUNABLES` value sets the arena limit (`glibc.malloc.arena_max=N`).
fn sets_arena_max(tunables: &str) -> bool {
    tunables
        .split(':')
        .any(|t| t.trim().starts_with("glibc.malloc.arena_max="))
}

/// Logging to stderr, filtered by `WARD_LOG` (tracing's `EnvFilter` syntax) or `default_filter`.
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // A second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Rust ignores `SIGPIPE`, so `println!` to a closed pipe panics. A command-line tool should
/// instead end silently, which the default disposition does.
fn restore_default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL has no memory-safety requirements; it
    // runs before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_after_2020() {
        assert!(now_ms() > 1_577_836_800_000);
    }

    #[test]
    fn an_operators_arena_limit_is_recognised() {
        assert!(sets_arena_max("glibc.malloc.arena_max=4"));
        assert!(sets_arena_max(
            "glibc.malloc.mmap_threshold=65536:glibc.malloc.arena_max=2"
        ));
        assert!(!sets_arena_max("glibc.malloc.mmap_threshold=65536"));
        assert!(!sets_arena_max("glibc.malloc.arena_test=2"));
        assert!(!sets_arena_max(""));
    }
}
