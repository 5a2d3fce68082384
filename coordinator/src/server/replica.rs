//! The replica task: follows the change feed (other replicas' writes reach this replica's
//! registry), records which device sessions this replica holds, closes the ones another
//! replica took over, and writes the heartbeat `status` lists. The decisions are
//! [`crate::replicas`]; this file reads the store and sends registry events.
//!
//! On SQLite the feed is polled every [`FEED_POLL`] (one indexed `MAX(seq)` read, no write
//! lock). On PostgreSQL every audit append also sends `NOTIFY ward_feed` in its transaction,
//! and the store's `LISTEN` thread wakes the same read at once through [`FeedWake`]
//! ([`crate::store::postgres::listen`]); the poll stays, every [`FEED_POLL_NOTIFIED`], as the
//! safety net for a notification lost while the listening connection was down.
//!
//! Each feed step also reads the scan evidence other replicas stored (`scan_evidence`, its
//! own id as position; no audit row, but the same wake-up on PostgreSQL) into the registry's
//! trust book.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use ward_shared::lease::SignedLease;
use ward_shared::policy;
use ward_shared::wire::DeviceId;

use super::actor::{Event, Presence};
use super::{now_ms, Ctx};
use crate::admin::ops;
use crate::model::Device;
use crate::registry::RemoteSession;
use crate::replicas::{self, Feed, Reloads};
use crate::store::replicas::{ReplicaRow, TrustRow};
use crate::store::Store;

/// How often the change feed's version is read without a wake-up (SQLite: the only way).
pub const FEED_POLL: Duration = Duration::from_millis(150);
/// The same poll while notifications wake the feed (PostgreSQL): only a safety net.
pub const FEED_POLL_NOTIFIED: Duration = Duration::from_secs(1);
/// How often the sessions table is checked for sessions another replica took over.
const SESSION_POLL: Duration = Duration::from_millis(500);
/// How often the heartbeat row is written.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Feed rows read at once.
const FEED_BATCH: usize = 1_000;
/// Lease changes alone read the whole device table at most this often: in between, only the
/// rows of the devices whose new leases arrived are read (a key rotation is one row, not
/// every device's; at 10 000 devices rotating their keys the whole table was read on every
/// poll). The whole read still comes, so a device's new endpoints reach replicas that do
/// not hold its session within this long of any lease change.
const DEVICES_ON_LEASES_EVERY: Duration = Duration::from_secs(2);
/// Scan evidence rows read at once, and batches per feed step (the rest waits for the next).
const EVIDENCE_BATCH: usize = 4_096;
const EVIDENCE_BATCHES: usize = 4;
/// How often the sessions other replicas hold are read (peers' online flag, whose verdict
/// counts).
const HOLDERS_POLL: Duration = Duration::from_millis(500);

/// Wakes the feed poll at once. The PostgreSQL backend's `LISTEN ward_feed` thread calls
/// `notify_one()` on every notification (a burst of them leaves one permit: one read); on
/// SQLite nothing does and the poll runs on its timer.
pub type FeedWake = Arc<tokio::sync::Notify>;

/// Who this replica is.
pub(super) struct Me {
    pub id: String,
    pub address: String,
    pub started_ms: i64,
}

/// What the feed last read of each table it diffs, so only differences reach the registry.
pub(super) struct Seen {
    pub devices: BTreeMap<DeviceId, Device>,
    pub policy_version: Option<i64>,
    /// Active lease serials and their devices.
    pub leases: BTreeMap<u64, DeviceId>,
    /// This replica's id (its own trust rows and sessions are not news to it).
    pub me: String,
    /// The trust rows other replicas wrote, as last read.
    pub trust: BTreeMap<DeviceId, TrustRow>,
    /// The sessions other live replicas hold, as last sent to the registry.
    pub remote_sessions: Option<BTreeMap<DeviceId, RemoteSession>>,
    /// Provider suspensions per user, as last read.
    pub suspensions: BTreeMap<String, Option<String>>,
    /// When the whole device table was last read (at start-up, for the rows `new` took).
    pub devices_read: std::time::Instant,
    /// A lease read could not be completed: read the leases again on the next poll even if
    /// the feed did not move.
    pub leases_again: bool,
}

impl Seen {
    pub fn new(devices: &[Device], policy_version: Option<i64>, leases: &[SignedLease]) -> Self {
        Self {
            devices: devices.iter().map(|d| (d.id, d.clone())).collect(),
            policy_version,
            leases: leases
                .iter()
                .map(|l| (l.lease.serial, l.lease.device_id))
                .collect(),
            me: String::new(),
            trust: BTreeMap::new(),
            remote_sessions: None,
            suspensions: BTreeMap::new(),
            devices_read: std::time::Instant::now(),
            leases_again: false,
        }
    }
}

pub(super) async fn run(
    ctx: Arc<Ctx>,
    me: Me,
    mut feed: Feed,
    mut seen: Seen,
    mut presence: mpsc::UnboundedReceiver<Presence>,
    wake: FeedWake,
    feed_poll: Duration,
) {
    info!(replica = %me.id, feed_version = feed.seen(), ?feed_poll, "replica following the change feed");
    seen.me = me.id.clone();
    // Other replicas' verdicts on the devices they hold, before any feed row moves.
    follow_trust(&ctx, &mut seen).await;
    // The scan evidence stored so far (this replica's own from before a restart too).
    let mut evidence = replicas::EvidenceFeed::new(&me.id);
    follow_evidence(&ctx, &mut evidence).await;
    let mut holders_tick = tokio::time::interval(HOLDERS_POLL);
    holders_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mine: BTreeMap<DeviceId, i64> = BTreeMap::new();
    let mut feed_tick = tokio::time::interval(feed_poll);
    let mut session_tick = tokio::time::interval(SESSION_POLL);
    let mut beat_tick = tokio::time::interval(HEARTBEAT);
    for t in [&mut feed_tick, &mut session_tick, &mut beat_tick] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            p = presence.recv() => {
                let Some(p) = p else { break };
                record_presence(&ctx, &me, &mut mine, p).await;
            }
            _ = feed_tick.tick() => {
                follow(&ctx, &mut feed, &mut seen).await;
                follow_evidence(&ctx, &mut evidence).await;
            }
            _ = wake.notified() => {
                follow(&ctx, &mut feed, &mut seen).await;
                follow_evidence(&ctx, &mut evidence).await;
            }
            _ = session_tick.tick() => close_stale(&ctx, &me, &mine).await,
            _ = beat_tick.tick() => heartbeat(&ctx, &me, mine.len() as u64).await,
            _ = holders_tick.tick() => share_sessions(&ctx, &mut seen).await,
        }
    }
}

async fn record_presence(ctx: &Arc<Ctx>, me: &Me, mine: &mut BTreeMap<DeviceId, i64>, p: Presence) {
    let store = ctx.store.clone();
    let id = me.id.clone();
    let what = format!("{p:?}");
    let res = match p {
        Presence::Claimed(dev, since) => {
            mine.insert(dev, since);
            let res = tokio::task::spawn_blocking(move || {
                store.claim_session(dev, &id, since)?;
                store.posture_seq(dev)
            })
            .await;
            // The device may have reported to another replica before: its numbers go on.
            match res {
                Ok(Ok(seq)) => {
                    if seq > 0 {
                        ctx.events.send_internal(Event::PostureFloor(dev, seq));
                    }
                    Ok(Ok(()))
                }
                Ok(Err(e)) => Ok(Err(e)),
                Err(e) => Err(e),
            }
        }
        Presence::PostureSeq(dev, seq) => {
            tokio::task::spawn_blocking(move || store.raise_posture_seq(dev, seq)).await
        }
        Presence::Released(dev) => {
            mine.remove(&dev);
            tokio::task::spawn_blocking(move || store.release_session(dev, &id)).await
        }
        Presence::HomeRelay(dev, relay) => {
            tokio::task::spawn_blocking(move || store.set_session_relay(dev, &id, relay.as_deref()))
                .await
        }
    };
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, presence = %what, "recording a device session failed"),
        Err(e) => warn!(error = %e, "session recording task failed"),
    }
}

async fn close_stale(ctx: &Arc<Ctx>, me: &Me, mine: &BTreeMap<DeviceId, i64>) {
    if mine.is_empty() {
        return;
    }
    let store = ctx.store.clone();
    let rows = match tokio::task::spawn_blocking(move || store.sessions()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return warn!(error = %e, "reading the sessions table failed"),
        Err(e) => return warn!(error = %e, "sessions task failed"),
    };
    for dev in replicas::stale_sessions(mine, &rows, &me.id) {
        ctx.events.send_internal(Event::SessionMoved(dev));
    }
}

async fn heartbeat(ctx: &Arc<Ctx>, me: &Me, sessions: u64) {
    let row = ReplicaRow {
        id: me.id.clone(),
        address: me.address.clone(),
        started_ms: me.started_ms,
        last_seen_ms: now_ms(),
        sessions,
    };
    let store = ctx.store.clone();
    match tokio::task::spawn_blocking(move || store.replica_heartbeat(&row)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "writing the replica heartbeat failed"),
        Err(e) => warn!(error = %e, "heartbeat task failed"),
    }
}

/// What a reload read from the store, handed back from the blocking thread.
#[derive(Default)]
struct Read {
    devices: Option<Vec<Device>>,
    users: Option<Vec<crate::model::User>>,
    policy: Option<Option<(policy::Policy, i64)>>,
    grants: Option<Vec<policy::Grant>>,
    relays: Option<Vec<ward_shared::wire::RelayInfo>>,
    routes: Option<Vec<crate::store::RouteRow>>,
    leases: Option<Vec<crate::store::LeaseRow>>,
    sign_ins: Option<Vec<crate::store::DeviceSignIn>>,
    trust: Option<Vec<TrustRow>>,
    suspensions: Option<BTreeMap<String, Option<String>>>,
}

/// One feed step: if the version moved, read the rows since, then what they ask to reload,
/// and send the differences to the registry. A failed read leaves the position where it was,
/// so the next poll tries again.
async fn follow(ctx: &Arc<Ctx>, feed: &mut Feed, seen: &mut Seen) {
    let store = ctx.store.clone();
    let mut f = feed.clone();
    let devices_due = seen.devices_read.elapsed() >= DEVICES_ON_LEASES_EVERY;
    let again = seen.leases_again;
    let res = tokio::task::spawn_blocking(move || -> crate::store::Result<_> {
        let v = store.feed_version()?;
        if !f.wants(v) && !again {
            return Ok(None);
        }
        let mut reloads = Reloads {
            leases: again,
            ..Reloads::default()
        };
        while f.wants(v) {
            let rows = store.feed_since(f.seen(), FEED_BATCH)?;
            if rows.is_empty() {
                break;
            }
            reloads.merge(&f.handle_rows(&rows));
        }
        let read = read(store.as_ref(), &reloads, devices_due)?;
        Ok(Some((f, reloads, read)))
    })
    .await;
    let (f, reloads, read) = match res {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return error!(error = %e, "reading the change feed failed; retrying"),
        Err(e) => return error!(error = %e, "change feed task failed"),
    };
    *feed = f;
    if reloads.any() {
        debug!(
            version = feed.seen(),
            ?reloads,
            "applying other replicas' changes"
        );
    }
    apply(ctx, seen, read).await;
}

fn read(store: &dyn Store, r: &Reloads, devices_due: bool) -> crate::store::Result<Read> {
    let now = now_ms();
    let mut out = Read::default();
    // The whole table also when leases changed and it was not read for a while (the rows of
    // the devices with new leases are read in any case, in `apply`).
    if r.devices || (r.leases && devices_due) {
        out.devices = Some(store.list_devices()?);
    }
    if r.users {
        out.users = Some(store.list_users()?);
    }
    if r.policy {
        out.policy = Some(match store.current_policy()? {
            None => None,
            Some(v) => match policy::parse(
                v.text.as_bytes(),
                &crate::admin::policy::stored_name(v.version),
            ) {
                Ok(p) => Some((p, v.version)),
                Err(e) => {
                    error!(version = v.version, error = %e, "another replica's policy does not parse here; keeping the current one");
                    None
                }
            },
        });
    }
    if r.grants {
        out.grants = Some(
            ops::active_grants(store, now)
                .map_err(|e| crate::store::StoreError::Schema(format!("{e:#}")))?,
        );
    }
    if r.relays {
        out.relays = Some(
            ops::relays(store).map_err(|e| crate::store::StoreError::Schema(format!("{e:#}")))?,
        );
    }
    if r.routes {
        out.routes = Some(store.device_routes()?);
    }
    if r.leases {
        out.leases = Some(store.active_leases(now)?);
    }
    if r.sign_ins {
        out.sign_ins = Some(store.sign_ins()?);
    }
    if r.trust {
        out.trust = Some(store.device_trust()?);
    }
    if r.suspensions {
        out.suspensions = Some(replicas::suspensions(&store.oidc_users()?));
    }
    Ok(out)
}

async fn apply(ctx: &Arc<Ctx>, seen: &mut Seen, read: Read) {
    let ev = &ctx.events;
    if let Some(users) = read.users {
        for u in users {
            ev.send_internal(Event::User(u));
        }
    }
    if read.devices.is_some() {
        seen.devices_read = std::time::Instant::now();
    }
    if let Some(devices) = &read.devices {
        let (changed, gone) = replicas::diff_devices(&seen.devices, devices);
        for d in changed {
            debug!(device = %d.id, "device changed on another replica");
            ev.send_internal(Event::Upserted(d));
        }
        for id in gone {
            ev.send_internal(Event::Removed(id, "the device was removed".into()));
        }
        seen.devices = devices.iter().map(|d| (d.id, d.clone())).collect();
    }
    if let Some(Some((p, version))) = read.policy {
        if seen.policy_version != Some(version) {
            seen.policy_version = Some(version);
            info!(version, "policy version read from the change feed (applied on another replica, or read back)");
            ev.send_internal(Event::Policy(p, u64::try_from(version).unwrap_or(0), None));
        }
    }
    if let Some(g) = read.grants {
        ev.send_internal(Event::Grants(g));
    }
    if let Some(r) = read.relays {
        ev.send_internal(Event::Relays(r));
    }
    if let Some(r) = read.routes {
        ev.send_internal(Event::Routes(r));
    }
    if let Some(rows) = read.leases {
        let mut now: BTreeMap<u64, DeviceId> =
            rows.iter().map(|r| (r.serial, r.device_id)).collect();
        seen.leases_again = false;
        if read.devices.is_none() {
            // The devices whose new leases arrived, read again: their keys changed with the
            // lease, and their endpoints may have.
            let ids: Vec<DeviceId> = rows
                .iter()
                .filter(|r| !seen.leases.contains_key(&r.serial))
                .map(|r| r.device_id)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if !ids.is_empty() {
                match read_devices(ctx, ids.clone()).await {
                    Ok(fresh) => {
                        for d in fresh {
                            if replicas::device_changed(seen.devices.get(&d.id), &d) {
                                debug!(device = %d.id, "device changed with its lease");
                                ev.send_internal(Event::Upserted(d.clone()));
                            }
                            seen.devices.insert(d.id, d);
                        }
                    }
                    Err(e) => {
                        // Their leases stay unseen and are read again on the next poll.
                        error!(error = %e, devices = ids.len(), "reading the devices of new leases failed; retrying");
                        now.retain(|serial, d| {
                            seen.leases.contains_key(serial) || !ids.contains(d)
                        });
                        seen.leases_again = true;
                    }
                }
            }
        }
        // Serials that left the active set were revoked (or ran out: the registry retires
        // those itself, and a second retirement changes nothing).
        let mut revoked: BTreeMap<DeviceId, Vec<u64>> = BTreeMap::new();
        for (serial, dev) in &seen.leases {
            if !now.contains_key(serial) {
                revoked.entry(*dev).or_default().push(*serial);
            }
        }
        for row in rows {
            if seen.leases.contains_key(&row.serial) || !now.contains_key(&row.serial) {
                continue;
            }
            let Some(l) = crate::leases::sign_row(&ctx.lease_key, |id| seen.devices.get(&id), row)
            else {
                continue;
            };
            let (tx, _rx) = tokio::sync::oneshot::channel();
            ev.send_internal(Event::Lease(l, tx));
        }
        for (dev, serials) in revoked {
            ev.send_internal(Event::LeasesRevoked(dev, serials));
        }
        seen.leases = now;
    }
    if let Some(rows) = read.trust {
        apply_trust(ctx, seen, rows);
    }
    if let Some(now) = read.suspensions {
        // A suspension another replica stored (the provider refused a refresh, a SCIM
        // deprovisioning, a back-channel logout), or its lifting, applies here too.
        for (user, why) in &now {
            if seen.suspensions.get(user) != Some(why) {
                info!(%user, suspended = why.is_some(), "identity provider verdict from another replica");
                ev.send_internal(Event::Identity(user.clone(), why.clone()));
            }
        }
        seen.suspensions = now;
    }
    if let Some(rows) = read.sign_ins {
        for si in rows {
            let s = crate::oidc::core::SignIn {
                auth_time_ms: si.auth_time_ms,
                amr: si.amr,
            };
            ev.send_internal(Event::SignIn(si.device, s));
        }
    }
}

/// The rows of `ids` (a device gone from the table is left out).
async fn read_devices(ctx: &Arc<Ctx>, ids: Vec<DeviceId>) -> crate::store::Result<Vec<Device>> {
    let store = ctx.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match store.device(id) {
                Ok(d) => out.push(d),
                Err(crate::store::StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| crate::store::StoreError::Schema(format!("device read task failed: {e}")))?
}

/// Sends the registry each trust row another replica wrote that changed since the last read.
fn apply_trust(ctx: &Arc<Ctx>, seen: &mut Seen, rows: Vec<TrustRow>) {
    for row in rows {
        if row.replica == seen.me || seen.trust.get(&row.device) == Some(&row) {
            continue;
        }
        let remote = crate::trust::RemoteTrust::parse(
            &row.replica,
            &row.verdict,
            row.risk,
            &row.risk_reason,
            row.updated_ms,
        );
        if let Err(why) = &remote.evaluations {
            // Fail closed: the device's peers here lose what its posture gave them.
            error!(device = %row.device, replica = %row.replica, %why, "another replica's trust verdict is unreadable; judging the device as failing");
        } else {
            debug!(device = %row.device, replica = %row.replica, "trust verdict from another replica");
        }
        ctx.events
            .send_internal(Event::RemoteTrust(row.device, remote));
        seen.trust.insert(row.device, row);
    }
}

/// Sends the registry the scan evidence other replicas stored since the last read (one
/// indexed read when there is none). A failed read leaves the position and retries.
async fn follow_evidence(ctx: &Arc<Ctx>, evidence: &mut replicas::EvidenceFeed) {
    for _ in 0..EVIDENCE_BATCHES {
        let store = ctx.store.clone();
        let after = evidence.after();
        let batch = match tokio::task::spawn_blocking(move || {
            store.scan_evidence_since(after, EVIDENCE_BATCH)
        })
        .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return error!(error = %e, "reading the scan evidence failed; retrying"),
            Err(e) => return error!(error = %e, "scan evidence task failed"),
        };
        let full = batch.last_id > after && batch.rows.len() >= EVIDENCE_BATCH;
        let rows = evidence.handle_batch(batch);
        if !rows.is_empty() {
            debug!(rows = rows.len(), "scan evidence from other replicas");
            ctx.events.send_internal(Event::ScanEvidence(rows));
        }
        if !full {
            return;
        }
    }
}

/// Reads every trust row (at start, before the feed moves).
async fn follow_trust(ctx: &Arc<Ctx>, seen: &mut Seen) {
    let store = ctx.store.clone();
    match tokio::task::spawn_blocking(move || store.device_trust()).await {
        Ok(Ok(rows)) => apply_trust(ctx, seen, rows),
        Ok(Err(e)) => {
            error!(error = %e, "reading the stored trust verdicts failed; devices other replicas hold fail their posture here until the next change")
        }
        Err(e) => error!(error = %e, "trust read task failed"),
    }
}

/// Tells the registry which device sessions other live replicas hold (when that changed): a
/// device held elsewhere is online for its peers here and judged by its holder's verdict. A
/// replica whose heartbeat stopped holds nothing.
async fn share_sessions(ctx: &Arc<Ctx>, seen: &mut Seen) {
    let store = ctx.store.clone();
    let res = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((store.sessions()?, store.replicas()?))
    })
    .await;
    let (sessions, replicas) = match res {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return warn!(error = %e, "reading the sessions other replicas hold failed"),
        Err(e) => return warn!(error = %e, "sessions task failed"),
    };
    let held = replicas::remote_sessions(&sessions, &replicas, &seen.me, now_ms());
    if seen.remote_sessions.as_ref() != Some(&held) {
        seen.remote_sessions = Some(held.clone());
        ctx.events.send_internal(Event::RemoteSessions(held));
    }
}
