//! The relays the engine knows: a small [`RelayId`] per relay name (given the first time a
//! name is seen, never reused), and which of them this device has a live connection to, with
//! the largest WireGuard datagram each carries.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::outbox::RelayId;
use super::path::RelayRoute;

/// Most relay names remembered. Names come from the netmap (the coordinator's relay list) and
/// from the agent's connections, so there are few; past this, new names get no id and peers
/// homed on them are not sent to through a relay.
const MAX_RELAY_NAMES: usize = 1024;
/// A relay whose datagrams cannot carry a handshake initiation plus room for data is not
/// used.
pub(super) const MIN_RELAY_DATAGRAM: u16 = 256;

#[derive(Default)]
pub(super) struct Relays {
    /// Every name given an id, indexed by the id.
    names: Vec<Arc<str>>,
    by_name: BTreeMap<Arc<str>, RelayId>,
    /// Connected relays: the largest WireGuard datagram each carries.
    connected: BTreeMap<RelayId, u16>,
}

impl Relays {
    /// The id of `name`, given one if it has none yet (`None` only when the table is full).
    pub(super) fn id(&mut self, name: &str) -> Option<RelayId> {
        if let Some(id) = self.by_name.get(name) {
            return Some(*id);
        }
        if self.names.len() >= MAX_RELAY_NAMES {
            tracing::debug!(relay = name, "too many relay names: relay not used");
            return None;
        }
        let id = RelayId(u16::try_from(self.names.len()).ok()?);
        let name: Arc<str> = Arc::from(name);
        self.names.push(name.clone());
        self.by_name.insert(name, id);
        Some(id)
    }

    /// Replaces the connected set.
    pub(super) fn set_connected(&mut self, connected: &[(String, u16)]) {
        self.connected.clear();
        for (name, max_datagram) in connected {
            if *max_datagram < MIN_RELAY_DATAGRAM {
                tracing::debug!(relay = %name, max_datagram, "relay datagrams too small: relay not used");
                continue;
            }
            if let Some(id) = self.id(name) {
                self.connected.insert(id, *max_datagram);
            }
        }
    }

    /// The route through relay `id`, if it is connected.
    pub(super) fn route(&self, id: Option<RelayId>) -> Option<RelayRoute> {
        let id = id?;
        let max_datagram = *self.connected.get(&id)?;
        Some(RelayRoute { id, max_datagram })
    }

    /// The id of a connected relay.
    pub(super) fn connected_id(&self, name: &str) -> Option<RelayId> {
        self.by_name
            .get(name)
            .copied()
            .filter(|id| self.connected.contains_key(id))
    }

    pub(super) fn name(&self, id: RelayId) -> Option<&Arc<str>> {
        self.names.get(usize::from(id.0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_only_connected_relays_route() {
        let mut r = Relays::default();
        let a = r.id("a").unwrap();
        let b = r.id("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(r.id("a"), Some(a));
        assert_eq!(r.route(Some(a)), None, "not connected");
        r.set_connected(&[("a".into(), 1200), ("c".into(), 100)]);
        assert_eq!(
            r.route(Some(a)),
            Some(RelayRoute {
                id: a,
                max_datagram: 1200
            })
        );
        assert_eq!(r.connected_id("a"), Some(a));
        assert_eq!(r.connected_id("b"), None);
        assert_eq!(r.connected_id("c"), None, "datagrams too small to use");
        r.set_connected(&[]);
        assert_eq!(r.route(Some(a)), None);
        assert_eq!(r.name(b).map(|n| &**n), Some("b"));
    }

    #[test]
    fn name_table_is_bounded() {
        let mut r = Relays::default();
        for i in 0..MAX_RELAY_NAMES {
            assert!(r.id(&format!("r{i}")).is_some());
        }
        assert_eq!(r.id("one-too-many"), None);
        assert!(r.id("r0").is_some());
    }
}
