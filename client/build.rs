//! Release builds of `ward` link the functions the daemon is known to run next to each other,
//! in the order `link-order.txt` lists them (made by `bench/order.sh`; names not in this build
//! are skipped). The kernel maps a binary's code into a process 64 KiB around each first touch,
//! so code spread over the whole text made about 9 MiB of it resident in every daemon; packed,
//! what the daemon runs fits in about 3 MiB (bench/README.md, "The daemon's code in one place").
//!
//! The same builds pack the binary's relative relocations (`-z pack-relative-relocs`, DT_RELR):
//! the loader reads every relocation at start, so 570 KB of them were resident in every daemon
//! for good; packed they are a few KB. The loader must know DT_RELR (glibc 2.36 or later, checked
//! on the building machine, which is the one that runs the daemon in this project's builds).
//!
//! Only where the link goes through lld, which reads the list: rustc's own lld is the default
//! linker for x86_64-unknown-linux-gnu from Rust 1.90 on. Another target, an older rustc, a
//! rustc without its lld, or a linker of one's own (`RUSTC_LINKER`, `-C linker` or `-fuse-ld`
//! in the flags) leaves the default layout and relocations; `WARD_LINK_ORDER=0` the default
//! layout.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=WARD_LINK_ORDER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = env::var("TARGET").unwrap_or_default();
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let own_linker = env::var_os("RUSTC_LINKER").is_some()
        || flags.contains("linker")
        || flags.contains("fuse-ld");
    let off = env::var("WARD_LINK_ORDER").is_ok_and(|v| v == "0");
    if !release || target != "x86_64-unknown-linux-gnu" || own_linker || !rustc_lld() {
        return;
    }
    if glibc_minor().is_some_and(|m| m >= 36) {
        println!("cargo:rustc-link-arg-bin=ward=-Wl,-z,pack-relative-relocs");
    }
    if off {
        return;
    }
    let Ok(dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let list = Path::new(&dir).join("link-order.txt");
    if !list.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=ward=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo:rustc-link-arg-bin=ward=-Wl,--no-warn-symbol-ordering");
}

/// The minor version of this machine's glibc (`getconf GNU_LIBC_VERSION`: "glibc 2.36").
fn glibc_minor() -> Option<u32> {
    let out = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().strip_prefix("glibc ")?;
    let mut parts = version.split('.');
    (parts.next()? == "2").then_some(())?;
    parts.next()?.parse().ok()
}

/// Whether this rustc links the target with its own lld by default: 1.90 or later, with the
/// lld it ships in its sysroot (a rustc packaged without it links with the system's linker,
/// which may not take the list).
fn rustc_lld() -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let ask = |arg: &str| -> Option<String> {
        let out = Command::new(&rustc).arg(arg).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let minor = ask("--version").and_then(|v| {
        v.split_whitespace()
            .nth(1)
            .and_then(|v| v.split('.').nth(1))
            .and_then(|m| m.parse::<u32>().ok())
    });
    let lld = ask("--print=sysroot").is_some_and(|root| {
        Path::new(&root)
            .join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld/ld.lld")
            .is_file()
    });
    minor.is_some_and(|m| m >= 90) && lld
}
