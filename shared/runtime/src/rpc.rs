//! The JSON-lines RPC client for Ward's local sockets (the agent's API socket, the
//! coordinator's admin socket): one request line, one response line `{"ok":…,"data":…,"error":…}`.

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The most a response line may hold.
pub const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

/// The response envelope of every local API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub ok: bool,
    #[serde(default = "none")]
    pub data: Option<T>,
    #[serde(default)]
    pub error: Option<String>,
}

fn none<T>() -> Option<T> {
    None
}

impl<T> Envelope<T> {
    pub fn ok(data: T) -> Self {
        Self {
            ok: true,
            data: Some(data),
            error: None,
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(msg.into()),
        }
    }
}

/// Who answers on a socket, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// "the ward daemon", "the coordinator".
    pub name: &'a str,
    /// What to check when the socket cannot be reached.
    pub hint: &'a str,
}

/// Sends one request and reads one response. A refusal (`ok: false`) is an error carrying the
/// server's message.
pub async fn call<Req, Resp>(socket: &Path, peer: Peer<'_>, req: &Req) -> Result<Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => bail!(
            "cannot reach {} at {} ({e}); {}",
            peer.name,
            socket.display(),
            peer.hint
        ),
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.shutdown().await.ok();
    let mut resp = String::new();
    BufReader::new(r)
        .take(MAX_RESPONSE)
        .read_line(&mut resp)
        .await
        .with_context(|| format!("reading the answer of {}", peer.name))?;
    if resp.is_empty() {
        bail!("{} closed the connection without an answer", peer.name);
    }
    let env: Envelope<serde_json::Value> = serde_json::from_str(&resp)
        .with_context(|| format!("the answer of {} is not valid", peer.name))?;
    if !env.ok {
        bail!("{}", env.error.unwrap_or_else(|| "request failed".into()));
    }
    serde_json::from_value(env.data.unwrap_or(serde_json::Value::Null))
        .with_context(|| format!("the answer of {} is not what was asked for", peer.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn serve_once(answer: &'static str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            let _ = s.write_all(answer.as_bytes()).await;
        });
        (dir, path)
    }

    const P: Peer<'static> = Peer {
        name: "the test server",
        hint: "is it running?",
    };

    #[tokio::test]
    async fn data_refusal_and_garbage() {
        let (_d, p) = serve_once("{\"ok\":true,\"data\":{\"n\":3}}\n").await;
        let v: serde_json::Value = call(&p, P, &"hi").await.unwrap();
        assert_eq!(v["n"], 3);

        let (_d, p) = serve_once("{\"ok\":false,\"error\":\"no such user\"}\n").await;
        let e = call::<_, serde_json::Value>(&p, P, &"hi")
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "no such user");

        let (_d, p) = serve_once("garbage\n").await;
        let e = call::<_, serde_json::Value>(&p, P, &"hi")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not valid"), "{e}");

        let (_d, p) = serve_once("").await;
        let e = call::<_, serde_json::Value>(&p, P, &"hi")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("without an answer"), "{e}");

        let e = call::<_, serde_json::Value>(Path::new("/nonexistent/x.sock"), P, &"hi")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("is it running?"), "{e}");
    }
}
