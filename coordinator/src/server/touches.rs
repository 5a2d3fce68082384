//! Device contact (last seen, WireGuard key, endpoints) written in batches.
//!
//! Every session open and every device update records contact. Written one by one, each was
//! its own transaction and WAL sync (`synchronous=FULL`) on the store's one connection, so an
//! admission wave of N sessions queued N syncs in front of the next session's device lookup.
//! Here the latest contact per device is kept in memory and written every [`EVERY`] in one
//! transaction. Contact is bookkeeping for `device ls`, never an acknowledged write and never
//! an input to access decisions: losing the last [`EVERY`] of it in a crash loses nothing the
//! coordinator promised.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, warn};

use ward_shared::wire::{DeviceId, WgPublicKey};

use crate::store::{Store, Touch};

/// How often pending contact is written.
pub(super) const EVERY: Duration = Duration::from_millis(250);

/// The latest contact of each device not yet written.
#[derive(Default)]
pub(super) struct Touches {
    pending: Mutex<BTreeMap<DeviceId, Touch>>,
}

impl Touches {
    /// Keeps `id`'s latest contact; a key already waiting is kept when this one names none
    /// (as the store's `COALESCE` does).
    pub(super) fn record(
        &self,
        id: DeviceId,
        wg: Option<WgPublicKey>,
        endpoints: &[SocketAddr],
        at_ms: i64,
    ) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let wg = wg.or_else(|| p.get(&id).and_then(|t| t.wg));
        p.insert(
            id,
            Touch {
                id,
                wg,
                endpoints: endpoints.to_vec(),
                at_ms,
            },
        );
    }

    /// Everything waiting, in device order; nothing waits afterwards.
    pub(super) fn take(&self) -> Vec<Touch> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *p).into_values().collect()
    }
}

/// Writes the pending contact every [`EVERY`], one transaction a batch, until the coordinator
/// stops.
pub(super) async fn write_loop(touches: Arc<Touches>, store: Arc<dyn Store>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let batch = touches.take();
        if batch.is_empty() {
            continue;
        }
        let n = batch.len();
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.touch_devices(&batch)).await {
            Ok(Ok(())) => debug!(devices = n, "device contact recorded"),
            Ok(Err(e)) => warn!(devices = n, error = %e, "recording device contact failed"),
            Err(e) => warn!(devices = n, error = %e, "recording device contact failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
    use super::*;

    /// The latest contact per device wins, a key already waiting survives an update naming
    /// none, and taking empties the batch.
    #[test]
    fn latest_contact_per_device_and_keys_are_kept() {
        let t = Touches::default();
        let key = WgPublicKey([7; 32]);
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:5000".parse().unwrap();
        t.record(DeviceId(2), Some(key), &[a], 10);
        t.record(DeviceId(1), None, &[], 11);
        t.record(DeviceId(2), None, &[b], 12);
        let got = t.take();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id, DeviceId(1));
        assert_eq!(got[1].id, DeviceId(2));
        assert_eq!(got[1].wg, Some(key), "the waiting key is kept");
        assert_eq!(got[1].endpoints, vec![b], "the latest endpoints win");
        assert_eq!(got[1].at_ms, 12);
        assert!(t.take().is_empty(), "taking empties the batch");
    }
}
