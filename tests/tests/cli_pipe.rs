//! The device CLI stops quietly when its reader has gone away (`ward status | head -0`): killed
//! by SIGPIPE like other command-line tools, never a panic ("failed printing to stdout") with
//! exit status 101. The reader is closed before the CLI writes, so the write always meets a
//! closed pipe.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::{bin, Agent};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn ward_status_into_a_closed_pipe_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(tmp.path(), "a");
    for args in [&["status"][..], &["status", "--json"][..], &["posture"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin("ward"))
            .arg("--socket")
            .arg(&agent.socket)
            .args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "ward {args:?}: {:?}, stderr: {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "ward {args:?}: {stderr}");
    }
}
