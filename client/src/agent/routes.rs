//! Routed prefixes at the device (I/O-free): what this device offers to forward, which exit
//! node it uses, and which routes of the netmap reach the data plane.

use serde::{Deserialize, Serialize};
use ward_shared::routes::Prefix;

use crate::dataplane::PeerConfig;

/// `ward up --advertise-routes P,… --advertise-exit-node --exit-node NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteOptions {
    /// Prefixes this device offers to forward to (a subnet router).
    #[serde(default)]
    pub advertise_routes: Vec<Prefix>,
    /// This device offers to be an exit node.
    #[serde(default)]
    pub advertise_exit_node: bool,
    /// The exit node (a peer's hostname) this device sends its internet traffic through.
    #[serde(default)]
    pub exit_node: Option<String>,
}

/// Keeps default routes only on the chosen exit node's entries (no exit chosen: none), so
/// the data plane sends internet traffic to one peer or to none; other routed prefixes stay.
pub fn choose_exit(peers: &mut [PeerConfig], exit_node: Option<&str>) {
    for p in peers {
        if Some(p.hostname.as_str()) != exit_node {
            p.routes.retain(|r| !r.is_default());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    fn peer(host: &str, routes: &[&str]) -> PeerConfig {
        PeerConfig {
            device_id: 1,
            hostname: host.into(),
            public_key: [1; 32],
            ipv4: "100.64.0.1".parse().unwrap(),
            ipv6: "fd00::1".parse().unwrap(),
            endpoints: vec![],
            relay: None,
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn only_the_chosen_exit_node_keeps_default_routes() {
        let mut peers = vec![
            peer("exit1", &["0.0.0.0/0", "::/0"]),
            peer("exit2", &["0.0.0.0/0", "10.9.0.0/16"]),
        ];
        choose_exit(&mut peers, Some("exit1"));
        assert_eq!(peers[0].routes.len(), 2);
        assert_eq!(
            peers[1].routes,
            vec!["10.9.0.0/16".parse::<Prefix>().unwrap()]
        );
        choose_exit(&mut peers, None);
        assert!(peers[0].routes.is_empty());
    }
}
