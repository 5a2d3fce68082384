//! The local API between `ward` (the CLI) and `ward daemon`: one JSON request line, one JSON
//! response line, over a Unix socket (mode 0600). Never a TCP listener: a web page must not be
//! able to reach it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub const MAX_API_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Up {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        hostname: Option<String>,
    },
    Down,
    Status,
    /// This device's posture signals and the coordinator's verdict.
    Posture,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub error: Option<String>,
}

pub async fn call(socket: &Path, req: &Request) -> Result<serde_json::Value> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the ward daemon at {} ({e}); is `ward daemon` running?",
            socket.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut resp = String::new();
    BufReader::new(r)
        .take(64 * 1024 * 1024)
        .read_line(&mut resp)
        .await
        .context("reading the daemon's answer")?;
    if resp.is_empty() {
        bail!("the daemon closed the connection without an answer");
    }
    let resp: Response = serde_json::from_str(&resp).context("the daemon's answer is not valid")?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "request failed".into()));
    }
    Ok(resp.data)
}
