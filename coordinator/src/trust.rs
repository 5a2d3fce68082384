//! Continuous trust, free of I/O: each device's latest posture report and its evaluation
//! against the policy's requirements, automatic quarantine (a requirement failing for too long,
//! or a port scan seen as denied flows at the peers), and risk (a recent failure shortens the
//! device's leases).
//!
//! ```text
//! registry (core.rs) drives it:
//!   report from a device      -> handle_report(id, report, policy, needed, now) -> Option<Change>
//!   denied flows from a peer  -> handle_denied(src, reporter, flows, ..)        -> Option<String> (quarantine reason)
//!   the same, stored by another replica -> handle_denied_at(.., at, now)      -> Option<String>
//!   session held here / holder changed  -> judge_scan(src, ..)                -> Option<String>
//!   a sign-in at the provider -> set_sign_in(id, Some(sign_in)); then reevaluate
//!   every second              -> reevaluate(id, policy, needed, now)            -> Option<Change> (reports and sign-ins age out)
//!                                overdue_failure(id, policy, needed, ..)       -> Option<String> (quarantine reason)
//!   (`needed`: the requirements named by rules whose sources include the device)
//!   policy compile reads      -> passed(id), failures(id)
//!   lease issuance reads      -> risky(id, ..)
//!
//! replicas of one instance (one store, each device's session on one replica):
//!   session here opened/closed -> set_held(id, bool) (also when it moved to another replica)
//!   which other replica holds  -> handle_holder(id, Some(replica) | None)
//!   stored verdict of another  -> handle_remote(id, RemoteTrust); then reevaluate
//!   after any change           -> poll_decision(id) -> Option<Decision> (store it, audited)
//! ```
//!
//! Whose judgement counts: the replica holding the device's session judges it from its
//! reports and writes each change ([`Decision`]); every other replica judges the device by that
//! stored verdict while the writer still holds the session, and by its own (usually absent,
//! so failing) report otherwise. A replica taking a session over starts from the stored
//! verdict until the device's first report arrives there. A stored verdict that cannot be
//! read fails every requirement.
//!
//! Time is coordinator time in ms, passed in. A device with no report, a stale report or an
//! unreadable signal fails every requirement that needs it (fail closed). Identity signals
//! (`max_auth_age`, `amr`) are judged from the device's sign-in at the identity provider; a
//! device enrolled with a token has none and fails them. `max_auth_age` expires by itself: the
//! per-second `reevaluate` sees the sign-in grow too old, whatever the device reports.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ward_shared::filter::Proto;
use ward_shared::policy::{Policy, Trust};
use ward_shared::posture::{self, Evaluation, PostureReport};
use ward_shared::wire::DeviceId;

use crate::oidc::core::{judge_sign_in, AuthRequirement, SignIn};

/// A report collected further in the future than this (coordinator time) is refused: the
/// agent corrects its clock, so only a forged or broken report is that far ahead.
pub const MAX_REPORT_AHEAD_MS: i64 = 10_000;
/// A report collected longer ago than this when it arrives is refused as stale or replayed.
pub const MAX_REPORT_DELAY_MS: i64 = 60_000;
/// Denied flows remembered per source device (bounds memory under a flood).
pub const MAX_DENIED_REMEMBERED: usize = 4096;
/// Independent reporting devices a scan needs before it quarantines its source: one device's
/// word is never enough, since any enrolled device can claim anything about its peers.
pub const MIN_SCAN_REPORTERS: usize = 2;
/// Denied flows one reporter may add against one source within a scan window; more are
/// ignored, so one reporter can neither flood the memory nor push out other reporters' flows.
pub const MAX_DENIED_PER_REPORTER: usize = 512;

/// Why a posture report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the report is for device {claimed}, but this session is device {session}")]
    WrongDevice {
        claimed: DeviceId,
        session: DeviceId,
    },
    #[error("report {seq} replays or predates report {last} already accepted")]
    Replay { seq: u64, last: u64 },
    #[error("report collected {age_ms} ms ago: stale or replayed")]
    Stale { age_ms: i64 },
    #[error("report collected {ahead_ms} ms in the future")]
    Future { ahead_ms: i64 },
}

/// A device's requirement results changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub evaluations: Vec<Evaluation>,
    /// Requirements that went from passing (or unknown) to failing.
    pub newly_failed: Vec<String>,
    /// Requirements that went from failing to passing.
    pub newly_passed: Vec<String>,
    /// Requirements that were met and no longer are (a subset of `newly_failed`, which also
    /// holds requirements judged for the first time).
    pub withdrawn: Vec<String>,
}

impl Change {
    /// Whether trust that had been granted was withdrawn.
    pub fn narrowed(&self) -> bool {
        !self.withdrawn.is_empty()
    }
}

#[derive(Debug, Default)]
struct DeviceTrust {
    report: Option<PostureReport>,
    last_seq: u64,
    /// `None` until first evaluated.
    evaluations: Option<Vec<Evaluation>>,
    failing_since: BTreeMap<String, i64>,
    last_failure_ms: Option<i64>,
    /// Denied flows with this device as the source: (when, reporting device, proto, port).
    denied: VecDeque<(i64, DeviceId, Proto, u16)>,
    /// An automatic quarantine was asked for and not yet applied or released.
    quarantine_asked: bool,
    /// Behaviour risk (0–100) and why, from [`crate::behaviour`].
    risk: u8,
    risk_reason: String,
    /// For each level L below the current risk: since when the risk has been above L
    /// (`risk_signin_above = L` wants a sign-in newer than that). At most 100 entries.
    above_since: BTreeMap<u8, i64>,
    /// This replica holds the device's session.
    held: bool,
    /// Another replica that holds the device's session, if any.
    holder: Option<String>,
    /// The stored verdict another replica wrote last.
    remote: Option<RemoteTrust>,
    /// The last evaluations came from `remote`, not from a report here.
    judged_remotely: bool,
    /// What the stored row says (its signature), and whether this replica wrote it.
    stored: Option<(Sig, bool)>,
}

/// A device's trust as another replica judged it (its stored row).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteTrust {
    /// The replica that wrote it.
    pub replica: String,
    /// `Err(why)`: the stored verdict could not be read; every requirement fails.
    pub evaluations: Result<Vec<Evaluation>, String>,
    pub risk: u8,
    pub risk_reason: String,
    pub updated_ms: i64,
}

impl RemoteTrust {
    /// From the stored columns. What does not parse (or a risk out of 0–100) gives an
    /// unreadable verdict, which fails every requirement: never a passing one.
    pub fn parse(
        replica: &str,
        verdict: &str,
        risk: i64,
        risk_reason: &str,
        updated_ms: i64,
    ) -> Self {
        let evaluations = serde_json::from_str::<Vec<Evaluation>>(verdict)
            .map_err(|e| format!("the stored verdict does not parse: {e}"))
            .and_then(|v| match u8::try_from(risk) {
                Ok(r) if r <= 100 => Ok(v),
                _ => Err(format!("the stored risk {risk} is out of range")),
            });
        Self {
            replica: replica.to_string(),
            evaluations,
            risk: u8::try_from(risk.clamp(0, 100)).unwrap_or(100),
            risk_reason: risk_reason.to_string(),
            updated_ms,
        }
    }
}

/// This replica judged a device whose session it holds differently from the stored row (or
/// took the session over from another replica): store it for the other replicas, audited.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Decision {
    pub evaluations: Vec<Evaluation>,
    pub risk: u8,
    pub risk_reason: String,
    /// The stored row was another replica's (a session taken over), not a change here.
    pub took_over: bool,
}

/// Risk is stored and announced by level (tens), not by every point it decays.
const RISK_LEVEL: u8 = 10;

/// An evaluation's signature (see [`signature`]) and the risk level, owned.
type Sig = (Vec<(String, bool, Vec<String>)>, u8);

fn owned_signature(evals: &[Evaluation], risk: u8) -> Sig {
    (
        signature(evals)
            .into_iter()
            .map(|(r, p, f)| (r.to_string(), p, f))
            .collect(),
        risk / RISK_LEVEL,
    )
}

/// Trust state of every device.
#[derive(Debug, Default)]
pub struct TrustBook {
    devices: BTreeMap<DeviceId, DeviceTrust>,
    /// Each device's latest sign-in at the identity provider (kept while the device is not
    /// live, so a re-enabled device is judged by the sign-in it has).
    sign_ins: BTreeMap<DeviceId, SignIn>,
}

impl TrustBook {
    /// A device sent a report over its own session (`session` is the authenticated device).
    /// Refuses reports for another device, replays and stale or future reports; otherwise
    /// keeps it and re-evaluates.
    pub fn handle_report(
        &mut self,
        session: DeviceId,
        report: PostureReport,
        policy: Option<&Policy>,
        needed: &BTreeSet<String>,
        now_ms: i64,
    ) -> Result<Option<Change>, ReportError> {
        if report.device_id != session {
            return Err(ReportError::WrongDevice {
                claimed: report.device_id,
                session,
            });
        }
        let t = self.devices.entry(session).or_default();
        if report.seq <= t.last_seq {
            return Err(ReportError::Replay {
                seq: report.seq,
                last: t.last_seq,
            });
        }
        // The stamp is the device's word: no arithmetic on it may overflow.
        let age = now_ms.saturating_sub(report.collected_at_ms);
        if age > MAX_REPORT_DELAY_MS {
            return Err(ReportError::Stale { age_ms: age });
        }
        if age < -MAX_REPORT_AHEAD_MS {
            return Err(ReportError::Future {
                ahead_ms: age.saturating_neg(),
            });
        }
        t.last_seq = report.seq;
        t.report = Some(report);
        Ok(self.reevaluate(session, policy, needed, now_ms))
    }

    /// Another replica accepted reports from this device up to `seq` (it held the device's
    /// session before): reports at or below it are replays here too.
    pub fn handle_seq_floor(&mut self, id: DeviceId, seq: u64) {
        let t = self.devices.entry(id).or_default();
        t.last_seq = t.last_seq.max(seq);
    }

    /// Evaluates the device's latest report (or its absence) against the policy now; returns
    /// what changed, if anything. Reports age out this way. `needed`: the requirements rules
    /// that apply to this device name; only their failures make the device risky.
    pub fn reevaluate(
        &mut self,
        id: DeviceId,
        policy: Option<&Policy>,
        needed: &BTreeSet<String>,
        now_ms: i64,
    ) -> Option<Change> {
        let t = self.devices.entry(id).or_default();
        let remote = t.remote.as_ref().filter(|r| {
            if t.held {
                // Taken over here: the stored verdict until the device reports here.
                t.report.is_none()
            } else {
                t.holder.as_deref() == Some(r.replica.as_str())
            }
        });
        t.judged_remotely = remote.is_some();
        let mut evaluations = match (policy, remote) {
            (Some(p), Some(r)) => remote_evaluations(p, r, now_ms),
            (Some(p), None) => posture::evaluate_all(p, t.report.as_ref(), now_ms),
            (None, _) => Vec::new(),
        };
        if let (Some(p), None) = (policy, remote) {
            apply_risk(&mut evaluations, p, t.risk, &t.risk_reason);
            apply_sign_in(&mut evaluations, p, self.sign_ins.get(&id), now_ms);
            apply_risk_sign_in(&mut evaluations, p, t, self.sign_ins.get(&id));
        }
        let before: BTreeMap<&str, bool> = t
            .evaluations
            .iter()
            .flatten()
            .map(|e| (e.requirement.as_str(), e.passed))
            .collect();
        let mut newly_failed = Vec::new();
        let mut newly_passed = Vec::new();
        let mut withdrawn = Vec::new();
        for e in &evaluations {
            match (before.get(e.requirement.as_str()), e.passed) {
                (Some(true), false) => {
                    newly_failed.push(e.requirement.clone());
                    withdrawn.push(e.requirement.clone());
                }
                (None, false) => newly_failed.push(e.requirement.clone()),
                (Some(false), true) => newly_passed.push(e.requirement.clone()),
                _ => {}
            }
        }
        for e in &evaluations {
            if e.passed {
                t.failing_since.remove(&e.requirement);
            } else {
                t.failing_since
                    .entry(e.requirement.clone())
                    .or_insert(now_ms);
                if needed.contains(&e.requirement) {
                    t.last_failure_ms = Some(now_ms);
                }
            }
        }
        t.failing_since
            .retain(|k, _| evaluations.iter().any(|e| &e.requirement == k));
        // First judged with no requirements at all: nothing to tell anyone. Numbers in the
        // reasons ("report: 185 s old") move every second; only a change in what passes or
        // in which checks fail is news (else an offline device would be news every second).
        let same = signature(t.evaluations.as_deref().unwrap_or(&[])) == signature(&evaluations);
        t.evaluations = Some(evaluations.clone());
        (!same).then_some(Change {
            evaluations,
            newly_failed,
            newly_passed,
            withdrawn,
        })
    }

    /// A requirement that a rule applying to this device needs (`needed`) has been failing for
    /// longer than the policy's `quarantine_after_failing`: the reason to quarantine, once.
    pub fn overdue_failure(
        &mut self,
        id: DeviceId,
        policy: &Policy,
        needed: &BTreeSet<String>,
        quarantined: bool,
        now_ms: i64,
    ) -> Option<String> {
        let after = policy.trust.quarantine_after_failing_ms? as i64;
        let t = self.devices.get_mut(&id)?;
        // A device another replica judges is that replica's to quarantine.
        if quarantined || t.quarantine_asked || t.judged_remotely {
            return None;
        }
        let (name, since) = t
            .failing_since
            .iter()
            .filter(|(n, _)| needed.contains(n.as_str()))
            .min_by_key(|(_, s)| **s)?;
        if now_ms - since < after {
            return None;
        }
        let why = t
            .evaluations
            .iter()
            .flatten()
            .find(|e| &e.requirement == name)
            .map(|e| e.failures.join("; "))
            .unwrap_or_default();
        t.quarantine_asked = true;
        Some(format!(
            "posture {name:?} failing for {} s (more than {} s): {why}",
            (now_ms - since) / 1000,
            after / 1000
        ))
    }

    /// `reporter`'s inbound filter refused new flows from `src`. Counts distinct
    /// (reporter, proto, port) within the policy's scan window, each reporter weighing at most
    /// its share (`threshold / MIN_SCAN_REPORTERS`, rounded up) and adding at most
    /// [`MAX_DENIED_PER_REPORTER`] flows per window. When at least [`MIN_SCAN_REPORTERS`]
    /// reporters together reach the threshold: the reason to quarantine `src`, once, naming
    /// its accusers (see [`TrustBook::judge_scan`] for which replica acts).
    pub fn handle_denied(
        &mut self,
        src: DeviceId,
        reporter: DeviceId,
        flows: impl IntoIterator<Item = (Proto, u16)>,
        trust: &Trust,
        quarantined: bool,
        now_ms: i64,
    ) -> Option<String> {
        self.handle_denied_at(src, reporter, flows, trust, quarantined, now_ms, now_ms)
    }

    /// [`TrustBook::handle_denied`] for evidence reported at `at_ms` (another replica stored
    /// it then): it counts for the scan window from `at_ms`, and not at all if that is already
    /// past. The same bounds apply, so stored evidence can grow the book no more than reports
    /// received here.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_denied_at(
        &mut self,
        src: DeviceId,
        reporter: DeviceId,
        flows: impl IntoIterator<Item = (Proto, u16)>,
        trust: &Trust,
        quarantined: bool,
        at_ms: i64,
        now_ms: i64,
    ) -> Option<String> {
        let t = self.devices.entry(src).or_default();
        let window = trust.scan_window_ms as i64;
        // Evidence from other replicas can arrive out of order: drop every old entry, not
        // only those at the front.
        t.denied.retain(|d| now_ms - d.0 <= window);
        // Another replica's clock may run a little ahead: never later than now.
        let at_ms = at_ms.min(now_ms);
        if now_ms - at_ms <= window {
            let room = MAX_DENIED_PER_REPORTER
                .saturating_sub(t.denied.iter().filter(|d| d.1 == reporter).count());
            for (proto, port) in flows.into_iter().take(room) {
                if t.denied.len() >= MAX_DENIED_REMEMBERED {
                    t.denied.pop_front();
                }
                t.denied.push_back((at_ms, reporter, proto, port));
            }
        }
        self.judge_scan(src, trust, quarantined, now_ms)
    }

    /// Whether the denied flows remembered against `src` make a scan, and this replica is the
    /// one to act on it: the replica holding `src`'s session, or any replica when no other
    /// live replica holds it. Every replica gathers the evidence (reported here or stored by
    /// another); a replica that defers keeps it, so it acts if the session comes here. Call it
    /// again when that happens ([`TrustBook::set_held`], [`TrustBook::handle_holder`]).
    pub fn judge_scan(
        &mut self,
        src: DeviceId,
        trust: &Trust,
        quarantined: bool,
        now_ms: i64,
    ) -> Option<String> {
        let threshold = trust.scan_denied_flows?;
        let t = self.devices.get_mut(&src)?;
        let window = trust.scan_window_ms as i64;
        if quarantined || t.quarantine_asked || (!t.held && t.holder.is_some()) {
            return None;
        }
        let mut by_reporter: BTreeMap<DeviceId, BTreeSet<(Proto, u16)>> = BTreeMap::new();
        for d in t.denied.iter().filter(|d| now_ms - d.0 <= window) {
            by_reporter.entry(d.1).or_default().insert((d.2, d.3));
        }
        let share = (threshold as usize).div_ceil(MIN_SCAN_REPORTERS);
        let weighed: usize = by_reporter.values().map(|f| f.len().min(share)).sum();
        if by_reporter.len() < MIN_SCAN_REPORTERS || weighed < threshold as usize {
            return None;
        }
        let distinct: usize = by_reporter.values().map(BTreeSet::len).sum();
        let accusers: Vec<String> = by_reporter.keys().map(ToString::to_string).collect();
        t.quarantine_asked = true;
        Some(format!(
            "scan: {distinct} denied flows to {} device(s) within {} s (threshold {threshold}), reported by {}",
            by_reporter.len(),
            window / 1000,
            accusers.join(", ")
        ))
    }

    /// Denied flows remembered against `src` (within the last window seen).
    pub fn denied_count(&self, src: DeviceId) -> usize {
        self.devices.get(&src).map_or(0, |t| t.denied.len())
    }

    /// The quarantine was applied or lifted: timers restart, so a released device gets the
    /// full `quarantine_after_failing` again before another automatic quarantine.
    pub fn handle_quarantine_changed(&mut self, id: DeviceId, now_ms: i64) {
        let t = self.devices.entry(id).or_default();
        t.quarantine_asked = false;
        t.denied.clear();
        for since in t.failing_since.values_mut() {
            *since = now_ms;
        }
        t.last_failure_ms = Some(now_ms);
    }

    pub fn remove(&mut self, id: DeviceId) {
        self.devices.remove(&id);
    }

    /// This replica opened (`true`) or closed the device's session; the caller re-evaluates.
    pub fn set_held(&mut self, id: DeviceId, held: bool) {
        self.devices.entry(id).or_default().held = held;
    }

    /// Which other replica holds the device's session (`None`: none does, or it is not
    /// alive). Returns whether it changed; the caller re-evaluates.
    pub fn handle_holder(&mut self, id: DeviceId, holder: Option<String>) -> bool {
        let t = self.devices.entry(id).or_default();
        if t.holder == holder {
            return false;
        }
        t.holder = holder;
        true
    }

    /// Another replica stored its verdict on the device; the caller re-evaluates.
    pub fn handle_remote(&mut self, id: DeviceId, remote: RemoteTrust) {
        let t = self.devices.entry(id).or_default();
        let sig = match &remote.evaluations {
            Ok(e) => owned_signature(e, remote.risk),
            Err(_) => (Vec::new(), u8::MAX),
        };
        t.stored = Some((sig, false));
        t.remote = Some(remote);
    }

    /// The verdict another replica stored last, if any.
    pub fn remote(&self, id: DeviceId) -> Option<&RemoteTrust> {
        self.devices.get(&id).and_then(|t| t.remote.as_ref())
    }

    /// Whether the device's current evaluations are another replica's stored verdict.
    pub fn judged_remotely(&self, id: DeviceId) -> bool {
        self.devices.get(&id).is_some_and(|t| t.judged_remotely)
    }

    /// What to store for the other replicas, if anything: only the replica holding the
    /// session, judging from a report it received, decides; it stores a verdict or risk level
    /// that differs from the stored row, or any verdict when the row is another replica's.
    pub fn poll_decision(&mut self, id: DeviceId) -> Option<Decision> {
        let t = self.devices.get_mut(&id)?;
        if !t.held || t.report.is_none() || t.judged_remotely {
            return None;
        }
        let evaluations = t.evaluations.clone()?;
        // No requirement and no risk, and nothing stored: the other replicas' view of a
        // device without a row is the same, so nothing is written (no noise without posture).
        if t.stored.is_none() && evaluations.is_empty() && t.risk / RISK_LEVEL == 0 {
            return None;
        }
        let sig = owned_signature(&evaluations, t.risk);
        let took_over = match &t.stored {
            Some((s, mine)) if *s == sig && *mine => return None,
            Some((_, mine)) => !mine,
            None => false,
        };
        t.stored = Some((sig, true));
        Some(Decision {
            evaluations,
            risk: t.risk,
            risk_reason: t.risk_reason.clone(),
            took_over,
        })
    }

    /// The device's sign-in at the identity provider (`None`: forget it, the device is gone);
    /// the caller re-evaluates. Returns whether it changed.
    pub fn set_sign_in(&mut self, id: DeviceId, sign_in: Option<SignIn>) -> bool {
        let old = match sign_in {
            Some(s) => self.sign_ins.insert(id, s.clone()).filter(|o| *o == s),
            None => return self.sign_ins.remove(&id).is_some(),
        };
        old.is_none()
    }

    /// The device's sign-in at the identity provider, if it has one.
    pub fn sign_in(&self, id: DeviceId) -> Option<&SignIn> {
        self.sign_ins.get(&id)
    }

    /// Adds the identity-signal failures of `policy`'s requirements to `evals` (for a
    /// candidate policy's view, judged like the policy in force).
    pub fn judge_identity(
        &self,
        id: DeviceId,
        evals: &mut [Evaluation],
        policy: &Policy,
        now_ms: i64,
    ) {
        apply_sign_in(evals, policy, self.sign_ins.get(&id), now_ms);
        if let Some(t) = self.devices.get(&id) {
            apply_risk_sign_in(evals, policy, t, self.sign_ins.get(&id));
        }
    }

    /// The device's behaviour risk changed (at `now_ms`); the caller re-evaluates. Returns
    /// whether it did.
    pub fn set_risk(&mut self, id: DeviceId, score: u8, reason: &str, now_ms: i64) -> bool {
        let t = self.devices.entry(id).or_default();
        if t.risk == score && t.risk_reason == reason {
            return false;
        }
        // Levels the risk rose above now start their clock; levels it fell to or below forget
        // theirs (a later rise is a new moment a sign-in must be newer than).
        for level in t.risk..score {
            t.above_since.entry(level).or_insert(now_ms);
        }
        t.above_since.retain(|level, _| *level < score);
        t.risk = score;
        t.risk_reason = reason.to_string();
        true
    }

    /// The device's behaviour risk (0–100) and why.
    pub fn risk(&self, id: DeviceId) -> (u8, &str) {
        self.devices
            .get(&id)
            .map_or((0, ""), |t| (t.risk, t.risk_reason.as_str()))
    }

    /// `quarantine_above_risk`: the reason to quarantine, once, when the risk is above it.
    pub fn overdue_risk(
        &mut self,
        id: DeviceId,
        trust: &Trust,
        quarantined: bool,
    ) -> Option<String> {
        let limit = trust.quarantine_above_risk?;
        let t = self.devices.get_mut(&id)?;
        if quarantined || t.quarantine_asked || t.risk <= limit {
            return None;
        }
        t.quarantine_asked = true;
        Some(format!(
            "risk {} is above the {limit} allowed for any access: {}",
            t.risk, t.risk_reason
        ))
    }

    /// Requirements the device currently meets.
    pub fn passed(&self, id: DeviceId) -> BTreeSet<String> {
        self.evaluations(id)
            .iter()
            .filter(|e| e.passed)
            .map(|e| e.requirement.clone())
            .collect()
    }

    /// Failed checks of each requirement the device does not meet.
    pub fn failures(&self, id: DeviceId) -> BTreeMap<String, Vec<String>> {
        self.evaluations(id)
            .iter()
            .filter(|e| !e.passed)
            .map(|e| (e.requirement.clone(), e.failures.clone()))
            .collect()
    }

    pub fn evaluations(&self, id: DeviceId) -> &[Evaluation] {
        self.devices
            .get(&id)
            .and_then(|t| t.evaluations.as_deref())
            .unwrap_or(&[])
    }

    pub fn report(&self, id: DeviceId) -> Option<&PostureReport> {
        self.devices.get(&id).and_then(|t| t.report.as_ref())
    }

    /// A device that failed a check (or was quarantined) within the policy's `clean_after`
    /// gets the shorter `risky_lease_ttl`.
    pub fn risky(&self, id: DeviceId, trust: &Trust, quarantined: bool, now_ms: i64) -> bool {
        if trust.risky_lease_ttl_ms.is_none() {
            return false;
        }
        if quarantined {
            return true;
        }
        self.devices.get(&id).is_some_and(|t| {
            t.risk > trust.risk_threshold
                || t.last_failure_ms
                    .is_some_and(|f| now_ms - f < trust.clean_after_ms as i64)
        })
    }
}

/// The policy's requirements as another replica judged them: each takes the stored result of
/// the same name; a requirement the stored verdict does not name (a newer policy), or every
/// requirement of an unreadable verdict, fails.
fn remote_evaluations(policy: &Policy, remote: &RemoteTrust, now_ms: i64) -> Vec<Evaluation> {
    let mut evals = posture::evaluate_all(policy, None, now_ms);
    for e in &mut evals {
        let stored = match &remote.evaluations {
            Ok(v) => v.iter().find(|r| r.requirement == e.requirement),
            Err(why) => {
                e.failures = vec![format!("verdict of replica {}: {why}", remote.replica)];
                continue;
            }
        };
        match stored {
            // An entry that says it passed with failures listed is contradictory: it fails.
            Some(r) if r.passed && r.failures.is_empty() => {
                e.passed = true;
                e.failures.clear();
            }
            Some(r) => {
                e.passed = false;
                e.failures = if r.failures.is_empty() {
                    vec![format!("verdict of replica {}: failed", remote.replica)]
                } else {
                    r.failures.clone()
                };
            }
            None => {
                e.failures = vec![format!(
                    "verdict of replica {}: this requirement was not judged",
                    remote.replica
                )];
            }
        }
    }
    evals
}

/// Requirements with `max_risk` fail while the device's behaviour risk is above it.
fn apply_risk(evals: &mut [Evaluation], policy: &Policy, risk: u8, reason: &str) {
    for e in evals {
        let Some(max) = policy.postures.get(&e.requirement).and_then(|p| p.max_risk) else {
            continue;
        };
        if risk > max {
            e.passed = false;
            e.failures
                .push(format!("risk {risk} is above the {max} allowed: {reason}"));
        }
    }
}

pub use ward_shared::wire::SIGN_IN_AGAIN;

/// Requirements with `risk_signin_above = L` fail while the device's risk is above L, unless
/// the device's sign-in at the identity provider is newer than the moment the risk rose above
/// L: a fresh sign-in of the same user restores access before the risk decays. The reason
/// starts with "sign in again", which the agent shows its user.
fn apply_risk_sign_in(
    evals: &mut [Evaluation],
    policy: &Policy,
    t: &DeviceTrust,
    sign_in: Option<&SignIn>,
) {
    for e in evals {
        let Some(level) = policy
            .postures
            .get(&e.requirement)
            .and_then(|p| p.risk_signin_above)
        else {
            continue;
        };
        if t.risk <= level {
            continue;
        }
        // Above the level without a recorded moment cannot happen (set_risk keeps both); if
        // it did, no sign-in is new enough (fail closed).
        let since = t.above_since.get(&level).copied().unwrap_or(i64::MAX);
        if sign_in.is_some_and(|s| s.auth_time_ms > since) {
            continue;
        }
        e.passed = false;
        let when = match sign_in {
            Some(_) => "rose above it after the device's last sign-in",
            None => "is above it and the device has no sign-in",
        };
        e.failures.push(format!(
            "{SIGN_IN_AGAIN}risk {} (limit {level} without a fresh sign-in) {when}: {}",
            t.risk, t.risk_reason
        ));
    }
}

/// Requirements with `max_auth_age` or `amr` fail while the device's sign-in does not meet
/// them; a device with no sign-in (enrolled with a token) fails them.
fn apply_sign_in(evals: &mut [Evaluation], policy: &Policy, sign_in: Option<&SignIn>, now_ms: i64) {
    for e in evals {
        let Some(p) = policy.postures.get(&e.requirement) else {
            continue;
        };
        if !p.needs_sign_in() {
            continue;
        }
        let req = AuthRequirement {
            max_auth_age_ms: p
                .max_auth_age_ms
                .map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
            amr: p.amr.clone(),
        };
        let why = judge_sign_in(&req, sign_in, now_ms);
        if !why.is_empty() {
            e.passed = false;
            e.failures.extend(why);
        }
    }
}

/// What an evaluation says, without the numbers in its reasons.
fn signature(evals: &[Evaluation]) -> Vec<(&str, bool, Vec<String>)> {
    evals
        .iter()
        .map(|e| {
            let reasons = e.failures.iter().map(|f| without_numbers(f)).collect();
            (e.requirement.as_str(), e.passed, reasons)
        })
        .collect()
}

/// `report: 120.5 s old` → `report:  s old`; `signed in 1h59m ago` → `signed in  ago` (a
/// unit letter right after a number goes with it, so a growing age is no news).
fn without_numbers(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_digit = false;
    for c in s.chars() {
        let digit = c.is_ascii_digit()
            || (c == '.' && prev_digit)
            || (prev_digit && matches!(c, 's' | 'm' | 'h' | 'd'));
        if !digit {
            out.push(c);
        }
        prev_digit = c.is_ascii_digit();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_shared::policy;
    use ward_shared::posture::Measured;

    const T: i64 = 1_800_000_000_000;

    fn pol(trust: &str) -> Policy {
        let src = format!(
            "[posture.marker]\nfiles = [{{ path = \"/etc/ward/ok\" }}]\n[posture.unused]\nfirewall = true\n[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/5432\"]\n[[rules]]\nfrom = [\"alice\"]\nto = [\"db\"]\nposture = [\"marker\"]\n{trust}"
        );
        policy::parse(src.as_bytes(), "t.toml").unwrap()
    }

    /// What the test policies' rules need (every device matches `alice` here).
    fn needed(p: &Policy) -> BTreeSet<String> {
        p.rules
            .iter()
            .flat_map(|r| r.posture.iter().map(|q| q.value.clone()))
            .collect()
    }

    fn report(dev: u64, seq: u64, at: i64, file: bool) -> PostureReport {
        let mut r = PostureReport::unknown(DeviceId(dev), seq, at).with_file("/etc/ward/ok", file);
        r.firewall = Measured::value(at, false);
        r
    }

    fn remote(replica: &str, marker: bool) -> RemoteTrust {
        let evals = vec![
            Evaluation {
                requirement: "marker".into(),
                passed: marker,
                failures: if marker {
                    vec![]
                } else {
                    vec!["file /etc/ward/ok: missing".into()]
                },
            },
            Evaluation {
                requirement: "unused".into(),
                passed: false,
                failures: vec!["firewall: off".into()],
            },
        ];
        let json = serde_json::to_string(&evals).unwrap();
        RemoteTrust::parse(replica, &json, 0, "", T)
    }

    #[test]
    fn a_device_held_elsewhere_is_judged_by_its_holders_stored_verdict() {
        let p = pol("");
        let n = needed(&p);
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        // No report here, nobody else holds it: it fails (closed).
        b.reevaluate(d, Some(&p), &n, T);
        assert!(!b.passed(d).contains("marker"));
        // r2 holds the session and stored a passing verdict: it counts here.
        b.handle_remote(d, remote("r2", true));
        assert!(b.handle_holder(d, Some("r2".into())));
        let c = b.reevaluate(d, Some(&p), &n, T).unwrap();
        assert_eq!(c.newly_passed, ["marker"]);
        assert!(b.judged_remotely(d));
        assert!(b.poll_decision(d).is_none(), "only the holder decides");
        // r2's verdict turns to failing: withdrawn here too, with r2's reason.
        b.handle_remote(d, remote("r2", false));
        let c = b.reevaluate(d, Some(&p), &n, T + 1).unwrap();
        assert!(c.narrowed());
        assert_eq!(b.failures(d)["marker"], ["file /etc/ward/ok: missing"]);
        // Passing again, and an overdue failure is never this replica's to quarantine.
        b.handle_remote(d, remote("r2", true));
        b.reevaluate(d, Some(&p), &n, T + 2);
        assert!(b.passed(d).contains("marker"));
        let q = pol("[trust]\nquarantine_after_failing = \"1s\"\n");
        b.handle_remote(d, remote("r2", false));
        b.reevaluate(d, Some(&q), &n, T + 3);
        assert!(b.overdue_failure(d, &q, &n, false, T + 60_000).is_none());
        // A verdict from a replica that no longer holds the session does not count.
        b.handle_remote(d, remote("r2", true));
        b.handle_holder(d, Some("r3".into()));
        b.reevaluate(d, Some(&p), &n, T + 4);
        assert!(!b.passed(d).contains("marker"));
        assert!(!b.judged_remotely(d));
        b.handle_holder(d, None);
        b.reevaluate(d, Some(&p), &n, T + 5);
        assert!(!b.passed(d).contains("marker"));
    }

    #[test]
    fn an_unreadable_stored_verdict_fails_every_requirement() {
        let p = pol("");
        let n = needed(&p);
        for (verdict, risk) in [
            ("{not json", 0),
            ("[{\"requirement\":\"marker\"}]", 0),
            (
                "[{\"requirement\":\"marker\",\"passed\":true,\"failures\":[]}]",
                250,
            ),
            (
                "[{\"requirement\":\"marker\",\"passed\":true,\"failures\":[]}]",
                -1,
            ),
        ] {
            let mut b = TrustBook::default();
            let d = DeviceId(1);
            let r = RemoteTrust::parse("r2", verdict, risk, "", T);
            assert!(r.evaluations.is_err(), "{verdict} {risk}");
            b.handle_remote(d, r);
            b.handle_holder(d, Some("r2".into()));
            b.reevaluate(d, Some(&p), &n, T);
            assert!(b.passed(d).is_empty(), "{verdict} {risk}");
            assert!(b.failures(d)["marker"][0].contains("replica r2"));
        }
        // A passing entry that lists failures, or a requirement not judged, fails too.
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        let r = RemoteTrust::parse(
            "r2",
            "[{\"requirement\":\"marker\",\"passed\":true,\"failures\":[\"x\"]}]",
            0,
            "",
            T,
        );
        b.handle_remote(d, r);
        b.handle_holder(d, Some("r2".into()));
        b.reevaluate(d, Some(&p), &n, T);
        assert!(b.passed(d).is_empty());
        assert!(b.failures(d)["unused"][0].contains("not judged"));
    }

    #[test]
    fn the_holder_stores_each_change_and_a_taken_over_session_starts_from_the_stored_verdict() {
        let p = pol("");
        let n = needed(&p);
        let d = DeviceId(1);
        // r1 held the device and stored "marker passes"; the device moves to this replica.
        let mut b = TrustBook::default();
        b.handle_remote(d, remote("r1", true));
        b.set_held(d, true);
        b.reevaluate(d, Some(&p), &n, T);
        assert!(
            b.passed(d).contains("marker"),
            "before its first report here the stored verdict counts"
        );
        assert!(
            b.poll_decision(d).is_none(),
            "no report here yet: nothing to store"
        );
        // Its first report here: judged here, and stored as taken over (same verdict).
        b.handle_report(d, report(1, 1, T, true), Some(&p), &n, T)
            .unwrap();
        assert!(!b.judged_remotely(d));
        let dec = b.poll_decision(d).unwrap();
        assert!(dec.took_over);
        assert!(dec
            .evaluations
            .iter()
            .any(|e| e.requirement == "marker" && e.passed));
        // Nothing changed: nothing more to store; a change is stored once.
        b.handle_report(d, report(1, 2, T + 1000, true), Some(&p), &n, T + 1000)
            .unwrap();
        assert!(b.poll_decision(d).is_none());
        b.handle_report(d, report(1, 3, T + 2000, false), Some(&p), &n, T + 2000)
            .unwrap();
        let dec = b.poll_decision(d).unwrap();
        assert!(!dec.took_over);
        assert!(dec
            .evaluations
            .iter()
            .any(|e| e.requirement == "marker" && !e.passed));
        assert!(b.poll_decision(d).is_none());
        // A risk level change is stored; a point of decay within the level is not.
        b.set_risk(d, 35, "scan", T + 3000);
        b.reevaluate(d, Some(&p), &n, T + 3000);
        assert_eq!(b.poll_decision(d).map(|x| x.risk), Some(35));
        b.set_risk(d, 33, "scan", T + 4000);
        b.reevaluate(d, Some(&p), &n, T + 4000);
        assert!(b.poll_decision(d).is_none());
        // Session closed here: no longer this replica's to decide.
        b.set_held(d, false);
        b.handle_report(d, report(1, 4, T + 5000, true), Some(&p), &n, T + 5000)
            .unwrap();
        assert!(b.poll_decision(d).is_none());
    }

    #[test]
    fn without_requirements_or_risk_nothing_is_stored() {
        let p = policy::parse(b"", "empty.toml").unwrap();
        let n = BTreeSet::new();
        let d = DeviceId(1);
        let mut b = TrustBook::default();
        b.set_held(d, true);
        b.handle_report(d, report(1, 1, T, true), Some(&p), &n, T)
            .unwrap();
        assert!(b.poll_decision(d).is_none());
        // Risk is news even without requirements.
        b.set_risk(d, 45, "fan-out", T);
        b.reevaluate(d, Some(&p), &n, T);
        assert_eq!(b.poll_decision(d).map(|x| x.risk), Some(45));
    }

    #[test]
    fn a_floor_from_another_replica_refuses_older_reports_here() {
        let p = pol("");
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        b.handle_seq_floor(d, 9);
        assert!(matches!(
            b.handle_report(d, report(1, 9, T, true), Some(&p), &needed(&p), T),
            Err(ReportError::Replay { seq: 9, last: 9 })
        ));
        assert!(b
            .handle_report(d, report(1, 10, T, true), Some(&p), &needed(&p), T)
            .is_ok());
        // A lower floor (an older store read) never lowers what was accepted.
        b.handle_seq_floor(d, 3);
        assert!(matches!(
            b.handle_report(d, report(1, 10, T, true), Some(&p), &needed(&p), T + 1),
            Err(ReportError::Replay { .. })
        ));
    }

    #[test]
    fn reports_bound_to_device_fresh_and_in_order() {
        let p = pol("");
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        assert!(matches!(
            b.handle_report(d, report(2, 1, T, true), Some(&p), &needed(&p), T),
            Err(ReportError::WrongDevice { .. })
        ));
        let c = b
            .handle_report(d, report(1, 5, T, true), Some(&p), &needed(&p), T)
            .unwrap()
            .unwrap();
        assert_eq!(c.newly_failed, vec!["unused".to_string()]);
        assert!(b.passed(d).contains("marker"));
        // Replays and older sequence numbers are refused.
        assert!(matches!(
            b.handle_report(d, report(1, 5, T, true), Some(&p), &needed(&p), T + 1),
            Err(ReportError::Replay { .. })
        ));
        assert!(matches!(
            b.handle_report(d, report(1, 4, T, false), Some(&p), &needed(&p), T + 1),
            Err(ReportError::Replay { .. })
        ));
        // Stale and future reports are refused, and nothing changes.
        assert!(matches!(
            b.handle_report(d, report(1, 6, T - 61_000, false), Some(&p), &needed(&p), T),
            Err(ReportError::Stale { .. })
        ));
        assert!(matches!(
            b.handle_report(d, report(1, 7, T + 11_000, false), Some(&p), &needed(&p), T),
            Err(ReportError::Future { .. })
        ));
        assert!(b.passed(d).contains("marker"));
        // The file goes away: marker fails, with the reason kept.
        let c = b
            .handle_report(
                d,
                report(1, 8, T + 1000, false),
                Some(&p),
                &needed(&p),
                T + 1000,
            )
            .unwrap()
            .unwrap();
        assert!(c.narrowed());
        assert_eq!(c.newly_failed, vec!["marker".to_string()]);
        assert!(!b.passed(d).contains("marker"));
        assert!(!b.failures(d)["marker"].is_empty());
        // Back: passes again; an identical report changes nothing.
        let c = b
            .handle_report(
                d,
                report(1, 9, T + 2000, true),
                Some(&p),
                &needed(&p),
                T + 2000,
            )
            .unwrap()
            .unwrap();
        assert_eq!(c.newly_passed, vec!["marker".to_string()]);
        assert!(b
            .handle_report(
                d,
                report(1, 10, T + 3000, true),
                Some(&p),
                &needed(&p),
                T + 3000
            )
            .unwrap()
            .is_none());
    }

    #[test]
    fn extreme_stamps_are_refused_without_overflow() {
        let p = pol("");
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        for (seq, at) in [(1, i64::MIN), (2, i64::MAX), (3, i64::MIN + 1)] {
            assert!(b
                .handle_report(d, report(1, seq, at, true), Some(&p), &needed(&p), T)
                .is_err());
        }
        assert!(b.passed(d).is_empty());
    }

    #[test]
    fn no_report_and_old_reports_fail_closed() {
        let p = pol("");
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        b.reevaluate(d, Some(&p), &needed(&p), T);
        assert!(b.passed(d).is_empty());
        b.handle_report(d, report(1, 1, T, true), Some(&p), &needed(&p), T)
            .unwrap();
        assert!(b.passed(d).contains("marker"));
        // Nobody reports for longer than the default maximum age: it fails.
        let c = b
            .reevaluate(
                d,
                Some(&p),
                &needed(&p),
                T + posture::DEFAULT_MAX_REPORT_AGE_MS as i64 + 1,
            )
            .unwrap();
        assert_eq!(c.newly_failed, vec!["marker".to_string()]);
        // Getting older every second is not a change worth telling anyone about.
        let later = T + posture::DEFAULT_MAX_REPORT_AGE_MS as i64 + 5_000;
        assert!(b.reevaluate(d, Some(&p), &needed(&p), later).is_none());
        assert!(b
            .reevaluate(d, Some(&p), &needed(&p), later + 1_000)
            .is_none());
    }

    #[test]
    fn failing_too_long_quarantines_once() {
        let p = pol("[trust]\nquarantine_after_failing = \"60s\"\n");
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        b.handle_report(d, report(1, 1, T, false), Some(&p), &needed(&p), T)
            .unwrap();
        assert_eq!(
            b.overdue_failure(d, &p, &needed(&p), false, T + 59_000),
            None
        );
        let why = b
            .overdue_failure(d, &p, &needed(&p), false, T + 60_000)
            .unwrap();
        assert!(
            why.contains("marker") && why.contains("/etc/ward/ok"),
            "{why}"
        );
        // Asked once; after a release the clock restarts.
        assert_eq!(
            b.overdue_failure(d, &p, &needed(&p), false, T + 61_000),
            None
        );
        b.handle_quarantine_changed(d, T + 70_000);
        assert_eq!(
            b.overdue_failure(d, &p, &needed(&p), false, T + 100_000),
            None
        );
        assert!(b
            .overdue_failure(d, &p, &needed(&p), false, T + 130_000)
            .is_some());
        // A requirement no rule uses never quarantines.
        let p2 = pol("[trust]\nquarantine_after_failing = \"1s\"\n");
        let mut b2 = TrustBook::default();
        b2.handle_report(d, report(1, 1, T, true), Some(&p2), &needed(&p2), T)
            .unwrap();
        assert_eq!(
            b2.overdue_failure(d, &p2, &needed(&p2), false, T + 10_000),
            None
        );
    }

    #[test]
    fn scans_quarantine_at_the_threshold_within_the_window() {
        let p = pol("[trust]\nscan_denied_flows = 10\nscan_window = \"10s\"\n");
        let mut b = TrustBook::default();
        let (src, peer, other) = (DeviceId(1), DeviceId(2), DeviceId(3));
        // The same port again and again is one flow, not a scan.
        for i in 0..50 {
            assert_eq!(
                b.handle_denied(src, peer, [(Proto::Tcp, 22)], &p.trust, false, T + i),
                None
            );
        }
        // Nine more ports, spread beyond the window: no.
        for port in 1..10u16 {
            let at = T + 20_000 + port as i64 * 2_000;
            assert_eq!(
                b.handle_denied(src, peer, [(Proto::Tcp, port)], &p.trust, false, at),
                None
            );
        }
        // Ten distinct ports at once, five at each of two devices: quarantine, asked once,
        // naming both accusers.
        let flows: Vec<(Proto, u16)> = (100..105).map(|p| (Proto::Tcp, p)).collect();
        assert_eq!(
            b.handle_denied(src, peer, flows.clone(), &p.trust, false, T + 60_000),
            None
        );
        let why = b
            .handle_denied(src, other, flows.clone(), &p.trust, false, T + 60_000)
            .unwrap();
        assert!(why.starts_with("scan:"), "{why}");
        assert!(why.ends_with("reported by d2, d3"), "{why}");
        assert_eq!(
            b.handle_denied(src, peer, flows, &p.trust, false, T + 60_001),
            None
        );
        // No threshold in the policy: never.
        let q = pol("");
        let mut b2 = TrustBook::default();
        let many: Vec<(Proto, u16)> = (1..1000).map(|p| (Proto::Tcp, p)).collect();
        assert_eq!(b2.handle_denied(src, peer, many, &q.trust, false, T), None);
    }

    #[test]
    fn stored_evidence_counts_from_when_it_was_reported_and_the_holder_acts() {
        let p = pol("[trust]\nscan_denied_flows = 4\nscan_window = \"10s\"\n");
        let mut b = TrustBook::default();
        let (src, r2, r3) = (DeviceId(1), DeviceId(2), DeviceId(3));
        let two = |a: u16| [(Proto::Tcp, a), (Proto::Tcp, a + 1)];
        // Evidence another replica stored 11 s ago is past the window: nothing.
        assert_eq!(
            b.handle_denied_at(src, r2, two(20), &p.trust, false, T - 11_000, T),
            None
        );
        assert_eq!(b.denied_count(src), 0);
        // Another replica holds the source's session: the evidence is kept, but that
        // replica acts, not this one.
        b.handle_holder(src, Some("r2".into()));
        assert_eq!(
            b.handle_denied_at(src, r2, two(20), &p.trust, false, T - 5_000, T),
            None
        );
        assert_eq!(b.handle_denied(src, r3, two(30), &p.trust, false, T), None);
        assert_eq!(b.denied_count(src), 4);
        // The session comes here: the same evidence is a scan, judged here.
        b.set_held(src, true);
        let why = b.judge_scan(src, &p.trust, false, T + 1).unwrap();
        assert!(why.ends_with("reported by d2, d3"), "{why}");
        assert_eq!(
            b.judge_scan(src, &p.trust, false, T + 2),
            None,
            "asked once"
        );
        // Out-of-order evidence ages out by its own time, not by its place in the queue.
        let mut c = TrustBook::default();
        c.handle_denied_at(src, r2, two(40), &p.trust, false, T, T);
        c.handle_denied_at(src, r3, two(50), &p.trust, false, T - 9_000, T);
        assert_eq!(c.denied_count(src), 4);
        assert_eq!(
            c.handle_denied_at(src, r3, [(Proto::Udp, 9)], &p.trust, false, T, T + 2_000),
            None,
            "r3's older pair left the window: 3 left, from r2 (2) and r3 (1)"
        );
        assert_eq!(c.denied_count(src), 3);
        // A clock ahead of this one: counted as now, never later.
        let mut d = TrustBook::default();
        d.handle_denied_at(src, r2, two(60), &p.trust, false, T + 60_000, T);
        assert_eq!(d.denied_count(src), 2);
        d.handle_denied_at(
            src,
            r3,
            [(Proto::Udp, 1)],
            &p.trust,
            false,
            T + 10_001,
            T + 10_001,
        );
        assert_eq!(d.denied_count(src), 1, "r2's pair aged out from T");
    }

    #[test]
    fn one_reporter_alone_never_quarantines() {
        let p = pol("[trust]\nscan_denied_flows = 10\nscan_window = \"10s\"\n");
        let mut b = TrustBook::default();
        let (victim, accuser) = (DeviceId(1), DeviceId(2));
        // However many distinct flows one device claims, over however many reports.
        for round in 0..20u16 {
            let flows: Vec<(Proto, u16)> =
                (0..200).map(|p| (Proto::Tcp, round * 200 + p)).collect();
            assert_eq!(
                b.handle_denied(
                    victim,
                    accuser,
                    flows,
                    &p.trust,
                    false,
                    T + i64::from(round)
                ),
                None
            );
        }
    }

    #[test]
    fn risk_above_max_risk_fails_the_requirement_and_quarantines_above_the_limit() {
        let p = policy::parse(
            b"[posture.calm]\nmax_risk = 40\n[posture.any]\n[trust]\nquarantine_above_risk = 90\nrisky_lease_ttl = \"1m\"\n",
            "r.toml",
        )
        .unwrap();
        let need: BTreeSet<String> = ["calm".to_string()].into();
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        b.handle_report(d, report(1, 1, T, true), Some(&p), &need, T)
            .unwrap();
        assert!(b.passed(d).contains("calm"));
        assert!(b.set_risk(d, 72, "anomaly 3: first contact with db-7 on tcp/5432", T));
        assert!(!b.set_risk(d, 72, "anomaly 3: first contact with db-7 on tcp/5432", T));
        let c = b.reevaluate(d, Some(&p), &need, T + 1).unwrap();
        assert_eq!(c.withdrawn, vec!["calm".to_string()]);
        assert_eq!(
            b.failures(d)["calm"],
            vec![
                "risk 72 is above the 40 allowed: anomaly 3: first contact with db-7 on tcp/5432"
                    .to_string()
            ]
        );
        // A requirement without max_risk is untouched; the device is risky for leases.
        assert!(b.passed(d).contains("any"));
        assert!(b.risky(d, &p.trust, false, T + 1));
        assert_eq!(b.overdue_risk(d, &p.trust, false), None);
        b.set_risk(d, 95, "anomaly 4: exfiltration", T);
        let why = b.overdue_risk(d, &p.trust, false).unwrap();
        assert!(why.starts_with("risk 95 is above the 90"), "{why}");
        assert_eq!(b.overdue_risk(d, &p.trust, false), None);
        // Back to calm: the requirement passes again.
        b.set_risk(d, 10, "", T);
        let c = b.reevaluate(d, Some(&p), &need, T + 2).unwrap();
        assert_eq!(c.newly_passed, vec!["calm".to_string()]);
        // Leases stay short until the device has been clean for `clean_after`.
        assert!(b.risky(d, &p.trust, false, T + 2));
    }

    #[test]
    fn risk_shortens_leases_until_clean() {
        let p = pol("[trust]\nrisky_lease_ttl = \"1m\"\nclean_after = \"10m\"\n");
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        b.handle_report(d, report(1, 1, T, true), Some(&p), &needed(&p), T)
            .unwrap();
        // "unused" (firewall) fails, but no rule needs it: not risky.
        assert!(!b.risky(d, &p.trust, false, T + 1));
        // "marker" (which a rule needs) fails: risky.
        b.handle_report(d, report(1, 2, T + 1, false), Some(&p), &needed(&p), T + 1)
            .unwrap();
        assert!(b.risky(d, &p.trust, false, T + 2));
        let q = policy::parse(
            b"[posture.x]\nfirewall = false\n[trust]\nrisky_lease_ttl = \"1m\"\nclean_after = \"10m\"\n",
            "q.toml",
        )
        .unwrap();
        let mut b2 = TrustBook::default();
        b2.handle_report(d, report(1, 1, T, true), Some(&q), &needed(&q), T)
            .unwrap();
        assert!(!b2.risky(d, &q.trust, false, T + 1));
        assert!(b2.risky(d, &q.trust, true, T + 1));
        // Clean for longer than clean_after: normal leases again.
        b2.handle_quarantine_changed(d, T);
        assert!(b2.risky(d, &q.trust, false, T + 599_999));
        assert!(!b2.risky(d, &q.trust, false, T + 600_001));
    }

    #[test]
    fn identity_signals_are_judged_from_the_sign_in_and_age_out_by_themselves() {
        let p = policy::parse(
            b"[posture.mfa]\namr = [\"mfa\", \"hwk\"]\n[posture.fresh]\nmax_auth_age = \"1h\"\n",
            "i.toml",
        )
        .unwrap();
        let need: BTreeSet<String> = ["mfa".to_string(), "fresh".to_string()].into();
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        b.handle_report(d, report(1, 1, T, true), Some(&p), &need, T)
            .unwrap();
        // Enrolled with a token: no sign-in, both fail, saying so.
        assert!(b.passed(d).is_empty());
        assert!(
            b.failures(d)["mfa"][0].contains("enrolled with a token"),
            "{:?}",
            b.failures(d)
        );
        // Signed in with a password only: fresh passes, mfa fails with the methods named.
        assert!(b.set_sign_in(
            d,
            Some(SignIn {
                auth_time_ms: T,
                amr: vec!["pwd".into()],
            })
        ));
        let c = b.reevaluate(d, Some(&p), &need, T + 1).unwrap();
        assert_eq!(c.newly_passed, vec!["fresh".to_string()]);
        assert_eq!(
            b.failures(d)["mfa"],
            vec!["amr: sign-in used [pwd], the rule needs mfa or hwk".to_string()]
        );
        // The same sign-in again is no change.
        assert!(!b.set_sign_in(
            d,
            Some(SignIn {
                auth_time_ms: T,
                amr: vec!["pwd".into()],
            })
        ));
        // A sign-in with mfa: both pass.
        b.set_sign_in(
            d,
            Some(SignIn {
                auth_time_ms: T + 2,
                amr: vec!["pwd".into(), "mfa".into()],
            }),
        );
        let c = b.reevaluate(d, Some(&p), &need, T + 3).unwrap();
        assert_eq!(c.newly_passed, vec!["mfa".to_string()]);
        // Time alone (no report; a fresh one is kept by max_report_age, not this) withdraws
        // fresh once the sign-in is older than an hour, and the growing age is no news.
        let r2 = report(1, 2, T + 3_600_000, true);
        b.handle_report(d, r2, Some(&p), &need, T + 3_600_000)
            .unwrap();
        let c = b.reevaluate(d, Some(&p), &need, T + 3_600_003).unwrap();
        assert_eq!(c.withdrawn, vec!["fresh".to_string()]);
        assert_eq!(
            b.failures(d)["fresh"],
            vec!["max_auth_age: signed in 1h ago, the rule allows 1h".to_string()]
        );
        assert!(b.reevaluate(d, Some(&p), &need, T + 3_660_000).is_none());
        assert!(b.reevaluate(d, Some(&p), &need, T + 3_700_000).is_none());
        // Signing in again gives it back.
        b.set_sign_in(
            d,
            Some(SignIn {
                auth_time_ms: T + 3_700_000,
                amr: vec!["pwd".into(), "mfa".into()],
            }),
        );
        let c = b.reevaluate(d, Some(&p), &need, T + 3_700_001).unwrap();
        assert_eq!(c.newly_passed, vec!["fresh".to_string()]);
        // The sign-in outlives the device's trust state (not live for a while).
        b.remove(d);
        assert!(b.sign_in(d).is_some());
    }

    #[test]
    fn elevated_risk_asks_for_a_sign_in_newer_than_the_rise() {
        let p = policy::parse(
            b"[posture.watch]\nrisk_signin_above = 30\nmax_risk = 90\n[posture.any]\n",
            "s.toml",
        )
        .unwrap();
        let need: BTreeSet<String> = ["watch".to_string()].into();
        let mut b = TrustBook::default();
        let d = DeviceId(1);
        b.handle_report(d, report(1, 1, T, true), Some(&p), &need, T)
            .unwrap();
        // At or below the level nothing is asked, even without a sign-in.
        b.set_risk(d, 30, "anomaly 1: new peer", T);
        b.reevaluate(d, Some(&p), &need, T);
        assert!(b.passed(d).contains("watch"));
        // Signed in before the rise: the rise (at T+10) cuts access and says why.
        b.set_sign_in(
            d,
            Some(SignIn {
                auth_time_ms: T + 5,
                amr: vec!["pwd".into()],
            }),
        );
        assert!(b.set_risk(d, 55, "anomaly 2: port sweep", T + 10));
        let c = b.reevaluate(d, Some(&p), &need, T + 11).unwrap();
        assert_eq!(c.withdrawn, vec!["watch".to_string()]);
        let why = &b.failures(d)["watch"];
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("sign in again: risk 55"), "{why:?}");
        assert!(why[0].contains("anomaly 2: port sweep"), "{why:?}");
        assert!(b.passed(d).contains("any"));
        // A sign-in at the same moment as the rise is not newer: still cut.
        b.set_sign_in(
            d,
            Some(SignIn {
                auth_time_ms: T + 10,
                amr: vec![],
            }),
        );
        assert!(b.reevaluate(d, Some(&p), &need, T + 12).is_none());
        // A fresh sign-in restores access while the risk is still high.
        b.set_sign_in(
            d,
            Some(SignIn {
                auth_time_ms: T + 20,
                amr: vec![],
            }),
        );
        let c = b.reevaluate(d, Some(&p), &need, T + 21).unwrap();
        assert_eq!(c.newly_passed, vec!["watch".to_string()]);
        // Rising further keeps the moment the risk first went above 30: still fine.
        b.set_risk(d, 70, "anomaly 3: more", T + 30);
        assert!(b.reevaluate(d, Some(&p), &need, T + 31).is_none());
        assert!(b.passed(d).contains("watch"));
        // max_risk stays the hard cut whatever the sign-in.
        b.set_risk(d, 95, "anomaly 4: exfiltration", T + 40);
        b.reevaluate(d, Some(&p), &need, T + 41).unwrap();
        assert!(b.failures(d)["watch"][0].starts_with("risk 95 is above the 90"));
        // The risk decays below the level, then rises again: a new moment, a new sign-in.
        b.set_risk(d, 20, "", T + 50);
        b.reevaluate(d, Some(&p), &need, T + 51).unwrap();
        assert!(b.passed(d).contains("watch"));
        b.set_risk(d, 40, "anomaly 5: sweep again", T + 60);
        b.reevaluate(d, Some(&p), &need, T + 61).unwrap();
        assert!(b.failures(d)["watch"][0].starts_with("sign in again: risk 40"));
        // Without any sign-in (a device enrolled with a token) the reason says so.
        let mut t = TrustBook::default();
        t.handle_report(d, report(1, 1, T, true), Some(&p), &need, T)
            .unwrap();
        t.set_risk(d, 31, "anomaly 6", T + 1);
        t.reevaluate(d, Some(&p), &need, T + 2).unwrap();
        assert!(
            t.failures(d)["watch"][0].contains("no sign-in"),
            "{:?}",
            t.failures(d)
        );
    }
}
