//! The registry actor: owns [`Registry`], turns [`Event`]s into `handle_*` calls and fans its
//! outputs out to the connection tasks; trust decisions go to [`TrustSink`].

use serde_json::json;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use ward_shared::lease::SignedLease;
use ward_shared::policy::{Directory, Grant, Policy};
use ward_shared::posture::PostureReport;
use ward_shared::relay::{CoordinatorToRelay, RelayLoad};
use ward_shared::resume::{self, Holding};
use ward_shared::wire::{
    self, DeniedFlow, DeviceId, DeviceUpdate, ErrorCode, PostureVerdict, RelayInfo, WgPublicKey,
};

use super::effects::TrustSink;
use super::now_ms;
use super::queue::{EventRx, Events};
use crate::admin::api::TrustStatsView;
use crate::admin::ops::Snapshot;
use crate::audit::Action;
use crate::fanout::{Backlog, Pacer, MIN_FLUSH_GAP};
use crate::model::{Device, User};
use crate::registry::{ConnId, LeaseRefusal, Output, Registry};
use crate::store::Store;

/// What a lease request may be given, if it may be given one: the risky device's shorter TTL
/// (`Registry::risky_lease_ttl_ms`) and the lease the device holds on the key already.
pub(super) type LeaseChecked = (Option<u64>, Option<SignedLease>);

pub(super) enum ConnCmd {
    Send(Vec<u8>),
    Close(ErrorCode, String),
}

/// Tells a device session to send this error and close, ahead of anything queued for it.
pub(super) type CloseTx = oneshot::Sender<(ErrorCode, String)>;

/// A device session as the actor sees it: its bounded queue, its close signal and what the
/// queue could not take yet.
pub(super) struct DeviceConn {
    tx: mpsc::Sender<ConnCmd>,
    close: CloseTx,
    /// Allocated only while something is held (a backlog is 1.8 KB: inline, every session
    /// would carry one).
    backlog: Option<Box<Backlog>>,
    /// What the device said it holds of its netmap, until the session's first netmap is
    /// written (which then leaves out what the device has).
    holding: Option<Holding>,
}

/// Device sessions by connection, and those with a backlog (retried on every wake).
#[derive(Default)]
pub(super) struct DeviceConns {
    conns: HashMap<ConnId, DeviceConn>,
    backlogged: std::collections::BTreeSet<ConnId>,
    /// Messages held in a backlog instead of queued (merged there), since start.
    held: u64,
    /// Each peer's JSON, written once for all the netmaps that list it.
    peer_json: wire::PeerJson,
    /// First netmaps resumed (sent without the peers the device held), and the peers they
    /// left out, since start.
    resumed: u64,
    peers_left_out: u64,
}

impl DeviceConns {
    fn insert(
        &mut self,
        conn: ConnId,
        tx: mpsc::Sender<ConnCmd>,
        close: CloseTx,
        holding: Option<Holding>,
    ) {
        self.conns.insert(
            conn,
            DeviceConn {
                tx,
                close,
                backlog: None,
                holding,
            },
        );
    }

    fn remove(&mut self, conn: ConnId) -> Option<DeviceConn> {
        self.backlogged.remove(&conn);
        self.conns.remove(&conn)
    }

    /// Sends the error and closes the session now, whatever waits in its queue or backlog.
    fn close(&mut self, conn: ConnId, code: ErrorCode, reason: String) {
        if let Some(c) = self.remove(conn) {
            let _ = c.close.send((code, reason));
        }
    }

    /// Queues `msg`, or holds it (merged with what is held already) while the session's queue
    /// is full or anything older is still held: a slow session is never closed for being slow.
    fn deliver(&mut self, conn: ConnId, msg: wire::CoordinatorMsg, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.backlog.as_ref().is_none_or(|b| b.is_empty()) {
            let ended = match c.tx.try_reserve() {
                Ok(permit) => {
                    let frame = encode_for(
                        conn,
                        &mut c.holding,
                        msg,
                        &mut self.peer_json,
                        (&mut self.resumed, &mut self.peers_left_out),
                    );
                    permit.send(ConnCmd::Send(frame));
                    return;
                }
                // The session ended; its `Closed` event is on the way.
                Err(TrySendError::Closed(())) => true,
                Err(TrySendError::Full(())) => false,
            };
            if ended {
                self.remove(conn);
                return;
            }
        }
        self.held += 1;
        match c.backlog.get_or_insert_default().hold(msg, now) {
            Ok(()) => {
                self.backlogged.insert(conn);
            }
            Err(e) => {
                warn!(conn, error = %e, "control connection's backlog cannot hold more; closing it");
                self.close(conn, ErrorCode::Internal, format!("too slow: {e}"));
            }
        }
    }

    /// Moves what the backlogged sessions have room for now into their queues; closes a
    /// session that took nothing for [`crate::fanout::STUCK_LIMIT`].
    fn drain(&mut self, now: Instant) {
        if self.backlogged.is_empty() {
            return;
        }
        let mut stuck = Vec::new();
        let mut gone = Vec::new();
        let mut done = Vec::new();
        for conn in &self.backlogged {
            let Some(c) = self.conns.get_mut(conn) else {
                done.push(*conn);
                continue;
            };
            let mut moved = false;
            loop {
                let Some(backlog) = c.backlog.as_mut().filter(|b| !b.is_empty()) else {
                    c.backlog = None;
                    done.push(*conn);
                    break;
                };
                match c.tx.try_reserve() {
                    Ok(permit) => {
                        if let Some(msg) = backlog.pop() {
                            let frame = encode_for(
                                *conn,
                                &mut c.holding,
                                msg,
                                &mut self.peer_json,
                                (&mut self.resumed, &mut self.peers_left_out),
                            );
                            permit.send(ConnCmd::Send(frame));
                            moved = true;
                        }
                    }
                    Err(TrySendError::Full(())) => break,
                    Err(TrySendError::Closed(())) => {
                        gone.push(*conn);
                        break;
                    }
                }
            }
            let Some(backlog) = c.backlog.as_mut() else {
                continue;
            };
            if moved {
                backlog.progressed(now);
            } else if backlog.stuck(now) {
                stuck.push(*conn);
            }
        }
        for conn in done {
            self.backlogged.remove(&conn);
        }
        for conn in gone {
            self.remove(conn);
        }
        for conn in stuck {
            warn!(
                conn,
                limit_s = crate::fanout::STUCK_LIMIT.as_secs(),
                "control connection took nothing while its netmap waited; closing it"
            );
            self.close(
                conn,
                ErrorCode::Internal,
                "too slow: this session took no message for 30 s".into(),
            );
        }
    }
}

/// The frame of `msg` for session `conn`. The session's first netmap leaves out the peers
/// of every bucket the device holds exactly ([`ward_shared::resume`]); the holding is spent
/// on it.
fn encode_for(
    conn: ConnId,
    holding: &mut Option<Holding>,
    mut msg: wire::CoordinatorMsg,
    cache: &mut wire::PeerJson,
    (resumed, left_out): (&mut u64, &mut u64),
) -> Vec<u8> {
    if let wire::CoordinatorMsg::Netmap(nm) = &mut msg {
        if let Some(h) = holding.take() {
            let before = nm.peers.len();
            match resume::resume(&mut nm.peers, &h, |p| cache.digest(p)) {
                Ok(r) => {
                    if r.is_some() {
                        *resumed += 1;
                        *left_out += (before - nm.peers.len()) as u64;
                    }
                    debug!(
                        conn,
                        peers = before,
                        sent = nm.peers.len(),
                        resumed = r.is_some(),
                        "first netmap of a session that holds one"
                    );
                    nm.resumed = r;
                }
                // Checked when the session opened; whole if it were not.
                Err(e) => debug!(conn, error = %e, "holding unusable; whole netmap"),
            }
        }
    }
    let frame = wire::encode_with(&msg, cache);
    if frame.len() > 4 + wire::MAX_COORDINATOR_FRAME {
        warn!(
            conn,
            bytes = frame.len() - 4,
            parts = %oversized_parts(&msg),
            "message over the device's frame limit; the device will drop the session"
        );
    }
    frame
}

/// The largest fields of a message (tagged by `type`, so its fields are the top level), as
/// `name[items]=bytes`, for the log line of a frame that a device will refuse.
fn oversized_parts(msg: &wire::CoordinatorMsg) -> String {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(msg) else {
        return String::new();
    };
    let mut parts: Vec<(String, usize)> = fields
        .iter()
        .map(|(name, v)| {
            let items = v.as_array().map_or(1, Vec::len);
            let bytes = serde_json::to_vec(v).map_or(0, |b| b.len());
            (format!("{name}[{items}]"), bytes)
        })
        .collect();
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    parts
        .iter()
        .take(6)
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) enum Event {
    Opened {
        id: DeviceId,
        conn: ConnId,
        observed: SocketAddr,
        update: DeviceUpdate,
        /// The protocol version the device's hello said it speaks.
        protocol: u32,
        /// What the device's hello said it holds of its netmap (checked well formed).
        holding: Option<Holding>,
        /// The peers the device's hello said it holds on demand (at most `MAX_HELD_PEERS`).
        held_peers: Vec<DeviceId>,
        tx: mpsc::Sender<ConnCmd>,
        close: CloseTx,
        reply: oneshot::Sender<Result<(), ErrorCode>>,
    },
    Update {
        id: DeviceId,
        conn: ConnId,
        update: DeviceUpdate,
    },
    Closed {
        id: DeviceId,
        conn: ConnId,
    },
    Upserted(Device),
    Removed(DeviceId, String),
    User(User),
    Lease(SignedLease, oneshot::Sender<()>),
    LeasesRevoked(DeviceId, Vec<u64>),
    Rotate(DeviceId, String, oneshot::Sender<bool>),
    /// A new policy, its stored version and the compile its check made (if any).
    Policy(Policy, u64, Option<crate::registry::PolicyCompile>),
    Grants(Vec<Grant>),
    /// Every registered relay, after an add or remove.
    Relays(Vec<RelayInfo>),
    /// The coordinator addresses changed (`addrs set`): every session gets them in a full
    /// netmap; answered with how many sessions that is.
    Coordinators(Vec<String>, oneshot::Sender<usize>),
    /// Every device's advertised and approved routes, after an approval changed.
    Routes(Vec<crate::store::RouteRow>),
    /// A device signed in (again) at the identity provider.
    SignIn(DeviceId, crate::oidc::core::SignIn),
    /// The identity provider took a user's access away (`Some(why)`) or gave it back.
    Identity(String, Option<String>),
    Posture {
        id: DeviceId,
        conn: ConnId,
        report: Box<PostureReport>,
        received: Instant,
    },
    DeniedFlows(DeviceId, Vec<DeniedFlow>),
    /// A flow report was stored: the reporter's behaviour baseline learns from it.
    Flows(DeviceId, Box<ward_shared::flows::FlowReport>),
    /// An admin's label on an anomaly.
    AnomalyAck(
        u64,
        crate::behaviour::Label,
        oneshot::Sender<Result<crate::behaviour::Anomaly, crate::behaviour::AckError>>,
    ),
    /// A device on demand asks for the peer `by` names.
    WantPeer {
        id: DeviceId,
        conn: ConnId,
        by: ward_shared::wire::PeerRef,
    },
    /// A device asks for `peer` to probe back now (coordinated hole punching).
    Punch {
        id: DeviceId,
        conn: ConnId,
        peer: DeviceId,
    },
    /// Before a lease is issued: whether the device may have this key (not another device's),
    /// the policy's shorter lease TTL if the device is risky now, and the lease the device
    /// holds on this key already, if any.
    LeaseCheck(
        DeviceId,
        WgPublicKey,
        oneshot::Sender<Result<LeaseChecked, LeaseRefusal>>,
    ),
    /// A flow report's denial reasons, corrected with what only the registry knows (posture,
    /// quarantine); the report comes back relabeled ([`crate::flows::relabel`]).
    RelabelFlows(
        DeviceId,
        Box<ward_shared::flows::FlowReport>,
        oneshot::Sender<Box<ward_shared::flows::FlowReport>>,
    ),
    /// The directory judged under a candidate policy's posture requirements.
    DirectoryFor(Box<Policy>, oneshot::Sender<Directory>),
    /// A device's latest report and verdict (for `device show`).
    TrustView(
        DeviceId,
        oneshot::Sender<(Option<PostureReport>, PostureVerdict)>,
    ),
    /// What the registry holds now (for admin listings, check, apply and explain).
    Snapshot(oneshot::Sender<Snapshot>),
    /// The devices whose session a live replica holds, as the registry knows them now: an
    /// answer that does not wait for the compile to catch up (a snapshot's does).
    Online(oneshot::Sender<Vec<DeviceId>>),
    /// Answered once every netmap change the registry has is handed to the sessions (the
    /// first flush that leaves nothing to produce): work that can wait, such as the maturity
    /// record after a policy apply, does not compete with the push.
    Settled(std::sync::mpsc::SyncSender<()>),
    /// A relay authenticated its control session; `false` back if the relay is no longer
    /// registered. An older session of the same relay is closed.
    RelayOpened {
        name: String,
        conn: ConnId,
        tx: mpsc::Sender<ConnCmd>,
        reply: oneshot::Sender<bool>,
    },
    RelayLoad {
        name: String,
        conn: ConnId,
        load: RelayLoad,
    },
    RelayClosed {
        name: String,
        conn: ConnId,
    },
    /// Another replica holds this device's session now: close the local one.
    SessionMoved(DeviceId),
    /// The device's last posture report number accepted on any replica.
    PostureFloor(DeviceId, u64),
    /// Another replica stored its verdict on the device.
    RemoteTrust(DeviceId, crate::trust::RemoteTrust),
    /// Every device session other live replicas hold now.
    RemoteSessions(BTreeMap<DeviceId, crate::registry::RemoteSession>),
    /// Denied-flow evidence other replicas stored (their reporters' accusations).
    ScanEvidence(Vec<crate::registry::ScanEvidence>),
}

/// This replica's device sessions as they open and close, for the `sessions` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Presence {
    Claimed(DeviceId, i64),
    Released(DeviceId),
    /// A posture report with this number was accepted.
    PostureSeq(DeviceId, u64),
    /// The session's home relay changed (peers on other replicas reach the device there).
    HomeRelay(DeviceId, Option<String>),
}

/// A relay's live control session.
pub(super) struct RelayConn {
    conn: ConnId,
    tx: mpsc::Sender<ConnCmd>,
    load: RelayLoad,
}

/// Relay control sessions by relay name (at most one each).
pub(super) type RelayConns = BTreeMap<String, RelayConn>;

/// Posture report → enforcement latency, as the coordinator sees it: from a report's arrival
/// to the updated netmaps handed to every peer's connection (the last 1 000 changes).
#[derive(Debug, Clone, Default)]
pub(super) struct TrustStats {
    pub(super) enforce_us: VecDeque<u64>,
    pub(super) reports: u64,
    pub(super) refused: u64,
    pub(super) changes: u64,
    /// Histograms and counters for `--metrics-listen`.
    pub(super) live: crate::metrics::LiveMetrics,
}

impl TrustStats {
    pub(super) fn view(&self) -> TrustStatsView {
        let mut v: Vec<u64> = self.enforce_us.iter().copied().collect();
        v.sort_unstable();
        let pct = |q: f64| -> Option<f64> {
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            v.get(i).map(|us| *us as f64 / 1000.0)
        };
        TrustStatsView {
            reports: self.reports,
            refused: self.refused,
            changes: self.changes,
            enforce_ms_p50: pct(0.5),
            enforce_ms_p99: pct(0.99),
            enforce_ms_last: self.enforce_us.back().map(|us| *us as f64 / 1000.0),
        }
    }
}

pub(super) async fn registry_actor(
    mut reg: Registry,
    mut rx: EventRx,
    store: Arc<dyn Store>,
    events: Events,
    presence: mpsc::UnboundedSender<Presence>,
    replica: String,
) {
    let mut conns = DeviceConns::default();
    let mut pacer = Pacer::new(MIN_FLUSH_GAP);
    // Events handled since the last flush, and the devices waiting for it to hear their lease
    // was granted (only after the flush that gave peers its key).
    let mut handled = 0usize;
    let mut leases_done: Vec<oneshot::Sender<()>> = Vec::new();
    let mut settled: Vec<std::sync::mpsc::SyncSender<()>> = Vec::new();
    let mut relays: RelayConns = BTreeMap::new();
    let mut stats = TrustStats::default();
    let mut baselines_saved = Instant::now();
    let baseline_store = store.clone();
    let (trust_rows, trust_rx) = mpsc::unbounded_channel();
    tokio::spawn(super::effects::trust_writer(store.clone(), trust_rx));
    let mut sink = TrustSink {
        store,
        events,
        stats: &mut stats,
        received: None,
        refused: HashMap::new(),
        replica,
        trust_rows,
        presence: presence.clone(),
    };
    loop {
        // Wake for the next rule or grant expiry, or at least every second; for the paced
        // flush when one is waiting; and soon while a session has a backlog to move on.
        let timer = Duration::from_millis(
            reg.poll_timeout()
                .map(|t| (t - now_ms()).clamp(50, 1000) as u64)
                .unwrap_or(1000),
        );
        let mut wait = timer;
        if let Some(w) = pacer.wait(Instant::now()) {
            wait = wait.min(w);
        }
        if !conns.backlogged.is_empty() {
            wait = wait.min(BACKLOG_RETRY);
        }
        let ev = if wait.is_zero() {
            rx.try_recv()
        } else {
            tokio::select! {
                ev = rx.recv() => match ev { Some(ev) => Some(ev), None => break },
                _ = tokio::time::sleep(wait) => None,
            }
        };
        if handled == 0 {
            sink.stats.live.batch_started = Some(Instant::now());
        }
        reg.handle_time(now_ms());
        if baselines_saved.elapsed() >= BASELINE_SAVE_EVERY {
            baselines_saved = Instant::now();
            save_baselines(&baseline_store, reg.behaviour_snapshots()).await;
            save_group_baselines(&baseline_store, reg.behaviour_group_snapshots()).await;
        }
        // Every event waiting now (and every one arriving until the pacer says the flush is
        // due) is handled before one flush: the registry recomputes the netmaps once for the
        // whole burst, not once per event (an admission wave of N sessions costs one
        // recompute per gap, not N, each over N sessions). A wake without an event flushes
        // too (time passed: expiries); a wake only to move backlogs on does not.
        if ev.is_some() || wait == timer {
            pacer.note(false);
        }
        let mut next = ev;
        let mut in_batch = 0usize;
        while let Some(ev) = next.take() {
            handled += 1;
            in_batch += 1;
            if urgent(&ev) {
                pacer.note(true);
            }
            match ev {
                Event::Opened {
                    id,
                    conn,
                    observed,
                    update,
                    protocol,
                    holding,
                    held_peers,
                    tx,
                    close,
                    reply,
                } => {
                    let r = reg.handle_session_opened_holding(
                        id, conn, observed, update, protocol, held_peers,
                    );
                    if r.is_ok() {
                        conns.insert(conn, tx, close, holding);
                        let _ = presence.send(Presence::Claimed(id, now_ms()));
                    }
                    let _ = reply.send(r);
                }
                Event::Update { id, conn, update } => reg.handle_session_update(id, conn, update),
                Event::Closed { id, conn } => {
                    conns.remove(conn);
                    reg.handle_session_closed(id, conn);
                    if !reg.is_online(id) {
                        let _ = presence.send(Presence::Released(id));
                    }
                }
                Event::SessionMoved(id) => {
                    info!(device = %id, "the device's session moved to another replica: closing the stale one here");
                    reg.handle_session_moved(id);
                }
                Event::PostureFloor(id, seq) => reg.handle_posture_floor(id, seq),
                Event::RemoteTrust(id, t) => reg.handle_remote_trust(id, t),
                Event::RemoteSessions(s) => reg.handle_remote_sessions(s),
                Event::ScanEvidence(rows) => reg.handle_remote_denied(&rows, now_ms()),
                Event::Upserted(d) => reg.handle_device_upserted(d),
                Event::Removed(id, why) => reg.handle_device_removed(id, &why),
                Event::User(u) => reg.handle_user(u),
                Event::SignIn(id, s) => reg.handle_sign_in(id, Some(s)),
                Event::Identity(user, why) => reg.handle_identity(&user, why),
                Event::Lease(l, done) => {
                    reg.handle_lease(l);
                    // Peers get the new key before the device hears its lease was granted: the
                    // reply waits for the batch's flush.
                    leases_done.push(done);
                }
                Event::LeasesRevoked(id, serials) => reg.handle_leases_revoked(id, &serials),
                Event::Rotate(id, why, done) => {
                    let _ = done.send(reg.handle_rotate(id, &why));
                }
                Event::Policy(p, version, compile) => {
                    if !reg.handle_policy_applied(p, version, compile) {
                        debug!(version, "policy version already in force");
                    }
                }
                Event::Grants(g) => reg.handle_grants(g),
                Event::Routes(r) => reg.handle_routes(r),
                Event::Coordinators(list, tx) => {
                    let _ = tx.send(reg.handle_coordinators(list));
                }
                Event::Relays(r) => {
                    // A removed relay's control session ends.
                    let gone: Vec<String> = relays
                        .keys()
                        .filter(|n| !r.iter().any(|x| &&x.name == n))
                        .cloned()
                        .collect();
                    for name in gone {
                        if let Some(rc) = relays.remove(&name) {
                            info!(relay = %name, "relay removed: ending its control session");
                            let _ = rc.tx.try_send(ConnCmd::Close(
                                ErrorCode::Unauthorized,
                                "this relay has been removed".into(),
                            ));
                        }
                    }
                    reg.handle_relays(r);
                }
                Event::RelayOpened {
                    name,
                    conn,
                    tx,
                    reply,
                } => {
                    if !reg.has_relay(&name) {
                        let _ = reply.send(false);
                    } else {
                        let fresh = RelayConn {
                            conn,
                            tx,
                            load: RelayLoad::default(),
                        };
                        if let Some(old) = relays.insert(name.clone(), fresh) {
                            info!(relay = %name, "relay reconnected: closing its older control session");
                            let _ = old.tx.try_send(ConnCmd::Close(
                                ErrorCode::Protocol,
                                "replaced by a newer control session of the same relay".into(),
                            ));
                        }
                        let _ = reply.send(true);
                    }
                }
                Event::RelayLoad { name, conn, load } => {
                    if let Some(rc) = relays.get_mut(&name).filter(|rc| rc.conn == conn) {
                        rc.load = load;
                    }
                }
                Event::RelayClosed { name, conn } => {
                    if relays.get(&name).is_some_and(|rc| rc.conn == conn) {
                        relays.remove(&name);
                    }
                }
                Event::Posture {
                    id,
                    conn,
                    report,
                    received,
                } => {
                    sink.stats.reports += 1;
                    let (seq, age) = (report.seq, now_ms().saturating_sub(report.collected_at_ms));
                    match reg.handle_posture(id, conn, *report, now_ms()) {
                        Ok(()) => {
                            let _ = presence.send(Presence::PostureSeq(id, seq));
                            debug!(device = %id, seq, age_ms = age, "posture report");
                            // The batch's oldest report is the one its enforcement latency counts.
                            sink.received =
                                Some(sink.received.map_or(received, |r| r.min(received)));
                        }
                        Err(e) => {
                            sink.stats.refused += 1;
                            // A device sending garbage must not turn into an fsync per message:
                            // at most one audit row per device per 10 s, with the count.
                            let (last, n) = sink.refused.entry(id).or_insert((None, 0));
                            *n += 1;
                            if last.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10))
                            {
                                warn!(device = %id, seq, error = %e, refused = *n, "posture report refused");
                                let count = *n;
                                *last = Some(Instant::now());
                                *n = 0;
                                sink.audit(
                                    id,
                                    Action::PostureRefused,
                                    json!({ "error": e.to_string(), "count": count }),
                                );
                            }
                        }
                    }
                }
                Event::DeniedFlows(id, flows) => reg.handle_denied_flows(id, &flows, now_ms()),
                Event::Flows(id, report) => reg.handle_flows(id, &report, now_ms()),
                Event::AnomalyAck(id, label, reply) => {
                    let r = reg.handle_anomaly_ack(id, label);
                    if let Ok(a) = &r {
                        sink.anomaly_stored(a);
                    }
                    let _ = reply.send(r);
                }
                Event::WantPeer { id, conn, by } => {
                    match reg.handle_want_peer(id, conn, by.clone(), now_ms()) {
                        Ok(peers) => debug!(device = %id, %by, ?peers, "peers held on demand"),
                        Err(why) => {
                            debug!(device = %id, %by, %why, counters = ?reg.want_counters(), "want_peer not granted")
                        }
                    }
                }
                Event::Punch { id, conn, peer } => {
                    if let Err(why) = reg.handle_punch_request(id, conn, peer, now_ms()) {
                        debug!(device = %id, %peer, %why, counters = ?reg.punch_counters(), "punch request dropped");
                    }
                }
                Event::RelabelFlows(id, mut report, reply) => {
                    let changed = crate::flows::relabel(
                        id,
                        &mut report,
                        reg.policy(),
                        &reg.directory(),
                        now_ms(),
                    );
                    if changed > 0 {
                        debug!(device = %id, changed, "flow denial reasons relabeled");
                    }
                    let _ = reply.send(report);
                }
                Event::DirectoryFor(p, reply) => {
                    let _ = reply.send(reg.directory_for(&p));
                }
                Event::LeaseCheck(id, key, reply) => {
                    let _ = reply.send(
                        reg.check_lease_request(id, &key)
                            .map(|()| (reg.risky_lease_ttl_ms(id), reg.current_lease(id, &key))),
                    );
                }
                Event::Settled(reply) => {
                    settled.push(reply);
                    pacer.note(true);
                }
                Event::TrustView(id, reply) => {
                    flush(&mut reg, &mut conns, &mut relays, &mut sink);
                    let _ = reply.send((reg.posture_report(id).cloned(), reg.trust_view(id)));
                }
                Event::Online(reply) => {
                    let mut online = conns_online(&reg);
                    online.extend(reg.online_elsewhere());
                    let _ = reply.send(online);
                }
                Event::Snapshot(reply) => {
                    // The narrowing passes go out, then the compile is brought up to date; the
                    // netmap changes it makes go out in the paced flushes, so an admin command
                    // does not hold the actor for a whole wave (a revocation right after it
                    // would wait behind it).
                    reg.narrow_now();
                    flush_for(&mut reg, &mut conns, &mut relays, &mut sink, Budget::Queued);
                    reg.settle();
                    pacer.note(true);
                    let _ = reply.send(Snapshot {
                        online: conns_online(&reg),
                        online_elsewhere: reg.online_elsewhere(),
                        home_relays: reg.home_relays(),
                        risks: reg.risks(),
                        sign_in_asks: reg.sign_in_asks(),
                        directory: reg.directory(),
                        compiled: std::sync::Arc::clone(reg.compiled()),
                        routers: reg.current_routers(),
                        policy: reg.policy().cloned(),
                        trust: sink.stats.view(),
                        event_queue: rx.view(),
                        live: crate::metrics::LiveMetrics {
                            leases_expired: reg.leases_expired(),
                            wants: reg.want_counters(),
                            held_peers: reg.held_peers(),
                            ..sink.stats.live.clone()
                        },
                        relays: relays
                            .iter()
                            .map(|(n, rc)| (n.clone(), rc.load.clone()))
                            .collect(),
                    });
                }
            }
            if in_batch < BATCH_MAX {
                next = rx.try_recv();
            }
        }
        let now = Instant::now();
        if pacer.due(now) {
            let (took, complete) = flush_for(
                &mut reg,
                &mut conns,
                &mut relays,
                &mut sink,
                Budget::For(FLUSH_SLICE),
            );
            // The gap counts from the flush's end: however long recomputes take, the actor
            // spends the gap gathering events, not recomputing for each few of them.
            pacer.flushed(Instant::now());
            if complete {
                for done in leases_done.drain(..) {
                    let _ = done.send(());
                }
                for done in settled.drain(..) {
                    let _ = done.try_send(());
                }
            } else {
                // The rest of the wave goes on at once, after the events queued meanwhile.
                pacer.note(true);
            }
            if handled > 0 {
                sink.stats.live.batch(handled, took);
            }
            if took >= SLOW_FLUSH {
                debug!(
                    events = handled,
                    flush_ms = took.as_millis() as u64,
                    sessions = reg.online_ids().len(),
                    backlogged = conns.backlogged.len(),
                    held_total = conns.held,
                    "registry batch flushed slowly"
                );
            }
            handled = 0;
        } else {
            conns.drain(now);
        }
    }
    // Shutting down: keep what was learned.
    save_baselines(&baseline_store, reg.behaviour_snapshots()).await;
    save_group_baselines(&baseline_store, reg.behaviour_group_snapshots()).await;
}

async fn save_group_baselines(store: &Arc<dyn Store>, rows: Vec<(String, String)>) {
    if rows.is_empty() {
        return;
    }
    let store = store.clone();
    let n = rows.len();
    let res =
        tokio::task::spawn_blocking(move || store.save_group_baselines(&rows, now_ms())).await;
    match res {
        Ok(Ok(())) => debug!(groups = n, "behaviour group baselines saved"),
        Ok(Err(e)) => warn!(error = %e, "saving behaviour group baselines failed"),
        Err(e) => warn!(error = %e, "saving behaviour group baselines failed"),
    }
}

/// Events handled at most before a flush: bounds how long the first event of a batch waits
/// for its netmaps (each event alone is cheap; the flush is what costs).
const BATCH_MAX: usize = 1024;

/// How soon a session's backlog is offered to its queue again when nothing else wakes the
/// actor (every flush offers it too).
const BACKLOG_RETRY: Duration = Duration::from_millis(20);

/// Events that take access away: their flush does not wait for the pacer's gap, so a
/// revocation reaches sessions (and relays) as fast as before pacing.
fn urgent(ev: &Event) -> bool {
    matches!(
        ev,
        Event::Removed(..)
            | Event::LeasesRevoked(..)
            | Event::Identity(_, Some(_))
            | Event::Rotate(..)
            | Event::SessionMoved(..)
    )
}

/// A flush slower than this is logged (at debug) with the batch's size.
const SLOW_FLUSH: Duration = Duration::from_millis(100);

/// How often behaviour baselines are written (and once more at shutdown).
const BASELINE_SAVE_EVERY: Duration = Duration::from_secs(300);

async fn save_baselines(store: &Arc<dyn Store>, rows: Vec<(DeviceId, String)>) {
    if rows.is_empty() {
        return;
    }
    let store = store.clone();
    let n = rows.len();
    let res = tokio::task::spawn_blocking(move || store.save_baselines(&rows, now_ms())).await;
    match res {
        Ok(Ok(())) => debug!(devices = n, "behaviour baselines saved"),
        Ok(Err(e)) => warn!(error = %e, "saving behaviour baselines failed"),
        Err(e) => warn!(error = %e, "saving behaviour baselines failed"),
    }
}

/// How long one paced flush produces netmap changes before the actor reads its queue again.
/// A change that reaches every session (a policy change, a membership change: about a second
/// of work at 1 000 dense sessions) is produced in slices, with the events that arrived
/// between them handled in between: a revocation or quarantine is taken up within a slice,
/// not after the whole wave, and its narrowing goes out first (the registry restarts the
/// wave from the newest state; sessions already brought up to date cost a comparison).
const FLUSH_SLICE: Duration = Duration::from_millis(50);

/// Drains every output of the registry (recomputing the netmaps once if anything changed) onto
/// the connections and the trust sink; returns how long that took.
pub(super) fn flush(
    reg: &mut Registry,
    conns: &mut DeviceConns,
    relays: &mut RelayConns,
    sink: &mut TrustSink<'_>,
) -> Duration {
    flush_for(reg, conns, relays, sink, Budget::All).0
}

/// How much a flush publishes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Budget {
    /// Everything, recomputes included.
    All,
    /// Until this long has passed (at least one output).
    For(Duration),
    /// Only the outputs already queued: no recompute, no session produced.
    Queued,
}

/// The next output of a flush under `budget`, or `None` to end it (`complete` cleared when
/// work is left). Once a slice's time is spent, what the registry has already made still goes
/// out (a narrowing pass's deltas to every session: held back, they waited behind whatever the
/// next events asked for, a whole recompute at 10 000 sessions); only making more (a
/// recompute, the next session's netmap) waits for the next slice.
fn next_output(
    reg: &mut Registry,
    budget: Budget,
    started: Instant,
    complete: &mut bool,
) -> Option<Output> {
    match budget {
        Budget::For(b) if started.elapsed() >= b && reg.has_work() => {
            let queued = reg.poll_queued();
            if queued.is_none() {
                *complete = false;
            }
            queued
        }
        Budget::Queued => reg.poll_queued(),
        Budget::All | Budget::For(_) => reg.poll_output(),
    }
}

/// Publishes what the registry has to send, as far as `budget` says. Returns how long it
/// took and whether the registry has nothing left.
pub(super) fn flush_for(
    reg: &mut Registry,
    conns: &mut DeviceConns,
    relays: &mut RelayConns,
    sink: &mut TrustSink<'_>,
    budget: Budget,
) -> (Duration, bool) {
    let started = Instant::now();
    let mut complete = true;
    let mut changed = false;
    let mut revoked = Vec::new();
    let mut netmaps = 0u64;
    // Sessions with a backlog get their oldest change first, then what this flush adds.
    conns.drain(started);
    {
        while let Some(out) = next_output(reg, budget, started, &mut complete) {
            match out {
                Output::Send { conn, msg } => {
                    if matches!(
                        msg,
                        wire::CoordinatorMsg::Netmap(_) | wire::CoordinatorMsg::NetmapDelta(_)
                    ) {
                        netmaps += 1;
                    }
                    conns.deliver(conn, msg, started);
                }
                Output::Close { conn, code, reason } => conns.close(conn, code, reason),
                Output::PostureChanged {
                    device,
                    change,
                    report,
                } => {
                    changed = true;
                    sink.posture_changed(device, change, report);
                }
                Output::Quarantine { device, reason } => sink.quarantine(device, reason),
                Output::Anomaly(a) => sink.anomaly(*a),
                Output::TrustDecided { device, decision } => sink.trust_decided(device, decision),
                Output::HomeRelay { device, relay } => {
                    let _ = sink.presence.send(Presence::HomeRelay(device, relay));
                }
                Output::RiskCrossed {
                    device,
                    score,
                    threshold,
                    above,
                    reason,
                } => sink.risk_crossed(device, score, threshold, above, reason),
                Output::RoutesAdvertised { device, routes } => {
                    sink.routes_advertised(device, routes)
                }
                Output::DeviceRevoked { device } => revoked.push(device),
                Output::ScanEvidence {
                    reporter,
                    flows,
                    at_ms,
                    window_ms,
                } => sink.scan_evidence(reporter, flows, at_ms, window_ms),
            }
        }
    }
    sink.stats.live.netmaps_pushed(netmaps);
    sink.stats.live.netmaps_resumed = conns.resumed;
    sink.stats.live.resume_peers_left_out = conns.peers_left_out;
    if !revoked.is_empty() {
        push_revoked(relays, revoked);
    }
    // Every peer's netmap change is queued on its connection now (when the flush is whole).
    let complete = complete && !reg.has_work();
    if let Some(t) = sink.received.take_if(|_| complete) {
        if changed {
            if sink.stats.enforce_us.len() >= 1000 {
                sink.stats.enforce_us.pop_front();
            }
            let took = t.elapsed();
            sink.stats.enforce_us.push_back(took.as_micros() as u64);
            sink.stats.live.enforce.observe(took.as_secs_f64());
        }
    }
    (started.elapsed(), complete)
}

pub(super) fn conns_online(reg: &Registry) -> Vec<DeviceId> {
    reg.online_ids()
}

/// Tells every connected relay to refuse these devices' tickets and drop their connections. A
/// relay whose queue is full is disconnected: it reconnects and gets the full list in `Welcome`.
fn push_revoked(relays: &mut RelayConns, devices: Vec<DeviceId>) {
    info!(
        ?devices,
        relays = relays.len(),
        "pushing revocations to relays"
    );
    let frame = wire::encode(&CoordinatorToRelay::Revoked { devices });
    relays.retain(|name, rc| {
        if rc.tx.try_send(ConnCmd::Send(frame.clone())).is_ok() {
            return true;
        }
        warn!(relay = %name, "relay control session is not keeping up; closing it");
        let _ = rc
            .tx
            .try_send(ConnCmd::Close(ErrorCode::Internal, "too slow".into()));
        false
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
    use super::*;
    use crate::fanout::tests::peer;
    use ward_shared::wire::{CoordinatorMsg, NetmapDelta};

    /// The log line of an oversized frame names the message's largest fields first, with
    /// how many items each holds.
    #[test]
    fn an_oversized_frame_is_described_by_its_largest_fields() {
        let entry = |i: usize| wire::Unavailable {
            service: "db".into(),
            hostname: ward_shared::names::Hostname::parse(&format!("h{i}")).unwrap(),
            rule: "eng-db".into(),
            reasons: vec!["quarantined: test".into()],
        };
        let msg = CoordinatorMsg::PostureVerdict(wire::PostureVerdict {
            report_seq: Some(1),
            evaluated_at_ms: 0,
            results: vec![],
            quarantine: Some("test".into()),
            unavailable: (0..40).map(entry).collect(),
            unavailable_more: 0,
            risk: None,
        });
        let parts = oversized_parts(&msg);
        assert!(parts.starts_with("unavailable[40]="), "{parts}");
        assert!(parts.contains("quarantine[1]="), "{parts}");
    }

    /// A slice whose time is spent still sends what the registry already made: a
    /// quarantine's narrowing deltas all go out, and the compile waits for the next slice.
    #[test]
    fn a_spent_slice_still_sends_the_narrowing_already_made() {
        use crate::store::{Device, User};
        let pools = ward_shared::addr::AddressPools::from_random([0; 5]);
        let devices: Vec<Device> = (1..=3u64)
            .map(|i| {
                let (v4, v6) = pools.addresses(i).unwrap();
                let name = ward_shared::names::Hostname::parse(&format!("h{i}")).unwrap();
                Device::active(DeviceId(i), name, Some("alice".into()), vec![], v4, v6)
            })
            .collect();
        let alice = User {
            name: "alice".into(),
            groups: vec![],
            disabled: false,
            created_ms: 0,
        };
        let policy = ward_shared::policy::parse(
            b"[groups]\neng = [\"alice\"]\n[services.all]\ndevices = [\"group:eng\"]\nports = [\"tcp/*\"]\n[[rules]]\nfrom = [\"group:eng\"]\nto = [\"all\"]\n",
            "test.toml",
        )
        .unwrap();
        let mut quarantined = devices[1].clone();
        let mut reg = Registry::new(pools, devices, [alice], Some(policy), vec![], vec![], 0);
        for i in 1..=3u64 {
            reg.handle_session_opened(
                DeviceId(i),
                i * 10,
                "10.0.0.1:1".parse().unwrap(),
                wire::DeviceUpdate::default(),
            )
            .unwrap();
        }
        while reg.poll_output().is_some() {}
        quarantined.quarantine = Some(crate::model::Quarantine {
            since_ms: 1,
            reason: "test".into(),
            automatic: false,
        });
        reg.handle_device_upserted(quarantined);
        let is_delta_to = |o: &Output, to: ConnId| matches!(o, Output::Send { conn, msg: CoordinatorMsg::NetmapDelta(_) } if *conn == to);
        // The slice that ran the narrowing pass sent its first delta (after the rotation the
        // quarantine asks of the device), then its time ran out.
        let first = std::iter::from_fn(|| reg.poll_output())
            .find(|o| is_delta_to(o, 10) || is_delta_to(o, 30))
            .unwrap();
        let recomputes = reg.recomputes();
        let mut complete = true;
        let started = Instant::now();
        let rest: Vec<Output> = std::iter::from_fn(|| {
            next_output(
                &mut reg,
                Budget::For(Duration::ZERO),
                started,
                &mut complete,
            )
        })
        .collect();
        let told: Vec<ConnId> = [10, 30]
            .into_iter()
            .filter(|c| is_delta_to(&first, *c) || rest.iter().any(|o| is_delta_to(o, *c)))
            .collect();
        assert_eq!(told, vec![10, 30], "{first:?} {rest:?}");
        assert!(!complete, "the compile is still to come");
        assert_eq!(reg.recomputes(), recomputes, "nothing made past the slice");
    }

    fn delta(base: u64, removed: u64) -> CoordinatorMsg {
        CoordinatorMsg::NetmapDelta(NetmapDelta {
            remove: vec![DeviceId(removed)],
            ..NetmapDelta::after(base)
        })
    }

    fn received(rx: &mut mpsc::Receiver<ConnCmd>) -> Vec<CoordinatorMsg> {
        let mut out = Vec::new();
        while let Ok(cmd) = rx.try_recv() {
            let ConnCmd::Send(bytes) = cmd else {
                panic!("a close on the queue")
            };
            out.push(wire::decode(&bytes[4..]).unwrap());
        }
        out
    }

    /// A netmap of `seq` listing these devices, online.
    fn netmap_of(seq: u64, peers: impl Iterator<Item = u64>) -> wire::Netmap {
        crate::fanout::tests::netmap(seq, peers.map(|id| peer(id, true)).collect())
    }

    /// A session that said what it holds gets a first netmap without the peers it holds
    /// (a held netmap and a queued one alike); later netmaps on it are whole.
    #[test]
    fn a_sessions_first_netmap_leaves_out_what_the_device_holds() {
        let held = netmap_of(1, 2..=50);
        let holding = Holding::of(&held.peers);
        let (tx, mut rx) = mpsc::channel(1);
        let (close_tx, _close_rx) = oneshot::channel();
        let mut conns = DeviceConns::default();
        conns.insert(3, tx, close_tx, Some(holding.clone()));
        let t0 = Instant::now();
        // Peer 60 joined since. The queue (one message) is full, so the netmap waits in the
        // backlog and is written when the queue has room.
        conns.deliver(3, delta(0, 1), t0);
        let mut current = netmap_of(2, (2..=50).chain([60]));
        conns.deliver(3, CoordinatorMsg::Netmap(current.clone()), t0);
        assert_eq!(received(&mut rx).len(), 1);
        conns.drain(t0);
        let [CoordinatorMsg::Netmap(first)] =
            <[CoordinatorMsg; 1]>::try_from(received(&mut rx)).unwrap()
        else {
            panic!("a netmap")
        };
        assert_eq!(
            first.peers.len(),
            1,
            "only the new peer: {:?}",
            first.resumed
        );
        assert_eq!(first.peers[0].device_id, DeviceId(60));
        let r = first.resumed.clone().expect("resumed");
        assert_eq!(
            resume::merge(&held.peers, first.peers, &r, holding.count().ok()).unwrap(),
            current.peers
        );
        assert_eq!((conns.resumed, conns.peers_left_out), (1, 49));
        current.seq = 3;
        conns.deliver(3, CoordinatorMsg::Netmap(current.clone()), t0);
        let [CoordinatorMsg::Netmap(later)] =
            <[CoordinatorMsg; 1]>::try_from(received(&mut rx)).unwrap()
        else {
            panic!("a netmap")
        };
        assert_eq!((later.peers.len(), later.resumed), (50, None));
        // A holding that matches nothing: the first netmap is whole and says nothing more.
        let (tx, mut rx) = mpsc::channel(1);
        let (close_tx, _close_rx) = oneshot::channel();
        conns.insert(
            4,
            tx,
            close_tx,
            Some(Holding::of(&netmap_of(1, 70..=80).peers)),
        );
        conns.deliver(4, CoordinatorMsg::Netmap(current.clone()), t0);
        let [CoordinatorMsg::Netmap(whole)] =
            <[CoordinatorMsg; 1]>::try_from(received(&mut rx)).unwrap()
        else {
            panic!("a netmap")
        };
        assert_eq!((whole.peers, whole.resumed), (current.peers, None));
    }

    /// A session whose queue is full gets every change later, merged, and is not closed.
    #[test]
    fn a_slow_session_gets_its_changes_merged_and_stays_open() {
        let (tx, mut rx) = mpsc::channel(2);
        let (close_tx, mut close_rx) = oneshot::channel();
        let mut conns = DeviceConns::default();
        conns.insert(7, tx, close_tx, None);
        let t0 = Instant::now();
        for i in 0..50 {
            conns.deliver(7, delta(1 + i, 100 + i), t0);
        }
        assert!(conns.conns.contains_key(&7), "not closed for being slow");
        assert_eq!(conns.backlogged.len(), 1);
        assert_eq!(conns.held, 48, "two went to the queue, the rest were held");
        let first = received(&mut rx);
        assert_eq!(first.len(), 2);
        // The session read its queue: the backlog goes out as one merged delta.
        conns.drain(t0 + Duration::from_secs(1));
        let rest = received(&mut rx);
        let [CoordinatorMsg::NetmapDelta(d)] = rest.as_slice() else {
            panic!("one merged delta: {rest:?}")
        };
        assert_eq!((d.base_seq, d.seq, d.remove.len()), (3, 51, 48));
        assert!(conns.backlogged.is_empty());
        assert!(close_rx.try_recv().is_err(), "no close was sent");
    }

    /// A close goes out at once even when the queue is full; a session that takes nothing
    /// for the stuck limit is closed.
    #[test]
    fn closes_do_not_queue_and_a_stuck_session_is_closed() {
        let (tx, _rx) = mpsc::channel(1);
        let (close_tx, mut close_rx) = oneshot::channel();
        let mut conns = DeviceConns::default();
        conns.insert(1, tx, close_tx, None);
        let t0 = Instant::now();
        conns.deliver(1, delta(1, 5), t0);
        conns.deliver(1, delta(2, 6), t0);
        conns.close(1, ErrorCode::DeviceRevoked, "revoked".into());
        assert_eq!(
            close_rx.try_recv().unwrap(),
            (ErrorCode::DeviceRevoked, "revoked".to_string())
        );
        assert!(conns.conns.is_empty() && conns.backlogged.is_empty());

        let (tx, _rx) = mpsc::channel(1);
        let (close_tx, mut close_rx) = oneshot::channel();
        conns.insert(2, tx, close_tx, None);
        conns.deliver(2, delta(1, 5), t0);
        conns.deliver(2, delta(2, 6), t0);
        conns.drain(t0 + crate::fanout::STUCK_LIMIT - Duration::from_secs(1));
        assert!(close_rx.try_recv().is_err(), "not stuck yet");
        conns.drain(t0 + crate::fanout::STUCK_LIMIT);
        let (code, why) = close_rx.try_recv().unwrap();
        assert_eq!(code, ErrorCode::Internal);
        assert!(why.contains("too slow"), "{why}");
        assert!(conns.conns.is_empty());
    }
}
