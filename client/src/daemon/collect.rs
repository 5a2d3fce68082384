//! Posture collection off the async threads. The cheap signals are collected on one blocking
//! task when the agent asks; custom checks run on their own blocking task (a slow one must not
//! delay the cheap signals) and their latest results are merged into every report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

use ward_shared::posture::{Measured, PostureReport, PostureWants};
use ward_shared::wire::DeviceId;

use crate::posture::{Collector, CollectorConfig};
use ward_runtime::now_ms;

pub struct Collectors {
    /// Only the cheap collection task takes this lock.
    collector: Arc<Mutex<Collector>>,
    custom: Arc<Mutex<Collector>>,
    custom_results: Arc<Mutex<BTreeMap<String, Measured<serde_json::Value>>>>,
    /// A collection is running (its report comes back on the channel).
    busy: Arc<AtomicBool>,
    custom_busy: Arc<AtomicBool>,
}

impl Collectors {
    pub fn new(cfg: &CollectorConfig) -> Self {
        Self {
            collector: Arc::new(Mutex::new(Collector::new(cfg.clone()))),
            custom: Arc::new(Mutex::new(Collector::new(cfg.clone()))),
            custom_results: Arc::new(Mutex::new(BTreeMap::new())),
            busy: Arc::new(AtomicBool::new(false)),
            custom_busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts one collection (unless one is still running) and the custom checks that are due;
    /// the report is sent on `tx`.
    pub fn start(
        &self,
        wants: PostureWants,
        device_id: DeviceId,
        seq: u64,
        offset: i64,
        tx: mpsc::Sender<PostureReport>,
    ) {
        self.start_custom(&wants.custom, offset);
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let collector = self.collector.clone();
        let results = self.custom_results.clone();
        let busy = self.busy.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = collector.lock().unwrap_or_else(|p| p.into_inner());
            let now = now_ms().saturating_add(offset);
            let cheap = PostureWants {
                custom: Vec::new(),
                ..wants.clone()
            };
            let mut report = c.collect(&cheap, device_id, seq, now);
            let done = results.lock().unwrap_or_else(|p| p.into_inner());
            report.custom = wants
                .custom
                .iter()
                .map(|n| {
                    let m = done
                        .get(n)
                        .cloned()
                        .unwrap_or_else(|| Measured::error(now, "not run yet"));
                    (n.clone(), m)
                })
                .collect();
            drop(done);
            busy.store(false, Ordering::Release);
            let _ = tx.blocking_send(report);
        });
    }

    /// Runs the custom checks that are due on their own blocking thread, one run at a time.
    fn start_custom(&self, wanted: &[String], offset: i64) {
        if wanted.is_empty() || self.custom_busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let wanted = wanted.to_vec();
        let custom = self.custom.clone();
        let results = self.custom_results.clone();
        let busy = self.custom_busy.clone();
        tokio::task::spawn_blocking(move || {
            let r = custom
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .custom_only(&wanted, now_ms().saturating_add(offset));
            *results.lock().unwrap_or_else(|p| p.into_inner()) = r;
            busy.store(false, Ordering::Release);
        });
    }
}
