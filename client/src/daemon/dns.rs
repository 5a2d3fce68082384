//! The resolver's driver: UDP and TCP port 53 on the device's overlay addresses, one UDP
//! socket towards the previous resolvers, and the host's resolver configuration (see
//! [`super::dns_host`]). The answers come from [`crate::dns::Resolver`]; the zone is replaced
//! whenever the session loop publishes a new netmap (`zone` watch channel).
//!
//! Only this device's own processes are answered: a query must come from one of its overlay
//! addresses or from loopback. A peer whose policy lets it reach port 53 here gets nothing, so
//! the resolver never tells another device the names this device may reach, nor forwards for
//! it.
//!
//! On demand (protocol 4), the resolver holds queries for names its zone lacks and wants
//! them; the wants reach the session loop through [`NameDemand`] (the agent asks the
//! coordinator), the answer comes back as a new zone (the delta that added the peers) or as a
//! refusal through [`NameDemand`] again, each with one task wake-up.

use anyhow::{Context, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tracing::{debug, info, warn};
use ward_shared::wire::Label;

use crate::dns::{Action, LogLimiter, Resolver, Transport, Zone, MAX_MESSAGE};

use super::dns_host::{HostDns, Mode};

/// Concurrent TCP connections to the resolver; more wait in the kernel's backlog.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP queries waiting for the resolver task.
const TCP_QUEUE: usize = 256;
/// Most names waiting in each direction of [`NameDemand`]; a further one is dropped (a want:
/// its held queries time out; a refusal: they do).
const MAX_QUEUED_NAMES: usize = 256;

/// What the status view shows about DNS.
#[derive(Debug, Clone, Default)]
pub struct DnsStatus {
    pub mode: Option<Mode>,
    pub listen: Vec<SocketAddr>,
    pub upstreams: Vec<SocketAddr>,
    pub error: Option<String>,
    pub queries: u64,
    pub dropped: u64,
}

pub type SharedDnsStatus = Arc<std::sync::Mutex<DnsStatus>>;

/// A running resolver; [`DnsServer::stop`] restores the host's configuration.
pub struct DnsServer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What the resolver task and the session loop hand each other besides the zone (peers on
/// demand): names the resolver wants the coordinator to hold, and names the coordinator
/// refused. Each list is bounded; each side waits on a [`Notify`], which keeps a wake-up for
/// a waiter that is not waiting yet, so nothing is lost between two turns of a loop.
#[derive(Default)]
pub struct NameDemand {
    wants: std::sync::Mutex<Vec<Label>>,
    wants_ready: Notify,
    refused: std::sync::Mutex<Vec<Label>>,
    refused_ready: Notify,
}

impl NameDemand {
    /// The resolver wants these names (`Resolver::take_wants`); wakes the session loop.
    pub fn want(&self, names: Vec<Label>) {
        push_bounded(&self.wants, names);
        self.wants_ready.notify_one();
    }

    /// The names wanted since the last call, for `Agent::handle_names_wanted`.
    pub fn take_wants(&self) -> Vec<Label> {
        std::mem::take(&mut *super::lock(&self.wants))
    }

    /// Resolves once names were wanted (or were when nobody waited).
    pub async fn wants_ready(&self) {
        self.wants_ready.notified().await
    }

    /// The coordinator refused `name` (`Event::RefuseName`); wakes the resolver task.
    pub fn refuse(&self, name: Label) {
        push_bounded(&self.refused, vec![name]);
        self.refused_ready.notify_one();
    }

    /// Forgets what is queued (a new resolver starts with nothing held).
    pub fn clear(&self) {
        super::lock(&self.wants).clear();
        super::lock(&self.refused).clear();
    }

    fn take_refused(&self) -> Vec<Label> {
        std::mem::take(&mut *super::lock(&self.refused))
    }

    async fn refused_ready(&self) {
        self.refused_ready.notified().await
    }
}

fn push_bounded(list: &std::sync::Mutex<Vec<Label>>, names: Vec<Label>) {
    let mut l = super::lock(list);
    for n in names {
        if l.len() >= MAX_QUEUED_NAMES {
            debug!(name = n.as_str(), "DNS: too many names queued; dropped");
            continue;
        }
        if !l.contains(&n) {
            l.push(n);
        }
    }
}

enum Client {
    Udp(SocketAddr),
    Tcp(oneshot::Sender<Vec<u8>>),
}

type TcpQuery = (Vec<u8>, oneshot::Sender<Vec<u8>>);

impl DnsServer {
    /// Binds port 53 on `v4` and `v6`, takes over the host's resolver configuration (`host`)
    /// and serves until stopped. A bind failure is an error (nothing was changed on the
    /// host); a host-configuration failure is logged and the resolver still serves.
    pub async fn start(
        v4: Ipv4Addr,
        v6: Ipv6Addr,
        port: u16,
        mut host: HostDns,
        zone: watch::Receiver<Zone>,
        names: Arc<NameDemand>,
        status: SharedDnsStatus,
    ) -> Result<Self> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut listen = Vec::new();
        for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
            let addr = SocketAddr::new(ip, port);
            let u = UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding the DNS resolver on udp {addr}"))?;
            let t = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the DNS resolver on tcp {addr}"))?;
            listen.push(u.local_addr()?);
            udp.push(Arc::new(u));
            tcp.push(t);
        }
        let domain = zone.borrow().domain().clone();
        let upstreams = match host.apply(&[IpAddr::V4(v4), IpAddr::V6(v6)], &domain) {
            Ok(u) => {
                info!(mode = %host.mode(), %domain, upstreams = ?u, "DNS: the host resolves Ward names through this device's resolver");
                u
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "DNS: cannot configure the host's resolver; names resolve only when asked directly");
                status.lock().unwrap_or_else(|p| p.into_inner()).error = Some(format!("{e:#}"));
                Vec::new()
            }
        };
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.mode = Some(host.mode());
            s.listen = listen.clone();
            s.upstreams = upstreams.clone();
        }
        info!(listen = ?listen, "DNS resolver listening");
        let (stop, stop_rx) = watch::channel(false);
        let (tcp_tx, tcp_rx) = mpsc::channel::<TcpQuery>(TCP_QUEUE);
        let sem = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        let mut accepters = Vec::new();
        for l in tcp {
            accepters.push(tokio::spawn(accept_loop(
                l,
                [IpAddr::V4(v4), IpAddr::V6(v6)],
                tcp_tx.clone(),
                sem.clone(),
                stop_rx.clone(),
            )));
        }
        let resolver = Resolver::new(zone.borrow().clone(), upstreams);
        let own = [IpAddr::V4(v4), IpAddr::V6(v6)];
        let task = tokio::spawn(async move {
            let io = Io {
                udp,
                tcp_rx,
                zone,
                names,
                stop: stop_rx,
            };
            serve(resolver, own, io, &mut host, status).await;
            for a in accepters {
                a.abort();
            }
            if let Err(e) = host.restore() {
                warn!(error = %format!("{e:#}"), "DNS: restoring the host's resolver configuration failed");
            }
        });
        Ok(Self { stop, task })
    }

    /// Stops serving and restores the host's resolver configuration.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(3), self.task)
            .await
            .is_err()
        {
            warn!("DNS: the resolver did not stop in time");
        }
    }
}

/// What the resolver task listens on.
struct Io {
    udp: Vec<Arc<UdpSocket>>,
    tcp_rx: mpsc::Receiver<TcpQuery>,
    zone: watch::Receiver<Zone>,
    names: Arc<NameDemand>,
    stop: watch::Receiver<bool>,
}

async fn serve(
    mut r: Resolver<Client>,
    own: [IpAddr; 2],
    io: Io,
    host: &mut HostDns,
    status: SharedDnsStatus,
) {
    let Io {
        udp,
        mut tcp_rx,
        mut zone,
        names,
        mut stop,
    } = io;
    let upstream4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.ok();
    let upstream6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await.ok();
    let mut log = LogLimiter::new(Duration::from_secs(10), 5);
    let mut buf4 = vec![0u8; MAX_MESSAGE + 1];
    let mut buf6 = vec![0u8; MAX_MESSAGE + 1];
    let mut bufu4 = vec![0u8; MAX_MESSAGE + 1];
    let mut bufu6 = vec![0u8; MAX_MESSAGE + 1];
    let (Some(udp4), Some(udp6)) = (udp.first().cloned(), udp.get(1).cloned()) else {
        return;
    };
    loop {
        let timeout = r.poll_timeout();
        let (action, client_addr) = tokio::select! {
            _ = stop.changed() => return,
            changed = zone.changed() => {
                if changed.is_err() {
                    return;
                }
                let z = zone.borrow_and_update().clone();
                if z.domain() != r.zone().domain() {
                    let own = udp.iter().filter_map(|s| s.local_addr().ok()).map(|a| a.ip()).collect::<Vec<_>>();
                    match host.apply(&own, z.domain()) {
                        Ok(_) => info!(domain = %z.domain(), "DNS: domain changed; host configuration updated"),
                        Err(e) => warn!(error = %format!("{e:#}"), "DNS: cannot update the host's resolver configuration"),
                    }
                }
                debug!(names = z.names().count(), "DNS zone updated");
                // Held queries whose names the new zone has (a delta brought their peers).
                for (c, b) in r.set_zone(z) {
                    reply(&udp4, &udp6, c, b).await;
                }
                continue;
            }
            _ = names.refused_ready() => {
                let now = Instant::now();
                for name in names.take_refused() {
                    for (c, b) in r.handle_refusal(&name, now) {
                        reply(&udp4, &udp6, c, b).await;
                    }
                }
                continue;
            }
            got = udp4.recv_from(&mut buf4) => match got {
                Ok((n, from)) if is_local(from.ip(), &own) => (query(&mut r, &buf4[..n], Client::Udp(from), Transport::Udp), Some((from, 4))),
                Ok((_, from)) => {
                    refused(&mut log, from);
                    continue;
                }
                Err(_) => continue,
            },
            got = udp6.recv_from(&mut buf6) => match got {
                Ok((n, from)) if is_local(from.ip(), &own) => (query(&mut r, &buf6[..n], Client::Udp(from), Transport::Udp), Some((from, 6))),
                Ok((_, from)) => {
                    refused(&mut log, from);
                    continue;
                }
                Err(_) => continue,
            },
            Some((bytes, tx)) = tcp_rx.recv() => {
                (query(&mut r, &bytes, Client::Tcp(tx), Transport::Tcp), None)
            }
            got = recv_opt(upstream4.as_ref(), &mut bufu4) => {
                if let Ok((n, from)) = got {
                    if let Some((c, b)) = r.handle_upstream(&bufu4[..n], from) {
                        reply(&udp4, &udp6, c, b).await;
                    }
                }
                continue;
            }
            got = recv_opt(upstream6.as_ref(), &mut bufu6) => {
                if let Ok((n, from)) = got {
                    if let Some((c, b)) = r.handle_upstream(&bufu6[..n], from) {
                        reply(&udp4, &udp6, c, b).await;
                    }
                }
                continue;
            }
            _ = sleep_opt(timeout) => {
                for (c, b) in r.handle_timeout(Instant::now()) {
                    reply(&udp4, &udp6, c, b).await;
                }
                // Names still held are asked for again.
                let wants = r.take_wants();
                if !wants.is_empty() {
                    names.want(wants);
                }
                continue;
            }
        };
        let (action, client) = action;
        let wants = r.take_wants();
        if !wants.is_empty() {
            names.want(wants);
        }
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.queries += 1;
            if matches!(action, Action::Drop(_)) {
                s.dropped += 1;
            }
        }
        match action {
            Action::Reply(b) => {
                if let Some(c) = client {
                    reply(&udp4, &udp6, c, b).await;
                }
            }
            Action::Forward { upstream, bytes } => {
                let sock = match upstream {
                    SocketAddr::V4(_) => upstream4.as_ref(),
                    SocketAddr::V6(_) => upstream6.as_ref(),
                };
                if let Some(s) = sock {
                    if let Err(e) = s.send_to(&bytes, upstream).await {
                        if let Some(n) = log.allow(Instant::now()) {
                            debug!(error = %e, %upstream, suppressed = n, "DNS: forwarding failed");
                        }
                    }
                }
            }
            // The client comes back from set_zone, handle_refusal or handle_timeout.
            Action::Held => {}
            Action::Drop(reason) => {
                if let Some(n) = log.allow(Instant::now()) {
                    let from = client_addr.map(|(a, _)| a.to_string());
                    info!(%reason, from = from.unwrap_or_else(|| "tcp".into()), suppressed = n, "DNS: message dropped");
                }
            }
        }
    }
}

/// One query into the core: the action, and the client to answer unless it was forwarded.
fn query(
    r: &mut Resolver<Client>,
    bytes: &[u8],
    client: Client,
    t: Transport,
) -> (Action, Option<Client>) {
    r.handle_query(bytes, client, t, Instant::now(), rand::random())
}

/// Whether a client is one of this device's own processes (an own address or loopback).
fn is_local(ip: IpAddr, own: &[IpAddr]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || own.contains(&ip)
}

fn refused(log: &mut LogLimiter, from: SocketAddr) {
    if let Some(n) = log.allow(Instant::now()) {
        info!(%from, suppressed = n, "DNS: query from another device ignored (only this device's own processes are answered)");
    }
}

async fn reply(udp4: &UdpSocket, udp6: &UdpSocket, c: Client, bytes: Vec<u8>) {
    match c {
        Client::Udp(to) => {
            let s = if to.is_ipv4() { udp4 } else { udp6 };
            let _ = s.send_to(&bytes, to).await;
        }
        Client::Tcp(tx) => {
            let _ = tx.send(bytes);
        }
    }
}

async fn recv_opt(s: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn accept_loop(
    l: TcpListener,
    own: [IpAddr; 2],
    tx: mpsc::Sender<TcpQuery>,
    sem: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            return;
        };
        let Ok((s, from)) = l.accept().await else {
            continue;
        };
        if !is_local(from.ip(), &own) {
            continue; // dropped: closes the connection
        }
        let tx = tx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp_conn(s, tx, stop).await;
        });
    }
}

/// DNS over TCP: 2-byte length, message; several queries per connection, in order.
async fn tcp_conn(
    mut s: TcpStream,
    tx: mpsc::Sender<TcpQuery>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let n = usize::from(u16::from_be_bytes(len));
        if n > MAX_MESSAGE {
            return Ok(()); // oversized: close, read nothing more
        }
        let mut body = vec![0u8; n];
        match tokio::time::timeout(TCP_IDLE, s.read_exact(&mut body)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let (otx, orx) = oneshot::channel();
        if tx.send((body, otx)).await.is_err() {
            return Ok(());
        }
        // No answer (dropped message, timeout): close the connection.
        let Ok(Ok(answer)) = tokio::time::timeout(Duration::from_secs(6), orx).await else {
            return Ok(());
        };
        let Ok(l) = u16::try_from(answer.len()) else {
            return Ok(());
        };
        s.write_all(&l.to_be_bytes()).await?;
        s.write_all(&answer).await?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;

    #[test]
    fn only_this_devices_own_addresses_and_loopback_are_answered() {
        let own = [
            IpAddr::V4(Ipv4Addr::new(100, 64, 0, 7)),
            "fd00::7".parse().unwrap(),
        ];
        for ok in [
            "100.64.0.7",
            "fd00::7",
            "127.0.0.1",
            "::1",
            "::ffff:100.64.0.7",
        ] {
            assert!(is_local(ok.parse().unwrap(), &own), "{ok}");
        }
        for no in ["100.64.0.8", "fd00::8", "10.0.0.1", "::ffff:100.64.0.8"] {
            assert!(!is_local(no.parse().unwrap(), &own), "{no}");
        }
    }
}
