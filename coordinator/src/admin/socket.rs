//! The admin socket: `DATA_DIR/admin.sock` (mode 0600, and the peer's uid must be the
//! coordinator's own or root), one JSON request line in, one [`Envelope`] line out.

use anyhow::{Context, Result};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tracing::warn;
use ward_runtime::rpc::Envelope;

use super::api::AdminReply;
use super::{AdminRequest, MAX_ADMIN_LINE};
use crate::datadir::DataDir;

/// Binds the admin socket, replacing a stale one; refuses if another coordinator answers on it.
pub async fn bind(dd: &DataDir) -> Result<tokio::net::UnixListener> {
    let path = dd.admin_socket();
    if path.exists() {
        // A live coordinator answers; a dead one left a stale socket behind.
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            anyhow::bail!(
                "another coordinator is already serving {}",
                dd.path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accepts admin connections for ever, one task each, answering with `handle`.
pub async fn serve<F, Fut>(l: tokio::net::UnixListener, handle: F)
where
    F: Fn(AdminRequest) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Envelope<AdminReply>> + Send,
{
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            // Only the coordinator's own user (or root) may administer it.
            let me = effective_uid();
            match stream.peer_cred() {
                Ok(c) if c.uid() == me || c.uid() == 0 => {}
                _ => {
                    warn!("admin connection from another user refused");
                    return;
                }
            }
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let resp = match BufReader::new(r)
                .take(MAX_ADMIN_LINE as u64)
                .read_line(&mut line)
                .await
            {
                Ok(_) => match serde_json::from_str::<AdminRequest>(&line) {
                    Ok(req) => handle(req).await,
                    Err(e) => Envelope::err(format!("bad admin request: {e}")),
                },
                Err(e) => Envelope::err(format!("reading admin request: {e}")),
            };
            let mut out = match serde_json::to_vec(&resp) {
                Ok(v) => v,
                Err(e) => serde_json::to_vec(&Envelope::<AdminReply>::err(format!(
                    "encoding the answer: {e}"
                )))
                .unwrap_or_default(),
            };
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The process's own /proc entry is owned by its effective uid.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}
