//! The local API between `ward` (the CLI) and `ward daemon`: one JSON request line, one JSON
//! response line, over a Unix socket (mode 0600). Never a TCP listener: a web page must not be
//! able to reach it.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

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

/// Sends one request to the local agent.
pub async fn call(socket: &Path, req: &Request) -> Result<serde_json::Value> {
    ward_runtime::rpc::call(
        socket,
        ward_runtime::rpc::Peer {
            name: "the ward daemon",
            hint: "is `ward daemon` running?",
        },
        req,
    )
    .await
}
