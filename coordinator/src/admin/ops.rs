//! The admin requests' business rules: one synchronous function per request over the
//! [`Store`], with what the registry must hear about as [`Notice`]s and the registry's live view
//! behind the [`Live`] trait, so every rule is testable with a temporary database.

use anyhow::{anyhow, bail, ensure, Result};
use rand::RngCore;

use ward_shared::names::{Hostname, Name};
use ward_shared::policy::{Compiled, Directory, Grant, Policy};
use ward_shared::posture::PostureReport;
use ward_shared::relay::{RelayCredential, RelayLoad};
use ward_shared::token::{hash_secret, EnrollToken};
use ward_shared::wire::{DeviceId, PostureVerdict, RelayInfo};

use super::api::{
    AdminReply, AuditVerifyView, DeviceDetail, DeviceTagsView, DeviceView, GrantView,
    PolicyShowView, PolicyVersionView, RelayAdded, RelayView, Rotating, StatusView, StoredPosture,
    TokenCreated, TokenView, TrustStatsView, UserAccess, UserGroupsView, UserView,
};
use super::AdminRequest;
use crate::audit::Action;
use crate::model::DeviceStatus;
use crate::model::{Device, User};
use crate::store::journal::Narrowing;
use crate::store::{Audit, GrantRow, LeaseRow, Quarantine, Store, StoreError, TokenSpec};

/// A registry snapshot taking longer than this is logged (the actor was busy).
const SLOW_SNAPSHOT: std::time::Duration = std::time::Duration::from_millis(250);

/// What the registry holds now (for listings, check, apply and explain).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Devices whose control session this replica holds.
    pub online: Vec<DeviceId>,
    /// Devices whose session another live replica of this instance holds.
    pub online_elsewhere: Vec<DeviceId>,
    pub directory: Directory,
    /// The registry's compile itself, shared (not copied per snapshot).
    pub compiled: std::sync::Arc<Compiled>,
    pub policy: Option<Policy>,
    pub trust: TrustStatsView,
    /// What the registry actor measures, for metrics.
    pub live: crate::metrics::LiveMetrics,
    /// Relays with a live control session, by name, with the load each last reported.
    pub relays: std::collections::BTreeMap<String, RelayLoad>,
    /// The registry actor's event queues.
    pub event_queue: crate::admin::api::EventQueueView,
    /// The relay each connected device last said it receives relayed traffic through.
    pub home_relays: std::collections::BTreeMap<DeviceId, String>,
    /// The devices forwarding routed prefixes now, with the prefixes.
    pub routers: Vec<ward_shared::policy::Router>,
    /// Devices with a behaviour risk above 0: the score and why.
    pub risks: std::collections::BTreeMap<DeviceId, (u8, String)>,
    /// Requirements a device fails only for want of a sign-in newer than its risk's rise
    /// (`risk_signin_above`), with the reason: device → requirement → "sign in again: …".
    pub sign_in_asks:
        std::collections::BTreeMap<DeviceId, std::collections::BTreeMap<String, String>>,
}

/// A change the registry must apply after a request succeeded.
#[derive(Debug, Clone)]
pub enum Notice {
    Device(Device),
    Removed(DeviceId, String),
    User(User),
    Grants(Vec<Grant>),
    /// A new policy, its stored version and the compile its check made (the registry uses it
    /// when it matches its own directory, else compiles).
    Policy(Policy, u64, Option<crate::registry::PolicyCompile>),
    /// Every registered relay, after one was added or removed.
    Relays(Vec<RelayInfo>),
    /// Every device's routes, after an approval changed.
    Routes(Vec<crate::store::RouteRow>),
    /// A device signed in (again) at the identity provider.
    SignIn(DeviceId, crate::oidc::core::SignIn),
    /// The identity provider took a user's access away (`Some(why)`) or gave it back.
    Identity(String, Option<String>),
}

/// The running registry, as the admin requests see it.
pub trait Live {
    fn snapshot(&self) -> Result<Snapshot>;
    /// The devices whose session a live replica holds (this one or another), without waiting
    /// for the registry to bring its compile up to date as [`Live::snapshot`] does.
    fn online(&self) -> Result<Vec<DeviceId>> {
        self.snapshot().map(|s| online_anywhere(&s))
    }
    /// The directory judged under a candidate policy's posture requirements.
    fn directory_for(&self, p: &Policy) -> Result<Directory>;
    /// A device's latest report and verdict.
    fn trust_view(&self, id: DeviceId) -> Result<(Option<PostureReport>, PostureVerdict)>;
    /// Asks a device to rotate its key now; whether it is connected.
    fn rotate(&self, id: DeviceId, why: &str) -> Result<bool>;
    /// Labels an anomaly (the registry's detector learns from it).
    fn ack_anomaly(
        &self,
        _id: u64,
        _label: crate::behaviour::Label,
    ) -> Result<crate::behaviour::Anomaly> {
        bail!("anomalies can be acknowledged only while the coordinator is serving")
    }
    fn notify(&self, n: Notice);
    /// Waits until every netmap change the registry has is handed to the sessions, or until
    /// `within` has passed; whether it settled. Work that can wait (the maturity record after
    /// a policy apply) waits for this so it does not compete with the push for the cores.
    fn settle(&self, within: std::time::Duration) -> bool {
        let _ = within;
        true
    }
}

/// Who this coordinator is, for `status` and for the tokens it mints.
#[derive(Debug, Clone)]
pub struct Identity {
    pub public_addr: String,
    /// The instance's other coordinator addresses (tokens carry them after `public_addr`).
    pub alternate_addrs: Vec<String>,
    pub ca_sha256: [u8; 32],
    /// `fd7a:…::/48`.
    pub ipv6_prefix: String,
    pub uptime_secs: u64,
    /// This replica's id.
    pub replica_id: String,
}

/// Every admin request's actor.
const ACTOR: &str = "admin";

/// How long `policy apply` waits for the push before recording the maturity assessment.
const SETTLE_BEFORE_RECORD: std::time::Duration = std::time::Duration::from_secs(5);

/// Handles one admin request.
pub fn handle(
    store: &dyn Store,
    live: &dyn Live,
    me: &Identity,
    rng: &mut dyn RngCore,
    req: AdminRequest,
    now: i64,
) -> Result<AdminReply> {
    // Narrowing changes the database could not take go in first; while they cannot, nothing
    // that widens access is accepted.
    if store.journal_pending() > 0 {
        if let Err(e) = store.flush_journal(now) {
            if widens(&req) {
                tracing::warn!(error = %e, "admin change refused: narrowing changes are waiting in the journal");
                bail!(
                    "refused: {} revocation(s)/disable(s)/quarantine(s) are waiting in the journal because \
                     the database cannot be written ({e}); changes that widen access are refused until it can \
                     (free space on the coordinator's disk)",
                    store.journal_pending()
                );
            }
        }
    }
    // Revocations, quarantines and disabled users take effect before anything waits on the
    // registry: its snapshot (an answer from the actor, which may be busy pushing netmaps)
    // only shapes their replies.
    let req = match req {
        AdminRequest::DeviceRevoke { name: n } => return device_revoke(store, live, n, now),
        AdminRequest::DeviceQuarantine { name: n, reason } => {
            return device_quarantine(store, live, n, reason, now)
        }
        AdminRequest::UserDisable { name: n } => {
            return Ok(AdminReply::UserAccess(set_user_disabled(
                store, live, &n, true, now,
            )?))
        }
        other => other,
    };
    let t = std::time::Instant::now();
    let snap = live.snapshot()?;
    if t.elapsed() >= SLOW_SNAPSHOT {
        tracing::info!(
            elapsed_ms = t.elapsed().as_millis(),
            "the registry's snapshot for an admin request was slow"
        );
    }
    let here = snap.online.as_slice();
    // A device is online for `device ls`/`show` when any live replica holds its session.
    let anywhere = online_anywhere(&snap);
    let online = anywhere.as_slice();
    Ok(match req {
        AdminRequest::Status => status(store, &snap, me, here.len(), now)?,
        AdminRequest::UserAdd { name: n, groups } => {
            let n = name("user name", &n)?;
            let groups = names("group name", &groups)?;
            let u = store.add_user(&n, &groups, ACTOR, now)?;
            live.notify(Notice::User(u.clone()));
            AdminReply::User(u.into())
        }
        AdminRequest::UserLs => {
            let oidc: std::collections::BTreeMap<String, crate::store::OidcUser> = store
                .oidc_users()?
                .into_iter()
                .map(|o| (o.user.clone(), o))
                .collect();
            AdminReply::Users(
                store
                    .list_users()?
                    .into_iter()
                    .map(|u| {
                        let o = oidc.get(&u.name).cloned();
                        let mut v = UserView::from(u);
                        if let Some(o) = o {
                            v.source = "oidc".into();
                            v.last_auth_ms = o.last_auth_ms;
                            v.last_refresh_ms = o.last_refresh_ms;
                            v.provider_reason = o.reason.filter(|_| o.provider_disabled);
                        }
                        v
                    })
                    .collect(),
            )
        }
        AdminRequest::UserEnable { name: n } => {
            AdminReply::UserAccess(set_user_disabled(store, live, &n, false, now)?)
        }
        AdminRequest::UserGroups {
            name: n,
            add,
            remove,
        } => {
            let user = name("user name", &n)?;
            let add = names("group name", &add)?;
            let remove = names("group name", &remove)?;
            let u = store.edit_user_groups(&user, &add, &remove, ACTOR, now)?;
            live.notify(Notice::User(u.clone()));
            AdminReply::UserGroups(UserGroupsView {
                user: n,
                groups: strings(&u.groups),
            })
        }
        AdminRequest::TokenCreate {
            user,
            tags,
            ttl_secs,
            uses,
            hostname,
        } => AdminReply::TokenCreated(token_create(
            store, me, rng, user, tags, ttl_secs, uses, hostname, now,
        )?),
        AdminRequest::TokenLs => AdminReply::Tokens(
            store
                .list_tokens()?
                .into_iter()
                .map(TokenView::from)
                .collect(),
        ),
        AdminRequest::TokenRevoke { id } => {
            AdminReply::Token(store.revoke_token(&id, ACTOR, now)?.into())
        }
        AdminRequest::DeviceRoutes {
            name: n,
            approve,
            revoke,
        } => {
            let v6 = me
                .ipv6_prefix
                .parse::<ward_shared::routes::Prefix>()
                .map_err(|e| anyhow!("coordinator's IPv6 prefix: {e}"))?;
            let std::net::IpAddr::V6(v6) = v6.addr() else {
                bail!("coordinator's IPv6 prefix is not IPv6");
            };
            AdminReply::DeviceRoutes(super::routes::device_routes(
                store, live, &snap, v6, &n, &approve, &revoke, ACTOR, now,
            )?)
        }
        AdminRequest::DeviceLs => {
            let leases = LeaseInfo::load(store, now)?;
            AdminReply::Devices(
                store
                    .list_devices()?
                    .iter()
                    .map(|d| DeviceView {
                        relay: snap.home_relays.get(&d.id).cloned(),
                        ..device_view(d, online, &leases)
                    })
                    .collect(),
            )
        }
        AdminRequest::DeviceShow { name: n } => {
            let d = store.device_by_name(&n)?;
            let device = device_view(&d, online, &LeaseInfo::load(store, now)?);
            let (report, posture) = live.trust_view(d.id)?;
            let stored_posture = match report {
                Some(_) => None,
                None => store
                    .posture(d.id)?
                    .map(|(report, evaluation, at_ms)| StoredPosture {
                        report,
                        evaluation,
                        at_ms,
                    }),
            };
            let flows = store
                .flow_sources()?
                .into_iter()
                .find(|s| s.device == d.id)
                .map(|s| super::api::FlowSourceView::new(s, d.hostname.to_string()));
            let sign_in = store
                .sign_ins()?
                .into_iter()
                .find(|s| s.device == d.id)
                .map(|s| super::api::SignInView {
                    user: s.user,
                    at_ms: s.at_ms,
                    auth_time_ms: s.auth_time_ms,
                    amr: s.amr,
                });
            AdminReply::DeviceDetail(Box::new(DeviceDetail {
                device,
                posture,
                posture_report: report,
                stored_posture,
                flows,
                sign_in,
            }))
        }
        AdminRequest::DeviceQuarantine { .. }
        | AdminRequest::DeviceRevoke { .. }
        | AdminRequest::UserDisable { .. } => {
            bail!("internal error: a narrowing request reached the snapshot's handler")
        }
        AdminRequest::DeviceRelease { name: n } => {
            let d = store.device_by_name(&n)?;
            ensure!(d.quarantine.is_some(), "device {n:?} is not quarantined");
            let d = store.set_quarantine(d.id, None, ACTOR, now)?;
            live.notify(Notice::Device(d.clone()));
            AdminReply::Device(device_view(&d, online, &LeaseInfo::load(store, now)?))
        }
        AdminRequest::DeviceRotate { name: n } => {
            AdminReply::Rotating(device_rotate(store, live, &n, now)?)
        }
        AdminRequest::DeviceRename { name: n, new } => {
            let new = Hostname::parse(&new).map_err(|e| anyhow!("bad hostname {new:?}: {e}"))?;
            // A revoked device or a self-chosen name holding NEW is moved aside by the store:
            // the registry hears about it too.
            let holder = store.device_by_name(new.as_str()).ok();
            let d = store.rename_device(&n, &new, ACTOR, now)?;
            if let Some(h) = holder.filter(|h| h.id != d.id) {
                live.notify(Notice::Device(store.device(h.id)?));
            }
            live.notify(Notice::Device(d.clone()));
            tracing::info!(device = %d.id, old = %n, new = %d.hostname, "device renamed, name bound");
            AdminReply::Device(device_view(&d, online, &LeaseInfo::load(store, now)?))
        }
        AdminRequest::DeviceApprove { name: n } => {
            let d = store.approve_device_name(&n, ACTOR, now)?;
            live.notify(Notice::Device(d.clone()));
            tracing::info!(device = %d.id, hostname = %d.hostname, "device name bound");
            AdminReply::Device(device_view(&d, online, &LeaseInfo::load(store, now)?))
        }
        AdminRequest::DeviceTag {
            name: n,
            add,
            remove,
        } => {
            let add = names("tag", &add)?;
            let remove = names("tag", &remove)?;
            let d = store.edit_device_tags(&n, &add, &remove, ACTOR, now)?;
            live.notify(Notice::Device(d.clone()));
            AdminReply::DeviceTags(DeviceTagsView {
                device: n,
                tags: strings(&d.tags),
            })
        }
        AdminRequest::PolicyCheck {
            file_name,
            content_b64,
        } => AdminReply::Policy(super::policy::check(
            store,
            live,
            &snap,
            &file_name,
            &content_b64,
            false,
            now,
        )?),
        AdminRequest::PolicyApply {
            file_name,
            content_b64,
        } => {
            let (out, applied) = super::policy::check_applied(
                store,
                live,
                &snap,
                &file_name,
                &content_b64,
                true,
                now,
            )?;
            if let Some(a) = applied {
                // The assessment waits for the push: at 10,000 sessions it is most of a
                // second of CPU that would otherwise delay the devices' new netmaps.
                if !live.settle(SETTLE_BEFORE_RECORD) {
                    tracing::debug!("netmap push still under way; maturity recorded anyway");
                }
                // The policy is in force whatever happens here: a failed recording is logged.
                if let Err(e) = super::maturity::record_with(
                    store,
                    live,
                    &snap,
                    &format!("policy.apply v{}", a.version),
                    Some(&a),
                    now,
                ) {
                    tracing::error!(error = %format!("{e:#}"), "maturity assessment not recorded");
                }
            }
            AdminReply::Policy(out)
        }
        AdminRequest::PolicyShow => AdminReply::PolicyShow(match store.current_policy()? {
            Some(v) => PolicyShowView {
                version: Some(v.version),
                text: Some(v.text),
                created_ms: Some(v.created_ms),
                sha256: Some(v.sha256),
            },
            None => PolicyShowView {
                version: None,
                text: None,
                created_ms: None,
                sha256: None,
            },
        }),
        AdminRequest::PolicyHistory => AdminReply::PolicyHistory(
            store
                .policy_history()?
                .into_iter()
                .map(PolicyVersionView::from)
                .collect(),
        ),
        AdminRequest::PolicyVersion { version } => {
            let v = store
                .policy_history()?
                .into_iter()
                .find(|v| v.version == version)
                .ok_or_else(|| anyhow!("no policy version {version}"))?;
            AdminReply::PolicyShow(PolicyShowView {
                version: Some(v.version),
                text: Some(v.text),
                created_ms: Some(v.created_ms),
                sha256: Some(v.sha256),
            })
        }
        AdminRequest::PolicyExplain { src, dst } => {
            AdminReply::Explain(Box::new(match super::policy::routed_target(&dst, me) {
                Some((ip, proto, port, v6)) => super::policy::explain_routed(
                    snap.policy.as_ref(),
                    &snap.directory,
                    &snap.routers,
                    v6,
                    &src,
                    (ip, proto, port),
                    now,
                )?,
                None => {
                    let mut v = super::policy::explain(
                        snap.policy.as_ref(),
                        &snap.directory,
                        &src,
                        &dst,
                        now,
                    )?;
                    let risk = |id: DeviceId| snap.risks.get(&id).cloned().unwrap_or_default();
                    let ask = |id: DeviceId, req: &str| {
                        snap.sign_in_asks.get(&id).and_then(|m| m.get(req)).cloned()
                    };
                    super::policy::add_risk_checks(
                        &mut v,
                        snap.policy.as_ref(),
                        &snap.directory,
                        &risk,
                        &ask,
                    );
                    v
                }
            }))
        }
        AdminRequest::GrantAdd {
            from,
            to,
            for_secs,
            reason,
        } => AdminReply::Grant(grant_add(
            store,
            live,
            snap.policy.as_ref(),
            rng,
            GrantAsk {
                from,
                to,
                for_secs,
                reason,
            },
            now,
        )?),
        AdminRequest::GrantLs => AdminReply::Grants(
            store
                .active_grants(now)?
                .into_iter()
                .map(GrantView::from)
                .collect(),
        ),
        AdminRequest::GrantRm { id } => {
            let g = store.remove_grant(&id, ACTOR, now)?;
            live.notify(Notice::Grants(active_grants(store, now)?));
            AdminReply::Grant(g.into())
        }
        AdminRequest::RelayAdd { name, addr } => {
            AdminReply::RelayAdded(relay_add(store, live, me, rng, &name, &addr, now)?)
        }
        AdminRequest::RelayLs => AdminReply::Relays(
            store
                .relays()?
                .into_iter()
                .map(|r| {
                    let load = snap.relays.get(&r.name).cloned();
                    let mut v = RelayView::from(r);
                    if let Some(load) = load {
                        v.online = true;
                        v.devices = load.devices;
                        v.bytes_relayed = load.bytes_relayed;
                    }
                    v
                })
                .collect(),
        ),
        AdminRequest::RelayRm { name } => {
            let name = Name::parse("relay name", &name)?;
            let r = store.remove_relay(&name, ACTOR, now)?;
            live.notify(Notice::Relays(relays(store)?));
            AdminReply::Relay(r.into())
        }
        AdminRequest::Anomalies { device, since_secs } => {
            AdminReply::Anomalies(anomalies(store, device.as_deref(), since_secs, now)?)
        }
        AdminRequest::AnomalyAck { id, label } => {
            let a = live.ack_anomaly(id, label)?;
            let host = store
                .device(a.device)
                .map(|d| d.hostname.to_string())
                .unwrap_or_else(|_| a.device.to_string());
            store.append_audit(
                Audit {
                    actor: ACTOR,
                    action: Action::AnomalyAck,
                    target: &host,
                    detail: serde_json::json!({ "id": id, "label": label, "reason": a.reason }),
                },
                now,
            )?;
            tracing::info!(anomaly = id, device = %a.device, label = label.as_str(), "anomaly acknowledged");
            AdminReply::AnomalyAcked(anomaly_view(a, host))
        }
        AdminRequest::Audit { limit } => AdminReply::Audit(
            store
                .audit_log(limit.clamp(1, 100_000))?
                .into_iter()
                .map(Into::into)
                .collect(),
        ),
        AdminRequest::AuditVerify => {
            AdminReply::AuditVerify(AuditVerifyView::from(store.verify_audit()?))
        }
        AdminRequest::Flows(f) => AdminReply::Flows(Box::new(super::flows::flows(store, &f, now)?)),
        AdminRequest::FlowsTop { filter, by } => {
            AdminReply::FlowsTop(super::flows::flows_top(store, &filter, by, now)?)
        }
        AdminRequest::Maturity { explain } => AdminReply::Maturity(Box::new(
            super::maturity::maturity(store, live, &snap, explain, now)?,
        )),
        AdminRequest::MaturityHistory => {
            AdminReply::MaturityHistory(super::maturity::history(store)?)
        }
        AdminRequest::PolicySuggest(ask) => AdminReply::Suggest(Box::new(super::suggest::suggest(
            store,
            &snap.directory,
            &ask,
            false,
            now,
        )?)),
        AdminRequest::SuggestionsLs(ask) => AdminReply::Suggest(Box::new(super::suggest::suggest(
            store,
            &snap.directory,
            &ask,
            true,
            now,
        )?)),
        AdminRequest::PolicyReplay {
            file_name,
            content_b64,
            since_secs,
        } => AdminReply::Replay(Box::new(super::suggest::replay(
            store,
            live,
            &snap.directory,
            &file_name,
            &content_b64,
            since_secs,
            now,
        )?)),
        AdminRequest::ConsoleLink => {
            bail!(
                "the web console is off: start `ward-coordinator serve` with --console-listen ADDR"
            )
        }
        AdminRequest::AddrsSet { .. } => {
            bail!("the coordinator addresses are changed by `serve` itself (it owns the data directory)")
        }
        AdminRequest::SuggestionMark(ask) => {
            AdminReply::SuggestionMarked(super::suggest::mark(store, &snap.directory, &ask, now)?)
        }
    })
}

/// `token create`: a user's token or a tag-owned one, 1 s to 90 d, secret from `rng`.
#[allow(clippy::too_many_arguments)]
fn token_create(
    store: &dyn Store,
    me: &Identity,
    rng: &mut dyn RngCore,
    user: Option<String>,
    tags: Vec<String>,
    ttl_secs: u64,
    uses: i64,
    hostname: Option<String>,
    now: i64,
) -> Result<TokenCreated> {
    if ttl_secs == 0 || ttl_secs > 90 * 86400 {
        bail!("--ttl must be between 1s and 90d");
    }
    let user = user.map(|u| name("user name", &u)).transpose()?;
    let tags = names("tag", &tags)?;
    let hostname = hostname
        .map(|h| Hostname::parse(&h).map_err(|e| anyhow!("bad --hostname {h:?}: {e}")))
        .transpose()?;
    let mut id = [0u8; 8];
    let mut secret = vec![0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let tok = EnrollToken {
        coordinator: me.public_addr.clone(),
        alternates: me.alternate_addrs.clone(),
        ca_sha256: me.ca_sha256,
        id,
        secret: ward_shared::secret::Secret::new(secret.clone()),
    };
    let info = store.create_token(
        TokenSpec {
            id: &tok.id_hex(),
            secret_hash: hash_secret(&secret),
            user: user.as_ref(),
            tags: &tags,
            expires_ms: now + ttl_secs as i64 * 1000,
            uses,
            hostname: hostname.as_ref(),
        },
        ACTOR,
        now,
    )?;
    Ok(TokenCreated {
        token: tok.encode(),
        info: info.into(),
    })
}

fn set_user_disabled(
    store: &dyn Store,
    live: &dyn Live,
    n: &str,
    disabled: bool,
    now: i64,
) -> Result<UserAccess> {
    set_user_disabled_as(store, live, n, disabled, ACTOR, now)
}

/// Disables (or re-enables) a user on behalf of `actor` (an administrator, or the identity
/// provider) and tells the registry, which narrows the user's devices at once.
pub fn set_user_disabled_as(
    store: &dyn Store,
    live: &dyn Live,
    n: &str,
    disabled: bool,
    actor: &str,
    now: i64,
) -> Result<UserAccess> {
    let n = name("user name", n)?;
    let (ids, journaled) = match store.set_user_disabled(&n, disabled, actor, now) {
        Ok(ids) => (ids, false),
        Err(e) if disabled && e.is_storage_fault() => {
            // Disabling still takes effect: journaled, then applied in memory.
            journal(
                store,
                Narrowing::DisableUser {
                    user: n.to_string(),
                },
                &e,
                now,
            )?;
            let ids = store
                .list_devices()?
                .into_iter()
                .filter(|d| d.user.as_deref() == Some(n.as_str()))
                .map(|d| d.id)
                .collect();
            (ids, true)
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(mut u) = store
        .list_users()?
        .into_iter()
        .find(|u| u.name == n.as_str())
    {
        if journaled {
            u.disabled = true;
        }
        live.notify(Notice::User(u));
    }
    for id in &ids {
        if let Ok(mut d) = store.device(*id) {
            if journaled {
                d.user_disabled = true;
            }
            live.notify(Notice::Device(d));
        }
    }
    Ok(UserAccess {
        user: n.to_string(),
        disabled,
        devices: ids.len(),
    })
}

/// Keeps a narrowing change the database refused (`why`) in the journal.
fn journal(store: &dyn Store, change: Narrowing, why: &StoreError, now: i64) -> Result<()> {
    tracing::error!(error = %why, ?change, "the database cannot be written: journaling a narrowing change");
    store.journal_narrowing(change, now).map_err(|e| {
        anyhow!("the database cannot be written ({why}) and the journal failed too: {e}")
    })
}

/// `status`. It answers while the database is unreachable too (it is how an operator finds
/// out): the `database` section says so with the error, the device and user counts are this
/// replica's registry (as last loaded from the database) and the replica list is empty (the
/// heartbeats live in the database).
fn status(
    store: &dyn Store,
    snap: &Snapshot,
    me: &Identity,
    online: usize,
    now: i64,
) -> Result<AdminReply> {
    let database = store.database();
    let (devices, users, replicas) = if database.reachable {
        let replicas = store
            .replicas()?
            .into_iter()
            .map(|r| crate::admin::api::ReplicaView {
                alive: crate::replicas::alive(r.last_seen_ms, now),
                this: r.id == me.replica_id,
                id: r.id,
                address: r.address,
                sessions: r.sessions,
                started_ms: r.started_ms,
                last_seen_ms: r.last_seen_ms,
            })
            .collect();
        (
            store.list_devices()?.len(),
            store.list_users()?.len(),
            replicas,
        )
    } else {
        tracing::warn!(
            database = %database.location,
            error = database.error.as_deref().unwrap_or("-"),
            "status: the database is unreachable"
        );
        (
            snap.directory.devices.len(),
            snap.directory.users.len(),
            Vec::new(),
        )
    };
    Ok(AdminReply::Status(StatusView {
        public_addr: me.public_addr.clone(),
        ca_sha256: hex::encode(me.ca_sha256),
        ipv6_prefix: me.ipv6_prefix.clone(),
        devices,
        online,
        users,
        uptime_secs: me.uptime_secs,
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: ward_shared::wire::PROTOCOL_VERSION,
        posture: snap.trust.clone(),
        storage: store.storage_health(),
        event_queue: snap.event_queue.clone(),
        replica_id: me.replica_id.clone(),
        database,
        replicas,
    }))
}

/// Requests that can widen access: refused while narrowing changes wait in the journal.
fn widens(req: &AdminRequest) -> bool {
    matches!(
        req,
        AdminRequest::UserAdd { .. }
            | AdminRequest::UserEnable { .. }
            | AdminRequest::UserGroups { .. }
            | AdminRequest::TokenCreate { .. }
            | AdminRequest::DeviceRelease { .. }
            | AdminRequest::DeviceTag { .. }
            | AdminRequest::DeviceRename { .. }
            | AdminRequest::DeviceApprove { .. }
            | AdminRequest::DeviceRoutes { .. }
            | AdminRequest::PolicyApply { .. }
            | AdminRequest::GrantAdd { .. }
            | AdminRequest::RelayAdd { .. }
    )
}

/// `anomalies`: stored anomalies, newest last.
fn anomalies(
    store: &dyn Store,
    device: Option<&str>,
    since_secs: u64,
    now: i64,
) -> Result<Vec<super::api::AnomalyView>> {
    let only = match device {
        Some(n) => Some(store.device_by_name(n)?.id),
        None => None,
    };
    let since = now.saturating_sub(since_secs.saturating_mul(1000) as i64);
    let names: std::collections::BTreeMap<DeviceId, String> = store
        .list_devices()?
        .into_iter()
        .map(|d| (d.id, d.hostname.to_string()))
        .collect();
    let mut out = Vec::new();
    for text in store.anomalies(since)? {
        let a: crate::behaviour::Anomaly = match serde_json::from_str(&text) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "a stored anomaly does not parse; skipped");
                continue;
            }
        };
        if only.is_some_and(|d| d != a.device) {
            continue;
        }
        let host = names
            .get(&a.device)
            .cloned()
            .unwrap_or_else(|| a.device.to_string());
        out.push(anomaly_view(a, host));
    }
    Ok(out)
}

fn anomaly_view(a: crate::behaviour::Anomaly, device: String) -> super::api::AnomalyView {
    super::api::AnomalyView {
        id: a.id,
        device,
        at_ms: a.at_ms,
        kinds: a.kinds,
        score: a.score,
        reason: a.reason,
        label: a.label,
        over_threshold: a.over_threshold,
    }
}

/// Revokes device `n` for good: stored (or journaled when the database cannot take it) and
/// handed to the registry, which closes its session and removes it from every netmap.
fn device_revoke(store: &dyn Store, live: &dyn Live, n: String, now: i64) -> Result<AdminReply> {
    let d = match store.revoke_device(&n, ACTOR, now) {
        Ok(d) => d,
        Err(e) if e.is_storage_fault() => {
            // The revocation still takes effect: journaled, then applied in memory.
            let d = store.device_by_name(&n)?;
            ensure!(
                d.is_live() || d.user_disabled,
                "device {n:?} is already revoked"
            );
            journal(
                store,
                Narrowing::RevokeDevice { device: n.clone() },
                &e,
                now,
            )?;
            Device {
                status: DeviceStatus::Revoked,
                revoked_ms: Some(now),
                ..d
            }
        }
        Err(e) => return Err(e.into()),
    };
    live.notify(Notice::Removed(
        d.id,
        "the device has been revoked by an administrator".into(),
    ));
    tracing::info!(device = %d.id, hostname = %d.hostname, "device revoked");
    Ok(AdminReply::Device(device_view(
        &d,
        &[],
        &LeaseInfo::load(store, now)?,
    )))
}

/// Quarantines device `n`: stored (or journaled) and handed to the registry, which narrows
/// its access and rotates its key.
fn device_quarantine(
    store: &dyn Store,
    live: &dyn Live,
    n: String,
    reason: Option<String>,
    now: i64,
) -> Result<AdminReply> {
    let d = store.device_by_name(&n)?;
    ensure!(d.is_live(), "device {n:?} is not active");
    let q = Quarantine {
        since_ms: now,
        reason: reason.unwrap_or_else(|| "quarantined by an administrator".into()),
        automatic: false,
    };
    let d = match store.set_quarantine(d.id, Some(&q), ACTOR, now) {
        Ok(d) => d,
        Err(e) if e.is_storage_fault() => {
            // The quarantine still takes effect: journaled, then applied in memory.
            journal(
                store,
                Narrowing::QuarantineDevice {
                    device: n.clone(),
                    reason: q.reason.clone(),
                },
                &e,
                now,
            )?;
            Device {
                quarantine: Some(q),
                ..d
            }
        }
        Err(e) => return Err(e.into()),
    };
    live.notify(Notice::Device(d.clone()));
    // The reply's online state is asked of the registry only now: the quarantine is in
    // force whatever it is doing (a registry that cannot answer shows the device offline).
    // Not a snapshot: that would wait for the compile the quarantine starts, and hold the
    // registry's actor in it while the quarantine's narrowing is still going out.
    let online = live.online().unwrap_or_default();
    Ok(AdminReply::Device(device_view(
        &d,
        &online,
        &LeaseInfo::load(store, now)?,
    )))
}

/// Devices whose session a live replica holds (this one or another).
fn online_anywhere(snap: &Snapshot) -> Vec<DeviceId> {
    snap.online
        .iter()
        .chain(&snap.online_elsewhere)
        .copied()
        .collect()
}

/// `device rotate`: the device makes a new key now; its current leases stop being renewed.
/// Audited whether or not the device is connected; an offline device is an error.
fn device_rotate(store: &dyn Store, live: &dyn Live, n: &str, now: i64) -> Result<Rotating> {
    let d = store.device_by_name(n)?;
    ensure!(d.is_live(), "device {n:?} is not active");
    let online = live.rotate(d.id, "rotation requested by an administrator")?;
    store.append_audit(
        Audit {
            actor: ACTOR,
            action: Action::DeviceRotate,
            target: d.hostname.as_str(),
            detail: serde_json::json!({ "online": online }),
        },
        now,
    )?;
    if !online {
        bail!(
            "device {n:?} is not connected; it will get a fresh key and lease when it reconnects"
        );
    }
    Ok(Rotating {
        device: n.to_string(),
        rotating: true,
    })
}

/// What `grant add` asks for.
struct GrantAsk {
    from: String,
    to: String,
    for_secs: u64,
    reason: Option<String>,
}

/// `grant add`: 1 s to 7 d, to a service the applied policy has, for a known user or device.
fn grant_add(
    store: &dyn Store,
    live: &dyn Live,
    policy: Option<&Policy>,
    rng: &mut dyn RngCore,
    ask: GrantAsk,
    now: i64,
) -> Result<GrantView> {
    let GrantAsk {
        from,
        to,
        for_secs,
        reason,
    } = ask;
    ensure!(
        (1..=7 * 86400).contains(&for_secs),
        "--for must be between 1s and 7d"
    );
    let p = policy
        .ok_or_else(|| anyhow!("no policy is applied, so there is no service {to:?} to grant"))?;
    ensure!(
        p.services.contains_key(&to),
        "the policy has no service named {to:?}"
    );
    match from.strip_prefix("device:") {
        Some(host) => {
            // `device:NAME` names only a bound name; a grant to a self-chosen one would grant
            // nothing, so it is refused with the way out.
            let d = store.device_by_name(host)?;
            ensure!(
                d.name_bound,
                "name `{host}` is self-chosen; bind it with `device approve` or a token's --hostname"
            );
        }
        None => {
            let n = name("user name", &from)?;
            ensure!(
                store.list_users()?.iter().any(|u| u.name == n.as_str()),
                "no user named {from:?} (use device:NAME for a device)"
            );
        }
    }
    let reason = reason.map(|r| {
        r.chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect::<String>()
    });
    let mut idb = [0u8; 6];
    rng.fill_bytes(&mut idb);
    let g = GrantRow {
        id: format!("g{}", hex::encode(idb)),
        principal: from,
        service: to,
        not_after_ms: now + for_secs as i64 * 1000,
        reason,
        actor: ACTOR.to_string(),
        created_ms: now,
    };
    store.add_grant(&g, now)?;
    live.notify(Notice::Grants(active_grants(store, now)?));
    Ok(g.into())
}

/// Registers a relay with a fresh 32-byte secret (only its SHA-256 is stored) and returns the
/// credential the relay runs with: this coordinator's public address and the instance's other
/// replicas' (as many as fit), its CA fingerprint, the relay's name and the secret.
fn relay_add(
    store: &dyn Store,
    live: &dyn Live,
    me: &Identity,
    rng: &mut dyn RngCore,
    name: &str,
    addr: &str,
    now: i64,
) -> Result<RelayAdded> {
    ensure!(
        ward_shared::relay::valid_relay_name(name),
        "relay name {:?}: 1 to 63 of a-z 0-9 -, not starting or ending with - (it becomes a DNS label)",
        ward_shared::names::shorten(name)
    );
    let name = Name::parse("relay name", name)?;
    let addr = relay_addr(addr)?;
    let mut secret = vec![0u8; 32];
    rng.fill_bytes(&mut secret);
    let r = store.add_relay(&name, &addr, &hash_secret(&secret), ACTOR, now)?;
    live.notify(Notice::Relays(relays(store)?));
    let credential = RelayCredential {
        coordinator: RelayCredential::join_coordinators(&me.public_addr, &me.alternate_addrs),
        ca_sha256: me.ca_sha256,
        name: name.to_string(),
        secret: ward_shared::secret::Secret::new(secret),
    };
    Ok(RelayAdded {
        credential: credential.encode(),
        relay: r.into(),
    })
}

/// Every registered relay, as netmaps carry them.
pub fn relays(store: &dyn Store) -> Result<Vec<RelayInfo>> {
    Ok(store
        .relays()?
        .into_iter()
        .map(|r| RelayInfo {
            name: r.name,
            addr: r.addr,
        })
        .collect())
}

/// A relay's `HOST:PORT`: an IPv4 address, a bracketed IPv6 address or a DNS name, and a port
/// from 1 to 65535. Returned as given (a DNS name lowercased), since devices resolve it.
fn relay_addr(s: &str) -> Result<String> {
    let bad = |why: &str| {
        anyhow!(
            "relay address {:?}: {why} (want HOST:PORT, IPv6 as [ADDR]:PORT)",
            ward_shared::names::shorten(s)
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
    ensure!(port != 0, bad("the port is not a number from 1 to 65535"));
    if let Some(inner) = host.strip_prefix('[') {
        let v6 = inner
            .strip_suffix(']')
            .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
            .ok_or_else(|| bad("not an IPv6 address in brackets"))?;
        return Ok(format!("[{v6}]:{port}"));
    }
    if host.contains(':') {
        bail!(bad("an IPv6 address needs brackets"));
    }
    if let Ok(v4) = host.parse::<std::net::Ipv4Addr>() {
        return Ok(format!("{v4}:{port}"));
    }
    let host = host.to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let name = host.strip_suffix('.').unwrap_or(&host);
    ensure!(
        !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok),
        bad("not an IP address or DNS name")
    );
    // A name of digits and dots only is a malformed IPv4 address, not a DNS name.
    ensure!(
        !name.bytes().all(|b| b.is_ascii_digit() || b == b'.'),
        bad("not an IPv4 address")
    );
    Ok(format!("{host}:{port}"))
}

/// The active grants as the registry takes them.
pub fn active_grants(store: &dyn Store, now: i64) -> Result<Vec<Grant>> {
    Ok(store.active_grants(now)?.iter().map(grant_of).collect())
}

pub fn grant_of(g: &GrantRow) -> Grant {
    Grant {
        id: g.id.clone(),
        from: g.principal.clone(),
        to: g.service.clone(),
        not_after_ms: g.not_after_ms,
        reason: g.reason.clone(),
    }
}

fn name(kind: &'static str, s: &str) -> Result<Name> {
    Ok(Name::parse(kind, s)?)
}

fn names(kind: &'static str, s: &[String]) -> Result<Vec<Name>> {
    s.iter().map(|x| name(kind, x)).collect()
}

fn strings(names: &[Name]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// Active leases and how many each device was ever issued.
struct LeaseInfo {
    active: Vec<LeaseRow>,
    counts: std::collections::BTreeMap<DeviceId, i64>,
}

impl LeaseInfo {
    fn load(store: &dyn Store, now: i64) -> Result<Self> {
        Ok(Self {
            active: store.active_leases(now)?,
            counts: store.lease_counts()?,
        })
    }
}

fn device_view(d: &Device, online: &[DeviceId], leases: &LeaseInfo) -> DeviceView {
    let mine: Vec<&LeaseRow> = leases
        .active
        .iter()
        .filter(|l| l.device_id == d.id)
        .collect();
    DeviceView {
        id: d.id.to_string(),
        hostname: d.hostname.clone(),
        name_bound: d.name_bound,
        user: d.user.clone(),
        user_disabled: d.user_disabled,
        tags: strings(&d.tags),
        ipv4: d.ipv4,
        ipv6: d.ipv6,
        os: d.os.clone(),
        status: d.status,
        created_ms: d.created_ms,
        last_seen_ms: d.last_seen_ms,
        cert_not_after_ms: d.cert_not_after_ms,
        revoked_ms: d.revoked_ms,
        wg_public_key: d.wg_public_key,
        endpoints: d.endpoints.clone(),
        quarantine: d.quarantine.clone(),
        lease_expires_ms: mine.iter().map(|l| l.not_after_ms).max(),
        lease_serial: mine.iter().map(|l| l.serial).max(),
        lease_key: mine
            .iter()
            .max_by_key(|l| l.serial)
            .map(|l| l.wg_public_key.to_base64()),
        lease_issued_ms: mine
            .iter()
            .max_by_key(|l| l.serial)
            .map(|l| l.not_before_ms),
        relay: None,
        rotations: leases
            .counts
            .get(&d.id)
            .map(|c| (c - 1).max(0))
            .unwrap_or(0),
        online: online.contains(&d.id),
        state: d.state(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EnrollSpec, SqliteStore};
    use rand::SeedableRng;
    use std::cell::{Cell, RefCell};
    use ward_shared::addr::AddressPools;
    use ward_shared::names::Hostname;

    struct FakeLive {
        policy: Option<Policy>,
        online: bool,
        notices: RefCell<Vec<Notice>>,
        rotations: Cell<usize>,
        relays: std::collections::BTreeMap<String, RelayLoad>,
        /// The registry's users and devices in its snapshot.
        directory: Directory,
        /// The registry cannot answer (its actor is gone or stuck).
        mute: bool,
        /// Snapshots asked for.
        snapshots: Cell<u32>,
        /// Devices `online` names.
        online_ids: Vec<DeviceId>,
    }

    impl FakeLive {
        fn new(policy: Option<&str>) -> Self {
            Self {
                policy: policy.map(|p| ward_shared::policy::parse(p.as_bytes(), "t.toml").unwrap()),
                online: false,
                mute: false,
                snapshots: Cell::new(0),
                online_ids: vec![],
                notices: RefCell::new(vec![]),
                rotations: Cell::new(0),
                relays: Default::default(),
                directory: Directory::default(),
            }
        }
        fn take(&self) -> Vec<Notice> {
            std::mem::take(&mut self.notices.borrow_mut())
        }
    }

    impl Live for FakeLive {
        fn snapshot(&self) -> Result<Snapshot> {
            ensure!(!self.mute, "the registry does not answer");
            self.snapshots.set(self.snapshots.get() + 1);
            Ok(Snapshot {
                policy: self.policy.clone(),
                relays: self.relays.clone(),
                directory: self.directory.clone(),
                ..Snapshot::default()
            })
        }
        fn online(&self) -> Result<Vec<DeviceId>> {
            ensure!(!self.mute, "the registry does not answer");
            Ok(self.online_ids.clone())
        }
        fn directory_for(&self, _: &Policy) -> Result<Directory> {
            Ok(Directory::default())
        }
        fn trust_view(&self, _: DeviceId) -> Result<(Option<PostureReport>, PostureVerdict)> {
            Ok((None, PostureVerdict::default()))
        }
        fn rotate(&self, _: DeviceId, _: &str) -> Result<bool> {
            self.rotations.set(self.rotations.get() + 1);
            Ok(self.online)
        }
        fn notify(&self, n: Notice) {
            self.notices.borrow_mut().push(n);
        }
    }

    #[test]
    fn status_answers_while_the_database_is_unreachable_and_says_so() {
        use crate::store::postgres::testpg;
        if !testpg::available() {
            return;
        }
        let cluster = testpg::Cluster::start();
        let mut w = World::new();
        w.store = SqliteStore::open_postgres(&cluster.create_database(), None).unwrap();
        let mut live = FakeLive::new(None);
        w.user(&live, "alice");
        let AdminReply::Status(up) = w.run(&live, AdminRequest::Status).unwrap() else {
            panic!("not a status")
        };
        assert!(
            up.database.reachable && up.database.error.is_none(),
            "{up:?}"
        );
        assert_eq!(up.users, 1);
        assert!(!up.lines().iter().any(|l| l.contains("UNREACHABLE")));
        // The registry's view, as the replica last loaded it: alice.
        live.directory.users = vec![ward_shared::policy::DirUser {
            name: "alice".into(),
            groups: vec![],
            disabled: false,
            suspended: None,
        }];
        cluster.pg_stop();
        let AdminReply::Status(down) = w.run(&live, AdminRequest::Status).unwrap() else {
            panic!("not a status")
        };
        assert!(!down.database.reachable, "{down:?}");
        assert!(down.database.error.is_some(), "{down:?}");
        assert_eq!(down.database.backend, "postgres");
        let line = down
            .lines()
            .into_iter()
            .find(|l| l.starts_with("database"))
            .unwrap();
        assert!(
            line.contains("UNREACHABLE") && line.contains("error="),
            "{line}"
        );
        assert_eq!((down.users, down.devices), (1, 0));
        assert!(down.replicas.is_empty());
        // Everything else still fails closed: a write is refused with a database error.
        let e = err(w.run(
            &live,
            AdminRequest::UserAdd {
                name: "bob".into(),
                groups: vec![],
            },
        ));
        assert!(e.contains("postgresql"), "{e}");
    }

    const POLICY: &str = "[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/5432\"]\n";

    struct World {
        store: SqliteStore,
        me: Identity,
        rng: rand::rngs::StdRng,
    }

    impl World {
        fn new() -> Self {
            let store = SqliteStore::open_in_memory().unwrap();
            Self {
                store,
                me: Identity {
                    public_addr: "coord.example:7443".into(),
                    alternate_addrs: vec!["coord2.example:7443".into()],
                    ca_sha256: [7; 32],
                    ipv6_prefix: "fd7a::/48".into(),
                    uptime_secs: 5,
                    replica_id: "r1".into(),
                },
                rng: rand::rngs::StdRng::seed_from_u64(1),
            }
        }
        fn run(&mut self, live: &FakeLive, req: AdminRequest) -> Result<AdminReply> {
            handle(&self.store, live, &self.me, &mut self.rng, req, 1_000_000)
        }
        fn user(&mut self, live: &FakeLive, n: &str) {
            self.run(
                live,
                AdminRequest::UserAdd {
                    name: n.into(),
                    groups: vec!["eng".into()],
                },
            )
            .unwrap();
        }
        /// A device enrolled with a fresh token of `user` or `tags`.
        fn device(&mut self, live: &FakeLive, host: &str, user: Option<&str>, tags: &[&str]) {
            let AdminReply::TokenCreated(t) = self.run(live, token(user, tags, 3600)).unwrap()
            else {
                panic!("not a token")
            };
            let tok = EnrollToken::parse(&t.token).unwrap();
            self.store
                .enroll(
                    EnrollSpec {
                        token_id: &tok.id_hex(),
                        token_secret: tok.secret.expose(),
                        hostname: Hostname::sanitize(host).unwrap(),
                        os: "linux".into(),
                        identity_hash: [host.len() as u8; 32],
                    },
                    &AddressPools::from_random([1, 2, 3, 4, 5]),
                    &mut |_| Ok((vec![1], 99)),
                    1_000_001,
                )
                .unwrap();
        }
    }

    fn token(user: Option<&str>, tags: &[&str], ttl_secs: u64) -> AdminRequest {
        AdminRequest::TokenCreate {
            user: user.map(Into::into),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ttl_secs,
            uses: 1,
            hostname: None,
        }
    }

    fn err(r: Result<AdminReply>) -> String {
        match r {
            Ok(v) => panic!("expected a refusal, got {v:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn token_minting_with_user_or_tags() {
        let (mut w, live) = (World::new(), FakeLive::new(None));
        w.user(&live, "alice");
        let AdminReply::TokenCreated(t) = w.run(&live, token(Some("alice"), &[], 60)).unwrap()
        else {
            panic!()
        };
        assert_eq!(t.info.user.as_deref(), Some("alice"));
        assert!(t.info.tags.is_empty());
        assert_eq!(t.info.expires_ms, 1_000_000 + 60_000);
        let parsed = EnrollToken::parse(&t.token).unwrap();
        assert_eq!(parsed.coordinator, "coord.example:7443");
        assert_eq!(parsed.ca_sha256, [7; 32]);
        assert_eq!(parsed.id_hex(), t.info.id);

        let AdminReply::TokenCreated(t) = w.run(&live, token(None, &["server"], 60)).unwrap()
        else {
            panic!()
        };
        assert_eq!(t.info.user, None);
        assert_eq!(t.info.tags, vec!["server".to_string()]);

        assert!(
            err(w.run(&live, token(None, &[], 60))).contains("--user NAME or at least one --tag")
        );
        assert!(err(w.run(&live, token(Some("alice"), &[], 0))).contains("between 1s and 90d"));
        assert!(err(w.run(&live, token(Some("alice"), &[], 90 * 86400 + 1))).contains("90d"));
        assert!(err(w.run(&live, token(Some("nobody"), &[], 60))).contains("no user"));
        err(w.run(&live, token(None, &["Not A Tag"], 60)));
        w.run(
            &live,
            AdminRequest::UserDisable {
                name: "alice".into(),
            },
        )
        .unwrap();
        assert!(err(w.run(&live, token(Some("alice"), &[], 60))).contains("disabled"));
        let AdminReply::Tokens(all) = w.run(&live, AdminRequest::TokenLs).unwrap() else {
            panic!()
        };
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn tag_edits_merge_and_notify() {
        let (mut w, live) = (World::new(), FakeLive::new(None));
        w.device(&live, "web1", None, &["web"]);
        live.take();
        let tag = |add: &[&str], remove: &[&str]| AdminRequest::DeviceTag {
            name: "web1".into(),
            add: add.iter().map(|s| s.to_string()).collect(),
            remove: remove.iter().map(|s| s.to_string()).collect(),
        };
        let AdminReply::DeviceTags(v) = w.run(&live, tag(&["db", "web"], &[])).unwrap() else {
            panic!()
        };
        assert_eq!(v.tags, vec!["web".to_string(), "db".to_string()]);
        assert!(matches!(&live.take()[..], [Notice::Device(d)] if d.tags.len() == 2));
        let AdminReply::DeviceTags(v) = w.run(&live, tag(&["x"], &["web"])).unwrap() else {
            panic!()
        };
        assert_eq!(v.tags, vec!["db".to_string(), "x".to_string()]);
        assert_eq!(live.take().len(), 1);
        err(w.run(&live, tag(&["Bad Tag"], &[])));
        assert!(err(w.run(
            &live,
            AdminRequest::DeviceTag {
                name: "nope".into(),
                add: vec!["a".into()],
                remove: vec![]
            }
        ))
        .contains("no device"));
        assert!(
            live.take().is_empty(),
            "a refusal tells the registry nothing"
        );
    }

    #[test]
    fn relay_add_ls_rm() {
        let mut w = World::new();
        let live = FakeLive::new(None);
        let add = |name: &str, addr: &str| AdminRequest::RelayAdd {
            name: name.into(),
            addr: addr.into(),
        };
        let AdminReply::RelayAdded(a) = w.run(&live, add("r1", "relay.Example.com:3478")).unwrap()
        else {
            panic!()
        };
        // The credential names this coordinator, its CA and the relay; only the secret's
        // hash is stored.
        let cred = RelayCredential::parse(&a.credential).unwrap();
        // Every replica's address, this one first: a relay whose replica dies joins another.
        assert_eq!(cred.coordinator, "coord.example:7443,coord2.example:7443");
        assert_eq!(
            cred.coordinators(),
            ["coord.example:7443", "coord2.example:7443"]
        );
        assert_eq!(cred.ca_sha256, [7; 32]);
        assert_eq!(cred.name, "r1");
        assert_eq!(cred.secret.expose().len(), 32);
        assert_eq!(
            w.store.relay_secret_hash("r1").unwrap(),
            Some(hash_secret(cred.secret.expose()))
        );
        assert_eq!(w.store.relay_secret_hash("nope").unwrap(), None);
        let r = a.relay;
        assert!(!r.online);
        assert_eq!(
            (r.name.as_str(), r.addr.as_str()),
            ("r1", "relay.example.com:3478")
        );
        assert_eq!(r.created_ms, 1_000_000);
        let [Notice::Relays(list)] = &live.take()[..] else {
            panic!("one relay notice")
        };
        assert_eq!(list.len(), 1);
        let AdminReply::RelayAdded(r6) = w.run(&live, add("r2", "[2001:DB8::1]:3478")).unwrap()
        else {
            panic!()
        };
        assert_eq!(r6.relay.addr, "[2001:db8::1]:3478");
        // Every relay gets its own secret.
        assert_ne!(
            RelayCredential::parse(&r6.credential).unwrap().secret,
            cred.secret
        );
        w.run(&live, add("r0", "192.0.2.7:1")).unwrap();
        assert!(
            matches!(&live.take()[..], [Notice::Relays(l1), Notice::Relays(l2)]
            if l1.len() == 2 && l2.len() == 3)
        );

        // Refusals change nothing and tell nobody.
        assert!(err(w.run(&live, add("r1", "192.0.2.1:3478"))).contains("already exists"));
        for bad_name in ["", "R1", "has space", &"x".repeat(65), "a.b", "-a", "a@b"] {
            assert!(err(w.run(&live, add(bad_name, "192.0.2.1:3478"))).contains("relay name"));
        }
        for bad_addr in [
            "relay.example.com",
            "relay.example.com:",
            "relay.example.com:0",
            "relay.example.com:65536",
            "relay.example.com:x",
            "2001:db8::1:3478",
            "[2001:db8::1]",
            "[192.0.2.1]:3478",
            "[nope]:1",
            "256.1.1.1:3478",
            "-bad.example:1",
            "a..b:1",
            ":3478",
            "under_score.example:1",
        ] {
            assert!(
                err(w.run(&live, add("r9", bad_addr))).contains("relay address"),
                "{bad_addr}"
            );
        }
        assert!(live.take().is_empty());

        let AdminReply::Relays(all) = w.run(&live, AdminRequest::RelayLs).unwrap() else {
            panic!()
        };
        let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["r0", "r1", "r2"]);
        assert!(all.iter().all(|r| !r.online && r.devices == 0));
        // A relay with a control session shows online with the load it reported.
        let mut online = FakeLive::new(None);
        online.relays.insert(
            "r1".into(),
            RelayLoad {
                devices: 3,
                bytes_relayed: 4096,
                ..RelayLoad::default()
            },
        );
        let AdminReply::Relays(all) = w.run(&online, AdminRequest::RelayLs).unwrap() else {
            panic!()
        };
        let json = serde_json::to_value(&all).unwrap();
        assert_eq!(json[1]["name"], "r1");
        assert_eq!(json[1]["addr"], "relay.example.com:3478");
        assert_eq!(json[1]["created_ms"], 1_000_000);
        assert_eq!(json[1]["online"], true);
        assert_eq!(json[1]["devices"], 3);
        assert_eq!(json[1]["bytes_relayed"], 4096);
        assert_eq!(json[0]["online"], false);
        assert_eq!(json[0]["devices"], 0);
        assert_eq!(json[0]["bytes_relayed"], 0);

        let AdminReply::Relay(gone) = w
            .run(&live, AdminRequest::RelayRm { name: "r1".into() })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(gone.addr, "relay.example.com:3478");
        assert!(
            matches!(&live.take()[..], [Notice::Relays(l)] if l.len() == 2
            && l.iter().all(|r| r.name != "r1"))
        );
        assert!(
            err(w.run(&live, AdminRequest::RelayRm { name: "r1".into() })).contains("no relay")
        );
        let actions: Vec<String> = w
            .store
            .audit_log(100)
            .unwrap()
            .into_iter()
            .filter(|e| e.action.starts_with("relay."))
            .map(|e| format!("{} {}", e.action, e.target))
            .collect();
        assert_eq!(
            actions
                .iter()
                .filter(|a| a.starts_with("relay.add"))
                .count(),
            3,
            "{actions:?}"
        );
        assert!(
            actions.contains(&"relay.remove r1".to_string()),
            "{actions:?}"
        );
        assert!(w.store.verify_audit().unwrap().ok);
    }

    /// `device approve` binds the current name and `device rename` a new one, each notifying
    /// the registry; a name another active device holds bound is refused, a grant to a
    /// self-chosen name is refused with the way out.
    #[test]
    fn rename_and_approve_bind_names() {
        let (mut w, live) = (World::new(), FakeLive::new(Some(POLICY)));
        w.user(&live, "alice");
        w.device(&live, "ci-runner", Some("alice"), &[]);
        w.device(&live, "db1", None, &["db"]);
        live.take();
        let grant = AdminRequest::GrantAdd {
            from: "device:ci-runner".into(),
            to: "db".into(),
            for_secs: 60,
            reason: None,
        };
        assert!(err(w.run(&live, grant.clone())).contains("name `ci-runner` is self-chosen"));
        let AdminReply::Device(v) = w
            .run(
                &live,
                AdminRequest::DeviceApprove {
                    name: "ci-runner".into(),
                },
            )
            .unwrap()
        else {
            panic!()
        };
        assert!(v.name_bound);
        assert!(matches!(&live.take()[..], [Notice::Device(d)] if d.name_bound));
        w.run(&live, grant).unwrap();
        live.take();
        assert!(err(w.run(
            &live,
            AdminRequest::DeviceApprove {
                name: "ci-runner".into()
            }
        ))
        .contains("already bound"));
        // db1 is bound now too; renaming ci-runner onto it is refused.
        w.run(&live, AdminRequest::DeviceApprove { name: "db1".into() })
            .unwrap();
        live.take();
        let rename = |name: &str, new: &str| AdminRequest::DeviceRename {
            name: name.into(),
            new: new.into(),
        };
        assert!(err(w.run(&live, rename("ci-runner", "db1")))
            .contains("bound to another active device"));
        assert!(err(w.run(&live, rename("ci-runner", "Bad Name!"))).contains("bad hostname"));
        assert!(live.take().is_empty());
        let AdminReply::Device(v) = w.run(&live, rename("ci-runner", "runner-1")).unwrap() else {
            panic!()
        };
        assert_eq!((v.hostname.as_str(), v.name_bound), ("runner-1", true));
        assert!(
            matches!(&live.take()[..], [Notice::Device(d)] if d.hostname.as_str() == "runner-1")
        );
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["name_bound"], serde_json::Value::Bool(true));
        let log = w.store.audit_log(100).unwrap();
        assert!(log
            .iter()
            .any(|e| e.action == "device.rename" && e.target == "ci-runner"));
        assert_eq!(
            log.iter().filter(|e| e.action == "device.approve").count(),
            2
        );
    }

    #[test]
    fn grant_checks() {
        let (mut w, live) = (World::new(), FakeLive::new(Some(POLICY)));
        w.user(&live, "alice");
        w.device(&live, "db1", None, &["db"]);
        // `device:NAME` grants name bound names only.
        w.run(&live, AdminRequest::DeviceApprove { name: "db1".into() })
            .unwrap();
        live.take();
        let grant = |from: &str, to: &str, for_secs: u64| AdminRequest::GrantAdd {
            from: from.into(),
            to: to.into(),
            for_secs,
            reason: Some("on call\u{7}\n".into()),
        };
        let AdminReply::Grant(g) = w.run(&live, grant("alice", "db", 3600)).unwrap() else {
            panic!()
        };
        assert_eq!((g.principal.as_str(), g.service.as_str()), ("alice", "db"));
        assert_eq!(g.not_after_ms, 1_000_000 + 3_600_000);
        assert_eq!(g.reason.as_deref(), Some("on call"));
        assert!(g.id.starts_with('g') && g.id.len() == 13);
        assert!(matches!(&live.take()[..], [Notice::Grants(gs)] if gs.len() == 1));
        w.run(&live, grant("device:db1", "db", 60)).unwrap();

        assert!(err(w.run(&live, grant("alice", "db", 0))).contains("between 1s and 7d"));
        assert!(err(w.run(&live, grant("alice", "db", 7 * 86400 + 1))).contains("7d"));
        assert!(err(w.run(&live, grant("alice", "ssh", 60))).contains("no service named"));
        assert!(err(w.run(&live, grant("bob", "db", 60))).contains("no user named"));
        assert!(err(w.run(&live, grant("device:nope", "db", 60))).contains("no device"));
        let no_policy = FakeLive::new(None);
        assert!(err(w.run(&no_policy, grant("alice", "db", 60))).contains("no policy is applied"));

        let AdminReply::Grants(all) = w.run(&live, AdminRequest::GrantLs).unwrap() else {
            panic!()
        };
        assert_eq!(all.len(), 2);
        w.run(&live, AdminRequest::GrantRm { id: g.id.clone() })
            .unwrap();
        assert!(err(w.run(&live, AdminRequest::GrantRm { id: g.id })).contains("no active grant"));
    }

    #[test]
    fn narrowing_does_not_wait_on_the_registry() {
        let (mut w, mut live) = (World::new(), FakeLive::new(None));
        w.user(&live, "alice");
        w.user(&live, "bob");
        w.device(&live, "lap", Some("alice"), &[]);
        w.device(&live, "desk", Some("alice"), &[]);
        live.mute = true;
        // Widening or reading needs the registry's answer: refused.
        assert!(err(w.run(&live, AdminRequest::DeviceLs)).contains("does not answer"));
        live.notices.borrow_mut().clear();
        let AdminReply::Device(d) = w
            .run(&live, AdminRequest::DeviceRevoke { name: "lap".into() })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(d.state, crate::model::DeviceState::Revoked);
        let AdminReply::Device(d) = w
            .run(
                &live,
                AdminRequest::DeviceQuarantine {
                    name: "desk".into(),
                    reason: None,
                },
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(d.state, crate::model::DeviceState::Quarantined);
        w.run(&live, AdminRequest::UserDisable { name: "bob".into() })
            .unwrap();
        let notices = live.notices.borrow();
        assert!(matches!(notices[0], Notice::Removed(..)), "{notices:?}");
        assert!(matches!(&notices[1], Notice::Device(d) if d.quarantine.is_some()));
        assert!(matches!(&notices[2], Notice::User(u) if u.disabled));
    }

    /// A quarantine's reply says whether the device is online without a registry snapshot,
    /// which would wait for the compile the quarantine starts.
    #[test]
    fn a_quarantine_reply_asks_who_is_online_not_for_a_snapshot() {
        let (mut w, mut live) = (World::new(), FakeLive::new(None));
        w.user(&live, "alice");
        w.device(&live, "lap", Some("alice"), &[]);
        let id = w.store.device_by_name("lap").unwrap().id;
        live.online_ids = vec![id];
        let before = live.snapshots.get();
        let quarantine = AdminRequest::DeviceQuarantine {
            name: "lap".into(),
            reason: Some("lost".into()),
        };
        let AdminReply::Device(d) = w.run(&live, quarantine).unwrap() else {
            panic!("not a device")
        };
        assert_eq!(d.state, crate::model::DeviceState::Quarantined);
        assert!(d.online);
        assert_eq!(live.snapshots.get(), before, "no snapshot asked for");
        // A listing still takes a snapshot.
        w.run(&live, AdminRequest::DeviceLs).unwrap();
        assert_eq!(live.snapshots.get(), before + 1);
    }

    #[test]
    fn device_refusals() {
        let (mut w, mut live) = (World::new(), FakeLive::new(None));
        w.user(&live, "alice");
        w.device(&live, "lap", Some("alice"), &[]);
        let name = || "lap".to_string();
        assert!(
            err(w.run(&live, AdminRequest::DeviceRelease { name: name() }))
                .contains("not quarantined")
        );
        // Rotating an offline device is refused but audited.
        assert!(
            err(w.run(&live, AdminRequest::DeviceRotate { name: name() }))
                .contains("not connected")
        );
        assert_eq!(live.rotations.get(), 1);
        live.online = true;
        assert!(matches!(
            w.run(&live, AdminRequest::DeviceRotate { name: name() })
                .unwrap(),
            AdminReply::Rotating(Rotating { rotating: true, .. })
        ));
        let rotations = w
            .store
            .audit_log(100)
            .unwrap()
            .iter()
            .filter(|e| e.action == Action::DeviceRotate.as_str())
            .count();
        assert_eq!(rotations, 2);

        let AdminReply::Device(d) = w
            .run(
                &live,
                AdminRequest::DeviceQuarantine {
                    name: name(),
                    reason: None,
                },
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(d.state, crate::model::DeviceState::Quarantined);
        w.run(&live, AdminRequest::DeviceRelease { name: name() })
            .unwrap();

        w.run(
            &live,
            AdminRequest::UserDisable {
                name: "alice".into(),
            },
        )
        .unwrap();
        assert!(err(w.run(
            &live,
            AdminRequest::DeviceQuarantine {
                name: name(),
                reason: None
            }
        ))
        .contains("not active"));
        assert!(
            err(w.run(&live, AdminRequest::DeviceRotate { name: name() })).contains("not active")
        );
        let AdminReply::Devices(ds) = w.run(&live, AdminRequest::DeviceLs).unwrap() else {
            panic!()
        };
        assert_eq!(ds[0].state, crate::model::DeviceState::UserDisabled);

        let AdminReply::Device(d) = w
            .run(&live, AdminRequest::DeviceRevoke { name: name() })
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(d.state, crate::model::DeviceState::Revoked);
        assert!(
            err(w.run(&live, AdminRequest::DeviceRevoke { name: name() }))
                .contains("already revoked")
        );
    }

    #[test]
    fn group_edits_and_users() {
        let (mut w, live) = (World::new(), FakeLive::new(None));
        w.user(&live, "alice");
        assert!(err(w.run(
            &live,
            AdminRequest::UserAdd {
                name: "alice".into(),
                groups: vec![]
            }
        ))
        .contains("already exists"));
        let AdminReply::UserGroups(v) = w
            .run(
                &live,
                AdminRequest::UserGroups {
                    name: "alice".into(),
                    add: vec!["ops".into()],
                    remove: vec!["eng".into()],
                },
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(v.groups, vec!["ops".to_string()]);
        assert!(err(w.run(
            &live,
            AdminRequest::UserGroups {
                name: "bob".into(),
                add: vec!["ops".into()],
                remove: vec![],
            }
        ))
        .contains("no user"));
    }

    /// A policy apply hands the registry the policy as stored and the compile its check made
    /// (the policy against the directory the check judged, at the request's time), and the
    /// maturity assessment it records from the check's work is the one gathered afresh.
    #[test]
    fn an_apply_hands_its_compile_over_and_records_the_same_assessment() {
        use base64::Engine;
        let mut w = World::new();
        let live = FakeLive::new(None);
        w.user(&live, "alice");
        live.take();
        let text = "[services.all]\ndevices = [\"tag:db\"]\nports = [\"tcp/22\"]\n\
                    [[rules]]\nname = \"open\"\nfrom = [\"alice\"]\nto = [\"all\"]\n\
                    [[tests]]\nfrom = \"alice\"\nallow = [\"all:22\"]\n";
        let AdminReply::Policy(out) = w
            .run(
                &live,
                AdminRequest::PolicyApply {
                    file_name: "p.toml".into(),
                    content_b64: base64::engine::general_purpose::STANDARD.encode(text),
                },
            )
            .unwrap()
        else {
            panic!("not a policy outcome")
        };
        assert!(out.ok, "{out:?}");
        let notices = live.take();
        let [Notice::Policy(p, 1, Some(handed))] = &notices[..] else {
            panic!("{notices:?}")
        };
        // As the change feed reads the stored version back: the registry knows it for the
        // policy in force and does not compile it a second time.
        assert_eq!(
            *p,
            ward_shared::policy::parse(text.as_bytes(), &super::super::policy::stored_name(1))
                .unwrap()
        );
        let dir = live.directory_for(p).unwrap();
        assert_eq!(*handed.directory, dir);
        assert_eq!(handed.at_ms, 1_000_000);
        assert_eq!(
            *handed.compiled,
            ward_shared::policy::compile(p, &dir, 1_000_000)
        );
        let rows = w.store.maturity_history().unwrap().rows;
        let recorded = &rows.last().unwrap().assessment;
        let snap = live.snapshot().unwrap();
        let fresh = crate::maturity::assess(
            &super::super::maturity::evidence(&w.store, &live, &snap, 1_000_000).unwrap(),
        );
        assert_eq!(*recorded, serde_json::to_string(&fresh).unwrap());
        assert!(!fresh.pillars.is_empty());
    }

    #[test]
    fn maturity_is_assessed_and_recorded_on_every_apply() {
        use crate::maturity::{Pillar, Stage};
        use base64::Engine;
        let mut w = World::new();
        let live = FakeLive::new(None);
        w.user(&live, "alice");
        w.run(&live, token(Some("alice"), &[], 7 * 86_400)).unwrap();
        let apply = |w: &mut World, text: &str| {
            let AdminReply::Policy(out) = w
                .run(
                    &live,
                    AdminRequest::PolicyApply {
                        file_name: "p.toml".into(),
                        content_b64: base64::engine::general_purpose::STANDARD.encode(text),
                    },
                )
                .unwrap()
            else {
                panic!("not a policy outcome")
            };
            assert!(out.ok, "{out:?}");
        };
        apply(
            &mut w,
            "[services.all]\ndevices = [\"tag:db\"]\nports = [\"tcp/*\"]\n\
             [[rules]]\nname = \"open\"\nfrom = [\"alice\"]\nto = [\"all\"]\n",
        );
        let AdminReply::Maturity(m) = w
            .run(&live, AdminRequest::Maturity { explain: true })
            .unwrap()
        else {
            panic!("not a maturity view")
        };
        let e = &m.evidence;
        assert_eq!((e.rules, e.rules_port_scoped, e.tests), (1, 0, 0));
        assert_eq!(
            (e.tokens, e.token_lifetime_max_ms),
            (1, Some(7 * 86_400_000))
        );
        assert_eq!((e.policy_version, e.policy_versions), (Some(1), 1));
        let seg = &m.assessment.pillars[2].functions[0];
        assert_eq!(
            (seg.function.as_str(), seg.stage),
            ("segmentation", Stage::Initial)
        );
        assert!(seg
            .next_step
            .as_deref()
            .unwrap()
            .contains("scope them to ports"));
        let AdminReply::Maturity(quiet) = w
            .run(&live, AdminRequest::Maturity { explain: false })
            .unwrap()
        else {
            panic!("not a maturity view")
        };
        assert!(quiet
            .assessment
            .pillars
            .iter()
            .flat_map(|p| &p.functions)
            .all(|f| f.next_step.is_none()));

        apply(
            &mut w,
            "[posture.p]\nfirewall = true\n[services.db]\ndevices = [\"tag:db\"]\n\
             ports = [\"tcp/5432\"]\n[[rules]]\nname = \"db\"\nfrom = [\"alice\"]\n\
             to = [\"db\"]\nposture = [\"p\"]\n[[tests]]\nfrom = \"alice\"\n\
             allow = [\"db:5432\"]\n",
        );
        let AdminReply::MaturityHistory(h) = w.run(&live, AdminRequest::MaturityHistory).unwrap()
        else {
            panic!("not a history")
        };
        assert!(h.verified);
        let triggers: Vec<&str> = h.entries.iter().map(|e| e.trigger.as_str()).collect();
        assert_eq!(triggers, ["policy.apply v1", "policy.apply v2"]);
        let (before, after) = (&h.entries[0], &h.entries[1]);
        assert!(Pillar::ALL
            .iter()
            .all(|p| after.stages[p] >= before.stages[p]));
        assert!(after.stages[&Pillar::Governance] > before.stages[&Pillar::Governance]);
        assert!(after
            .changes
            .iter()
            .any(|c| c.starts_with("governance: initial -> ")));
        assert_eq!(before.changes, ["first assessment"]);

        // The daily recording: due only when the newest row is a day old.
        use super::super::maturity::{record_if_due, RECORD_EVERY_MS};
        assert_eq!(
            record_if_due(&w.store, &live, 1_000_000 + 1000).unwrap(),
            None
        );
        let later = 1_000_000 + RECORD_EVERY_MS;
        assert_eq!(record_if_due(&w.store, &live, later).unwrap(), Some(3));
        assert_eq!(record_if_due(&w.store, &live, later + 1).unwrap(), None);
        assert_eq!(w.store.maturity_history().unwrap().rows[2].trigger, "daily");
    }
}
