//! One device's learned behaviour: streaming statistics with decay and a bounded table of the
//! destinations it uses. Everything here has a fixed size or a hard cap, so a device that
//! contacts a million addresses costs the same as one that contacts a thousand.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use ward_shared::filter::Proto;

/// Hours in a week: activity and volume are learned per hour of the week (daily and weekly
/// rhythms).
pub const HOURS_OF_WEEK: usize = 168;

/// An exponentially weighted mean and variance. Early samples are averaged plainly (weight
/// `1/n`) so a fresh statistic is not dominated by its first value; after that each sample
/// weighs at least `alpha`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    pub mean: f64,
    pub var: f64,
    pub n: u64,
}

impl Ewma {
    pub fn observe(&mut self, x: f64, alpha: f64) {
        self.n = self.n.saturating_add(1);
        let a = alpha.max(1.0 / self.n as f64).clamp(0.0, 1.0);
        let diff = x - self.mean;
        let incr = a * diff;
        self.mean += incr;
        self.var = (1.0 - a) * (self.var + diff * incr);
    }

    pub fn sd(&self) -> f64 {
        self.var.max(0.0).sqrt()
    }
}

/// A destination as the reporting device saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dest {
    pub addr: IpAddr,
    pub proto: Proto,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestUse {
    pub first_ms: i64,
    pub last_ms: i64,
    pub windows: u64,
}

/// The destinations a device used, most recently used kept: at most `cap` entries; a new one
/// beyond the cap pushes out the least recently used.
/// Stored as a list (JSON maps need string keys).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "Vec<(Dest, DestUse)>", into = "Vec<(Dest, DestUse)>")]
pub struct DestTable {
    entries: BTreeMap<Dest, DestUse>,
    /// (last use, destination): the eviction order.
    by_age: BTreeSet<(i64, Dest)>,
}

impl From<Vec<(Dest, DestUse)>> for DestTable {
    fn from(v: Vec<(Dest, DestUse)>) -> Self {
        let mut t = DestTable {
            entries: v.into_iter().collect(),
            by_age: BTreeSet::new(),
        };
        t.reindex();
        t
    }
}

impl From<DestTable> for Vec<(Dest, DestUse)> {
    fn from(t: DestTable) -> Self {
        t.entries.into_iter().collect()
    }
}

impl DestTable {
    /// Rebuilds the eviction index after a restore.
    pub fn reindex(&mut self) {
        self.by_age = self.entries.iter().map(|(d, u)| (u.last_ms, *d)).collect();
    }

    pub fn get(&self, d: &Dest) -> Option<&DestUse> {
        self.entries.get(d)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records a use at `now_ms`.
    pub fn touch(&mut self, d: Dest, now_ms: i64, cap: usize) {
        if let Some(u) = self.entries.get_mut(&d) {
            self.by_age.remove(&(u.last_ms, d));
            u.last_ms = u.last_ms.max(now_ms);
            u.windows = u.windows.saturating_add(1);
            self.by_age.insert((u.last_ms, d));
            return;
        }
        while self.entries.len() >= cap.max(1) {
            let Some(oldest) = self.by_age.pop_first() else {
                break;
            };
            self.entries.remove(&oldest.1);
        }
        self.entries.insert(
            d,
            DestUse {
                first_ms: now_ms,
                last_ms: now_ms,
                windows: 1,
            },
        );
        self.by_age.insert((now_ms, d));
    }

    /// Bytes this table accounts for: each entry is held in the map and in the age index.
    pub fn accounted_bytes(&self) -> usize {
        let per = std::mem::size_of::<Dest>() * 2
            + std::mem::size_of::<DestUse>()
            + std::mem::size_of::<i64>()
            // B-tree node overhead per entry, generously (keys and values live in nodes of
            // up to 11 entries with a parent pointer and lengths).
            + 16;
        self.entries.len() * per
    }
}

/// Per-window rates, normalised to one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub bytes_out: f64,
    pub connections: f64,
    pub peers: f64,
    pub ports: f64,
}

/// What a device normally does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    /// When this device was first seen (its learning period runs from here).
    pub since_ms: i64,
    pub bytes_out: Ewma,
    pub connections: Ewma,
    pub peers: Ewma,
    pub ports: Ewma,
    /// Bytes out per minute, per hour of the week.
    pub bytes_by_hour: Vec<Ewma>,
    /// New connections per minute, per hour of the week.
    pub connections_by_hour: Vec<Ewma>,
    /// Windows with outbound activity, per hour of the week (decayed by halving weekly).
    pub active_by_hour: Vec<f32>,
    pub dests: DestTable,
    /// The last window seen (for hour-of-week decay and ordering).
    pub last_ms: i64,
}

impl Baseline {
    pub fn new(now_ms: i64) -> Self {
        Self {
            since_ms: now_ms,
            bytes_out: Ewma::default(),
            connections: Ewma::default(),
            peers: Ewma::default(),
            ports: Ewma::default(),
            bytes_by_hour: vec![Ewma::default(); HOURS_OF_WEEK],
            connections_by_hour: vec![Ewma::default(); HOURS_OF_WEEK],
            active_by_hour: vec![0.0; HOURS_OF_WEEK],
            dests: DestTable::default(),
            last_ms: now_ms,
        }
    }

    /// A restored snapshot with the wrong shape (another version, a damaged row) is refused
    /// rather than indexed out of bounds later.
    pub fn is_well_formed(&self) -> bool {
        self.bytes_by_hour.len() == HOURS_OF_WEEK
            && self.connections_by_hour.len() == HOURS_OF_WEEK
            && self.active_by_hour.len() == HOURS_OF_WEEK
    }

    /// Folds one window's rates in. `alpha` is the overall statistics' minimum weight.
    pub fn learn(&mut self, hour: usize, r: &Rates, active: bool, alpha: f64) {
        self.bytes_out.observe(r.bytes_out, alpha);
        self.connections.observe(r.connections, alpha);
        self.peers.observe(r.peers, alpha);
        self.ports.observe(r.ports, alpha);
        // An hour slot sees a few samples a week: each weighs a fifth once it has several.
        self.bytes_by_hour[hour].observe(r.bytes_out, 0.2);
        self.connections_by_hour[hour].observe(r.connections, 0.2);
        if active {
            self.active_by_hour[hour] = (self.active_by_hour[hour] + 1.0).min(1.0e6);
        }
    }

    /// Whether the device was ever active (after decay) at this hour of the day, any day.
    pub fn active_at_hour_of_day(&self, hour_of_week: usize) -> bool {
        let h = hour_of_week % 24;
        (0..7).any(|d| self.active_by_hour[d * 24 + h] >= 0.5)
    }

    /// Weekly decay of the hour histogram: habits a device dropped fade.
    pub fn decay_week(&mut self) {
        for a in &mut self.active_by_hour {
            *a *= 0.5;
        }
    }

    /// Bytes this baseline accounts for.
    pub fn accounted_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + (self.bytes_by_hour.capacity() + self.connections_by_hour.capacity())
                * std::mem::size_of::<Ewma>()
            + self.active_by_hour.capacity() * std::mem::size_of::<f32>()
            + self.dests.accounted_bytes()
    }
}

/// Hour of the week (0 = Monday 00:00 UTC) of a time in ms since the epoch (a Thursday).
pub fn hour_of_week(ms: i64) -> usize {
    ((ms.div_euclid(3_600_000) + 72).rem_euclid(HOURS_OF_WEEK as i64)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_tracks_mean_and_spread() {
        let mut e = Ewma::default();
        for i in 0..1000 {
            e.observe(if i % 2 == 0 { 90.0 } else { 110.0 }, 0.01);
        }
        assert!((e.mean - 100.0).abs() < 2.0, "{e:?}");
        assert!((e.sd() - 10.0).abs() < 2.0, "{e:?}");
    }

    #[test]
    fn dest_table_evicts_the_least_recently_used() {
        let mut t = DestTable::default();
        let d = |port| Dest {
            addr: "100.64.0.1".parse().unwrap(),
            proto: Proto::Tcp,
            port,
        };
        t.touch(d(1), 1, 2);
        t.touch(d(2), 2, 2);
        t.touch(d(1), 3, 2);
        t.touch(d(3), 4, 2);
        assert_eq!(t.len(), 2);
        assert!(t.get(&d(1)).is_some() && t.get(&d(3)).is_some());
        assert!(t.get(&d(2)).is_none());
    }

    #[test]
    fn hours_of_week_start_on_monday() {
        // 1970-01-05 was a Monday.
        assert_eq!(hour_of_week(4 * 86_400_000), 0);
        assert_eq!(hour_of_week(4 * 86_400_000 + 25 * 3_600_000), 25);
        assert_eq!(hour_of_week(0), 72);
    }
}
