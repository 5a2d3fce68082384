//! The inbound packet filter's rule types (the stateful filter itself lives beside them).
//!
//! The coordinator compiles the policy into, for each device, the rules that say which source
//! overlay addresses may open which protocol/ports on it; the device enforces them on every
//! decrypted packet, plus replies to flows it opened itself. What no rule allows is dropped.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP echo (IPv4) and ICMPv6 echo.
    Icmp,
}

/// An inclusive port range; a single port has `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

/// One inbound allowance on a device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FilterRule {
    /// The policy rule (or grant) this came from, for counters and explanations.
    pub rule: String,
    /// The service it opens.
    pub service: String,
    /// Overlay addresses of the devices allowed to open flows.
    pub sources: Vec<IpAddr>,
    pub proto: Proto,
    /// Destination ports (TCP/UDP); empty for ICMP.
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Coordinator time (ms since the epoch) after which the rule no longer applies.
    #[serde(default)]
    pub not_after_ms: Option<i64>,
}
