//! The coordinator's domain model: users and devices as the registry, the admin API and the
//! store all see them. Storage maps rows to these types; nothing here does I/O.

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ward_shared::names::{Hostname, Name};
use ward_shared::wire::{DeviceId, WgPublicKey};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub groups: Vec<Name>,
    pub disabled: bool,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Active,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub hostname: Hostname,
    pub user: Option<String>,
    /// Whether the owning user is disabled (a disabled user's devices get no access).
    pub user_disabled: bool,
    pub tags: Vec<Name>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub os: String,
    pub status: DeviceStatus,
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub cert_not_after_ms: i64,
    pub revoked_ms: Option<i64>,
    pub wg_public_key: Option<WgPublicKey>,
    pub endpoints: Vec<SocketAddr>,
    /// Set while the device is quarantined (only remediation services stay reachable).
    pub quarantine: Option<Quarantine>,
    /// Whether an administrator bound the hostname (a token's `--hostname`, `device approve`,
    /// `device rename`); only a bound name is matched by `device:NAME` policy selectors.
    #[serde(default)]
    pub name_bound: bool,
}

/// Why and since when a device is quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    pub since_ms: i64,
    pub reason: String,
    /// Decided by a policy trust rule, not by an admin.
    pub automatic: bool,
}

/// A device's state as the network sees it: the one answer derived from its stored status,
/// its user's `disabled` flag and its quarantine. Printed as `state` by `device ls/show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// On the network with the access the policy gives it.
    Active,
    /// On the network, but only remediation services are reachable.
    Quarantined,
    /// Enrolled and not revoked, but its user is disabled: no access.
    UserDisabled,
    /// Revoked for good.
    Revoked,
}

impl DeviceState {
    /// The printed name (`active`, `quarantined`, `user-disabled`, `revoked`).
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceState::Active => "active",
            DeviceState::Quarantined => "quarantined",
            DeviceState::UserDisabled => "user-disabled",
            DeviceState::Revoked => "revoked",
        }
    }

    /// Whether a device in this state may hold a session and appear in netmaps.
    pub const fn is_live(self) -> bool {
        matches!(self, DeviceState::Active | DeviceState::Quarantined)
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Device {
    /// An active device of `user` (or a server when `None`) with these addresses, a bound
    /// name and nothing else yet: no key, endpoints, quarantine or time stamps (tools, tests).
    pub fn active(
        id: DeviceId,
        hostname: Hostname,
        user: Option<String>,
        tags: Vec<Name>,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> Device {
        Device {
            id,
            hostname,
            user,
            user_disabled: false,
            tags,
            ipv4,
            ipv6,
            os: "linux".into(),
            status: DeviceStatus::Active,
            created_ms: 0,
            last_seen_ms: 0,
            cert_not_after_ms: 0,
            revoked_ms: None,
            wg_public_key: None,
            endpoints: vec![],
            quarantine: None,
            name_bound: true,
        }
    }

    /// The device's one state; every "may it be on the network" question goes through it.
    pub fn state(&self) -> DeviceState {
        match (self.status, self.user_disabled, &self.quarantine) {
            (DeviceStatus::Revoked, _, _) => DeviceState::Revoked,
            (DeviceStatus::Active, true, _) => DeviceState::UserDisabled,
            (DeviceStatus::Active, false, Some(_)) => DeviceState::Quarantined,
            (DeviceStatus::Active, false, None) => DeviceState::Active,
        }
    }

    /// Whether this device may hold a session and appear in netmaps.
    pub fn is_live(&self) -> bool {
        self.state().is_live()
    }
}

/// A live, untagged device of user `alice` numbered `id`, for tests across the crate.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a fixed, valid name and address
pub(crate) fn test_device(id: u64) -> Device {
    Device::active(
        DeviceId(id),
        Hostname::parse(&format!("h{id}")).unwrap(),
        Some("alice".into()),
        vec![],
        Ipv4Addr::new(100, 64, 0, id as u8),
        format!("fd00::{id}").parse().unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_state_from_status_user_and_quarantine() {
        let mut d = test_device(1);
        assert_eq!(d.state(), DeviceState::Active);
        d.quarantine = Some(Quarantine {
            since_ms: 1,
            reason: "r".into(),
            automatic: false,
        });
        assert_eq!(d.state(), DeviceState::Quarantined);
        assert!(d.is_live());
        d.user_disabled = true;
        assert_eq!(d.state(), DeviceState::UserDisabled);
        assert!(!d.is_live());
        d.status = DeviceStatus::Revoked;
        assert_eq!(d.state(), DeviceState::Revoked);
        assert_eq!(
            serde_json::to_string(&DeviceState::UserDisabled).unwrap(),
            "\"user-disabled\""
        );
    }
}
