//! Posture over real QUIC on loopback, with the real binaries: a posture-gated rule follows
//! a device's posture at its peer within seconds (both ways), the agent and the coordinator
//! explain why, and forged or replayed reports sent with the device's own credentials are
//! refused and audited.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::{wait_until, Agent, Coordinator};
use std::time::{Duration, Instant};
use ward_client::state::StateFile;
use ward_shared::posture::PostureReport;
use ward_shared::wire::{self, DeviceId, DeviceMsg, DeviceUpdate, Hello};

/// Whether `peer`'s inbound filter lets `from_ip` open `service`.
fn inbound_allows(peer: &Agent, service: &str, from_host: &str) -> bool {
    peer.status()["inbound"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| {
            r["service"] == service
                && r["from"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|f| f == from_host)
        })
}

fn requirement(a: &Agent, name: &str) -> Option<(bool, String)> {
    let v: serde_json::Value =
        serde_json::from_slice(&a.try_cli(&["posture", "--json"]).stdout).ok()?;
    v["verdict"]["results"]
        .as_array()?
        .iter()
        .find(|e| e["requirement"] == name)
        .map(|e| (e["passed"] == true, e["failures"].to_string()))
}

use ward_runtime::now_ms;

#[test]
fn posture_gates_rules_within_seconds_and_forged_reports_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("compliant");
    std::fs::write(&marker, b"ok").unwrap();
    let c = Coordinator::init(tmp.path());
    c.admin(&["user", "add", "pat"]);
    c.apply_policy(&format!(
        r#"
[posture.marker]
files = [{{ path = "{}" }}]

[services.gated]
devices = ["user:pat"]
ports = ["tcp/5432"]

[services.open]
devices = ["user:pat"]
ports = ["tcp/80"]

[[rules]]
name = "needs-marker"
from = ["user:pat"]
to = ["gated"]
posture = ["marker"]

[[rules]]
name = "always"
from = ["user:pat"]
to = ["open"]
"#,
        marker.display()
    ));
    let a = Agent::start(tmp.path(), "pa");
    let b = Agent::start(tmp.path(), "pb");
    assert!(a.up(&c.token(&["--user", "pat"]), "pa").status.success());
    assert!(b.up(&c.token(&["--user", "pat"]), "pb").status.success());

    wait_until("pa meets marker", Duration::from_secs(15), || {
        requirement(&a, "marker").is_some_and(|r| r.0)
    });
    wait_until("pb lets pa open gated", Duration::from_secs(5), || {
        inbound_allows(&b, "gated", "pa")
    });
    assert!(inbound_allows(&b, "open", "pa"));

    // Break it: pb's filter loses pa for "gated" (only), within 3 s; pa is told why.
    let t0 = Instant::now();
    std::fs::remove_file(&marker).unwrap();
    wait_until("pb drops pa from gated", Duration::from_secs(3), || {
        !inbound_allows(&b, "gated", "pa")
    });
    eprintln!(
        "posture break enforced at the peer after {:?}",
        t0.elapsed()
    );
    assert!(inbound_allows(&b, "open", "pa"), "posture-free access kept");
    wait_until("pa explains", Duration::from_secs(3), || {
        requirement(&a, "marker").is_some_and(|(ok, why)| {
            !ok && why.contains(&*marker.to_string_lossy()) && why.contains("missing")
        })
    });
    let st = a.status();
    assert!(
        st["unavailable"].to_string().contains("gated"),
        "ward status names the unavailable service: {}",
        st["unavailable"]
    );
    let show = c.admin_json(&["device", "show", "pa"]);
    assert!(
        show["posture"].to_string().contains("missing"),
        "{}",
        show["posture"]
    );

    // Restore it: back within 3 s.
    let t0 = Instant::now();
    std::fs::write(&marker, b"ok").unwrap();
    wait_until("pb lets pa in again", Duration::from_secs(3), || {
        inbound_allows(&b, "gated", "pa")
    });
    eprintln!(
        "posture restore enforced at the peer after {:?}",
        t0.elapsed()
    );

    // Forged and replayed reports, over a session with pa's own credentials.
    let st = StateFile::new(&a.state_dir).load().unwrap().unwrap();
    let pb_id = DeviceId(b.status()["device_id"].as_u64().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = ward_client::control::client_endpoint().unwrap();
        let cfg = ward_client::control::session_config(
            &st.ca_der.0,
            &st.cert_der.0,
            &st.identity_key_pem,
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", c.port).parse().unwrap();
        let mut ch = ward_client::control::Channel::open(&endpoint, cfg, addr)
            .await
            .unwrap();
        ch.send(&DeviceMsg::Hello(Hello {
            held_peers: Vec::new(),
            holding: None,
            protocol: wire::PROTOCOL_VERSION,
            os: "test".into(),
            version: "0".into(),
            update: DeviceUpdate::default(),
        }))
        .await
        .unwrap();
        // Wait for the netmap, so the session is the device's current one.
        let _ = tokio::time::timeout(Duration::from_secs(5), ch.recv()).await;
        let now = now_ms();
        // For another device.
        ch.send(&DeviceMsg::Posture(Box::new(PostureReport::unknown(
            pb_id,
            now as u64 + 10_000,
            now,
        ))))
        .await
        .unwrap();
        // A replay: an old sequence number.
        ch.send(&DeviceMsg::Posture(Box::new(PostureReport::unknown(
            st.device_id,
            1,
            now,
        ))))
        .await
        .unwrap();
        // Collected long ago.
        ch.send(&DeviceMsg::Posture(Box::new(PostureReport::unknown(
            st.device_id,
            now as u64 + 20_000,
            now - 3_600_000,
        ))))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        endpoint.close(0u32.into(), b"");
    });
    // All three refused (counted); the audit log has the first, rate-limited per device.
    wait_until("three refusals counted", Duration::from_secs(5), || {
        c.admin_json(&["status"])["posture"]["refused"].as_u64() == Some(3)
    });
    let refused: Vec<serde_json::Value> = c
        .audit()
        .into_iter()
        .filter(|e| e["action"] == "posture.refused" && e["target"] == "pa")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0]["detail"]["error"]
            .to_string()
            .contains("session is device"),
        "{refused:?}"
    );
    // The coordinator kept serving: pa's agent, whose session ours replaced, comes back.
    wait_until("pa reconnects", Duration::from_secs(15), || {
        a.status()["state"] == "connected"
    });
    assert!(inbound_allows(&b, "open", "pa"));
}
