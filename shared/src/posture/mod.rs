//! Device posture: what a device reports about itself ([`PostureReport`]), what the
//! coordinator asks it to look at ([`PostureWants`]), and the I/O-free evaluation of a report
//! against the policy's named requirements (`[posture.NAME]`, see [`crate::policy::Posture`]).
//!
//! Every signal is [`Measured`]: a value or the reason it could not be read, and when it was
//! read (coordinator time, ms). A signal that could not be read fails every check that needs
//! it: missing data never passes (fail closed).
//!
//! The collectors that fill a report live in the device agent (they read the operating
//! system); nothing here does I/O.

mod eval;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wire::DeviceId;

pub use eval::{
    compare_versions, evaluate, evaluate_all, wants, Evaluation, DEFAULT_MAX_REPORT_AGE_MS,
    MAX_FUTURE_SKEW_MS,
};

/// Most processes, files or custom checks a coordinator asks for, or a report carries (each).
pub const MAX_WANTS: usize = 64;
/// Longest custom check output the agent reads (bytes); more is a failed check.
pub const MAX_CUSTOM_OUTPUT: usize = 64 * 1024;

/// One reading of a signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading<T> {
    Value(T),
    /// Could not be read, and why ("/etc/os-release: no such file").
    Error(String),
}

/// A reading and when it was taken (coordinator time, ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured<T> {
    pub at_ms: i64,
    pub reading: Reading<T>,
}

impl<T> Measured<T> {
    pub fn value(at_ms: i64, v: T) -> Self {
        Self {
            at_ms,
            reading: Reading::Value(v),
        }
    }
    pub fn error(at_ms: i64, why: impl Into<String>) -> Self {
        Self {
            at_ms,
            reading: Reading::Error(why.into()),
        }
    }
    pub fn get(&self) -> Result<&T, &str> {
        match &self.reading {
            Reading::Value(v) => Ok(v),
            Reading::Error(e) => Err(e),
        }
    }
}

/// The operating system, from os-release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsInfo {
    /// `ID`: `debian`, `ubuntu`, `fedora`.
    pub id: String,
    /// `VERSION_ID`: `12`, `24.04`; empty for rolling releases.
    pub version: String,
    /// `PRETTY_NAME`, for people.
    pub pretty: String,
}

/// A file the coordinator asked about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub present: bool,
    /// Lower-case hex SHA-256 of the contents, when present and hashing was asked for.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// What a device reports. Sent over the device's authenticated control session; the
/// coordinator also checks `device_id` against the session and refuses a `seq` it has seen
/// (replay) or a report collected too long ago.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostureReport {
    pub device_id: DeviceId,
    /// Strictly increasing per device (the agent uses the coordinator time of collection).
    pub seq: u64,
    /// When collection finished (coordinator time, ms).
    pub collected_at_ms: i64,
    pub os: Measured<OsInfo>,
    /// `uname -r`.
    pub kernel: Measured<String>,
    /// The agent's own version (`0.1.0`).
    pub ward_version: String,
    /// A host firewall with a default-drop (or reject) input policy is active.
    pub firewall: Measured<bool>,
    /// The root filesystem is on dm-crypt (LUKS).
    pub disk_encryption: Measured<bool>,
    /// `None`: no desktop session, nothing to lock.
    pub screen_lock: Measured<Option<bool>>,
    /// When the package database last changed (ms), if known.
    pub last_package_update_ms: Measured<i64>,
    /// Process name → running.
    #[serde(default)]
    pub processes: BTreeMap<String, Measured<bool>>,
    /// Absolute path → state.
    #[serde(default)]
    pub files: BTreeMap<String, Measured<FileState>>,
    /// Custom check name → the JSON object its executable printed.
    #[serde(default)]
    pub custom: BTreeMap<String, Measured<serde_json::Value>>,
}

impl PostureReport {
    /// A report that knows nothing: every signal unreadable ("not collected"), no processes,
    /// files or custom checks. It fails every check that needs a signal (fail closed); tests
    /// start from it and fill in what they need.
    pub fn unknown(device_id: DeviceId, seq: u64, at_ms: i64) -> Self {
        const NONE: &str = "not collected";
        PostureReport {
            device_id,
            seq,
            collected_at_ms: at_ms,
            os: Measured::error(at_ms, NONE),
            kernel: Measured::error(at_ms, NONE),
            ward_version: String::new(),
            firewall: Measured::error(at_ms, NONE),
            disk_encryption: Measured::error(at_ms, NONE),
            screen_lock: Measured::error(at_ms, NONE),
            last_package_update_ms: Measured::error(at_ms, NONE),
            processes: BTreeMap::new(),
            files: BTreeMap::new(),
            custom: BTreeMap::new(),
        }
    }

    /// This report with one file reading (`present`, no digest).
    pub fn with_file(mut self, path: &str, present: bool) -> Self {
        let at = self.collected_at_ms;
        self.files.insert(
            path.to_string(),
            Measured::value(
                at,
                FileState {
                    present,
                    sha256: None,
                },
            ),
        );
        self
    }
}

/// What the coordinator asks a device to look at, derived from the requirements of the policy
/// in force. Custom checks run only if the device's own configuration lists an executable for
/// that name: the coordinator never makes a device run something it names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PostureWants {
    #[serde(default)]
    pub processes: Vec<String>,
    /// Path and whether to hash it.
    #[serde(default)]
    pub files: Vec<(String, bool)>,
    #[serde(default)]
    pub custom: Vec<String>,
}
