//! The coordinator's I/O-free core: which devices are live, which hold a control session, and
//! what each session must be told.
//!
//! ```text
//! driver loop:
//!   on store change      -> registry.handle_device_upserted(dev) / handle_device_removed(id, why)
//!   on session events    -> handle_session_opened / handle_session_update / handle_session_closed
//!   then, until None     -> registry.poll_output() -> Send{conn, msg} | Close{conn, ..}
//! ```
//!
//! Netmaps are computed lazily in `poll_output` after any change, and each session gets only
//! the difference from what it was last sent (a full netmap the first time). For now every
//! live device may see every other live device; the policy issue narrows that.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use ward_shared::addr::AddressPools;
use ward_shared::wire::{
    CoordinatorMsg, DeviceId, DeviceUpdate, ErrorCode, Netmap, NetmapDelta, Peer, SelfInfo,
    MAX_ENDPOINTS,
};

use crate::store::Device;

/// A control connection, numbered by the driver.
pub type ConnId = u64;

#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum Output {
    Send {
        conn: ConnId,
        msg: CoordinatorMsg,
    },
    /// Send the error, then close the connection.
    Close {
        conn: ConnId,
        code: ErrorCode,
        reason: String,
    },
}

#[derive(Debug)]
struct Session {
    conn: ConnId,
    observed: SocketAddr,
    /// What this session was last sent: seq and the peers by id.
    sent: Option<(u64, BTreeMap<DeviceId, Peer>)>,
}

#[derive(Debug)]
pub struct Registry {
    pools: AddressPools,
    devices: BTreeMap<DeviceId, Device>,
    sessions: BTreeMap<DeviceId, Session>,
    outputs: VecDeque<Output>,
    dirty: bool,
}

impl Registry {
    /// Starts from the live devices in the store.
    pub fn new(pools: AddressPools, devices: impl IntoIterator<Item = Device>) -> Self {
        Self {
            pools,
            devices: devices
                .into_iter()
                .filter(Device::is_live)
                .map(|d| (d.id, d))
                .collect(),
            sessions: BTreeMap::new(),
            outputs: VecDeque::new(),
            dirty: false,
        }
    }

    /// A device was enrolled or changed. A device that is no longer live is removed.
    pub fn handle_device_upserted(&mut self, dev: Device) {
        if !dev.is_live() {
            let why = if dev.user_disabled {
                "the device's user has been disabled"
            } else {
                "the device has been revoked"
            };
            self.handle_device_removed(dev.id, why);
            return;
        }
        self.devices.insert(dev.id, dev);
        self.dirty = true;
    }

    /// A device lost its right to be on the network: its session is closed at once and it
    /// disappears from every other netmap.
    pub fn handle_device_removed(&mut self, id: DeviceId, reason: &str) {
        self.devices.remove(&id);
        if let Some(s) = self.sessions.remove(&id) {
            self.outputs.push_back(Output::Close {
                conn: s.conn,
                code: ErrorCode::DeviceRevoked,
                reason: reason.to_string(),
            });
        }
        self.dirty = true;
    }

    /// An authenticated device said hello. A previous session of the same device is closed
    /// (the newest connection wins, as after a roam).
    pub fn handle_session_opened(
        &mut self,
        id: DeviceId,
        conn: ConnId,
        observed: SocketAddr,
        update: DeviceUpdate,
    ) -> Result<(), ErrorCode> {
        if !self.devices.contains_key(&id) {
            return Err(ErrorCode::DeviceRevoked);
        }
        if let Some(old) = self.sessions.insert(
            id,
            Session {
                conn,
                observed,
                sent: None,
            },
        ) {
            if old.conn != conn {
                self.outputs.push_back(Output::Close {
                    conn: old.conn,
                    code: ErrorCode::Protocol,
                    reason: "replaced by a newer connection of the same device".into(),
                });
            }
        }
        self.apply_update(id, update);
        self.dirty = true;
        Ok(())
    }

    pub fn handle_session_update(&mut self, id: DeviceId, conn: ConnId, update: DeviceUpdate) {
        if self.sessions.get(&id).map(|s| s.conn) != Some(conn) {
            return;
        }
        self.apply_update(id, update);
        self.dirty = true;
    }

    pub fn handle_session_closed(&mut self, id: DeviceId, conn: ConnId) {
        if self.sessions.get(&id).map(|s| s.conn) == Some(conn) {
            self.sessions.remove(&id);
            self.dirty = true;
        }
    }

    /// Next thing the driver must do.
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.dirty {
            self.dirty = false;
            self.recompute();
        }
        self.outputs.pop_front()
    }

    pub fn online_ids(&self) -> Vec<DeviceId> {
        self.sessions.keys().copied().collect()
    }

    #[cfg(test)]
    pub fn is_online(&self, id: DeviceId) -> bool {
        self.sessions.contains_key(&id)
    }

    fn apply_update(&mut self, id: DeviceId, mut update: DeviceUpdate) {
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        update.local_endpoints.truncate(MAX_ENDPOINTS);
        if update.wg_public_key.is_some() {
            dev.wg_public_key = update.wg_public_key;
        }
        let observed = self.sessions.get(&id).map(|s| s.observed);
        let mut eps = Vec::new();
        // The address the coordinator saw, with the WireGuard port: right for devices on the
        // open network, and for NATs that keep the source port.
        if let (Some(o), true) = (observed, update.wg_port != 0) {
            eps.push(SocketAddr::new(o.ip(), update.wg_port));
        }
        for e in update.local_endpoints {
            if !eps.contains(&e) && !e.ip().is_unspecified() && !e.ip().is_loopback() {
                eps.push(e);
            }
        }
        eps.truncate(MAX_ENDPOINTS);
        dev.endpoints = eps;
    }

    fn peer_view(&self, d: &Device) -> Peer {
        Peer {
            device_id: d.id,
            hostname: d.hostname.clone(),
            user: d.user.clone(),
            tags: d.tags.clone(),
            ipv4: d.ipv4,
            ipv6: d.ipv6,
            wg_public_key: d.wg_public_key,
            endpoints: d.endpoints.clone(),
            online: self.sessions.contains_key(&d.id),
        }
    }

    fn recompute(&mut self) {
        let views: BTreeMap<DeviceId, Peer> = self
            .devices
            .values()
            .map(|d| (d.id, self.peer_view(d)))
            .collect();
        let ids: Vec<DeviceId> = self.sessions.keys().copied().collect();
        for id in ids {
            let Some(me) = self.devices.get(&id) else {
                continue;
            };
            let Some(session) = self.sessions.get_mut(&id) else {
                continue;
            };
            let mut want = views.clone();
            want.remove(&id);
            match &mut session.sent {
                None => {
                    let msg = CoordinatorMsg::Netmap(Netmap {
                        seq: 1,
                        me: SelfInfo {
                            device_id: id,
                            hostname: me.hostname.clone(),
                            ipv4: me.ipv4,
                            ipv6: me.ipv6,
                            v6_prefix: self.pools.v6_prefix,
                            observed_addr: Some(session.observed),
                        },
                        peers: want.values().cloned().collect(),
                        inbound: Vec::new(),
                        reach: Vec::new(),
                    });
                    session.sent = Some((1, want));
                    self.outputs.push_back(Output::Send {
                        conn: session.conn,
                        msg,
                    });
                }
                Some((seq, sent)) => {
                    let upsert: Vec<Peer> = want
                        .iter()
                        .filter(|(k, v)| sent.get(k) != Some(v))
                        .map(|(_, v)| v.clone())
                        .collect();
                    let remove: Vec<DeviceId> = sent
                        .keys()
                        .filter(|k| !want.contains_key(k))
                        .copied()
                        .collect();
                    if upsert.is_empty() && remove.is_empty() {
                        continue;
                    }
                    let base = *seq;
                    *seq += 1;
                    *sent = want;
                    self.outputs.push_back(Output::Send {
                        conn: session.conn,
                        msg: CoordinatorMsg::NetmapDelta(NetmapDelta {
                            base_seq: base,
                            seq: base + 1,
                            upsert,
                            remove,
                            inbound: None,
                            reach: None,
                        }),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeviceStatus;
    use ward_shared::names::Hostname;

    fn dev(id: u64) -> Device {
        Device {
            id: DeviceId(id),
            hostname: Hostname::parse(&format!("h{id}")).unwrap(),
            user: Some("alice".into()),
            user_disabled: false,
            tags: vec![],
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: format!("fd00::{id}").parse().unwrap(),
            os: "linux".into(),
            status: DeviceStatus::Active,
            created_ms: 0,
            last_seen_ms: 0,
            cert_not_after_ms: 0,
            revoked_ms: None,
            wg_public_key: None,
            endpoints: vec![],
        }
    }

    fn drain(r: &mut Registry) -> Vec<Output> {
        std::iter::from_fn(|| r.poll_output()).collect()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn full_netmap_then_deltas() {
        let mut r = Registry::new(AddressPools::from_random([0; 5]), [dev(1), dev(2), dev(3)]);
        r.handle_session_opened(
            DeviceId(1),
            10,
            addr("10.0.0.1:4000"),
            DeviceUpdate {
                wg_port: 51820,
                ..Default::default()
            },
        )
        .unwrap();
        let out = drain(&mut r);
        assert_eq!(out.len(), 1);
        let Output::Send {
            conn: 10,
            msg: CoordinatorMsg::Netmap(nm),
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert_eq!(
            nm.peers.iter().map(|p| p.device_id.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(nm.peers.iter().all(|p| !p.online));

        // Device 2 comes online: device 1 gets a delta with 2 online and its endpoint.
        r.handle_session_opened(
            DeviceId(2),
            11,
            addr("10.0.0.2:5000"),
            DeviceUpdate {
                wg_port: 51820,
                local_endpoints: vec![addr("192.168.1.5:51820"), addr("0.0.0.0:1")],
                ..Default::default()
            },
        )
        .unwrap();
        let out = drain(&mut r);
        let delta = out
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    conn: 10,
                    msg: CoordinatorMsg::NetmapDelta(d),
                } => Some(d.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(delta.base_seq, 1);
        assert_eq!(delta.upsert.len(), 1);
        assert!(delta.upsert[0].online);
        assert_eq!(
            delta.upsert[0].endpoints,
            vec![addr("10.0.0.2:51820"), addr("192.168.1.5:51820")]
        );
        // Nothing changed: nothing sent.
        r.handle_session_update(
            DeviceId(2),
            11,
            DeviceUpdate {
                wg_port: 51820,
                local_endpoints: vec![addr("192.168.1.5:51820")],
                ..Default::default()
            },
        );
        assert!(drain(&mut r).is_empty());
    }

    #[test]
    fn revocation_closes_session_and_removes_from_peers() {
        let mut r = Registry::new(AddressPools::from_random([0; 5]), [dev(1), dev(2)]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        r.handle_session_opened(DeviceId(2), 11, addr("10.0.0.2:1"), DeviceUpdate::default())
            .unwrap();
        drain(&mut r);
        r.handle_device_removed(DeviceId(2), "the device has been revoked");
        let out = drain(&mut r);
        assert!(out.contains(&Output::Close {
            conn: 11,
            code: ErrorCode::DeviceRevoked,
            reason: "the device has been revoked".into()
        }));
        assert!(out.iter().any(|o| matches!(o, Output::Send { conn: 10, msg: CoordinatorMsg::NetmapDelta(d) } if d.remove == vec![DeviceId(2)])));
        // A revoked device cannot open a session.
        assert_eq!(
            r.handle_session_opened(DeviceId(2), 12, addr("10.0.0.2:1"), DeviceUpdate::default()),
            Err(ErrorCode::DeviceRevoked)
        );
        // A disabled user's device is removed too.
        let mut d1 = dev(1);
        d1.user_disabled = true;
        r.handle_device_upserted(d1);
        let out = drain(&mut r);
        assert!(matches!(&out[0], Output::Close { conn: 10, .. }));
    }

    #[test]
    fn newer_session_replaces_older() {
        let mut r = Registry::new(AddressPools::from_random([0; 5]), [dev(1)]);
        r.handle_session_opened(DeviceId(1), 10, addr("10.0.0.1:1"), DeviceUpdate::default())
            .unwrap();
        r.handle_session_opened(DeviceId(1), 11, addr("10.0.0.1:2"), DeviceUpdate::default())
            .unwrap();
        let out = drain(&mut r);
        assert!(matches!(&out[0], Output::Close { conn: 10, .. }));
        assert!(matches!(
            &out[1],
            Output::Send {
                conn: 11,
                msg: CoordinatorMsg::Netmap(_)
            }
        ));
        // The stale connection closing does not end the new session.
        r.handle_session_closed(DeviceId(1), 10);
        assert!(r.is_online(DeviceId(1)));
    }
}
