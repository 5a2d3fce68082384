//! `policy suggest`, `policy replay` and `policy suggestions`: the stored flows of a window,
//! paired, judged against the policy in force by the I/O-free [`crate::suggest`] core, with
//! what administrators decided about each suggestion (stored marks).
//!
//! A dismissed suggestion is hidden until it is seen with more flows or on more days than when
//! it was dismissed; a snoozed one until its time; an accepted one (the admin took it into a
//! policy: accepting applies nothing) stays listed, marked, until the policy in force makes it
//! moot.

use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};

use ward_shared::policy::{self, Directory, Policy};

use super::api::{ReplayView, SuggestView, SuggestionMarkView, SuggestionView};
use super::ops::Live;
use crate::flows::{pair, Pair, Tolerance};
use crate::store::{FlowQuery, Store, SuggestionMark, SuggestionState};
use crate::suggest::{self, replay, write};

/// Most stored records one request reads (newest windows first).
const MAX_ROWS: usize = 200_000;
/// Longest dismissal reason kept.
const MAX_REASON: usize = 200;

/// The window and thresholds of a suggestion run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuggestAsk {
    /// Flows whose windows ended within this many seconds.
    pub since_secs: u64,
    /// Evidence from fewer distinct days is low confidence.
    pub min_days: u32,
    /// Build the candidate policy (`--write`).
    #[serde(default)]
    pub write: bool,
    /// …with shadow rules instead of enforced changes (`--shadow`).
    #[serde(default)]
    pub shadow: bool,
}

/// What an administrator decides about a suggestion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkAsk {
    pub id: String,
    pub state: SuggestionState,
    /// Why (dismiss: required).
    #[serde(default)]
    pub reason: Option<String>,
    /// Snooze until: RFC 3339 or a duration from now (`7d`).
    #[serde(default)]
    pub until: Option<String>,
    /// The run the ID must be part of.
    pub ask: SuggestAsk,
}

/// The policy in force (text and parsed), the directory with active grants, and the window's
/// pairs.
struct World {
    text: String,
    policy: Policy,
    dir: Directory,
    pairs: Vec<Pair>,
    since_ms: i64,
}

fn world(store: &dyn Store, dir: &Directory, since_secs: u64, now: i64) -> Result<World> {
    let text = store.current_policy()?.map(|v| v.text).unwrap_or_default();
    let policy = policy::parse(text.as_bytes(), "policy.toml")
        .map_err(|e| anyhow!("the stored policy does not parse: {e}"))?;
    let mut dir = dir.clone();
    dir.grants = super::ops::active_grants(store, now)?;
    let since_ms = now.saturating_sub(
        i64::try_from(since_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000),
    );
    let rows = store.flows(&FlowQuery {
        since_ms,
        involving: None,
        limit: MAX_ROWS,
    })?;
    let pairs = pair(&rows, &Tolerance::default(), now);
    Ok(World {
        text,
        policy,
        dir,
        pairs,
        since_ms,
    })
}

/// `policy suggest` (`all`: also the hidden ones, for `policy suggestions ls`).
pub fn suggest(
    store: &dyn Store,
    dir: &Directory,
    ask: &SuggestAsk,
    all: bool,
    now: i64,
) -> Result<SuggestView> {
    let w = world(store, dir, ask.since_secs, now)?;
    let found = suggest::suggest(&suggest::Input {
        policy: &w.policy,
        dir: &w.dir,
        pairs: &w.pairs,
        now_ms: now,
        since_ms: w.since_ms,
        min_days: ask.min_days,
    });
    let marks = store.suggestion_marks()?;
    let mut views: Vec<SuggestionView> = found
        .into_iter()
        .map(|s| {
            let m = marks.iter().find(|m| m.id == s.id);
            let returned = m.is_some_and(|m| {
                m.state == SuggestionState::Dismissed
                    && (s.evidence.flows > m.flows || s.evidence.days_seen > m.days)
            });
            let hidden = m.is_some_and(|m| match m.state {
                SuggestionState::Dismissed => !returned,
                SuggestionState::Snoozed => m.until_ms.is_some_and(|u| now < u),
                SuggestionState::Accepted => false,
            });
            SuggestionView {
                writable: s.writable() && !hidden,
                state: m.map(|m| m.state),
                returned,
                hidden,
                reason: m.and_then(|m| m.reason.clone()),
                until_ms: m.and_then(|m| m.until_ms),
                suggestion: s,
            }
        })
        .collect();
    let written = if ask.write {
        let chosen: Vec<suggest::Suggestion> = views
            .iter()
            .filter(|v| v.writable)
            .map(|v| v.suggestion.clone())
            .collect();
        let mode = if ask.shadow {
            write::Mode::Shadow
        } else {
            write::Mode::Enforce
        };
        Some(
            write::candidate(&w.text, &w.policy, &w.dir, &w.pairs, &chosen, mode, now)
                .map_err(|e| anyhow!("{e}"))?,
        )
    } else {
        None
    };
    if !all {
        views.retain(|v| !v.hidden);
    }
    Ok(SuggestView {
        since_ms: w.since_ms,
        min_days: ask.min_days,
        flows: w.pairs.len(),
        suggestions: views,
        written,
    })
}

/// `policy replay FILE`: the window's flows judged by the candidate (sent base64-encoded).
pub fn replay(
    store: &dyn Store,
    live: &dyn Live,
    dir: &Directory,
    file_name: &str,
    content_b64: &str,
    since_secs: u64,
    now: i64,
) -> Result<ReplayView> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(content_b64)
        .map_err(|_| anyhow!("policy content is not valid base64"))?;
    let w = world(store, dir, since_secs, now)?;
    let cand = match policy::parse(&bytes, file_name) {
        Ok(p) => p,
        Err(e) => {
            return Ok(ReplayView {
                since_ms: w.since_ms,
                error: Some(e.to_string()),
                replay: replay::Replayed::default(),
            })
        }
    };
    // Posture as the candidate's requirements judge it, with the active grants.
    let mut cdir = live.directory_for(&cand)?;
    cdir.grants = w.dir.grants.clone();
    Ok(ReplayView {
        since_ms: w.since_ms,
        error: None,
        replay: replay::replay(&cand, &cdir, &w.pairs, now),
    })
}

/// `policy suggestions accept|dismiss|snooze ID`: the ID must be a current suggestion.
pub fn mark(
    store: &dyn Store,
    dir: &Directory,
    ask: &MarkAsk,
    now: i64,
) -> Result<SuggestionMarkView> {
    let run = SuggestAsk {
        write: false,
        shadow: false,
        ..ask.ask
    };
    let v = suggest(store, dir, &run, true, now)?;
    let Some(s) = v.suggestions.iter().find(|s| s.suggestion.id == ask.id) else {
        bail!(
            "no current suggestion has id {:?} (`policy suggestions ls` lists them; the window is the last {}s)",
            ask.id,
            ask.ask.since_secs
        );
    };
    let reason = ask.reason.as_deref().map(|r| {
        r.chars()
            .filter(|c| !c.is_control())
            .take(MAX_REASON)
            .collect::<String>()
    });
    let until_ms = match ask.state {
        SuggestionState::Snoozed => {
            let until = ask.until.as_deref().ok_or_else(|| {
                anyhow!("snooze needs --until (RFC 3339 or a duration such as 7d)")
            })?;
            let t = until_ms(until, now)?;
            ensure!(t > now, "--until must be in the future");
            Some(t)
        }
        _ => None,
    };
    if ask.state == SuggestionState::Dismissed {
        ensure!(
            reason.as_deref().is_some_and(|r| !r.trim().is_empty()),
            "dismiss needs --reason"
        );
    }
    let m = SuggestionMark {
        id: s.suggestion.id.clone(),
        kind: s.suggestion.kind.as_str().to_string(),
        subject: s.suggestion.subject.clone(),
        state: ask.state,
        reason,
        until_ms,
        flows: s.suggestion.evidence.flows,
        days: s.suggestion.evidence.days_seen,
        actor: "admin".into(),
        updated_ms: now,
    };
    store.mark_suggestion(&m)?;
    tracing::info!(id = %m.id, state = m.state.as_str(), "suggestion marked");
    Ok(SuggestionMarkView { mark: m })
}

/// RFC 3339, or a duration from `now`.
fn until_ms(s: &str, now: i64) -> Result<i64> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| anyhow!("--until is out of range"));
    }
    let d = super::parse_duration(s)
        .map_err(|_| anyhow!("--until {s:?} is neither RFC 3339 nor a duration (7d, 12h)"))?;
    Ok(now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;
    use std::collections::{BTreeMap, BTreeSet};
    use ward_shared::filter::Proto;
    use ward_shared::flows::{DenyCause, FlowRecord, FlowReport, FlowVerdict, FlowWindow, Role};
    use ward_shared::policy::{DirDevice, DirUser};
    use ward_shared::wire::DeviceId;

    const DAY: i64 = suggest::DAY_MS;
    const NOW: i64 = 20 * DAY;

    fn dev(id: u64, host: &str, user: Option<&str>, tags: &[&str]) -> DirDevice {
        DirDevice {
            id: DeviceId(id),
            hostname: host.into(),
            user: user.map(Into::into),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: std::net::Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, id as u16),
            live: true,
            posture_passed: BTreeSet::new(),
            posture_failures: BTreeMap::new(),
            quarantined: false,
            name_bound: true,
        }
    }

    fn dir() -> Directory {
        Directory {
            users: vec![DirUser {
                name: "bob".into(),
                groups: vec![],
                disabled: false,
                suspended: None,
            }],
            devices: vec![dev(2, "b1", Some("bob"), &[]), dev(6, "db1", None, &["db"])],
            grants: vec![],
        }
    }

    fn rec(role: Role, peer: u64, verdict: FlowVerdict) -> FlowRecord {
        FlowRecord {
            role,
            peer: Some(DeviceId(peer)),
            peer_addr: format!("100.64.0.{peer}").parse().unwrap(),
            peer_user: None,
            peer_tags: vec![],
            proto: Proto::Tcp,
            port: 5432,
            verdict,
            rule: None,
            policy_version: Some(1),
            reason: (verdict == FlowVerdict::Denied).then_some(DenyCause::NoRule),
            packets_out: if role == Role::Initiator { 3 } else { 0 },
            bytes_out: if role == Role::Initiator { 180 } else { 0 },
            packets_in: if role == Role::Initiator { 0 } else { 3 },
            bytes_in: if role == Role::Initiator { 0 } else { 180 },
            connections: 3,
            shadow: None,
        }
    }

    /// b1 is denied on db1 tcp/5432 on day `day` (both ends report it).
    fn denied_on(s: &SqliteStore, seq: u64, day: i64) {
        let start = NOW - day * DAY;
        let w = |r| FlowWindow {
            start_ms: start,
            end_ms: start + 60_000,
            records: vec![r],
        };
        let report = |r| FlowReport {
            seq,
            windows: vec![w(r)],
            dropped_records: 0,
        };
        s.store_flows(
            DeviceId(2),
            &report(rec(Role::Initiator, 6, FlowVerdict::Allowed)),
            0,
            NOW,
        )
        .unwrap();
        s.store_flows(
            DeviceId(6),
            &report(rec(Role::Responder, 2, FlowVerdict::Denied)),
            0,
            NOW,
        )
        .unwrap();
    }

    fn store() -> SqliteStore {
        let s = SqliteStore::open_in_memory().unwrap();
        let text = "[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/5432\"]\n";
        s.save_policy(text, "x", "", "admin", 0).unwrap();
        denied_on(&s, 1, 2);
        denied_on(&s, 2, 1);
        s
    }

    const ASK: SuggestAsk = SuggestAsk {
        since_secs: 14 * 86400,
        min_days: 2,
        write: false,
        shadow: false,
    };

    fn mark_ask(id: &str, state: SuggestionState) -> MarkAsk {
        MarkAsk {
            id: id.into(),
            state,
            reason: None,
            until: None,
            ask: ASK,
        }
    }

    #[test]
    fn a_dismissed_suggestion_returns_only_on_new_evidence() {
        let s = store();
        let v = suggest(&s, &dir(), &ASK, false, NOW).unwrap();
        assert_eq!(v.suggestions.len(), 1, "{v:#?}");
        let id = v.suggestions[0].suggestion.id.clone();
        assert!(v.suggestions[0].writable);
        // A reason is required.
        let err = mark(&s, &dir(), &mark_ask(&id, SuggestionState::Dismissed), NOW).unwrap_err();
        assert!(err.to_string().contains("--reason"), "{err}");
        let mut ask = mark_ask(&id, SuggestionState::Dismissed);
        ask.reason = Some("db access goes through the bastion".into());
        mark(&s, &dir(), &ask, NOW).unwrap();
        assert!(suggest(&s, &dir(), &ASK, false, NOW)
            .unwrap()
            .suggestions
            .is_empty());
        let ls = suggest(&s, &dir(), &ASK, true, NOW).unwrap();
        assert!(ls.suggestions[0].hidden && !ls.suggestions[0].writable);
        // --write leaves it out too.
        let w = suggest(&s, &dir(), &SuggestAsk { write: true, ..ASK }, false, NOW).unwrap();
        assert!(w.written.unwrap().applied.is_empty());
        // Denied again on a new day: it returns.
        denied_on(&s, 3, 3);
        let v = suggest(&s, &dir(), &ASK, false, NOW).unwrap();
        assert_eq!(v.suggestions.len(), 1);
        assert!(v.suggestions[0].returned && v.suggestions[0].writable);
        let audit = s.audit_log(10).unwrap();
        assert!(audit
            .iter()
            .any(|a| a.action == "suggestion.dismiss" && a.target == id));
    }

    #[test]
    fn snooze_hides_until_its_time_and_accept_is_recorded() {
        let s = store();
        let id = suggest(&s, &dir(), &ASK, false, NOW).unwrap().suggestions[0]
            .suggestion
            .id
            .clone();
        let mut ask = mark_ask(&id, SuggestionState::Snoozed);
        assert!(mark(&s, &dir(), &ask, NOW).is_err(), "--until is required");
        ask.until = Some("1h".into());
        let m = mark(&s, &dir(), &ask, NOW).unwrap();
        assert_eq!(m.mark.until_ms, Some(NOW + 3_600_000));
        assert!(suggest(&s, &dir(), &ASK, false, NOW)
            .unwrap()
            .suggestions
            .is_empty());
        let later = NOW + 2 * 3_600_000;
        assert_eq!(
            suggest(&s, &dir(), &ASK, false, later)
                .unwrap()
                .suggestions
                .len(),
            1
        );
        ask.until = Some("1970-01-01T00:00:00Z".into());
        assert!(mark(&s, &dir(), &ask, NOW).is_err(), "the past is refused");
        // Accepting records it; the suggestion stays listed, marked.
        mark(&s, &dir(), &mark_ask(&id, SuggestionState::Accepted), NOW).unwrap();
        let v = suggest(&s, &dir(), &ASK, false, NOW).unwrap();
        assert_eq!(v.suggestions[0].state, Some(SuggestionState::Accepted));
        assert!(s
            .audit_log(10)
            .unwrap()
            .iter()
            .any(|a| a.action == "suggestion.accept" && a.target == id));
        // Unknown IDs are refused.
        assert!(mark(
            &s,
            &dir(),
            &mark_ask("s000000000000", SuggestionState::Accepted),
            NOW
        )
        .is_err());
        assert_eq!(s.suggestion_marks().unwrap().len(), 1);
    }

    #[test]
    fn replay_reports_a_candidate_that_does_not_parse() {
        use base64::Engine;
        struct NoLive;
        impl Live for NoLive {
            fn snapshot(&self) -> Result<super::super::ops::Snapshot> {
                unreachable!()
            }
            fn directory_for(&self, _: &Policy) -> Result<Directory> {
                Ok(dir())
            }
            fn trust_view(
                &self,
                _: DeviceId,
            ) -> Result<(
                Option<ward_shared::posture::PostureReport>,
                ward_shared::wire::PostureVerdict,
            )> {
                unreachable!()
            }
            fn rotate(&self, _: DeviceId, _: &str) -> Result<bool> {
                unreachable!()
            }
            fn notify(&self, _: super::super::ops::Notice) {}
        }
        let s = store();
        let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        let v = replay(
            &s,
            &NoLive,
            &dir(),
            "c.toml",
            &b64("[[rules]\n"),
            86400 * 14,
            NOW,
        )
        .unwrap();
        assert!(v.error.is_some());
        let cand = "[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/5432\"]\n[[rules]]\nfrom = [\"bob\"]\nto = [\"db\"]\n";
        let v = replay(&s, &NoLive, &dir(), "c.toml", &b64(cand), 86400 * 14, NOW).unwrap();
        assert!(v.replay.newly_denied.is_empty());
        assert_eq!(v.replay.newly_allowed.len(), 1);
        assert_eq!(v.replay.newly_allowed[0].flows, 6);
    }
}
