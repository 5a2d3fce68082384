//! Evaluation of a posture report against the policy's named requirements, and what to ask
//! devices to report. Pure functions of (requirement, report, `now_ms`): the coordinator calls
//! them whenever a report arrives, a policy is applied or a report ages out, and the same inputs
//! always give the same verdict and the same failure lines.
//!
//! Fail closed: no report, a stale report or signal, a signal the agent could not read, a
//! process/file/custom check it did not report, or a value of the wrong shape fails the check
//! that needs it. Every failed check gives one line, prefixed by the check's name, fit to show
//! an admin (`policy explain`) or the device's user (`ward status`). Text the device sent is
//! quoted or cut to one short line, since a device could otherwise write into those outputs.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Measured, PostureReport, PostureWants, MAX_WANTS};
use crate::policy::{Policy, Posture, VersionOp};

/// Reports (and the signals in them) older than this fail requirements that set no
/// `max_report_age`. Agents report at least every 30 s by default, so a device fails only after
/// several missed reports, not after one late one.
pub const DEFAULT_MAX_REPORT_AGE_MS: u64 = 120_000;

/// How far in the future (coordinator time) a report or a signal may claim to have been
/// measured. Agents stamp with coordinator time corrected for the measured clock offset, so
/// honest stamps are off by a round trip at most; a stamp far ahead would otherwise keep a
/// report "fresh" long after it was made.
pub const MAX_FUTURE_SKEW_MS: u64 = 30_000;

/// Longest piece of device-sent text (error, value) quoted in a failure line.
const MAX_QUOTED: usize = 96;

/// The result of one requirement for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluation {
    pub requirement: String,
    pub passed: bool,
    /// One line per failed check (`"firewall: no host firewall is active"`); empty iff passed.
    pub failures: Vec<String>,
}

/// Evaluates one requirement against a device's latest report (or `None`: it sent none).
/// Only the checks the requirement sets are looked at; a requirement that sets none still needs
/// a fresh report.
pub fn evaluate(req: &Posture, report: Option<&PostureReport>, now_ms: i64) -> Evaluation {
    let failures = match report {
        None => vec!["report: no posture report from this device".to_string()],
        Some(r) => Checker::new(req, r, now_ms).run(),
    };
    Evaluation {
        requirement: req.name.clone(),
        passed: failures.is_empty(),
        failures,
    }
}

/// Evaluates every requirement of the policy, in name order.
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

/// What devices must report for the policy's requirements to be evaluated: the union over all
/// requirements of processes, files (hashed if any requirement pins the file's sha256) and
/// custom checks, each sorted, deduplicated and at most [`MAX_WANTS`] long (the parser refuses
/// policies that name more, so nothing is cut from a parsed policy).
pub fn wants(policy: &Policy) -> PostureWants {
    let mut processes = BTreeSet::new();
    let mut files: BTreeMap<&str, bool> = BTreeMap::new();
    let mut custom = BTreeSet::new();
    for p in policy.postures.values() {
        processes.extend(p.processes.iter().cloned());
        for f in &p.files {
            *files.entry(f.path.as_str()).or_default() |= f.sha256.is_some();
        }
        custom.extend(p.custom.keys().cloned());
    }
    PostureWants {
        processes: processes.into_iter().take(MAX_WANTS).collect(),
        files: files
            .into_iter()
            .take(MAX_WANTS)
            .map(|(p, h)| (p.to_string(), h))
            .collect(),
        custom: custom.into_iter().take(MAX_WANTS).collect(),
    }
}

/// Compares two versions: dot-separated components, compared left to right; a missing
/// or empty component counts as `0` (`12` == `12.0`). Two numeric components compare as numbers (of any
/// length: `10` > `9`). Otherwise a component's leading digits compare as numbers and the rest
/// as text (`10a` < `10b`, `2` < `2rc1`); a component without leading digits compares as text
/// with the other one. Total and deterministic on any input; never panics.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let mut xs = a.split('.');
    let mut ys = b.split('.');
    loop {
        let (x, y) = match (xs.next(), ys.next()) {
            (None, None) => return Ordering::Equal,
            (x, y) => (x.unwrap_or("0"), y.unwrap_or("0")),
        };
        let ord = compare_component(x, y);
        if ord != Ordering::Equal {
            return ord;
        }
    }
}

fn compare_component(x: &str, y: &str) -> Ordering {
    // An empty component (`""`, `12.`) is as absent as a missing one.
    let x = if x.is_empty() { "0" } else { x };
    let y = if y.is_empty() { "0" } else { y };
    let split = |s: &str| -> (String, String) {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        (s[..n].to_string(), s[n..].to_string())
    };
    let ((xd, xr), (yd, yr)) = (split(x), split(y));
    if xd.is_empty() || yd.is_empty() {
        return x.cmp(y);
    }
    compare_digits(&xd, &yd).then_with(|| xr.cmp(&yr))
}

/// Numeric order of two non-empty digit strings without parsing (no overflow on long ones).
fn compare_digits(x: &str, y: &str) -> Ordering {
    let x = x.trim_start_matches('0');
    let y = y.trim_start_matches('0');
    x.len().cmp(&y.len()).then_with(|| x.cmp(y))
}

/// The numeric prefix of a kernel release (`6.1.0-18-amd64` → `6.1.0`), if it has one.
fn kernel_version(release: &str) -> Option<&str> {
    let n = release
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let v = release[..n].trim_end_matches('.');
    (!v.is_empty() && !v.starts_with('.')).then_some(v)
}

/// One requirement against one report.
struct Checker<'a> {
    req: &'a Posture,
    report: &'a PostureReport,
    now_ms: i64,
    max_age_ms: u64,
    /// The report as a whole is too old or too new; signal ages are then not reported one by
    /// one (they would all repeat it).
    report_stale: bool,
    failures: Vec<String>,
}

impl<'a> Checker<'a> {
    fn new(req: &'a Posture, report: &'a PostureReport, now_ms: i64) -> Self {
        Self {
            req,
            report,
            now_ms,
            max_age_ms: req.max_report_age_ms.unwrap_or(DEFAULT_MAX_REPORT_AGE_MS),
            report_stale: false,
            failures: Vec::new(),
        }
    }

    fn run(mut self) -> Vec<String> {
        if let Some(why) = self.age_problem(self.report.collected_at_ms, false) {
            self.report_stale = true;
            self.fail("report", why);
        }
        let (req, report) = (self.req, self.report);
        self.os();
        self.kernel();
        self.min_ward_version();
        self.flag(
            "firewall",
            req.firewall,
            &report.firewall,
            "no host firewall with a default-drop input policy is active",
            "a host firewall is active",
        );
        self.flag(
            "disk_encryption",
            req.disk_encryption,
            &report.disk_encryption,
            "root filesystem is not on dm-crypt",
            "root filesystem is encrypted",
        );
        self.screen_lock();
        self.max_package_age();
        self.processes();
        self.files();
        self.custom();
        self.failures
    }

    fn fail(&mut self, check: &str, why: impl AsRef<str>) {
        self.failures
            .push(one_line(&format!("{check}: {}", why.as_ref()), usize::MAX));
    }

    /// Why a stamp (`collected_at_ms`, or a signal's `at_ms` when `signal`) does not count, if
    /// it does not: `185 s old, …` for the report, `measured 185 s ago, …` for a signal.
    fn age_problem(&self, at_ms: i64, signal: bool) -> Option<String> {
        let age = i128::from(self.now_ms) - i128::from(at_ms);
        if age > i128::from(self.max_age_ms) {
            let (before, after) = if signal {
                ("measured ", "ago")
            } else {
                ("", "old")
            };
            return Some(format!(
                "{before}{} {after}, more than the {} allowed",
                secs(age),
                secs(i128::from(self.max_age_ms))
            ));
        }
        if -age > i128::from(MAX_FUTURE_SKEW_MS) {
            let verb = if signal { "measured" } else { "collected" };
            return Some(format!(
                "{verb} {} in the future (device clock not corrected?)",
                secs(-age)
            ));
        }
        None
    }

    /// The value of a signal a check needs, or the failure line's reason.
    fn signal<T>(&self, m: &'a Measured<T>) -> Result<&'a T, String> {
        let v = m
            .get()
            .map_err(|e| format!("could not be read: {}", one_line(e, MAX_QUOTED)))?;
        if !self.report_stale {
            if let Some(why) = self.age_problem(m.at_ms, true) {
                return Err(why);
            }
        }
        Ok(v)
    }

    fn os(&mut self) {
        if self.req.os.is_empty() {
            return;
        }
        let os = match self.signal(&self.report.os) {
            Ok(os) => os,
            Err(why) => return self.fail("os", why),
        };
        let ok = self.req.os.iter().any(|alt| {
            os.id.eq_ignore_ascii_case(&alt.name)
                && match &alt.version {
                    None => true,
                    // An unknown version (rolling release) satisfies no version bound.
                    Some((op, v)) => !os.version.is_empty() && holds(&os.version, *op, v),
                }
        });
        if ok {
            return;
        }
        let have = if os.version.is_empty() {
            format!("{} (no version)", os.id)
        } else {
            format!("{} {}", os.id, os.version)
        };
        let want: Vec<String> = self.req.os.iter().map(ToString::to_string).collect();
        let want = match want.len() {
            1 => want.join(""),
            _ => format!("any of {}", want.join(", ")),
        };
        self.fail(
            "os",
            format!("{} does not satisfy {want}", one_line(&have, MAX_QUOTED)),
        );
    }

    fn kernel(&mut self) {
        let Some((op, want)) = &self.req.kernel else {
            return;
        };
        let release = match self.signal(&self.report.kernel) {
            Ok(r) => r,
            Err(why) => return self.fail("kernel", why),
        };
        let shown = one_line(release, MAX_QUOTED);
        match kernel_version(release) {
            None => self.fail("kernel", format!("no version number in {shown:?}")),
            Some(have) if holds(have, *op, want) => {}
            Some(_) => self.fail("kernel", format!("{shown} does not satisfy {op}{want}")),
        }
    }

    fn min_ward_version(&mut self) {
        let Some(want) = &self.req.min_ward_version else {
            return;
        };
        let raw = self.report.ward_version.as_str();
        // `0.3.0-dev` and `0.3.0+abc` are builds of 0.3.0.
        let have = raw.split(['-', '+']).next().unwrap_or_default();
        let numeric = !have.is_empty()
            && have
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !numeric {
            let shown = one_line(raw, MAX_QUOTED);
            return self.fail(
                "min_ward_version",
                format!("agent version {shown:?} is not a version"),
            );
        }
        if compare_versions(have, want) == Ordering::Less {
            self.fail(
                "min_ward_version",
                format!("agent {} is older than {want}", one_line(raw, MAX_QUOTED)),
            );
        }
    }

    /// A yes/no signal that must equal the requirement.
    fn flag(
        &mut self,
        check: &str,
        want: Option<bool>,
        m: &'a Measured<bool>,
        when_false: &str,
        when_true: &str,
    ) {
        let Some(want) = want else {
            return;
        };
        match self.signal(m) {
            Err(why) => self.fail(check, why),
            Ok(have) if *have == want => {}
            Ok(true) => self.fail(
                check,
                format!("{when_true}, but the requirement is {check} = false"),
            ),
            Ok(false) => self.fail(check, when_false),
        }
    }

    /// `None` (no desktop session) passes: a server or a headless box has no screen to leave
    /// unlocked, and requiring a lock there would only exclude it for nothing.
    fn screen_lock(&mut self) {
        let Some(want) = self.req.screen_lock else {
            return;
        };
        match self.signal(&self.report.screen_lock) {
            Err(why) => self.fail("screen_lock", why),
            Ok(None) => {}
            Ok(Some(have)) if *have == want => {}
            Ok(Some(true)) => self.fail(
                "screen_lock",
                "the screen locks itself, but the requirement is screen_lock = false",
            ),
            Ok(Some(false)) => self.fail("screen_lock", "the screen does not lock itself"),
        }
    }

    fn max_package_age(&mut self) {
        let Some(max) = self.req.max_package_age_ms else {
            return;
        };
        let last = match self.signal(&self.report.last_package_update_ms) {
            Ok(t) => *t,
            Err(why) => return self.fail("max_package_age", why),
        };
        let age = i128::from(self.now_ms) - i128::from(last);
        if age > i128::from(max) {
            self.fail(
                "max_package_age",
                format!(
                    "packages last changed {} ago, more than the {} allowed",
                    days(age),
                    days(i128::from(max))
                ),
            );
        } else if -age > i128::from(MAX_FUTURE_SKEW_MS) {
            self.fail(
                "max_package_age",
                format!(
                    "packages last changed {} in the future (device clock not corrected?)",
                    secs(-age)
                ),
            );
        }
    }

    fn processes(&mut self) {
        let req = self.req;
        for name in &req.processes {
            let check = format!("process {name}");
            match self.report.processes.get(name).map(|m| self.signal(m)) {
                None => self.fail(&check, "not reported"),
                Some(Err(why)) => self.fail(&check, why),
                Some(Ok(true)) => {}
                Some(Ok(false)) => self.fail(&check, "not running"),
            }
        }
    }

    fn files(&mut self) {
        let req = self.req;
        for f in &req.files {
            let check = format!("file {}", f.path);
            let state = match self.report.files.get(&f.path).map(|m| self.signal(m)) {
                None => {
                    self.fail(&check, "not reported");
                    continue;
                }
                Some(Err(why)) => {
                    self.fail(&check, why);
                    continue;
                }
                Some(Ok(s)) => s,
            };
            if !state.present {
                self.fail(&check, "missing");
                continue;
            }
            let Some(want) = &f.sha256 else {
                continue;
            };
            let Some(have) = &state.sha256 else {
                self.fail(&check, "not hashed");
                continue;
            };
            let mut got = [0u8; 32];
            if hex::decode_to_slice(have, &mut got).is_err() {
                self.fail(&check, "sha256 is not 64 hexadecimal digits");
            } else if got != *want {
                // Both are 64 ASCII hex digits here (decoded above / encoded), so the slices
                // below are on character boundaries.
                let want = hex::encode(want);
                self.fail(
                    &check,
                    format!(
                        "sha256 {}… does not match the required {}…",
                        &have.to_ascii_lowercase()[..12],
                        &want[..12]
                    ),
                );
            }
        }
    }

    fn custom(&mut self) {
        let req = self.req;
        for (name, want) in &req.custom {
            let check = format!("custom {name}");
            let out = match self.report.custom.get(name).map(|m| self.signal(m)) {
                None => {
                    self.fail(
                        &check,
                        "not reported (is an executable configured for it on the device?)",
                    );
                    continue;
                }
                Some(Err(why)) => {
                    self.fail(&check, why);
                    continue;
                }
                Some(Ok(v)) => v,
            };
            let serde_json::Value::Object(out) = out else {
                self.fail(
                    &check,
                    format!("output is {}, not a JSON object", describe(out)),
                );
                continue;
            };
            let mut why = Vec::new();
            match want {
                serde_json::Value::Object(want) => match_object("", want, out, &mut why),
                // The parser admits only `true` and tables at the top level; anything else
                // must not pass by accident.
                serde_json::Value::Bool(true) => match out.get("pass") {
                    Some(serde_json::Value::Bool(true)) => {}
                    Some(v) => why.push(format!("pass is {}, not true", describe(v))),
                    None => why.push("pass missing from the output".to_string()),
                },
                other => why.push(format!(
                    "requirement {} is neither true nor a table",
                    describe(other)
                )),
            }
            for w in why {
                self.fail(&check, w);
            }
        }
    }
}

/// Whether version `have` satisfies `op want`.
fn holds(have: &str, op: VersionOp, want: &str) -> bool {
    op.holds(compare_versions(have, want))
}

/// Matches a custom check's output object against the requirement table: numbers are minimums,
/// tables recurse, anything else must be equal. Recursion depth is that of the requirement,
/// which the policy parser bounds.
fn match_object(
    prefix: &str,
    want: &serde_json::Map<String, serde_json::Value>,
    have: &serde_json::Map<String, serde_json::Value>,
    why: &mut Vec<String>,
) {
    use serde_json::Value as J;
    for (k, w) in want {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let Some(h) = have.get(k) else {
            why.push(format!("{key} missing from the output"));
            continue;
        };
        match (w, h) {
            (J::Number(w), J::Number(h)) => {
                if compare_numbers(h, w) == Ordering::Less {
                    why.push(format!("{key} {h} is below the required {w}"));
                }
            }
            (J::Number(_), h) => {
                why.push(format!("{key} is {}, not a number", describe(h)));
            }
            (J::Object(w), J::Object(h)) => match_object(&key, w, h, why),
            (J::Object(_), h) => {
                why.push(format!("{key} is {}, not an object", describe(h)));
            }
            (w, h) if w == h => {}
            (w, h) => why.push(format!("{key} is {}, not {}", describe(h), describe(w))),
        }
    }
}

/// Numeric order of two JSON numbers: exact for integers, as floats otherwise.
fn compare_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Ordering {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x.cmp(&y);
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x.cmp(&y);
    }
    // One is negative and the other above i64::MAX, or one is a float. JSON numbers from
    // serde_json are finite, so partial_cmp only fails on NaN, which cannot occur; Less keeps
    // that impossible case failing.
    let (x, y) = (
        a.as_f64().unwrap_or(f64::NAN),
        b.as_f64().unwrap_or(f64::NAN),
    );
    x.partial_cmp(&y).unwrap_or(Ordering::Less)
}

/// A JSON value as it would be printed, cut to fit in a failure line.
fn describe(v: &serde_json::Value) -> String {
    one_line(&v.to_string(), MAX_QUOTED)
}

/// `s` without control characters (each becomes a space) and at most `max` characters (then
/// `…`): failure lines are single lines even when a device sends newlines or escape codes.
fn one_line(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// `185 s`, `0.5 s`, `60.5 s`.
fn secs(ms: i128) -> String {
    if ms % 1000 == 0 {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// `45 days`, `0.5 days`.
fn days(ms: i128) -> String {
    const DAY: i128 = 86_400_000;
    if ms % DAY == 0 {
        let n = ms / DAY;
        format!("{n} day{}", if n == 1 { "" } else { "s" })
    } else {
        format!("{:.1} days", ms as f64 / DAY as f64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use crate::policy::{parse, FileRequirement, OsRequirement};
    use crate::posture::{FileState, OsInfo};
    use crate::wire::DeviceId;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000;
    const DAY: i64 = 86_400_000;
    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// A report that passes `full()`.
    fn report() -> PostureReport {
        let at = NOW - 1_000;
        PostureReport {
            device_id: DeviceId(7),
            seq: 1,
            collected_at_ms: at,
            os: Measured::value(
                at,
                OsInfo {
                    id: "debian".into(),
                    version: "12".into(),
                    pretty: "Debian GNU/Linux 12 (bookworm)".into(),
                },
            ),
            kernel: Measured::value(at, "6.1.0-18-amd64".into()),
            ward_version: "0.2.1".into(),
            firewall: Measured::value(at, true),
            disk_encryption: Measured::value(at, true),
            screen_lock: Measured::value(at, Some(true)),
            last_package_update_ms: Measured::value(at, NOW - 3 * DAY),
            processes: [("osqueryd".to_string(), Measured::value(at, true))].into(),
            files: [
                (
                    "/etc/ward/marker".to_string(),
                    Measured::value(
                        at,
                        FileState {
                            present: true,
                            sha256: Some(HASH.into()),
                        },
                    ),
                ),
                (
                    "/etc/present".to_string(),
                    Measured::value(
                        at,
                        FileState {
                            present: true,
                            sha256: None,
                        },
                    ),
                ),
            ]
            .into(),
            custom: [
                (
                    "edr".to_string(),
                    Measured::value(
                        at,
                        json!({"vendor": "crowdstrike", "score": 85, "status": {"realtime": true, "sigs": 3}, "tags": ["a", "b"]}),
                    ),
                ),
                (
                    "mdm".to_string(),
                    Measured::value(at, json!({"pass": true})),
                ),
            ]
            .into(),
        }
    }

    /// Every check set.
    fn full() -> Posture {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(HASH, &mut hash).unwrap();
        Posture {
            name: "baseline".into(),
            os: vec![
                OsRequirement {
                    name: "debian".into(),
                    version: Some((VersionOp::Ge, "12".into())),
                },
                OsRequirement {
                    name: "macos".into(),
                    version: Some((VersionOp::Ge, "14".into())),
                },
            ],
            firewall: Some(true),
            disk_encryption: Some(true),
            processes: vec!["osqueryd".into()],
            files: vec![
                FileRequirement {
                    path: "/etc/ward/marker".into(),
                    sha256: Some(hash),
                },
                FileRequirement {
                    path: "/etc/present".into(),
                    sha256: None,
                },
            ],
            min_ward_version: Some("0.2.0".into()),
            max_report_age_ms: None,
            custom: [
                (
                    "edr".to_string(),
                    json!({"vendor": "crowdstrike", "score": 80, "status": {"realtime": true}, "tags": ["a", "b"]}),
                ),
                ("mdm".to_string(), json!(true)),
            ]
            .into(),
            screen_lock: Some(true),
            max_package_age_ms: Some(30 * DAY as u64),
            kernel: Some((VersionOp::Ge, "6.1".into())),
            ..Posture::default()
        }
    }

    fn fails(req: &Posture, r: &PostureReport) -> Vec<String> {
        let e = evaluate(req, Some(r), NOW);
        assert_eq!(e.passed, e.failures.is_empty());
        assert_eq!(e.requirement, req.name);
        e.failures
    }

    /// The one failure line of `r` against `full()`.
    fn only_failure(r: &PostureReport) -> String {
        let f = fails(&full(), r);
        assert_eq!(f.len(), 1, "{f:#?}");
        f[0].clone()
    }

    #[test]
    fn compare_versions_orders_numerically_with_padding_and_suffixes() {
        use Ordering::*;
        let cases = [
            ("12", "12", Equal),
            ("12", "12.0", Equal),
            ("12.0.0", "12", Equal),
            ("12", "11", Greater),
            ("9", "10", Less),
            ("24.04", "22.10", Greater),
            ("22.10", "24.04", Less),
            ("10.0.19045", "10.0.19044", Greater),
            ("10.0.19045", "10", Greater),
            ("10.0", "10.0.19045", Less),
            ("6.1.0", "6.1", Equal),
            ("6.10", "6.9", Greater),
            ("1.02", "1.2", Equal),
            ("0.2.0", "0.10.0", Less),
            ("10a", "10b", Less),
            ("10b", "10a", Greater),
            ("2", "2rc1", Less),
            ("3rc1", "2", Greater),
            ("rolling", "rolling", Equal),
            ("alpha", "beta", Less),
            ("", "", Equal),
            ("", "0", Equal),
            ("", "1", Less),
            (
                "99999999999999999999999999",
                "99999999999999999999999998",
                Greater,
            ),
            ("1.99999999999999999999", "2", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    proptest::proptest! {
        /// `compare_versions` is a total order (policies and reports can hold any text).
        #[test]
        fn compare_versions_is_a_total_order(
            a in "[0-9a-c.-]{0,8}",
            b in "[0-9a-c.-]{0,8}",
            c in "[0-9a-c.-]{0,8}",
        ) {
            proptest::prop_assert_eq!(compare_versions(&a, &a), Ordering::Equal);
            proptest::prop_assert_eq!(compare_versions(&a, &b), compare_versions(&b, &a).reverse());
            let (ab, bc, ac) = (compare_versions(&a, &b), compare_versions(&b, &c), compare_versions(&a, &c));
            if ab != Ordering::Greater && bc != Ordering::Greater {
                proptest::prop_assert_ne!(ac, Ordering::Greater, "{} <= {} <= {}", a, b, c);
            }
            if ab == Ordering::Equal && bc == Ordering::Equal {
                proptest::prop_assert_eq!(ac, Ordering::Equal);
            }
        }
    }

    #[test]
    fn version_ops_hold_as_written() {
        assert!(holds("12", VersionOp::Ge, "12"));
        assert!(!holds("12", VersionOp::Gt, "12"));
        assert!(holds("11.9", VersionOp::Lt, "12"));
        assert!(holds("12.0", VersionOp::Le, "12"));
        assert!(holds("12.0", VersionOp::Eq, "12"));
        assert!(!holds("12.1", VersionOp::Eq, "12"));
    }

    #[test]
    fn kernel_version_is_the_numeric_prefix() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some("6.1.0"));
        assert_eq!(kernel_version("6.8.0"), Some("6.8.0"));
        assert_eq!(kernel_version("5.15.0.generic"), Some("5.15.0"));
        assert_eq!(kernel_version("23.4.0"), Some("23.4.0"));
        assert_eq!(kernel_version("Darwin"), None);
        assert_eq!(kernel_version(".1"), None);
        assert_eq!(kernel_version(""), None);
    }

    #[test]
    fn a_good_report_passes_every_check() {
        let e = evaluate(&full(), Some(&report()), NOW);
        assert_eq!(
            e,
            Evaluation {
                requirement: "baseline".into(),
                passed: true,
                failures: vec![],
            }
        );
    }

    #[test]
    fn no_report_fails_closed() {
        let e = evaluate(&full(), None, NOW);
        assert!(!e.passed);
        assert_eq!(e.failures, ["report: no posture report from this device"]);
        // Even a requirement with no checks needs a report.
        let empty = Posture {
            name: "empty".into(),
            ..Posture::default()
        };
        assert!(!evaluate(&empty, None, NOW).passed);
        assert!(evaluate(&empty, Some(&report()), NOW).passed);
    }

    #[test]
    fn stale_report_fails_with_its_age_once() {
        let mut r = report();
        r.collected_at_ms = NOW - 185_000;
        // Signals as old as the report are not listed again.
        r.firewall.at_ms = NOW - 185_000;
        assert_eq!(
            only_failure(&r),
            "report: 185 s old, more than the 120 s allowed"
        );
        // Exactly at the limit still counts.
        r.collected_at_ms = NOW - 120_000;
        r.firewall.at_ms = NOW - 120_000;
        assert!(fails(&full(), &r).is_empty());
        // A requirement's own max_report_age replaces the default.
        let mut req = full();
        req.max_report_age_ms = Some(60_000);
        r.collected_at_ms = NOW - 60_500;
        r.firewall.at_ms = NOW - 1_000;
        assert_eq!(
            fails(&req, &r),
            ["report: 60.5 s old, more than the 60 s allowed"]
        );
        req.max_report_age_ms = Some(600_000);
        r.collected_at_ms = NOW - 500_000;
        assert!(fails(&req, &r).is_empty());
    }

    #[test]
    fn stale_or_future_signals_fail_the_checks_that_need_them() {
        let mut r = report();
        r.disk_encryption.at_ms = NOW - 300_000;
        assert_eq!(
            only_failure(&r),
            "disk_encryption: measured 300 s ago, more than the 120 s allowed"
        );
        let mut r = report();
        r.processes.get_mut("osqueryd").unwrap().at_ms = NOW - 121_000;
        assert_eq!(
            only_failure(&r),
            "process osqueryd: measured 121 s ago, more than the 120 s allowed"
        );
        // Unneeded signals may be stale.
        let mut r = report();
        r.disk_encryption.at_ms = NOW - 300_000;
        let mut req = full();
        req.disk_encryption = None;
        assert!(fails(&req, &r).is_empty());
        // From the future: a stamp that would never age.
        let mut r = report();
        r.collected_at_ms = NOW + 3_600_000;
        assert_eq!(
            only_failure(&r),
            "report: collected 3600 s in the future (device clock not corrected?)"
        );
        let mut r = report();
        r.firewall.at_ms = NOW + 31_000;
        assert_eq!(
            only_failure(&r),
            "firewall: measured 31 s in the future (device clock not corrected?)"
        );
        // Small skew is fine.
        let mut r = report();
        r.collected_at_ms = NOW + 2_000;
        r.firewall.at_ms = NOW + 2_000;
        assert!(fails(&full(), &r).is_empty());
    }

    #[test]
    fn unreadable_signals_fail_closed() {
        let mut r = report();
        r.firewall = Measured::error(NOW, "nft: not found");
        assert_eq!(
            only_failure(&r),
            "firewall: could not be read: nft: not found"
        );
        let mut r = report();
        r.os = Measured::error(NOW, "/etc/os-release: no such file");
        assert_eq!(
            only_failure(&r),
            "os: could not be read: /etc/os-release: no such file"
        );
        let mut r = report();
        r.kernel = Measured::error(NOW, "uname failed");
        assert_eq!(only_failure(&r), "kernel: could not be read: uname failed");
        let mut r = report();
        r.screen_lock = Measured::error(NOW, "no dbus");
        assert_eq!(only_failure(&r), "screen_lock: could not be read: no dbus");
        let mut r = report();
        r.last_package_update_ms = Measured::error(NOW, "no dpkg");
        assert_eq!(
            only_failure(&r),
            "max_package_age: could not be read: no dpkg"
        );
        let mut r = report();
        r.disk_encryption = Measured::error(NOW, "lsblk: exit 1");
        assert_eq!(
            only_failure(&r),
            "disk_encryption: could not be read: lsblk: exit 1"
        );
        let mut r = report();
        r.processes
            .insert("osqueryd".into(), Measured::error(NOW, "/proc unreadable"));
        assert_eq!(
            only_failure(&r),
            "process osqueryd: could not be read: /proc unreadable"
        );
        let mut r = report();
        r.files.insert(
            "/etc/present".into(),
            Measured::error(NOW, "permission denied"),
        );
        assert_eq!(
            only_failure(&r),
            "file /etc/present: could not be read: permission denied"
        );
        let mut r = report();
        r.custom
            .insert("mdm".into(), Measured::error(NOW, "exit status 2"));
        assert_eq!(
            only_failure(&r),
            "custom mdm: could not be read: exit status 2"
        );
    }

    #[test]
    fn device_text_is_cut_to_one_line() {
        let mut r = report();
        let long = format!("line one\nline two\x1b[31m{}", "x".repeat(500));
        r.firewall = Measured::error(NOW, long);
        let f = only_failure(&r);
        assert!(
            f.starts_with("firewall: could not be read: line one line two [31m"),
            "{f}"
        );
        assert!(!f.chars().any(char::is_control), "{f}");
        assert!(f.ends_with('…'), "{f}");
        assert!(f.chars().count() < 200, "{f}");
    }

    #[test]
    fn os_needs_one_matching_alternative() {
        let mut r = report();
        r.os = Measured::value(
            NOW,
            OsInfo {
                id: "debian".into(),
                version: "11".into(),
                pretty: String::new(),
            },
        );
        let mut req = full();
        req.os.truncate(1);
        assert_eq!(
            fails(&req, &r),
            ["os: debian 11 does not satisfy debian>=12"]
        );
        assert_eq!(
            only_failure(&r),
            "os: debian 11 does not satisfy any of debian>=12, macos>=14"
        );
        // The id is case-insensitive; versions pad with zeros.
        r.os = Measured::value(
            NOW,
            OsInfo {
                id: "macOS".into(),
                version: "14.0.1".into(),
                pretty: String::new(),
            },
        );
        assert!(fails(&full(), &r).is_empty());
        // Another OS: no match whatever its version.
        r.os = Measured::value(
            NOW,
            OsInfo {
                id: "ubuntu".into(),
                version: "24.04".into(),
                pretty: String::new(),
            },
        );
        assert_eq!(
            only_failure(&r),
            "os: ubuntu 24.04 does not satisfy any of debian>=12, macos>=14"
        );
        // Unversioned alternative: any version, even none.
        req.os = vec![OsRequirement {
            name: "ubuntu".into(),
            version: None,
        }];
        assert!(fails(&req, &r).is_empty());
        req.os = vec![OsRequirement {
            name: "ubuntu".into(),
            version: Some((VersionOp::Gt, "22.10".into())),
        }];
        assert!(fails(&req, &r).is_empty());
        // A rolling release (no version) satisfies no version bound, not even an upper one.
        r.os = Measured::value(
            NOW,
            OsInfo {
                id: "arch".into(),
                version: String::new(),
                pretty: String::new(),
            },
        );
        req.os = vec![OsRequirement {
            name: "arch".into(),
            version: Some((VersionOp::Le, "99".into())),
        }];
        assert_eq!(
            fails(&req, &r),
            ["os: arch (no version) does not satisfy arch<=99"]
        );
    }

    #[test]
    fn firewall_and_disk_encryption_must_equal() {
        let mut r = report();
        r.firewall = Measured::value(NOW, false);
        assert_eq!(
            only_failure(&r),
            "firewall: no host firewall with a default-drop input policy is active"
        );
        let mut r = report();
        r.disk_encryption = Measured::value(NOW, false);
        assert_eq!(
            only_failure(&r),
            "disk_encryption: root filesystem is not on dm-crypt"
        );
        let mut req = full();
        req.firewall = Some(false);
        req.disk_encryption = Some(false);
        assert_eq!(
            fails(&req, &report()),
            [
                "firewall: a host firewall is active, but the requirement is firewall = false",
                "disk_encryption: root filesystem is encrypted, but the requirement is disk_encryption = false",
            ]
        );
        let mut r = report();
        r.firewall = Measured::value(NOW, false);
        r.disk_encryption = Measured::value(NOW, false);
        assert!(fails(&req, &r).is_empty());
    }

    #[test]
    fn min_ward_version_ignores_build_suffixes() {
        let mut r = report();
        r.ward_version = "0.1.9".into();
        assert_eq!(
            only_failure(&r),
            "min_ward_version: agent 0.1.9 is older than 0.2.0"
        );
        r.ward_version = "0.2.0-dev".into();
        assert!(fails(&full(), &r).is_empty());
        r.ward_version = "0.10.0+abc".into();
        assert!(fails(&full(), &r).is_empty());
        r.ward_version = "0.2".into();
        assert!(fails(&full(), &r).is_empty());
        r.ward_version = String::new();
        assert_eq!(
            only_failure(&r),
            "min_ward_version: agent version \"\" is not a version"
        );
        r.ward_version = "banana".into();
        assert_eq!(
            only_failure(&r),
            "min_ward_version: agent version \"banana\" is not a version"
        );
    }

    #[test]
    fn kernel_bound_uses_the_release_prefix() {
        let mut r = report();
        r.kernel = Measured::value(NOW, "5.10.0-28-amd64".into());
        assert_eq!(
            only_failure(&r),
            "kernel: 5.10.0-28-amd64 does not satisfy >=6.1"
        );
        r.kernel = Measured::value(NOW, "6.10.2-arch1-1".into());
        assert!(fails(&full(), &r).is_empty());
        r.kernel = Measured::value(NOW, "6.1".into());
        assert!(fails(&full(), &r).is_empty());
        r.kernel = Measured::value(NOW, "generic".into());
        assert_eq!(only_failure(&r), "kernel: no version number in \"generic\"");
        let mut req = full();
        req.kernel = Some((VersionOp::Lt, "6.1".into()));
        r.kernel = Measured::value(NOW, "6.0.9".into());
        assert!(fails(&req, &r).is_empty());
    }

    #[test]
    fn screen_lock_passes_without_a_desktop_session() {
        let mut r = report();
        r.screen_lock = Measured::value(NOW, Some(false));
        assert_eq!(
            only_failure(&r),
            "screen_lock: the screen does not lock itself"
        );
        r.screen_lock = Measured::value(NOW, None);
        assert!(fails(&full(), &r).is_empty());
        let mut req = full();
        req.screen_lock = Some(false);
        assert_eq!(
            fails(&req, &report()),
            ["screen_lock: the screen locks itself, but the requirement is screen_lock = false"]
        );
        assert!(fails(&req, &r).is_empty());
    }

    #[test]
    fn max_package_age_counts_from_now() {
        let mut r = report();
        r.last_package_update_ms = Measured::value(NOW, NOW - 45 * DAY);
        assert_eq!(
            only_failure(&r),
            "max_package_age: packages last changed 45 days ago, more than the 30 days allowed"
        );
        r.last_package_update_ms = Measured::value(NOW, NOW - 30 * DAY);
        assert!(fails(&full(), &r).is_empty());
        let mut req = full();
        req.max_package_age_ms = Some(DAY as u64 / 2);
        r.last_package_update_ms = Measured::value(NOW, NOW - DAY);
        assert_eq!(
            fails(&req, &r),
            ["max_package_age: packages last changed 1 day ago, more than the 0.5 days allowed"]
        );
        r.last_package_update_ms = Measured::value(NOW, NOW + 100 * DAY);
        assert_eq!(
            fails(&req, &r),
            ["max_package_age: packages last changed 8640000 s in the future (device clock not corrected?)"]
        );
        // Extreme values do not overflow.
        r.last_package_update_ms = Measured::value(NOW, i64::MIN);
        assert_eq!(fails(&req, &r).len(), 1);
        req.max_package_age_ms = Some(u64::MAX);
        assert!(fails(&req, &r).is_empty());
    }

    #[test]
    fn processes_must_be_reported_and_running() {
        let mut r = report();
        r.processes
            .insert("osqueryd".into(), Measured::value(NOW, false));
        assert_eq!(only_failure(&r), "process osqueryd: not running");
        r.processes.clear();
        assert_eq!(only_failure(&r), "process osqueryd: not reported");
    }

    #[test]
    fn files_must_exist_and_match_a_pinned_hash() {
        let state = |present, sha256: Option<&str>| {
            Measured::value(
                NOW,
                FileState {
                    present,
                    sha256: sha256.map(str::to_string),
                },
            )
        };
        let mut r = report();
        r.files
            .insert("/etc/ward/marker".into(), state(false, None));
        assert_eq!(only_failure(&r), "file /etc/ward/marker: missing");
        let other = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        r.files
            .insert("/etc/ward/marker".into(), state(true, Some(other)));
        assert_eq!(
            only_failure(&r),
            "file /etc/ward/marker: sha256 0123456789ab… does not match the required e3b0c44298fc…"
        );
        // Upper-case hex from a device is the same hash.
        r.files.insert(
            "/etc/ward/marker".into(),
            state(true, Some(&HASH.to_ascii_uppercase())),
        );
        assert!(fails(&full(), &r).is_empty());
        r.files.insert("/etc/ward/marker".into(), state(true, None));
        assert_eq!(only_failure(&r), "file /etc/ward/marker: not hashed");
        r.files
            .insert("/etc/ward/marker".into(), state(true, Some("abc")));
        assert_eq!(
            only_failure(&r),
            "file /etc/ward/marker: sha256 is not 64 hexadecimal digits"
        );
        // Presence only: no hash needed, any hash accepted.
        let mut r = report();
        r.files
            .insert("/etc/present".into(), state(true, Some(other)));
        assert!(fails(&full(), &r).is_empty());
        r.files.insert("/etc/present".into(), state(false, None));
        assert_eq!(only_failure(&r), "file /etc/present: missing");
        r.files.remove("/etc/present");
        assert_eq!(only_failure(&r), "file /etc/present: not reported");
    }

    #[test]
    fn custom_true_needs_pass_true() {
        let mut r = report();
        for (out, why) in [
            (
                json!({"pass": false}),
                "custom mdm: pass is false, not true",
            ),
            (
                json!({"pass": "true"}),
                "custom mdm: pass is \"true\", not true",
            ),
            (
                json!({"ok": true}),
                "custom mdm: pass missing from the output",
            ),
            (
                json!([true]),
                "custom mdm: output is [true], not a JSON object",
            ),
            (json!(true), "custom mdm: output is true, not a JSON object"),
        ] {
            r.custom.insert("mdm".into(), Measured::value(NOW, out));
            assert_eq!(only_failure(&r), why);
        }
        r.custom.remove("mdm");
        assert_eq!(
            only_failure(&r),
            "custom mdm: not reported (is an executable configured for it on the device?)"
        );
    }

    #[test]
    fn custom_tables_match_minimums_equalities_and_nesting() {
        let mut r = report();
        let mut set = |out: serde_json::Value| {
            r.custom.insert("edr".into(), Measured::value(NOW, out));
            fails(&full(), &r)
        };
        // Above the minimum, extra keys ignored.
        assert!(set(json!({"vendor": "crowdstrike", "score": 80.5, "extra": 1, "status": {"realtime": true, "x": 0}, "tags": ["a", "b"]})).is_empty());
        assert_eq!(
            set(
                json!({"vendor": "sentinelone", "score": 79, "status": {"realtime": false}, "tags": ["b", "a"]})
            ),
            [
                "custom edr: score 79 is below the required 80",
                "custom edr: status.realtime is false, not true",
                "custom edr: tags is [\"b\",\"a\"], not [\"a\",\"b\"]",
                "custom edr: vendor is \"sentinelone\", not \"crowdstrike\"",
            ]
        );
        assert_eq!(
            set(json!({"vendor": "crowdstrike", "score": "99", "status": {}, "tags": ["a", "b"]})),
            [
                "custom edr: score is \"99\", not a number",
                "custom edr: status.realtime missing from the output",
            ]
        );
        assert_eq!(
            set(json!({"score": 80, "status": true, "tags": ["a", "b"]})),
            [
                "custom edr: status is true, not an object",
                "custom edr: vendor missing from the output",
            ]
        );
        assert_eq!(
            set(json!("crowdstrike")),
            ["custom edr: output is \"crowdstrike\", not a JSON object"]
        );
    }

    #[test]
    fn custom_numbers_compare_exactly() {
        let n = |v: serde_json::Value| match v {
            serde_json::Value::Number(n) => n,
            _ => unreachable!(),
        };
        use Ordering::*;
        assert_eq!(compare_numbers(&n(json!(80)), &n(json!(80))), Equal);
        assert_eq!(compare_numbers(&n(json!(80.0)), &n(json!(80))), Equal);
        assert_eq!(compare_numbers(&n(json!(-1)), &n(json!(u64::MAX))), Less);
        assert_eq!(
            compare_numbers(&n(json!(u64::MAX)), &n(json!(u64::MAX - 1))),
            Greater
        );
        assert_eq!(
            compare_numbers(
                &n(json!(9007199254740993_i64)),
                &n(json!(9007199254740992_i64))
            ),
            Greater
        );
        assert_eq!(compare_numbers(&n(json!(0.5)), &n(json!(1))), Less);
    }

    #[test]
    fn a_requirement_the_parser_never_makes_fails() {
        let mut req = full();
        req.custom.insert("mdm".into(), json!("yes"));
        assert_eq!(
            fails(&req, &report()),
            ["custom mdm: requirement \"yes\" is neither true nor a table"]
        );
        req.custom.insert("mdm".into(), json!(false));
        assert_eq!(fails(&req, &report()).len(), 1);
    }

    #[test]
    fn every_failure_is_listed_in_check_order() {
        let mut r = report();
        r.firewall = Measured::value(NOW, false);
        r.disk_encryption = Measured::value(NOW, false);
        r.processes.clear();
        assert_eq!(
            fails(&full(), &r),
            [
                "firewall: no host firewall with a default-drop input policy is active",
                "disk_encryption: root filesystem is not on dm-crypt",
                "process osqueryd: not reported",
            ]
        );
    }

    #[test]
    fn evaluate_all_and_wants_cover_the_parsed_policy() {
        let src = format!(
            r#"
[posture.b]
processes = ["zeta", "osqueryd"]
files = [{{ path = "/etc/a" }}, {{ path = "/etc/b" }}]
custom.mdm = true
[posture.a]
processes = ["osqueryd"]
files = [{{ path = "/etc/a", sha256 = "{HASH}" }}]
custom.edr = {{ vendor = "crowdstrike", score = 80 }}
screen_lock = true
max_package_age = "30d"
kernel = ">=6.1"
[posture.c]
firewall = true
"#
        );
        let p = parse(src.as_bytes(), "p.toml").unwrap();
        let w = wants(&p);
        assert_eq!(w.processes, ["osqueryd", "zeta"]);
        assert_eq!(
            w.files,
            [("/etc/a".to_string(), true), ("/etc/b".to_string(), false)]
        );
        assert_eq!(w.custom, ["edr", "mdm"]);
        assert_eq!(wants(&Policy::default()), PostureWants::default());

        let all = evaluate_all(&p, Some(&report()), NOW);
        let names: Vec<&str> = all.iter().map(|e| e.requirement.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(all[0]
            .failures
            .iter()
            .any(|f| f.starts_with("file /etc/a:")));
        assert!(all[2].passed);
        assert!(evaluate_all(&p, None, NOW).iter().all(|e| !e.passed));
    }

    #[test]
    fn wants_never_exceeds_the_cap() {
        let mut p = Policy::default();
        let req = Posture {
            processes: (0..MAX_WANTS + 10).map(|i| format!("p{i:03}")).collect(),
            files: (0..MAX_WANTS + 10)
                .map(|i| FileRequirement {
                    path: format!("/f{i:03}"),
                    sha256: None,
                })
                .collect(),
            custom: (0..MAX_WANTS + 10)
                .map(|i| (format!("c{i:03}"), json!(true)))
                .collect(),
            ..Posture::default()
        };
        p.postures.insert("x".into(), req);
        let w = wants(&p);
        assert_eq!(w.processes.len(), MAX_WANTS);
        assert_eq!(w.files.len(), MAX_WANTS);
        assert_eq!(w.custom.len(), MAX_WANTS);
        assert_eq!(w.processes[0], "p000");
    }

    #[test]
    fn durations_print_readably() {
        assert_eq!(secs(185_000), "185 s");
        assert_eq!(secs(500), "0.5 s");
        assert_eq!(secs(60_500), "60.5 s");
        assert_eq!(secs(9_500), "9.5 s");
        assert_eq!(days(DAY.into()), "1 day");
        assert_eq!(days((45 * DAY).into()), "45 days");
        assert_eq!(days((DAY / 2).into()), "0.5 days");
    }
}
