//! `--metrics-listen`: the relay's counters in the Prometheus text format, served by a minimal
//! HTTP/1.1 handler (`GET /metrics`, one request per connection, bounded request size, time and
//! connection count).

use crate::core::{Refusal, Stats};
use crate::forward::{self, Drop};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Everything the relay counts, at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub discovery: Stats,
    pub forward: forward::Stats,
    pub control_up: bool,
}

/// Takes a [`Snapshot`] of the live counters.
pub type Shared = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// The counters as Prometheus text.
pub fn render(snap: &Snapshot) -> String {
    let s = &snap.discovery;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ward_relay_requests_total Address-discovery datagrams received.\n\
         # TYPE ward_relay_requests_total counter\n\
         ward_relay_requests_total {}",
        s.datagrams
    );
    let _ = writeln!(
        out,
        "# HELP ward_relay_answered_total Binding requests answered.\n\
         # TYPE ward_relay_answered_total counter\n\
         ward_relay_answered_total {}",
        s.answered
    );
    let _ = writeln!(
        out,
        "# HELP ward_relay_refused_total Datagrams not answered, by reason.\n\
         # TYPE ward_relay_refused_total counter"
    );
    for r in Refusal::ALL {
        let _ = writeln!(
            out,
            "ward_relay_refused_total{{reason=\"{}\"}} {}",
            r.as_str(),
            s.refused(r)
        );
    }
    let _ = writeln!(
        out,
        "# HELP ward_relay_sources Source addresses in the rate-limit table.\n\
         # TYPE ward_relay_sources gauge\n\
         ward_relay_sources {}",
        s.sources
    );
    let _ = writeln!(
        out,
        "# HELP ward_relay_sources_evicted_total Sources evicted from the full rate-limit table.\n\
         # TYPE ward_relay_sources_evicted_total counter\n\
         ward_relay_sources_evicted_total {}",
        s.evicted
    );
    render_forwarding(&mut out, &snap.forward, snap.control_up);
    out
}

fn render_forwarding(out: &mut String, f: &forward::Stats, control_up: bool) {
    let gauges = [
        (
            "ward_relay_devices",
            "Devices connected with an accepted ticket.",
            f.devices as u64,
        ),
        (
            "ward_relay_pending_connections",
            "Connections still waiting for their Hello.",
            f.pending as u64,
        ),
        (
            "ward_relay_control_up",
            "1 while the control session with the coordinator is up.",
            u64::from(control_up),
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let counters = [
        (
            "ward_relay_relayed_bytes_total",
            "WireGuard bytes forwarded between devices.",
            f.bytes_relayed,
        ),
        (
            "ward_relay_relayed_datagrams_total",
            "Datagrams forwarded between devices.",
            f.datagrams_relayed,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP ward_relay_dropped_total Datagrams from devices not forwarded, by reason.\n\
         # TYPE ward_relay_dropped_total counter"
    );
    for d in Drop::ALL {
        let _ = writeln!(
            out,
            "ward_relay_dropped_total{{reason=\"{}\"}} {}",
            d.as_str(),
            f.dropped(d)
        );
    }
    let _ = writeln!(
        out,
        "# HELP ward_relay_ticket_refusals_total Device connections refused, by reason.\n\
         # TYPE ward_relay_ticket_refusals_total counter"
    );
    for r in forward::Refusal::ALL {
        let _ = writeln!(
            out,
            "ward_relay_ticket_refusals_total{{reason=\"{}\"}} {}",
            r.as_str(),
            f.refused(r)
        );
    }
}

const MAX_REQUEST: usize = 4096;
const MAX_CONNECTIONS: usize = 16;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, stats: Shared) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics connection refused: too many open");
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, respond(conn, &stats)).await {
                tracing::debug!(%peer, error = %e, "metrics request timed out");
            }
            drop(permit);
        });
    }
}

async fn respond(mut conn: TcpStream, stats: &Shared) {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > MAX_REQUEST {
            let _ = write(&mut conn, "431 Request Header Fields Too Large", "").await;
            return;
        }
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", render(&stats())),
        (Some(b"GET"), _) => ("404 Not Found", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    let _ = write(&mut conn, status, &body).await;
}

async fn write(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter() {
        let text = render(&Snapshot::default());
        for want in [
            "ward_relay_devices 0",
            "ward_relay_control_up 0",
            "ward_relay_relayed_bytes_total 0",
            "ward_relay_dropped_total{reason=\"queue_full\"} 0",
            "ward_relay_ticket_refusals_total{reason=\"bad_signature\"} 0",
            "ward_relay_requests_total 0",
            "ward_relay_refused_total{reason=\"malformed\"} 0",
            "ward_relay_refused_total{reason=\"wrong_kind\"} 0",
            "ward_relay_refused_total{reason=\"rate_limited\"} 0",
            "ward_relay_sources 0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
