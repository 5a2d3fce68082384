//! Audit actions: every action name the coordinator writes, once.
//!
//! The names are stored in the hash-chained `audit` table and printed by `audit --json`, so
//! [`Action::as_str`] must keep returning exactly these strings: old rows and scripts depend on
//! them. Rows read back stay strings (`AuditEntry::action`), so a name this build no longer
//! writes still lists and verifies.

use std::fmt;

/// What an audit row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    CoordinatorStart,
    ConnectRefused,
    EnrollRefused,
    DeviceEnroll,
    DeviceCertRenewed,
    /// The replica holding a device's session judged its trust (posture verdict, risk level)
    /// differently: other replicas apply the stored verdict to the device's peers.
    DeviceTrust,
    DeviceRevoke,
    DeviceRotate,
    DeviceQuarantine,
    DeviceRelease,
    DeviceTag,
    /// A device's name changed and is now bound (admin rename, or moved aside for a bound name).
    DeviceRename,
    /// A device's current name was bound by an admin.
    DeviceApprove,
    DeviceRoutes,
    UserAdd,
    UserDisable,
    UserEnable,
    UserGroups,
    TokenCreate,
    TokenRevoke,
    PolicyApply,
    PolicyRefused,
    GrantAdd,
    GrantRemove,
    LeaseIssue,
    LeaseRevoke,
    LeaseRefused,
    PostureFail,
    PosturePass,
    PostureRefused,
    AnomalyRaised,
    AnomalyAck,
    /// A device's behaviour risk went over the policy's `risk_threshold`.
    RiskAbove,
    /// A device's behaviour risk came back to the threshold or below.
    RiskBelow,
    RelayAdd,
    RelayRemove,
    AuditAnchored,
    AuditRollbackAccepted,
    /// An administrator took a flow-based policy suggestion into a policy.
    SuggestionAccept,
    /// An administrator dismissed a suggestion (it returns only on new evidence).
    SuggestionDismiss,
    /// An administrator snoozed a suggestion until a time.
    SuggestionSnooze,
    /// A one-time web console login link was issued (`console-link`).
    ConsoleLink,
    /// A web console session was opened (a login link redeemed).
    ConsoleLogin,
    /// A web console sign-in attempt was refused (reused, expired or unknown link).
    ConsoleLoginRefused,
    /// A person signed a device in through the OpenID provider.
    OidcSignIn,
    /// A sign-in was refused (bad ID token, provider refusal, name conflict, provider down).
    OidcSignInRefused,
    /// The provider took a user's access away (refresh refused, SCIM, back-channel logout) or
    /// gave it back (SCIM active=true), or changed the user's provider groups.
    OidcUserChange,
    /// A back-channel logout or SCIM push was refused (bad token, replay, bad body).
    OidcPushRefused,
    /// An administrator linked an existing local user to a provider identity.
    OidcLink,
    /// An enrolled device's user signed in again (`ward up --login`); its identity facts were
    /// refreshed.
    DeviceLogin,
    /// Signing an enrolled device in again was refused (another user, a tag-owned device, a
    /// provider refusal).
    DeviceLoginRefused,
    /// An administrator replaced the coordinator addresses of one replica (`addrs set`).
    AddrsSet,
}

impl Action {
    /// Every action, in declaration order.
    pub const ALL: [Action; 52] = [
        Action::CoordinatorStart,
        Action::ConnectRefused,
        Action::EnrollRefused,
        Action::DeviceEnroll,
        Action::DeviceCertRenewed,
        Action::DeviceTrust,
        Action::DeviceRevoke,
        Action::DeviceRotate,
        Action::DeviceQuarantine,
        Action::DeviceRelease,
        Action::DeviceTag,
        Action::DeviceRename,
        Action::DeviceApprove,
        Action::DeviceRoutes,
        Action::UserAdd,
        Action::UserDisable,
        Action::UserEnable,
        Action::UserGroups,
        Action::TokenCreate,
        Action::TokenRevoke,
        Action::PolicyApply,
        Action::PolicyRefused,
        Action::GrantAdd,
        Action::GrantRemove,
        Action::LeaseIssue,
        Action::LeaseRevoke,
        Action::LeaseRefused,
        Action::PostureFail,
        Action::PosturePass,
        Action::PostureRefused,
        Action::AnomalyRaised,
        Action::AnomalyAck,
        Action::RiskAbove,
        Action::RiskBelow,
        Action::RelayAdd,
        Action::RelayRemove,
        Action::AuditAnchored,
        Action::AuditRollbackAccepted,
        Action::SuggestionAccept,
        Action::SuggestionDismiss,
        Action::SuggestionSnooze,
        Action::ConsoleLink,
        Action::ConsoleLogin,
        Action::ConsoleLoginRefused,
        Action::OidcSignIn,
        Action::OidcSignInRefused,
        Action::OidcUserChange,
        Action::OidcPushRefused,
        Action::OidcLink,
        Action::DeviceLogin,
        Action::DeviceLoginRefused,
        Action::AddrsSet,
    ];

    /// The stored name (stable: it is part of every hash-chained row).
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::CoordinatorStart => "coordinator.start",
            Action::ConnectRefused => "connect.refused",
            Action::EnrollRefused => "enroll.refused",
            Action::DeviceEnroll => "device.enroll",
            Action::DeviceCertRenewed => "device.cert_renewed",
            Action::DeviceTrust => "device.trust",
            Action::DeviceRevoke => "device.revoke",
            Action::DeviceRotate => "device.rotate",
            Action::DeviceQuarantine => "device.quarantine",
            Action::DeviceRelease => "device.release",
            Action::DeviceTag => "device.tag",
            Action::DeviceRename => "device.rename",
            Action::DeviceApprove => "device.approve",
            Action::DeviceRoutes => "device.routes",
            Action::UserAdd => "user.add",
            Action::UserDisable => "user.disable",
            Action::UserEnable => "user.enable",
            Action::UserGroups => "user.groups",
            Action::TokenCreate => "token.create",
            Action::TokenRevoke => "token.revoke",
            Action::PolicyApply => "policy.apply",
            Action::PolicyRefused => "policy.refused",
            Action::GrantAdd => "grant.add",
            Action::GrantRemove => "grant.remove",
            Action::LeaseIssue => "lease.issue",
            Action::LeaseRevoke => "lease.revoke",
            Action::LeaseRefused => "lease.refused",
            Action::PostureFail => "posture.fail",
            Action::PosturePass => "posture.pass",
            Action::AnomalyRaised => "anomaly.raised",
            Action::AnomalyAck => "anomaly.ack",
            Action::RiskAbove => "risk.above",
            Action::RiskBelow => "risk.below",
            Action::PostureRefused => "posture.refused",
            Action::RelayAdd => "relay.add",
            Action::RelayRemove => "relay.remove",
            Action::AuditAnchored => "audit.anchored",
            Action::AuditRollbackAccepted => "audit.rollback_accepted",
            Action::SuggestionAccept => "suggestion.accept",
            Action::SuggestionDismiss => "suggestion.dismiss",
            Action::SuggestionSnooze => "suggestion.snooze",
            Action::ConsoleLink => "console.link",
            Action::ConsoleLogin => "console.login",
            Action::ConsoleLoginRefused => "console.login_refused",
            Action::OidcSignIn => "oidc.sign_in",
            Action::DeviceLogin => "device.login",
            Action::DeviceLoginRefused => "device.login_refused",
            Action::OidcSignInRefused => "oidc.sign_in_refused",
            Action::OidcUserChange => "oidc.user_change",
            Action::OidcPushRefused => "oidc.push_refused",
            Action::OidcLink => "oidc.link",
            Action::AddrsSet => "addrs.set",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_are_unique_and_stable() {
        let names: BTreeSet<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names.len(), Action::ALL.len());
        assert_eq!(Action::ALL.len(), 52);
        assert_eq!(Action::DeviceLogin.as_str(), "device.login");
        assert_eq!(Action::DeviceCertRenewed.as_str(), "device.cert_renewed");
        assert_eq!(Action::EnrollRefused.to_string(), "enroll.refused");
        for n in names {
            let (area, verb) = n.split_once('.').unwrap();
            assert!(!area.is_empty() && !verb.is_empty(), "{n}");
        }
    }
}
