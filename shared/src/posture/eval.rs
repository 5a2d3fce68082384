//! Evaluation of a posture report against named requirements. (Placeholder being replaced.)

use super::{PostureReport, PostureWants};
use crate::policy::{Policy, Posture};
use serde::{Deserialize, Serialize};

/// Reports older than this fail requirements that set no `max_report_age`.
pub const DEFAULT_MAX_REPORT_AGE_MS: u64 = 120_000;

/// The result of one requirement for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluation {
    pub requirement: String,
    pub passed: bool,
    /// One line per failed check.
    pub failures: Vec<String>,
}

pub fn evaluate(req: &Posture, report: Option<&PostureReport>, now_ms: i64) -> Evaluation {
    let _ = (report, now_ms);
    Evaluation {
        requirement: req.name.clone(),
        passed: false,
        failures: vec!["posture evaluation is not built yet".into()],
    }
}

pub fn evaluate_all(
    policy: &Policy,
    report: Option<&PostureReport>,
    now_ms: i64,
) -> Vec<Evaluation> {
    policy
        .postures
        .values()
        .map(|p| evaluate(p, report, now_ms))
        .collect()
}

pub fn wants(policy: &Policy) -> PostureWants {
    let _ = policy;
    PostureWants::default()
}
