//! Behaviour as a trust signal, free of I/O: per-device baselines learned from the flow
//! records devices report, anomalies (with a score and a reason in words) when a device leaves
//! its baseline, and a risk score (0–100) from its recent anomalies that policy can cap
//! (`max_risk`) and react to (`[trust]`).
//!
//! ```text
//! registry drives it:
//!   a device's groups changed -> set_groups(id, ["group:eng", "tag:laptop"])
//!   a stored flow report      -> handle_window(reporter, start, end, records, name, now) -> Option<Anomaly> (the reporter's own)
//!   a corroborated scan       -> handle_denied_burst(src, reason, now)   (trust.rs decides: ≥ 2 reporters, each ≤ half)
//!   every second              -> risk(id, now)        (anomalies decay)
//!   admin                     -> acknowledge(id, Label, now) -> the device whose risk changed
//!   persistence               -> snapshot(id) / restore(id, snapshot); anomalies() / restore_anomaly();
//!                                group_snapshots() / restore_group(name, snapshot)
//! ```
//!
//! Volume and connection rate are judged against the device's own baseline and against its
//! groups' ([`group`]): its user's groups and its tags, each a baseline of what one member
//! usually does per minute. A group judges a device still in its own learning period (a new
//! device is not a blind spot once its group is trusted) and a device going well past both
//! its group and twice its own usual (so an admin's `expected` on a group anomaly, which
//! teaches the device's own baseline, silences it for that device).
//!
//! Anti-spoofing: a report only ever feeds the reporter's own baseline and the reporter's own
//! risk. A device's records about flows others opened to it (responder records) are learned as
//! its inbound use and never raise the other end's risk; the only way another device's word
//! raises a device's risk is the denied-flow burst, which the trust book corroborates first.
//!
//! Memory per device is bounded: fixed-size statistics, at most [`Config::max_destinations`]
//! destinations (least recently used pushed out) and [`Config::max_anomalies`] anomalies.

mod baseline;
pub mod group;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use ward_shared::flows::{FlowRecord, Role};
use ward_shared::wire::DeviceId;

pub use baseline::{hour_of_week, Baseline, Dest, Ewma, HOURS_OF_WEEK};

const DAY_MS: i64 = 86_400_000;
const WEEK_MS: i64 = 7 * DAY_MS;

/// Tuning; the defaults suit minute-long flow windows and a week of learning.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How long a device is only learned before its baseline is trusted.
    pub learning_ms: i64,
    /// A destination unused this long counts as new again.
    pub novelty_ms: i64,
    /// Half-life of the overall rate statistics.
    pub baseline_half_life_ms: i64,
    /// Half-life of an anomaly's score (its share of the risk).
    pub anomaly_half_life_ms: i64,
    /// Destinations remembered per device.
    pub max_destinations: usize,
    /// Anomalies remembered per device.
    pub max_anomalies: usize,
    /// A rate this many times the device's usual (its hour of the week's, or overall, whichever
    /// is higher) is a spike.
    pub spike_factor: f64,
    /// Group baselines remembered (the least recently fed is dropped first).
    pub max_groups: usize,
    /// Groups one device is judged against and feeds (the first in name order).
    pub max_groups_per_device: usize,
    /// Members a group needs before it judges anyone.
    pub min_group_members: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            learning_ms: WEEK_MS,
            novelty_ms: 30 * DAY_MS,
            baseline_half_life_ms: DAY_MS,
            anomaly_half_life_ms: 3_600_000,
            max_destinations: 1024,
            max_anomalies: 64,
            spike_factor: 10.0,
            max_groups: 1024,
            max_groups_per_device: 8,
            min_group_members: 3,
        }
    }
}

/// What kind of departure from the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    NewDestination,
    Volume,
    ConnectionRate,
    FanOut,
    OddHour,
    DeniedBurst,
    /// Volume out far above what members of the device's group usually send.
    GroupVolume,
    /// Connection rate far above what members of the device's group usually open.
    GroupConnectionRate,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NewDestination => "new_destination",
            Kind::Volume => "volume",
            Kind::ConnectionRate => "connection_rate",
            Kind::FanOut => "fan_out",
            Kind::OddHour => "odd_hour",
            Kind::DeniedBurst => "denied_burst",
            Kind::GroupVolume => "group_volume",
            Kind::GroupConnectionRate => "group_connection_rate",
        }
    }
}

/// An admin's judgement of an anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// Normal after all: the baseline learns it and the risk it added goes.
    Expected,
    /// An attack: its risk stays (it no longer decays).
    Malicious,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Expected => "expected",
            Label::Malicious => "malicious",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "expected" => Some(Label::Expected),
            "malicious" => Some(Label::Malicious),
            _ => None,
        }
    }
}

/// What `expected` teaches the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Lesson {
    /// This hour of the week normally sees these rates.
    Rates {
        hour: usize,
        bytes_out: f64,
        connections: f64,
        peers: f64,
        ports: f64,
    },
    /// The device is active at this hour of the week.
    Active { hour: usize },
}

/// One window's departure from a device's baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    pub id: u64,
    pub device: DeviceId,
    pub at_ms: i64,
    pub kinds: Vec<Kind>,
    /// 0–100 when raised; it halves every [`Config::anomaly_half_life_ms`].
    pub score: u8,
    pub reason: String,
    pub label: Option<Label>,
    /// Whether the device's risk crossed the threshold when it was raised (for recall).
    #[serde(default)]
    pub over_threshold: bool,
    #[serde(default)]
    pub lessons: Vec<Lesson>,
}

impl Anomaly {
    /// The anomaly's current share of the risk.
    pub fn current_score(&self, half_life_ms: i64, now_ms: i64) -> f64 {
        match self.label {
            Some(Label::Expected) => 0.0,
            Some(Label::Malicious) => f64::from(self.score),
            None => {
                let age = (now_ms - self.at_ms).max(0) as f64;
                f64::from(self.score) * 0.5f64.powf(age / half_life_ms.max(1) as f64)
            }
        }
    }
}

/// A device's risk and the anomalies that make it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Risk {
    /// 0–100.
    pub score: u8,
    /// The strongest contributing anomalies' reasons (empty at 0).
    pub reason: String,
}

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("no anomaly {0}")]
    Unknown(u64),
    #[error("anomaly {id} is already acknowledged as {label}")]
    AlreadyLabelled { id: u64, label: &'static str },
}

/// Precision and recall against the admins' labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Labels {
    pub raised: u64,
    pub expected: u64,
    pub malicious: u64,
    /// Malicious anomalies that took the device's risk over the threshold when raised.
    pub malicious_enforced: u64,
}

impl Labels {
    /// Of the labelled anomalies, the share that were attacks (`None` before any label).
    pub fn precision(&self) -> Option<f64> {
        let n = self.expected + self.malicious;
        (n > 0).then(|| self.malicious as f64 / n as f64)
    }

    /// Of the anomalies labelled malicious, the share that were enforced at once (the risk went
    /// over the threshold when they were raised).
    pub fn recall(&self) -> Option<f64> {
        (self.malicious > 0).then(|| self.malicious_enforced as f64 / self.malicious as f64)
    }
}

#[derive(Debug, Default)]
struct DeviceState {
    baseline: Option<Baseline>,
    anomalies: VecDeque<Anomaly>,
    /// Hour of the week of the last odd-hour anomaly (one per hour).
    odd_hour_flagged: Option<i64>,
    /// The groups it is judged against and feeds (`group:NAME`, `tag:NAME`).
    groups: Vec<String>,
}

/// Every device's baseline and anomalies.
#[derive(Debug, Default)]
pub struct Detector {
    config: Config,
    devices: BTreeMap<DeviceId, DeviceState>,
    next_id: u64,
    /// The risk threshold used to mark anomalies as enforced (policy's `risk_threshold`).
    threshold: u8,
    labels: Labels,
    groups: group::Groups,
}

impl Detector {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            next_id: 1,
            threshold: 40,
            ..Self::default()
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn set_learning_ms(&mut self, ms: i64) {
        self.config.learning_ms = ms;
    }

    pub fn set_threshold(&mut self, t: u8) {
        self.threshold = t;
    }

    /// The device's groups (its user's groups as `group:NAME`, its tags as `tag:NAME`): at
    /// most [`Config::max_groups_per_device`], the first in name order.
    pub fn set_groups(&mut self, id: DeviceId, mut groups: Vec<String>) {
        groups.sort();
        groups.dedup();
        groups.truncate(self.config.max_groups_per_device);
        self.devices.entry(id).or_default().groups = groups;
    }

    /// A group's baseline (for tests and figures).
    pub fn group(&self, name: &str) -> Option<&group::GroupBaseline> {
        self.groups.get(name)
    }

    /// Every group baseline as stored (name, JSON).
    pub fn group_snapshots(&self) -> Vec<(String, String)> {
        self.groups.snapshots()
    }

    /// Restores a stored group baseline; a damaged one is refused (the group learns afresh).
    pub fn restore_group(&mut self, name: &str, snapshot: &str) -> Result<(), String> {
        self.groups.restore(name, snapshot, self.config.max_groups)
    }

    /// Bytes the group baselines account for.
    pub fn accounted_group_bytes(&self) -> usize {
        self.groups.accounted_bytes()
    }

    /// One flow window of `reporter`'s own report. Only the reporter's baseline and risk are
    /// touched. `name` renders a destination for reasons. Returns the anomaly raised, if any.
    pub fn handle_window(
        &mut self,
        reporter: DeviceId,
        start_ms: i64,
        end_ms: i64,
        records: &[FlowRecord],
        name: &dyn Fn(Option<DeviceId>, IpAddr) -> String,
        now_ms: i64,
    ) -> Option<Anomaly> {
        let cfg = self.config.clone();
        let st = self.devices.entry(reporter).or_default();
        let b = st.baseline.get_or_insert_with(|| Baseline::new(start_ms));
        // Whole weeks since the last window: halve the hour histogram for each.
        let weeks = (start_ms.div_euclid(WEEK_MS) - b.last_ms.div_euclid(WEEK_MS)).clamp(0, 8);
        for _ in 0..weeks {
            b.decay_week();
        }
        b.last_ms = b.last_ms.max(end_ms);
        let learning = start_ms - b.since_ms < cfg.learning_ms;
        let minutes = ((end_ms - start_ms).max(1_000) as f64) / 60_000.0;
        let hour = hour_of_week(start_ms);

        let mut bytes_out = 0u64;
        let mut connections = 0u64;
        let mut peers: BTreeSet<IpAddr> = BTreeSet::new();
        let mut ports: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
        let mut new: Vec<(Option<DeviceId>, Dest, Option<i64>)> = Vec::new();
        for r in records {
            bytes_out = bytes_out.saturating_add(r.bytes_out);
            if r.role != Role::Initiator {
                continue;
            }
            connections = connections.saturating_add(r.connections);
            peers.insert(r.peer_addr);
            ports.insert((r.peer_addr, r.port));
            let d = Dest {
                addr: r.peer_addr,
                proto: r.proto,
                port: r.port,
            };
            let last = b.dests.get(&d).map(|u| u.last_ms);
            let fresh = last.is_none_or(|l| start_ms - l > cfg.novelty_ms);
            if fresh && !new.iter().any(|n| n.1 == d) {
                new.push((r.peer, d, last));
            }
            b.dests.touch(d, start_ms, cfg.max_destinations);
        }
        let rates = baseline::Rates {
            bytes_out: bytes_out as f64 / minutes,
            connections: connections as f64 / minutes,
            peers: peers.len() as f64 / minutes,
            ports: ports.len() as f64 / minutes,
        };
        let active = !peers.is_empty();
        let alpha = 1.0
            - 0.5f64
                .powf((end_ms - start_ms).max(1) as f64 / cfg.baseline_half_life_ms.max(1) as f64);

        let mut parts: Vec<(Kind, f64, String)> = Vec::new();
        let mut lessons = Vec::new();
        if !learning {
            if !new.is_empty() {
                let n = new.len();
                let shown: Vec<String> = new
                    .iter()
                    .take(3)
                    .map(|(peer, d, last)| {
                        let when = match last {
                            None => format!("in {} days", cfg.novelty_ms / DAY_MS),
                            Some(l) => format!("since {} days", (start_ms - l) / DAY_MS),
                        };
                        format!(
                            "first contact with {} on {}/{} {when}",
                            name(*peer, d.addr),
                            proto_str(d.proto),
                            d.port
                        )
                    })
                    .collect();
                let more = if n > 3 {
                    format!(" and {} more new destinations", n - 3)
                } else {
                    String::new()
                };
                let score = (25.0 + 15.0 * (n as f64 - 1.0)).min(90.0);
                parts.push((
                    Kind::NewDestination,
                    score,
                    format!("{}{more}", shown.join(", ")),
                ));
            }
            let factor = cfg.spike_factor;
            let usual_bytes = b
                .bytes_out
                .mean
                .max(b.bytes_by_hour[hour].mean)
                .max(64.0 * 1024.0);
            let ratio = rates.bytes_out / usual_bytes;
            if ratio >= factor {
                parts.push((
                    Kind::Volume,
                    (20.0 + 15.0 * ratio.log2()).min(95.0),
                    format!("{:.0}× its usual volume out per minute", ratio),
                ));
            }
            let usual_conns = b
                .connections
                .mean
                .max(b.connections_by_hour[hour].mean)
                .max(5.0);
            let ratio = rates.connections / usual_conns;
            if ratio >= factor {
                parts.push((
                    Kind::ConnectionRate,
                    (20.0 + 15.0 * ratio.log2()).min(90.0),
                    format!("{:.0}× its usual rate of new connections", ratio),
                ));
            }
            let peer_limit = 4.0 * (b.peers.mean + 3.0 * b.peers.sd()) + 5.0;
            let port_limit = 4.0 * (b.ports.mean + 3.0 * b.ports.sd()) + 5.0;
            if rates.peers >= peer_limit || rates.ports >= port_limit {
                let over = (rates.peers / peer_limit).max(rates.ports / port_limit);
                parts.push((
                    Kind::FanOut,
                    (40.0 + 20.0 * over.log2()).clamp(40.0, 90.0),
                    format!(
                        "fan-out of {:.0} peers and {:.0} ports per minute (usually {:.1} and {:.1})",
                        rates.peers, rates.ports, b.peers.mean, b.ports.mean
                    ),
                ));
            }
            let hour_id = start_ms.div_euclid(3_600_000);
            if active && !b.active_at_hour_of_day(hour) && st.odd_hour_flagged != Some(hour_id) {
                st.odd_hour_flagged = Some(hour_id);
                parts.push((
                    Kind::OddHour,
                    20.0,
                    format!(
                        "active at {:02}:00 UTC, an hour it is never active",
                        hour % 24
                    ),
                ));
                lessons.push(Lesson::Active { hour });
            }
            if parts
                .iter()
                .any(|p| matches!(p.0, Kind::Volume | Kind::ConnectionRate | Kind::FanOut))
            {
                lessons.push(Lesson::Rates {
                    hour,
                    bytes_out: rates.bytes_out,
                    connections: rates.connections,
                    peers: rates.peers,
                    ports: rates.ports,
                });
            }
        }
        // Against the device's groups: the strongest group per statistic.
        let own_bytes = b.bytes_out.mean.max(b.bytes_by_hour[hour].mean);
        let own_conns = b.connections.mean.max(b.connections_by_hour[hour].mean);
        let trusted: Vec<(&String, &group::GroupBaseline)> = st
            .groups
            .iter()
            .filter_map(|n| Some((n, self.groups.get(n)?)))
            .filter(|(_, g)| g.trusted(start_ms, cfg.learning_ms, cfg.min_group_members))
            .collect();
        let group_check = |kind: Kind,
                           rate: f64,
                           own: f64,
                           usual: &dyn Fn(&group::GroupBaseline) -> f64|
         -> Option<(Kind, f64, String)> {
            if parts
                .iter()
                .any(|p| p.0 == kind || (kind == Kind::GroupVolume && p.0 == Kind::Volume))
                || (kind == Kind::GroupConnectionRate
                    && parts.iter().any(|p| p.0 == Kind::ConnectionRate))
            {
                return None;
            }
            if !learning && rate < 2.0 * own {
                return None;
            }
            let (name, ratio) = trusted
                .iter()
                .map(|(n, g)| (*n, rate / usual(g)))
                .max_by(|x, y| x.1.total_cmp(&y.1))?;
            (ratio >= cfg.spike_factor).then(|| {
                let what = match kind {
                    Kind::GroupVolume => "volume out per minute",
                    _ => "rate of new connections",
                };
                (
                    kind,
                    (20.0 + 15.0 * ratio.log2()).min(90.0),
                    format!("{ratio:.0}× the usual {what} of a member of {name}"),
                )
            })
        };
        let gv = group_check(Kind::GroupVolume, rates.bytes_out, own_bytes, &|g| {
            g.usual_bytes(64.0 * 1024.0)
        });
        let gc = group_check(
            Kind::GroupConnectionRate,
            rates.connections,
            own_conns,
            &|g| g.usual_connections(5.0),
        );
        let group_spike = gv.is_some() || gc.is_some();
        parts.extend(gv);
        parts.extend(gc);
        if group_spike && !lessons.iter().any(|l| matches!(l, Lesson::Rates { .. })) {
            lessons.push(Lesson::Rates {
                hour,
                bytes_out: rates.bytes_out,
                connections: rates.connections,
                peers: rates.peers,
                ports: rates.ports,
            });
        }
        // Spikes are not learned as normal (an attacker cannot teach the baseline, its own or
        // its groups', by repeating); an admin's `expected` does that.
        let spiking = parts.iter().any(|p| {
            matches!(
                p.0,
                Kind::Volume
                    | Kind::ConnectionRate
                    | Kind::FanOut
                    | Kind::GroupVolume
                    | Kind::GroupConnectionRate
            )
        });
        if !spiking {
            b.learn(hour, &rates, active, alpha);
            for g in &st.groups {
                self.groups.learn(
                    g,
                    reporter,
                    &rates,
                    alpha,
                    (start_ms, end_ms),
                    cfg.max_groups,
                );
            }
        }
        if parts.is_empty() {
            return None;
        }
        let score = combine(parts.iter().map(|p| p.1));
        let a = Anomaly {
            id: 0,
            device: reporter,
            at_ms: now_ms,
            kinds: parts.iter().map(|p| p.0).collect(),
            score,
            reason: parts
                .into_iter()
                .map(|p| p.2)
                .collect::<Vec<_>>()
                .join("; "),
            label: None,
            over_threshold: false,
            lessons,
        };
        Some(self.raise(a, now_ms))
    }

    /// The trust book found a corroborated scan by `src` (several reporters, each weighing at
    /// most its share): an anomaly on `src`.
    pub fn handle_denied_burst(&mut self, src: DeviceId, reason: &str, now_ms: i64) -> Anomaly {
        let a = Anomaly {
            id: 0,
            device: src,
            at_ms: now_ms,
            kinds: vec![Kind::DeniedBurst],
            score: 70,
            reason: format!("denied-flow burst ({reason})"),
            label: None,
            over_threshold: false,
            lessons: Vec::new(),
        };
        self.raise(a, now_ms)
    }

    /// The device's session moved here from another replica, which had judged its risk
    /// `score` at `at_ms`: unless the device's risk here is at least that level already, an
    /// anomaly carries it over (raised at `at_ms`, so it decays as the original would have).
    /// A device cannot shed its risk by reconnecting elsewhere.
    pub fn handle_carried_risk(
        &mut self,
        id: DeviceId,
        score: u8,
        reason: &str,
        at_ms: i64,
        now_ms: i64,
    ) -> Option<Anomaly> {
        let here = self.risk(id, now_ms).score;
        let hl = self.config.anomaly_half_life_ms;
        let carried = Anomaly {
            id: 0,
            device: id,
            at_ms: at_ms.min(now_ms),
            kinds: Vec::new(),
            score: score.min(100),
            reason: format!("risk carried over from another replica: {reason}"),
            label: None,
            over_threshold: false,
            lessons: Vec::new(),
        };
        let left = carried.current_score(hl, now_ms);
        if left < 1.0 || left.round() as u8 / 10 <= here / 10 {
            return None;
        }
        Some(self.raise(carried, now_ms))
    }

    /// The device's risk now, from its anomalies' current scores.
    pub fn risk(&self, id: DeviceId, now_ms: i64) -> Risk {
        let Some(st) = self.devices.get(&id) else {
            return Risk {
                score: 0,
                reason: String::new(),
            };
        };
        let hl = self.config.anomaly_half_life_ms;
        let mut live: Vec<(f64, &Anomaly)> = st
            .anomalies
            .iter()
            .map(|a| (a.current_score(hl, now_ms), a))
            .filter(|(s, _)| *s >= 1.0)
            .collect();
        let score = combine(live.iter().map(|l| l.0));
        live.sort_by(|x, y| y.0.total_cmp(&x.0));
        let reason = live
            .iter()
            .take(2)
            .map(|(_, a)| format!("anomaly {}: {}", a.id, a.reason))
            .collect::<Vec<_>>()
            .join(" | ");
        Risk { score, reason }
    }

    /// Devices with an anomaly still adding risk (the ones to re-judge as scores decay).
    pub fn risky_devices(&self, now_ms: i64) -> Vec<DeviceId> {
        let hl = self.config.anomaly_half_life_ms;
        self.devices
            .iter()
            .filter(|(_, s)| {
                s.anomalies
                    .iter()
                    .any(|a| a.current_score(hl, now_ms) >= 1.0)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// An admin's label. `Expected` teaches the baseline and drops the risk the anomaly added;
    /// `Malicious` keeps it. Returns the anomaly as labelled.
    pub fn acknowledge(&mut self, id: u64, label: Label) -> Result<Anomaly, AckError> {
        let a = self
            .devices
            .values_mut()
            .flat_map(|s| s.anomalies.iter_mut())
            .find(|a| a.id == id)
            .ok_or(AckError::Unknown(id))?;
        if let Some(l) = a.label {
            return Err(AckError::AlreadyLabelled {
                id,
                label: l.as_str(),
            });
        }
        a.label = Some(label);
        let a = a.clone();
        match label {
            Label::Expected => {
                self.labels.expected += 1;
                if let Some(b) = self
                    .devices
                    .get_mut(&a.device)
                    .and_then(|s| s.baseline.as_mut())
                {
                    teach(b, &a.lessons);
                }
            }
            Label::Malicious => {
                self.labels.malicious += 1;
                if a.over_threshold {
                    self.labels.malicious_enforced += 1;
                }
            }
        }
        Ok(a)
    }

    /// Anomalies, oldest first: of one device, or all; raised at or after `since_ms`.
    pub fn anomalies(&self, device: Option<DeviceId>, since_ms: i64) -> Vec<Anomaly> {
        let mut v: Vec<Anomaly> = self
            .devices
            .iter()
            .filter(|(id, _)| device.is_none_or(|d| d == **id))
            .flat_map(|(_, s)| s.anomalies.iter())
            .filter(|a| a.at_ms >= since_ms)
            .cloned()
            .collect();
        v.sort_by_key(|a| (a.at_ms, a.id));
        v
    }

    pub fn labels(&self) -> Labels {
        self.labels
    }

    /// The device's baseline as stored (JSON), if it has one.
    pub fn snapshot(&self, id: DeviceId) -> Option<String> {
        let b = self.devices.get(&id)?.baseline.as_ref()?;
        serde_json::to_string(b).ok()
    }

    /// Devices with a baseline.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.devices
            .iter()
            .filter(|(_, s)| s.baseline.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Restores a stored baseline; a damaged one is refused (the device learns afresh).
    pub fn restore(&mut self, id: DeviceId, snapshot: &str) -> Result<(), String> {
        let b: Baseline = serde_json::from_str(snapshot).map_err(|e| e.to_string())?;
        if !b.is_well_formed() {
            return Err("the stored baseline has the wrong shape".into());
        }
        // A table stored under a larger cap shrinks to the current one at the next new
        // destination (the least recently used go first).
        self.devices.entry(id).or_default().baseline = Some(b);
        Ok(())
    }

    /// Restores a stored anomaly (labels counted again).
    pub fn restore_anomaly(&mut self, a: Anomaly) {
        self.next_id = self.next_id.max(a.id + 1);
        self.labels.raised += 1;
        match a.label {
            Some(Label::Expected) => self.labels.expected += 1,
            Some(Label::Malicious) => {
                self.labels.malicious += 1;
                if a.over_threshold {
                    self.labels.malicious_enforced += 1;
                }
            }
            None => {}
        }
        let cap = self.config.max_anomalies;
        let st = self.devices.entry(a.device).or_default();
        if st.anomalies.len() >= cap {
            st.anomalies.pop_front();
        }
        st.anomalies.push_back(a);
    }

    pub fn remove(&mut self, id: DeviceId) {
        self.devices.remove(&id);
        self.groups.forget_member(id);
    }

    /// Bytes the detector accounts for, for one device.
    pub fn accounted_bytes(&self, id: DeviceId) -> usize {
        let Some(s) = self.devices.get(&id) else {
            return 0;
        };
        std::mem::size_of::<DeviceState>()
            + s.baseline.as_ref().map_or(0, Baseline::accounted_bytes)
            + s.anomalies
                .iter()
                .map(|a| {
                    std::mem::size_of::<Anomaly>()
                        + a.reason.capacity()
                        + a.kinds.capacity() * std::mem::size_of::<Kind>()
                        + a.lessons.capacity() * std::mem::size_of::<Lesson>()
                })
                .sum::<usize>()
    }

    fn raise(&mut self, mut a: Anomaly, now_ms: i64) -> Anomaly {
        a.id = self.next_id.max(1);
        self.next_id = a.id + 1;
        self.labels.raised += 1;
        let cap = self.config.max_anomalies;
        let st = self.devices.entry(a.device).or_default();
        if st.anomalies.len() >= cap {
            st.anomalies.pop_front();
        }
        st.anomalies.push_back(a.clone());
        let over = self.risk(a.device, now_ms).score > self.threshold;
        if let Some(x) = self
            .devices
            .get_mut(&a.device)
            .and_then(|s| s.anomalies.back_mut())
        {
            x.over_threshold = over;
        }
        a.over_threshold = over;
        a
    }
}

/// Independent scores (0–100) combined as probabilities: 1 − Π(1 − sᵢ/100).
fn combine(scores: impl Iterator<Item = f64>) -> u8 {
    let keep = scores.fold(1.0f64, |k, s| k * (1.0 - (s / 100.0).clamp(0.0, 1.0)));
    ((1.0 - keep) * 100.0).round().clamp(0.0, 100.0) as u8
}

fn teach(b: &mut Baseline, lessons: &[Lesson]) {
    for l in lessons {
        match *l {
            Lesson::Rates {
                hour,
                bytes_out,
                connections,
                peers,
                ports,
            } => {
                let Some(slot) = b.bytes_by_hour.get_mut(hour) else {
                    continue;
                };
                slot.mean = slot.mean.max(bytes_out);
                if let Some(c) = b.connections_by_hour.get_mut(hour) {
                    c.mean = c.mean.max(connections);
                }
                b.peers.mean = b.peers.mean.max(peers / 4.0);
                b.ports.mean = b.ports.mean.max(ports / 4.0);
            }
            Lesson::Active { hour } => {
                if let Some(a) = b.active_by_hour.get_mut(hour) {
                    *a = a.max(1.0);
                }
            }
        }
    }
}

fn proto_str(p: ward_shared::filter::Proto) -> &'static str {
    match p {
        ward_shared::filter::Proto::Tcp => "tcp",
        ward_shared::filter::Proto::Udp => "udp",
        ward_shared::filter::Proto::Icmp => "icmp",
    }
}
