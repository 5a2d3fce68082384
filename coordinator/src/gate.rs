//! The gate in front of everything an unauthenticated party can make the coordinator do:
//! a token bucket per source address, and refusals aggregated into at most one audit row per
//! source and action per interval.
//!
//! Anyone who can reach the QUIC port can send enrollment requests with forged tokens, and a
//! revoked device can keep reconnecting. Without a gate each attempt is a database transaction
//! and an fsync'd audit row. With it:
//!
//! - each attempt takes a token from its source's bucket ([`GateConfig::burst`] deep, refilled
//!   at [`GateConfig::per_sec`]); an empty bucket refuses at once, before any database work;
//! - the first refusal of a source (per action) in an interval is audited at once, with its
//!   reason; the ones after it are counted, by reason, and come out of [`EnrollGate::poll_rows`]
//!   as one row with the count when the interval since the last row has passed;
//! - the table holds at most [`GateConfig::max_sources`] sources; when it is full, idle
//!   sources are dropped, and if none is idle, new sources share one bucket and one count
//!   ("other sources"), so memory stays bounded whatever the number of addresses.
//!
//! I/O-free: time comes in as `now_ms`; the driver (`server::session`) writes the rows.
//!
//! ```text
//! attempt from ADDR ─► admit(ADDR, now) ─► Limited ─► refused(ADDR, action, "rate limited", now)
//!                                       └► Go ─► work ─► refused? ─► refused(…) ─► Some(row) → write
//! every second: poll_rows(now) → rows to write
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::audit::Action;

/// The gate's limits.
#[derive(Debug, Clone, Copy)]
pub struct GateConfig {
    /// Attempts a source may make at once (a NAT'd office enrolling many devices together).
    pub burst: f64,
    /// Attempts per second a source gets back.
    pub per_sec: f64,
    /// At most one aggregated audit row per source and action per this many ms.
    pub interval_ms: i64,
    /// Sources tracked at most.
    pub max_sources: usize,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            burst: 128.0,
            per_sec: 2.0,
            interval_ms: 10_000,
            max_sources: 4096,
        }
    }
}

/// Whether an attempt may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Admit {
    Go,
    /// The source's bucket is empty: refuse without doing anything else.
    Limited,
}

/// One audit row to write: `count` refusals of `action` from `source` (`None`: the shared
/// "other sources" entry, or a row about a named subject) since the previous row, by reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRow {
    pub source: Option<IpAddr>,
    /// The named subject (a revoked device's hostname), for [`EnrollGate::refused_subject`].
    pub subject: Option<String>,
    pub action: Action,
    pub count: u64,
    pub reasons: BTreeMap<String, u64>,
    /// Of `count`, how many the rate limit refused.
    pub rate_limited: u64,
    /// The interval the row covers, ms.
    pub interval_ms: i64,
}

impl RefusalRow {
    /// The audit target: the source address.
    pub fn target(&self) -> String {
        if let Some(s) = &self.subject {
            return s.clone();
        }
        self.source
            .map(|a| a.to_string())
            .unwrap_or_else(|| "other sources".into())
    }

    /// The audit detail: count, reasons and the most frequent reason as `reason`.
    pub fn detail(&self) -> serde_json::Value {
        let top = self
            .reasons
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(r, _)| r.clone())
            .unwrap_or_default();
        serde_json::json!({
            "remote": self.source.map(|a| a.to_string()).unwrap_or_else(|| "other sources".into()),
            "count": self.count,
            "reason": top,
            "reasons": self.reasons,
            "rate_limited": self.rate_limited,
            "interval_s": self.interval_ms / 1000,
        })
    }
}

/// Reasons kept per pending row (the rest are counted as "other reasons").
const MAX_REASONS: usize = 8;

#[derive(Debug, Default)]
struct Pending {
    count: u64,
    rate_limited: u64,
    reasons: BTreeMap<String, u64>,
    /// When a row for this source and action was last written.
    last_row_ms: Option<i64>,
}

#[derive(Debug)]
struct Source {
    tokens: f64,
    refilled_ms: i64,
    pending: BTreeMap<Action, Pending>,
}

/// Per-source rate limits and refusal aggregation (see the module doc).
#[derive(Debug)]
pub struct EnrollGate {
    cfg: GateConfig,
    /// `None` is the shared entry for sources that found the table full.
    sources: BTreeMap<Option<IpAddr>, Source>,
    /// Refusals about a named subject (a revoked device, whatever address it comes from),
    /// bounded like `sources`.
    subjects: BTreeMap<(String, Action), Pending>,
    /// Every refusal recorded since start, by action (for metrics).
    totals: BTreeMap<Action, u64>,
}

impl EnrollGate {
    pub fn new(cfg: GateConfig) -> Self {
        Self {
            cfg,
            sources: BTreeMap::new(),
            subjects: BTreeMap::new(),
            totals: BTreeMap::new(),
        }
    }

    /// Refusals recorded since start, by action (`connect.refused`, `enroll.refused`).
    pub fn refusal_totals(&self) -> &BTreeMap<Action, u64> {
        &self.totals
    }

    /// Takes a token from `source`'s bucket.
    pub fn admit(&mut self, source: IpAddr, now_ms: i64) -> Admit {
        let cfg = self.cfg;
        let s = self.source(source, now_ms);
        let elapsed = now_ms.saturating_sub(s.refilled_ms).max(0) as f64 / 1000.0;
        s.tokens = (s.tokens + elapsed * cfg.per_sec).min(cfg.burst);
        s.refilled_ms = now_ms;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Admit::Go
        } else {
            Admit::Limited
        }
    }

    /// Records a refusal; returns the row to write now if this source has had no row for
    /// `action` in the last interval (the row then carries this refusal and any counted ones).
    pub fn refused(
        &mut self,
        source: IpAddr,
        action: Action,
        reason: &str,
        limited: bool,
        now_ms: i64,
    ) -> Option<RefusalRow> {
        *self.totals.entry(action).or_default() += 1;
        let interval = self.cfg.interval_ms;
        let key = self.key_for(source, now_ms);
        let s = self.sources.get_mut(&key)?;
        let p = s.pending.entry(action).or_default();
        p.count += 1;
        if limited {
            p.rate_limited += 1;
        }
        let reason = if p.reasons.len() >= MAX_REASONS && !p.reasons.contains_key(reason) {
            "other reasons"
        } else {
            reason
        };
        *p.reasons.entry(reason.to_string()).or_default() += 1;
        if p.last_row_ms.is_some_and(|t| now_ms - t < interval) {
            return None;
        }
        Some(take_row(key, action, p, now_ms))
    }

    /// Records a refusal about `subject` (a revoked device reconnecting, from `source`), one
    /// row per subject and interval like [`EnrollGate::refused`].
    pub fn refused_subject(
        &mut self,
        subject: &str,
        source: IpAddr,
        action: Action,
        reason: &str,
        now_ms: i64,
    ) -> Option<RefusalRow> {
        let interval = self.cfg.interval_ms;
        let key = (subject.to_string(), action);
        if !self.subjects.contains_key(&key) && self.subjects.len() >= self.cfg.max_sources {
            self.subjects
                .retain(|_, p| p.count > 0 || p.last_row_ms.is_some_and(|t| now_ms - t < interval));
            if self.subjects.len() >= self.cfg.max_sources {
                // Still full: account it to its source instead.
                return self.refused(source, action, reason, false, now_ms);
            }
        }
        *self.totals.entry(action).or_default() += 1;
        let p = self.subjects.entry(key).or_default();
        p.count += 1;
        if p.reasons.len() < MAX_REASONS || p.reasons.contains_key(reason) {
            *p.reasons.entry(reason.to_string()).or_default() += 1;
        }
        if p.last_row_ms.is_some_and(|t| now_ms - t < interval) {
            return None;
        }
        let mut row = take_row(Some(source), action, p, now_ms);
        row.subject = Some(subject.to_string());
        Some(row)
    }

    /// Rows whose interval has passed with refusals counted since the last row.
    #[must_use]
    pub fn poll_rows(&mut self, now_ms: i64) -> Vec<RefusalRow> {
        let interval = self.cfg.interval_ms;
        let mut rows = Vec::new();
        for ((subject, action), p) in self.subjects.iter_mut() {
            if p.count > 0 && p.last_row_ms.is_none_or(|t| now_ms - t >= interval) {
                let mut row = take_row(None, *action, p, now_ms);
                row.subject = Some(subject.clone());
                rows.push(row);
            }
        }
        for (key, s) in self.sources.iter_mut() {
            for (action, p) in s.pending.iter_mut() {
                if p.count > 0 && p.last_row_ms.is_none_or(|t| now_ms - t >= interval) {
                    rows.push(take_row(*key, *action, p, now_ms));
                }
            }
        }
        rows
    }

    /// Sources tracked now (for tests and `status`).
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    /// The entry an attempt from `source` is accounted to.
    fn key_for(&mut self, source: IpAddr, now_ms: i64) -> Option<IpAddr> {
        if self.sources.contains_key(&Some(source)) {
            return Some(source);
        }
        if self.sources.len() >= self.cfg.max_sources {
            self.evict_idle(now_ms);
        }
        if self.sources.len() >= self.cfg.max_sources {
            self.sources.entry(None).or_insert_with(|| Source {
                tokens: self.cfg.burst,
                refilled_ms: now_ms,
                pending: BTreeMap::new(),
            });
            return None;
        }
        self.sources.insert(
            Some(source),
            Source {
                tokens: self.cfg.burst,
                refilled_ms: now_ms,
                pending: BTreeMap::new(),
            },
        );
        Some(source)
    }

    fn source(&mut self, source: IpAddr, now_ms: i64) -> &mut Source {
        let key = self.key_for(source, now_ms);
        // `key_for` inserted or found `key`; the fallback entry keeps this total anyway.
        self.sources.entry(key).or_insert_with(|| Source {
            tokens: 0.0,
            refilled_ms: now_ms,
            pending: BTreeMap::new(),
        })
    }

    /// Drops sources whose bucket has refilled and that have nothing left to report.
    fn evict_idle(&mut self, now_ms: i64) {
        let cfg = self.cfg;
        self.sources.retain(|k, s| {
            if k.is_none() {
                return true;
            }
            let refill = now_ms.saturating_sub(s.refilled_ms).max(0) as f64 / 1000.0 * cfg.per_sec;
            let full = s.tokens + refill >= cfg.burst;
            let quiet = s.pending.values().all(|p| {
                p.count == 0 && p.last_row_ms.is_none_or(|t| now_ms - t >= cfg.interval_ms)
            });
            !(full && quiet)
        });
    }
}

fn take_row(source: Option<IpAddr>, action: Action, p: &mut Pending, now_ms: i64) -> RefusalRow {
    let row = RefusalRow {
        source,
        subject: None,
        action,
        count: p.count,
        reasons: std::mem::take(&mut p.reasons),
        rate_limited: p.rate_limited,
        interval_ms: p.last_row_ms.map_or(0, |t| now_ms - t),
    };
    p.count = 0;
    p.rate_limited = 0;
    p.last_row_ms = Some(now_ms);
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn bucket_refuses_after_its_burst_and_refills() {
        let mut g = EnrollGate::new(GateConfig {
            burst: 3.0,
            per_sec: 1.0,
            ..GateConfig::default()
        });
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(g.admit(a, 0), Admit::Go);
        }
        assert_eq!(g.admit(a, 0), Admit::Limited);
        // Another source has its own bucket.
        assert_eq!(g.admit(ip("192.0.2.2"), 0), Admit::Go);
        assert_eq!(g.admit(a, 999), Admit::Limited);
        assert_eq!(g.admit(a, 1000), Admit::Go);
    }

    #[test]
    fn refusals_become_one_row_per_source_per_interval() {
        let mut g = EnrollGate::new(GateConfig::default());
        let a = ip("192.0.2.1");
        let first = g
            .refused(a, Action::EnrollRefused, "wrong secret", false, 0)
            .expect("the first refusal is written at once");
        assert_eq!(first.count, 1);
        assert_eq!(first.detail()["reason"], "wrong secret");
        let mut rows = 0;
        for t in 1..10_000 {
            let why = if t % 2 == 0 {
                "wrong secret"
            } else {
                "unknown token"
            };
            rows += g
                .refused(a, Action::EnrollRefused, why, t % 3 == 0, t)
                .map_or(0, |_| 1);
            rows += g.poll_rows(t).len();
        }
        assert_eq!(rows, 0, "nothing more within the interval");
        let out = g.poll_rows(10_000);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].count, 9_999);
        assert_eq!(out[0].reasons.values().sum::<u64>(), 9_999);
        assert_eq!(out[0].rate_limited, 3_333);
        assert_eq!(out[0].target(), "192.0.2.1");
        assert!(g.poll_rows(30_000).is_empty(), "nothing counted: no row");
        // Quiet for an interval: the next refusal is written at once again.
        assert!(g
            .refused(a, Action::EnrollRefused, "x", false, 40_000)
            .is_some());
    }

    #[test]
    fn a_subject_gets_one_row_per_interval_named_after_it() {
        let mut g = EnrollGate::new(GateConfig::default());
        let a = ip("192.0.2.9");
        let row = g
            .refused_subject("laptop", a, Action::ConnectRefused, "revoked", 0)
            .unwrap();
        assert_eq!(row.target(), "laptop");
        assert_eq!(row.detail()["remote"], "192.0.2.9");
        for t in 1..100 {
            assert!(g
                .refused_subject("laptop", a, Action::ConnectRefused, "revoked", t)
                .is_none());
        }
        let rows = g.poll_rows(10_000);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].target(), rows[0].count),
            ("laptop".to_string(), 99)
        );
    }

    #[test]
    fn the_table_stays_bounded_under_many_sources() {
        let mut g = EnrollGate::new(GateConfig {
            max_sources: 16,
            ..GateConfig::default()
        });
        let mut written = 0;
        for i in 0..10_000u32 {
            let a = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            let _ = g.admit(a, i as i64);
            written += g
                .refused(a, Action::EnrollRefused, "forged", false, i as i64)
                .map_or(0, |_| 1);
        }
        assert!(g.tracked() <= 17, "{}", g.tracked());
        // The 16 first sources got a row each; the rest share one entry's rows.
        assert!(written <= 17 + 1, "{written}");
        let later = g.poll_rows(20_000);
        assert!(later.len() <= 17);
        assert_eq!(
            later
                .iter()
                .find(|r| r.source.is_none())
                .map(|r| r.target()),
            Some("other sources".to_string())
        );
    }
}
