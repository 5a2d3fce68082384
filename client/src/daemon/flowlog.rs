//! The flow log's driver side: its configuration from the environment and its state file.
//!
//! `STATE_DIR/flows.json` (mode 0600, replaced atomically) holds the next report number, the
//! dropped-record count and the reports the coordinator has not acknowledged, so that a
//! restarted daemon neither reuses a number (the coordinator would take the new report for a
//! retransmission) nor loses what it had not delivered. It is written when that state changes
//! (at most once per loop turn; reports are seconds apart) and at stop, after the window being
//! filled is closed.
//!
//! Hidden settings (environment, for tests): `WARD_FLOW_WINDOW` (a duration, default 60s),
//! `WARD_FLOW_SPOOL_RECORDS` (records kept unacknowledged), and, test only,
//! `WARD_TEST_FLOW_UNDERREPORT=PERCENT`, which makes this device report that much less traffic
//! than it saw (to show that the coordinator flags the mismatch).

use anyhow::Result;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use tracing::warn;

use crate::agent::flows::{FlowLogConfig, FlowLogState};

/// Largest flows.json read back (a full spool is far smaller).
const MAX_STATE_BYTES: u64 = 32 << 20;

/// The flow log's configuration: defaults, changed by the hidden environment settings.
pub(super) fn config_from_env() -> FlowLogConfig {
    config_from(|k| std::env::var(k).ok())
}

fn config_from(var: impl Fn(&str) -> Option<String>) -> FlowLogConfig {
    let mut cfg = FlowLogConfig::default();
    if let Some(v) = var("WARD_FLOW_WINDOW") {
        match ward_shared::duration::parse_ms(v.trim()) {
            Ok(ms) if ms > 0 => cfg.window_ms = i64::try_from(ms).unwrap_or(i64::MAX),
            _ => {
                warn!(value = %v, "WARD_FLOW_WINDOW is not a positive duration; using the default")
            }
        }
    }
    if let Some(v) = var("WARD_FLOW_SPOOL_RECORDS") {
        match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => cfg.max_spool_records = n,
            _ => {
                warn!(value = %v, "WARD_FLOW_SPOOL_RECORDS is not a positive number; using the default")
            }
        }
    }
    if let Some(v) = var("WARD_TEST_FLOW_UNDERREPORT") {
        match v.trim().parse::<u8>() {
            Ok(p) if p <= 100 => {
                warn!(percent = p, "TEST ONLY: WARD_TEST_FLOW_UNDERREPORT is set: this device under-reports its flow counts");
                cfg.underreport_percent = p;
            }
            _ => warn!(value = %v, "WARD_TEST_FLOW_UNDERREPORT is not a percentage; ignored"),
        }
    }
    cfg
}

pub(super) struct FlowStateFile {
    path: PathBuf,
}

impl FlowStateFile {
    pub(super) fn new(dir: &Path) -> FlowStateFile {
        FlowStateFile {
            path: dir.join("flows.json"),
        }
    }

    /// The saved state; `None` if there is none or it cannot be read (then numbering starts
    /// over, said at WARN).
    pub(super) fn load(&self) -> Option<FlowLogState> {
        let f = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot read the flow log state");
                return None;
            }
        };
        let mut raw = Vec::new();
        if let Err(e) = f.take(MAX_STATE_BYTES).read_to_end(&mut raw) {
            warn!(path = %self.path.display(), error = %e, "cannot read the flow log state");
            return None;
        }
        match serde_json::from_slice(&raw) {
            Ok(st) => Some(st),
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "flow log state unreadable; starting over");
                None
            }
        }
    }

    /// Atomic replace: a 0600 temp file, then rename.
    pub(super) fn save(&self, st: &FlowLogState) -> Result<()> {
        crate::state::write_private(&self.path, &serde_json::to_vec(st)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hidden_settings_parse_and_bad_values_keep_defaults() {
        let cfg = config_from(|k| match k {
            "WARD_FLOW_WINDOW" => Some("5s".into()),
            "WARD_FLOW_SPOOL_RECORDS" => Some("10".into()),
            "WARD_TEST_FLOW_UNDERREPORT" => Some("50".into()),
            _ => None,
        });
        assert_eq!(cfg.window_ms, 5_000);
        assert_eq!(cfg.max_spool_records, 10);
        assert_eq!(cfg.underreport_percent, 50);
        let cfg = config_from(|k| match k {
            "WARD_FLOW_WINDOW" => Some("soon".into()),
            "WARD_FLOW_SPOOL_RECORDS" => Some("0".into()),
            "WARD_TEST_FLOW_UNDERREPORT" => Some("101".into()),
            _ => None,
        });
        assert_eq!(cfg, FlowLogConfig::default());
    }

    #[test]
    fn state_survives_a_save_and_load_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let f = FlowStateFile::new(dir.path());
        assert_eq!(f.load(), None);
        let st = FlowLogState {
            next_seq: 7,
            dropped_records: 3,
            last_acked: Some(5),
            spool: vec![],
        };
        f.save(&st).unwrap();
        assert_eq!(f.load(), Some(st));
        let mode = fs::metadata(dir.path().join("flows.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(dir.path().join("flows.json"), b"{garbage").unwrap();
        assert_eq!(f.load(), None);
    }
}
