//! The device's DNS resolver core: device and service names under the Ward domain, answered
//! from the netmap; every other name forwarded to the resolvers the host used before Ward.
//!
//! No sockets, no clock, no randomness: the driver (`daemon::dns`) owns the UDP/TCP port 53
//! listeners and the upstream socket and runs this loop:
//!
//! ```text
//!   netmap full/delta ──▶ Zone::from_netmap ──▶ Resolver::set_zone ──▶ [(client, bytes)]
//!                                                   (held queries the new zone answers)
//!   query from a client ──▶ handle_query(bytes, client, now, fresh_id) ──▶ Action
//!        Action::Reply(bytes)               → send to the client
//!        Action::Forward { upstream, bytes } → send to the upstream resolver
//!        Action::Held                       → nothing yet (the client comes back later)
//!        Action::Drop(reason)                → nothing (log, rate-bounded)
//!      then take_wants() ──▶ [Label] → the agent (`Agent::handle_names_wanted`)
//!   reply from an upstream ──▶ handle_upstream(bytes, from) ──▶ Some((client, bytes)) → client
//!   refusal from the coordinator ──▶ handle_refusal(name, now) ──▶ NXDOMAIN to held clients
//!   timer at poll_timeout() ──▶ handle_timeout(now) ──▶ SERVFAIL to each expired forwarded
//!                                                     client, NXDOMAIN to each expired held one
//! ```
//!
//! Names: `HOSTNAME.<domain>` for this device and for every peer this device may reach (a
//! peer in the netmap's `reach` list); `SERVICE.<domain>` for a service in `reach`, with the
//! addresses of the devices of that service this device may reach. Any other name under the
//! domain is NXDOMAIN, so names leak no more than the netmap does. A service name wins over a
//! device name that equals it: services are named by the administrator, device names may be
//! self-chosen. Matching is ASCII case-insensitive.
//!
//! Peers on demand (protocol 4): a netmap that says `on_demand` holds only some peers, so a
//! name missing from its zone may still be one this device may reach. A query for
//! `LABEL.<domain>` the zone lacks is then held (at most [`MAX_HELD`] in all and
//! [`MAX_HELD_PER_NAME`] per name; beyond that NXDOMAIN at once) for [`HOLD_TIMEOUT`], and the
//! name is wanted (at most once per [`WANT_INTERVAL`] per name and [`WANTS_PER_SEC`] names a
//! second in all): the agent asks the coordinator (`want_peer { by: name }`), whose delta
//! brings the peers, and the next `set_zone` answers what was held from the new zone. A
//! refusal answers the held queries NXDOMAIN and stands for [`REFUSAL_HOLD`] (NXDOMAIN at
//! once, no want); a held query still unanswered at its deadline gets NXDOMAIN.
//!
//! Bounds: queries larger than [`MAX_MESSAGE`] are dropped; parsing is hickory-proto's, whose
//! errors (truncation, compression loops, bad labels) come back as errors and are answered
//! FORMERR or dropped; the forwarding table holds at most [`MAX_IN_FLIGHT`] queries, each for
//! at most [`FORWARD_TIMEOUT`]; held queries, wants and refusals are bounded as above;
//! [`LogLimiter`] bounds log lines.

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ward_shared::names::DnsDomain;
use ward_shared::wire::{Label, Netmap};

/// The largest DNS message accepted or forwarded (UDP or TCP).
pub const MAX_MESSAGE: usize = 4096;
/// At most this many forwarded queries wait for an upstream answer; more get SERVFAIL.
pub const MAX_IN_FLIGHT: usize = 1024;
/// A forwarded query without an answer this long gets SERVFAIL.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers for Ward names live this long in caches: the netmap changes within seconds of a
/// trust decision, so names must not outlive it by much.
pub const TTL_SECS: u32 = 5;
/// At most this many addresses of one family in one answer (a service on many devices).
pub const MAX_ADDRESSES: usize = 32;
/// Classic DNS over UDP without EDNS: answers larger than this are truncated (TC set).
const UDP_PLAIN_LIMIT: usize = 512;
/// On demand: a query for a missing name waits this long for the coordinator's answer, then
/// gets NXDOMAIN.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(2);
/// On demand: most queries held in all; a further one is answered NXDOMAIN at once.
pub const MAX_HELD: usize = 256;
/// On demand: most queries held for one name; a further one is answered NXDOMAIN at once.
pub const MAX_HELD_PER_NAME: usize = 8;
/// The same name is asked for at most this often.
pub const WANT_INTERVAL: Duration = Duration::from_secs(1);
/// Most names asked for per second in all (and most wants waiting to be taken).
pub const WANTS_PER_SEC: u32 = 64;
/// How long a refusal stands: queries for the name are NXDOMAIN at once, with no want.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(10);
/// Most refusals remembered (the one ending first makes room).
const MAX_REFUSALS: usize = 256;

/// The addresses one name stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// The names this device may resolve, built from one netmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    domain: DnsDomain,
    /// The domain's labels, lowercase, most significant last (as in the name).
    domain_labels: Vec<Vec<u8>>,
    /// First label (lowercase) → addresses.
    names: BTreeMap<Vec<u8>, Addresses>,
    /// The netmap holds only some peers (protocol 4): a missing name may be asked for.
    on_demand: bool,
}

/// What a name is to this zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// A Ward name with these addresses.
    Found(&'a Addresses),
    /// The domain itself: exists, holds no addresses.
    Apex,
    /// Under the domain but not a name this device may resolve.
    NxDomain,
    /// Not under the domain: the previous resolvers answer it.
    NotOurs,
}

impl Zone {
    /// An empty zone (only NXDOMAIN and forwarding) until the first netmap.
    pub fn empty(domain: DnsDomain) -> Self {
        let domain_labels = domain
            .as_str()
            .split('.')
            .map(|l| l.as_bytes().to_vec())
            .collect();
        Self {
            domain,
            domain_labels,
            names: BTreeMap::new(),
            on_demand: false,
        }
    }

    /// This device's own name, the peers it may reach and the services it may reach.
    pub fn from_netmap(nm: &Netmap) -> Self {
        let mut z = Self::empty(nm.dns_domain.clone().unwrap_or_default());
        z.on_demand = nm.on_demand;
        let peers: BTreeMap<_, _> = nm.peers.iter().map(|p| (p.device_id, p)).collect();
        let mut put = |label: &str, v4: Ipv4Addr, v6: Ipv6Addr, replace: bool| {
            let e = z.names.entry(label.as_bytes().to_vec()).or_default();
            if replace {
                *e = Addresses::default();
            }
            if !e.v4.contains(&v4) && e.v4.len() < MAX_ADDRESSES {
                e.v4.push(v4);
            }
            if !e.v6.contains(&v6) && e.v6.len() < MAX_ADDRESSES {
                e.v6.push(v6);
            }
        };
        // Devices first, then services over them (a service name wins).
        put(nm.me.hostname.as_str(), nm.me.ipv4, nm.me.ipv6, true);
        let reach = nm.reach_view();
        for r in &reach {
            if let Some(p) = peers.get(&r.device_id) {
                put(p.hostname.as_str(), p.ipv4, p.ipv6, true);
            }
        }
        let mut services: BTreeMap<&str, Vec<(Ipv4Addr, Ipv6Addr)>> = BTreeMap::new();
        for r in &reach {
            let Some(p) = peers.get(&r.device_id) else {
                continue;
            };
            services
                .entry(r.service.as_str())
                .or_default()
                .push((p.ipv4, p.ipv6));
        }
        for (service, addrs) in services {
            // A service name that is not a DNS label has no name (policy names are wider).
            if !is_label(service) {
                continue;
            }
            let label = service.to_ascii_lowercase();
            let mut first = true;
            for (v4, v6) in addrs {
                put(&label, v4, v6, first);
                first = false;
            }
        }
        for a in z.names.values_mut() {
            a.v4.sort();
            a.v6.sort();
        }
        z
    }

    pub fn domain(&self) -> &DnsDomain {
        &self.domain
    }

    /// Whether the netmap this zone comes from holds only some peers (a missing name is held
    /// and asked for rather than NXDOMAIN at once).
    pub fn on_demand(&self) -> bool {
        self.on_demand
    }

    /// The names in this zone (first labels), for status views.
    pub fn names(&self) -> impl Iterator<Item = (String, &Addresses)> {
        self.names
            .iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v))
    }

    /// Looks `name` up, ASCII case-insensitively.
    pub fn lookup(&self, name: &Name) -> Lookup<'_> {
        let labels: Vec<&[u8]> = name.iter().collect();
        let d = self.domain_labels.len();
        if labels.len() < d {
            return Lookup::NotOurs;
        }
        let (head, tail) = labels.split_at(labels.len() - d);
        let ours = tail
            .iter()
            .zip(&self.domain_labels)
            .all(|(a, b)| a.eq_ignore_ascii_case(b));
        if !ours {
            return Lookup::NotOurs;
        }
        match head {
            [] => Lookup::Apex,
            [label] => match self.names.get(&label.to_ascii_lowercase()) {
                Some(a) => Lookup::Found(a),
                None => Lookup::NxDomain,
            },
            _ => Lookup::NxDomain,
        }
    }

    /// `name`'s first label when `name` is one label under the domain that this zone does
    /// not have: what a device on demand may ask the coordinator for.
    fn missing_label(&self, name: &Name) -> Option<Label> {
        if self.lookup(name) != Lookup::NxDomain {
            return None;
        }
        let labels: Vec<&[u8]> = name.iter().collect();
        let [first] = labels.get(..labels.len().checked_sub(self.domain_labels.len())?)? else {
            return None;
        };
        Label::parse(std::str::from_utf8(first).ok()?).ok()
    }
}

/// What the driver does with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes back to the client.
    Reply(Vec<u8>),
    /// Send these bytes to `upstream`; its reply goes through [`Resolver::handle_upstream`].
    Forward {
        upstream: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Nothing to send yet: the query waits for its name (on demand; take the wants with
    /// [`Resolver::take_wants`]). The client comes back from [`Resolver::set_zone`],
    /// [`Resolver::handle_refusal`] or [`Resolver::handle_timeout`].
    Held,
    /// Nothing to send; the reason is for a (rate-bounded) log line.
    Drop(DropReason),
}

/// Why a message got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("too short to carry a DNS header")]
    TooShort,
    #[error("a response where a query was expected")]
    NotAQuery,
}

/// How the client asked: over UDP answers are truncated to what it can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

struct InFlight<C> {
    client: C,
    transport: Transport,
    client_id: u16,
    upstream: SocketAddr,
    query: Query,
    deadline: Instant,
}

/// A query waiting for its name (on demand).
struct Held<C> {
    client: C,
    transport: Transport,
    query: Message,
    deadline: Instant,
}

/// The resolver: the zone, the previous resolvers, the forwarding table and, on demand, the
/// queries held for names asked for. `C` is whatever the driver needs to answer a client
/// later (an address, a connection's channel).
pub struct Resolver<C> {
    zone: Zone,
    upstreams: Vec<SocketAddr>,
    in_flight: BTreeMap<u16, InFlight<C>>,
    /// Queries waiting for a name the coordinator was asked for, by name.
    held: BTreeMap<Label, Vec<Held<C>>>,
    /// Names asked for less than [`WANT_INTERVAL`] ago, and when.
    asked: BTreeMap<Label, Instant>,
    /// Names to ask for, not taken yet.
    wants: Vec<Label>,
    /// The wants rate window: its start and the wants recorded in it.
    window: Option<(Instant, u32)>,
    /// Refused names and when each refusal ends.
    refused: BTreeMap<Label, Instant>,
}

impl<C> Resolver<C> {
    pub fn new(zone: Zone, upstreams: Vec<SocketAddr>) -> Self {
        Self {
            zone,
            upstreams,
            in_flight: BTreeMap::new(),
            held: BTreeMap::new(),
            asked: BTreeMap::new(),
            wants: Vec::new(),
            window: None,
            refused: BTreeMap::new(),
        }
    }

    /// Replaces the zone (every netmap and delta) and answers the held queries whose name it
    /// now has, at once; with a zone that is not on demand, every held query is answered
    /// (NXDOMAIN where the name is still missing).
    #[must_use]
    pub fn set_zone(&mut self, zone: Zone) -> Vec<(C, Vec<u8>)> {
        self.zone = zone;
        if !self.zone.on_demand {
            self.wants.clear();
        }
        let mut out = Vec::new();
        for (name, queries) in std::mem::take(&mut self.held) {
            let mut keep = Vec::new();
            for h in queries {
                let missing = self.zone.on_demand
                    && h.query
                        .queries()
                        .first()
                        .is_some_and(|q| self.zone.lookup(q.name()) == Lookup::NxDomain);
                if missing {
                    keep.push(h);
                } else {
                    out.push((h.client, answer(&self.zone, &h.query, h.transport)));
                }
            }
            if !keep.is_empty() {
                self.held.insert(name, keep);
            }
        }
        out
    }

    /// The names to ask the coordinator for (`want_peer { by: name }`) since the last call.
    #[must_use]
    pub fn take_wants(&mut self) -> Vec<Label> {
        std::mem::take(&mut self.wants)
    }

    /// The coordinator refused `name`: the queries held for it are answered NXDOMAIN, and for
    /// [`REFUSAL_HOLD`] queries for it are NXDOMAIN at once, with no new want.
    #[must_use]
    pub fn handle_refusal(&mut self, name: &Label, now: Instant) -> Vec<(C, Vec<u8>)> {
        self.refused.retain(|_, until| now < *until);
        if !self.refused.contains_key(name) && self.refused.len() >= MAX_REFUSALS {
            let first = self
                .refused
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(n, _)| n.clone());
            if let Some(n) = first {
                self.refused.remove(&n);
            }
        }
        self.refused.insert(name.clone(), now + REFUSAL_HOLD);
        self.wants.retain(|w| w != name);
        self.held
            .remove(name)
            .unwrap_or_default()
            .into_iter()
            .map(|h| (h.client, nxdomain(&h.query, h.transport)))
            .collect()
    }

    /// Queries held for names asked for.
    pub fn held(&self) -> usize {
        self.held.values().map(Vec::len).sum()
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Forwarded queries waiting for an answer.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Answers, forwards or (on demand) holds one query. `fresh_id` is a random message id for
    /// the upstream query (the driver draws it); a query whose id is taken gets SERVFAIL. The
    /// client comes back with the action unless the query was forwarded (then it comes back
    /// with the upstream's answer or the timeout) or held (then with `set_zone`,
    /// `handle_refusal` or the timeout). After a held query, [`Resolver::take_wants`] has the
    /// names to ask for.
    #[must_use]
    pub fn handle_query(
        &mut self,
        bytes: &[u8],
        client: C,
        transport: Transport,
        now: Instant,
        fresh_id: u16,
    ) -> (Action, Option<C>) {
        let mut slot = Some(client);
        let action = self.decide(bytes, &mut slot, transport, now, fresh_id);
        (action, slot)
    }

    fn decide(
        &mut self,
        bytes: &[u8],
        client: &mut Option<C>,
        transport: Transport,
        now: Instant,
        fresh_id: u16,
    ) -> Action {
        if bytes.len() > MAX_MESSAGE {
            return Action::Drop(DropReason::TooLarge);
        }
        if bytes.len() < 12 {
            return Action::Drop(DropReason::TooShort);
        }
        // The QR bit: never answer a response (two resolvers must not loop on each other).
        if bytes[2] & 0x80 != 0 {
            return Action::Drop(DropReason::NotAQuery);
        }
        let id = u16::from_be_bytes([bytes[0], bytes[1]]);
        let msg = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => return Action::Reply(error_reply(id, ResponseCode::FormErr)),
        };
        if msg.op_code() != OpCode::Query {
            return Action::Reply(error_reply(id, ResponseCode::NotImp));
        }
        let [query] = msg.queries() else {
            return Action::Reply(error_reply(id, ResponseCode::FormErr));
        };
        let lookup = self.zone.lookup(query.name());
        if lookup == Lookup::NotOurs {
            return self.forward(bytes, &msg, query.clone(), client, transport, now, fresh_id);
        }
        if query.query_class() != DNSClass::IN {
            let mut reply = response_to(&msg);
            reply.set_response_code(ResponseCode::Refused);
            return Action::Reply(encode(reply, &msg, transport));
        }
        if lookup == Lookup::NxDomain {
            if let Some(held) = self.hold(&msg, client, transport, now) {
                return held;
            }
        }
        Action::Reply(answer(&self.zone, &msg, transport))
    }

    /// On demand, holds a query for a name the zone lacks and asks for the name. `None` when
    /// it is not held (not on demand, not one label under the domain, refused a moment ago,
    /// a bound reached): the query is answered NXDOMAIN at once.
    fn hold(
        &mut self,
        msg: &Message,
        client: &mut Option<C>,
        transport: Transport,
        now: Instant,
    ) -> Option<Action> {
        if !self.zone.on_demand {
            return None;
        }
        let name = self.zone.missing_label(msg.queries().first()?.name())?;
        if self.refused.get(&name).is_some_and(|until| now < *until) {
            return None;
        }
        if self.held() >= MAX_HELD
            || self
                .held
                .get(&name)
                .is_some_and(|h| h.len() >= MAX_HELD_PER_NAME)
        {
            return None;
        }
        let client = client.take()?;
        self.want(&name, now);
        self.held.entry(name).or_default().push(Held {
            client,
            transport,
            query: msg.clone(),
            deadline: now + HOLD_TIMEOUT,
        });
        Some(Action::Held)
    }

    /// Records a want for `name` unless it was asked for less than [`WANT_INTERVAL`] ago or
    /// the rate (or the list waiting to be taken) is full.
    fn want(&mut self, name: &Label, now: Instant) {
        let recent = |at: &Instant| now.saturating_duration_since(*at) < WANT_INTERVAL;
        if self.asked.get(name).is_some_and(recent) {
            return;
        }
        let (start, count) = match self.window {
            Some((start, count))
                if now.saturating_duration_since(start) < Duration::from_secs(1) =>
            {
                (start, count)
            }
            _ => (now, 0),
        };
        if count >= WANTS_PER_SEC || self.wants.len() >= WANTS_PER_SEC as usize {
            self.window = Some((start, count));
            return;
        }
        self.window = Some((start, count + 1));
        self.asked.retain(|_, at| recent(at));
        self.asked.insert(name.clone(), now);
        if !self.wants.contains(name) {
            self.wants.push(name.clone());
        }
    }

    /// An upstream's reply: the client it belongs to and the bytes to send it, or `None`
    /// when it answers nothing we asked (unknown id, wrong sender, wrong question).
    #[must_use]
    pub fn handle_upstream(&mut self, bytes: &[u8], from: SocketAddr) -> Option<(C, Vec<u8>)> {
        if bytes.len() < 12 || bytes.len() > MAX_MESSAGE || bytes[2] & 0x80 == 0 {
            return None;
        }
        let id = u16::from_be_bytes([bytes[0], bytes[1]]);
        let entry = self.in_flight.get(&id)?;
        if entry.upstream != from {
            return None;
        }
        let msg = Message::from_vec(bytes).ok()?;
        let [q] = msg.queries() else {
            return None;
        };
        // Name comparison is case-insensitive (resolvers may randomise case).
        let same = q.query_type() == entry.query.query_type()
            && q.query_class() == entry.query.query_class()
            && q.name() == entry.query.name();
        if !same {
            return None;
        }
        let entry = self.in_flight.remove(&id)?;
        let mut out = bytes.to_vec();
        out[..2].copy_from_slice(&entry.client_id.to_be_bytes());
        if entry.transport == Transport::Udp && out.len() > UDP_PLAIN_LIMIT {
            // The upstream answered our query with the client's own EDNS size, so the client
            // takes it; a client without EDNS asked for at most 512 bytes.
            if let Ok(m) = Message::from_vec(&out) {
                if m.extensions().is_none() {
                    let mut t = m.truncate();
                    t.set_truncated(true);
                    return t.to_vec().ok().map(|b| (entry.client, b));
                }
            }
        }
        Some((entry.client, out))
    }

    /// When the oldest forwarded or held query times out, or a held name is due to be asked
    /// for again, if any is waiting.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let held = self.held.values().flatten().map(|h| h.deadline);
        let again = self
            .held
            .keys()
            .filter_map(|n| self.asked.get(n).map(|at| *at + WANT_INTERVAL));
        self.in_flight
            .values()
            .map(|e| e.deadline)
            .chain(held)
            .chain(again)
            .min()
    }

    /// SERVFAIL for every forwarded query past its deadline, NXDOMAIN for every held one; a
    /// name still held a [`WANT_INTERVAL`] after it was asked for is asked for again (the
    /// first want may have been dropped: sent before the session's first netmap, or over the
    /// coordinator's budget).
    #[must_use]
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<(C, Vec<u8>)> {
        let due: Vec<Label> = self
            .held
            .keys()
            .filter(|n| {
                self.asked
                    .get(*n)
                    .is_none_or(|at| now.saturating_duration_since(*at) >= WANT_INTERVAL)
            })
            .cloned()
            .collect();
        for name in &due {
            self.want(name, now);
            // Asked or not (the rate full), the next try is a WANT_INTERVAL from now.
            self.asked.insert(name.clone(), now);
        }
        let mut out = self.expire_forwarded(now);
        self.held.retain(|_, queries| {
            let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(queries)
                .into_iter()
                .partition(|h| h.deadline <= now);
            out.extend(
                gone.into_iter()
                    .map(|h| (h.client, nxdomain(&h.query, h.transport))),
            );
            *queries = keep;
            !queries.is_empty()
        });
        out
    }

    /// SERVFAIL for every forwarded query past its deadline.
    fn expire_forwarded(&mut self, now: Instant) -> Vec<(C, Vec<u8>)> {
        let expired: Vec<u16> = self
            .in_flight
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        expired
            .into_iter()
            .filter_map(|id| self.in_flight.remove(&id))
            .map(|e| {
                let mut m = Message::error_msg(e.client_id, OpCode::Query, ResponseCode::ServFail);
                m.add_query(e.query);
                m.set_recursion_available(true);
                let bytes = m
                    .to_vec()
                    .unwrap_or_else(|_| error_reply(e.client_id, ResponseCode::ServFail));
                (e.client, bytes)
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        bytes: &[u8],
        msg: &Message,
        query: Query,
        client: &mut Option<C>,
        transport: Transport,
        now: Instant,
        fresh_id: u16,
    ) -> Action {
        let servfail = |msg: &Message| {
            let mut r = response_to(msg);
            r.set_response_code(ResponseCode::ServFail);
            Action::Reply(encode(r, msg, transport))
        };
        let Some(upstream) = self.upstreams.first().copied() else {
            return servfail(msg);
        };
        if self.in_flight.len() >= MAX_IN_FLIGHT || self.in_flight.contains_key(&fresh_id) {
            return servfail(msg);
        }
        let Some(client) = client.take() else {
            return servfail(msg);
        };
        let mut out = bytes.to_vec();
        out[..2].copy_from_slice(&fresh_id.to_be_bytes());
        self.in_flight.insert(
            fresh_id,
            InFlight {
                client,
                transport,
                client_id: msg.id(),
                upstream,
                query,
                deadline: now + FORWARD_TIMEOUT,
            },
        );
        Action::Forward {
            upstream,
            bytes: out,
        }
    }
}

/// At most `per_window` log lines per `window`; the rest are counted and reported with the
/// next line allowed.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    window: Duration,
    per_window: u32,
    started: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(window: Duration, per_window: u32) -> Self {
        Self {
            window,
            per_window,
            started: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, mentioning `n` lines suppressed since the last one; `None`: don't.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if fresh {
            self.started = Some(now);
            self.used = 0;
        }
        if self.used < self.per_window {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The answer to `msg` (a query of class IN) from `zone`: the addresses of a Ward name (of
/// the family asked for), NODATA for the apex or another type, NXDOMAIN otherwise.
fn answer(zone: &Zone, msg: &Message, transport: Transport) -> Vec<u8> {
    let mut reply = response_to(msg);
    let Some(query) = msg.queries().first() else {
        reply.set_response_code(ResponseCode::FormErr);
        return encode(reply, msg, transport);
    };
    match zone.lookup(query.name()) {
        Lookup::Found(addrs) => {
            let name = query.name().clone();
            match query.query_type() {
                RecordType::A => {
                    for a in &addrs.v4 {
                        reply.add_answer(Record::from_rdata(
                            name.clone(),
                            TTL_SECS,
                            RData::A(A(*a)),
                        ));
                    }
                }
                RecordType::AAAA => {
                    for a in &addrs.v6 {
                        reply.add_answer(Record::from_rdata(
                            name.clone(),
                            TTL_SECS,
                            RData::AAAA(AAAA(*a)),
                        ));
                    }
                }
                // The name exists; it has no records of other types (NODATA).
                _ => {}
            }
        }
        Lookup::Apex => {}
        Lookup::NxDomain | Lookup::NotOurs => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
    }
    encode(reply, msg, transport)
}

/// NXDOMAIN for `msg`.
fn nxdomain(msg: &Message, transport: Transport) -> Vec<u8> {
    let mut reply = response_to(msg);
    reply.set_response_code(ResponseCode::NXDomain);
    encode(reply, msg, transport)
}

fn response_to(q: &Message) -> Message {
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .add_queries(q.queries().iter().cloned());
    r
}

/// Encodes an answer, truncated (TC) when a UDP client cannot take its size.
fn encode(mut reply: Message, query: &Message, transport: Transport) -> Vec<u8> {
    let limit = match (transport, query.extensions()) {
        (Transport::Tcp, _) => MAX_MESSAGE,
        (Transport::Udp, Some(e)) => {
            usize::from(e.max_payload()).clamp(UDP_PLAIN_LIMIT, MAX_MESSAGE)
        }
        (Transport::Udp, None) => UDP_PLAIN_LIMIT,
    };
    let id = reply.id();
    match reply.to_vec() {
        Ok(b) if b.len() <= limit => b,
        Ok(_) => {
            reply.take_answers();
            reply.set_truncated(true);
            reply
                .to_vec()
                .unwrap_or_else(|_| error_reply(id, ResponseCode::ServFail))
        }
        Err(_) => error_reply(id, ResponseCode::ServFail),
    }
}

/// A bare header-only reply: what a client gets when its query cannot be read.
fn error_reply(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut b = vec![0u8; 12];
    b[..2].copy_from_slice(&id.to_be_bytes());
    b[2] = 0x80; // QR = response, opcode QUERY
    b[3] = 0x80 | (code.low() & 0x0f); // RA, RCODE
    b
}

#[cfg(test)]
mod tests;
